"""The real-time fan-out benchmark (``python manage.py bench``): ChatStream brokers and, in the same run,
the Socket.IO 4 + redis-streams-adapter peer (``bench/peer/server.js``) and the Centrifugo v6 peer
(``bench/peer_centrifugo.py``) under the same workload.

Workload: N connections (one user each) in R conversations of N/R members; the first member of each
conversation sends messages, at a fixed total rate or "as fast as acked" (one in flight per sender); every
member (the sender's own connection too) must receive every message. The content of a message is its send
time, so each receiver measures the end-to-end latency (sender's WebSocket -> receiver's WebSocket, the
same clock: client and servers run on one machine).

Measured per system: deliveries/s, latency p50/p95/p99, lost (acked x members - received) and duplicated
deliveries, server CPU µs per delivery (utime+stime of the server processes from /proc/<pid>/stat), KB
of server memory per idle connection (VmRSS delta / N) and server CPU while everyone is connected and idle.
The client is one asyncio process; on a small machine it is often the bottleneck, which is why the ratio
of CPU per delivery (the server's own cost) is the fair comparison, and why the systems run back to back
on the same Redis, in one run. Over 400 lines: the workload driver and its per-system measurement share the
counters and the process table of one run; the peers' own code is in ``bench/peer_centrifugo.py``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import websockets
from bson import ObjectId

from bench.connects import profilers_start, profilers_stop
from bench.fanout_probe import ColdStart, message_n, runq_wait_s

# Re-exported for manage.py bench, which imports this module only (the import-linter contract).
from bench.peer_centrifugo import OPEN_TIMEOUT_S
from bench.peer_centrifugo import CentrifugoConn as CentrifugoConn
from bench.peer_centrifugo import centrifugo_spawn as centrifugo_spawn
from bench.peer_centrifugo import centrifugo_version as centrifugo_version
from bench.peer_centrifugo import connect_token as connect_token
from bench.quiet_lock import quiet_lock_async

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / "bench" / "peer"
CONNECT_CONCURRENCY = 50  # handshakes in flight at once: fast, without a SYN flood on a 2-core machine
GRACE_S = 10.0  # after the last send, at most this long for what is in flight (it stops as soon as all arrived)
SETTLE_CPU_PCT = 5.0  # servers count as settled below this % of a core (idle connections cost far less)
SETTLE_MAX_S = 60.0
# At most this long for the brokers' background work of the connects (users.last_seen writes and presence
# announcements: FerretDB takes ~15 ms per write here, so 10,000 connects leave minutes of it).
SETTLE_WORK_MAX_S = 900.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ process measurements


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_total(pids: list[int]) -> float:
    return sum(proc_cpu_s(p) for p in pids)


def rss_total(pids: list[int]) -> int:
    return sum(proc_rss_kb(p) for p in pids)


# ------------------------------------------------------------------ results


@dataclass
class Result:
    system: str
    connections: int
    conversations: int
    duration_s: float
    sent: int = 0
    acked: int = 0
    expected: int = 0
    delivered: int = 0
    duplicated: int = 0
    errors: int = 0
    deliveries_per_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_s: float = 0.0
    cpu_us_per_delivery: float = 0.0
    deliveries_per_core_s: float = 0.0
    # The same, drained: server CPU from the window's start until every delivery of the messages acked in it
    # arrived (or GRACE_S ran out) over all those deliveries. A system that ends the window with a backlog
    # (seconds of p99 when the load client is the bottleneck) has spent window CPU on deliveries the window
    # does not count; this counts both (docs/benchmarks.md, "Issue 16: 10,000 connections as fast as acked").
    cpu_us_per_delivery_drained: float = 0.0
    kb_per_idle_connection: float = 0.0
    idle_cpu_pct: float = 0.0
    client_cpu_s: float = 0.0
    # The load client's CPU over the timed window in % of one core: near 100 the client (one process, one
    # thread), not the server, sets the pace, and deliveries/s say nothing about the server.
    client_cpu_pct: float = 0.0
    # Why a run fell short of the offered load (bench/fanout_probe.py): messages sent per second (against
    # --rate), and the share of the window the client's and the servers' threads waited, runnable, for a
    # CPU (100 % = one thread waiting all the time).
    sent_per_s: float = 0.0
    client_wait_pct: float = 0.0
    server_wait_pct: float = 0.0
    # Seconds from the first handshake to the last connection ready (CONNECT_CONCURRENCY in flight).
    connect_s: float = 0.0
    # First message of each conversation against its later ones (bench/fanout_probe.py ColdStart).
    cold_start: dict[str, float | int] = field(default_factory=dict)
    missing_sample: list[str] = field(default_factory=list)  # for diagnosis when lost > 0
    timeline: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (t since start, latency ms)

    @property
    def lost(self) -> int:
        return max(0, self.expected - (self.delivered - self.duplicated))

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("timeline")
        data["lost"] = self.lost
        return data


class Counters:
    """What the receivers saw: per (connection, message) once, latencies with their time."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, str]] = set()
        self.delivered = 0
        self.duplicated = 0
        self.errors = 0
        self.acked = 0
        self.sent = 0
        self.timeline: list[tuple[float, float]] = []
        self.started = 0.0
        self.measuring = False
        self.window_deliveries = 0
        self.sent_at: dict[str, float] = {}  # client_msg_id -> send time, for frames that cannot carry it
        self.cold = ColdStart()

    def on_message(self, conn: int, client_msg_id: str, sent_at: float) -> None:
        now = time.time()
        key = (conn, client_msg_id)
        self.delivered += 1
        if key in self.seen:
            self.duplicated += 1
            return
        self.seen.add(key)
        latency = (now - sent_at) * 1000.0
        self.timeline.append((now - self.started, latency))
        self.cold.add(message_n(client_msg_id), latency)
        if self.measuring:
            self.window_deliveries += 1


