"""A stand-in upstream for the gateway tests and benchmark (never a role): registers in the registry as
``CHATSTREAM_ROLE`` and reports what reached it, so tests can prove what the gateway forwarded (and what it
never forwarded).

Run as ``daphne -p PORT chatstream_site.localstandin:app`` with ``CHATSTREAM_ROLE`` (api or broker) and
``CHATSTREAM_INSTANCE_PORT`` set. It serves:

* ``GET /__upstream/stats``: ``{"instance", "http", "ws_handshakes", "ws_open"}`` — counters of what arrived;
* a path ending in ``/__sleep?s=N``: the echo below, after N seconds (a slow upstream);
* any other HTTP request: JSON echo of method, path, query, the forwarding/identity headers, and the
  identity :func:`core.identity.identity_verify` accepts;
* WebSocket on any path: accepts, sends ``{"type": "ready", "instance", "identity"}``, then for each text
  frame ``close:<code>`` closes with that code, anything else is relayed as ``{"type": "relay", "from",
  "data"}`` to every connection of this instance (including the sender); with ``?echo=1`` a frame is sent
  back to its sender only (the benchmark's round trips); ``split:<n>:<s>`` is answered with one text frame
  of ``n`` bytes ``x`` written in two halves ``s`` seconds apart (a large frame the gateway passes through
  while it is still arriving: tests/gateway/test_liveness.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatstream_site.settings")
import django

django.setup()

from core.identity import identity_verify  # noqa: E402
from core.roles import heartbeat_start  # noqa: E402

STATS = {"http": 0, "ws_handshakes": 0, "ws_open": 0}
ROOM: set[asyncio.Queue[str]] = set()
_heartbeat = heartbeat_start()
INSTANCE = _heartbeat.instance_id if _heartbeat else "unregistered"


def _identity(scope: dict[str, Any]) -> dict[str, str] | None:
    owner = identity_verify(scope["headers"])
    return None if owner is None else {"user_id": owner.user_id, "username": owner.username}


async def _http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/__sleep"):  # a slow upstream: answers after ?s= seconds
        await asyncio.sleep(float(scope["query_string"].decode().partition("s=")[2] or "1"))
    if scope["path"] == "/__upstream/stats":
        answer: dict[str, Any] = {"instance": INSTANCE, **STATS}
    else:
        STATS["http"] += 1
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        answer = {
            "instance": INSTANCE, "method": scope["method"], "path": scope["path"],
            "query": scope["query_string"].decode(), "body_len": len(body),
            "headers": {k: v for k, v in headers.items()
                        if k.startswith(("x-chatstream-", "x-request-id", "x-forwarded-", "authorization", "host"))},
            "identity": _identity(scope),
        }
    data = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    STATS["ws_handshakes"] += 1
    identity = _identity(scope)
    echo = b"echo=1" in scope["query_string"]
    await send({"type": "websocket.accept"})
    STATS["ws_open"] += 1
    queue: asyncio.Queue[str] = asyncio.Queue()
    ROOM.add(queue)

    async def forward() -> None:
        while True:
            await send({"type": "websocket.send", "text": await queue.get()})

    forwarder = asyncio.ensure_future(forward())
    try:
        await send({"type": "websocket.send", "text": json.dumps(
            {"type": "ready", "instance": INSTANCE, "identity": identity,
             "query": scope["query_string"].decode()})})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text") or ""
            if text.startswith("close:"):
                await send({"type": "websocket.close", "code": int(text.split(":", 1)[1]), "reason": "asked to"})
                return
            if text.startswith("split:"):
                await _split_frame_send(send, size=int(text.split(":")[1]), pause_s=float(text.split(":")[2]))
                continue
            if echo:  # benchmark mode: the frame goes back to its sender only
                await send({"type": "websocket.send", "text": text})
                continue
            frame = json.dumps({"type": "relay", "from": (identity or {}).get("username"), "data": text})
            for member in ROOM:
                member.put_nowait(frame)
    finally:
        forwarder.cancel()
        ROOM.discard(queue)
        STATS["ws_open"] -= 1


async def _split_frame_send(send: Any, *, size: int, pause_s: float) -> None:
    """Write one text frame of ``size`` bytes straight to daphne's transport (``send`` is
    ``partial(server.handle_reply, protocol)``), its second half ``pause_s`` later."""
    transport = send.args[0].transport
    frame = struct.pack("!BBQ", 0x81, 127, size) + b"x" * size
    transport.write(frame[:len(frame) // 2])
    await asyncio.sleep(pause_s)
    transport.write(frame[len(frame) // 2:])


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
