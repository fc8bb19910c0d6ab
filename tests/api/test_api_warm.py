"""An api instance's warm-up at startup (api/warm.py): its connections opened and its document classes' index
check run before it serves, off the event loop; a server that does not answer does not stop the instance."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import redis

from api import warm
from core.clients import sync_redis
from core.documents import Conversation, Message, User
from core.roles import lifespan_serve

pytestmark = pytest.mark.usefixtures("servers")


def _connected(client: redis.Redis) -> int:
    pool: Any = client.connection_pool
    return sum(1 for c in pool._available_connections if getattr(c, "_sock", None) is not None)


def test_the_warm_up_opens_the_redis_connection_and_runs_the_index_check(monkeypatch: pytest.MonkeyPatch) -> None:
    client = sync_redis()
    client.connection_pool.disconnect()  # as a freshly started process: no socket open
    for document in (User, Conversation, Message):
        monkeypatch.setattr(document, "_collection", None)  # not yet used in this process
    assert _connected(client) == 0

    warm.api_warm()

    assert _connected(client) >= 1
    assert all(document._collection is not None for document in (User, Conversation, Message))


def test_a_server_that_does_not_answer_is_logged_and_the_warm_up_returns(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)  # nothing listens on port 1
    monkeypatch.setattr(warm, "sync_redis", lambda: dead)
    with caplog.at_level(logging.WARNING, logger="api.warm"):
        warm.api_warm()
    assert any("warm-up incomplete" in r.getMessage() for r in caplog.records)


def test_the_lifespan_runs_the_blocking_start_in_a_thread_before_it_reports_started() -> None:
    order: list[str] = []
    loop_thread: list[int] = []

    def blocking() -> None:
        order.append("warm" if threading.get_ident() != loop_thread[0] else "warm on the loop")

    async def run() -> None:
        loop_thread.append(threading.get_ident())
        events = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]

        async def receive() -> dict[str, Any]:
            return events.pop()

        async def send(message: dict[str, Any]) -> None:
            order.append(message["type"])

        await lifespan_serve(receive, send, on_startup_blocking=blocking)

    asyncio.run(run())
    assert order[:2] == ["warm", "lifespan.startup.complete"], order
