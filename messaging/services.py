"""The one write path of conversation events (Zulip style): WebSocket consumers and DRF views both call it.

Each function validates, authorizes (membership from a Redis cache filled from MongoDB on a miss, never a
blocking MongoDB call on the event loop), then appends one durable event to the conversation's partition
stream (``messaging/streams.py``). It returns only after Redis accepted the entry: that is what "accepted"
means to clients (DESIGN.md §4). Fan-out to connected clients and persistence happen downstream, from the
stream; nothing here talks to a socket.

All functions are coroutines taking an asyncio client of REDIS_URL (membership, pub/sub, presence); those
that touch the partition streams also take ``bus``, a client of the message bus (``messaging/bus.py``; by
default ``bus_resolve(client, None)``: ``client`` itself unless the bus is another Redis or a cluster). Sync
callers (DRF views) use ``asgiref.sync.async_to_sync`` and pass both clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings

from chatstream_site.errors import Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from messaging import frames, streams
from messaging.bus import BusAsync, bus_resolve

CLIENT_MSG_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
OBJECT_ID_RE = re.compile(r"^[0-9a-f]{24}$")
MESSAGE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# A membership answer is cached this long; API writes that change membership invalidate it at once, so the
# TTL only bounds the staleness after a write that bypassed the services (a manual database edit).
MEMBERSHIP_TTL_S = 3600
# "Not a conversation" answers are cached briefly: enough to absorb a client hammering a bad id.
MEMBERSHIP_MISS_TTL_S = 30
_NO_MEMBERS = "-"  # the cached set of a conversation that does not exist


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def membership_key(conversation_id: str) -> str:
    return f"cs:members:{conversation_id}"


def message_meta_key(message_id: str) -> str:
    """Hash ``{c: conversation id, u: sender id}`` of a message accepted recently (before it is in MongoDB).
    On the bus Redis (no hash tag: a message id alone must find it)."""
    return f"cs:msgmeta:{message_id}"


# ------------------------------------------------------------------ validation


def _require_object_id(value: Any, *, field: str) -> str:
    if not isinstance(value, str) or not OBJECT_ID_RE.match(value):
        raise ValidationFailed(f"{field} must be a 24-character hex id", details={"field": field})
    return value


def _require_content(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationFailed("content must be a string", details={"field": "content"})
    if not value.strip():
        raise ValidationFailed("content must not be empty", details={"field": "content"})
    if len(value) > settings.MESSAGE_MAX_CHARS:
        raise PayloadTooLarge(
            f"content is {len(value)} characters; the limit is {settings.MESSAGE_MAX_CHARS}",
            details={"field": "content", "limit": settings.MESSAGE_MAX_CHARS},
        )
    return value


def _require_client_msg_id(value: Any) -> str:
    if not isinstance(value, str) or not CLIENT_MSG_ID_RE.match(value):
        raise ValidationFailed("client_msg_id must be 1-64 characters of A-Z a-z 0-9 _ . : -",
                               details={"field": "client_msg_id"})
    return value


# ------------------------------------------------------------------ membership


def _members_from_db(conversation_id: str) -> list[str] | None:
    from storage.documents import Conversation

    conversation = Conversation.objects(id=conversation_id).only("members").first()
    if conversation is None:
        return None
    return [str(m) for m in conversation.members]


# A second, in-process cache in front of the Redis one, enabled only in processes that hear every
# invalidation (brokers: their hub listens on the control channel; see membership_local_forget). It saves a
# Redis round trip per message on the hot path. The TTL bounds staleness if a pub/sub message is ever lost.
MEMBERSHIP_LOCAL_TTL_S = 30.0
_local_members: dict[str, tuple[float, frozenset[str] | None]] | None = None
_local_generation = 0


def membership_local_enable() -> None:
    """Turn the in-process membership cache on. Precondition: the caller forwards every control-channel
    ``invalidate``/``members`` message to :func:`membership_local_forget` (the broker hub does)."""
    global _local_members
    if _local_members is None:
        _local_members = {}


def membership_local_forget(conversation_id: str | None) -> None:
    """Drop one conversation (None: all) from the in-process cache."""
    global _local_generation
    _local_generation += 1
    if _local_members is not None:
        if conversation_id is None:
            _local_members.clear()
        else:
            _local_members.pop(conversation_id, None)


async def conversation_members(client: redis.asyncio.Redis, *, conversation_id: str) -> set[str] | None:
    """Member ids of a conversation (None if it does not exist). Cached in Redis (and in-process on
    brokers); a miss reads MongoDB in a worker thread. Side effect: fills the caches."""
    if _local_members is not None:
        hit = _local_members.get(conversation_id)
        if hit is not None and hit[0] > time.monotonic():
            return None if hit[1] is None else set(hit[1])
        generation = _local_generation
        found = await _conversation_members_shared(client, conversation_id=conversation_id)
        if generation == _local_generation:  # no invalidation raced with the read
            _local_members[conversation_id] = (time.monotonic() + MEMBERSHIP_LOCAL_TTL_S,
                                               None if found is None else frozenset(found))
        return found
    return await _conversation_members_shared(client, conversation_id=conversation_id)


async def _conversation_members_shared(client: redis.asyncio.Redis, *, conversation_id: str) -> set[str] | None:
    key = membership_key(conversation_id)
    cached = await client.smembers(key)
    if cached:
        members = {m.decode() if isinstance(m, bytes) else str(m) for m in cached}
        return None if members == {_NO_MEMBERS} else members - {_NO_MEMBERS}
    found = await sync_to_async(_members_from_db, thread_sensitive=False)(conversation_id)
    async with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.sadd(key, *(found or [_NO_MEMBERS]))
        pipe.expire(key, MEMBERSHIP_TTL_S if found is not None else MEMBERSHIP_MISS_TTL_S)
        await pipe.execute()
    return set(found) if found is not None else None


async def membership_require(client: redis.asyncio.Redis, *, user_id: str, conversation_id: str) -> None:
    """Raise NotFound for an unknown conversation and for one the user is not in (no existence leak)."""
    members = await conversation_members(client, conversation_id=conversation_id)
    if members is None or user_id not in members:
        raise NotFound("no such conversation", details={"conversation_id": conversation_id})


async def membership_invalidate(client: redis.asyncio.Redis, *, conversation_id: str) -> None:
    """Forget the cached members; call after any change of a conversation's members.
    Side effects: DEL of the Redis cache, PUBLISH so every broker drops its in-process copy."""
    await client.delete(membership_key(conversation_id))
    await client.publish(frames.CONTROL_CHANNEL, frames.control_invalidate(conversation_id=conversation_id))


def membership_invalidate_sync(client: Any, *, conversation_id: str) -> None:
    """The same for sync code (DRF services) with a sync ``redis.Redis`` client."""
    client.delete(membership_key(conversation_id))
    client.publish(frames.CONTROL_CHANNEL, frames.control_invalidate(conversation_id=conversation_id))


# ------------------------------------------------------------------ the write path


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the sender is told once Redis accepted the event (the ``ack``)."""

    message_id: str
    conversation_id: str
    seq: int
    duplicate: bool
    event: dict[str, Any]  # the payload appended (for a duplicate, the retried request's view)


