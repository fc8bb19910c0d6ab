"""How the drain writes a batch into MongoDB: one command per kind per batch, failures isolated.

Every write to MongoDB is one command per kind per batch: an unordered ``insert`` of the new messages, an
ordered ``update`` of edits/deletes/read marks/reactions, an unordered ``insert`` of message versions, an
ordered ``update`` of conversations (raw commands rather than pymongo's ``bulk_write``: FerretDB v1 omits
``nModified`` from a reply with write errors and pymongo then raises ``KeyError`` instead of
``BulkWriteError``; the raw reply's ``writeErrors`` work on both servers). A command that fails as a whole is
bisected until the entries that fail alone are found (:func:`write_isolating_failures`, docs/adr/0025): one
bad entry never takes its batch with it. The statements come from the rules (``storage/rules.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import bson.errors
import pymongo.errors
from bson import ObjectId
from mongoengine.connection import get_db

from core.entries import Event
from storage.rules import EVENT_RULES, Item, Seen, event_parse, rule_of

logger = logging.getLogger("chatstream.storage")


# MongoDB errors that say "the server is away", not "this entry is wrong": nothing is acked, the entries are
# handed back for the next drain, and no entry is blamed.
TRANSIENT_MONGO = (pymongo.errors.ConnectionFailure, pymongo.errors.ExecutionTimeout,
                   pymongo.errors.WriteConcernError)
DUPLICATE_KEY = 11000
# Statements per ``update`` command. FerretDB v1 (SQLite) holds one pooled connection per statement until the
# command ends, and its pool has 100 for all clients together: an update of 101 statements waits for a
# connection forever, and so does every later command (bench/ferretdb_update_limit.py; a drain batch touching
# over 100 conversations hung `make run`'s store, and so did two workers sending 50 each at once). 16 keeps
# `make run`'s two workers (and a third for a `manage.py drain`) far below it, beside the other roles' reads.
UPDATE_STATEMENTS_MAX = 16


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


def write_isolating_failures(db: Any, command: str, collection: str, statements: list[dict[str, Any]], *,
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


def _new_documents(items: list[Item]) -> list[dict[str, Any]]:
    """The ``messages`` documents of the batch's events that create one (``message.new``), in stream order."""
    return [document(i) for i in items if i.event is not None and (document := rule_of(i).document) is not None]


def insert_new(db: Any, items: list[Item]) -> None:
    """Insert the batch's new messages with one unordered ``insert``. Why not upserts: on FerretDB v1 an
    upsert by ``_id`` costs ~15 ms and grows with the collection, an insert ~0.03 ms (docs/benchmarks.md).
    A duplicate ``_id`` means the message is already persisted (a redelivery): that entry is done. A duplicate
    with no such ``_id`` is another message on the same (conversation, seq): dead-lettered. A document that
    does not encode is dead-lettered at once; other write errors count as failures of their entry."""
    news = [i for i in items if i.event is not None and rule_of(i).document is not None]
    if not news:
        return
    dup: dict[str, Item] = {}
    for err in write_isolating_failures(db, "insert", "messages", _new_documents(news), ordered=False):
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


def insert_versions(db: Any, items: list[Item]) -> None:
    """Insert the batch's ``message_versions`` documents (``EventRule.versions``) with one unordered ``insert``:
    insert-only, keyed by "<message id>:<seq>", so a duplicate ``_id`` is a redelivery (done). A document
    that does not encode dead-letters its entry; another error leaves it pending (its other writes wait too)."""
    docs: list[dict[str, Any]] = []
    owners: list[Item] = []
    for item in items:
        make = rule_of(item).versions if item.event is not None and item.dead is None else None
        if make is not None and item.failure is None:
            for doc in make(item):
                docs.append(doc)
                owners.append(item)
    for err in write_isolating_failures(db, "insert", "message_versions", docs, ordered=False):
        item = owners[int(err["index"])]
        if int(err.get("code", 0)) == DUPLICATE_KEY:
            continue
        if err.get("deterministic"):
            item.dead = f"message_versions insert refused: {err['errmsg']}"[:1000]
        else:
            item.failure = f"message_versions insert error {err.get('code')}: {err.get('errmsg', '')}"[:1000]


def message_ops(items: list[Item], seen: Seen) -> tuple[list[dict[str, Any]], list[list[Item]]]:
    """The update statements of the batch on ``messages`` (edits, deletes, 1:1 read marks), each with the
    items it carries: first each item's own statement in stream order, then the statements a rule makes for
    all of its type's items at once."""
    ops: list[dict[str, Any]] = []
    owners: list[list[Item]] = []
    pending = [i for i in items if i.event is not None and i.failure is None and i.dead is None]
    for item in pending:
        update = rule_of(item).message_update
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


