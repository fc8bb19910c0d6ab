"""Redis Streams as the bus: the atomic append, its batching, and each event loop's bus client.

Layout (docs/architecture.md, docs/adr/0002): ``CHATSTREAM_PARTITIONS`` streams ``cs:{pNN}:events``; a conversation
lives in partition ``crc32(conversation_id) % PARTITIONS`` for ever. Every key of a partition carries the
hash tag ``{pNN}``, so on a Redis Cluster the stream, its seq counters and its dedup keys share one slot and
the append script may touch them all. The keys are in ``core/keys.py``; they live on the message bus Redis
(``core/bus.py``, docs/adr/0022), which may be a cluster. The entry format (fields ``t c s d v``) and its
decoder are in ``core/entries.py``. Over 400 lines: the append script and every way it is sent (one call,
a pipelined batch, the lean RESP client, a cluster) share one argument layout, which is safer read in one place.

Payloads (``d``; ids are strings, times ISO-8601 UTC with milliseconds; built by ``messaging.events.event_build``,
the one builder, whose ``PAYLOAD_FIELDS`` lists them; the drain applies each type by its rule in
``storage.rules.EVENT_RULES``):

``message.new``      ``{id, conversation_id, sender_id, content, timestamp, client_msg_id, mentions}`` (``mentions``:
                     ids of the members its ``@username``s name, ``messaging/mentions.py``; absent in entries
                     appended before mentions existed) and, for a reply, ``reply_to`` ``{id, seq, sender_id,
                     username, excerpt, deleted}`` (``messaging/replies.py``)
``message.edited``   ``{id, conversation_id, content, edited_at, editor_id, original}`` (``id`` is the message's;
                     ``original`` ``{content, at, seq}`` of the message as sent on its first edit, else null)
``message.deleted``  ``{id, conversation_id, deleted_at, deleter_id}`` (the sender, or ``staff:<username>``)
``read.updated``     ``{conversation_id, user_id, seq}`` (``seq``: the reader's new cursor)
``reaction.added``, ``reaction.removed``  ``{id, conversation_id, user_id, emoji, user_ids, at}`` (``id`` is the
                     message's; ``user_ids`` every user with that emoji on it after the change, in the order they
                     reacted; appended by ``messaging/reactions.py``'s own script, docs/adr/0037)

The seq is given inside the script (HINCRBY then XADD, atomically), so stream order equals seq order within
a conversation and seqs are gap-free. ``message.new`` is deduplicated on ``(conversation, sender,
client_msg_id)``: a retry returns the first attempt's ``(message_id, seq)`` and appends nothing; the same
``client_msg_id`` in another conversation is another message.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.exceptions
from django.conf import settings

from core.bus import BusAsync, bus_async_new, bus_is_cluster, bus_is_separate
from core.entries import SEQUENCED, EventType
from core.keys import (
    dedup_key,
    no_dedup_key,
    partition_of,
    persisted_key,
    recent_docs_key,
    recent_edits_key,
    recent_key,
    seq_key,
    stream_key,
)
from core.values import as_str
from messaging.resp import RespClient, resp_client_for

# How long a (conversation, sender, client_msg_id) is remembered: a client retrying after a day is a new message.
DEDUP_TTL_S = 24 * 3600
# The payload's compact JSON (ASCII, as ``json.dumps(payload, separators=(",", ":"))`` wrote it): one encoder,
# not one built by ``json.dumps`` per append.
_PAYLOAD_ENCODER = json.JSONEncoder(separators=(",", ":"))


# KEYS[1] stream, KEYS[2] seq hash, KEYS[3] dedup key (no_dedup_key when ARGV[7] is "0")
# KEYS[4..7] recent window: recent_key, recent_docs_key, persisted_key, recent_edits_key (docs/adr/0028)
# ARGV[8] window size in messages ("0": no window), ARGV[9] window TTL in seconds
# ARGV[1] type, ARGV[2] conversation id, ARGV[3] payload JSON, ARGV[4] message id, ARGV[5] dedup TTL,
# ARGV[6] "1" if the event takes a seq, ARGV[7] "1" if it is deduplicated on KEYS[3]
# -> {message_id, seq, entry_id, duplicate(0/1)}
_APPEND_LUA = """
local dedup = ARGV[7] == '1'
if dedup then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ':', 1, true)
    return {string.sub(seen, 1, sep - 1), tonumber(string.sub(seen, sep + 1)), '', 1}
  end