async def message_send(
    client: redis.asyncio.Redis, *, user_id: str, conversation_id: Any, client_msg_id: Any, content: Any,
    bus: BusAsync | None = None,
) -> Accepted:
    """Accept a new message. Retrying with the same ``client_msg_id`` returns the first ``(id, seq)``.

    Raises ValidationFailed, PayloadTooLarge, NotFound. Side effects: appends ``message.new`` to the
    partition stream and remembers the message's sender for edits made before it reaches MongoDB.
    """
    conversation_id = _require_object_id(conversation_id, field="conversation_id")
    client_msg_id = _require_client_msg_id(client_msg_id)
    content = _require_content(content)
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    bus = bus_resolve(client, bus)
    payload = {
        "id": uuid.uuid4().hex, "conversation_id": conversation_id, "sender_id": user_id,
        "content": content, "timestamp": _now_iso(), "client_msg_id": client_msg_id,
    }
    # The sender is remembered for edits made before the message reaches MongoDB, in the append's round
    # trip. A retry writes it for its own fresh (never used) id: harmless, and it expires.
    appended = await streams.event_append(
        bus, type="message.new", conversation_id=conversation_id, payload=payload,
        message_id=payload["id"], dedup=(user_id, client_msg_id),
        meta=(message_meta_key(payload["id"]), {"c": conversation_id, "u": user_id},
              settings.RESUME_WINDOW_S + 3600),
    )
    if not appended.duplicate:
        drain_nudge(bus, partition=appended.partition)
    return Accepted(message_id=appended.message_id, conversation_id=conversation_id, seq=appended.seq,
                    duplicate=appended.duplicate, event={**payload, "id": appended.message_id, "seq": appended.seq})


