"""Helpers for the real-time tests: broker processes, users, conversations, tickets and WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import websockets
from bson import ObjectId

from api.tokens import ws_ticket_issue
from storage.documents import Conversation, GroupChat, User
from tests.procs import child_env
from tests.servers import ROOT, free_port, wait_port

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


def user_create() -> tuple[str, str]:
    name = "u" + uuid.uuid4().hex[:12]
    user = User(username=name, username_key=name, email=f"{name}@example.test", password="!").save()
    return str(user.id), name


def group_create(member_ids: list[str]) -> str:
    members = [ObjectId(m) for m in member_ids]
    group = GroupChat(name="g", admins=members[:1], members=members).save()
    conv = Conversation(type="group", room_id=group.id, members=members).save()
    return str(conv.id)


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
