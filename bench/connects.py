"""Connects and idle cost through the gateway (issue 16): N WebSockets, each from its own ticket, to ``ready``.

    .venv/bin/python -m bench.connects --connections 10000 --conversations 1000 --idle-seconds 30

Starts a private Redis and FerretDB (FerretDB with its metrics endpoint, which counts the commands it ran),
one api instance, ``--brokers`` brokers and ``--gateways`` gateways, each as ``make run`` starts it
(``manage.py role ...``), on 127.0.0.1. Users and conversations are created as the REST services leave them
(MongoDB documents, then ``membership_changed_sync`` per conversation), one access token per user. Then
``--clients`` client processes (so the measuring process shares no loop with the load) each, for its share of
the users, ``POST /api/v1/auth/ws-ticket`` through a gateway and open ``/ws/?ticket=`` through it, waiting for
``ready``; ``--concurrency`` of those in flight per client (on bare asyncio protocols by default, the same
requests and frames as ``--client-impl websockets``, aiohttp and websockets, at a third of their CPU: the
clients share the machine with the servers they measure). Measured, in this order:

* **connect**: seconds from the first ticket request to the last ``ready`` (every client starts together),
  connects/s, and the percentiles of one connect (ticket request to ``ready``);
* **store reads per connect**: FerretDB's ``find``/``aggregate``/``count``/``distinct``/``getMore`` commands
  during the connects ÷ N (and its writes, apart), from its Prometheus counters;
* **settle**: how long after the last ``ready`` the servers' own background work of the connects ran
  (until they use under 5 % of a core over a second; bounded);
* **idle**: CPU of the brokers and of the gateways, each as % of one core over ``--idle-seconds`` with
  everyone connected and nothing sent, and RSS growth ÷ N of each (a warm-up of ``--warmup`` connections is
  opened and measured before, so lazy imports and pools are not counted per connection). With several
  gateways (each gets every ``--gateways``-th connection) the gateways' figures are also given one by one, so
  ``--gateway-env 2:NAME=VALUE`` compares two settings of the gateway in one run.

Everything is bounded (a connect times out after 60 s, the settle after 120 s) and stops by itself. The
process raises its own open-file limit (each proxied socket is two descriptors in a gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quiet_lock import quiet_lock  # noqa: E402

# FerretDB commands that read documents (the ones a connect must not run), and those that write.
STORE_READS = ("find", "aggregate", "count", "distinct", "getMore")
STORE_WRITES = ("insert", "update", "delete", "findAndModify")
SETTLE_CPU_PCT = 5.0
SETTLE_MAX_S = 120.0
CONNECT_TIMEOUT_S = 60.0
# Descriptors: a gateway holds two per proxied socket, a client process one, plus Redis and listening sockets.
NOFILE = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def nofile_raise() -> int:
    """Raise this process' (and its children's) open-file limit as far as allowed; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in ((NOFILE, NOFILE), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, wanted)
            return wanted[0]
        except (ValueError, OSError):
            continue
    return soft


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ferretdb_counts(metrics_url: str) -> dict[str, float]:
    """FerretDB's requests by command name (its ``ferretdb_client_requests_total`` counters)."""
    counts: dict[str, float] = {}
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 - our own loopback server
        for line in response.read().decode().splitlines():
            if line.startswith("ferretdb_client_requests_total{"):
                labels, value = line.rsplit(" ", 1)
                command = labels.split('command="', 1)[1].split('"', 1)[0]
                counts[command] = counts.get(command, 0.0) + float(value)
    return counts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# ------------------------------------------------------------------ the client processes


