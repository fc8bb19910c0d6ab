"""Presence: who has a live WebSocket session on some broker, announced once per online/offline transition.

Brokers call :func:`presence_connect` / :func:`presence_disconnect` for each connection, refresh their sessions
(:func:`presence_refresh`) and sweep the sessions of killed brokers (:func:`presence_sweep`); REST reads
:func:`presence_key` for the members list and lays :func:`presence_shown` over the users' stored ``status`` and
``last_seen``. Keys live on REDIS_URL (docs/adr/0022).

Redis is the truth for online/offline (docs/adr/0051): a user coming online writes nothing to the store, only
``PRESENCE_SINCE_KEY`` (the moment) in its presence script; going offline (a last disconnect, or the sweep of a
killed broker's sessions) writes ``status`` offline and ``last_seen`` to MongoDB, from a small thread pool,
never on the event loop. Every REST read of a user's status goes through :func:`presence_shown`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from django.conf import settings

from core.clients import sync_redis
from core.keys import PRESENCE_CLAIMS_KEY, PRESENCE_EXPIRING_KEY, PRESENCE_SINCE_KEY, presence_key, user_card_key
from core.values import as_str, iso_ms
from messaging import frames
from messaging.resp import RespClient, script_run

logger = logging.getLogger(__name__)

# The keys (core/keys.py, on REDIS_URL): presence_key(user) (sessions -> expiry), PRESENCE_EXPIRING_KEY (user ->
# latest expiry, for every user announced online and not yet offline), PRESENCE_CLAIMS_KEY (the sweep's claims),
# PRESENCE_SINCE_KEY (user -> "+<ms>" online since / "-<ms>" offline since, while the store does not say so).

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

# KEYS[1] presence zset, KEYS[2] PRESENCE_EXPIRING_KEY, KEYS[3] PRESENCE_CLAIMS_KEY, KEYS[4] PRESENCE_SINCE_KEY;
# ARGV[1] session, ARGV[2] now, ARGV[3] expiry, ARGV[4] "1" add / "0" remove, ARGV[5] user id, ARGV[6] now in
# milliseconds (the moment PRESENCE_SINCE_KEY records for the transition, if this call makes one)
# -> {live sessions of the user after the change, 1 if this call took the user online (add) or offline
#     (remove) else 0}
# A user under a sweep's claim (their offline is being announced) is offline: a connect takes the claim
# over and announces online; a last disconnect leaves the offline to the claiming sweep.
# The transition's moment goes to PRESENCE_SINCE_KEY in the same call, so a read right after it (REST) shows it.
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
  if (redis.call('ZADD', KEYS[2], top[2], ARGV[5]) == 1 or claimed == 1) and ARGV[4] == '1' then
    flip = 1
    redis.call('HSET', KEYS[4], ARGV[5], '+' .. ARGV[6])
  end
elseif claimed == 0 and (redis.call('ZREM', KEYS[2], ARGV[5]) == 1 or removed == 1) then
  -- removed == 1 without an index entry: a session counted before the index existed (an upgrade).
  flip = 1
  redis.call('HSET', KEYS[4], ARGV[5], '-' .. ARGV[6])
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

# PRESENCE_CLAIMS_KEY: user id -> the moment their last session expired, for users a sweep has claimed and not
# yet released (their offline is being announced). The claim also moves the user's index score to the end of
# a lease (PRESENCE_CLAIM_LEASE_S): a sweep that dies before it announced and released is redone by a later
# sweep once the lease has run out, so an offline is announced at least once.
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

# After the announcement: KEYS[1] PRESENCE_EXPIRING_KEY, KEYS[2] PRESENCE_CLAIMS_KEY, KEYS[3] PRESENCE_SINCE_KEY;
# ARGV[1] user id, ARGV[2] the claimed moment -> 1 if the claim was still this one (released now: the user is
# offline, and the store says so: their "online since" is dropped), 0 if a connect took it over meanwhile (the
# user is online again and keeps the index entry and its new "online since").
_PRESENCE_RELEASE_LUA = """
local claimed = redis.call('HGET', KEYS[2], ARGV[1])
if not claimed or tonumber(claimed) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# Once a last disconnect's offline is in the store: KEYS[1] PRESENCE_SINCE_KEY; ARGV user id, "-<ms>" pairs ->
# each entry still holding that value is dropped (one a reconnect replaced meanwhile stays).
_PRESENCE_SINCE_DROP_LUA = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 0
"""

# What REST shows of users: KEYS[1] PRESENCE_EXPIRING_KEY, KEYS[2] PRESENCE_CLAIMS_KEY, KEYS[3]
# PRESENCE_SINCE_KEY, KEYS[4..] the users' presence zsets; ARGV[1] now (unix seconds), ARGV[2..] the users' ids
# (in KEYS order) -> per user {1 if a session is live now else 0, their PRESENCE_SINCE_KEY entry or false, the
# moment (unix seconds) their last session expired, if it did and no disconnect recorded it, or false}.
# Read-only; one round trip for a page of users.
_PRESENCE_SHOWN_LUA = """
local out = {}
for k = 4, #KEYS do
  local user = ARGV[k - 2]
  local live = redis.call('ZCOUNT', KEYS[k], ARGV[1], '+inf')
  local gone = false
  if live == 0 then
    gone = redis.call('HGET', KEYS[2], user) or redis.call('ZSCORE', KEYS[1], user)
  end
  table.insert(out, {live > 0 and 1 or 0, redis.call('HGET', KEYS[3], user), gone})