def conversation_ops(items: list[Item], seen: Seen) -> tuple[list[dict[str, Any]], list[list[Item]]]:
    """Per conversation: one ``$max`` of what each item's rule contributes (last_seq, updated_at, read
    cursors); then what a rule makes of all its type's items (lastMessage moved only forward); then each
    item's own statement in stream order (an edit or delete of the current lastMessage mirrored into it, only
    if newer than what it shows)."""
    by_conv: dict[ObjectId, list[Item]] = {}
    for item in items:
        if item.event is not None and item.conversation is not None:
            by_conv.setdefault(item.conversation, []).append(item)
    ops: list[dict[str, Any]] = []
    owners: list[list[Item]] = []
    for cid, group in by_conv.items():
        if seen.conversation(cid) is None:
            continue  # no such document: every statement would match nothing (and scan on FerretDB v1)
        maxes: dict[str, Any] = {}
        for item in group:
            for path, value in rule_of(item).conversation_max(item).items():
                maxes[path] = max(maxes.get(path, value), value)
        first = len(ops)
        if maxes:
            ops.append({"q": {"_id": cid}, "u": {"$max": maxes}})
            owners.append(group)
            _max_into(seen.conversation(cid), maxes)
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
            update = rule_of(item).conversation_update
            if update is not None and (own := update(cid, item, seen)) is not None:
                ops.append(own)
                owners.append([item])
    return ops, owners


def _max_into(doc: dict[str, Any] | None, maxes: dict[str, Any]) -> None:
    """Apply a ``$max`` to the document as ``Seen`` holds it (the read cursors the read mirror starts from, kept
    by the drain in Redis: docs/adr/0048). A path through something that is not a document, or a value of
    another type than the stored one, is left for the store to decide (and the document's state is not kept
    wrong: such a conversation's cursor only bounds how far back the read mirror looks)."""
    if doc is None:
        return
    for path, value in maxes.items():
        *parents, leaf = path.split(".")
        node: Any = doc
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        current = node.get(leaf)
        if current is None or (type(current) is type(value) and current < value):
            node[leaf] = value


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


def updates_write(db: Any, collection: str, ops: list[dict[str, Any]],
                  owners: list[Any]) -> list[tuple[Any, str, bool]]:
    """Run ``ops`` as ordered ``update`` commands (one in the normal case). A statement that fails is
    skipped and the rest re-sent. Returns ``(owner, reason, deterministic)`` of each failed statement.
    Raises the transient pymongo errors (the server is away)."""
    failed: list[tuple[Any, str, bool]] = []
    retried: set[int] = set()
    start = 0
    while start < len(ops):
        chunk = ops[start:start + UPDATE_STATEMENTS_MAX]
        errors = write_isolating_failures(db, "update", collection, chunk, ordered=True)
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


def messages_existing(db: Any, *, ids: list[str]) -> set[str]:
    """Which of ``ids`` are in ``messages``: one ``find_one`` by ``_id`` each, because FerretDB v1 pushes only
    ``_id`` *equality* down (``$in`` on ``_id`` scans the collection: 489 ms at 10k messages, 7 s at 100k,
    while an equality lookup stays under 1 ms; docs/adr/0028). Read-only."""
    return {i for i in ids if db.messages.find_one({"_id": i}, {"_id": 1}) is not None}


def message_event_write(*, event: Event) -> bool:
    """Write one edit or delete's statement on its ``messages`` document now, with the drain's own rule
    (``EVENT_RULES``), ahead of the drain: a staff delete shows in the admin at once. The drain applies the
    entry again later with the same statement, which then changes nothing (docs/adr/0003). Returns whether
    the statement was written (False: the drain will apply it; the reason is logged).
    Preconditions: MongoDB is connected; ``event`` was appended. Raises MalformedEntry, ValueError (a type
    without a statement of its own on ``messages``), the transient pymongo errors (MongoDB is away)."""
    item = Item(entry_id=event.entry_id, fields=None)
    item.conversation, item.doc = event_parse(event)
    item.event = event
    update = rule_of(item).message_update
    if update is None:
        raise ValueError(f"{event.type} has no statement of its own on messages")
    op = update(item, Seen(get_db()))
    if op is None:
        logger.warning("storage.write_now %s of message %s not written (the drain applies it): nothing to write "
                       "(no such message yet, or a newer change)", event.type, item.doc["id"])
        return False
    for _owners, reason, _deterministic in updates_write(get_db(), "messages", [op], [[item]]):
        logger.warning("storage.write_now %s of message %s not written (the drain applies it): %s", event.type,
                       item.doc["id"], reason)
        return False
    return True