end
local seq = 0
if ARGV[6] == '1' then
  seq = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
local id = redis.call('XADD', KEYS[1], '*', 't', ARGV[1], 'c', ARGV[2], 's', tostring(seq), 'd', ARGV[3], 'v', '1')
if dedup then
  redis.call('SET', KEYS[3], ARGV[4] .. ':' .. seq, 'EX', tonumber(ARGV[5]))
end
if ARGV[8] ~= nil and ARGV[8] ~= '0' then
  recent_apply(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[1], ARGV[2], ARGV[3], ARGV[4], seq, tonumber(ARGV[8]),
               tonumber(ARGV[9]))
end
return {ARGV[4], seq, id, 0}
"""

# The recent window's part of the append (docs/adr/0028), in the same script so an acknowledged event is in
# the window at once and a crash can never keep one without the other (AOF replays the script whole).
# A new message is added (its JSON is the payload with its seq) and the oldest are dropped past ``n``, but
# only those the drain has persisted (seq <= the conversation's watermark), moving ``floor`` up to them; an
# edit or delete rewrites the message's JSON, or, for a message older than the window, is kept in the edits
# hash for store-served pages. A window created now (first message, or after its TTL) starts at floor seq-1.
# For the conversation list's kept unread totals (api/conversation_list.py, docs/adr/0059) the window's hash
# also counts: ``sent``, the messages appended since ``born`` (the seq that created the window), and
# ``sent:<sender>``, each sender's; a total is advanced by those counts alone while no deletion came after it:
# ``dseq``, the seq of the conversation's last deletion (at the window's creation its floor, as deletions before
# are not known). Two HINCRBYs per message; the sender is read off the payload as the list reads it (the compact
# JSON's ``"sender_id":"<id>"``, which an escaped quote inside a content can never form).
_RECENT_LUA = """
local function recent_apply(zkey, dkey, wkey, ekey, t, cid, payload, mid, seq, n, ttl)
  if t == 'message.new' then
    if redis.call('HEXISTS', dkey, 'floor') == 0 then
      redis.call('HSET', dkey, 'floor', seq - 1, 'dseq', seq - 1, 'born', seq)
    end
    redis.call('HINCRBY', dkey, 'sent', 1)
    local sender = string.match(payload, '"sender_id":"([^"]*)"')
    if sender then redis.call('HINCRBY', dkey, 'sent:' .. sender, 1) end
    redis.call('HSET', dkey, mid, '{"seq":' .. seq .. ',' .. string.sub(payload, 2))
    redis.call('ZADD', zkey, seq, mid)
    local over = redis.call('ZCARD', zkey) - n
    if over > 0 then
      local persisted = tonumber(redis.call('HGET', wkey, cid) or '0')
      local old = redis.call('ZRANGE', zkey, 0, over - 1, 'WITHSCORES')
      for i = 1, #old, 2 do
        local s = tonumber(old[i + 1])
        if s > persisted then break end
        redis.call('ZREM', zkey, old[i])
        redis.call('HDEL', dkey, old[i])
        redis.call('HSET', dkey, 'floor', s)
      end
    end
  elseif t == 'message.edited' or t == 'message.deleted' then
    -- The XADD above has happened: an error now would answer a failure for an appended event (Redis does not
    -- roll a script back). A payload cjson cannot read (the write path refuses such content; a stray entry
    -- could still carry one) leaves the window alone: the drain dead-letters the entry.
    local ok, ev = pcall(cjson.decode, payload)
    if not ok or type(ev) ~= 'table' then return end
    if t == 'message.deleted' and redis.call('HEXISTS', dkey, 'floor') == 1 then
      redis.call('HSET', dkey, 'dseq', seq)
    end
    local cur = redis.call('HGET', dkey, mid)
    if cur then
      local doc = cjson.decode(cur)
      if t == 'message.deleted' then
        doc['deleted'] = true
        doc['content'] = ''
        doc['deleted_at'] = ev['deleted_at']
      elseif not doc['deleted'] then
        doc['content'] = ev['content']
        doc['edited_at'] = ev['edited_at']
        -- An edit re-resolves the mentions (docs/adr/0046); cjson writes an empty list as {}, which readers
        -- take as none.
        if ev['mentions'] ~= nil then doc['mentions'] = ev['mentions'] end
      end
      doc['edit_seq'] = seq
      redis.call('HSET', dkey, mid, cjson.encode(doc))
    else
      local prev = redis.call('HGET', ekey, mid)
      if not (prev and cjson.decode(prev)['deleted']) then
        ev['edit_seq'] = seq
        ev['deleted'] = (t == 'message.deleted')
        redis.call('HSET', ekey, mid, cjson.encode(ev))
        redis.call('EXPIRE', ekey, ttl)
      end
    end
  else
    return
  end
  redis.call('EXPIRE', zkey, ttl)
  redis.call('EXPIRE', dkey, ttl)
