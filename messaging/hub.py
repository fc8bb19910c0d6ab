"""The fan-out hub of one broker process: which local connection wants which conversation, and the few
long-lived tasks that feed them.

* ONE stream reader task per process: ``XREAD BLOCK`` over the partition streams that have at least one
  local subscriber, from a remembered cursor per partition, so nothing appended after a connection
  subscribed is missed, even across a Redis hiccup (the reader is supervised and resumes from its
  cursors). Each event becomes one frame (its JSON and its WebSocket framing, built once) that is handed
  to every local receiver (docs/adr/0020, the probe: a channel-layer ``group_send`` per message costs ~20x this). On a
  Redis Cluster bus (docs/adr/0022) one XREAD may name keys of one slot only, and every partition has its
  own slot: there the reader task runs one ``XREAD BLOCK`` per subscribed partition instead, each from that
  partition's cursor.
* ONE pub/sub task on ``frames.CONTROL_CHANNEL``: typing and presence (ephemeral, never stored) and
  membership changes. After a reconnect of that subscription every local connection re-checks its
  memberships, because a membership message may have been missed meanwhile.
* ONE presence task refreshing the expiry of this process' sessions (``presence.presence_refresh``), and
  ONE sweep task announcing offline the users whose last session expired on a killed broker
  (``presence.presence_sweep``; every broker sweeps, each user is announced by one of them).
* ONE heap task freezing the process' long-lived objects (its connections) out of the cyclic GC's reach every
  ``BROKER_GC_FREEZE_S`` (``messaging/heap.py``, docs/adr/0052).

The hub lives on the event loop of the ASGI server (uvicorn's uvloop, or daphne's asyncio reactor);
everything here is non-blocking. Connections are duck-typed :class:`Subscriber` objects (the consumers).
Sessions ended elsewhere (the users' channel-layer groups) are ``messaging/sessions.py``. Just over 400 lines:
one class whose loops share the subscription maps and the per-partition cursors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio
from django.conf import settings

from core import keys
from core.bus import BusAsync, bus_async_new, bus_is_cluster
from messaging import frames, membership, presence, selectors, streams
from messaging.heap import Heap
from messaging.resp import resp_client_for
from messaging.sessions import UserGroups
from messaging.streams import bus_resolve

logger = logging.getLogger(__name__)

# XREAD BLOCK time. It must stay well below the reader client's socket timeout (docs/adr/0020, the probe: redis-py's
# 5 s default silently killed a 5 s BLOCK). 1 s also bounds how late a newly subscribed partition joins the
# read (its entries are not missed meanwhile: they are read from the cursor taken at subscribe time).
BLOCK_MS = 1000
READER_SOCKET_TIMEOUT_S = 10.0
# Entries per XREAD. Everything read is written to the sockets' buffers in one loop turn, before they are
# flushed, so this bounds the per-turn growth of each connection's send buffer (100 frames: ~30 KB typical,
# 6.4 MB for 100 frames at the 64 KiB limit) as well as the work between two looks at the event loop.
READ_COUNT = 100
# Timeout of the hub's ordinary commands: a Redis that does not answer within 5 s is treated as down (the
# client gets an ``unavailable`` error frame) rather than holding a connection's handler for ever.
COMMAND_TIMEOUT_S = 5.0
SUPERVISOR_MAX_BACKOFF_S = 5.0
# Sessions per presence-refresh pipeline (one Lua call each, ~10-20 us of Python to queue and parse).
PRESENCE_REFRESH_SLICE = 250



class Subscriber(Protocol):
    user_id: str
    session_id: str

    def deliver(self, *, conversation_id: str, seq: int, text: bytes, wire: bytes) -> None:
        """Push one frame: ``text`` its UTF-8 JSON, ``wire`` the same as a complete WebSocket frame (``seq`` 0
        for unsequenced ones). Synchronous: it writes to a buffer or drops the connection, never waits."""

    def membership_recheck(self, *, conversation_id: str | None) -> None:
        """Re-read membership of one conversation (None: all of them) and (un)subscribe; non-blocking."""

    def session_end(self, *, code: int) -> None:
        """The user's session ended elsewhere (logout...): close with ``code``; non-blocking."""