end
return out
"""


def user_cards_forget(client: Any, *, user_ids: list[str]) -> Any:
    """Drop the users' cached cards (``api.conversation_list``: username, status, last_seen), which live a day
    and are not re-read before: ``api.accounts``' status change and account removal call this after their store
    write, so the next list reads the new values; a fill that read the store before the write holds a lease this
    drop ends, and writes nothing (docs/adr/0050). This module's offline writes, one per user's last disconnect,
    rewrite the cards instead (:func:`user_cards_rewrite`, docs/adr/0060). ``client``: a sync REDIS_URL client;
    one DEL. Side effect: deletes keys."""
    return client.delete(*map(user_card_key, user_ids)) if user_ids else 0


# A status write's card update (docs/adr/0060): KEYS the users' card keys; ARGV per key the value it held before the
# store write ('' none) and the card to write ('': none) -> where the key still holds that value and a card is given,
# the card is written (its TTL kept); anywhere else a value now held is dropped (ADR 0050's drop: a fill's lease, a
# card another writer or fill set meanwhile, which may predate this write).
_USER_CARDS_REWRITE_LUA = """
for i = 1, #KEYS do
  local now = redis.call('GET', KEYS[i]) or ''
  local before, card = ARGV[2 * i - 1], ARGV[2 * i]
  if card ~= '' and now == before then
    redis.call('SET', KEYS[i], card, 'KEEPTTL')
  elseif now ~= '' then
    redis.call('DEL', KEYS[i])
  end