async def client_main() -> None:
    """One client process: reads its config (JSON line) from stdin, then commands: ``open N`` opens the next
    N connections (answering one JSON line of timings), ``close`` closes them all."""
    import aiohttp
    import websockets

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    if config.get("impl", "lean") == "lean":
        await client_lean(reader, config)
        return
    gateways: list[str] = config["gateways"]
    tokens: list[tuple[str, str]] = config["tokens"]  # (user id, access token)
    concurrency = int(config["concurrency"])
    conns: list[Any] = []
    at = 0
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), trust_env=False)
    print(json.dumps({"loaded": len(tokens)}), flush=True)

    async def ticket(index: int) -> dict[str, Any]:
        base = gateways[index % len(gateways)]
        for attempt in (1, 2):  # a keep-alive connection the server closed meanwhile is retried once
            try:
                async with session.post(f"http://{base}/api/v1/auth/ws-ticket",
                                        headers={"Authorization": f"Bearer {tokens[index][1]}"}) as response:
                    body = dict(await response.json())
                    if response.status != 200:
                        raise RuntimeError(f"ticket: {response.status} {body}")
                    return body
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def one(index: int, timings: list[float], errors: list[str], opened: dict[str, int]) -> None:
        base = gateways[index % len(gateways)]
        started = time.time()
        try:
            body = await ticket(index)
            ws = await websockets.connect(f"ws://{base}/ws/?ticket={body['ticket']}", open_timeout=CONNECT_TIMEOUT_S,
                                          compression=None, ping_interval=None, max_queue=16)
            ready = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT_S))
            if ready.get("type") != "ready":
                raise RuntimeError(f"expected ready, got {str(ready)[:200]}")
            conns.append(ws)
            timings.append(time.time() - started)
            opened[base] = opened.get(base, 0) + 1
        except Exception as exc:  # counted and reported, never fatal: the bench prints how many failed
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    while line := (await reader.readline()).decode().strip():
        if line == "close":
            await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
            await session.close()
            print(json.dumps({"closed": len(conns)}), flush=True)
            return
        count = int(line.split()[1])
        timings: list[float] = []
        errors: list[str] = []
        opened: dict[str, int] = {}  # gateway address -> connections opened through it
        semaphore = asyncio.Semaphore(concurrency)

        async def limited(index: int, timings: list[float] = timings, errors: list[str] = errors,
                          semaphore: asyncio.Semaphore = semaphore, opened: dict[str, int] = opened) -> None:
            async with semaphore:
                await one(index, timings, errors, opened)

        began = time.time()
        await asyncio.gather(*(limited(i) for i in range(at, min(at + count, len(tokens)))))
        at += count
        print(json.dumps({"began": began, "ended": time.time(), "timings": timings, "errors": errors[:20],
                          "failed": len(errors), "opened": opened}), flush=True)


class Client:
    def __init__(self, *, gateways: list[str], tokens: list[tuple[str, str]], concurrency: int, impl: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.connects", "--client"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask(json.dumps({"gateways": gateways, "tokens": tokens, "concurrency": concurrency, "impl": impl}))

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"client process exited with {self.proc.wait()}")
        return dict(json.loads(answer))


