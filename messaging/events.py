"""The one builder of conversation events, and the append of a built event.

Every state change that goes through a partition stream is built here, by :func:`event_build`: a sender's
send (a reply included), edit and delete, a staff member's delete, a read cursor's move and a reaction's
change (``messaging/services.py``: ``message_send``, ``message_edit``, ``message_delete``,
``message_delete_by_staff``, ``read_mark``; ``messaging/reactions.py``: ``reaction_change``). The
builder decides the payload's fields (``PAYLOAD_FIELDS``, documented in ``messaging/streams.py`` and
docs/protocol.md), stamps the time, and says what the append writes beside the entry (the dedup key of a
send, the meta hash of a send or a delete, the versions an edit adds to it: :func:`edit_versions_meta`).
:func:`event_emit` appends a built message event with
``streams.event_append``. A ``read.updated`` is appended by ``read_mark``'s own script, because the cursor
it carries is decided inside that script (it moves forward only, clamped to the last accepted seq, and the
event is appended only when it moved); the script takes the builder's JSON cut around the seq
(:meth:`BuiltEvent.json_around_seq`) and puts the cursor in between, so even that payload is built here.

The storage drain applies each of these types through its own table (``storage.rules.EVENT_RULES``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from core.bus import BusAsync
from core.entries import SEQUENCED, EventType
from core.keys import message_meta_key
from messaging import streams

# The payload's fields of each event type, in the order they are written.
PAYLOAD_FIELDS: dict[str, tuple[str, ...]] = {
    "message.new": ("id", "conversation_id", "sender_id", "content", "timestamp", "client_msg_id", "mentions"),
    "message.edited": ("id", "conversation_id", "content", "edited_at", "editor_id", "original", "mentions"),
    "message.deleted": ("id", "conversation_id", "deleted_at", "deleter_id"),
    "read.updated": ("conversation_id", "user_id", "seq"),
    "reaction.added": ("id", "conversation_id", "user_id", "emoji", "user_ids", "at"),
    "reaction.removed": ("id", "conversation_id", "user_id", "emoji", "user_ids", "at"),
}
# Optional fields of a payload, present only when they apply (so a plain send's frame carries no extra bytes).
PAYLOAD_OPTIONAL: dict[str, tuple[str, ...]] = {"message.new": ("reply_to",)}
# Types appended by a script of their own, which decides part of the payload atomically with the append
# (``read_mark``'s cursor; ``messaging/reactions.py``'s ``user_ids``): never by :func:`event_emit`.
OWN_SCRIPT: frozenset[str] = frozenset({"read.updated", "reaction.added", "reaction.removed"})
# ``deleter_id`` of a delete made by staff: not a chat user's id, so no client mistakes it for a member.
STAFF_DELETER_PREFIX = "staff:"
# Stands in for the cursor in a ``read.updated`` payload while it is cut in two (json_around_seq); a string,
# so json.dumps quotes and escapes it and no id can contain the quoted form.
_SEQ_MARK = "\x00seq\x00"


def iso_now() -> str:
    """The current time as events carry it: ISO-8601 UTC with milliseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")



def _meta_ttl_s() -> int:
    # As long as a resume may replay the message, plus an hour for the drain to have persisted it.
    return int(settings.RESUME_WINDOW_S) + 3600


@dataclass(frozen=True, slots=True)
class BuiltEvent:
    """One event as the stream entry carries it, and what its append writes beside it."""

    type: EventType
    conversation_id: str
    message_id: str  # "" for read.updated
    payload: dict[str, Any]
    dedup: tuple[str, str] | None = None  # (sender_id, client_msg_id) of a message.new
    meta: tuple[str, dict[str, str], int] | None = None  # (key, fields, ttl_s) of the message's meta hash

    def json_around_seq(self) -> tuple[str, str]:
        """The compact JSON of a ``read.updated`` payload cut where its ``seq`` goes: ``head + str(seq) +
        tail`` is the payload with that cursor. Raises ValueError for another type."""
        if self.type != "read.updated":
            raise ValueError(f"{self.type} has no seq in its payload")
        text = json.dumps({**self.payload, "seq": _SEQ_MARK}, separators=(",", ":"))
        head, tail = text.split(json.dumps(_SEQ_MARK))
        return head, tail

    def json_around(self, name: str) -> tuple[str, str]:
        """The compact JSON of the payload cut where the value of its field ``name`` goes: ``head + value +
        tail`` is the payload with that value (JSON text decided by an append script). Raises KeyError for a
        field the payload does not have."""
        if name not in self.payload:
            raise KeyError(name)
        text = json.dumps({**self.payload, name: _SEQ_MARK}, separators=(",", ":"))
        head, tail = text.split(json.dumps(_SEQ_MARK))
        return head, tail