# ------------------------------------------------------------------ clients of the systems


# What a ChatStream "system" sends (docs/benchmarks.md, "Features"): plain messages; replies (every message
# after the first answers the conversation's first message, so each carries a quote); reactions (after a first
# message, each send toggles the sender's 👍 on it: reaction.add, then reaction.remove, ...; every one is an
# event with its own seq, delivered to every member like a message).
CHATSTREAM_MODES = {"chatstream": "send", "chatstream-daphne": "send", "chatstream-alt": "send",
                    "chatstream-reply": "reply", "chatstream-react": "react"}


class ChatStreamConn:
    def __init__(self, index: int, url: str, counters: Counters, on_ack: Callable[[str], None], *,
                 mode: str = "send", conversation_index: dict[str, int] | None = None, mention: str = "") -> None:
        # " @<username>" after the send time in every message this connection sends (--mention): the cost of
        # resolving and recording a mention (docs/benchmarks.md, "Features").
        self.mention = mention
        self.index, self.url, self.counters, self.on_ack = index, url, counters, on_ack
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None
        self.mode = mode
        # conversation id -> its index: a reaction frame's key is "<index>-<seq>" (the sender's n-th send of a
        # conversation takes seq n: one sender per conversation, one send in flight).
        self.conversation_index = conversation_index or {}
        self.first: dict[str, str] = {}  # conversation id -> the id of the first message this connection sent

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, origin="http://127.0.0.1",  # type: ignore[arg-type]
                                           open_timeout=OPEN_TIMEOUT_S, max_queue=None, compression=None)
        ready = json.loads(await self.ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"connection {self.index}: expected ready, got {ready}")
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        counters = self.counters
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message.new":
                    message = frame["message"]
                    counters.on_message(self.index, message["client_msg_id"],
                                        float(message["content"].split(" ", 1)[0]))
                elif kind in ("reaction.added", "reaction.removed"):
                    key = f"{self.conversation_index.get(frame['conversation_id'], -1)}-{frame['seq']}"
                    counters.on_message(self.index, key, counters.sent_at.get(key, time.time()))
                elif kind == "ack":
                    if frame.get("message_id") and frame.get("conversation_id") not in self.first:
                        self.first[frame["conversation_id"]] = frame["message_id"]
                    self.on_ack(frame.get("client_msg_id") or frame.get("ref") or "")
                elif kind == "error":
                    counters.errors += 1
        except websockets.exceptions.ConnectionClosed:
            pass

    async def send(self, conversation_id: str, client_msg_id: str) -> None:
        first = self.first.get(conversation_id)
        if self.mode == "react" and first is not None:
            n = int(client_msg_id.rsplit("-", 1)[1])
            self.counters.sent_at[client_msg_id] = time.time()
            await self.ws.send(json.dumps({"type": "reaction.add" if n % 2 == 0 else "reaction.remove",
                                           "ref": client_msg_id, "message_id": first, "emoji": "👍"}))
            return
        frame = {"type": "message.send", "conversation_id": conversation_id, "client_msg_id": client_msg_id,
                 "content": f"{time.time():.6f}{self.mention}"}
        if self.mode == "reply" and first is not None:
            frame["reply_to"] = first
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            await asyncio.wait([self.task], timeout=5)


