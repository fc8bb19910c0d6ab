"""The drain: partition streams into MongoDB (the trigger is ``storage/trigger.py``, dead letters
``storage/deadletters.py``, trimming ``storage/maintenance.py``).

The drain is at least once and every write is idempotent (docs/adr/0003): an entry is acknowledged
(XACK) only after its effect is in MongoDB, and applying an entry twice, or an older entry after a newer
one, changes nothing. So a killed worker, a redelivered batch or two workers on one partition are harmless.

Every write to MongoDB is one command per kind per batch: an unordered ``insert`` of the new messages, an
ordered ``update`` of edits/deletes/read marks, an ordered ``update`` of conversations (raw commands rather than
pymongo's ``bulk_write``: FerretDB v1 omits ``nModified`` from a reply with write errors and pymongo then
raises ``KeyError`` instead of ``BulkWriteError``; the raw reply's ``writeErrors`` work on both servers).
A command that fails as a whole is bisected until the entries that fail alone are found
(``_write_isolating_failures``, docs/adr/0025): one bad entry never takes its batch with it. What each event type
writes comes from one table, ``EVENT_RULES`` (type -> how its payload is parsed and which statements it turns
into; docs/adr/0029): a new type is one rule, a type without one is dead-lettered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import bson.errors
import pymongo.errors
import redis
from bson import ObjectId
from bson.errors import InvalidId
from django.conf import settings
from mongoengine.connection import get_db

from core.bus import BusSync, bus_sync
from core.documents import BUCKET_SEQS, bucket_id
from core.entries import Event, MalformedEntry, event_decode
from core.errors import Retryable
from core.keys import (
    GROUP,
    RATE_BUCKET_S,
    RATE_WINDOW_S,
    drain_lease_key,
    failures_key,
    persisted_key,
    rate_key,
    stats_key,
    stream_key,
)
from core.values import as_str
from storage.deadletters import deadletter_add, storable
from storage.selectors import entry_key, partitions_state

logger = logging.getLogger("chatstream.storage")

# MongoDB errors that say "the server is away", not "this entry is wrong": nothing is acked, the entries are
# handed back for the next drain, and no entry is blamed.
TRANSIENT_MONGO = (pymongo.errors.ConnectionFailure, pymongo.errors.ExecutionTimeout,
                   pymongo.errors.WriteConcernError)
DUPLICATE_KEY = 11000
INT64_MAX = 2**63 - 1  # the largest integer BSON holds
# Statements per ``update`` command. FerretDB v1 (SQLite) holds one pooled connection per statement until the
# command ends, and its pool has 100 for all clients together: an update of 101 statements waits for a
# connection forever, and so does every later command (bench/ferretdb_update_limit.py; a drain batch touching
# over 100 conversations hung `make run`'s store, and so did two workers sending 50 each at once). 16 keeps
# `make run`'s two workers (and a third for a `manage.py drain`) far below it, beside the other roles' reads.
UPDATE_STATEMENTS_MAX = 16

_groups_ready: set[str] = set()
# Delete the lease only if it is still ours (it may have expired and been taken by another drain).
# Extend the lease only if it is still ours; 0 means another drain took the partition over.
_LEASE_RENEW_LUA = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
                    "end return 0")
_LEASE_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


# ------------------------------------------------------------------ the drain


@dataclass
class DrainResult:
    partition: int
    read: int = 0  # entries taken this call (new, own pending and reclaimed)
    reclaimed: int = 0  # of which taken over from another consumer
    persisted: int = 0  # entries whose effect is in MongoDB and that are acknowledged
    dead_lettered: int = 0
    deferred: int = 0  # left pending for a later attempt (their write failed, or an edit came first)
    more: bool = False  # more is waiting: the caller should drain again
    busy: bool = False  # another drain holds the partition's lease: nothing was done
    duration_s: float = 0.0


@dataclass
class _Item:
    entry_id: str
    fields: dict[Any, Any] | None
    deliveries: int = 1
    event: Event | None = None
    failure: str | None = None  # set: left pending and counted (retried up to DRAIN_MAX_ATTEMPTS)
    dead: str | None = None  # set: dead-lettered now
    conversation: ObjectId | None = None
    doc: dict[str, Any] = field(default_factory=dict)  # the parsed payload


def group_ensure(*, partition: int, client: BusSync | None = None) -> None:
    """Create the ``storage`` consumer group (from the stream's first entry) if missing; idempotent."""
    key = stream_key(partition)
    if key in _groups_ready:
        return
    r = client or bus_sync()
    try:
        r.xgroup_create(key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    _groups_ready.add(key)


def _read_batch(r: BusSync, *, partition: int, consumer: str, batch_size: int) -> tuple[list[_Item], int]:
    """Pending entries idle past ``DRAIN_RECLAIM_IDLE_S`` (orphans of dead consumers, entries handed back
    after an outage, deferred ones due for another attempt; XAUTOCLAIM), then new entries, up to
    ``batch_size``, in stream order."""
    key = stream_key(partition)
    items: dict[str, _Item] = {}
    reclaimed = 0
    room = batch_size - len(items)
    if room > 0:
        try:
            _, claimed, _deleted = r.xautoclaim(key, GROUP, consumer, int(settings.DRAIN_RECLAIM_IDLE_S * 1000),
                                                "0-0", count=room)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group vanished (FLUSHALL, a restore without it): recreate and start over.
            _groups_ready.discard(key)
            group_ensure(partition=partition, client=r)
            claimed = []
        if claimed:
            ids = [as_str(eid) for eid, _ in claimed]
            counts = {as_str(p["message_id"]): int(p["times_delivered"]) for p in r.xpending_range(
                key, GROUP, min=min(ids, key=entry_key), max=max(ids, key=entry_key), count=len(ids) + 100,
                consumername=consumer)}
            for eid, fields in claimed:
                if as_str(eid) not in items:
                    items[as_str(eid)] = _Item(as_str(eid), fields, deliveries=counts.get(as_str(eid), 1))
                    reclaimed += 1
    room = batch_size - len(items)
    if room > 0:
        new: Any = r.xreadgroup(GROUP, consumer, {key: ">"}, count=room)
        for eid, fields in (new[0][1] if new else []):
            items[as_str(eid)] = _Item(as_str(eid), fields)
    return sorted(items.values(), key=lambda i: entry_key(i.entry_id)), reclaimed


def _oid(value: Any, what: str) -> ObjectId:
    try:
        return ObjectId(str(value))
    except (InvalidId, TypeError):
        raise MalformedEntry(f"{what} {value!r} is not an ObjectId") from None


def _time(value: Any, what: str) -> datetime:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise MalformedEntry(f"{what} {value!r} is not an ISO-8601 time") from None


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise MalformedEntry(f"payload field {name!r} is missing or not a string")
    return value


def _parse(item: _Item) -> None:
    """Decode and validate one entry into ``item.event``/``item.doc``; a bad entry is marked dead."""
    if item.fields is None:
        return  # deleted from the stream while pending: nothing to write, only to acknowledge
    if item.deliveries > settings.DRAIN_MAX_DELIVERIES:
        item.dead = f"delivered {item.deliveries} times without being acknowledged (its workers died or hung)"
        return
    try:
        event = event_decode(item.entry_id, item.fields)
        item.conversation, item.doc = _event_parse(event)
        item.event = event
    except MalformedEntry as exc:
        item.dead = f"malformed: {exc}"


def _event_parse(event: Event) -> tuple[ObjectId, dict[str, Any]]:
    """The conversation and the parsed payload of a decoded event, by its type's rule (``EVENT_RULES``).
    Raises MalformedEntry (an unknown type among others)."""
    if event.seq > INT64_MAX:
        raise MalformedEntry(f"seq {event.seq} does not fit in 64 bits")
    conversation = _oid(event.conversation_id, "conversation id")
    rule = EVENT_RULES.get(event.type)
    if rule is None:
        raise MalformedEntry(f"unknown event type {event.type!r}")
    return conversation, rule.parse(event)


def _rule(item: _Item) -> EventRule:
    """The rule of a parsed item (precondition: ``item.event`` is set, so its type has a rule)."""
    assert item.event is not None
    return EVENT_RULES[item.event.type]


def _new_documents(items: list[_Item]) -> list[dict[str, Any]]:
    """The ``messages`` documents of the batch's events that create one (``message.new``), in stream order."""
    return [document(i) for i in items if i.event is not None and (document := _rule(i).document) is not None]


# A statement that fails alone is reported as a write error with this code (not a server code).
REFUSED = -1
# Exceptions pymongo raises while encoding a command, before anything is sent: the statement can never be
# written as it is (a lone surrogate, a NUL byte in a key, an int over 64 bits, a document over 16 MiB).
UNENCODABLE = (bson.errors.BSONError, UnicodeError, OverflowError)


def _server_answers(db: Any) -> bool:
    """Whether MongoDB answers a ``ping`` now (after a dropped connection: was it the server or our command?)."""
    try:
        db.command("ping")
    except pymongo.errors.PyMongoError:
        return False
    return True


def _write_isolating_failures(db: Any, command: str, collection: str, statements: list[dict[str, Any]], *,
                              ordered: bool) -> list[dict[str, Any]]:
    """Send ``statements`` as one ``insert``/``update`` command and return its write errors (``index`` into
    ``statements``). If the command as a whole fails for a reason that is not an outage (a statement that
    does not encode, a command the server refuses, a connection the server drops while it still answers a
    ping), bisect: halves are sent again until every statement that fails alone is found; each is reported
    as a write error with code ``REFUSED``, its reason in ``errmsg`` and ``deterministic`` true when it
    cannot even be encoded. The rest is written, so one bad entry never holds back the others. ``ordered``:
    stop at the first error as the server does (the caller resumes after it). Cost: one command when nothing
    fails; about ``2·log2(n)`` more per statement that fails alone. Sending a half again is harmless because
    every write of the drain is idempotent (docs/adr/0003). Raises the transient pymongo errors when MongoDB
    is away (a dropped connection and no answer to a ping, a server selection timeout)."""

    def run(lo: int, hi: int) -> list[dict[str, Any]]:
        key = "documents" if command == "insert" else "updates"
        try:
            reply = db.command(command, collection, **{key: statements[lo:hi]}, ordered=ordered)
            return [{**e, "index": lo + int(e["index"])} for e in reply.get("writeErrors") or []]
        except TRANSIENT_MONGO as exc:
            # FerretDB v1 closes the connection on some documents (NaN); an outage closes it too. Only a
            # server that still answers right after is taken to have refused this command.
            if (not isinstance(exc, pymongo.errors.AutoReconnect)
                    or isinstance(exc, pymongo.errors.ServerSelectionTimeoutError) or not _server_answers(db)):
                raise
            cause: Exception = exc
            why = "the server closed the connection on it"
        except Exception as exc:  # whatever the cause: it is narrowed down to the statements below
            cause = exc
            why = ("it does not encode" if isinstance(exc, UNENCODABLE) else
                   "the server refused it" if isinstance(exc, pymongo.errors.OperationFailure) else "it failed")
        if hi - lo == 1:
            return [{"index": lo, "code": REFUSED, "deterministic": isinstance(cause, UNENCODABLE),
                     "errmsg": f"{why}: {type(cause).__name__}: {cause}"}]
        mid = (lo + hi) // 2
        first = run(lo, mid)
        if ordered and first:
            return first
        return first + run(mid, hi)

    return run(0, len(statements)) if statements else []


def _insert_new(db: Any, items: list[_Item]) -> None:
    """Insert the batch's new messages with one unordered ``insert``. Why not upserts: on FerretDB v1 an
    upsert by ``_id`` costs ~15 ms and grows with the collection, an insert ~0.03 ms (docs/benchmarks.md).
    A duplicate ``_id`` means the message is already persisted (a redelivery): that entry is done. A duplicate
    with no such ``_id`` is another message on the same (conversation, seq): dead-lettered. A document that
    does not encode is dead-lettered at once; other write errors count as failures of their entry."""
    news = [i for i in items if i.event is not None and _rule(i).document is not None]
    if not news:
        return
    dup: dict[str, _Item] = {}
    for err in _write_isolating_failures(db, "insert", "messages", _new_documents(news), ordered=False):
        item = news[int(err["index"])]
        if int(err.get("code", 0)) == DUPLICATE_KEY:
            dup[item.doc["id"]] = item
        elif err.get("deterministic"):
            item.dead = f"messages insert refused: {err['errmsg']}"[:1000]
        else:
            what = "refused" if err.get("code") == REFUSED else f"error {err.get('code')}"
            item.failure = f"messages insert {what}: {err.get('errmsg', '')}"[:1000]
    if dup:
        there = messages_existing(db, ids=list(dup))  # by _id each: $in scans on FerretDB v1
        for mid, item in dup.items():
            if mid not in there:
                assert item.event is not None
                item.dead = (f"seq {item.event.seq} of conversation {item.event.conversation_id} already belongs "
                             f"to another message")


def _insert_versions(db: Any, items: list[_Item]) -> None:
    """Insert the batch's ``message_versions`` documents (``EventRule.versions``) with one unordered ``insert``:
    insert-only, keyed by "<message id>:<seq>", so a duplicate ``_id`` is a redelivery (done). A document
    that does not encode dead-letters its entry; another error leaves it pending (its other writes wait too)."""
    docs: list[dict[str, Any]] = []
    owners: list[_Item] = []
    for item in items:
        make = _rule(item).versions if item.event is not None and item.dead is None else None
        if make is not None and item.failure is None:
            for doc in make(item):
                docs.append(doc)
                owners.append(item)
    for err in _write_isolating_failures(db, "insert", "message_versions", docs, ordered=False):
        item = owners[int(err["index"])]
        if int(err.get("code", 0)) == DUPLICATE_KEY:
            continue
        if err.get("deterministic"):
            item.dead = f"message_versions insert refused: {err['errmsg']}"[:1000]
        else:
            item.failure = f"message_versions insert error {err.get('code')}: {err.get('errmsg', '')}"[:1000]


def _message_ops(items: list[_Item], seen: _Seen) -> tuple[list[dict[str, Any]], list[list[_Item]]]:
    """The update statements of the batch on ``messages`` (edits, deletes, 1:1 read marks), each with the
    items it carries: first each item's own statement in stream order, then the statements a rule makes for
    all of its type's items at once."""
    ops: list[dict[str, Any]] = []
    owners: list[list[_Item]] = []
    pending = [i for i in items if i.event is not None and i.failure is None and i.dead is None]
    for item in pending:
        update = _rule(item).message_update
        if update is not None and (op := update(item, seen)) is not None:
            ops.append(op)
            owners.append([item])
    for type_, rule in EVENT_RULES.items():
        if rule.message_updates is not None:
            batched = rule.message_updates([i for i in pending if i.event and i.event.type == type_], seen)
            for op, group in batched:
                ops.append(op)
                owners.append(group)
    return ops, owners


def _conversation_ops(items: list[_Item], seen: _Seen) -> tuple[list[dict[str, Any]], list[list[_Item]]]:
    """Per conversation: one ``$max`` of what each item's rule contributes (last_seq, updated_at, read
    cursors); then what a rule makes of all its type's items (lastMessage moved only forward); then each
    item's own statement in stream order (an edit or delete of the current lastMessage mirrored into it, only
    if newer than what it shows)."""
    by_conv: dict[ObjectId, list[_Item]] = {}
    for item in items:
        if item.event is not None and item.conversation is not None:
            by_conv.setdefault(item.conversation, []).append(item)
    ops: list[dict[str, Any]] = []
    owners: list[list[_Item]] = []
    for cid, group in by_conv.items():
        if seen.conversation(cid) is None:
            continue  # no such document: every statement would match nothing (and scan on FerretDB v1)
        maxes: dict[str, Any] = {}
        for item in group:
            for path, value in _rule(item).conversation_max(item).items():
                maxes[path] = max(maxes.get(path, value), value)
        first = len(ops)
        if maxes:
            ops.append({"q": {"_id": cid}, "u": {"$max": maxes}})
            owners.append(group)
        for type_, rule in EVENT_RULES.items():
            if rule.conversation_updates is not None:
                mine = [i for i in group if i.event and i.event.type == type_]
                if mine:
                    for op, carried in rule.conversation_updates(cid, mine, seen):
                        if maxes and _merge_set(ops[first], op):
                            continue  # carried by the conversation's first statement, whose owners are all
                        ops.append(op)
                        owners.append(carried)
        for item in group:
            update = _rule(item).conversation_update
            if update is not None and (own := update(cid, item, seen)) is not None:
                ops.append(own)
                owners.append([item])
    return ops, owners


def _merge_set(into: dict[str, Any], op: dict[str, Any]) -> bool:
    """Fold ``op`` (a pure ``$set`` on the same ``_id``) into ``into`` when no path of one is a path of the other
    or lies under it (one statement may not set ``a`` and ``a.b``); returns whether it did. Why: each statement
    that changes a document costs FerretDB a read, a rewrite and an index update (~1-2 ms), and a batch of
    messages spread over many conversations sent two per conversation (``$max`` of last_seq/updated_at, then
    lastMessage): one is enough (docs/adr/0035)."""
    if into["q"] != op["q"] or set(op["u"]) != {"$set"} or not set(into["u"]) <= {"$max", "$set"}:
        return False
    taken = [path for fields in into["u"].values() for path in fields]
    for path in op["u"]["$set"]:
        if any(path == t or path.startswith(t + ".") or t.startswith(path + ".") for t in taken):
            return False
    into["u"].setdefault("$set", {}).update(op["u"]["$set"])
    return True


# ------------------------------------------------------------------ the event table
# One rule per event type: how its payload is parsed and which write statements it turns into. The drain
# above sends the statements of a whole batch as one command per kind; adding an event type is one rule.


@dataclass(frozen=True, slots=True)
class EventRule:
    """How the drain applies one event type. Every function is pure but for ``_Seen``: it reads the documents
    it guards on by ``_id`` and records there what its statements change.

    ``parse``: the payload checked and converted (raises MalformedEntry). ``document``: the ``messages``
    document it inserts. ``message_update``: its own update of ``messages`` (None: its guard says there is
    nothing to write). ``message_updates``: statements for all the batch's items of the type at once, with the
    items each carries. Every statement filters on ``_id`` equality alone; its guard is decided from the
    documents read by ``_id`` (``_Seen``). ``needs_message``: left pending while its message is not in MongoDB.
    ``conversation_max``: the fields it raises with
    ``$max`` on its conversation. ``conversation_updates``: statements on the conversation for all of the
    type's items in it. ``conversation_update``: its own statement on its conversation (None: nothing)."""

    parse: Callable[[Event], dict[str, Any]]
    conversation_max: Callable[[_Item], dict[str, Any]]
    document: Callable[[_Item], dict[str, Any]] | None = None
    message_update: Callable[[_Item, _Seen], dict[str, Any] | None] | None = None
    message_updates: Callable[[list[_Item], _Seen], list[tuple[dict[str, Any], list[_Item]]]] | None = None
    needs_message: bool = False
    conversation_updates: Callable[[ObjectId, list[_Item], _Seen], list[tuple[dict[str, Any], list[_Item]]]] | None \
        = None
    conversation_update: Callable[[ObjectId, _Item, _Seen], dict[str, Any] | None] | None = None
    # The ``message_versions`` documents it inserts (``_id`` "<message id>:<seq>": a redelivery is a duplicate).
    versions: Callable[[_Item], list[dict[str, Any]]] | None = None


@dataclass
class _Seen:
    """The documents the drain is about to update, each read once by ``_id`` equality (memoized for the batch)
    and then kept up to date with the statements the batch emits. Why: FerretDB v1 pushes only ``_id``
    equality down, and a filter with more conditions that does not match (an older edit, a lastMessage that
    is not the edited message, a redelivery) makes it scan the whole collection (bench/drain_filters.py:
    509 ms at 10,000 messages against 0.4 ms when it matches). So every drain statement filters on ``_id``
    alone and its guard is decided here, from the document as read: safe because a partition's drain holds
    its lease (one drain per partition at a time, and a conversation's events are all in one partition).
    Side effect: ``find_one`` reads, no writes."""

    db: Any
    messages: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    conversations: dict[ObjectId, dict[str, Any] | None] = field(default_factory=dict)
    buckets: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def message(self, mid: str) -> dict[str, Any] | None:
        if mid not in self.messages:
            self.messages[mid] = self.db.messages.find_one(
                {"_id": mid}, {"seq": 1, "deleted": 1, "edit_seq": 1, "reactions": 1, "rx_seq": 1})
        return self.messages[mid]

    def conversation(self, cid: ObjectId) -> dict[str, Any] | None:
        if cid not in self.conversations:
            self.conversations[cid] = self.db.conversations.find_one(
                {"_id": cid}, {"type": 1, "lastMessage": 1, "read_cursors": 1})
        return self.conversations[cid]

    def bucket(self, bid: str) -> dict[str, Any] | None:
        if bid not in self.buckets:
            self.buckets[bid] = self.db.message_buckets.find_one({"_id": bid})
        return self.buckets[bid]


def _older_edit(doc: dict[str, Any], seq: int) -> bool:
    """Whether ``doc``'s ``edit_seq`` (missing, None or lower) is older than ``seq``: the guard the statements
    carried as ``$or`` in their filter, decided on the document read by ``_id``."""
    current = doc.get("edit_seq")
    return current is None or (isinstance(current, int) and current < seq)


def _ev(item: _Item) -> Event:
    assert item.event is not None
    return item.event


# message.new


def _new_parse(event: Event) -> dict[str, Any]:
    if event.seq < 1:
        raise MalformedEntry(f"message.new with seq {event.seq}")
    data = event.data
    return {"id": _text(data, "id"), "sender_id": _oid(data.get("sender_id"), "sender_id"),
            "content": _text(data, "content"), "timestamp": _time(data.get("timestamp"), "timestamp"),
            "client_msg_id": data.get("client_msg_id"), "mentions": _mentions(data.get("mentions")),
            "reply_to": _quote_parse(data.get("reply_to"))}


def _mentions(value: Any) -> list[str]:
    """A payload's ``mentions`` (member ids; absent before mentions existed): a list of 24-hex ids, else the
    entry is malformed (dead-lettered)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) == 24 for v in value):
        raise MalformedEntry("message.new with malformed mentions")
    return list(value)


def _quote_parse(quote: Any) -> dict[str, Any] | None:
    """A reply's quote (``messaging.replies.quote_of``) checked field by field, or None for a plain message."""
    if quote is None:
        return None
    if not isinstance(quote, dict) or isinstance(quote.get("seq"), bool) or not isinstance(quote.get("seq"), int) \
            or not all(isinstance(quote.get(k), str) for k in ("id", "sender_id", "username", "excerpt")) \
            or not isinstance(quote.get("deleted"), bool):
        raise MalformedEntry(f"message.new with reply_to {str(quote)[:100]!r}")
    return {k: quote[k] for k in ("id", "seq", "sender_id", "username", "excerpt", "deleted")}


def _new_document(i: _Item) -> dict[str, Any]:
    return {"_id": i.doc["id"], "conversation_id": i.conversation, "seq": _ev(i).seq,
            "sender_id": i.doc["sender_id"], "client_msg_id": i.doc["client_msg_id"], "content": i.doc["content"],
            "timestamp": i.doc["timestamp"], "deleted": False, "read_status": "sent",
            **({"mentions": i.doc["mentions"]} if i.doc["mentions"] else {}),
            **({"reply_to": i.doc["reply_to"]} if i.doc["reply_to"] is not None else {})}


def _new_conversation_max(i: _Item) -> dict[str, Any]:
    return {"last_seq": max(_ev(i).seq, 0), "updated_at": i.doc["timestamp"]}


def _new_last_message(cid: ObjectId, news: list[_Item], seen: _Seen) -> list[tuple[dict[str, Any], list[_Item]]]:
    """lastMessage becomes the conversation's newest message of the batch, unless it shows a newer one."""
    last_new = news[-1]
    d, seq = last_new.doc, _ev(last_new).seq
    conv = seen.conversation(cid)
    shown = conv.get("lastMessage") if conv is not None else None
    if conv is None or (shown is not None and not (isinstance(shown, dict) and isinstance(shown.get("seq"), int)
                                                    and shown["seq"] < seq)):
        return []  # no such conversation, or it shows this message or a newer one already
    last = {"id": d["id"], "seq": seq, "sender_id": str(d["sender_id"]), "content": d["content"],
            "timestamp": d["timestamp"], "deleted": False}
    conv["lastMessage"] = dict(last)
    return [({"q": {"_id": cid}, "u": {"$set": {"lastMessage": last}}}, [last_new])]


# message.edited and message.deleted


def _edited_parse(event: Event) -> dict[str, Any]:
    original = event.data.get("original")
    if original is not None:
        if not isinstance(original, dict) or isinstance(original.get("seq"), bool) \
                or not isinstance(original.get("seq"), int) or not 0 < original["seq"] < event.seq:
            raise MalformedEntry(f"message.edited with original {str(original)[:100]!r}")
        original = {"content": _text(original, "content"), "at": _time(original.get("at"), "original.at"),
                    "seq": original["seq"]}
    return {"id": _text(event.data, "id"), "content": _text(event.data, "content"),
            "edited_at": _time(event.data.get("edited_at"), "edited_at"), "original": original}


def _version(i: _Item, *, seq: int, content: str, at: datetime, deleted: bool = False) -> dict[str, Any]:
    return {"_id": f"{i.doc['id']}:{seq}", "message_id": i.doc["id"], "conversation_id": i.conversation,
            "seq": seq, "content": content, "at": at, "deleted": deleted}


def _edited_versions(i: _Item) -> list[dict[str, Any]]:
    """The version this edit made and, on a first edit, the original it carries."""
    made = [_version(i, seq=_ev(i).seq, content=i.doc["content"], at=i.doc["edited_at"])]
    original = i.doc["original"]
    if original is None:
        return made
    return [_version(i, seq=original["seq"], content=original["content"], at=original["at"]), *made]


def _deleted_versions(i: _Item) -> list[dict[str, Any]]:
    return [_version(i, seq=_ev(i).seq, content="", at=i.doc["deleted_at"], deleted=True)]


def _deleted_parse(event: Event) -> dict[str, Any]:
    return {"id": _text(event.data, "id"), "deleted_at": _time(event.data.get("deleted_at"), "deleted_at")}


def _edited_update(i: _Item, seen: _Seen) -> dict[str, Any] | None:
    # Guarded by the event's seq: an older edit arriving late (redelivery, retry), or one of a deleted
    # message, writes nothing.
    seq = _ev(i).seq
    message = seen.message(i.doc["id"])
    if message is None or message.get("deleted") is True or not _older_edit(message, seq):
        return None
    message["edit_seq"] = seq
    return {"q": {"_id": i.doc["id"]},
            "u": {"$set": {"content": i.doc["content"], "edited_at": i.doc["edited_at"], "edit_seq": seq}}}


def _deleted_update(i: _Item, seen: _Seen) -> dict[str, Any] | None:
    message = seen.message(i.doc["id"])
    if message is None:
        return None  # not persisted yet: the entry is deferred
    message.update(deleted=True, edit_seq=_ev(i).seq)
    return {"q": {"_id": i.doc["id"]}, "u": {"$set": {
        "deleted": True, "content": "", "deleted_at": i.doc["deleted_at"], "edit_seq": _ev(i).seq}}}


def _sequenced_conversation_max(i: _Item) -> dict[str, Any]:
    return {"last_seq": max(_ev(i).seq, 0)}


def _last_message_mirror(cid: ObjectId, i: _Item, change: dict[str, Any], seen: _Seen) -> dict[str, Any] | None:
    """The edit or delete mirrored into lastMessage if it shows that message and no newer change of it."""
    seq = _ev(i).seq
    conv = seen.conversation(cid)
    shown = conv.get("lastMessage") if conv is not None else None
    if not isinstance(shown, dict) or shown.get("id") != i.doc["id"] \
            or ("edit_seq" in shown and not (isinstance(shown["edit_seq"], int) and shown["edit_seq"] < seq)):
        return None
    shown.update({k.removeprefix("lastMessage."): v for k, v in change.items()}, edit_seq=seq)
    return {"q": {"_id": cid}, "u": {"$set": {**change, "lastMessage.edit_seq": seq}}}


def _edited_last_message(cid: ObjectId, i: _Item, seen: _Seen) -> dict[str, Any] | None:
    return _last_message_mirror(cid, i, {"lastMessage.content": i.doc["content"]}, seen)


def _deleted_last_message(cid: ObjectId, i: _Item, seen: _Seen) -> dict[str, Any] | None:
    return _last_message_mirror(cid, i, {"lastMessage.content": "", "lastMessage.deleted": True}, seen)


# read.updated


def _read_parse(event: Event) -> dict[str, Any]:
    seq = event.data.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise MalformedEntry(f"read.updated with seq {seq!r}")
    if seq > INT64_MAX:  # it would fail the update of its conversation, with every event in it
        raise MalformedEntry(f"read.updated with seq {seq} that does not fit in 64 bits")
    return {"user_id": str(_oid(event.data.get("user_id"), "user_id")), "seq": seq}


# The most seqs one reader's cursor move mirrors into read_status (2 buckets of BUCKET_SEQS, so at most 2
# bucket reads and 100 one-message statements, ~50 ms on FerretDB v1): a reader catching up on more leaves the
# older messages' stored read_status at "sent"; history derives read_status from the read cursors anyway
# (api.selectors), so what users see is unaffected.
READ_MIRROR_MAX = 2 * BUCKET_SEQS


def _read_status_updates(reads: list[_Item], seen: _Seen) -> list[tuple[dict[str, Any], list[_Item]]]:
    """1:1 chats mirror the cursor into read_status of the other member's messages, by their ``_id``: the
    messages between the reader's stored cursor and the new one (at most ``READ_MIRROR_MAX``), found in the
    conversation's ``message_buckets`` read by ``_id`` (an update by conversation scans the collection on
    FerretDB v1). A redelivered or older cursor is at or below the stored one: nothing to write."""
    by_reader: dict[tuple[ObjectId, str], list[_Item]] = {}
    for item in reads:
        assert item.conversation is not None
        conv = seen.conversation(item.conversation)
        if conv is not None and conv.get("type") == "single":
            by_reader.setdefault((item.conversation, item.doc["user_id"]), []).append(item)
    out: list[tuple[dict[str, Any], list[_Item]]] = []
    for (cid, user), group in by_reader.items():
        conv = seen.conversation(cid)
        assert conv is not None
        stored = (conv.get("read_cursors") or {}).get(user)
        top = max(i.doc["seq"] for i in group)
        low = max(stored if isinstance(stored, int) else 0, top - READ_MIRROR_MAX)
        bids = sorted({bucket_id(str(cid), seq) for seq in range(low + 1, top + 1)})
        for bid in bids:
            bucket = seen.bucket(bid)
            for key, m in sorted(((bucket or {}).get("m") or {}).items()):
                if (isinstance(m, dict) and low < int(key) <= top and str(m.get("sender_id")) != user
                        and m.get("id")):
                    out.append(({"q": {"_id": m["id"]}, "u": {"$set": {"read_status": "read"}}}, group))
    return out


def _read_conversation_max(i: _Item) -> dict[str, Any]:
    return {f"read_cursors.{i.doc['user_id']}": i.doc["seq"]}


# reaction.added and reaction.removed (docs/adr/0037). The event carries the emoji's whole list of users after
# the change, so applying it sets that list (no counting): one $set by _id of the message's ``reactions``,
# guarded by ``rx_seq`` (an older or redelivered reaction event writes nothing), decided on the document read
# by _id (``_Seen``).


def _reaction_parse(event: Event) -> dict[str, Any]:
    if event.seq < 1:
        raise MalformedEntry(f"{event.type} with seq {event.seq}")
    ids = event.data.get("user_ids")
    if not isinstance(ids, list) or not all(isinstance(u, str) for u in ids):
        raise MalformedEntry(f"{event.type} with user_ids {str(ids)[:100]!r}")
    return {"id": _text(event.data, "id"), "emoji": _text(event.data, "emoji"),
            "user_ids": [str(_oid(u, "user_ids")) for u in ids]}


def reactions_with(reactions: Any, *, emoji: str, user_ids: list[str]) -> list[dict[str, Any]]:
    """``reactions`` ([{emoji, user_ids}]) with ``emoji``'s users set to ``user_ids`` (an empty list removes
    the emoji; a new one goes last). Pure."""
    out = [dict(r) for r in reactions or [] if isinstance(r, dict) and r.get("emoji") != emoji]
    at = next((n for n, r in enumerate(reactions or []) if isinstance(r, dict) and r.get("emoji") == emoji), None)
    if user_ids:
        entry = {"emoji": emoji, "user_ids": list(user_ids)}
        out.insert(at if at is not None else len(out), entry)
    return out


def _older_reaction(doc: dict[str, Any], seq: int) -> bool:
    current = doc.get("rx_seq")
    return current is None or (isinstance(current, int) and current < seq)


def _reaction_update(i: _Item, seen: _Seen) -> dict[str, Any] | None:
    seq = _ev(i).seq
    message = seen.message(i.doc["id"])
    if message is None or message.get("deleted") is True or not _older_reaction(message, seq):
        return None
    reactions = reactions_with(message.get("reactions"), emoji=i.doc["emoji"], user_ids=i.doc["user_ids"])
    message.update(reactions=reactions, rx_seq=seq)
    return {"q": {"_id": i.doc["id"]}, "u": {"$set": {"reactions": reactions, "rx_seq": seq}}}


def _reaction_bucket_update(i: _Item, entry: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The ``message_buckets`` statement of a reaction event on its message's ``entry`` (at ``path``), or None
    when a newer reaction event is there already or the message is deleted."""
    seq = _ev(i).seq
    if entry.get("deleted") is True or not _older_reaction(entry, seq):
        return None
    reactions = reactions_with(entry.get("reactions"), emoji=i.doc["emoji"], user_ids=i.doc["user_ids"])
    entry.update(reactions=reactions, rx_seq=seq)
    return {f"{path}.reactions": reactions, f"{path}.rx_seq": seq}


EVENT_RULES: dict[str, EventRule] = {
    "message.new": EventRule(parse=_new_parse, document=_new_document, conversation_max=_new_conversation_max,
                             conversation_updates=_new_last_message),
    "message.edited": EventRule(parse=_edited_parse, message_update=_edited_update, needs_message=True,
                                conversation_max=_sequenced_conversation_max,
                                conversation_update=_edited_last_message, versions=_edited_versions),
    "message.deleted": EventRule(parse=_deleted_parse, message_update=_deleted_update, needs_message=True,
                                 conversation_max=_sequenced_conversation_max,
                                 conversation_update=_deleted_last_message, versions=_deleted_versions),
    "read.updated": EventRule(parse=_read_parse, message_updates=_read_status_updates,
                              conversation_max=_read_conversation_max),
    "reaction.added": EventRule(parse=_reaction_parse, message_update=_reaction_update, needs_message=True,
                                conversation_max=_sequenced_conversation_max),
    "reaction.removed": EventRule(parse=_reaction_parse, message_update=_reaction_update, needs_message=True,
                                  conversation_max=_sequenced_conversation_max),
}


def message_event_write(*, event: Event) -> bool:
    """Write one edit or delete's statement on its ``messages`` document now, with the drain's own rule
    (``EVENT_RULES``), ahead of the drain: a staff delete shows in the admin at once. The drain applies the
    entry again later with the same statement, which then changes nothing (docs/adr/0003). Returns whether
    the statement was written (False: the drain will apply it; the reason is logged).
    Preconditions: MongoDB is connected; ``event`` was appended. Raises MalformedEntry, ValueError (a type
    without a statement of its own on ``messages``), the transient pymongo errors (MongoDB is away)."""
    item = _Item(entry_id=event.entry_id, fields=None)
    item.conversation, item.doc = _event_parse(event)
    item.event = event
    update = _rule(item).message_update
    if update is None:
        raise ValueError(f"{event.type} has no statement of its own on messages")
    op = update(item, _Seen(get_db()))
    if op is None:
        logger.warning("storage.write_now %s of message %s not written (the drain applies it): nothing to write "
                       "(no such message yet, or a newer change)", event.type, item.doc["id"])
        return False
    for _owners, reason, _deterministic in _update("messages", [op], [[item]]):
        logger.warning("storage.write_now %s of message %s not written (the drain applies it): %s", event.type,
                       item.doc["id"], reason)
        return False
    return True


def _update(collection: str, ops: list[dict[str, Any]], owners: list[Any]) -> list[tuple[Any, str, bool]]:
    """Run ``ops`` as ordered ``update`` commands (one in the normal case). A statement that fails is
    skipped and the rest re-sent. Returns ``(owner, reason, deterministic)`` of each failed statement.
    Raises the transient pymongo errors (the server is away)."""
    db = get_db()
    failed: list[tuple[Any, str, bool]] = []
    retried: set[int] = set()
    start = 0
    while start < len(ops):
        chunk = ops[start:start + UPDATE_STATEMENTS_MAX]
        errors = _write_isolating_failures(db, "update", collection, chunk, ordered=True)
        if not errors:
            start += len(chunk)
            continue
        err = errors[0]
        at = start + int(err["index"])
        code = int(err.get("code", 0))
        if code == DUPLICATE_KEY and ops[at].get("upsert") and at not in retried:
            # Two drains upserted the same new document at once (a reclaim raced a slow worker) and the
            # loser's insert collided: once more, it now matches the winner's document and does nothing.
            retried.add(at)
            start = at
            continue
        what = f"{collection} update refused" if code == REFUSED else f"{collection} write error {code}"
        failed.append((owners[at], f"{what}: {err.get('errmsg', '')}"[:1000],
                       code == DUPLICATE_KEY or bool(err.get("deterministic"))))
        start = at + 1
    return failed


def _pause_before_ack(partition: int, count: int) -> None:
    if settings.TEST_PAUSE_BEFORE_ACK_S > 0 and count:
        logger.warning("storage.drain paused before ack partition=%d entries=%d seconds=%.1f (test hook)",
                       partition, count, settings.TEST_PAUSE_BEFORE_ACK_S)
        time.sleep(settings.TEST_PAUSE_BEFORE_ACK_S)


def partition_drain(
    *, partition: int, batch_size: int, consumer: str, client: BusSync | None = None
) -> DrainResult:
    """Persist one batch (at most ``batch_size`` entries) of ``partition``'s stream, then acknowledge it.

    Preconditions: MongoDB is connected (``storage.mongo.mongo_connect``). Side effects: takes the
    partition's drain lease (returns ``busy`` at once if another drain holds it); reads as ``consumer`` of
    group ``storage`` (creating it if missing; taking over entries idle on dead consumers); one ``insert``
    of new messages, one ``update`` of edits/deletes/read marks, one ``insert`` of message versions (edit
    history), one ``update`` of conversations; XADD of
    dead letters; XACK of what is persisted or dead-lettered; failure counters; stats; one log line.
    Raises :class:`Retryable` when MongoDB or Redis is away: nothing was acknowledged, and the batch is
    handed back to be taken by the next drain. A write that fails for any other reason is narrowed down to the
    entries that fail alone, which are dead-lettered (at once if they do not encode) or left pending for
    another attempt; the others are written and acknowledged. Any other error leaves the batch pending: it is
    reclaimed after ``DRAIN_RECLAIM_IDLE_S`` and dead-lettered after ``DRAIN_MAX_DELIVERIES`` such failures.
    """
    started = time.monotonic()
    r = client or bus_sync()
    result = DrainResult(partition=partition)
    token = secrets.token_hex(8)
    try:
        # One drain per partition at a time. Correctness does not need it on MongoDB (every write is keyed
        # and guarded), but FerretDB v1 applies an update as read-modify-write without isolation, so two
        # concurrent drains could lose each other's $max or edit (seen in the fault test). The lease lasts
        # DRAIN_RECLAIM_IDLE_S: a drain that held it that long is presumed dead, like its pending entries.
        if not r.set(drain_lease_key(partition), token, nx=True, px=int(settings.DRAIN_RECLAIM_IDLE_S * 1000)):
            result.busy = True
            return result
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    try:
        return _drain_leased(r, partition=partition, batch_size=batch_size, consumer=consumer, result=result,
                             started=started, token=token)
    finally:
        with contextlib.suppress(redis.RedisError):  # if Redis is away, the lease expires by itself
            r.register_script(_LEASE_RELEASE_LUA)(keys=[drain_lease_key(partition)], args=[token])


def _drain_leased(r: BusSync, *, partition: int, batch_size: int, consumer: str, result: DrainResult,
                  started: float, token: str) -> DrainResult:
    try:
        group_ensure(partition=partition, client=r)
        items, result.reclaimed = _read_batch(r, partition=partition, consumer=consumer, batch_size=batch_size)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    result.read = len(items)
    if not items:
        result.duration_s = time.monotonic() - started
        return result
    for item in items:
        _parse(item)
    live = [i for i in items if i.event is not None]
    lease_ms = int(settings.DRAIN_RECLAIM_IDLE_S * 1000)
    if not r.register_script(_LEASE_RENEW_LUA)(keys=[drain_lease_key(partition)], args=[token, lease_ms]):
        # We stalled past the lease and another drain owns the partition now: write nothing (our entries stay
        # pending and are reclaimed by it), so two drains never write one document at once.
        result.busy = True
        return result
    try:
        db = get_db()
        seen = _Seen(db)  # read by _id after the inserts below, under the lease
        _insert_new(db, live)
        buckets_write(db, live, seen=seen)
        ops, owners = _message_ops(live, seen)
        for group, reason, deterministic in _update("messages", ops, owners):
            for owner in group:
                owner.dead, owner.failure = (reason, None) if deterministic else (None, reason)
        # An edit or delete whose message is not in MongoDB yet (a concurrent drain holds the create) is
        # left pending and retried: it would otherwise be lost.
        targets = {i.doc["id"] for i in live if _rule(i).needs_message and i.failure is None and i.dead is None}
        if targets:
            found = {mid for mid in targets if seen.message(mid) is not None}
            for i in live:
                if (_rule(i).needs_message and i.doc["id"] not in found
                        and i.failure is None and i.dead is None):
                    i.failure = f"message {i.doc['id']} is not persisted yet"
        _insert_versions(db, live)
        ok = [i for i in live if i.failure is None and i.dead is None]
        cops, cowners = _conversation_ops(ok, seen)
        for group, reason, _det in _update("conversations", cops, cowners):
            for owner in group:
                owner.failure = reason
    except TRANSIENT_MONGO as exc:
        _hand_back(r, partition=partition, consumer=consumer, ids=[i.entry_id for i in items])
        r.hincrby(stats_key(partition), "outages", 1)
        raise Retryable(f"mongodb unavailable: {str(exc).split(',')[0]}") from exc

    _pause_before_ack(partition, len(items))
    try:
        _settle(r, partition=partition, items=items, result=result)
        recent_persisted_advance(r, partition=partition, items=items)
        state = partitions_state(partitions=[partition], client=r)[0]
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    result.more = state.undelivered > 0 or result.read >= batch_size
    result.duration_s = time.monotonic() - started
    logger.info("storage.drain %s", json.dumps({
        "partition": partition, "consumer": consumer, "read": result.read, "reclaimed": result.reclaimed,
        "persisted": result.persisted, "dead_lettered": result.dead_lettered, "deferred": result.deferred,
        "backlog": state.backlog, "lag_s": round(state.lag_s(), 3), "more": result.more,
        "ms": round(result.duration_s * 1000, 1)}))
    return result


# ------------------------------------------------------------------ message buckets (docs/adr/0028)


def _bucket_message(item: _Item) -> dict[str, Any]:
    assert item.event is not None
    return {"id": item.doc["id"], "seq": item.event.seq, "sender_id": item.doc["sender_id"],
            "content": item.doc["content"], "timestamp": item.doc["timestamp"],
            "client_msg_id": item.doc["client_msg_id"], "deleted": False,
            **({"mentions": item.doc["mentions"]} if item.doc["mentions"] else {}),
            **({"reply_to": item.doc["reply_to"]} if item.doc.get("reply_to") is not None else {})}


def messages_existing(db: Any, *, ids: list[str]) -> set[str]:
    """Which of ``ids`` are in ``messages``: one ``find_one`` by ``_id`` each, because FerretDB v1 pushes only
    ``_id`` *equality* down (``$in`` on ``_id`` scans the collection: 489 ms at 10k messages, 7 s at 100k,
    while an equality lookup stays under 1 ms; docs/adr/0028). Read-only."""
    return {i for i in ids if db.messages.find_one({"_id": i}, {"_id": 1}) is not None}


def buckets_write(db: Any, items: list[_Item], *, seen: _Seen | None = None) -> None:
    """Mirror the batch into ``message_buckets`` with inserts and ``_id``-keyed updates only: one unordered
    ``insert`` of the shells of every bucket a sequenced event falls in (a duplicate ``_id``: it exists), one
    unordered ``update`` per bucket ``$set``-ing its new messages under their seq (idempotent), then one
    update by ``_id`` per edit/delete (its message's seq found by ``_id``; its guard decided on the bucket read by
    ``_id``, ``seen``, as FerretDB v1 scans for a filter that does not match). Entries that failed or are dead
    are skipped. Raises the transient pymongo errors; any other write error fails the batch (it is retried),
    since the buckets must not miss a message the entry's ack would declare persisted."""
    live = [i for i in items if i.event is not None and i.event.seq > 0 and i.failure is None and i.dead is None]
    if not live:
        return
    shells: dict[str, dict[str, Any]] = {}
    news: dict[str, dict[str, Any]] = {}
    for i in live:
        assert i.event is not None
        n = (i.event.seq - 1) // BUCKET_SEQS
        bid = bucket_id(i.event.conversation_id, i.event.seq)
        # A bucket created by a later event than its range's first one may lack messages persisted before the
        # buckets existed (or a deferred first entry): readers skip a partial bucket until the first seq's
        # event (or manage.py buckets_build) completes it.
        first = i.event.seq == n * BUCKET_SEQS + 1
        shells.setdefault(bid, {"_id": bid, "conversation_id": i.conversation, "n": n, "m": {},
                                "partial": not first})
        if first:
            news.setdefault(bid, {})["partial"] = False
        if i.event.type == "message.new":
            news.setdefault(bid, {})[f"m.{i.event.seq}"] = _bucket_message(i)
    reply = db.command("insert", "message_buckets", documents=list(shells.values()), ordered=False)
    _buckets_raise([e for e in reply.get("writeErrors") or [] if int(e.get("code", 0)) != DUPLICATE_KEY])
    statements = [{"q": {"_id": bid}, "u": {"$set": fields}} for bid, fields in news.items()]
    for at in range(0, len(statements), UPDATE_STATEMENTS_MAX):
        reply = db.command("update", "message_buckets", ordered=False,
                           updates=statements[at:at + UPDATE_STATEMENTS_MAX])
        _buckets_raise(reply.get("writeErrors") or [])
    changes = [i for i in live if i.event is not None and i.event.type in (
        "message.edited", "message.deleted", "reaction.added", "reaction.removed")]
    seen = seen or _Seen(db)
    ops = []
    for i in changes:
        assert i.event is not None
        found = seen.message(i.doc["id"])  # by _id: no scan, even on FerretDB
        if found is None:
            continue  # not persisted yet: the drain defers this entry and comes back
        seq = int(found["seq"])
        path = f"m.{seq}"
        bid = bucket_id(i.event.conversation_id, seq)
        bucket = seen.bucket(bid)
        entry = ((bucket or {}).get("m") or {}).get(str(seq))
        if not isinstance(entry, dict) or entry.get("id") != i.doc["id"]:
            continue  # not in its bucket (a partial one)
        q = {"_id": bid}
        if i.event.type in ("reaction.added", "reaction.removed"):
            if (fields := _reaction_bucket_update(i, entry, path)) is not None:
                ops.append({"q": q, "u": {"$set": fields}})
            continue
        if not _older_edit(entry, i.event.seq):
            continue  # a newer change is there already
        if i.event.type == "message.edited":
            if entry.get("deleted") is True:
                continue
            entry.update(edit_seq=i.event.seq)
            ops.append({"q": q, "u": {"$set": {
                f"{path}.content": i.doc["content"], f"{path}.edited_at": i.doc["edited_at"],
                f"{path}.edit_seq": i.event.seq}}})
        else:
            entry.update(deleted=True, edit_seq=i.event.seq)
            ops.append({"q": q, "u": {"$set": {f"{path}.deleted": True, f"{path}.content": "",
                                               f"{path}.deleted_at": i.doc["deleted_at"],
                                               f"{path}.edit_seq": i.event.seq}}})
    # An edit whose content no store can hold fails its own messages update next, where it is isolated and
    # dead-lettered (docs/adr/0025); here it must not fail the bucket writes of the whole batch first.
    ops = [op for op in ops if _encodable(op)]
    for at in range(0, len(ops), UPDATE_STATEMENTS_MAX):
        reply = db.command("update", "message_buckets", updates=ops[at:at + UPDATE_STATEMENTS_MAX], ordered=True)
        _buckets_raise(reply.get("writeErrors") or [])


def _encodable(statement: dict[str, Any]) -> bool:
    """Whether pymongo can encode ``statement`` (a lone surrogate, a NUL in a key or an integer past 64 bits
    cannot be sent at all)."""
    try:
        bson.encode(statement)
    except (bson.errors.InvalidDocument, UnicodeEncodeError, OverflowError, ValueError):
        return False
    return True


def _buckets_raise(errors: list[dict[str, Any]]) -> None:
    if errors:
        raise RuntimeError(f"message_buckets write error {errors[0].get('code')}: {errors[0].get('errmsg', '')}"[:500])


def buckets_build(*, batch: int = 1000) -> int:
    """Build ``message_buckets`` from ``messages`` (existing data, once: ``manage.py buckets_build``); safe to
    run again and beside the drain (every write is an idempotent ``$set`` of a message's final state, guarded
    by ``edit_seq``). Returns how many messages it wrote. One scan of ``messages``."""
    db = get_db()
    written = 0
    pending: dict[str, dict[str, Any]] = {}
    shells: dict[str, dict[str, Any]] = {}

    def flush() -> None:
        if shells:
            db.command("insert", "message_buckets", documents=list(shells.values()), ordered=False)
        statements = [{"q": {"_id": bid}, "u": {"$set": f}} for bid, f in pending.items()]
        for at in range(0, len(statements), UPDATE_STATEMENTS_MAX):
            db.command("update", "message_buckets", ordered=False, updates=statements[at:at + UPDATE_STATEMENTS_MAX])
        shells.clear()
        pending.clear()

    for row in db.messages.find({}, batch_size=batch):
        cid, seq = str(row["conversation_id"]), int(row["seq"])
        bid = bucket_id(cid, seq)
        shells.setdefault(bid, {"_id": bid, "conversation_id": row["conversation_id"], "n": (seq - 1) // BUCKET_SEQS,
                                "m": {}, "partial": False})
        pending.setdefault(bid, {"partial": False})[f"m.{seq}"] = {
            "id": row["_id"], "seq": seq, "sender_id": row["sender_id"], "content": row.get("content", ""),
            "timestamp": row.get("timestamp"), "client_msg_id": row.get("client_msg_id"),
            "deleted": bool(row.get("deleted")), "edited_at": row.get("edited_at"),
            "deleted_at": row.get("deleted_at"), "edit_seq": row.get("edit_seq"), "reply_to": row.get("reply_to"),
            "reactions": row.get("reactions") or [], "rx_seq": row.get("rx_seq")}
        written += 1
        if len(pending) >= batch:
            flush()
    flush()
    return written


# Raise a conversation's persisted watermark, never lower it (drains of one partition run one at a time, but a
# reclaimed old batch may settle after a newer one).
_WATERMARK_LUA = """
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


def recent_persisted_watermarks(items: list[_Item]) -> dict[str, int]:
    """Per conversation of the batch, the seq up to which its events are settled (persisted, or dead-lettered
    and so never in the store): the highest settled seq, or just below the first deferred one."""
    done: dict[str, int] = {}
    deferred: dict[str, int] = {}
    for i in items:
        if i.event is None or i.event.seq <= 0:
            continue
        cid, seq = i.event.conversation_id, i.event.seq
        if i.failure is not None and i.dead is None:
            deferred[cid] = min(deferred.get(cid, seq), seq)
        else:
            done[cid] = max(done.get(cid, 0), seq)
    return {cid: min(top, deferred[cid] - 1) if cid in deferred else top for cid, top in done.items()}


def recent_persisted_advance(r: BusSync, *, partition: int, items: list[_Item]) -> None:
    """After a batch is settled: move each of its conversations' persisted watermark
    (``core.keys.persisted_key``) up, so the append script may drop those messages from the
    conversation's recent window (docs/adr/0028). Side effect: one script call on the partition's slot."""
    marks = recent_persisted_watermarks(items)
    if marks:
        args = [x for cid, seq in marks.items() for x in (cid, seq)]
        r.register_script(_WATERMARK_LUA)(keys=[persisted_key(partition)], args=args)


def _hand_back(r: BusSync, *, partition: int, consumer: str, ids: list[str]) -> None:
    """After an outage: keep the entries pending but make them look idle past the reclaim threshold, with
    their delivery count reset, so the next drain on any worker takes them at once and no entry is blamed."""
    try:
        r.xclaim(stream_key(partition), GROUP, consumer, 0, list[Any](ids),
                 idle=int(settings.DRAIN_RECLAIM_IDLE_S * 1000) + 1, retrycount=0, justid=True)
    except redis.RedisError:
        logger.exception("storage.drain could not hand back %d entries of partition %d", len(ids), partition)


def _settle(r: BusSync, *, partition: int, items: list[_Item], result: DrainResult) -> None:
    """Dead-letter, acknowledge and count. Dead letters are added before the XACK, so a crash in between
    duplicates a dead letter at worst, never loses an entry."""
    key, fkey = stream_key(partition), failures_key(partition)
    failing = [i for i in items if i.failure is not None and i.dead is None]
    if failing:
        pipe = r.pipeline(transaction=False)
        for i in failing:
            pipe.hincrby(fkey, i.entry_id, 1)
            pipe.hset(fkey, f"{i.entry_id}:why", storable(i.failure or ""))
        counts = pipe.execute()[::2]
        for i, n in zip(failing, counts, strict=True):
            if int(n) >= settings.DRAIN_MAX_ATTEMPTS:
                i.dead = f"failed {n} times; last: {i.failure}"
    dead = [i for i in items if i.dead is not None]
    done = [i for i in items if i.dead is not None or i.failure is None]
    now_ms = int(time.time() * 1000)
    pipe = r.pipeline(transaction=False)
    for i in dead:
        deadletter_add(pipe, partition=partition, entry_id=i.entry_id, fields=i.fields or {}, reason=i.dead or "",
                        now_ms=now_ms)
        logger.warning("storage.deadletter partition=%d entry=%s reason=%s", partition, i.entry_id, i.dead)
    if done:
        pipe.xack(key, GROUP, *[i.entry_id for i in done])
        pipe.hdel(fkey, *[i.entry_id for i in done], *[f"{i.entry_id}:why" for i in done])
    result.dead_lettered = len(dead)
    result.persisted = len(done) - len(dead)
    result.deferred = len(items) - len(done)
    pipe.hincrby(stats_key(partition), "persisted", result.persisted)
    pipe.hincrby(stats_key(partition), "batches", 1)
    if dead:
        pipe.hincrby(stats_key(partition), "dead", len(dead))
    pipe.hset(stats_key(partition), "last_batch_ms", now_ms)
    bucket = rate_key(int(now_ms / 1000 // RATE_BUCKET_S))
    pipe.hincrby(bucket, str(partition), result.persisted)
    pipe.expire(bucket, RATE_WINDOW_S + 2 * RATE_BUCKET_S)
    pipe.execute()


def drain_all(*, batch_size: int, consumer: str, max_batches: int = 100_000,
              partitions: Iterable[int] | None = None) -> int:
    """Drain every partition until nothing is left (for commands and benchmarks, not for tasks); bounded
    by ``max_batches``. Returns how many events were persisted."""
    total = 0
    for p in partitions if partitions is not None else range(int(settings.PARTITIONS)):
        for _ in range(max_batches):
            res = partition_drain(partition=p, batch_size=batch_size, consumer=consumer)
            total += res.persisted
            if res.busy:  # a worker is on it right now: wait for its lease rather than skip the partition
                time.sleep(0.2)
                continue
            if not res.more:
                break
    return total