def event_build(*, type: EventType, conversation_id: str, actor_id: str, message_id: str = "",
                content: str | None = None, client_msg_id: str | None = None, sender_id: str | None = None,
                seq: int | None = None, original: dict[str, Any] | None = None,
                reply_to: dict[str, Any] | None = None, emoji: str | None = None,
                mentions: list[str] | None = None) -> BuiltEvent:
    """Build one event of ``type`` by ``actor_id`` (the sender, editor, deleter or reader). Pure: no I/O.

    Arguments by type: ``message.new`` takes ``message_id`` (a fresh id), ``content``, ``client_msg_id`` and
    ``mentions`` (the member ids ``messaging.mentions.mentions_resolve`` found; default none);
    ``message.edited`` ``message_id``, ``content``, ``original`` (``{content, at, seq}`` of the message as
    sent, on its first edit, so the drain can keep it as the first version; None on later edits: the earlier
    edits' events kept it already) and ``mentions`` (the members the new content names: the message's whole
    list after the edit, docs/adr/0046); ``message.deleted`` ``message_id`` and ``sender_id`` (the
    message's sender, kept in its meta hash; the actor is the deleter: the sender, or ``staff:<username>``);
    ``read.updated`` ``seq`` (the cursor; 0 when the append script decides it); ``message.new`` may take
    ``reply_to``, the quote of the message it answers (``messaging.replies.reply_quote``); ``reaction.added`` and
    ``reaction.removed`` take ``message_id`` and ``emoji`` (``user_ids`` is decided by their append script:
    ``json_around("user_ids")``). The caller has validated and
    authorized them. Raises ValueError for a missing argument (a programming error, not bad input)."""

    def need(value: Any, name: str) -> Any:
        if value is None or value == "":
            raise ValueError(f"{type} needs {name}")
        return value

    if type == "message.new":
        payload = {"id": need(message_id, "message_id"), "conversation_id": conversation_id, "sender_id": actor_id,
                   "content": need(content, "content"), "timestamp": iso_now(),
                   "client_msg_id": need(client_msg_id, "client_msg_id"), "mentions": list(mentions or ())}
        if reply_to is not None:
            payload["reply_to"] = reply_to
        return BuiltEvent(type=type, conversation_id=conversation_id, message_id=message_id, payload=payload,
                          dedup=(actor_id, payload["client_msg_id"]),
                          meta=(message_meta_key(message_id), {"c": conversation_id, "u": actor_id}, _meta_ttl_s()))
    if type == "message.edited":
        payload = {"id": need(message_id, "message_id"), "conversation_id": conversation_id,
                   "content": need(content, "content"), "edited_at": iso_now(), "editor_id": actor_id,
                   "original": None if original is None else {k: original[k] for k in ("content", "at", "seq")},
                   "mentions": list(mentions or ())}
        return BuiltEvent(type=type, conversation_id=conversation_id, message_id=message_id, payload=payload)
    if type == "message.deleted":
        payload = {"id": need(message_id, "message_id"), "conversation_id": conversation_id,
                   "deleted_at": iso_now(), "deleter_id": actor_id}
        # The meta hash says "deleted": later edits and deletes of the message are refused at once.
        meta = {"c": conversation_id, "u": need(sender_id, "sender_id"), "x": "1"}
        return BuiltEvent(type=type, conversation_id=conversation_id, message_id=message_id, payload=payload,
                          meta=(message_meta_key(message_id), meta, _meta_ttl_s()))
    if type == "read.updated":
        payload = {"conversation_id": conversation_id, "user_id": actor_id, "seq": int(need(seq, "seq"))}
        return BuiltEvent(type=type, conversation_id=conversation_id, message_id="", payload=payload)
    if type in ("reaction.added", "reaction.removed"):
        payload = {"id": need(message_id, "message_id"), "conversation_id": conversation_id, "user_id": actor_id,
                   "emoji": need(emoji, "emoji"), "user_ids": [], "at": iso_now()}
        return BuiltEvent(type=type, conversation_id=conversation_id, message_id=message_id, payload=payload)
    raise ValueError(f"unknown event type {type!r}")


def edit_versions_meta(event: BuiltEvent, *, seq: int, sender_id: str) -> tuple[str, dict[str, str], int]:
    """What an accepted ``message.edited`` (of seq ``seq``) writes into its message's meta hash, after the
    append (the field names need the seq the append chose): ``e: "1"`` (the message has been edited: later
    edits need no ``original``), ``v<seq>`` with the version this edit made and, on a first edit,
    ``v<original seq>`` with the original, as JSON ``{content, at, seq}``; plus ``c``/``u``, so a hash that
    had expired is whole again. ``(key, fields, ttl_s)``. These make the versions readable right after the
    ack, before the drain has put them in MongoDB (``api.selectors.message_versions_get`` merges both)."""
    if event.type != "message.edited":
        raise ValueError(f"{event.type} writes no versions")
    p = event.payload
    fields = {"c": event.conversation_id, "u": sender_id, "e": "1",
              f"v{seq}": json.dumps({"content": p["content"], "at": p["edited_at"], "seq": seq},
                                    separators=(",", ":"))}
    if p["original"] is not None:
        fields[f"v{int(p['original']['seq'])}"] = json.dumps(p["original"], separators=(",", ":"))
    return message_meta_key(event.message_id), fields, _meta_ttl_s()


async def event_emit(bus: BusAsync, *, event: BuiltEvent) -> streams.Appended:
    """Append a built ``message.*`` event (``streams.event_append``: seq, dedup and meta hash in one round
    trip). Side effects: those of ``event_append``. Raises ValueError for ``read.updated`` (its append is
    ``read_mark``'s cursor script)."""
    if event.type in OWN_SCRIPT or event.type not in SEQUENCED:
        raise ValueError(f"{event.type} is appended by its own script, not event_emit")
    return await streams.event_append(bus, type=event.type, conversation_id=event.conversation_id,
                                      payload=event.payload, message_id=event.message_id, dedup=event.dedup,
                                      meta=event.meta)
