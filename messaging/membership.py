"""Who is in a conversation, as the write path and the brokers ask it: a Redis cache in front of MongoDB, with
an in-process copy on brokers, and the invalidation every membership change must call.

The write path (``messaging/services.py``) authorizes every event with :func:`membership_require`; the REST
services call :func:`membership_changed_sync` after saving a change. A refill never resurrects a removed
member: each invalidation bumps a generation, and a refill writes only if the generation it read before its
MongoDB read is unchanged (docs/architecture.md, membership).
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio
from asgiref.sync import sync_to_async

from core.errors import NotFound
from core.keys import (
    conversation_card_key,
    membership_generation_key,
    membership_key,
    user_conversations_key,
    user_conversations_version_key,
)
from messaging import frames, selectors
from messaging.conversation_index import user_conversations_record
from messaging.streams import append_client_lean

# A membership answer is cached this long. The API's membership changes write the new set at once
# (membership_invalidate_sync), so the TTL is not what keeps it fresh: it bounds the staleness after a write
# that bypassed the services (a manual database edit) and lets the sets of conversations quiet for a month
# leave Redis. 30 days, not an hour: with an hour, the first send after an hour of quiet read MongoDB on the
# hot path (~350 ms under load, issue 16). A set of member ids costs ~160 bytes + ~64 per member on Redis 7.0
# (MEMORY USAGE: 288 B for a 1:1 chat, 16.5 KB for a full group of 256; docs/architecture.md, membership).
MEMBERSHIP_TTL_S = 30 * 24 * 3600
# "Not a conversation" answers are cached briefly: enough to absorb a client hammering a bad id.
MEMBERSHIP_MISS_TTL_S = 30
_NO_MEMBERS = "-"  # the cached set of a conversation that does not exist


def _members_query(conversation_id: str) -> list[str] | None:
    from core.documents import Conversation

    conversation = Conversation.objects(id=conversation_id).only("members").first()
    if conversation is None:
        return None
    return [str(m) for m in conversation.members]




def _members_from_db(conversation_id: str) -> list[str] | None:
    """The hot path's read on a miss (in a worker thread). Its own name, apart from the write path's read
    (membership_refill_sync), so a test can make it fail and prove a warmed send never reaches it."""
    return _members_query(conversation_id)


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


# The refill of the Redis cache after a MongoDB read. KEYS[1] members set, KEYS[2] generation;
# ARGV[1] the generation read before the MongoDB read ("" if none), ARGV[2] TTL, ARGV[3..] the members read
# -> 1 if written, 0 if an invalidation came in between (what was read may predate the change: not cached).
_MEMBERS_REFILL_LUA = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SADD', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# The generation key outlives the longest MongoDB read by far (it only has to last from an invalidation to
# the end of a refill that read before it); an hour, and every invalidation sets it again.
MEMBERSHIP_GENERATION_TTL_S = 3600


async def _conversation_members_shared(client: redis.asyncio.Redis, *, conversation_id: str) -> set[str] | None:
    key = membership_key(conversation_id)
    # On a broker, over the append batcher's one pipelined connection (docs/adr/0040) when it has one: the
    # first sends of 1,000 conversations at once each took a connection of redis-py's pool, which grew by
    # hundreds (a connect and a handshake each, redis-py reading its package metadata from disk per
    # connection; a connect timed out on a loaded machine), ~4 % of a broker's samples at 10,000 connections
    # as fast as acked (docs/benchmarks.md, "Issue 16: 10,000 connections as fast as acked").
    lean = append_client_lean(client)
    cached = await (lean.call("SMEMBERS", key) if lean is not None else client.smembers(key))
    if cached:
        members = {m.decode() if isinstance(m, bytes) else str(m) for m in cached}
        return None if members == {_NO_MEMBERS} else members - {_NO_MEMBERS}
    # Read before MongoDB: a removal whose invalidation lands between this and the refill bumps it, so the
    # refill (of what MongoDB said before the removal, perhaps) is dropped instead of cached for an hour.
    generation = await client.get(membership_generation_key(conversation_id))
    found = await sync_to_async(_members_from_db, thread_sensitive=False)(conversation_id)
    script = client.register_script(_MEMBERS_REFILL_LUA)
    await script(keys=[key, membership_generation_key(conversation_id)],
                 args=[b"" if generation is None else generation,
                       MEMBERSHIP_TTL_S if found is not None else MEMBERSHIP_MISS_TTL_S, *(found or [_NO_MEMBERS])])
    return set(found) if found is not None else None


async def membership_require(client: redis.asyncio.Redis, *, user_id: str, conversation_id: str) -> None:
    """Raise NotFound for an unknown conversation and for one the user is not in (no existence leak)."""
    if _local_members is not None:
        # The hot path of every send on a broker: the in-process answer, without the copy of the member set
        # conversation_members hands its callers (a group of 256 is a 256-item copy per message).
        hit = _local_members.get(conversation_id)
        if hit is not None and hit[0] > time.monotonic():
            if hit[1] is None or user_id not in hit[1]:
                raise NotFound("no such conversation", details={"conversation_id": conversation_id})
            return
    members = await conversation_members(client, conversation_id=conversation_id)
    if members is None or user_id not in members:
        raise NotFound("no such conversation", details={"conversation_id": conversation_id})


def _membership_invalidate_queue(pipe: Any, *, conversation_id: str) -> None:
    generation = membership_generation_key(conversation_id)
    pipe.incr(generation)
    pipe.expire(generation, MEMBERSHIP_GENERATION_TTL_S)
    pipe.delete(membership_key(conversation_id))


def membership_refill_sync(client: Any, *, conversation_id: str, generation: bytes | str | int | None) -> \
        list[str] | None:
    """Read the conversation's members from MongoDB and cache them, unless the generation moved from
    ``generation`` (read by the caller before this) meanwhile: then an invalidation came in after a read that
    may predate its change, and nothing is written (the next reader refills). Returns what MongoDB said (None:
    no such conversation). For sync code with a sync ``redis.Redis`` client; side effect: the cached set."""
    found = _members_query(conversation_id)
    client.eval(_MEMBERS_REFILL_LUA, 2, membership_key(conversation_id), membership_generation_key(conversation_id),
                b"" if generation is None else generation,
                MEMBERSHIP_TTL_S if found is not None else MEMBERSHIP_MISS_TTL_S, *(found or [_NO_MEMBERS]))
    return found


def membership_invalidate_sync(client: Any, *, conversation_id: str) -> None:
    """After a change of the conversation's members in MongoDB: bump the generation and drop the cached set
    (one MULTI), then write the new set read from MongoDB after the bump, so the next send finds it in Redis
    and reads no MongoDB (issue 16's cold start); then PUBLISH the invalidation to the brokers. The write is
    the refill's compare-and-set on the generation this bump returned, not part of the MULTI: a set read
    before the bump could be older than a concurrent change whose own write landed first, and would overwrite
    it for MEMBERSHIP_TTL_S; with the compare-and-set, of two racing changes only the later bump's write can
    land (or none, and the next send refills). For sync code (DRF services) with a sync ``redis.Redis``."""
    with client.pipeline(transaction=True) as pipe:
        _membership_invalidate_queue(pipe, conversation_id=conversation_id)
        generation = pipe.execute()[0]
    membership_refill_sync(client, conversation_id=conversation_id, generation=generation)
    client.publish(frames.CONTROL_CHANNEL, frames.control_invalidate(conversation_id=conversation_id))


# ------------------------------------------------------------------ membership changes


# The members refill of a membership change, which also moves the conversation into or out of each changed
# user's cached conversation ids (core.keys.user_conversations_key), so a connect after the change
# reads Redis, not the store (issue 16, docs/adr/0039). KEYS[1] members set, KEYS[2] generation, then per
# changed user their ids set and its version key; ARGV[1] the generation the change's bump returned, ARGV[2]
# the set's TTL, ARGV[3] the conversation id, ARGV[4] the ids sets' TTL, ARGV[5] n users, ARGV[6..5+n] their
# ids, ARGV[6+n..] the members read after the bump -> 1 if written, 0 if a later change bumped the generation
# meanwhile (then nothing is written: the caller drops the users' sets instead, and the later change writes
# its own). Under the generation's compare-and-set, so of racing changes only the latest one's read, which
# follows every earlier change's write, lands. A user whose set is not cached is left to the fill on their
# next read (a partial set must never be cached); every version moves, so a fill racing this is not stored.
_MEMBERS_CHANGED_LUA = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[5])
redis.call('DEL', KEYS[1])
redis.call('SADD', KEYS[1], unpack(ARGV, 6 + n))
redis.call('EXPIRE', KEYS[1], ARGV[2])
local member = {}
for i = 6 + n, #ARGV do member[ARGV[i]] = true end
for i = 1, n do
  local key, vkey = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  redis.call('INCR', vkey)
  redis.call('EXPIRE', vkey, 2 * tonumber(ARGV[4]))
  if redis.call('EXISTS', key) == 1 then
    if member[ARGV[5 + i]] then
      redis.call('SADD', key, ARGV[3])
      redis.call('SREM', key, '-')
    elseif redis.call('SREM', key, ARGV[3]) == 1 and redis.call('EXISTS', key) == 0 then
      redis.call('SADD', key, '-')
      redis.call('EXPIRE', key, ARGV[4])
    end
  end
end
return 1
"""


def membership_changed_sync(client: Any, *, user_ids: list[str], conversation_id: str) -> None:
    """Tell every broker that ``user_ids`` joined or left ``conversation_id``; their open connections start
    or stop receiving its events at once. Call after the change is saved in MongoDB (the REST services do).
    Side effects: bumps the members' generation and rewrites the cached members from MongoDB (one read by
    ``_id``), adds or removes the conversation in each user's cached conversation ids (or drops them, if a
    later change raced this one), writes each user's ``user_conversations`` document (docs/adr/0043; their
    versions bumped before it, and again after it), drops the conversation's card (docs/adr/0028), PUBLISHes
    the invalidation and one control message."""
    users = list(user_ids)
    with client.pipeline(transaction=True) as pipe:
        _membership_invalidate_queue(pipe, conversation_id=conversation_id)
        for uid in users:  # before the documents' writes: a rebuild racing them sees the version move
            pipe.incr(user_conversations_version_key(uid))
            pipe.expire(user_conversations_version_key(uid), 2 * selectors.USER_CONVERSATIONS_TTL_S)
        generation = pipe.execute()[0]
    found = _members_query(conversation_id)
    user_conversations_record(user_ids=users, conversation_id=conversation_id, members=found,
                              members_read=lambda: _members_query(conversation_id))
    keys = [membership_key(conversation_id), membership_generation_key(conversation_id)]
    for uid in users:
        keys += [user_conversations_key(uid), user_conversations_version_key(uid)]
    written = client.eval(_MEMBERS_CHANGED_LUA, len(keys), *keys, generation,
                          MEMBERSHIP_TTL_S if found is not None else MEMBERSHIP_MISS_TTL_S, conversation_id,
                          selectors.USER_CONVERSATIONS_TTL_S, len(users), *users, *(found or [_NO_MEMBERS]))
    if written:
        client.delete(conversation_card_key(conversation_id))
    else:
        selectors.user_conversations_forget(client, user_ids=users, conversation_id=conversation_id)
    client.publish(frames.CONTROL_CHANNEL, frames.control_invalidate(conversation_id=conversation_id))
    client.publish(frames.CONTROL_CHANNEL,
                   frames.control_members(user_ids=users, conversation_id=conversation_id))
