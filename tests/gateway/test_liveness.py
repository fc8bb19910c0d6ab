"""Liveness of clients' WebSockets at the gateway (docs/protocol.md, Liveness; docs/adr/0044, 0049): the kernel
probes each client's TCP connection, the gateway's WebSocket pings (its ping wheel, or uvicorn's timer per
socket) are the backstop, and no compression is negotiated. Real gateway processes before stand-in upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest
import redis

from chatstream_site.localcluster import wait_until
from chatstream_site.localservers import Servers
from core.keys import GATEWAY_SOCKETS_PREFIX
from core.tokens import ws_ticket_issue
from gateway.wslink import OP_PING, OP_PONG, OP_TEXT, frame_masked
from tests.support.gateway import stand_in_fleet


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return head[0] & 0x0F, await reader.readexactly(length)


def keepalive_timer_of(port: int, peer_port: int) -> str:
    """The kernel timer `ss` shows for the gateway's side of one client connection ('' when none)."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} and dport = :{peer_port} )"],
                         capture_output=True, text=True, check=True).stdout
    found = re.search(r"timer:\((\w+),", out)
    return found.group(1) if found else ""


async def handshake(port: int, ticket: str, *, extra: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                                        bytes]:
    """A raw client's WebSocket handshake through the gateway: (reader, writer, the answer's head)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"GET /ws/?ticket={ticket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").encode())
    return reader, writer, await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)


@pytest.mark.parametrize("wheel", ["true", "false"])
def test_the_kernel_probes_client_sockets_and_an_unanswered_ping_closes_with_1011(
        servers: Servers, tmp_path: Path, wheel: str) -> None:
    """Whoever pings (the gateway's wheel, or uvicorn when the wheel is off), the promise is the same."""
    with stand_in_fleet(servers, tmp_path, db=11, brokers=1, CHATSTREAM_GATEWAY_WS_PING_INTERVAL="1",
                        CHATSTREAM_GATEWAY_WS_PING_TIMEOUT="1", CHATSTREAM_GATEWAY_WS_KEEPALIVE_IDLE="7",
                        CHATSTREAM_GATEWAY_WS_PING_WHEEL=wheel) as fleet:
        gateway = fleet["gateway"]
        ticket = ws_ticket_issue(redis.Redis.from_url(fleet["fleet"].redis_url), user_id="u-live", username="l")

        async def scenario() -> tuple[bytes, str, list[int], int | None, float]:
            # A raw client that completes the handshake (offering compression) and then never answers a ping,
            # as a phone that lost its network would not.
            reader, writer, answer = await handshake(
                gateway.port, ticket, extra="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")
            timer = keepalive_timer_of(gateway.port, writer.get_extra_info("sockname")[1])
            started = time.monotonic()
            opcodes: list[int] = []
            code = None
            try:
                while True:
                    opcode, payload = await asyncio.wait_for(read_frame(reader), 15)
                    opcodes.append(opcode)
                    if opcode == 8:
                        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                        break
            except asyncio.IncompleteReadError:
                pass
            writer.close()
            return answer, timer, opcodes, code, time.monotonic() - started

        answer, timer, opcodes, code, took = asyncio.run(scenario())
        assert b" 101 " in answer.split(b"\r\n", 1)[0], answer
        assert b"sec-websocket-extensions" not in answer.lower()  # no per-socket inflate context
        assert timer == "keepalive"  # the kernel watches the idle connection
        assert 9 in opcodes  # pinged (interval 1 s) ...
        assert code == 1011 and took < 12  # ... and closed when no pong came within the timeout


def test_the_ping_wheel_pings_every_interval_an_answering_client_stays_and_a_silent_one_loses_its_slot(
        servers: Servers, tmp_path: Path) -> None:
    """The wheel's pings come one interval apart (2 s here) to a client that answers them, which stays open and
    keeps talking to its broker; once it stops answering it is closed with 1011 and its socket slot is freed."""
    with stand_in_fleet(servers, tmp_path, db=11, brokers=1, CHATSTREAM_GATEWAY_WS_PING_INTERVAL="2",
                        CHATSTREAM_GATEWAY_WS_PING_TIMEOUT="2") as fleet:
        gateway = fleet["gateway"]
        store = redis.Redis.from_url(fleet["fleet"].redis_url)
        user = "u-wheel"
        ticket = ws_ticket_issue(store, user_id=user, username="w")

        async def scenario() -> tuple[list[float], list[bytes], int, int | None]:
            reader, writer, answer = await handshake(gateway.port, ticket)
            assert b" 101 " in answer.split(b"\r\n", 1)[0], answer
            pinged_at: list[float] = []
            texts: list[bytes] = []
            slots_while_open = 0
            code = None
            while True:
                opcode, payload = await asyncio.wait_for(read_frame(reader), 15)
                if opcode == OP_TEXT:
                    texts.append(payload)
                elif opcode == OP_PING:
                    pinged_at.append(time.monotonic())
                    if len(pinged_at) <= 3:  # answer three pings (and talk to the broker between them) ...
                        writer.write(frame_masked(OP_PONG, payload))
                        writer.write(frame_masked(OP_TEXT, f"after ping {len(pinged_at)}".encode()))
                        slots_while_open = int(store.zcard(GATEWAY_SOCKETS_PREFIX + user))
                elif opcode == 8:  # ... then stay silent
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    break
            writer.close()
            return pinged_at, texts, slots_while_open, code

        pinged_at, texts, slots_while_open, code = asyncio.run(scenario())
        assert len(pinged_at) == 4  # three answered, the fourth not: no close before it
        assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(pinged_at))
        assert sum(b"after ping" in t for t in texts) == 3  # the broker's frames pass between the pings
        assert slots_while_open == 1
        assert code == 1011
        wait_until(lambda: store.zcard(GATEWAY_SOCKETS_PREFIX + user) == 0, timeout_s=10,
                   what="the closed socket's slot released")
        store.close()



