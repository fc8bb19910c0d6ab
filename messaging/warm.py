"""A broker's first-connect costs, paid at its start instead of by the first users who connect (issue 13, connect).

Measured (docs/benchmarks.md, "Issue 13: a broker's first connect"): a broker's first connect imports nothing new,
but opens the hub's first pooled Redis connection (its ticket's GETDEL; redis-py resolves its own version through
importlib.metadata for each new connection) and the lean client's connection (the group join and read, then
presence), runs the connect's Lua scripts by EVALSHA, which a fresh Redis answers NOSCRIPT (so an EVAL follows),
and under uvicorn resolves uvicorn's version once (messaging/transports.py ``internals_known``). A user's last
close then opens the process's sync Redis client and its store connection in a worker thread (the status write).
:func:`broker_warm` and :func:`broker_warm_blocking` do each of those at the start, and
:func:`broker_warm_handshake` runs the consumer's connect once in process without a ticket (answered 4001 before
any Redis or store access), so the first user's connect runs code that already ran.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from core.clients import connections_open
from core.closecodes import CLOSE_BAD_TICKET
from core.documents import User
from messaging import transports
from messaging.hub import Hub
from messaging.presence import _PRESENCE_LUA
from messaging.routing import WS_PATH
from messaging.sessions import _JOIN_READ_LUA

log = logging.getLogger(__name__)

# The connect's scripts (the group join and read, the presence transition): SCRIPT LOAD puts them in Redis's
# script cache, so the first connect's EVALSHA does not come back NOSCRIPT. Idempotent; they touch no key.
CONNECT_SCRIPTS = (_JOIN_READ_LUA, _PRESENCE_LUA)
# The async warm-up's bound: a Redis that does not answer (each call has the hub's 5 s socket timeout) must not
# hold the broker's start longer than this; its first connects then pay as before.
WARM_TIMEOUT_S = 10.0


def broker_warm_blocking() -> None:
    """Open this process's sync Redis client and its store connection, and run the index check of the users'
    document class: what a user's last close (its status write, in a worker thread) would do first. Blocking:
    called off the loop (the broker's lifespan startup). Side effects: one connection to each server; a
    ``createIndexes`` (idempotent). An error is logged, not raised."""
    try:
        connections_open(documents=(User,))
    except Exception:
        log.warning("broker warm-up incomplete: the first close opens the connections", exc_info=True)


async def broker_warm_handshake(*, app: Any) -> int | None:
    """One WebSocket through ``app`` (the broker's WebSocket application, in process: no socket) without a ticket:
    the consumer accepts, finds no ticket (no Redis or store access), sends its ``error`` frame and closes with
    4001. Returns the close code (None if it never closed). Side effects: none."""
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
             "path": WS_PATH, "raw_path": WS_PATH.encode(), "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "subprotocols": [], "state": {}}
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "websocket.connect"})
    closed: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.close":
            closed.append(int(message.get("code", 1000)))
            incoming.put_nowait({"type": "websocket.disconnect", "code": closed[-1]})

    await app(scope, incoming.get, send)
    return closed[0] if closed else None


async def _broker_warm(*, hub: Hub, app: Any) -> None:
    transports.internals_known("uvicorn")  # cached for the process: importlib.metadata once, here
    await hub.connections_open()
    if hub.fast is not None:
        for script in CONNECT_SCRIPTS:
            await hub.fast.call("SCRIPT", "LOAD", script)
    else:
        for script in CONNECT_SCRIPTS:
            await hub.redis.script_load(script)
    code = await broker_warm_handshake(app=app)
    if code != CLOSE_BAD_TICKET:
        log.warning("broker warm-up handshake closed with %s, not %s", code, CLOSE_BAD_TICKET)


async def broker_warm(*, hub: Hub, app: Any) -> None:
    """Open the hub's Redis connections, load the connect's scripts, resolve the server's version check and run
    :func:`broker_warm_handshake`, before the broker accepts a connection (its lifespan startup, on its loop).
    Side effects: connections, scripts in Redis's script cache; no key read or written. A server that does not
    answer within :data:`WARM_TIMEOUT_S`, or any error, is logged, not raised: the broker serves as it would have
    without the warm-up."""
    try:
        await asyncio.wait_for(_broker_warm(hub=hub, app=app), WARM_TIMEOUT_S)
    except Exception:  # TimeoutError included
        log.warning("broker warm-up incomplete: the first connects open the connections", exc_info=True)
