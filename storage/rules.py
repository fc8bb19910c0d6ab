"""The drain's table of event rules (docs/adr/0029): one rule per event type, saying how its payload is
parsed and which write statements it turns into; the batch item it belongs to and the documents it guards on.

``storage/writes.py`` sends the statements of a whole batch as one command per kind, ``storage/services.py``
drives a batch (read, parse, write, settle). Adding an event type is one rule here; a type without one is
dead-lettered (``unknown event type``). Just over 400 lines: the table and the functions it names, one block
per event type, read together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from core.documents import BUCKET_SEQS, bucket_id
from core.entries import Event, MalformedEntry

INT64_MAX = 2**63 - 1  # the largest integer BSON holds


@dataclass
class Item:
    entry_id: str
    fields: dict[Any, Any] | None
    deliveries: int = 1
    event: Event | None = None
    failure: str | None = None  # set: left pending and counted (retried up to DRAIN_MAX_ATTEMPTS)
    dead: str | None = None  # set: dead-lettered now
    conversation: ObjectId | None = None
    doc: dict[str, Any] = field(default_factory=dict)  # the parsed payload


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


def event_parse(event: Event) -> tuple[ObjectId, dict[str, Any]]:
    """The conversation and the parsed payload of a decoded event, by its type's rule (``EVENT_RULES``).
    Raises MalformedEntry (an unknown type among others)."""
    if event.seq > INT64_MAX:
        raise MalformedEntry(f"seq {event.seq} does not fit in 64 bits")
    conversation = _oid(event.conversation_id, "conversation id")
    rule = EVENT_RULES.get(event.type)
    if rule is None:
        raise MalformedEntry(f"unknown event type {event.type!r}")
    return conversation, rule.parse(event)


def rule_of(item: Item) -> EventRule:
    """The rule of a parsed item (precondition: ``item.event`` is set, so its type has a rule)."""
    assert item.event is not None
    return EVENT_RULES[item.event.type]


# ------------------------------------------------------------------ the event table
# One rule per event type: how its payload is parsed and which write statements it turns into. The drain
# above sends the statements of a whole batch as one command per kind; adding an event type is one rule.


@dataclass(frozen=True, slots=True)
class EventRule:
    """How the drain applies one event type. Every function is pure but for ``Seen``: it reads the documents
    it guards on by ``_id`` and records there what its statements change.

    ``parse``: the payload checked and converted (raises MalformedEntry). ``document``: the ``messages``
    document it inserts. ``message_update``: its own update of ``messages`` (None: its guard says there is
    nothing to write). ``message_updates``: statements for all the batch's items of the type at once, with the
    items each carries. Every statement filters on ``_id`` equality alone; its guard is decided from the
    documents read by ``_id`` (``Seen``). ``needs_message``: left pending while its message is not in MongoDB.
    ``conversation_max``: the fields it raises with
    ``$max`` on its conversation. ``conversation_updates``: statements on the conversation for all of the
    type's items in it. ``conversation_update``: its own statement on its conversation (None: nothing)."""

    parse: Callable[[Event], dict[str, Any]]
    conversation_max: Callable[[Item], dict[str, Any]]
    document: Callable[[Item], dict[str, Any]] | None = None
    message_update: Callable[[Item, Seen], dict[str, Any] | None] | None = None
    message_updates: Callable[[list[Item], Seen], list[tuple[dict[str, Any], list[Item]]]] | None = None
    needs_message: bool = False
    conversation_updates: Callable[[ObjectId, list[Item], Seen], list[tuple[dict[str, Any], list[Item]]]] | None \
        = None
    conversation_update: Callable[[ObjectId, Item, Seen], dict[str, Any] | None] | None = None
    # The ``message_versions`` documents it inserts (``_id`` "<message id>:<seq>": a redelivery is a duplicate).
    versions: Callable[[Item], list[dict[str, Any]]] | None = None
    # The text whose words ``search_blocks`` records for the message it creates or changes (storage/search_index.py).
    search_text: Callable[[Item], str] | None = None