end
return 0
"""


def user_cards_read(client: Any, *, user_ids: list[str]) -> list[bytes | None]:
    """The users' cached cards as they are now (one MGET), read *before* a store write of their status, for
    :func:`user_cards_rewrite` after it. ``client``: a sync REDIS_URL client. Read-only."""
    return list(client.mget([user_card_key(u) for u in user_ids])) if user_ids else []


def user_cards_rewrite(client: Any, *, before: dict[str, bytes | None], status: str,
                       last_seen: dict[str, datetime]) -> None:
    """After a store write that set ``status`` and ``last_seen[user]`` for each user of ``before`` (their card
    keys' values read just before that write, :func:`user_cards_read`): each user's cached card gets the new
    status and last_seen where its key still holds what was read (nothing else wrote it since), and is dropped
    otherwise, as :func:`user_cards_forget` would (docs/adr/0060). So a peer's disconnect leaves the lists of its
    contacts warm: before, each of them read the peer by ``_id`` once (1-3 ms at 1M messages on the default
    store). Precondition: the store write is the one that set these values (a guarded write that matched
    nothing must not call this). One script call. Side effect: writes or deletes keys."""
    if not before:
        return
    args: list[bytes | str] = []
    for user_id, raw in before.items():
        card = ""  # nothing cached, a lease, a value this code cannot read: dropped, as ADR 0050's writers do
        if raw is not None and raw.startswith(b"{"):
            try:
                shown = json.loads(raw)
            except ValueError:
                shown = None
            if isinstance(shown, dict):
                shown.update(status=status, last_seen=iso_ms(last_seen[user_id]))
                card = json.dumps(shown)
        args += [raw or b"", card]
    client.eval(_USER_CARDS_REWRITE_LUA, len(before), *map(user_card_key, before), *args)


# users.status/last_seen writes run on their own two threads, not on the default pool shared with the reads
# that answer clients (membership misses, resume): a wave of disconnects (a broker restart, a benchmark's end)
# queues a write per user, and those must never delay a message's membership check behind them.
_presence_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="presence")


def _users_offline(offline: dict[str, int]) -> None:
    """Set ``status`` offline and ``last_seen`` for ``offline`` (user id -> the moment of their last disconnect,
    unix milliseconds, as their PRESENCE_SINCE_KEY entry says): one round trip, one update by ``_id`` each
    (FerretDB v1 pushes ``_id`` equality down; one ``$in`` update over a batch scanned the collection and cost
    FerretDB 5x the CPU, bench/connects.py); then their cached cards rewritten (``user_cards_rewrite``) and their
    entries, where still the same, dropped (the store says it now). Blocking (MongoDB, Redis)."""
    from bson import ObjectId
    from pymongo import UpdateOne

    from core.documents import User
    from storage.writes import UPDATE_STATEMENTS_MAX

    valid = {u: at for u, at in offline.items() if ObjectId.is_valid(u)}
    seen = {u: datetime.fromtimestamp(at / 1000, UTC) for u, at in valid.items()}
    client = sync_redis()
    cards = dict(zip(valid, user_cards_read(client, user_ids=list(valid)), strict=True))
    ops = [UpdateOne({"_id": ObjectId(u)}, {"$set": {"status": "offline", "last_seen": seen[u]}}) for u in valid]
    # At most UPDATE_STATEMENTS_MAX statements per command: FerretDB v1 holds a pooled connection per statement.
    for start in range(0, len(ops), UPDATE_STATEMENTS_MAX):
        User._get_collection().bulk_write(ops[start:start + UPDATE_STATEMENTS_MAX], ordered=False)
    user_cards_rewrite(client, before=cards, status="offline", last_seen=seen)
    if offline:
        client.eval(_PRESENCE_SINCE_DROP_LUA, 1, PRESENCE_SINCE_KEY,
                    *(v for u, at in offline.items() for v in (u, f"-{at}")))


# Seconds an offline write waits for others to share its round trip. A wave of disconnects queued one write per
# user on two threads, each a round trip (and a thread hop) of its own. 50 ms is invisible next to the
# announcement it precedes, and gathers ~25 users at 500 disconnects/s.
STATUS_FLUSH_S = 0.05


class StatusWriter:
    """Writes users' offline ``status``/``last_seen`` in batches on the presence thread pool, the latest moment
    per user wins. One per event loop."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, list[asyncio.Future[None]]]] = {}
        self.flusher: asyncio.Task[None] | None = None

    async def write(self, user_id: str, at_ms: int) -> None:
        """Return once a statement that set the user offline at ``at_ms`` (or a later moment) has run; raise
        what it raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        before, waiting = self.pending.get(user_id, (0, []))
        waiting.append(future)
        self.pending[user_id] = (max(before, at_ms), waiting)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        await future

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            await asyncio.sleep(STATUS_FLUSH_S)
            batch, self.pending = self.pending, {}
            error: BaseException | None = None
            try:
                await loop.run_in_executor(_presence_pool, _users_offline,
                                           {user_id: at for user_id, (at, _) in batch.items()})
            except Exception as exc:
                error = exc
            for _, waiting in batch.values():
                for future in waiting:
                    if not future.done():
                        if error is None:
                            future.set_result(None)
                        else:
                            future.set_exception(error)


_writers: dict[asyncio.AbstractEventLoop, StatusWriter] = {}


def _offline_write(user_id: str, at_ms: int) -> Any:
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        for old in [other for other in _writers if other.is_closed()]:
            del _writers[old]
        writer = _writers[loop] = StatusWriter()
    return writer.write(user_id, at_ms)


def _user_expired(user_id: str, at: datetime) -> list[str]:
    """Mark a user whose last session expired offline, ``last_seen`` = ``at``, unless the store's ``last_seen``
    is newer (a status the user chose since, which reads show too: ``status_shown``); if it wrote, the user's
    cached card is rewritten (``user_cards_rewrite``). Returns the user's conversation ids (for the
    announcement). Blocking (MongoDB, Redis)."""
    from mongoengine.queryset.visitor import Q

    from core.documents import User
    from messaging import selectors

    client = sync_redis()
    cards = dict(zip([user_id], user_cards_read(client, user_ids=[user_id]), strict=True))
    if User.objects(Q(id=user_id) & (Q(last_seen=None) | Q(last_seen__lte=at))).update_one(
            set__status="offline", set__last_seen=at):
        user_cards_rewrite(client, before=cards, status="offline", last_seen={user_id: at})
    return selectors.user_conversation_ids(user_id=user_id)


def _presence_keys(user_id: str) -> list[str]:
    return [presence_key(user_id), PRESENCE_EXPIRING_KEY, PRESENCE_CLAIMS_KEY]


async def _presence_transition(client: redis.asyncio.Redis, *, user_id: str, session_id: str, add: bool,
                               now: int | None = None, at_ms: int | None = None,
                               resp: RespClient | None = None) -> tuple[int, bool]:
    """Add or remove one session at ``at_ms`` (unix milliseconds; else ``now``, unix seconds, a test's clock;
    else the clock. ``resp``: a pipelined connection to the same Redis, else ``client``). Returns the user's
    live sessions after the change and whether this call took the user online (add) or offline (remove)."""
    if at_ms is None:
        at_ms = int(time.time() * 1000) if now is None else now * 1000
    now = at_ms // 1000
    live, flip = await script_run(resp, client.register_script(_PRESENCE_LUA),
                                  keys=[*_presence_keys(user_id), PRESENCE_SINCE_KEY],
                                  args=[session_id, now, now + int(settings.PRESENCE_TTL_S), "1" if add else "0",
                                        user_id, at_ms])
    return int(live), bool(int(flip))


async def _announce(client: redis.asyncio.Redis, resp: RespClient | None, *, user_id: str, status: str,
                    conversation_ids: list[str]) -> None:
    message = frames.control_presence(user_id=user_id, status=status, conversation_ids=conversation_ids)
    if resp is None:
        await client.publish(frames.CONTROL_CHANNEL, message)
    else:
        await resp.call("PUBLISH", frames.CONTROL_CHANNEL, message)


async def presence_connect(client: redis.asyncio.Redis, *, user_id: str, session_id: str,
                           conversation_ids: list[str], resp: RespClient | None = None) -> bool:
    """Count a new connection of the user; if the user was not online (no live session on any broker, and
    offline announced), record the moment they came online (PRESENCE_SINCE_KEY, in the same script: no store
    write, docs/adr/0051) and announce ``presence online`` to their conversations. Returns whether the user
    came online. ``resp``: the caller's pipelined connection to the same Redis as ``client``, used instead of
    it (a broker's connects, docs/adr/0040)."""
    if not (await _presence_transition(client, user_id=user_id, session_id=session_id, add=True,
                                       at_ms=int(time.time() * 1000), resp=resp))[1]:
        return False
    await _announce(client, resp, user_id=user_id, status="online", conversation_ids=conversation_ids)
    return True


async def presence_disconnect(client: redis.asyncio.Redis, *, user_id: str, session_id: str,
                              conversation_ids: list[str], resp: RespClient | None = None) -> bool:
    """Forget a closed connection; if it was the user's last live one, record them offline since now (in
    Redis at once: PRESENCE_SINCE_KEY), write ``status`` offline and ``last_seen`` = that moment to the store
    and announce ``presence offline``. Returns whether the user went offline. ``resp``: as for
    :func:`presence_connect`."""
    at_ms = int(time.time() * 1000)
    if not (await _presence_transition(client, user_id=user_id, session_id=session_id, add=False, at_ms=at_ms,
                                       resp=resp))[1]:
        return False
    await _offline_write(user_id, at_ms)
    await _announce(client, resp, user_id=user_id, status="offline", conversation_ids=conversation_ids)
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
    flat = [as_str(v) for v in await script(keys=[PRESENCE_EXPIRING_KEY, *map(presence_key, by_user)], args=args)]
    return list(zip(flat[0::2], flat[1::2], strict=True))


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
    return bool(await script(keys=[PRESENCE_EXPIRING_KEY, PRESENCE_CLAIMS_KEY, PRESENCE_SINCE_KEY],
                             args=[user_id, at]))


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
        user_id = as_str(raw)
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


def status_shown(*, status: str, last_seen: datetime | None, live: bool, since: str | None,
                 gone: int | None) -> tuple[str, datetime | None]:
    """A user's status and last_seen as every public read shows them: the store's (``status``, ``last_seen``:
    their last offline, or the status they chose) laid under what Redis says (``live``, ``since``, ``gone``
    from :func:`presence_shown`). Online since ``+T``: "online" from T, unless the user chose a status after
    T (the store's ``last_seen`` is newer); offline since ``-T``, or since their last session expired
    (``gone``, a killed broker, before the sweep wrote it): "offline" from then, unless chosen after. Pure."""
    moment: float | None = None
    shown = "offline"
    if live and since is not None and since.startswith("+"):
        moment, shown = int(since[1:]) / 1000, "online"
    elif not live and since is not None and since.startswith("-"):
        moment = int(since[1:]) / 1000
    elif not live and since is not None and gone is not None:
        moment = float(min(gone, time.time()))
    if moment is None:
        return status, last_seen
    stored = None if last_seen is None else (last_seen if last_seen.tzinfo else last_seen.replace(tzinfo=UTC))
    if stored is not None and stored.timestamp() > moment:
        return status, last_seen  # chosen (PATCH /users/me) after the transition
    return shown, datetime.fromtimestamp(moment, UTC)


def presence_shown(client: Any, *, user_ids: list[str]) -> dict[str, tuple[bool, str | None, int | None]]:
    """What Redis says of each user's presence, for :func:`status_shown`: (a session live now, their
    PRESENCE_SINCE_KEY entry, the moment their last session expired if a sweep has yet to record it).
    ``client``: a sync REDIS_URL client; one script call, read-only."""
    unique = list(dict.fromkeys(user_ids))
    if not unique:
        return {}
    rows = client.eval(_PRESENCE_SHOWN_LUA, 3 + len(unique), PRESENCE_EXPIRING_KEY, PRESENCE_CLAIMS_KEY,
                       PRESENCE_SINCE_KEY, *map(presence_key, unique), int(time.time()), *unique)
    return {user: (bool(int(live)), None if since is None else as_str(since),
                   None if gone is None else int(float(gone)))
            for user, (live, since, gone) in zip(unique, rows, strict=True)}
