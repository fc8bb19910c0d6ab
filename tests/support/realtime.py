"""Helpers for the real-time tests: broker processes, users, conversations, tickets and WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
import websockets
from bson import ObjectId

from chatstream_site.localcluster import child_env
from chatstream_site.localservers import ROOT, RedisCluster, free_port, redis_cluster_start, wait_port
from core.documents import Conversation, GroupChat, User
from core.keys import partition_of, presence_key, stream_key
from core.tokens import ws_ticket_issue

# Every wait in these tests is bounded by this; reaching it fails the test (it is not a timing assertion).
WAIT_S = 20.0


async def wait_until_async(predicate: Any, *, timeout_s: float = WAIT_S, what: str = "condition") -> None:
    """Poll ``predicate`` on the running loop until it is true; fail the test after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Broker:
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/"

    def start(self, **env: str) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "role", "broker", "--port", str(self.port)],
            cwd=ROOT, env=child_env(**env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, timeout_s=60, proc=self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def brokers_start(workdir: Path, count: int, **env: str) -> list[Broker]:
    brokers = [Broker(port=free_port(), log=workdir / f"broker-{i + 1}.log") for i in range(count)]
    try:
        for broker in brokers:
            broker.start(**env)
    except Exception:
        for broker in brokers:
            broker.stop()
        raise
    return brokers


@contextlib.contextmanager
def brokers_running(workdir: Path, count: int, **env: str) -> Iterator[list[Broker]]:
    """:func:`brokers_start` for the length of a ``with`` block (a fixture's life), stopped after it."""
    started = brokers_start(workdir, count, **env)
    try:
        yield started
    finally:
        for broker in started:
            broker.stop()


def cluster_bus_env(url: str) -> dict[str, str]:
    """The environment that puts a broker's message bus on the Redis Cluster at ``url`` (docs/adr/0022)."""
    return {"CHATSTREAM_STREAMS_REDIS_URL": url, "CHATSTREAM_STREAMS_REDIS_CLUSTER": "1"}


def user_create() -> tuple[str, str]:
    name = "u" + uuid.uuid4().hex[:12]
    user = User(username=name, username_key=name, email=f"{name}@example.test", password="!").save()
    return str(user.id), name


def group_create(member_ids: list[str]) -> str:
    members = [ObjectId(m) for m in member_ids]
    group = GroupChat(name="g", admins=members[:1], members=members).save()
    conv = Conversation(type="group", room_id=group.id, members=members).save()
    return str(conv.id)


def groups_in_one_partition(member_ids: list[str]) -> tuple[str, str]:
    """Two group conversations of ``member_ids`` whose ids hash to the same partition (with 16 partitions a
    handful of tries; bounded)."""
    seen: dict[int, str] = {}
    for _ in range(200):
        conv = group_create(member_ids)
        if partition_of(conv) in seen:
            return seen[partition_of(conv)], conv
        seen[partition_of(conv)] = conv
    raise AssertionError("no two conversations in one partition among 200")


def status_shown(user_id: str) -> str:
    """The user's status as every public read shows it (api.selectors.users_presence_applied: Redis presence
    over the store, docs/adr/0051). Blocking (MongoDB, Redis)."""
    from api.selectors import users_presence_applied

    return str(users_presence_applied([User.objects(id=user_id).get()])[0].status)


def ticket_for(redis_url: str, user_id: str, username: str = "someone") -> str:
    client = redis.Redis.from_url(redis_url)
    try:
        return ws_ticket_issue(client, user_id=user_id, username=username)
    finally:
        client.close()


@dataclass
class Client:
    """One WebSocket connection with a bounded, typed receive."""

    ws: Any
    ready: dict[str, Any] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)  # every frame received, in order
    skipped: list[dict[str, Any]] = field(default_factory=list)  # received but not yet asked for by type

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT_S))
        self.seen.append(frame)
        return dict(frame)

    async def recv_type(self, *types: str) -> dict[str, Any]:
        """The next frame of one of ``types``; frames of other types are kept in ``skipped`` for later."""
        for i, frame in enumerate(self.skipped):
            if frame["type"] in types:
                return self.skipped.pop(i)
        while True:
            frame = await self.recv()
            if frame["type"] in types:
                return frame
            self.skipped.append(frame)

    async def recv_during(self, seconds: float) -> list[dict[str, Any]]:
        """Every frame that arrives within ``seconds`` (a bounded listen, to show that something did NOT
        come); they stay available to :meth:`recv_type` and are in ``seen``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        got: list[dict[str, Any]] = []
        while (left := deadline - loop.time()) > 0:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                break
            frame = json.loads(raw)
            self.seen.append(frame)
            self.skipped.append(frame)
            got.append(frame)
        return got

    async def recv_closed(self) -> int | None:
        """Read until the server closes; return its close code."""
        try:
            while True:
                raw = await asyncio.wait_for(self.ws.recv(), WAIT_S)
                self.seen.append(json.loads(raw))
        except websockets.exceptions.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None

    async def close(self) -> None:
        await self.ws.close()


async def connect(url: str, ticket: str | None, *, expect_ready: bool = True, rcvbuf: int | None = None,
                  **kwargs: Any) -> Client:
    """Open a WebSocket. ``rcvbuf`` pins the socket's receive buffer (which turns off the kernel's
    autotuning), so a client that stops reading makes the server's buffer fill after a few KB."""
    full = url if ticket is None else f"{url}?ticket={ticket}"
    if rcvbuf is not None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        host_port = full.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        await asyncio.get_running_loop().sock_connect(sock, (host_port[0], int(host_port[1])))
        kwargs["sock"] = sock
    ws = await websockets.connect(full, origin="http://127.0.0.1", open_timeout=WAIT_S, **kwargs)
    client = Client(ws=ws)
    if expect_ready:
        client.ready = await client.recv_type("ready", "error")
        assert client.ready["type"] == "ready", client.ready
    return client