def _message_owner_from_db(message_id: str) -> tuple[str, str, bool] | None:
    from storage.documents import Message

    message = Message.objects(id=message_id).only("conversation_id", "sender_id", "deleted").first()
    if message is None:
        return None
    return str(message.conversation_id), str(message.sender_id), bool(message.deleted)


async def _message_owner(bus: BusAsync, *, message_id: Any) -> tuple[str, str]:
    if not isinstance(message_id, str) or not MESSAGE_ID_RE.match(message_id):
        raise ValidationFailed("message_id must be a 32-character hex id", details={"field": "message_id"})
    meta = await bus.hgetall(message_meta_key(message_id))
    if meta:
        decoded = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                   for k, v in meta.items()}
        if decoded.get("x") == "1":
            raise NotFound("message was deleted", details={"message_id": message_id})
        return decoded["c"], decoded["u"]
    found = await sync_to_async(_message_owner_from_db, thread_sensitive=False)(message_id)
    if found is None or found[2]:
        raise NotFound("no such message", details={"message_id": message_id})
    return found[0], found[1]


async def _sender_only(client: redis.asyncio.Redis, bus: BusAsync, *, user_id: str, message_id: Any) -> str:
    conversation_id, sender_id = await _message_owner(bus, message_id=message_id)
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    if sender_id != user_id:
        raise Forbidden("only the sender may change a message", details={"message_id": message_id})
    return conversation_id


async def message_edit(client: redis.asyncio.Redis, *, user_id: str, message_id: Any, content: Any,
                       bus: BusAsync | None = None) -> Accepted:
    """Replace a message's content (sender only). Appends ``message.edited`` after the message it edits."""
    content = _require_content(content)
    bus = bus_resolve(client, bus)
    conversation_id = await _sender_only(client, bus, user_id=user_id, message_id=message_id)
    payload = {"id": message_id, "conversation_id": conversation_id, "content": content,
               "edited_at": _now_iso(), "editor_id": user_id}
    appended = await streams.event_append(bus, type="message.edited", conversation_id=conversation_id,
                                          payload=payload, message_id=message_id)
    drain_nudge(bus, partition=appended.partition)
    return Accepted(message_id=message_id, conversation_id=conversation_id, seq=appended.seq, duplicate=False,
                    event={**payload, "seq": appended.seq})


async def message_delete(client: redis.asyncio.Redis, *, user_id: str, message_id: Any,
                         bus: BusAsync | None = None) -> Accepted:
    """Tombstone a message (sender only). Appends ``message.deleted``; later edits are refused."""
    bus = bus_resolve(client, bus)
    conversation_id = await _sender_only(client, bus, user_id=user_id, message_id=message_id)
    payload = {"id": message_id, "conversation_id": conversation_id, "deleted_at": _now_iso(),
               "deleter_id": user_id}
    appended = await streams.event_append(
        bus, type="message.deleted", conversation_id=conversation_id, payload=payload, message_id=message_id,
        meta=(message_meta_key(message_id), {"c": conversation_id, "u": user_id, "x": "1"},
              settings.RESUME_WINDOW_S + 3600))
    drain_nudge(bus, partition=appended.partition)
    return Accepted(message_id=message_id, conversation_id=conversation_id, seq=appended.seq, duplicate=False,
                    event={**payload, "seq": appended.seq})


def read_cursor_key(conversation_id: str) -> str:
    """Hash user id -> read seq, in the conversation's partition slot (on the bus Redis)."""
    return f"cs:{streams.tag(streams.partition_of(conversation_id))}:read:{conversation_id}"


