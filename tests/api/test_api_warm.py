"""An api instance's warm-up at startup (api/warm.py): its connections opened and its document classes' index
check run before it serves, off the event loop; its URL patterns compiled and the first requests' work done by
requests through its own ASGI application that read and write nothing; a server that does not answer does not
stop the instance."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import redis
from django.urls import URLPattern, URLResolver, get_resolver

from api import warm
from chatstream_site.handler import ApiHandler
from core import clients
from core.clients import sync_redis
from core.documents import Conversation, Message, User
from core.roles import lifespan_serve
from messaging.selectors import user_conversation_ids
from tests.support.api import account

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


def _patterns() -> list[URLPattern | URLResolver]:
    found: list[URLPattern | URLResolver] = [get_resolver()]
    resolvers = [get_resolver()]
    while resolvers:
        for entry in resolvers.pop().url_patterns:
            found.append(entry)
            if isinstance(entry, URLResolver):
                resolvers.append(entry)
    return found


def test_the_warm_up_compiles_every_url_pattern() -> None:
    patterns = _patterns()
    for entry in patterns:
        entry.pattern.__dict__.pop("regex", None)  # as in a fresh process: Django compiles on first match

    warm.api_warm()

    assert len(patterns) > 30  # the admin's, the API's, the health views
    assert [str(e.pattern) for e in patterns if "regex" not in e.pattern.__dict__] == []


def test_the_warm_requests_are_answered_401_and_read_and_write_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    client = sync_redis()
    keys_before = sorted(client.scan_iter(count=1000))
    for document in (User, Conversation, Message):  # any store read or write would go through a collection
        monkeypatch.setattr(document, "_get_collection", lambda: pytest.fail("a warm-up request used the store"))
    commands: list[tuple[Any, ...]] = []
    original = redis.Redis.execute_command

    def counted(self: redis.Redis, *args: Any, **options: Any) -> Any:
        commands.append(args)
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counted)

    statuses = asyncio.run(warm.api_warm_requests(app=ApiHandler()))

    assert statuses == [401, 401, 401]
    assert commands == []
    monkeypatch.undo()
    assert sorted(client.scan_iter(count=1000)) == keys_before


def test_the_conversation_ids_read_uses_the_process_redis_client() -> None:
    """One client per server in the process: a module's pool of its own opened a second connection (and paid
    redis-py's version lookup again) in each instance's first list."""
    me = account("warm")
    client = sync_redis()
    client.connection_pool.disconnect()
    assert _connected(client) == 0

    assert user_conversation_ids(user_id=me.id) == []

    assert _connected(client) >= 1


def test_a_server_that_does_not_answer_is_logged_and_the_warm_up_returns(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)  # nothing listens on port 1
    monkeypatch.setattr(clients, "sync_redis", lambda: dead)
    with caplog.at_level(logging.WARNING, logger="api.warm"):
        warm.api_warm()
    assert any("warm-up incomplete" in r.getMessage() for r in caplog.records)


def test_the_lifespan_runs_the_blocking_start_in_a_thread_then_the_requests_before_it_reports_started() -> None:
    order: list[str] = []
    loop_thread: list[int] = []

    def blocking() -> None:
        order.append("warm" if threading.get_ident() != loop_thread[0] else "warm on the loop")

    async def requests() -> None:
        order.append("requests" if threading.get_ident() == loop_thread[0] else "requests off the loop")

    async def run() -> None:
        loop_thread.append(threading.get_ident())
        events = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]

        async def receive() -> dict[str, Any]:
            return events.pop()

        async def send(message: dict[str, Any]) -> None:
            order.append(message["type"])

        await lifespan_serve(receive, send, on_startup_blocking=blocking, on_startup_async=requests)

    asyncio.run(run())
    assert order[:3] == ["warm", "requests", "lifespan.startup.complete"], order
