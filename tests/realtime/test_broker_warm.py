"""A broker's warm-up at startup (messaging/warm.py), against the session's real Redis and FerretDB: before its
lifespan reports started, the hub's Redis connections are open, the connect's scripts are in Redis's script cache,
the server's version check is resolved and one connect without a ticket has run through the consumer (refused
4001); nothing is read or written for any user; a Redis that does not answer does not stop the broker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis.asyncio

from messaging import hub, transports, warm
from messaging.routing import broker_lifespan, websocket_application

pytestmark = pytest.mark.usefixtures("servers", "fresh_hub")

SHAS = [redis.asyncio.Redis().register_script(script).sha for script in warm.CONNECT_SCRIPTS]


def _pool_connections(h: hub.Hub) -> int:
    """The hub's pooled connections that are open (a disconnect closes them and keeps them, idle)."""
    pool: Any = h.redis.connection_pool
    return sum(1 for c in [*pool._available_connections, *pool._in_use_connections] if c.is_connected)


async def _lifespan_start_then_stop() -> list[str]:
    """The broker's lifespan as uvicorn drives it: startup, then (once started) shutdown."""
    events = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return events.pop()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await broker_lifespan({"type": "lifespan"}, receive, send)
    return sent


def test_the_lifespan_loads_the_scripts_and_opens_the_connections_before_it_reports_started() -> None:
    async def body() -> None:
        h = hub.hub_get()
        await h.redis.script_flush()  # as a fresh Redis: the connect's first EVALSHA would come back NOSCRIPT
        assert await h.redis.script_exists(*SHAS) == [False, False]
        await h.redis.connection_pool.disconnect()  # as a freshly started broker: no socket open
        transports.internals_known.cache_clear()
        assert _pool_connections(h) == 0 and h.fast is not None and h.fast._protocol is None

        sent = await _lifespan_start_then_stop()

        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert await h.redis.script_exists(*SHAS) == [True, True]
        assert _pool_connections(h) >= 2  # the ticket's and the partitions' reads overlap in a first connect
        assert h.fast._protocol is not None and not h.fast._protocol.lost
        assert transports.internals_known.cache_info().currsize >= 1

    asyncio.run(body())


def test_the_warm_up_writes_no_key_and_its_handshake_is_refused_without_a_ticket() -> None:
    async def body() -> None:
        h = hub.hub_get()
        keys_before = sorted([k async for k in h.redis.scan_iter(count=1000)])

        assert await warm.broker_warm_handshake(app=websocket_application()) == 4001
        await warm.broker_warm(hub=h, app=websocket_application())

        assert sorted([k async for k in h.redis.scan_iter(count=1000)]) == keys_before
        assert h.by_user == {} and h.by_conversation == {}

    asyncio.run(body())


def test_a_redis_that_does_not_answer_is_logged_and_the_warm_up_returns(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        dead = hub.Hub(redis_url="redis://127.0.0.1:1")  # nothing listens on port 1
        with caplog.at_level(logging.WARNING, logger="messaging.warm"):
            await warm.broker_warm(hub=dead, app=websocket_application())

    asyncio.run(body())
    assert any("warm-up incomplete" in r.getMessage() for r in caplog.records)
