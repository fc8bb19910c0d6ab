"""Clients of the message bus Redis (docs/adr/0022).

The bus holds every key of a partition (``cs:{pNN}:*``: the stream, seq counters, dedup keys, read cursors,
the storage drain's lock, lease, failures and stats), the recent messages' meta hashes (``cs:msgmeta:*``)
and the storage pipeline's dead letters and rate buckets. It is ``settings.STREAMS_REDIS_URL`` (REDIS_URL
by default) and may be a Redis Cluster (``STREAMS_REDIS_CLUSTER``). Everything else (tickets, membership
cache, presence, registry, pub/sub, Django's cache, Celery) stays on ``settings.REDIS_URL``, which must be
one Redis.

When the bus is the same single Redis as REDIS_URL (the default), :func:`bus_resolve` hands back the
caller's own client, so that configuration behaves exactly as before the bus was split out.
"""

from __future__ import annotations

import os
from typing import Any, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from django.conf import settings

BusAsync: TypeAlias = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
BusSync: TypeAlias = redis.Redis | redis.cluster.RedisCluster

# Timeouts of the ordinary (non-blocking) bus commands, like the hub's own client: a Redis that does not
# answer within 5 s is treated as down rather than holding a caller for ever.
COMMAND_TIMEOUT_S = 5.0


def bus_is_separate() -> bool:
    """Whether the bus is another server (or a cluster) than ``REDIS_URL``."""
    return bool(settings.STREAMS_REDIS_CLUSTER) or settings.STREAMS_REDIS_URL != settings.REDIS_URL


_CLUSTER_CLASSES = (redis.asyncio.cluster.RedisCluster, redis.cluster.RedisCluster)
# The answer per class: redis-py's cluster classes derive from a typing.Protocol, so ``isinstance`` against
# them runs typing's and abc's Python-level checks on every call (every append asks: ~1 % of a broker's CPU
# at 5,000 deliveries/s, docs/benchmarks.md, issue 16, session 9). Keyed by ``__class__`` (what isinstance
# looks at), and bounded by the few client classes a process uses.
_cluster_by_class: dict[type, bool] = {}


def bus_is_cluster(client: BusAsync | BusSync) -> bool:
    cls = client.__class__
    known = _cluster_by_class.get(cls)
    if known is None:
        known = _cluster_by_class[cls] = isinstance(client, _CLUSTER_CLASSES)
    return known


class BusCluster(redis.asyncio.cluster.RedisCluster):
    """redis-py's asyncio cluster client, initialized before its first command is routed.

    redis-py 8.1 routes a command (its policy, its target node) before it initializes the client's view of
    the cluster, so the first commands of a fresh client that run concurrently (a broker's per-partition
    XREADs, all started together) may go out before the slot map exists, and some of them never return.
    Reproduced with 8 concurrent first XREAD BLOCKs on each of 40 fresh clients: 13-17 of the 40 lost reads
    for good; with this class (or an ``initialize()`` first), none (bench/cluster_first_use.py). Pipelines
    initialize first by themselves."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.initialize()  # returns at once once initialized; concurrent callers share one run (a lock)
        return await super().execute_command(*args, **kwargs)


def bus_async_new(*, socket_timeout: float = COMMAND_TIMEOUT_S, max_connections: int | None = None) -> BusAsync:
    """A new asyncio client of the bus: a ``RedisCluster`` on a cluster, else a plain client (with a blocking
    pool of ``max_connections`` when given, so a burst waits for a connection instead of failing). It binds
    to the event loop it first runs on; the caller closes it (``aclose``)."""
    if settings.STREAMS_REDIS_CLUSTER:
        # One pool per node; redis-py follows MOVED/ASK and refreshes its slot map by itself.
        return BusCluster.from_url(
            settings.STREAMS_REDIS_URL, socket_timeout=socket_timeout, socket_connect_timeout=COMMAND_TIMEOUT_S,
            **({"max_connections": max_connections} if max_connections else {}))
    if max_connections:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.STREAMS_REDIS_URL, max_connections=max_connections, timeout=COMMAND_TIMEOUT_S,
            socket_timeout=socket_timeout, socket_connect_timeout=COMMAND_TIMEOUT_S)
        return redis.asyncio.Redis(connection_pool=pool)
    return redis.asyncio.Redis.from_url(settings.STREAMS_REDIS_URL, socket_timeout=socket_timeout,
                                        socket_connect_timeout=COMMAND_TIMEOUT_S)


_sync: BusSync | None = None
_sync_pid = 0


def bus_sync() -> BusSync:
    """The process's sync bus client (thread-safe; re-created after a fork). Socket timeout 10 s: no sync
    caller blocks on purpose (no XREAD BLOCK), so a longer wait means Redis is in trouble."""
    global _sync, _sync_pid
    if _sync is None or _sync_pid != os.getpid():
        if settings.STREAMS_REDIS_CLUSTER:
            _sync = redis.cluster.RedisCluster.from_url(settings.STREAMS_REDIS_URL, socket_timeout=10,
                                                        socket_connect_timeout=5)
        else:
            _sync = redis.Redis.from_url(settings.STREAMS_REDIS_URL, socket_timeout=10, socket_connect_timeout=5,
                                         health_check_interval=30)
        _sync_pid = os.getpid()
    return _sync
