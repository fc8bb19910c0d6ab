"""Redis clients for the sync REST code.

A sync ``redis.Redis`` is thread-safe (it owns a connection pool), so one per process serves every request
thread. An asyncio client is bound to the event loop it first ran on, so the async write path
(``messaging.services``) gets a fresh one inside each :func:`run_async` call, closed before it returns.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import redis.asyncio
from asgiref.sync import async_to_sync
from django.conf import settings

T = TypeVar("T")


@functools.cache
def _sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)


def sync_redis() -> redis.Redis:
    """The process's sync client for ``settings.REDIS_URL``."""
    return _sync_redis(settings.REDIS_URL)


def run_async(body: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
    """Run ``body(client)`` to completion from sync code with a fresh asyncio client; return its result.

    Side effects: those of ``body``; opens and closes one Redis connection pool.
    """

    async def main() -> T:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=3)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return async_to_sync(main)()