async def connect_user(url: str, redis_url: str, user_id: str) -> Client:
    return await connect(url, ticket_for(redis_url, user_id))


# ------------------------------------------------------------------ cross-broker scenarios
# Shared by tests/realtime/test_realtime.py (the session's single Redis) and
# tests/realtime/test_realtime_redis_cluster.py (the streams on a real Redis Cluster): the same promises,
# whatever Redis holds the streams.

RESUMED = ("message.new", "message.edited", "message.deleted", "resumed")


def send_frame(conversation_id: str, content: str, client_msg_id: str | None = None) -> dict[str, Any]:
    return {"type": "message.send", "conversation_id": conversation_id,
            "client_msg_id": client_msg_id or uuid.uuid4().hex, "content": content}


async def collect_messages(client: Client, conversation_id: str, count: int,
                           got: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The next ``count`` messages of the conversation, appended to ``got`` as they arrive (so a concurrent
    task can watch the progress)."""
    into = {conversation_id: [] if got is None else got}
    return (await collect_by_conversation(client, {conversation_id: count}, into))[conversation_id]


async def collect_by_conversation(client: Client, counts: dict[str, int],
                                  got: dict[str, list[dict[str, Any]]] | None = None,
                                  ) -> dict[str, list[dict[str, Any]]]:
    """The next ``counts[c]`` new messages of each conversation ``c``, in arrival order (others are dropped),
    appended to ``got`` (a fresh dict of lists by default)."""
    got = {c: [] for c in counts} if got is None else got
    while any(len(got[c]) < n for c, n in counts.items()):
        frame = await client.recv_type("message.new")
        if frame["conversation_id"] in got:
            got[frame["conversation_id"]].append(frame["message"])
    return got


async def messages_cross_brokers(brokers: list[Broker], redis_url: str, *, alice: str, bob: str,
                                 conversations: list[str], count: int = 30) -> None:
    """alice sends ``count`` messages to each conversation (interleaved) on broker 1; her other device and
    bob on broker 2, and alice's sending device, get all of them in seq order, nothing lost."""
    sender = await connect_user(brokers[0].url, redis_url, alice)
    alice_phone = await connect_user(brokers[1].url, redis_url, alice)
    reader = await connect_user(brokers[1].url, redis_url, bob)
    assert reader.ready["user_id"] == bob and reader.ready["session_id"]
    assert set(conversations) <= set(reader.ready["conversations"])
    acks: dict[str, list[dict[str, Any]]] = {c: [] for c in conversations}
    for i in range(count):
        for conv in conversations:
            await sender.send(send_frame(conv, f"hello {i}", client_msg_id=f"c{i}"))
            acks[conv].append(await sender.recv_type("ack"))
    for conv in conversations:
        assert [a["seq"] for a in acks[conv]] == list(range(1, count + 1))
        assert [a["client_msg_id"] for a in acks[conv]] == [f"c{i}" for i in range(count)]
        assert all(a["conversation_id"] == conv and len(a["message_id"]) == 32 for a in acks[conv])
    for client in (reader, alice_phone, sender):
        got = await collect_by_conversation(client, {c: count for c in conversations})
        for conv in conversations:
            assert [m["seq"] for m in got[conv]] == list(range(1, count + 1))
            assert [m["content"] for m in got[conv]] == [f"hello {i}" for i in range(count)]
            assert [m["id"] for m in got[conv]] == [a["message_id"] for a in acks[conv]]
            assert all(m["sender_id"] == alice for m in got[conv])
    for client in (sender, alice_phone, reader):
        await client.close()


async def send_until_acked(sender: Client, conversation_id: str, content: str, client_msg_id: str, *,
                           within_s: float, pause_s: float = 0.2) -> dict[str, Any]:
    """Send until acknowledged, retrying with the same client_msg_id on ``unavailable`` (docs/protocol.md:
    what a client does while the bus has no master for the partition); fail after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        await sender.send(send_frame(conversation_id, content, client_msg_id=client_msg_id))
        frame = await sender.recv_type("ack", "error")
        if frame["type"] == "ack":
            return frame
        assert frame["code"] == "unavailable", frame
        assert loop.time() < deadline, f"{client_msg_id} not acknowledged after {within_s}s"
        await asyncio.sleep(pause_s)


def master_of(client: redis.cluster.RedisCluster, conversation_id: str) -> str:
    """host:port of the master that owns the slot of the conversation's partition."""
    return str(client.get_node_from_key(stream_key(partition_of(conversation_id))).name)


async def retried_client_msg_id_is_one_message(brokers: list[Broker], redis_url: str, *, alice: str, bob: str,
                                               conversation: str) -> None:
    """A send retried with the same client_msg_id on the other broker gets the first (id, seq) back, and the
    reader sees one message."""
    conv = conversation
    reader = await connect_user(brokers[1].url, redis_url, bob)
    sender = await connect_user(brokers[0].url, redis_url, alice)
    await sender.send(send_frame(conv, "once", client_msg_id="retry-me"))
    first = await sender.recv_type("ack")
    await sender.close()
    # The client lost the ack, reconnects elsewhere and retries.
    again = await connect_user(brokers[1].url, redis_url, alice)
    await again.send(send_frame(conv, "once", client_msg_id="retry-me"))
    second = await again.recv_type("ack")
    assert (second["message_id"], second["seq"]) == (first["message_id"], first["seq"])
    assert second["duplicate"] is True
    await again.send(send_frame(conv, "next", client_msg_id="after"))
    await again.recv_type("ack")
    got = await collect_messages(reader, conv, 2)
    assert [(m["seq"], m["content"]) for m in got] == [(1, "once"), (2, "next")]
    await reader.close()
    await again.close()


async def resume_returns_exactly_the_missed_events(brokers: list[Broker], redis_url: str, *, alice: str, bob: str,
                                                   conversation: str) -> None:
    """bob disconnects, misses four messages, an edit and a delete, reconnects on the other broker and
    resumes: exactly those six events, then the marker, then live delivery without repeats."""
    conv = conversation
    sender = await connect_user(brokers[0].url, redis_url, alice)
    reader = await connect_user(brokers[1].url, redis_url, bob)
    for i in range(3):
        await sender.send(send_frame(conv, f"seen {i}"))
        await sender.recv_type("ack")
    assert [m["seq"] for m in await collect_messages(reader, conv, 3)] == [1, 2, 3]
    await reader.close()
    # While bob is away: four messages, an edit and a delete (seqs 4..9).
    ids = []
    for i in range(4):
        await sender.send(send_frame(conv, f"missed {i}"))
        ids.append((await sender.recv_type("ack"))["message_id"])
    await sender.send({"type": "message.edit", "message_id": ids[0], "content": "missed 0, edited"})
    await sender.recv_type("ack")
    await sender.send({"type": "message.delete", "message_id": ids[1]})
    await sender.recv_type("ack")

    back = await connect_user(brokers[0].url, redis_url, bob)
    await back.send({"type": "resume", "conversations": {conv: 3}})
    frames = []
    while (frame := await back.recv_type(*RESUMED))["type"] != "resumed":
        frames.append(frame)
    assert frame == {"type": "resumed", "conversation_id": conv, "last_seq": 9}
    assert [(f["type"], f["seq"]) for f in frames] == [
        ("message.new", 4), ("message.new", 5), ("message.new", 6), ("message.new", 7),
        ("message.edited", 8), ("message.deleted", 9)]
    assert [f["message"]["content"] for f in frames[:4]] == [f"missed {i}" for i in range(4)]
    # Live delivery goes on after the resume, without repeating anything.
    await sender.send(send_frame(conv, "live"))
    live = await back.recv_type("message.new")
    assert (live["seq"], live["message"]["content"]) == (10, "live")
    # Nothing to resume: just the marker.
    await back.send({"type": "resume", "conversations": {conv: 10}})
    assert await back.recv_type("resumed") == {"type": "resumed", "conversation_id": conv, "last_seq": 10}
    await back.close()
    await sender.close()


async def presence_live(client: redis.asyncio.Redis, user_id: str) -> bool:
    """Whether the user has an unexpired session on some broker (what the members endpoint reads)."""
    return bool(await client.zcount(presence_key(user_id), int(time.time()), "+inf"))


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real Redis Cluster on loopback ports for the test module, shaped by the module's ``REDIS_CLUSTER``
    (keyword arguments of ``redis_cluster_start``: masters, replicas, node_timeout_ms); stopped after it."""
    options = getattr(request.module, "REDIS_CLUSTER", {"masters": 3})
    started = redis_cluster_start(tmp_path_factory.mktemp("redis-cluster"), **options)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory, cluster: RedisCluster) -> Iterator[list[Broker]]:
    """Two real broker processes whose message bus is the module's Redis Cluster (docs/adr/0022)."""
    with brokers_running(tmp_path_factory.mktemp("cluster-brokers"), 2, **cluster_bus_env(cluster.url)) as started:
        yield started


@pytest.fixture
def fresh_hub() -> Iterator[None]:
    """The hub and the in-process membership cache are per process and bound to the loop that ran them; this
    test's loop ends with it, so neither may leak into (or come from) another test."""
    from messaging import hub, membership

    hub._hub = None
    membership._local_members = None
    yield
    hub._hub = None
    membership._local_members = None
