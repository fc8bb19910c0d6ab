"""Liveness of clients' WebSockets at the gateway (docs/protocol.md, Liveness; docs/adr/0044): the kernel
probes each client's TCP connection, the gateway's WebSocket pings are the backstop, and no compression is
negotiated. Real gateway processes before stand-in upstreams."""

from __future__ import annotations

import asyncio
import re
import struct
import subprocess
import time
from pathlib import Path

import redis

from chatstream_site.localservers import Servers
from core.tokens import ws_ticket_issue
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


def test_the_kernel_probes_client_sockets_and_an_unanswered_ping_closes_with_1011(
        servers: Servers, tmp_path: Path) -> None:
    with stand_in_fleet(servers, tmp_path, db=11, brokers=1, CHATSTREAM_GATEWAY_WS_PING_INTERVAL="1",
                        CHATSTREAM_GATEWAY_WS_PING_TIMEOUT="1", CHATSTREAM_GATEWAY_WS_KEEPALIVE_IDLE="7") as fleet:
        gateway = fleet["gateway"]
        ticket = ws_ticket_issue(redis.Redis.from_url(fleet["fleet"].redis_url), user_id="u-live", username="l")

        async def scenario() -> tuple[bytes, str, list[int], int | None, float]:
            # A raw client that completes the handshake (offering compression) and then never answers a ping,
            # as a phone that lost its network would not.
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write((f"GET /ws/?ticket={ticket} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n").encode())
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
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
