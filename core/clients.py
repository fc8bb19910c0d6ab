"""Redis clients for the sync REST code.

A sync ``redis.Redis`` is thread-safe (it owns a connection pool), so one per process serves every request
thread. An asyncio client is bound to the event loop it first ran on, so the async write path
(``messaging.services``) gets fresh ones inside each :func:`run_async` call, closed before it returns.
Keys of the message bus (streams, seq counters, read cursors) are read with ``core.bus.bus_sync()``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import redis
import redis.asyncio
from asgiref.sync import async_to_sync
from django.conf import settings

from core.bus import BusAsync, bus_async_new, bus_is_separate

T = TypeVar("T")


@functools.cache
def _sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)


def sync_redis() -> redis.Redis:
    """The process's sync client for ``settings.REDIS_URL``."""
    return _sync_redis(settings.REDIS_URL)


def connections_open(*, documents: Iterable[Any] = ()) -> None:
    """Open this process's REDIS_URL and store connections and run mongoengine's index check of ``documents``
    (each class's first use runs a ``createIndexes``): what a role's first request would otherwise pay (its
    warm-up, api/warm.py and messaging/warm.py). Blocking. Side effects: a pooled connection to each server;
    the idempotent ``createIndexes``. Raises what the servers raise."""
    from mongoengine.connection import get_db

    sync_redis().ping()
    get_db().command("ping")
    for document in documents:
        document._get_collection()


def run_async(body: Callable[[redis.asyncio.Redis, BusAsync], Awaitable[T]]) -> T:
    """Run ``body(client, bus)`` to completion from sync code with fresh asyncio clients of REDIS_URL and of
    the message bus (the same client when the bus is REDIS_URL); return its result.

    Side effects: those of ``body``; opens and closes one Redis connection pool (two with a separate bus).
    """

    async def main() -> T:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=3)
        bus = bus_async_new() if bus_is_separate() else client
        try:
            return await body(client, bus)
        finally:
            if bus is not client:
                await bus.aclose()
            await client.aclose()

    return async_to_sync(main)()