class SocketIOConn:
    """Engine.IO 4 / Socket.IO 5 over a raw WebSocket (no polling), the part of the protocol the peer uses."""

    def __init__(self, index: int, url: str, counters: Counters, on_ack: Callable[[str], None], *,
                 user: str, rooms: list[str]) -> None:
        self.index, self.url, self.counters, self.on_ack = index, url, counters, on_ack
        self.user, self.rooms = user, rooms
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None
        self.ack_ids: dict[int, str] = {}
        self.next_ack = 0

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, open_timeout=OPEN_TIMEOUT_S, max_queue=None, compression=None)
        opening = await self.ws.recv()
        if not opening.startswith("0"):
            raise RuntimeError(f"socket.io connection {self.index}: unexpected {opening[:80]!r}")
        await self.ws.send("40" + json.dumps({"user": self.user, "rooms": self.rooms}))
        connected = await self.ws.recv()
        if not connected.startswith("40"):
            raise RuntimeError(f"socket.io connection {self.index}: refused {connected[:80]!r}")
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        counters = self.counters
        try:
            async for raw in self.ws:
                if raw.startswith("42"):
                    event, message = json.loads(raw[2:])
                    if event == "message":
                        counters.on_message(self.index, message["client_msg_id"], float(message["content"]))
                elif raw.startswith("43"):
                    cut = raw.index("[")
                    client_msg_id = self.ack_ids.pop(int(raw[2:cut]), "")
                    answer = json.loads(raw[cut:])[0]
                    if "error" in answer:
                        counters.errors += 1
                    else:
                        self.on_ack(client_msg_id)
                elif raw == "2":
                    await self.ws.send("3")
        except websockets.exceptions.ConnectionClosed:
            pass

    async def send(self, conversation_id: str, client_msg_id: str) -> None:
        self.next_ack += 1
        self.ack_ids[self.next_ack] = client_msg_id
        payload = {"conversation_id": conversation_id, "client_msg_id": client_msg_id,
                   "content": f"{time.time():.6f}"}
        await self.ws.send(f"42{self.next_ack}" + json.dumps(["send", payload]))

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            await asyncio.wait([self.task], timeout=5)


class Conn(Protocol):
    """A client connection of any system: ChatStreamConn, SocketIOConn, peer_centrifugo.CentrifugoConn."""

    async def open(self) -> None: ...

    async def send(self, conversation_id: str, client_msg_id: str) -> None: ...

    async def close(self) -> None: ...


# Builds connection ``index`` of a system the caller set up (its URL, credentials, channel).
ConnFactory = Callable[[int, Counters, Callable[[str], None]], Conn]


# ------------------------------------------------------------------ the workload


@dataclass
class Workload:
    connections: int
    conversations: int
    duration_s: float
    rate: float  # messages/s over all conversations; 0 = as fast as acked
    # Seconds everyone sits connected and idle while memory and idle CPU are measured: the 3 s default keeps
    # runs short; 40 s covers a full presence refresh (20 s) and keepalive ping (20 s) cycle.
    idle_s: float = 3.0
    # ChatStream only: every message names the conversation's second member (@username), resolved by the
    # write path (messaging/mentions.py).
    mention: bool = False
    # py-spy (raw folded stacks) of the Python servers and of this load client over the traffic window, into
    # this folder (empty: none).
    profile_dir: str = ""
    # The folder of the shared machine's benchmark locks (bench/quiet_lock.py); empty: none.
    quiet_lock_dir: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def progress(out: TextIO, label: str, elapsed: float, total: float, counters: Counters) -> None:
    width = 30
    done = min(width, int(width * elapsed / total)) if total else width
    recent = [lat for t, lat in counters.timeline[-5000:] if t >= elapsed - 1.0]
    p99 = percentile(recent, 0.99)
    out.write(f"\r{label:<10} [{'#' * done}{'.' * (width - done)}] {elapsed:5.1f}/{total:.0f}s "
              f"delivered {counters.delivered:>9,}  acked {counters.acked:>7,}  p99(recent) {p99:6.1f} ms")
    out.flush()


