"""Reads of the real-time path: a user's conversations, missed events from the stream, archived messages.

The MongoDB readers are synchronous (mongoengine/pymongo); async callers run them with
``sync_to_async(..., thread_sensitive=False)`` so no query ever blocks the event loop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from bson import ObjectId
from django.conf import settings

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


# A user's conversation ids are cached in Redis (docs/adr/0028): connects and the conversation list read them
# without a document-store query. Every membership change through the services drops them (and bumps the
# version, so a fill racing the change is not stored); the TTL only bounds staleness after a change that
# bypassed the services (a manual database edit). A day: a user's first connect or list of the day fills it
# (one members query, a scan on FerretDB), later ones read Redis.
USER_CONVERSATIONS_TTL_S = 24 * 3600
_NONE = "-"  # the cached set of a user in no conversation (a set cannot be empty)


def user_conversations_key(user_id: str) -> str:
    """Set: ids of the conversations the user is a member of (on REDIS_URL)."""
    return f"cs:uconvs:{user_id}"


def user_conversations_version_key(user_id: str) -> str:
    return f"cs:uconvs:v:{user_id}"


@functools.cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)


def _user_conversation_ids_from_db(user_id: str) -> list[str]:
    from storage.documents import Conversation

    return [str(c["_id"]) for c in Conversation.objects(members=ObjectId(user_id)).only("id").as_pymongo()]


def user_conversation_ids(*, user_id: str) -> list[str]:
    """Ids of every conversation the user is a member of: from the Redis cache, else MongoDB (blocking; async
    callers use a worker thread). Side effect on a miss: fills the cache, unless a membership change of the
    user happened meanwhile (its version moved)."""
    if not ObjectId.is_valid(user_id):
        return []
    r = _redis(settings.REDIS_URL)
    key, vkey = user_conversations_key(user_id), user_conversations_version_key(user_id)
    cached = r.smembers(key)
    if cached:
        return sorted({m.decode() if isinstance(m, bytes) else str(m) for m in cached} - {_NONE})
    version = r.get(vkey)
    found = _user_conversation_ids_from_db(user_id)
    with r.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(vkey)
            if pipe.get(vkey) == version:
                pipe.multi()
                pipe.delete(key)
                pipe.sadd(key, *(found or [_NONE]))
                pipe.expire(key, USER_CONVERSATIONS_TTL_S)
                pipe.execute()
        except redis.WatchError:
            pass  # a membership change raced this read: answer it, do not cache it
    return found


def conversation_card_key(conversation_id: str) -> str:
    """String: the conversation's card (JSON) the conversation list shows (``api.selectors``; on REDIS_URL)."""
    return f"cs:card:conv:{conversation_id}"


def user_conversations_forget(client: Any, *, user_ids: list[str], conversation_id: str | None = None) -> Any:
    """After a membership change: drop the users' cached conversation ids (bumping their versions) and the
    conversation's card, in one pipeline on ``client`` (a sync or async REDIS_URL client); returns the
    pipeline's ``execute()`` (a coroutine for an async client)."""
    pipe = client.pipeline(transaction=False)
    if conversation_id is not None:
        pipe.delete(conversation_card_key(conversation_id))
    for uid in user_ids:
        pipe.delete(user_conversations_key(uid))
        pipe.incr(user_conversations_version_key(uid))
        pipe.expire(user_conversations_version_key(uid), 2 * USER_CONVERSATIONS_TTL_S)
    return pipe.execute()


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
