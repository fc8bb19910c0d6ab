"""The second peer of the fan-out benchmark: Centrifugo v6 (``.tools/bin/centrifugo``, built by
``scripts/bootstrap.py centrifugo``) configured for ChatStream's promises, and its client for the load loop.

Same promises as far as Centrifugo has them: the Redis engine (PUB/SUB between nodes, history in a Redis stream
per channel, presence in Redis), history and recovery on for every channel (a reconnecting member gets what it
missed), a client publishes into its conversation's channel only if it is subscribed to it (membership), and a
connection is authenticated by a JWT (HS256, the run's random secret) naming its user.

The client speaks Centrifugo's JSON protocol over a raw WebSocket (``/connection/websocket``): ``connect``
with the token, ``subscribe`` to the conversation's channel, ``publish`` {client_msg_id, content} with the send
time as content; the publish reply is the ack (Centrifugo answers once the Redis engine accepted the
publication into history and PUB/SUB), every subscriber (the sender too) gets the publication as a push.
Centrifugo may put several replies in one WebSocket frame, one JSON object per line.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import websockets

# How long one handshake of the load client may take (every system's): on a host loaded by other work (load
# average 20+), one of 10,000 connects took over 60 s and failed the whole run.
OPEN_TIMEOUT_S = 300.0

if TYPE_CHECKING:
    from bench.fanout import Counters

ROOT = Path(__file__).resolve().parent.parent
CENTRIFUGO_BIN = ROOT / ".tools" / "bin" / "centrifugo"
# A conversation's last 1,000 publications stay recoverable for a day: the window in which ChatStream
# deduplicates a client_msg_id (messaging/streams.py DEDUP_TTL_S), far more than a benchmark run publishes.
HISTORY_SIZE = 1000
HISTORY_TTL = "24h"


def centrifugo_binary() -> Path:
    """The Centrifugo binary; builds it first (``scripts/bootstrap.py centrifugo``: minutes of Go compile at the
    lowest CPU priority) when this machine has none yet."""
    if not CENTRIFUGO_BIN.exists():
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bootstrap.py"), "centrifugo"], cwd=ROOT)
        if r.returncode != 0 or not CENTRIFUGO_BIN.exists():
            raise RuntimeError("the Centrifugo peer could not be built (output above; see docs/benchmarks.md)")
    return CENTRIFUGO_BIN


def centrifugo_config(*, port: int, redis_url: str, secret: str) -> dict[str, Any]:
    """Centrifugo v6 configuration for one node of the run (every node on the same Redis)."""
    return {
        "http_server": {"address": "127.0.0.1", "port": port},
        "log": {"level": "warn"},
        "engine": {"type": "redis", "redis": {"address": [redis_url]}},
        "client": {
            "token": {"hmac_secret_key": secret},
            "allowed_origins": ["http://127.0.0.1"],
        },
        "channel": {
            "without_namespace": {
                "allow_subscribe_for_client": True,
                "allow_publish_for_subscriber": True,
                "history_size": HISTORY_SIZE,
                "history_ttl": HISTORY_TTL,
                "force_recovery": True,
            },
        },
        # The server HTTP API is unused here, but keyed rather than open; nothing leaves the machine.
        "http_api": {"key": secrets.token_hex(16)},
        "usage_stats": {"disabled": True},
    }


def centrifugo_spawn(*, count: int, redis_url: str, secret: str,
                     log_dir: Path) -> list[tuple[subprocess.Popen[bytes], int]]:
    """Start ``count`` Centrifugo nodes on free ports of 127.0.0.1 (config and log files in ``log_dir``)."""
    from chatstream_site.localservers import free_port, wait_port

    binary = centrifugo_binary()
    spawned = []
    for i in range(count):
        port = free_port()
        config = log_dir / f"centrifugo-{i + 1}.json"
        config.write_text(json.dumps(centrifugo_config(port=port, redis_url=redis_url, secret=secret), indent=2))
        log = open(log_dir / f"centrifugo-{i + 1}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(binary), "--config", str(config)], cwd=log_dir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        spawned.append((proc, port))
    for proc, port in spawned:
        wait_port(port, timeout_s=30, proc=proc)
    return spawned


def centrifugo_version() -> str:
    binary = shutil.which(str(CENTRIFUGO_BIN))
    if binary is None:
        return "not built"
    r = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


def connect_token(*, user: str, secret: str) -> str:
    """A connection JWT for ``user``, valid for an hour (longer than any run)."""
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


class CentrifugoConn:
    """One user's connection: connect with its token, subscribe to its conversation's channel, publish."""

    def __init__(self, index: int, url: str, counters: Counters, on_ack: Callable[[str], None], *,
                 token: str, channel: str) -> None:
        self.index, self.url, self.counters, self.on_ack = index, url, counters, on_ack
        self.token, self.channel = token, channel
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None
        self.ack_ids: dict[int, str] = {}
        self.next_id = 0

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One command answered before anything else can arrive (connect and subscribe, before the reader)."""
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, method: params}))
        while True:
            for line in (await self.ws.recv()).splitlines():
                reply = json.loads(line)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"centrifugo connection {self.index}: {method} refused {reply}")
                    result: dict[str, Any] = reply.get(method, {})
                    return result
                if not reply:  # a server ping this early: answer it
                    await self.ws.send("{}")

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, origin="http://127.0.0.1",  # type: ignore[arg-type]
                                           open_timeout=OPEN_TIMEOUT_S, max_queue=None, compression=None)
        await self._call("connect", {"token": self.token, "name": "bench"})
        await self._call("subscribe", {"channel": self.channel})
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        counters = self.counters
        try:
            async for raw in self.ws:
                for line in raw.splitlines():
                    reply = json.loads(line)
                    push = reply.get("push")
                    if push is not None:
                        pub = push.get("pub")
                        if pub is not None:
                            data = pub["data"]
                            counters.on_message(self.index, data["client_msg_id"], float(data["content"]))
                    elif "id" in reply:
                        client_msg_id = self.ack_ids.pop(reply["id"], "")
                        if "error" in reply:
                            counters.errors += 1
                        else:
                            self.on_ack(client_msg_id)
                    elif not reply:  # ping: the connect reply asked for a pong
                        await self.ws.send("{}")
        except websockets.exceptions.ConnectionClosed:
            pass

    async def send(self, conversation_id: str, client_msg_id: str) -> None:
        self.next_id += 1
        self.ack_ids[self.next_id] = client_msg_id
        data = {"client_msg_id": client_msg_id, "content": f"{time.time():.6f}"}
        await self.ws.send(json.dumps({"id": self.next_id, "publish": {"channel": conversation_id, "data": data}}))

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            await asyncio.wait([self.task], timeout=5)