end
"""
_APPEND_LUA = _RECENT_LUA + _APPEND_LUA


_APPEND_SHA = hashlib.sha1(_APPEND_LUA.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


@dataclass(frozen=True, slots=True)
class Appended:
    message_id: str
    seq: int
    entry_id: str  # "" for a duplicate
    partition: int
    duplicate: bool


async def event_append(
    client: BusAsync,
    *,
    type: EventType,
    conversation_id: str,
    payload: dict[str, Any],
    message_id: str,
    dedup: tuple[str, str] | None = None,
    meta: tuple[str, dict[str, str], int] | None = None,
) -> Appended:
    """Append one event to its conversation's partition stream, atomically with its seq.

    ``dedup`` is ``(sender_id, client_msg_id)`` for ``message.new``, remembered within the conversation
    (``dedup_key``). ``meta`` is ``(key, fields, ttl_s)`` of a hash written in the same round trip, after the
    script (on a Redis Cluster beside it; never atomically with it; for a duplicate it is written too, so it
    must be harmless then). Precondition: the caller
    validated and authorized the event. ``client`` is a bus client (``core.bus``).
    Side effects: HINCRBY + XADD (+ SET of the dedup key), in one script (+ HSET/EXPIRE of ``meta``). On a
    client with :func:`append_batching_enable`, the round trip is shared with the other appends of the same
    event-loop turn.
    """
    partition = partition_of(conversation_id)
    keys = [
        stream_key(partition),
        seq_key(partition),
        dedup_key(partition, conversation_id=conversation_id, sender_id=dedup[0], client_msg_id=dedup[1])
        if dedup else no_dedup_key(partition),
    ]
    args: list[str | int] = [type, conversation_id, _PAYLOAD_ENCODER.encode(payload), message_id, DEDUP_TTL_S,
            "1" if type in SEQUENCED else "0", "1" if dedup else "0"]
    _recent_keys_args(keys, args, partition=partition, conversation_id=conversation_id)
    batcher = _batchers.get(client)
    if bus_is_cluster(client):
        result = await _append_cluster(client, keys=keys, args=args, meta=meta)
    elif batcher is not None:
        result = await batcher.submit(_Append(keys, args, meta))
    else:
        assert isinstance(client, redis.asyncio.Redis)  # not a cluster (above)
        result = (await _appends_execute(client, [_Append(keys, args, meta)]))[0]
    if isinstance(result, Exception):
        raise result
    msg_id, seq, entry_id, duplicate = result
    return Appended(
        message_id=as_str(msg_id), seq=int(seq), entry_id=as_str(entry_id), partition=partition,
        duplicate=bool(int(duplicate)),
    )


def _recent_keys_args(keys: list[str], args: list[str | int], *, partition: int, conversation_id: str) -> None:
    """Add the recent window's KEYS[4..7] and ARGV[8..9] to an append (docs/adr/0028)."""
    keys += [recent_key(partition, conversation_id), recent_docs_key(partition, conversation_id),
             persisted_key(partition), recent_edits_key(partition, conversation_id)]
    args += [int(settings.RECENT_MESSAGES), int(settings.RECENT_TTL_S)]