# KEYS[1] read-cursor hash, KEYS[2] stream, KEYS[3] seq hash; ARGV[1] user, ARGV[2] seq, ARGV[3] conversation,
# ARGV[4] payload -> the cursor after the call (moved only forward, and never past the last accepted seq)
_READ_LUA = """
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
local want = tonumber(ARGV[2])
if want > last then want = last end
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if want <= current then return current end
redis.call('HSET', KEYS[1], ARGV[1], want)
local payload = string.gsub(ARGV[4], '"seq":0', '"seq":' .. want, 1)
redis.call('XADD', KEYS[2], '*', 't', 'read.updated', 'c', ARGV[3], 's', '0', 'd', payload, 'v', '1')
return want
"""


async def read_mark(client: redis.asyncio.Redis, *, user_id: str, conversation_id: Any, seq: Any,
                    bus: BusAsync | None = None) -> int:
    """Move the user's read cursor forward to ``seq`` (clamped to the last accepted seq); return the cursor.

    A cursor never moves back: a smaller ``seq`` changes nothing and appends nothing. Side effect, when it
    moves: appends ``read.updated`` to the partition stream.
    """
    conversation_id = _require_object_id(conversation_id, field="conversation_id")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValidationFailed("seq must be a non-negative integer", details={"field": "seq"})
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    bus = bus_resolve(client, bus)
    partition = streams.partition_of(conversation_id)
    payload = f'{{"conversation_id":"{conversation_id}","user_id":"{user_id}","seq":0}}'
    script = bus.register_script(_READ_LUA)
    cursor = await script(
        keys=[read_cursor_key(conversation_id), streams.stream_key(partition), streams.seq_key(partition)],
        args=[user_id, seq, conversation_id, payload],
    )
    drain_nudge(bus, partition=partition)
    return int(cursor)


# ------------------------------------------------------------------ size trigger of the storage drain

logger = logging.getLogger(__name__)
# Local appends per partition between two backlog checks: a tenth of a batch, so the drain starts at most
# ~10 % (per broker) past BATCH_SIZE, for one XINFO GROUPS per 50 appends with the default batch of 500.
_appends_since_check: dict[int, int] = {}
_background: set[asyncio.Task[None]] = set()


async def partition_backlog(client: BusAsync, *, partition: int) -> int:
    """Entries of a partition not yet delivered to its drain's consumer group (XINFO GROUPS ``lag``);
    the whole stream length when no group exists yet or Redis cannot tell the lag. Read-only."""
    key = streams.stream_key(partition)
    groups = await client.xinfo_groups(key) if await client.exists(key) else []
    lags = []
    for group in groups:
        lag = group.get("lag") if isinstance(group, dict) else None
        if lag is None:
            lags.append(int(await client.xlen(key)))
        else:
            lags.append(int(lag))
    if not groups:
        return int(await client.xlen(key))
    return max(lags)


async def _drain_enqueue(*, partition: int) -> None:
    from storage.services import drain_enqueue_async  # lazy: storage imports messaging

    await drain_enqueue_async(partition=partition)


async def _drain_check(client: BusAsync, *, partition: int) -> None:
    try:
        if await partition_backlog(client, partition=partition) >= settings.BATCH_SIZE:
            # drain_enqueue itself keeps it to one drain in flight per partition (SET NX lock).
            await _drain_enqueue(partition=partition)
    except Exception:
        logger.exception("size trigger: backlog check of partition %s failed", partition)