async def run_workload(*, system: str, conns: list[Conn], members: list[list[int]], conversation_ids: list[str],
                       workload: Workload, server_pids: list[int], counters: Counters,
                       acks: dict[str, asyncio.Future[None]], out: TextIO,
                       settled: Callable[[], bool] | None = None) -> Result:
    """Connect everyone, measure idle memory and CPU, run the traffic, wait for in-flight deliveries.
    ``settled`` (blocking, run in a thread): true once the servers finished their per-connection work."""
    rss_before = rss_total(server_pids)
    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(conn: Conn) -> None:
        async with semaphore:
            await conn.open()

    t0 = time.monotonic()
    await asyncio.gather(*(open_one(c) for c in conns))
    connect_s = time.monotonic() - t0
    out.write(f"{system}: {len(conns)} connections open in {connect_s:.1f}s\n")
    # Let the servers finish their per-connection work (ChatStream writes users.last_seen in the background):
    # wait until they use under SETTLE_CPU_PCT of a core over a second, at most SETTLE_MAX_S.
    if settled is not None:
        t1 = time.monotonic()
        while not await asyncio.to_thread(settled) and time.monotonic() - t1 < SETTLE_WORK_MAX_S:
            await asyncio.sleep(2.0)
        out.write(f"{system}: per-connection work done {time.monotonic() - t1:.1f}s after the last ready\n")
    async with quiet_lock_async(workload.quiet_lock_dir):
        if workload.quiet_lock_dir:
            out.write(f"{system}: quiet lock held; load average {os.getloadavg()[0]:.2f}\n")
        return await measure_connected(system=system, conns=conns, members=members,
                                       conversation_ids=conversation_ids, workload=workload,
                                       server_pids=server_pids, counters=counters, acks=acks, out=out,
                                       rss_before=rss_before, connect_s=connect_s)