@dataclass
class Seen:
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
    # Buckets in progress, held in Redis until complete (docs/adr/0041; ``storage.buckets.Tails``): bucket id
    # -> ``{"m": entries}``, the tail's own entries, so a change applied here is what the tail saves.
    tails: dict[str, dict[str, Any]] = field(default_factory=dict)

    def message(self, mid: str) -> dict[str, Any] | None:
        if mid not in self.messages:
            self.messages[mid] = self.db.messages.find_one(
                {"_id": mid}, {"seq": 1, "deleted": 1, "edit_seq": 1, "reactions": 1, "rx_seq": 1, "timestamp": 1,
                               "mentions": 1})
        return self.messages[mid]

    def conversation(self, cid: ObjectId) -> dict[str, Any] | None:
        if cid not in self.conversations:
            self.conversations[cid] = self.db.conversations.find_one(
                {"_id": cid}, {"type": 1, "lastMessage": 1, "read_cursors": 1})
        return self.conversations[cid]

    def bucket(self, bid: str) -> dict[str, Any] | None:
        if bid in self.tails:
            return self.tails[bid]
        if bid not in self.buckets:
            self.buckets[bid] = self.db.message_buckets.find_one({"_id": bid})
        return self.buckets[bid]


def older_edit(doc: dict[str, Any], seq: int) -> bool:
    """Whether ``doc``'s ``edit_seq`` (missing, None or lower) is older than ``seq``: the guard the statements
    carried as ``$or`` in their filter, decided on the document read by ``_id``."""
    current = doc.get("edit_seq")
    return current is None or (isinstance(current, int) and current < seq)


def _ev(item: Item) -> Event:
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
        raise MalformedEntry("malformed mentions")
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


def _new_document(i: Item) -> dict[str, Any]:
    return {"_id": i.doc["id"], "conversation_id": i.conversation, "seq": _ev(i).seq,
            "sender_id": i.doc["sender_id"], "client_msg_id": i.doc["client_msg_id"], "content": i.doc["content"],
            "timestamp": i.doc["timestamp"], "deleted": False, "read_status": "sent",
            **({"mentions": i.doc["mentions"]} if i.doc["mentions"] else {}),
            **({"reply_to": i.doc["reply_to"]} if i.doc["reply_to"] is not None else {})}


def _new_conversation_max(i: Item) -> dict[str, Any]:
    return {"last_seq": max(_ev(i).seq, 0), "updated_at": i.doc["timestamp"]}


def _new_last_message(cid: ObjectId, news: list[Item], seen: Seen) -> list[tuple[dict[str, Any], list[Item]]]:
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
    # ``mentions`` absent (an edit from before edits re-resolved them): the message keeps its own.
    mentions = None if "mentions" not in event.data else _mentions(event.data["mentions"])
    return {"id": _text(event.data, "id"), "content": _text(event.data, "content"),
            "edited_at": _time(event.data.get("edited_at"), "edited_at"), "original": original,
            "mentions": mentions}


def _version(i: Item, *, seq: int, content: str, at: datetime, deleted: bool = False) -> dict[str, Any]:
    return {"_id": f"{i.doc['id']}:{seq}", "message_id": i.doc["id"], "conversation_id": i.conversation,
            "seq": seq, "content": content, "at": at, "deleted": deleted}


def _edited_versions(i: Item) -> list[dict[str, Any]]:
    """The version this edit made and, on a first edit, the original it carries."""
    made = [_version(i, seq=_ev(i).seq, content=i.doc["content"], at=i.doc["edited_at"])]
    original = i.doc["original"]
    if original is None:
        return made
    return [_version(i, seq=original["seq"], content=original["content"], at=original["at"]), *made]


def _deleted_versions(i: Item) -> list[dict[str, Any]]:
    return [_version(i, seq=_ev(i).seq, content="", at=i.doc["deleted_at"], deleted=True)]


def _deleted_parse(event: Event) -> dict[str, Any]:
    return {"id": _text(event.data, "id"), "deleted_at": _time(event.data.get("deleted_at"), "deleted_at")}


def _edited_update(i: Item, seen: Seen) -> dict[str, Any] | None:
    # Guarded by the event's seq: an older edit arriving late (redelivery, retry), or one of a deleted
    # message, writes nothing.
    seq = _ev(i).seq
    message = seen.message(i.doc["id"])
    if message is None or message.get("deleted") is True or not older_edit(message, seq):
        return None
    message["edit_seq"] = seq
    return {"q": {"_id": i.doc["id"]},
            "u": {"$set": {"content": i.doc["content"], "edited_at": i.doc["edited_at"], "edit_seq": seq,
                           **edited_mentions(i, "")}}}


def edited_mentions(i: Item, prefix: str) -> dict[str, Any]:
    """The ``$set`` of an edit's re-resolved ``mentions`` under ``prefix`` (none for an edit that carries
    none: made before edits re-resolved mentions)."""
    return {} if i.doc.get("mentions") is None else {f"{prefix}mentions": i.doc["mentions"]}