async def _append_cluster(client: BusAsync, *, keys: list[str], args: list[str | int],
                          meta: tuple[str, dict[str, str], int] | None) -> Any:
    """The append on a Redis Cluster: redis-py refuses scripts in a cluster pipeline, and the meta hash lives
    in another slot (often on another node), so the script and the meta writes run side by side instead of
    in one pipeline: still one round trip of latency. ``register_script`` loads the script on NOSCRIPT."""

    async def meta_write() -> None:
        if meta is not None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(meta[0], mapping=meta[1])  # type: ignore[arg-type]
                pipe.expire(meta[0], meta[2])
                await pipe.execute()

    script = client.register_script(_APPEND_LUA)
    result, _ = await asyncio.gather(script(keys=keys, args=args), meta_write())
    return result


@dataclass(slots=True)
class _Append:
    keys: list[str]
    args: list[str | int]
    meta: tuple[str, dict[str, str], int] | None


async def _appends_execute(client: redis.asyncio.Redis, appends: list[_Append]) -> list[Any]:
    """Run the append script for each of ``appends`` (with its meta hash) in one non-transactional pipeline;
    return each script's result, or the exception of the script or of its meta write. A server that does not
    know the script yet (first use, restart, failover) answers NOSCRIPT: the script is loaded once and those
    appends run again."""
    results = await _appends_pipeline(client, appends)
    retry = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
    if retry:
        await client.script_load(_APPEND_LUA)
        for i, result in zip(retry, await _appends_pipeline(client, [appends[i] for i in retry]), strict=True):
            results[i] = result
    return results


async def _appends_execute_resp(client: RespClient, appends: list[_Append]) -> list[Any]:
    """:func:`_appends_execute` over the lean client (``messaging/resp.py``): the same commands and results,
    one write and one future for the whole batch."""
    results = await _appends_resp(client, appends)
    retry = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
    if retry:
        await client.call("SCRIPT", "LOAD", _APPEND_LUA)
        for i, result in zip(retry, await _appends_resp(client, [appends[i] for i in retry]), strict=True):
            results[i] = result
    return results


def _appends_commands(appends: list[_Append]) -> list[list[Any]]:
    commands: list[list[Any]] = []
    for append in appends:
        commands.append(["EVALSHA", _APPEND_SHA, len(append.keys), *append.keys, *append.args])
        if append.meta is not None:
            key, fields, ttl = append.meta
            commands.append(["HSET", key, *[x for pair in fields.items() for x in pair]])
            commands.append(["EXPIRE", key, ttl])
    return commands


async def _appends_resp(client: RespClient, appends: list[_Append]) -> list[Any]:
    return _appends_results(appends, await client.execute(_appends_commands(appends)))


def _appends_results(appends: list[_Append], replies: list[Any]) -> list[Any]:
    """Each append's script result, or the first error of its script or meta writes. Pure."""
    results: list[Any] = []
    at = 0
    for append in appends:
        width = 1 if append.meta is None else 3
        errors = [r for r in replies[at:at + width] if isinstance(r, Exception)]
        results.append(errors[0] if errors else replies[at])
        at += width
    return results


