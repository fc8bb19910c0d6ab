"""Reads of the real-time path: a user's conversations, missed events from the stream, archived messages.

The MongoDB readers are synchronous (mongoengine/pymongo); async callers run them with
``sync_to_async(..., thread_sensitive=False)`` so no query ever blocks the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from bson import ObjectId

from core import keys
from core.bus import BusAsync
from core.clients import sync_redis
from core.keys import conversation_card_key, user_conversations_key, user_conversations_version_key
from core.values import as_str
from messaging.conversation_index import user_conversations_rebuild, user_conversations_stored
from messaging.streams import bus_resolve

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
# without a document-store query. Registration writes a new user's (empty) set, and every membership change
# through the services adds or removes the conversation in each changed user's set (and bumps the version,
# so a fill racing the change is not stored): messaging.membership.membership_changed_sync, docs/adr/0039.
# Only a set that is not cached (a user from before this, one quiet for the TTL, a Redis restart without its
# data) is filled from the store, once: the user's ``user_conversations`` document, one read by ``_id``
# (docs/adr/0043); a members query (a scan on FerretDB) only for a user without a complete one, which it
# writes. The TTL only bounds staleness after a change that bypassed the services (a manual database edit):
# 30 days, as the members sets' (messaging.membership.MEMBERSHIP_TTL_S); with a day, every user's first
# connect of the day read the store.
USER_CONVERSATIONS_TTL_S = 30 * 24 * 3600
_NONE = "-"  # the cached set of a user in no conversation (a set cannot be empty)


def _user_conversation_ids_from_db(user_id: str) -> list[str]:
    """The members query (a scan of ``conversations`` on FerretDB), for a user without a complete
    ``user_conversations`` document; writes that document (docs/adr/0043)."""
    return user_conversations_rebuild(sync_redis(), user_id=user_id)


def user_conversation_ids(*, user_id: str) -> list[str]:
    """Ids of every conversation the user is a member of: from the Redis cache, else the user's
    ``user_conversations`` document (one read by ``_id``, docs/adr/0043), else the members query that rebuilds
    it (blocking; async callers use a worker thread). Side effect on a miss: fills the cache, unless a
    membership change of the user happened meanwhile (its version moved)."""
    if not ObjectId.is_valid(user_id):
        return []
    r = sync_redis()
    key, vkey = user_conversations_key(user_id), user_conversations_version_key(user_id)
    cached = r.smembers(key)
    if cached:
        return sorted({m.decode() if isinstance(m, bytes) else str(m) for m in cached} - {_NONE})
    version = r.get(vkey)
    found = user_conversations_stored(user_id=user_id)
    if found is None:
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


async def user_conversation_ids_async(client: redis.asyncio.Redis, *, user_id: str,
                                     cached: Collection[bytes | str] | None = None) -> list[str]:
    """:func:`user_conversation_ids` for a broker's connect: the cached set with the loop's own client (no
    thread hop), or ``cached``, its members as the caller read them (the hub's connect script); only a miss
    runs the blocking fill in a worker thread."""
    if cached is None:
        cached = await client.smembers(user_conversations_key(user_id)) if ObjectId.is_valid(user_id) else None
    if cached and ObjectId.is_valid(user_id):
        return sorted({as_str(m) for m in cached} - {_NONE})
    from asgiref.sync import sync_to_async

    return await sync_to_async(user_conversation_ids, thread_sensitive=False)(user_id=user_id)


# A new user's set: written only if no membership change of theirs bumped the version first (a change that
# saw no set left it to the fill, and this must not then cache "no conversations" over it).
_USER_CONVERSATIONS_INIT_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def user_conversations_init(client: Any, *, user_id: str) -> Any:
    """After a user is created (registration): cache their conversation ids as none, so their first connect
    reads no store. ``client``: a sync or async REDIS_URL client; returns the script's answer (a coroutine for
    an async client). Side effect: one script call."""
    return client.eval(_USER_CONVERSATIONS_INIT_LUA, 2, user_conversations_key(user_id),
                       user_conversations_version_key(user_id), _NONE, USER_CONVERSATIONS_TTL_S)



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
    from core.documents import Message
    from messaging.reactions import reactions_ordered  # lazy: reactions -> services -> membership -> here

    query: dict[str, Any] = {"conversation_id": ObjectId(conversation_id), "seq__gt": after_seq}
    if before_seq is not None:
        query["seq__lt"] = before_seq
    rows = Message.objects(**query).order_by("seq").limit(limit).as_pymongo()
    return [
        {
            "id": str(r["_id"]), "conversation_id": str(r["conversation_id"]), "sender_id": str(r["sender_id"]),
            "content": r.get("content", ""), "timestamp": _iso(r.get("timestamp")), "seq": int(r["seq"]),
            "client_msg_id": r.get("client_msg_id"), "edited_at": _iso(r.get("edited_at")),
            "deleted": bool(r.get("deleted", False)), "mentions": list(r.get("mentions") or ()),
            "reply_to": r.get("reply_to"), "reactions": reactions_ordered(r.get("reactions")),
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


@dataclass
class _PartitionPages:
    """How far one resume frame has read one partition stream (stream ids of the newest and oldest entry)."""

    top: bytes | str = "+"
    bottom: bytes | str = "+"
    scanned: int = 0  # entries read backwards from the first read's top
    at_start: bool = False  # the oldest entry of the stream was read


class ResumeScan:
    """The stream reads of ONE resume frame, shared by the conversations it names (docs/security.md).

    Scanning per conversation costs up to RESUME_SCAN_MAX entries each, so a frame naming 1,000 conversations
    could read 100 million entries. The conversations of a partition share its stream: here each partition is
    read backwards at most once per frame (at most RESUME_SCAN_MAX entries, plus what is appended while the
    frame is served, read forwards), and only the named conversations' events after their ``after_seq`` are
    kept, until their turn. A frame thus reads at most PARTITIONS x RESUME_SCAN_MAX entries whatever it names,
    and each answer is what a backward scan of that conversation alone would give. Read-only; one per frame."""

    def __init__(self, client: redis.asyncio.Redis, *, wanted: dict[str, int], bus: BusAsync | None = None) -> None:
        self._client = client
        self._bus = bus
        self._after = {conversation_id.encode(): after for conversation_id, after in wanted.items()}
        self._partitions: dict[int, _PartitionPages] = {}
        self._older: dict[bytes, list[StreamEvent]] = {}  # newest first
        self._newer: dict[bytes, list[StreamEvent]] = {}  # oldest first (read after the partition's first read)
        self._reached: set[bytes] = set()  # conversations whose event after_seq + 1 (or an older one) was read

    def _index(self, entries: Any, *, newer: bool) -> None:
        kept = self._newer if newer else self._older
        for _entry_id, fields in entries:
            conversation = fields.get(b"c")
            after = self._after.get(conversation)
            if after is None or fields.get(b"t") == b"read.updated":
                continue
            seq = int(fields[b"s"])
            if seq <= after + 1:
                self._reached.add(conversation)
            if seq > after:
                kept.setdefault(conversation, []).append(
                    StreamEvent(type=as_str(fields[b"t"]), seq=seq, payload_json=as_str(fields[b"d"])))

    async def events_after(self, *, conversation_id: str, last_seq: int) -> StreamTail:
        """The named conversation's sequenced events after its ``after_seq`` up to ``last_seq`` (as
        a backward scan of that conversation alone would answer them); forgets the conversation afterwards."""
        conv = conversation_id.encode()
        after_seq = self._after[conv]
        try:
            if last_seq <= after_seq:
                return StreamTail(events=[], complete=True)
            bus = bus_resolve(self._client, self._bus)
            partition = keys.partition_of(conversation_id)
            key = keys.stream_key(partition)
            pages = self._partitions.setdefault(partition, _PartitionPages())
            if pages.top != "+":
                # What was appended since this partition was first read: forwards from there, bounded pages.
                while True:
                    newer: Any = await bus.xrange(key, min="(" + as_str(pages.top), max="+", count=RESUME_SCAN_PAGE)
                    if newer:
                        pages.top = newer[-1][0]
                        self._index(newer, newer=True)
                    if len(newer) < RESUME_SCAN_PAGE:
                        break
            while conv not in self._reached and not pages.at_start and pages.scanned < RESUME_SCAN_MAX:
                upper = "+" if pages.bottom == "+" else "(" + as_str(pages.bottom)
                page: Any = await bus.xrevrange(key, max=upper, min="-", count=RESUME_SCAN_PAGE)
                if page:
                    if pages.top == "+":
                        pages.top = page[0][0]
                    pages.bottom = page[-1][0]
                    pages.scanned += len(page)
                    self._index(page, newer=False)
                if len(page) < RESUME_SCAN_PAGE:
                    pages.at_start = True
            found = [*reversed(self._older.get(conv, ())), *self._newer.get(conv, ())]
            return StreamTail(events=[e for e in found if e.seq <= last_seq], complete=conv in self._reached)
        finally:
            del self._after[conv]
            self._older.pop(conv, None)
            self._newer.pop(conv, None)


# How far back the stream is scanned for the message.new of a message being edited for the first time while
# it is not in MongoDB yet: it is then in the drain's backlog (seconds of traffic; a drain starts at
# BATCH_SIZE entries), so a few pages reach it. Bounded, since a long MongoDB outage grows the backlog.
ORIGINAL_SCAN_PAGE = 1000
ORIGINAL_SCAN_MAX = 20_000


async def stream_message_new_find(bus: BusAsync, *, conversation_id: str,
                                  message_id: str) -> dict[str, Any] | None:
    """``{content, at, seq}`` of the ``message.new`` of ``message_id`` if it is among the last
    ``ORIGINAL_SCAN_MAX`` entries of its conversation's partition stream, newest first; else None. Read-only."""
    key = keys.stream_key(keys.partition_of(conversation_id))
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
        upper = "(" + as_str(page[-1][0])
    return None