def _deleted_update(i: Item, seen: Seen) -> dict[str, Any] | None:
    message = seen.message(i.doc["id"])
    if message is None:
        return None  # not persisted yet: the entry is deferred
    message.update(deleted=True, edit_seq=_ev(i).seq)
    return {"q": {"_id": i.doc["id"]}, "u": {"$set": {
        "deleted": True, "content": "", "deleted_at": i.doc["deleted_at"], "edit_seq": _ev(i).seq}}}


def _sequenced_conversation_max(i: Item) -> dict[str, Any]:
    return {"last_seq": max(_ev(i).seq, 0)}


def _last_message_mirror(cid: ObjectId, i: Item, change: dict[str, Any], seen: Seen) -> dict[str, Any] | None:
    """The edit or delete mirrored into lastMessage if it shows that message and no newer change of it."""
    seq = _ev(i).seq
    conv = seen.conversation(cid)
    shown = conv.get("lastMessage") if conv is not None else None
    if not isinstance(shown, dict) or shown.get("id") != i.doc["id"] \
            or ("edit_seq" in shown and not (isinstance(shown["edit_seq"], int) and shown["edit_seq"] < seq)):
        return None
    shown.update({k.removeprefix("lastMessage."): v for k, v in change.items()}, edit_seq=seq)
    return {"q": {"_id": cid}, "u": {"$set": {**change, "lastMessage.edit_seq": seq}}}


def _edited_last_message(cid: ObjectId, i: Item, seen: Seen) -> dict[str, Any] | None:
    return _last_message_mirror(cid, i, {"lastMessage.content": i.doc["content"]}, seen)


def _deleted_last_message(cid: ObjectId, i: Item, seen: Seen) -> dict[str, Any] | None:
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


def _read_status_updates(reads: list[Item], seen: Seen) -> list[tuple[dict[str, Any], list[Item]]]:
    """1:1 chats mirror the cursor into read_status of the other member's messages, by their ``_id``: the
    messages between the reader's stored cursor and the new one (at most ``READ_MIRROR_MAX``), found in the
    conversation's ``message_buckets`` read by ``_id`` (an update by conversation scans the collection on
    FerretDB v1). A redelivered or older cursor is at or below the stored one: nothing to write."""
    by_reader: dict[tuple[ObjectId, str], list[Item]] = {}
    for item in reads:
        assert item.conversation is not None
        conv = seen.conversation(item.conversation)
        if conv is not None and conv.get("type") == "single":
            by_reader.setdefault((item.conversation, item.doc["user_id"]), []).append(item)
    out: list[tuple[dict[str, Any], list[Item]]] = []
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


def _read_conversation_max(i: Item) -> dict[str, Any]:
    return {f"read_cursors.{i.doc['user_id']}": i.doc["seq"]}


# reaction.added and reaction.removed (docs/adr/0037). The event carries the emoji's whole list of users after
# the change, so applying it sets that list (no counting): one $set by _id of the message's ``reactions``,
# guarded by ``rx_seq`` (an older or redelivered reaction event writes nothing), decided on the document read
# by _id (``Seen``).


def _reaction_parse(event: Event) -> dict[str, Any]:
    if event.seq < 1:
        raise MalformedEntry(f"{event.type} with seq {event.seq}")
    ids = event.data.get("user_ids")
    if not isinstance(ids, list) or not all(isinstance(u, str) for u in ids):
        raise MalformedEntry(f"{event.type} with user_ids {str(ids)[:100]!r}")
    return {"id": _text(event.data, "id"), "emoji": _text(event.data, "emoji"),
            "user_ids": [str(_oid(u, "user_ids")) for u in ids]}


def _content(i: Item) -> str:
    return str(i.doc["content"])


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


def _reaction_update(i: Item, seen: Seen) -> dict[str, Any] | None:
    seq = _ev(i).seq
    message = seen.message(i.doc["id"])
    if message is None or message.get("deleted") is True or not _older_reaction(message, seq):
        return None
    reactions = reactions_with(message.get("reactions"), emoji=i.doc["emoji"], user_ids=i.doc["user_ids"])
    message.update(reactions=reactions, rx_seq=seq)
    return {"q": {"_id": i.doc["id"]}, "u": {"$set": {"reactions": reactions, "rx_seq": seq}}}


def reaction_bucket_update(i: Item, entry: dict[str, Any], path: str) -> dict[str, Any] | None:
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
                             conversation_updates=_new_last_message, search_text=_content),
    "message.edited": EventRule(parse=_edited_parse, message_update=_edited_update, needs_message=True,
                                conversation_max=_sequenced_conversation_max,
                                conversation_update=_edited_last_message, versions=_edited_versions,
                                search_text=_content),
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
