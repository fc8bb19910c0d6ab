"""Reads of the real-time path: a user's conversations, missed events from the stream, archived messages.

The MongoDB readers are synchronous (mongoengine/pymongo); async callers run them with
``sync_to_async(..., thread_sensitive=False)`` so no query ever blocks the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio
from bson import ObjectId

from messaging import streams
from messaging.bus import BusAsync, bus_resolve

# XREVRANGE page while looking for a conversation's missed events: big enough that a short absence is one
# round trip, small enough that one page (~1,000 entries of ~300 bytes) is a few hundred KB at most.
RESUME_SCAN_PAGE = 1000
# A resume scans at most this many entries of the partition stream backwards; what lies beyond is read from
# MongoDB. 100,000 entries is minutes of a busy partition, far more than the drain's normal lag (one batch),
# so the MongoDB part never misses events the drain has not written yet unless the drain is that far behind.
RESUME_SCAN_MAX = 100_000
# Archived messages are read and sent in pages of this size, so a long absence never loads it all at once.
ARCHIVE_PAGE = 500


def user_conversation_ids(*, user_id: str) -> list[str]:
    """Ids of every conversation the user is a member of (MongoDB; blocking)."""
    from storage.documents import Conversation

    if not ObjectId.is_valid(user_id):
        return []
    return [str(c["_id"]) for c in Conversation.objects(members=ObjectId(user_id)).only("id").as_pymongo()]


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return None if value is None else str(value)


def archived_messages(*, conversation_id: str, after_seq: int, before_seq: int | None,
                      limit: int = ARCHIVE_PAGE) -> list[dict[str, Any]]:
    """Persisted messages of a conversation with ``after_seq < seq < before_seq``, in seq order, in their
    final state (MongoDB holds edited content and delete tombstones, not the edit events). Blocking."""
    from storage.documents import Message

    query: dict[str, Any] = {"conversation_id": ObjectId(conversation_id), "seq__gt": after_seq}
    if before_seq is not None:
        query["seq__lt"] = before_seq
    rows = Message.objects(**query).order_by("seq").limit(limit).as_pymongo()
    return [
        {
            "id": str(r["_id"]), "conversation_id": str(r["conversation_id"]), "sender_id": str(r["sender_id"]),
            "content": r.get("content", ""), "timestamp": _iso(r.get("timestamp")), "seq": int(r["seq"]),
            "client_msg_id": r.get("client_msg_id"), "edited_at": _iso(r.get("edited_at")),
            "deleted": bool(r.get("deleted", False)),
        }
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    type: str
    seq: int
    payload_json: str


@dataclass(frozen=True, slots=True)
class StreamTail:
    """A conversation's sequenced events after a seq that are still in the stream, oldest first."""

    events: list[StreamEvent]
    # The stream holds every event from after_seq + 1 on: nothing to read from MongoDB.
    complete: bool


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def stream_events_after(client: redis.asyncio.Redis, *, conversation_id: str, after_seq: int,
                              last_seq: int, bus: BusAsync | None = None) -> StreamTail:
    """Scan the conversation's partition stream backwards for its sequenced events with
    ``after_seq < seq <= last_seq`` (seq order is stream order within a conversation). ``client`` is a
    REDIS_URL client; the stream is read through ``bus`` (default: ``messaging.bus.bus_resolve``). Read-only."""
    if last_seq <= after_seq:
        return StreamTail(events=[], complete=True)
    bus = bus_resolve(client, bus)
    key = streams.stream_key(streams.partition_of(conversation_id))
    conv = conversation_id.encode()
    found: list[StreamEvent] = []
    upper: bytes | str = "+"
    scanned = 0
    while scanned < RESUME_SCAN_MAX:
        page: Any = await bus.xrevrange(key, max=upper, min="-", count=RESUME_SCAN_PAGE)
        if not page:
            break
        for _entry_id, fields in page:
            scanned += 1
            if fields.get(b"c") != conv or fields.get(b"t") == b"read.updated":
                continue
            seq = int(fields[b"s"])
            if seq > last_seq:
                continue
            if seq <= after_seq:
                found.reverse()
                return StreamTail(events=found, complete=True)
            found.append(StreamEvent(type=_s(fields[b"t"]), seq=seq, payload_json=_s(fields[b"d"])))
            if seq == after_seq + 1:
                found.reverse()
                return StreamTail(events=found, complete=True)
        if len(page) < RESUME_SCAN_PAGE:
            break
        # Exclusive upper bound for the next page: "(" + id (Redis >= 6.2).
        upper = "(" + _s(page[-1][0])
    found.reverse()
    return StreamTail(events=found, complete=False)


# How far back the stream is scanned for the message.new of a message being edited for the first time while
# it is not in MongoDB yet: it is then in the drain's backlog (seconds of traffic; a drain starts at
# BATCH_SIZE entries), so a few pages reach it. Bounded, since a long MongoDB outage grows the backlog.
ORIGINAL_SCAN_PAGE = 1000
ORIGINAL_SCAN_MAX = 20_000


async def stream_message_new_find(bus: BusAsync, *, conversation_id: str,
                                  message_id: str) -> dict[str, Any] | None:
    """``{content, at, seq}`` of the ``message.new`` of ``message_id`` if it is among the last
    ``ORIGINAL_SCAN_MAX`` entries of its conversation's partition stream, newest first; else None. Read-only."""
    key = streams.stream_key(streams.partition_of(conversation_id))
    conv, needle = conversation_id.encode(), message_id.encode()
    upper: bytes | str = "+"
    scanned = 0
    while scanned < ORIGINAL_SCAN_MAX:
        page: Any = await bus.xrevrange(key, max=upper, min="-", count=ORIGINAL_SCAN_PAGE)
        for _entry_id, fields in page:
            scanned += 1
            if fields.get(b"t") != b"message.new" or fields.get(b"c") != conv or needle not in fields.get(b"d", b""):
                continue
            data = json.loads(fields[b"d"])
            if data.get("id") == message_id:
                return {"content": data["content"], "at": data["timestamp"], "seq": int(fields[b"s"])}
        if len(page) < ORIGINAL_SCAN_PAGE:
            return None
        upper = "(" + _s(page[-1][0])
    return None