async def _appends_pipeline(client: redis.asyncio.Redis, appends: list[_Append]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for append in appends:
            pipe.evalsha(_APPEND_SHA, len(append.keys), *append.keys, *append.args)
            if append.meta is not None:
                pipe.hset(append.meta[0], mapping=append.meta[1])  # type: ignore[arg-type]
                pipe.expire(append.meta[0], append.meta[2])
        replies = await pipe.execute(raise_on_error=False)
    return _appends_results(appends, replies)


class AppendBatcher:
    """Coalesces the appends made during one event-loop turn into one pipeline (one Redis round trip and one
    pooled connection for all of them): on a broker, many connections send at once, and redis-py's cost per
    command round trip (pool checkout, timeout, pipeline object) was the biggest part of a send's CPU in a
    profile of ``manage.py bench`` (docs/adr/0023). Each append keeps its own result and error; order within
    a batch is submission order, and one connection never has two appends in flight."""

    # Appends per pipeline: bounds one reply's size and the latency one batch adds to the last of it.
    MAX_BATCH = 256

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        # The lean client to the same server when it speaks to it (docs/adr/0040), else redis-py's pipeline.
        self.fast = resp_client_for(client)
        self.pending: list[tuple[_Append, asyncio.Future[Any]]] = []
        self.scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, append: _Append) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append((append, future))
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for start in range(0, len(pending), self.MAX_BATCH):
            batch = pending[start:start + self.MAX_BATCH]
            # On a connected lean client the batch is written now and answered by a callback: no task per
            # batch, which at a low rate is a task per message (docs/adr/0040). A task otherwise (connecting).
            sent = self.fast.send_nowait(_appends_commands([a for a, _ in batch])) if self.fast else None
            if sent is not None:
                sent.add_done_callback(functools.partial(self._answered, batch))
            else:
                self._run_in_task(batch)

    def _run_in_task(self, batch: list[tuple[_Append, asyncio.Future[Any]]]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _answered(self, batch: list[tuple[_Append, asyncio.Future[Any]]], sent: asyncio.Future[list[Any]]) -> None:
        """The replies of a batch written by :meth:`_flush`: hand each append its result; appends the server
        answered NOSCRIPT (restarted, failed over, first use) run again in a task, which loads the script."""
        if sent.cancelled() or sent.exception() is not None:
            failure = sent.exception() if not sent.cancelled() else None
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure or redis.exceptions.ConnectionError("append batch cancelled"))
            return
        results = _appends_results([a for a, _ in batch], sent.result())
        retry = []
        for (append, future), result in zip(batch, results, strict=True):
            if isinstance(result, redis.exceptions.NoScriptError):
                retry.append((append, future))
            elif not future.done():
                future.set_result(result)
        if retry:
            self._run_in_task(retry)

    async def _run(self, batch: list[tuple[_Append, asyncio.Future[Any]]]) -> None:
        try:
            appends = [append for append, _ in batch]
            if self.fast is not None:
                results = await _appends_execute_resp(self.fast, appends)
            else:
                results = await _appends_execute(self.client, appends)
        except BaseException as exc:  # every waiter gets the failure, cancellation included
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else redis.exceptions.ConnectionError(
                        "append batch cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


_batchers: weakref.WeakKeyDictionary[BusAsync, AppendBatcher] = weakref.WeakKeyDictionary()


def append_batching_enable(client: BusAsync) -> None:
    """Make :func:`event_append` on ``client`` share round trips with concurrent appends (a broker's hub
    does this for its client). Precondition: ``client`` is only used on one event loop."""
    if client not in _batchers and isinstance(client, redis.asyncio.Redis):  # a cluster pipeline refuses scripts
        _batchers[client] = AppendBatcher(client)


def append_client_lean(client: BusAsync) -> RespClient | None:
    """The lean client (docs/adr/0040) of ``client``'s append batcher: a connection to the same server for a
    broker's other hot commands; None when ``client`` has no batcher or the server is one it does not speak to."""
    batcher = _batchers.get(client)
    return batcher.fast if batcher is not None else None


# One asyncio bus client per event loop (an asyncio client cannot be shared across loops). Brokers run one
# loop for their life, so this is one client per broker; loops that come and go (``async_to_sync``) must
# pass their own client instead (``core.clients.run_async`` does), or each would leave one behind.
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BusAsync] = weakref.WeakKeyDictionary()


def bus_for_loop() -> BusAsync:
    """The running loop's bus client, created on first use (pool size ``BROKER_REDIS_POOL``).
    Precondition: called on a running event loop."""
    loop = asyncio.get_running_loop()
    client = _by_loop.get(loop)
    if client is None:
        client = _by_loop[loop] = bus_async_new(max_connections=int(settings.BROKER_REDIS_POOL))
        append_batching_enable(client)
    return client


def bus_resolve(client: redis.asyncio.Redis, bus: BusAsync | None) -> BusAsync:
    """The bus client to use beside ``client`` (a client of REDIS_URL): ``bus`` if given; else ``client``
    itself when the bus is that same Redis; else the running loop's bus client."""
    if bus is not None:
        return bus
    if not bus_is_separate():
        return client
    return bus_for_loop()


async def last_accepted_seq(client: redis.asyncio.Redis, *, conversation_id: str, bus: BusAsync | None = None) -> int:
    """The last seq given out in the conversation (0: none). ``client`` is a REDIS_URL client; the read goes
    to ``bus`` (default: ``bus_resolve``). Read-only."""
    raw = await bus_resolve(client, bus).hget(seq_key(partition_of(conversation_id)), conversation_id)
    return int(raw) if raw is not None else 0