class Hub:
    def __init__(self, *, redis_url: str) -> None:
        # A blocking pool: a burst (a wave of connects, each with its presence update) waits for a connection
        # instead of failing with "Too many connections" (redis-py's plain pool raises past 100).
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            redis_url, max_connections=settings.BROKER_REDIS_POOL, timeout=COMMAND_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S, socket_connect_timeout=COMMAND_TIMEOUT_S)
        self.redis = redis.asyncio.Redis(connection_pool=pool)
        streams.append_batching_enable(self.redis)
        # A connect's scripts (its read and group join, its presence) over one pipelined connection to REDIS_URL
        # when it is a plain Redis (docs/adr/0040): through redis-py's pool they were a fifth of a broker's
        # CPU per connect (docs/benchmarks.md, session 8). None: redis-py.
        self.fast = resp_client_for(self.redis)
        # The stream reader's own client: its XREAD BLOCK holds a connection (one per partition on a cluster).
        self._reader = bus_async_new(socket_timeout=READER_SOCKET_TIMEOUT_S)
        # Its XREAD goes through the lean client when the bus is one plain Redis (docs/adr/0040): redis-py's
        # per-call cost and its dict per entry were a fixed cost per event at low rates.
        self._reader_fast = resp_client_for(self._reader, timeout_s=READER_SOCKET_TIMEOUT_S)
        self._control = redis.asyncio.Redis.from_url(redis_url, socket_timeout=READER_SOCKET_TIMEOUT_S,
                                                     socket_connect_timeout=COMMAND_TIMEOUT_S)
        self.by_conversation: dict[str, set[Subscriber]] = {}
        self.by_user: dict[str, set[Subscriber]] = {}
        self._partition_refs: Counter[int] = Counter()
        self._cursors: dict[int, bytes | str] = {}
        self._cursor_pending: dict[int, asyncio.Future[None]] = {}
        self._keys = {p: keys.stream_key(p) for p in range(int(settings.PARTITIONS))}
        self._key_partition = {k.encode(): p for p, k in self._keys.items()}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.stats: Counter[str] = Counter()
        self.heap = Heap(thaw_after_closes=int(settings.BROKER_GC_THAW_AFTER_CLOSES))
        # This process' groups of its users on the channel layer (sessions ended elsewhere, docs/adr/0027).
        self.sessions = UserGroups(by_user=self.by_user, stats=self.stats, client=self.redis, redis_url=redis_url,
                                   fast=self.fast)

    @property
    def bus(self) -> BusAsync:
        """The message bus client for ordinary commands: ``self.redis`` unless the bus is another Redis or a
        cluster, else the loop's bus client, the one ``messaging.services`` resolves to (one pool per broker).
        Precondition: called on the running loop."""
        return bus_resolve(self.redis, None)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the reader, control and presence tasks once (idempotent). Precondition: a running loop."""
        if self._tasks:
            return
        loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("reader", self._read_loop), ("control", self._control_loop), ("presence", self._presence_loop),
            ("presence_sweep", self._presence_sweep_loop), ("sessions", self.sessions.receive_loop),
            ("sessions_renew", self.sessions.renew_loop)]
        if float(settings.BROKER_GC_FREEZE_S) > 0:
            loops.append(("heap", self._heap_loop))
        for name, body in loops:
            self._tasks.append(asyncio.get_running_loop().create_task(self._supervise(name, body)))

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        backoff = 0.1
        while True:
            started = time.monotonic()
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("hub: the %s task failed; restarting it", name)
            self.stats[f"{name}_restarts"] += 1
            if time.monotonic() - started > 30:
                backoff = 0.1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, SUPERVISOR_MAX_BACKOFF_S)

    async def connections_open(self) -> None:
        """Open the Redis connections a connect uses, each of which its first user opened before (a TCP connect
        and redis-py's handshake per connection, docs/benchmarks.md "Issue 13: a broker's first connect"): two
        of the pool (the ticket and revocation reads, then the partitions' read beside the reader's wake-up),
        the lean client's (the group join and read, presence) and the stream reader's (its first XREAD follows
        the first subscription). Side effects: connections only (PING)."""
        await asyncio.gather(self.redis.ping(), self.bus.ping())
        if self.fast is not None:
            await self.fast.call("PING")
        if self._reader_fast is not None:
            await self._reader_fast.call("PING")
        else:
            await self._reader.ping()

    # ------------------------------------------------------------------ subscriptions

    async def connection_read(self, conn: Subscriber) -> tuple[list[str], bool]:
        """A new connection's conversation ids, read with this broker's join of the user's group when it is
        their first socket here (one script, ``UserGroups.add_reading``), and whether that join stands: pass it
        to :meth:`connection_add`, with no ``await`` in between (a discard then would undo the join unseen)."""
        self.start()
        discards = self.sessions.discards
        first = conn.user_id not in self.by_user
        members, joined = await self.sessions.add_reading(conn.user_id if first else None,
                                                          key=keys.user_conversations_key(conn.user_id))
        found = await selectors.user_conversation_ids_async(self.redis, user_id=conn.user_id, cached=members)
        # A discard during the join may have reached Redis after it: then connection_add joins again.
        return found, joined and self.sessions.discards == discards

    async def connection_add(self, conn: Subscriber, *, conversation_ids: list[str], joined: bool = False) -> None:
        """Register a connection and subscribe it to its conversations (``joined``: this broker already joined
        the user's group for it). When this returns, every event appended from now on reaches the connection."""
        self.start()
        if conn.user_id not in self.by_user and not joined:  # the user's first socket here: join their group
            await self.sessions.add(conn.user_id)
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        partitions = []
        for conversation_id in conversation_ids:
            subscribers = self.by_conversation.setdefault(conversation_id, set())
            if conn not in subscribers:
                subscribers.add(conn)
                partitions.append(keys.partition_of(conversation_id))
        await self._partitions_acquire(partitions)

    def connection_remove(self, conn: Subscriber, *, conversation_ids: list[str]) -> None:
        self.heap.connection_closed()
        users = self.by_user.get(conn.user_id)
        if users is not None:
            users.discard(conn)
            if not users:
                del self.by_user[conn.user_id]
                self.sessions.discard(conn.user_id)
        for conversation_id in conversation_ids:
            self.unsubscribe(conn, conversation_id=conversation_id)

    async def subscribe(self, conn: Subscriber, *, conversation_id: str) -> None:
        subscribers = self.by_conversation.setdefault(conversation_id, set())
        if conn in subscribers:
            return
        subscribers.add(conn)
        await self._partitions_acquire([keys.partition_of(conversation_id)])

    def unsubscribe(self, conn: Subscriber, *, conversation_id: str) -> None:
        subscribers = self.by_conversation.get(conversation_id)
        if subscribers is None or conn not in subscribers:
            return
        subscribers.discard(conn)
        if not subscribers:
            del self.by_conversation[conversation_id]
        partition = keys.partition_of(conversation_id)
        self._partition_refs[partition] -= 1
        if self._partition_refs[partition] <= 0:
            del self._partition_refs[partition]
            self._cursors.pop(partition, None)

    async def _partitions_acquire(self, partitions: list[int]) -> None:
        """Count one more subscriber per partition; start reading partitions that had none, from their
        current end (taken now, before the caller tells its client it is ready)."""
        waits: list[asyncio.Future[None]] = []
        fetch: list[int] = []
        for p in partitions:
            self._partition_refs[p] += 1
            if p in self._cursors:
                continue
            if p in self._cursor_pending:
                waits.append(self._cursor_pending[p])
            elif p not in fetch:
                fetch.append(p)
        if fetch:
            futures = {p: asyncio.get_running_loop().create_future() for p in fetch}
            self._cursor_pending.update(futures)
            try:
                async with self.bus.pipeline(transaction=False) as pipe:
                    for p in fetch:
                        pipe.xrevrange(self._keys[p], count=1)
                    lasts = await pipe.execute()
                for p, last in zip(fetch, lasts, strict=True):
                    if self._partition_refs.get(p, 0) > 0:
                        self._cursors[p] = last[0][0] if last else "0-0"
            finally:
                for p, future in futures.items():
                    self._cursor_pending.pop(p, None)
                    if not future.done():
                        future.set_result(None)
            self._wake.set()
        if waits:
            await asyncio.gather(*waits)

    # ------------------------------------------------------------------ the stream reader

    async def _read_loop(self) -> None:
        if bus_is_cluster(self._reader):
            await self._read_loop_per_partition()
            return
        while True:
            if not self._cursors:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._reader_fast is not None:
                cursors = list(self._cursors.items())
                reply = await self._reader_fast.call(
                    "XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS", *[self._keys[p] for p, _ in cursors],
                    *[cursor for _, cursor in cursors])
                await self._read_consume(reply, flat=True)
                continue
            request: dict[Any, Any] = {self._keys[p]: cursor for p, cursor in self._cursors.items()}
            await self._read_consume(await self._reader.xread(request, count=READ_COUNT, block=BLOCK_MS))

    async def _read_consume(self, response: Any, *, flat: bool = False) -> None:
        """Dispatch an XREAD reply's entries in stream order and move each partition's cursor past them.
        ``flat``: a raw RESP reply (``messaging/resp.py``), each entry's fields a flat list of names and values."""
        for key, entries in response or []:
            partition = self._key_partition[key if isinstance(key, bytes) else key.encode()]
            for entry_id, fields in entries:
                if flat:
                    pairs = iter(fields or ())
                    fields = dict(zip(pairs, pairs, strict=False))
                self._dispatch(entry_id, fields)
            if entries and partition in self._cursors:
                self._cursors[partition] = entries[-1][0]

    async def _read_loop_per_partition(self) -> None:
        """The reader on a Redis Cluster: one task per subscribed partition (see the module docstring). A
        partition's task ends within BLOCK_MS of its last unsubscribe. One failed read (a node away, a
        failover) fails them all: the supervisor restarts the reader, which resumes from the cursors.
        redis-py's cluster client follows MOVED and refreshes its slot map, so a resharded slot is read
        from its new node."""
        readers: dict[int, asyncio.Task[None]] = {}
        loop = asyncio.get_running_loop()
        try:
            while True:
                for p in self._cursors:
                    if p not in readers:
                        readers[p] = loop.create_task(self._read_partition(p))
                # No await since the scan: a partition acquired from here on sets the event again.
                self._wake.clear()
                waker = loop.create_task(self._wake.wait())
                await asyncio.wait([waker, *readers.values()], return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                for p, task in list(readers.items()):
                    if task.done():
                        del readers[p]
                        task.result()  # re-raises a failed read
        finally:
            for task in readers.values():
                task.cancel()
            await asyncio.gather(*readers.values(), return_exceptions=True)

    async def _read_partition(self, partition: int) -> None:
        key = self._keys[partition]
        while (cursor := self._cursors.get(partition)) is not None:
            await self._read_consume(await self._reader.xread({key: cursor}, count=READ_COUNT, block=BLOCK_MS))

    def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            conversation_id = fields[b"c"].decode()
            subscribers = self.by_conversation.get(conversation_id)
            if not subscribers:
                return
            seq = int(fields[b"s"])
            frame = frames.event_frame(type=fields[b"t"].decode(), conversation_id=conversation_id, seq=seq,
                                       payload_json=fields[b"d"].decode())
        except (KeyError, ValueError, UnicodeDecodeError):
            self.stats["malformed_entries"] += 1
            logger.warning("hub: skipping malformed stream entry %r", entry_id)
            return
        if frame is None:
            return
        self.stats["events"] += 1
        text = frame.encode()
        wire = frames.ws_wire(text)
        for conn in tuple(subscribers):
            try:
                conn.deliver(conversation_id=conversation_id, seq=seq, text=text, wire=wire)
            except Exception:
                # One broken connection must not stop the others' delivery, nor make the reader re-read
                # (and re-send) the batch after a restart.
                self.stats["delivery_errors"] += 1
                logger.exception("hub: delivery to a connection of user %s failed", conn.user_id)
        self.stats["deliveries"] += len(subscribers)

    # ------------------------------------------------------------------ control messages (pub/sub)

    async def _control_loop(self) -> None:
        pubsub = self._control.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(frames.CONTROL_CHANNEL)
            # From here on every invalidation is heard, so the in-process membership cache is safe; anything
            # cached before this (re)subscription may have missed one.
            membership.membership_local_forget(None)
            membership.membership_local_enable()
            if self.stats["control_restarts"]:
                # Membership messages may have been published while we were not subscribed.
                for conns in list(self.by_user.values()):
                    for conn in tuple(conns):
                        conn.membership_recheck(conversation_id=None)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    try:
                        await self._control_dispatch(message["data"])
                    except Exception:
                        logger.exception("hub: control message %r failed", message["data"][:200])
        finally:
            await pubsub.aclose()

    async def _control_dispatch(self, raw: bytes) -> None:
        try:
            data: dict[str, Any] = json.loads(raw)
            kind = data["k"]
        except (ValueError, KeyError, TypeError):
            logger.warning("hub: skipping malformed control message %r", raw[:200])
            return
        if kind == "typing":
            conversation_id, user_id = str(data["c"]), str(data["u"])
            text = frames.frame("typing", conversation_id=conversation_id, user_id=user_id).encode()
            wire = frames.ws_wire(text)
            for conn in tuple(self.by_conversation.get(conversation_id, ())):
                if conn.user_id != user_id:
                    conn.deliver(conversation_id=conversation_id, seq=0, text=text, wire=wire)
        elif kind == "presence":
            user_id = str(data["u"])
            text = frames.frame("presence", user_id=user_id, status=str(data["s"])).encode()
            wire = frames.ws_wire(text)
            told: set[int] = set()
            for conversation_id in data.get("c", []):
                for conn in tuple(self.by_conversation.get(str(conversation_id), ())):
                    if conn.user_id != user_id and id(conn) not in told:
                        told.add(id(conn))
                        conn.deliver(conversation_id=str(conversation_id), seq=0, text=text, wire=wire)
        elif kind == "invalidate":
            membership.membership_local_forget(str(data["c"]))
        elif kind == "members":
            conversation_id = str(data["c"])
            membership.membership_local_forget(conversation_id)
            for user_id in data.get("u", []):
                for conn in tuple(self.by_user.get(str(user_id), ())):
                    conn.membership_recheck(conversation_id=conversation_id)

    # ------------------------------------------------------------------ presence heartbeat

    async def _presence_loop(self) -> None:
        known: set[tuple[str, str]] = set()  # this process' sessions at the previous refresh
        while True:
            await asyncio.sleep(settings.PRESENCE_REFRESH_S)
            conns = {(conn.user_id, conn.session_id): conn for conns in self.by_user.values() for conn in conns}
            sessions = list(conns)
            missing: list[tuple[str, str]] = []
            # In slices: building and parsing one pipeline of 10,000 scripts holds the event loop for a
            # noticeable fraction of a second every refresh; a slice is a few milliseconds.
            for start in range(0, len(sessions), PRESENCE_REFRESH_SLICE):
                missing += await presence.presence_refresh(
                    self.redis, sessions=sessions[start:start + PRESENCE_REFRESH_SLICE])
            previous, known = known, set(conns)
            for key in missing:
                conn = conns[key]
                # A session new since the last refresh may still wait for its connect's presence update; one
                # closed meanwhile was removed by its disconnect. Neither is ours to re-add.
                if key not in previous or conn not in self.by_user.get(conn.user_id, ()):
                    continue
                # Still open but no longer counted: this process stalled past the TTL and a sweep announced
                # the user offline. Count it again (which announces them online).
                self.stats["presence_readded"] += 1
                conversation_ids = sorted(c for c, subs in self.by_conversation.items() if conn in subs)
                await presence.presence_connect(self.redis, user_id=conn.user_id, session_id=conn.session_id,
                                                conversation_ids=conversation_ids)

    async def _presence_sweep_loop(self) -> None:
        while True:
            gone, looked = await presence.presence_sweep(self.redis)
            self.stats["presence_swept"] += len(gone)
            if gone:
                logger.info("presence sweep: %d user(s) whose last session expired announced offline", len(gone))
            # A full batch means a mass expiry (a broker with many users was killed): come back soon, but
            # still give the loop a turn between batches.
            full = looked >= settings.PRESENCE_SWEEP_BATCH
            await asyncio.sleep(min(0.2, settings.PRESENCE_SWEEP_S) if full else settings.PRESENCE_SWEEP_S)

    # ------------------------------------------------------------------ the heap

    async def _heap_loop(self) -> None:
        interval = float(settings.BROKER_GC_FREEZE_S)
        while True:
            await asyncio.sleep(interval)
            if self.heap.settle():
                logger.info("hub: the heap thawed (%d so far): one full collection took %.0f ms", self.heap.thaws,
                            1000 * self.heap.last_s)


_hub: Hub | None = None


def hub_get() -> Hub:
    """The process' hub (created on first use; its tasks start with the broker under uvicorn (ASGI lifespan), with
    the first connection under daphne)."""
    global _hub
    if _hub is None:
        _hub = Hub(redis_url=settings.REDIS_URL)
    return _hub