def drain_nudge(client: BusAsync, *, partition: int) -> None:
    """Count one local append to ``partition``; every tenth of a batch, check the partition's backlog in the
    background (with the bus client ``client``) and enqueue a drain when it reached ``BATCH_SIZE``. Never
    delays the caller's ack. Precondition: called on a running event loop."""
    count = _appends_since_check.get(partition, 0) + 1
    if count < max(1, settings.BATCH_SIZE // 10):
        _appends_since_check[partition] = count
        return
    _appends_since_check[partition] = 0
    task = asyncio.get_running_loop().create_task(_drain_check(client, partition=partition))
    _background.add(task)
    task.add_done_callback(_background.discard)


# ------------------------------------------------------------------ membership changes, typing, presence


async def membership_changed(client: redis.asyncio.Redis, *, user_ids: list[str], conversation_id: str) -> None:
    """Tell every broker that ``user_ids`` joined or left ``conversation_id``; their open connections start
    or stop receiving its events at once. Call after the change is saved in MongoDB.
    Side effects: drops the cached members, PUBLISHes one control message."""
    await membership_invalidate(client, conversation_id=conversation_id)
    from messaging import selectors  # lazy, like user_conversation_ids below

    await selectors.user_conversations_forget(client, user_ids=list(user_ids), conversation_id=conversation_id)
    await client.publish(frames.CONTROL_CHANNEL,
                         frames.control_members(user_ids=list(user_ids), conversation_id=conversation_id))


def membership_changed_sync(client: Any, *, user_ids: list[str], conversation_id: str) -> None:
    """:func:`membership_changed` for sync code (DRF services) with a sync ``redis.Redis`` client."""
    membership_invalidate_sync(client, conversation_id=conversation_id)
    from messaging import selectors

    selectors.user_conversations_forget(client, user_ids=list(user_ids), conversation_id=conversation_id)
    client.publish(frames.CONTROL_CHANNEL,
                   frames.control_members(user_ids=list(user_ids), conversation_id=conversation_id))


async def typing_signal(client: redis.asyncio.Redis, *, user_id: str, conversation_id: Any) -> None:
    """Tell the conversation's online members that the user is typing. Ephemeral: PUBLISH only, nothing
    stored. Raises ValidationFailed, NotFound."""
    conversation_id = _require_object_id(conversation_id, field="conversation_id")
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    await client.publish(frames.CONTROL_CHANNEL,
                         frames.control_typing(conversation_id=conversation_id, user_id=user_id))


def presence_key(user_id: str) -> str:
    """Sorted set: session id -> expiry (unix seconds) of the user's open connections on every broker."""
    return f"cs:presence:{user_id}"


# Sorted set: user id -> the latest expiry among the user's sessions, for every user announced online whose
# offline has not been announced yet. Its members with a score in the past are users whose last session
# expired without a disconnect (their broker was killed): the sweep announces them offline.
PRESENCE_EXPIRING_KEY = "cs:presence:expiring"

# A session is counted online until its broker stops refreshing it: settings.PRESENCE_TTL_S after a SIGKILL,
# the killed broker's sessions stop counting, and the next sweep of any live broker (presence_sweep, every
# settings.PRESENCE_SWEEP_S) announces the users who had no other session offline.
#
# Invariant kept by every script below: a user is a member of PRESENCE_EXPIRING_KEY iff "online" was
# announced for them and "offline" was not since (or is being announced: a sweep's claim, see
# PRESENCE_CLAIMS_KEY, with the end of its lease as the score); otherwise their score is the latest expiry in
# their zset. The call that adds the member (or takes a claim over) announces online; a disconnect that
# removes it, or the sweep that claimed it, announces offline, so each transition is announced once whichever
# broker, disconnect or sweep observes it (a sweep that dies mid-way is redone: at least once).

# KEYS[1] presence zset, KEYS[2] PRESENCE_EXPIRING_KEY, KEYS[3] PRESENCE_CLAIMS_KEY; ARGV[1] session,
# ARGV[2] now, ARGV[3] expiry, ARGV[4] "1" add / "0" remove, ARGV[5] user id
# -> {live sessions of the user after the change, 1 if this call took the user online (add) or offline
#     (remove) else 0}
# A user under a sweep's claim (their offline is being announced) is offline: a connect takes the claim
# over and announces online; a last disconnect leaves the offline to the claiming sweep.
_PRESENCE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local removed = 0
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
else
  removed = redis.call('ZREM', KEYS[1], ARGV[1])
end
local n = redis.call('ZCARD', KEYS[1])
local claimed
if ARGV[4] == '1' then
  claimed = redis.call('HDEL', KEYS[3], ARGV[5])
else
  claimed = redis.call('HEXISTS', KEYS[3], ARGV[5])
end
local flip = 0
if n > 0 then
  local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('EXPIRE', KEYS[1], math.max(1, tonumber(top[2]) - tonumber(ARGV[2])))
  if (redis.call('ZADD', KEYS[2], top[2], ARGV[5]) == 1 or claimed == 1) and ARGV[4] == '1' then flip = 1 end
elseif claimed == 0 and (redis.call('ZREM', KEYS[2], ARGV[5]) == 1 or removed == 1) then
  -- removed == 1 without an index entry: a session counted before the index existed (an upgrade).
  flip = 1
end
return {n, flip}
"""

# A broker's heartbeat for many users in one call: KEYS[1] PRESENCE_EXPIRING_KEY, KEYS[2..] the users'
# presence zsets; ARGV[1] now, ARGV[2] expiry, then per user (in KEYS order) its id, its count of sessions and
# those session ids -> {user, session, user, session, ...} of the sessions that were not in their zset. Only
# present sessions are refreshed: one missing was disconnected meanwhile (the refresh raced its disconnect;
# re-adding it would count a closed connection), or it expired and was swept while this broker stalled past
# the TTL (the hub re-adds it with presence_connect if its connection is still open). One call per slice of
# sessions, not one per user: redis-py's cost per command was most of an idle broker's CPU (py-spy at 5,000
# idle connections, docs/benchmarks.md). REDIS_URL is one Redis (docs/adr/0022), so the keys may be anywhere.
_PRESENCE_REFRESH_LUA = """
local now, expiry = ARGV[1], ARGV[2]
local at = 3
local missing = {}
for k = 2, #KEYS do
  local user, n = ARGV[at], tonumber(ARGV[at + 1])
  at = at + 2
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
  for j = at, at + n - 1 do
    if redis.call('ZSCORE', KEYS[k], ARGV[j]) then
      redis.call('ZADD', KEYS[k], expiry, ARGV[j])
    else
      table.insert(missing, user)
      table.insert(missing, ARGV[j])
    end
  end
  at = at + n
  local top = redis.call('ZRANGE', KEYS[k], -1, -1, 'WITHSCORES')
  if top[1] then
    redis.call('EXPIRE', KEYS[k], math.max(1, tonumber(top[2]) - tonumber(now)))
    redis.call('ZADD', KEYS[1], top[2], user)
  end
end
return missing
"""

# Hash: user id -> the moment their last session expired, for users a sweep has claimed and not yet
# released (their offline is being announced). The claim also moves the user's index score to the end of
# a lease (PRESENCE_CLAIM_LEASE_S): a sweep that dies before it announced and released is redone by a later
# sweep once the lease has run out, so an offline is announced at least once.
PRESENCE_CLAIMS_KEY = "cs:presence:claims"
# Long enough for a claim's users.status write and its PUBLISH on a loaded FerretDB (a few seconds at the
# worst of a connect wave); short enough that a lost announcement is redone within a minute of the crash.
PRESENCE_CLAIM_LEASE_S = 30

# The sweep's claim of one user. KEYS as above; ARGV[1] user id, ARGV[2] now, ARGV[3] end of the lease
# -> false, or the moment (unix seconds) the user's last session expired when THIS call claimed them.
# Atomic: of several brokers sweeping the same user, only the first moves the index entry past now; a user
# with a live session (reconnected, or refreshed meanwhile) keeps it, with their new latest expiry; a claim
# whose lease ran out (its sweep died) is taken again, with the same moment.
_PRESENCE_CLAIM_LUA = """
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not at then return false end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if top[1] then
  redis.call('ZADD', KEYS[2], top[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  return false
end
if tonumber(at) > tonumber(ARGV[2]) then return false end
local before = redis.call('HGET', KEYS[3], ARGV[1])
if before then at = before end
redis.call('HSET', KEYS[3], ARGV[1], at)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return at
"""

# After the announcement: KEYS[1] PRESENCE_EXPIRING_KEY, KEYS[2] PRESENCE_CLAIMS_KEY; ARGV[1] user id,
# ARGV[2] the claimed moment -> 1 if the claim was still this one (released now: the user is offline), 0 if a
# connect took it over meanwhile (the user is online again and keeps the index entry).
_PRESENCE_RELEASE_LUA = """
local claimed = redis.call('HGET', KEYS[2], ARGV[1])
if not claimed or tonumber(claimed) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


# users.status/last_seen writes run on their own two threads, not on the default pool shared with the reads
# that answer clients (membership misses, resume): a wave of connects (a broker restart, a benchmark) queues
# a write per connection, and those must never delay a message's membership check behind them.
_presence_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="presence")


def _user_seen(user_id: str, status: str) -> None:
    from storage.documents import User

    User.objects(id=user_id).update_one(set__status=status, set__last_seen=datetime.now(UTC))


def _user_expired(user_id: str, at: datetime) -> list[str]:
    """Mark a user whose last session expired offline, ``last_seen`` = ``at``, unless a newer connect
    already wrote its own ``last_seen`` (that write may run first on the pool's other thread). Returns the
    user's conversation ids (for the announcement). Blocking (MongoDB)."""
    from mongoengine.queryset.visitor import Q

    from messaging import selectors
    from storage.documents import User

    User.objects(Q(id=user_id) & (Q(last_seen=None) | Q(last_seen__lte=at))).update_one(
        set__status="offline", set__last_seen=at)
    return selectors.user_conversation_ids(user_id=user_id)


def _presence_keys(user_id: str) -> list[str]:
    return [presence_key(user_id), PRESENCE_EXPIRING_KEY, PRESENCE_CLAIMS_KEY]


async def _presence_transition(client: redis.asyncio.Redis, *, user_id: str, session_id: str, add: bool,
                               now: int | None = None) -> tuple[int, bool]:
    """Add or remove one session (``now``: the clock, or a test's). Returns the user's live sessions after
    the change and whether this call took the user online (add) or offline (remove)."""
    now = int(time.time()) if now is None else now
    script = client.register_script(_PRESENCE_LUA)
    live, flip = await script(keys=_presence_keys(user_id),
                              args=[session_id, now, now + int(settings.PRESENCE_TTL_S), "1" if add else "0",
                                    user_id])
    return int(live), bool(int(flip))


async def _presence_change(client: redis.asyncio.Redis, *, user_id: str, session_id: str, add: bool) -> int:
    """Add or remove one session; returns the user's live sessions after the change."""
    return (await _presence_transition(client, user_id=user_id, session_id=session_id, add=add))[0]


async def presence_connect(client: redis.asyncio.Redis, *, user_id: str, session_id: str,
                           conversation_ids: list[str]) -> bool:
    """Count a new connection of the user; if the user was not online (no live session on any broker, and
    offline announced), mark them online (``users.status``/``last_seen``) and announce ``presence online``
    to their conversations. Returns whether the user came online."""
    if not (await _presence_transition(client, user_id=user_id, session_id=session_id, add=True))[1]:
        return False
    await asyncio.get_running_loop().run_in_executor(_presence_pool, _user_seen, user_id, "online")
    await client.publish(frames.CONTROL_CHANNEL, frames.control_presence(
        user_id=user_id, status="online", conversation_ids=conversation_ids))
    return True


async def presence_disconnect(client: redis.asyncio.Redis, *, user_id: str, session_id: str,
                              conversation_ids: list[str]) -> bool:
    """Forget a closed connection; if it was the user's last live one, mark the user offline with
    ``last_seen`` now and announce ``presence offline``. Returns whether the user went offline."""
    if not (await _presence_transition(client, user_id=user_id, session_id=session_id, add=False))[1]:
        return False
    await asyncio.get_running_loop().run_in_executor(_presence_pool, _user_seen, user_id, "offline")
    await client.publish(frames.CONTROL_CHANNEL, frames.control_presence(
        user_id=user_id, status="offline", conversation_ids=conversation_ids))
    return True


async def presence_refresh(client: redis.asyncio.Redis, *, sessions: list[tuple[str, str]],
                           now: int | None = None) -> list[tuple[str, str]]:
    """Push the expiry of live ``(user_id, session_id)`` sessions forward (a broker's periodic heartbeat).
    Returns the sessions that were no longer counted (see ``_PRESENCE_REFRESH_LUA``); they are not re-added."""
    if not sessions:
        return []
    by_user: dict[str, list[str]] = {}
    for user_id, session_id in sessions:
        by_user.setdefault(user_id, []).append(session_id)
    now = int(time.time()) if now is None else now
    expiry = now + int(settings.PRESENCE_TTL_S)
    args: list[str | int] = [now, expiry]
    for user_id, session_ids in by_user.items():
        args += [user_id, len(session_ids), *session_ids]
    script = client.register_script(_PRESENCE_REFRESH_LUA)
    flat = [_s(v) for v in await script(keys=[PRESENCE_EXPIRING_KEY, *map(presence_key, by_user)], args=args)]
    return list(zip(flat[0::2], flat[1::2], strict=True))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def presence_claim(client: redis.asyncio.Redis, *, user_id: str, now: int | None = None) -> int | None:
    """Claim the announcement of the user's offline if their last session expired (``now`` defaults to the
    clock). Returns the moment it expired (unix seconds) to one caller, across brokers, per lease
    (PRESENCE_CLAIM_LEASE_S); None to every other caller and whenever the user has a live session. The
    caller must then announce the offline and :func:`presence_release` the claim; if it does not (it died),
    the claim is handed out again once the lease has run out."""
    now = int(time.time()) if now is None else now
    script = client.register_script(_PRESENCE_CLAIM_LUA)
    at = await script(keys=_presence_keys(user_id), args=[user_id, now, now + PRESENCE_CLAIM_LEASE_S])
    return None if at is None else int(float(at))


async def presence_claimed(client: redis.asyncio.Redis, *, user_id: str, at: int) -> bool:
    """Whether the claim of moment ``at`` still stands (no connect of the user took it over). Read-only."""
    raw = await client.hget(PRESENCE_CLAIMS_KEY, user_id)
    return raw is not None and int(float(raw)) == at


async def presence_release(client: redis.asyncio.Redis, *, user_id: str, at: int) -> bool:
    """End a claim (of moment ``at``) once its offline is announced: the user leaves the index. False if a
    connect took the claim over meanwhile (the user is online again; nothing is changed)."""
    script = client.register_script(_PRESENCE_RELEASE_LUA)
    return bool(await script(keys=[PRESENCE_EXPIRING_KEY, PRESENCE_CLAIMS_KEY], args=[user_id, at]))


async def presence_sweep(client: redis.asyncio.Redis, *, limit: int | None = None,
                         now: int | None = None) -> tuple[list[str], int]:
    """One pass of a broker's sweep: announce ``presence offline`` for users whose last session expired
    without a disconnect (their broker was killed) and set their ``users.status`` offline with ``last_seen``
    = the moment the last session expired. At most ``limit`` (settings.PRESENCE_SWEEP_BATCH) users are
    looked at; the rest are left for the next pass. Safe to run on every broker at once: each user is
    announced by the one broker that claims them. Returns (users this call announced, users looked at).

    At least once: a broker killed between a claim and its release, or a MongoDB failure then, leaves the
    claim to run out, and a later sweep (of any broker) announces it (again, if the first got as far as
    the PUBLISH). A user whose device came back meanwhile is not announced offline: that connect took the
    claim over and announced online."""
    now = int(time.time()) if now is None else now
    due: Any = await client.zrangebyscore(PRESENCE_EXPIRING_KEY, "-inf", now, start=0,
                                     num=int(settings.PRESENCE_SWEEP_BATCH if limit is None else limit))
    gone: list[str] = []
    loop = asyncio.get_running_loop()
    for raw in due:
        user_id = _s(raw)
        at = await presence_claim(client, user_id=user_id, now=now)
        if at is None:
            continue
        try:
            conversation_ids = await loop.run_in_executor(
                _presence_pool, _user_expired, user_id, datetime.fromtimestamp(min(at, now), UTC))
            if not await presence_claimed(client, user_id=user_id, at=at):
                continue  # a device came back while users.status was written: its connect announced online
            await client.publish(frames.CONTROL_CHANNEL, frames.control_presence(
                user_id=user_id, status="offline", conversation_ids=conversation_ids))
            await presence_release(client, user_id=user_id, at=at)
        except Exception:
            logger.exception("presence sweep: announcing user %s offline failed; a later sweep retries once "
                             "the claim's lease (%ss) has run out", user_id, PRESENCE_CLAIM_LEASE_S)
            continue
        gone.append(user_id)
    return gone, len(due)


async def presence_online(client: redis.asyncio.Redis, *, user_id: str) -> bool:
    """Whether the user has a live connection on any broker. Read-only."""
    return bool(await client.zcount(presence_key(user_id), int(time.time()), "+inf"))