def clients_ask(clients: list[Client], line: str) -> list[dict[str, Any]]:
    """Send ``line`` to every client at once and collect their answers."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(lambda c: c.ask(line), clients))


# ------------------------------------------------------------------ the lean client (the default)
# The load generator shares the machine's two cores with the servers it measures: with aiohttp and websockets it
# used ~0.8 ms of CPU per connect (docs/benchmarks.md), a fifth of the whole. This one speaks the same protocol
# on bare asyncio protocols: an HTTP/1.1 POST for the ticket over a kept-alive connection, the WebSocket opening
# handshake (its Sec-WebSocket-Accept checked), the first frame read and checked to be ``ready``, pings answered
# with pongs, a close frame at the end; the servers do the same work for it as for the library clients
# (``--client-impl websockets`` keeps those, to compare).

class _Http(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: one request at a time (``post``)."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are no asyncio.Transport subclass
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buf[:end]).decode("latin-1").lower()
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip() == "close":
                self.closed = True
            elif name == "transfer-encoding":
                raise RuntimeError("ticket: chunked answer")  # the gateway answers with a length
        if len(self.buf) < end + 4 + length:
            return
        body = bytes(self.buf[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("ticket: connection closed"))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


class _Ws(asyncio.Protocol):
    """One client WebSocket: the opening handshake, then frames; ``ready`` resolves with the first text
    frame. Frames from the server are unmasked; this client's (pong, close) are masked, as RFC 6455 wants."""

    def __init__(self, request: bytes, accept: bytes, ready: asyncio.Future[bytes]) -> None:
        self.request, self.accept, self.ready = request, accept, ready
        self.transport: Any = None
        self.buf = bytearray()
        self.opened = False
        self.fragments = bytearray()

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are no asyncio.Transport subclass
        self.transport = transport
        transport.write(self.request)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.opened:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101") or self.accept not in head:
                self._fail(f"handshake: {head[:200]!r}")
                return
            self.opened = True
        while len(self.buf) >= 2:
            first, second = self.buf[0], self.buf[1]
            length, at = second & 0x7F, 2
            if length == 126:
                if len(self.buf) < 4:
                    return
                length, at = int.from_bytes(self.buf[2:4], "big"), 4
            elif length == 127:
                if len(self.buf) < 10:
                    return
                length, at = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < at + length:
                return
            payload = bytes(self.buf[at:at + length])
            del self.buf[:at + length]
            opcode = first & 0x0F
            if opcode == 9:
                self.send(0xA, payload)
            elif opcode == 8:
                self._fail(f"closed by the server: {payload[:2].hex()} {payload[2:200]!r}")
            elif opcode in (0, 1):
                self.fragments += payload
                if first & 0x80:
                    text, self.fragments = bytes(self.fragments), bytearray()
                    if not self.ready.done():
                        self.ready.set_result(text)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionResetError("websocket: connection closed"))

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))  # control frames: at most 125 bytes
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def close(self) -> None:
        self.send(0x8, (1000).to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()


async def client_lean(reader: asyncio.StreamReader, config: dict[str, Any]) -> None:
    import base64
    import hashlib

    loop = asyncio.get_running_loop()
    gateways: list[tuple[str, int]] = [(g.rsplit(":", 1)[0], int(g.rsplit(":", 1)[1])) for g in config["gateways"]]
    tokens: list[tuple[str, str]] = config["tokens"]
    concurrency = int(config["concurrency"])
    conns: list[_Ws] = []
    at = 0
    print(json.dumps({"loaded": len(tokens)}), flush=True)
    # One kept-alive ticket connection per worker and gateway, as aiohttp's pool keeps them.
    pools: list[dict[int, _Http]] = [{} for _ in range(concurrency)]

    async def ticket(worker: int, index: int) -> str:
        gateway = index % len(gateways)
        host, port = gateways[gateway]
        request = (f"POST /api/v1/auth/ws-ticket HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   f"Authorization: Bearer {tokens[index][1]}\r\nContent-Length: 0\r\n\r\n").encode()
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile is retried once
            http = pools[worker].get(gateway)
            if http is None or http.closed:
                _, http = await loop.create_connection(_Http, host, port)
                pools[worker][gateway] = http
            try:
                status, body = await http.post(request)
            except ConnectionResetError:
                if attempt == 2:
                    raise
                continue
            answer = json.loads(body)
            if status != 200:
                raise RuntimeError(f"ticket: {status} {answer}")
            return str(answer["ticket"])
        raise AssertionError("unreachable")

    async def one(worker: int, index: int, timings: list[float], errors: list[str], opened: dict[str, int]) -> None:
        host, port = gateways[index % len(gateways)]
        started = time.time()
        try:
            key = base64.b64encode(os.urandom(16))
            # RFC 6455 fixes SHA-1 for the accept value (no security role here).
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11",
                                                   usedforsecurity=False).digest())
            request = (f"GET /ws/?ticket={await ticket(worker, index)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                       f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                       f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
            ready: asyncio.Future[bytes] = loop.create_future()
            _, ws = await loop.create_connection(lambda: _Ws(request, accept, ready), host, port)
            try:
                frame = json.loads(await asyncio.wait_for(ready, CONNECT_TIMEOUT_S))
            except BaseException:
                ws.close()
                raise
            if frame.get("type") != "ready":
                ws.close()
                raise RuntimeError(f"expected ready, got {str(frame)[:200]}")
            conns.append(ws)
            timings.append(time.time() - started)
            opened[f"{host}:{port}"] = opened.get(f"{host}:{port}", 0) + 1
        except Exception as exc:  # counted and reported, never fatal: the bench prints how many failed
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    while line := (await reader.readline()).decode().strip():
        if line == "close":
            for ws in conns:
                ws.close()
            for pool in pools:
                for http in pool.values():
                    if http.transport is not None:
                        http.transport.close()
            await asyncio.sleep(0.5)  # the close frames leave
            print(json.dumps({"closed": len(conns)}), flush=True)
            return
        indices = iter(range(at, min(at + int(line.split()[1]), len(tokens))))
        at = min(at + int(line.split()[1]), len(tokens))
        timings: list[float] = []
        errors: list[str] = []
        opened: dict[str, int] = {}  # gateway address -> connections opened through it

        async def worker(number: int, timings: list[float] = timings, errors: list[str] = errors,
                         opened: dict[str, int] = opened, indices: Any = indices) -> None:
            for index in indices:
                await one(number, index, timings, errors, opened)

        began = time.time()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        print(json.dumps({"began": began, "ended": time.time(), "timings": timings, "errors": errors[:20],
                          "failed": len(errors), "opened": opened}), flush=True)


# ------------------------------------------------------------------ the run


def profilers_start(folder: str, groups: dict[str, list[int]]) -> list[subprocess.Popen[bytes]]:
    """py-spy on every process of ``groups`` until :func:`profilers_stop` (nothing if ``folder`` is empty)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not folder:
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "-p", str(pid), "-f", "raw", "--nonblocking", "-o",
                              str(Path(folder) / f"{name}-{i + 1}.txt")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            for name, pids in groups.items() for i, pid in enumerate(pids)]


def profilers_stop(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()


def population(*, users: int, conversations: int, redis_url: str) -> list[tuple[str, str]]:
    """Users and group conversations as the REST services leave them; returns (user id, username) each."""
    import redis
    from bson import ObjectId

    from core.documents import Conversation, User
    from messaging.membership import membership_changed_sync
    from messaging.selectors import user_conversations_init

    run = ObjectId()
    user_ids = [ObjectId() for _ in range(users)]
    User._get_collection().insert_many([
        {"_id": uid, "username": f"c{run}{i}", "username_key": f"c{run}{i}", "email": f"c{run}{i}@bench.test",
         "password": "!", "status": "offline"} for i, uid in enumerate(user_ids)])
    groups: list[list[ObjectId]] = [[] for _ in range(conversations)]
    for i, uid in enumerate(user_ids):
        groups[i % conversations].append(uid)
    conversation_ids = [ObjectId() for _ in groups]
    Conversation._get_collection().insert_many([
        {"_id": cid, "type": "group", "room_id": ObjectId(), "members": group, "last_seq": 0, "read_cursors": {}}
        for cid, group in zip(conversation_ids, groups, strict=True)])
    client = redis.Redis.from_url(redis_url)
    with client.pipeline(transaction=False) as pipe:
        for uid in user_ids:  # what registration does (api.services.auth_register)
            user_conversations_init(pipe, user_id=str(uid))
        pipe.execute()
    for cid, group in zip(conversation_ids, groups, strict=True):
        membership_changed_sync(client, user_ids=[str(u) for u in group], conversation_id=str(cid))
    client.close()
    return [(str(uid), f"c{run}{i}") for i, uid in enumerate(user_ids)]


def tokens_issue(users: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(user id, access token) of each (user id, username): issued just before the clients start, so a run
    that waited for the quiet lock longer than an access token lives (JWT_ACCESS_TTL) still connects."""
    from core.tokens import token_issue

    return [(uid, token_issue(user_id=uid, username=name, type="access")) for uid, name in users]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--brokers", type=int, default=1)
    parser.add_argument("--gateways", type=int, default=1)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight per client process")
    parser.add_argument("--client-impl", choices=("lean", "websockets"), default="lean",
                        help="the load generator: bare asyncio protocols (lean) or aiohttp and websockets (the "
                             "clients of sessions 2-9); the same protocol either way")
    parser.add_argument("--warmup", type=int, default=100, help="connections opened before the baseline")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--profile", default="",
                        help="folder: py-spy records each gateway and broker over the connects (raw folded stacks)")
    parser.add_argument("--quiet-lock", default="", metavar="DIR",
                        help="hold exclusive flocks on DIR/gate.lock then DIR/bench.lock around the measuring only "
                             "(connects and idle window), not the start-up and seeding; off by default")
    parser.add_argument("--env", action="append", default=[],
                        help="NAME=VALUE for the servers (repeatable), e.g. CHATSTREAM_WS_PING_INTERVAL=60")
    parser.add_argument("--logs", default="", metavar="DIR",
                        help="copy the servers' logs (gateways, brokers, api) to DIR at the end")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="N:NAME=VALUE",
                        help="NAME=VALUE for gateway N (1-based) only (repeatable), e.g. "
                             "2:CHATSTREAM_GATEWAY_WS_PING_WHEEL=false")
    opts = parser.parse_args()
    if opts.client:
        import uvloop

        uvloop.run(client_main())
        return
    nofile = nofile_raise()
    from chatstream_site.localfleet import Fleet
    from chatstream_site.localservers import free_port, servers_start

    workdir = Path(tempfile.mkdtemp(prefix="chatstream-bench-connects-"))
    metrics_port = free_port()
    servers = servers_start(workdir, ferretdb_metrics_port=metrics_port)
    metrics_url = f"http://127.0.0.1:{metrics_port}/debug/metrics"
    unlimited = "1000000000/m"
    os.environ.update(servers.env(), CHATSTREAM_DOTENV="", DEBUG="0", PYTHONUNBUFFERED="1",
                      SECRET_KEY=os.environ.get("SECRET_KEY", "bench-secret-key-long-enough-0123456789abcdef"),
                      CHATSTREAM_REGISTRY_HEARTBEAT="0.5", CHATSTREAM_REGISTRY_TTL="3",
                      CHATSTREAM_GATEWAY_RATE_IP=unlimited, CHATSTREAM_GATEWAY_RATE_USER=unlimited,
                      CHATSTREAM_GATEWAY_RATE_WS_IP=unlimited, CHATSTREAM_GATEWAY_RATE_WS_USER=unlimited,
                      CHATSTREAM_GATEWAY_RATE_SENSITIVE=unlimited, LOG_LEVEL="WARNING",
                      DJANGO_SETTINGS_MODULE="chatstream_site.settings")
    os.environ.update(dict(item.split("=", 1) for item in opts.env))
    import django

    django.setup()
    from storage.mongo import mongo_connect

    mongo_connect(os.environ["MONGODB_URI"])
    fleet = Fleet(servers, workdir, db=0)
    clients: list[Client] = []
    try:
        api = fleet.api(1)
        brokers = [fleet.broker(i + 1) for i in range(opts.brokers)]
        gateway_env: dict[int, dict[str, str]] = {}
        for item in opts.gateway_env:
            number, _, assignment = item.partition(":")
            name, _, value = assignment.partition("=")
            gateway_env.setdefault(int(number), {})[name] = value
        gateways = [fleet.gateway(name=f"gateway{i + 1}", **gateway_env.get(i + 1, {})) for i in range(opts.gateways)]
        for proc in (api, *brokers, *gateways):
            proc.wait_healthy()
        fleet.wait_registered("api", 1)
        fleet.wait_registered("broker", opts.brokers)
        time.sleep(1.5)  # the gateways' registry caches
        total = opts.warmup + opts.connections
        t_setup = time.monotonic()
        users = population(users=total, conversations=opts.conversations, redis_url=servers.redis_url)
        print(f"setup: {total} users in {opts.conversations} conversations in {time.monotonic() - t_setup:.1f}s",
              file=sys.stderr)
        addresses = [f"127.0.0.1:{g.port}" for g in gateways]
        broker_pids = [b.proc.pid for b in brokers if b.proc is not None]
        gateway_pids = [g.proc.pid for g in gateways if g.proc is not None]
        quiet = contextlib.ExitStack()
        if quiet.enter_context(quiet_lock(opts.quiet_lock)):
            print(f"holding the quiet lock in {opts.quiet_lock}", file=sys.stderr)
        tokens = tokens_issue(users)
        warm, rest = tokens[:opts.warmup], tokens[opts.warmup:]
        clients = [Client(gateways=addresses, concurrency=opts.concurrency, impl=opts.client_impl,
                          tokens=warm[i::opts.clients] + rest[i::opts.clients]) for i in range(opts.clients)]
        warmed = clients_ask(clients, f"open {-(-opts.warmup // opts.clients)}")
        time.sleep(3)  # the warm-up's background work (presence) ends
        rss0 = {pid: proc_rss_kb(pid) for pid in broker_pids + gateway_pids}
        others = {"redis": [servers.redis.proc.pid] if servers.redis.proc else [],
                  "ferretdb": [servers.mongodb.proc.pid] if servers.mongodb and servers.mongodb.proc else [],
                  "clients": [c.proc.pid for c in clients], "api": [api.proc.pid] if api.proc else []}
        groups = {"gateway": gateway_pids, "broker": broker_pids, **others}
        cpu_c0 = {name: sum(proc_cpu_s(p) for p in group) for name, group in groups.items()}
        cpu_g0 = {pid: proc_cpu_s(pid) for pid in gateway_pids}
        store0 = ferretdb_counts(metrics_url)
        load_before = os.getloadavg()[0]
        print(f"opening {opts.connections} connections through {opts.gateways} gateway(s)...", file=sys.stderr)
        spies = profilers_start(opts.profile, {"gateway": gateway_pids, "broker": broker_pids})
        opened = clients_ask(clients, f"open {-(-opts.connections // opts.clients)}")
        profilers_stop(spies)
        last_ready = time.monotonic()
        cpu_c1 = {name: sum(proc_cpu_s(p) for p in group) for name, group in groups.items()}
        cpu_g1 = {pid: proc_cpu_s(pid) for pid in gateway_pids}
        store1 = ferretdb_counts(metrics_url)
        began, ended = min(o["began"] for o in opened), max(o["ended"] for o in opened)
        timings = [t for o in opened for t in o["timings"]]
        failed = sum(o["failed"] for o in opened) + sum(o["failed"] for o in warmed)
        reads = sum(store1.get(c, 0) - store0.get(c, 0) for c in STORE_READS)
        writes = sum(store1.get(c, 0) - store0.get(c, 0) for c in STORE_WRITES)
        n = len(timings)
        # The servers' background work of the connects (presence announcements, users.status writes).
        pids = broker_pids + gateway_pids
        while time.monotonic() - last_ready < SETTLE_MAX_S:
            before = sum(proc_cpu_s(p) for p in pids)
            time.sleep(1.0)
            if 100.0 * (sum(proc_cpu_s(p) for p in pids) - before) < SETTLE_CPU_PCT:
                break
        settle_s = time.monotonic() - last_ready
        store2 = ferretdb_counts(metrics_url)
        cpu0 = {pid: proc_cpu_s(pid) for pid in pids}
        spies = profilers_start(opts.profile and str(Path(opts.profile) / "idle"),
                                {"gateway": gateway_pids, "broker": broker_pids})
        time.sleep(opts.idle_seconds)
        cpu1 = {pid: proc_cpu_s(pid) for pid in pids}
        rss1 = {pid: proc_rss_kb(pid) for pid in pids}
        profilers_stop(spies)
        quiet.close()

        def idle_pct(group: list[int]) -> float:
            return 100.0 * sum(cpu1[p] - cpu0[p] for p in group) / opts.idle_seconds

        def kb_per_conn(group: list[int]) -> float:
            return sum(rss1[p] - rss0[p] for p in group) / max(1, n)

        def each_gateway() -> list[dict[str, Any]]:
            """Per gateway, per connection it proxied (the idle CPU also per 5,000 of them)."""
            result = []
            for i, pid in enumerate(gateway_pids):
                share = max(1, sum(o["opened"].get(addresses[i], 0) for o in opened))
                result.append({"env": gateway_env.get(i + 1, {}), "connections": share,
                               "idle_cpu_pct": round(idle_pct([pid]), 2),
                               "idle_cpu_pct_per_5000": round(idle_pct([pid]) * 5000 / share, 2),
                               "kb_per_conn": round((rss1[pid] - rss0[pid]) / share, 1),
                               "cpu_ms_per_connect": round(1000 * (cpu_g1[pid] - cpu_g0[pid]) / share, 2)})
            return result

        result = {
            "command": " ".join([Path(sys.executable).name, "-m", "bench.connects", *sys.argv[1:]]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, CPython {platform.python_version()}",
            "load_average_1m_before": round(load_before, 1), "open_files_limit": nofile,
            "connections": n, "failed": failed, "errors_sample": [e for o in opened for e in o["errors"]][:5],
            "connect_s": round(ended - began, 2), "connects_per_s": round(n / max(1e-9, ended - began), 1),
            "connect_p50_ms": round(1000 * percentile(timings, 0.5), 1),
            "connect_p99_ms": round(1000 * percentile(timings, 0.99), 1),
            # CPU time each kind of process spent during the connects, per connect (robust to a shared machine).
            "cpu_ms_per_connect": {name: round(1000 * (cpu_c1[name] - cpu_c0[name]) / max(1, n), 2)
                                   for name in groups},
            "store_reads_per_connect": round(reads / max(1, n), 3),
            "store_writes_per_connect": round(writes / max(1, n), 3),
            "store_reads_during_connects": {c: store1.get(c, 0) - store0.get(c, 0) for c in STORE_READS
                                            if store1.get(c, 0) - store0.get(c, 0)},
            "store_writes_after_last_ready": sum(store2.get(c, 0) - store1.get(c, 0) for c in STORE_WRITES),
            "settle_s": round(settle_s, 1),
            "idle_seconds": opts.idle_seconds,
            "broker_idle_cpu_pct": round(idle_pct(broker_pids), 2),
            "gateway_idle_cpu_pct": round(idle_pct(gateway_pids), 2),
            "broker_kb_per_conn": round(kb_per_conn(broker_pids), 1),
            "gateway_kb_per_conn": round(kb_per_conn(gateway_pids), 1),
            "gateways": each_gateway() if len(gateway_pids) > 1 else [],
            "load_average_1m_after": round(os.getloadavg()[0], 1),
        }
        print(json.dumps(result, indent=2))
        if opts.json:
            Path(opts.json).write_text(json.dumps(result, indent=2))
    finally:
        for client in clients:
            # The run's figures are out already; a client that died only needs reaping.
            with contextlib.suppress(Exception):
                client.ask("close")
            client.proc.kill()
            client.proc.wait()
        fleet.stop()
        servers.stop()
        if opts.logs:
            Path(opts.logs).mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                shutil.copy(log, Path(opts.logs) / log.name)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