async def measure_connected(*, system: str, conns: list[Conn], members: list[list[int]],
                            conversation_ids: list[str], workload: Workload, server_pids: list[int],
                            counters: Counters, acks: dict[str, asyncio.Future[None]], out: TextIO,
                            rss_before: int, connect_s: float) -> Result:
    """Everyone connected: measure idle memory and CPU, run the traffic, wait for in-flight deliveries."""
    settle_deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < settle_deadline:
        before = cpu_total(server_pids)
        await asyncio.sleep(1.0)
        if 100.0 * (cpu_total(server_pids) - before) < SETTLE_CPU_PCT:
            break
    cpu_idle_start = cpu_total(server_pids)
    await asyncio.sleep(workload.idle_s)
    idle_cpu = cpu_total(server_pids) - cpu_idle_start
    rss_idle = rss_total(server_pids)

    result = Result(system=system, connections=len(conns), conversations=len(conversation_ids),
                    duration_s=workload.duration_s)
    result.kb_per_idle_connection = (rss_idle - rss_before) / max(1, len(conns))
    result.connect_s = connect_s
    result.idle_cpu_pct = 100.0 * idle_cpu / workload.idle_s

    stop_at = 0.0
    seq = 0

    async def sender(conv_index: int) -> None:
        nonlocal seq
        conn = conns[members[conv_index][0]]
        conversation_id = conversation_ids[conv_index]
        interval = len(conversation_ids) / workload.rate if workload.rate > 0 else 0.0
        next_at = time.monotonic() + (interval * conv_index / len(conversation_ids))
        n = 0
        while time.monotonic() < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            n += 1
            client_msg_id = f"{conv_index}-{n}"
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            acks[client_msg_id] = future
            counters.sent += 1
            await conn.send(conversation_id, client_msg_id)
            if not interval:
                try:
                    await asyncio.wait_for(future, 10)
                except TimeoutError:
                    counters.errors += 1

    def on_progress_tick(elapsed: float) -> None:
        progress(out, system, elapsed, workload.duration_s, counters)

    # This process is the load generator of every connection: its own cyclic-GC pauses (the full collections
    # walk every connection's objects) showed up as latency spikes of whichever system was measured, every
    # ~9 s at 500 msg/s. The traffic window is bounded, so the collector is off for it (refcounting still
    # frees nearly everything; the rest waits for the enable below).
    gc.collect()
    gc.freeze()
    gc.disable()
    spies = profilers_start(workload.profile_dir, {f"{system}-server": server_pids, f"{system}-client": [os.getpid()]})
    cpu_start = cpu_total(server_pids)
    client_start = resource.getrusage(resource.RUSAGE_SELF)
    client_pid = [os.getpid()]
    client_wait_start, server_wait_start = runq_wait_s(client_pid), runq_wait_s(server_pids)
    counters.started = time.time()
    counters.measuring = True
    started = time.monotonic()
    stop_at = started + workload.duration_s
    tasks = [asyncio.get_running_loop().create_task(sender(i)) for i in range(len(conversation_ids))]
    while (elapsed := time.monotonic() - started) < workload.duration_s:
        on_progress_tick(elapsed)
        await asyncio.sleep(0.5)
    counters.measuring = False
    window = time.monotonic() - started
    window_deliveries = counters.window_deliveries
    cpu_window = cpu_total(server_pids) - cpu_start
    client_window = resource.getrusage(resource.RUSAGE_SELF)
    client_wait = runq_wait_s(client_pid) - client_wait_start
    server_wait = runq_wait_s(server_pids) - server_wait_start
    sent_in_window = counters.sent
    await asyncio.to_thread(profilers_stop, spies)
    await asyncio.gather(*tasks)
    on_progress_tick(workload.duration_s)
    out.write("\n")
    expected_members = {i: len(m) for i, m in enumerate(members)}
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        counters.acked = sum(1 for f in acks.values() if f.done())
        expected = sum(expected_members[int(k.split("-")[0])] for k, f in acks.items() if f.done())
        if counters.delivered - counters.duplicated >= expected:
            break
        await asyncio.sleep(0.1)
    cpu_drained = cpu_total(server_pids) - cpu_start
    client_end = resource.getrusage(resource.RUSAGE_SELF)
    gc.enable()
    gc.unfreeze()

    result.sent = counters.sent
    result.acked = counters.acked = sum(1 for f in acks.values() if f.done())
    result.expected = sum(expected_members[int(k.split("-")[0])] for k, f in acks.items() if f.done())
    result.delivered = counters.delivered
    result.duplicated = counters.duplicated
    result.errors = counters.errors
    result.deliveries_per_s = window_deliveries / window
    latencies = [lat for _, lat in counters.timeline]
    result.p50_ms = percentile(latencies, 0.50)
    result.p95_ms = percentile(latencies, 0.95)
    result.p99_ms = percentile(latencies, 0.99)
    result.server_cpu_s = cpu_window
    result.cpu_us_per_delivery = 1e6 * cpu_window / max(1, window_deliveries)
    result.cpu_us_per_delivery_drained = 1e6 * cpu_drained / max(1, counters.delivered - counters.duplicated)
    result.deliveries_per_core_s = window_deliveries / cpu_window if cpu_window else 0.0
    result.client_cpu_s = (client_end.ru_utime + client_end.ru_stime) - (client_start.ru_utime
                                                                          + client_start.ru_stime)
    result.client_cpu_pct = 100.0 * ((client_window.ru_utime + client_window.ru_stime)
                                     - (client_start.ru_utime + client_start.ru_stime)) / window
    result.timeline = counters.timeline
    result.sent_per_s = sent_in_window / window
    result.client_wait_pct = 100.0 * client_wait / window
    result.server_wait_pct = 100.0 * server_wait / window
    result.cold_start = counters.cold.summary()
    missing = [(conn, k) for k, f in acks.items() if f.done()
               for conn in members[int(k.split("-")[0])] if (conn, k) not in counters.seen]
    result.missing_sample = [f"connection {conn} lacks {k}" for conn, k in missing[:20]]
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return result


# ------------------------------------------------------------------ the two systems


def population(*, connections: int, conversations: int) -> list[list[int]]:
    """Connection indexes of each conversation's members: R groups of N/R, round robin."""
    members: list[list[int]] = [[] for _ in range(conversations)]
    for i in range(connections):
        members[i % conversations].append(i)
    return members