@pytest.mark.parametrize(("trigger", "code"), [("flood", 4008), ("unanswered_ping", 1011)])
def test_the_gateways_own_close_waits_for_the_broker_frame_being_passed_through(
        servers: Servers, tmp_path: Path, trigger: str, code: int) -> None:
    """The gateway passes a broker frame through as its parts arrive (docs/adr/0039). A close of the gateway's
    own decided while one is half passed (4008: the client floods frames; 1011: it left the wheel's ping
    unanswered) waits for the frame's end: the client receives the whole broker frame, then the close frame
    with the documented code, never a close written inside the frame (docs/adr/0049)."""
    size = 200_000
    env = ({"CHATSTREAM_GATEWAY_WS_FRAME_RATE": "0.5", "CHATSTREAM_GATEWAY_WS_FRAME_BURST": "3"} if trigger == "flood"
           else {"CHATSTREAM_GATEWAY_WS_PING_INTERVAL": "1", "CHATSTREAM_GATEWAY_WS_PING_TIMEOUT": "1"})
    with stand_in_fleet(servers, tmp_path, db=11, brokers=1, **env) as fleet:
        gateway = fleet["gateway"]
        ticket = ws_ticket_issue(redis.Redis.from_url(fleet["fleet"].redis_url), user_id="u-split", username="s")

        async def scenario() -> tuple[int, int, bytes, bytes]:
            reader, writer, answer = await handshake(gateway.port, ticket)
            assert b" 101 " in answer.split(b"\r\n", 1)[0], answer
            opcode, _ = await asyncio.wait_for(read_frame(reader), 15)  # ready
            assert opcode == OP_TEXT
            if trigger == "unanswered_ping":
                while opcode != OP_PING:  # the wheel's ping, never answered: 1011 one tick (1 s) later ...
                    opcode, _ = await asyncio.wait_for(read_frame(reader), 15)
            # ... while the broker's next frame is half passed: its halves come 1.5 s apart
            writer.write(frame_masked(OP_TEXT, f"split:{size}:1.5".encode()))
            head = await asyncio.wait_for(reader.readexactly(10), 15)
            first = await asyncio.wait_for(reader.read(1000), 15)  # the first half is being passed through
            if trigger == "flood":  # the burst (3) is spent at once: the gateway closes with 4008
                for i in range(10):
                    writer.write(frame_masked(OP_TEXT, f"flood {i}".encode()))
            rest = b""
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(65536), 15):
                    rest += chunk
            writer.close()
            return head[0], struct.unpack("!Q", head[2:10])[0], first, rest

        first_byte, length, first, rest = asyncio.run(scenario())
        assert (first_byte, length) == (0x81, size)
        payload, after = (first + rest)[:size], (first + rest)[size:]
        assert payload == b"x" * size  # the broker's frame whole, nothing of the gateway's inside it
        assert after[:1] == b"\x88" and struct.unpack("!H", after[2:4])[0] == code, after[:40]  # then the close