# Connection index -> username of the last chatstream_setup (for --mention).
USERNAMES: dict[int, str] = {}


def chatstream_setup(*, redis_url: str, members: list[list[int]],
                     connections: int) -> tuple[list[str], list[str], list[ObjectId]]:
    """Users, conversations (MongoDB) and one ticket per connection (Redis). Returns (conversation ids,
    tickets by connection, user ids by connection)."""
    import redis as redis_sync
    from django.conf import settings

    from core.documents import Conversation, User
    from core.keys import TICKET_PREFIX

    user_ids = [ObjectId() for _ in range(connections)]
    run = ObjectId()
    User._get_collection().insert_many([
        {"_id": uid, "username": f"b{run}{i}", "username_key": f"b{run}{i}", "email": f"b{run}{i}@bench.test",
         "password": "!", "status": "offline"} for i, uid in enumerate(user_ids)])
    conversation_ids = [ObjectId() for _ in members]
    Conversation._get_collection().insert_many([
        {"_id": cid, "type": "group", "room_id": ObjectId(), "members": [user_ids[i] for i in group],
         "last_seq": 0, "read_cursors": {}} for cid, group in zip(conversation_ids, members, strict=True)])
    client = redis_sync.Redis.from_url(redis_url)
    # What the REST service's group creation does after its MongoDB writes (api.services._membership_notify):
    # the members' set goes into Redis, so the first send of each conversation reads no MongoDB (issue 16).
    from messaging import selectors
    from messaging.membership import membership_changed_sync
    for cid, group in zip(conversation_ids, members, strict=True):
        membership_changed_sync(client, user_ids=[str(user_ids[i]) for i in group], conversation_id=str(cid))
    from messaging.mentions import usernames_remember_sync
    USERNAMES.clear()
    USERNAMES.update({i: f"b{run}{i}" for i in range(connections)})
    usernames_remember_sync(client, names={f"b{run}{i}": str(uid) for i, uid in enumerate(user_ids)})
    tickets = [ObjectId().binary.hex() + os.urandom(8).hex() for _ in range(connections)]
    with client.pipeline(transaction=False) as pipe:
        for i, ticket in enumerate(tickets):
            pipe.set(TICKET_PREFIX + ticket, json.dumps({"user_id": str(user_ids[i]), "username": f"b{i}"}),
                     ex=max(3600, int(settings.WS_TICKET_TTL_S)))  # 10,000 connects on a loaded machine: > 10 min
        # Each user's cached conversation ids, as a user's registration and group joins through the API leave
        # them in Redis (messaging.selectors.user_conversation_ids): a connect then reads no store, which is
        # the steady state to measure; without this each of 10,000 first connects scanned FerretDB (issue 16).
        for cid, group in zip(conversation_ids, members, strict=True):
            for i in group:
                key = selectors.user_conversations_key(str(user_ids[i]))
                pipe.sadd(key, str(cid))
                pipe.expire(key, selectors.USER_CONVERSATIONS_TTL_S)
        pipe.execute()
    client.close()
    return [str(c) for c in conversation_ids], tickets, user_ids


def chatstream_online_all(user_ids: list[ObjectId], *, redis_url: str) -> bool:
    """Whether the broker finished its connect work for every one of ``user_ids``: each is "online since" in
    ``PRESENCE_SINCE_KEY``, which the broker's presence script writes (and then announces) in the background
    after ``ready``. Not ``users.status``: since ADR 0051 a connect writes nothing to the store, and waiting for
    it held every ChatStream run for SETTLE_WORK_MAX_S."""
    import redis as redis_sync

    from core.keys import PRESENCE_SINCE_KEY
    from core.values import as_str

    client = redis_sync.Redis.from_url(redis_url)
    try:
        since = client.hmget(PRESENCE_SINCE_KEY, [str(u) for u in user_ids])
    finally:
        client.close()
    return all(s is not None and as_str(s).startswith("+") for s in since)


def brokers_spawn(*, count: int, env: dict[str, str], log_dir: Path) -> list[tuple[subprocess.Popen[bytes], int]]:
    from chatstream_site.localservers import free_port, wait_port

    spawned = []
    for i in range(count):
        port = free_port()
        log = open(log_dir / f"broker-{i + 1}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "manage.py", "role", "broker", "--instance", str(i + 1),
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        spawned.append((proc, port))
    for proc, port in spawned:
        wait_port(port, timeout_s=60, proc=proc)
    return spawned


def peers_spawn(*, count: int, redis_url: str, log_dir: Path) -> list[tuple[subprocess.Popen[bytes], int]]:
    from chatstream_site.localservers import free_port, wait_port

    node = shutil.which("node")
    if node is None or not (PEER_DIR / "node_modules" / "socket.io").exists():
        raise RuntimeError("the Socket.IO peer needs node and `npm ci` in bench/peer (see docs/benchmarks.md)")
    spawned = []
    for i in range(count):
        port = free_port()
        log = open(log_dir / f"peer-{i + 1}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([node, str(PEER_DIR / "server.js"), "--port", str(port), "--redis", redis_url],
                                cwd=PEER_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        spawned.append((proc, port))
    for proc, port in spawned:
        wait_port(port, timeout_s=30, proc=proc)
    return spawned


def processes_stop(spawned: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    for proc, _ in spawned:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in spawned:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def measure(*, system: str, urls: list[str], workload: Workload, members: list[list[int]],
                  conversation_ids: list[str], tickets: list[str] | None, server_pids: list[int],
                  out: TextIO, settled: Callable[[], bool] | None = None,
                  conn_factory: ConnFactory | None = None) -> Result:
    """Run ``workload`` against one system: ChatStream with ``tickets``, else a peer's ``conn_factory``
    connections, else Socket.IO connections to ``urls``."""
    counters = Counters()
    acks: dict[str, asyncio.Future[None]] = {}

    def on_ack(client_msg_id: str) -> None:
        future = acks.get(client_msg_id)
        if future is not None and not future.done():
            future.set_result(None)
            counters.acked += 1

    conv_of = {i: c for c, group in enumerate(members) for i in group}
    conns: list[Conn] = []
    for i in range(workload.connections):
        url = urls[i % len(urls)]
        if conn_factory is not None:
            conns.append(conn_factory(i, counters, on_ack))
        elif tickets is not None:
            group = members[conv_of[i]]
            named = USERNAMES.get(group[1 % len(group)], "") if workload.mention else ""
            conns.append(ChatStreamConn(i, f"{url}?ticket={tickets[i]}", counters, on_ack,
                                        mode=CHATSTREAM_MODES.get(system, "send"),
                                        conversation_index={c: n for n, c in enumerate(conversation_ids)},
                                        mention=f" @{named}" if named else ""))
        else:
            conns.append(SocketIOConn(i, url, counters, on_ack, user=f"u{i}",
                                      rooms=[conversation_ids[conv_of[i]]]))
    return await run_workload(system=system, conns=conns, members=members, conversation_ids=conversation_ids,
                              workload=workload, server_pids=server_pids, counters=counters, acks=acks, out=out,
                              settled=settled)


def plot(results: list[Result], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for index, result in enumerate(results):
        buckets: dict[int, list[float]] = {}
        for t, lat in result.timeline:
            buckets.setdefault(int(t * 4), []).append(lat)  # quarter-second buckets
        xs = sorted(buckets)
        color = f"C{index}"  # one colour per system: p50 solid, p99 dashed
        ax.plot([x / 4 for x in xs], [percentile(buckets[x], 0.5) for x in xs], color=color,
                label=f"{result.system} p50")
        ax.plot([x / 4 for x in xs], [percentile(buckets[x], 0.99) for x in xs], color=color, linestyle="--",
                label=f"{result.system} p99")
    ax.set_xlabel("seconds since the first send")
    ax.set_ylabel("WebSocket-to-WebSocket latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[Result]) -> str:
    rows = [("system", "deliv/s", "p50 ms", "p95 ms", "p99 ms", "lost", "dup", "CPU µs/deliv", "drained",
             "deliv/core-s", "KB/idle conn", "idle CPU %", "client CPU %", "sent/s", "client wait %",
             "server wait %", "conn/s", "1st msg p50/p99 ms", "n>=10 p50/p99 ms")]
    for r in results:
        rows.append((r.system, f"{r.deliveries_per_s:,.0f}", f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}",
                     f"{r.p99_ms:.2f}", str(r.lost), str(r.duplicated), f"{r.cpu_us_per_delivery:.1f}",
                     f"{r.cpu_us_per_delivery_drained:.1f}",
                     f"{r.deliveries_per_core_s:,.0f}", f"{r.kb_per_idle_connection:.1f}",
                     f"{r.idle_cpu_pct:.2f}", f"{r.client_cpu_pct:.0f}", f"{r.sent_per_s:,.0f}",
                     f"{r.client_wait_pct:.0f}", f"{r.server_wait_pct:.0f}",
                     f"{r.connections / r.connect_s:,.0f}" if r.connect_s else "-",
                     f"{r.cold_start.get('first_p50_ms', 0):.1f}/{r.cold_start.get('first_p99_ms', 0):.1f}",
                     f"{r.cold_start.get('steady_p50_ms', 0):.1f}/{r.cold_start.get('steady_p99_ms', 0):.1f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_stats(results: list[Result]) -> dict[str, Any]:
    out: dict[str, Any] = {"results": [r.summary() for r in results]}
    by = {r.system: r for r in results}
    if "chatstream" in by and "socketio" in by:
        cs, sio = by["chatstream"], by["socketio"]
        out["ratio_deliveries_per_core"] = (cs.deliveries_per_core_s / sio.deliveries_per_core_s
                                            if sio.deliveries_per_core_s else None)
        out["ratio_deliveries_per_s"] = (cs.deliveries_per_s / sio.deliveries_per_s
                                         if sio.deliveries_per_s else None)
        out["ratio_deliveries_per_core_drained"] = (sio.cpu_us_per_delivery_drained / cs.cpu_us_per_delivery_drained
                                                    if cs.cpu_us_per_delivery_drained else None)
    if "chatstream" in by and "centrifugo" in by:
        cs, cf = by["chatstream"], by["centrifugo"]
        out["ratio_centrifugo_deliveries_per_core"] = (cs.deliveries_per_core_s / cf.deliveries_per_core_s
                                                       if cf.deliveries_per_core_s else None)
        out["ratio_centrifugo_deliveries_per_s"] = (cs.deliveries_per_s / cf.deliveries_per_s
                                                    if cf.deliveries_per_s else None)
        out["ratio_centrifugo_deliveries_per_core_drained"] = (
            cf.cpu_us_per_delivery_drained / cs.cpu_us_per_delivery_drained if cs.cpu_us_per_delivery_drained else None)
    if "chatstream-daphne" in by and "socketio" in by and by["socketio"].deliveries_per_core_s:
        out["ratio_daphne_deliveries_per_core"] = (by["chatstream-daphne"].deliveries_per_core_s
                                                   / by["socketio"].deliveries_per_core_s)
    # What a feature adds (docs/benchmarks.md, "Features"): server CPU per delivery against plain sends, same run.
    for feature in ("chatstream-reply", "chatstream-react"):
        if feature in by and "chatstream" in by and by["chatstream"].cpu_us_per_delivery:
            out[f"ratio_{feature.split('-')[1]}_cpu_per_delivery"] = (by[feature].cpu_us_per_delivery
                                                                      / by["chatstream"].cpu_us_per_delivery)
    out["median_latency_all_ms"] = {r.system: statistics.median([lat for _, lat in r.timeline] or [0.0])
                                    for r in results}
    # The cold start, apart (issue 16): p99 of the deliveries of messages SENT in the first second of traffic
    # (send time = arrival - latency) against those sent later. Both are inside p99_ms, which excludes nothing.
    out["p99_sent_first_second_ms"] = {
        r.system: percentile([lat for t, lat in r.timeline if t - lat / 1000.0 < 1.0], 0.99) for r in results}
    out["p99_sent_after_first_second_ms"] = {
        r.system: percentile([lat for t, lat in r.timeline if t - lat / 1000.0 >= 1.0], 0.99) for r in results}
    return out


def private_servers() -> tuple[Any, Path]:
    """A private Redis and FerretDB for this run (chatstream_site/localservers.py), so a benchmark never
    touches `make run`'s data and runs do not see each other's keys."""
    from chatstream_site.localservers import servers_start

    workdir = Path(tempfile.mkdtemp(prefix="chatstream-bench-"))
    return servers_start(workdir), workdir
