"""Service discovery: every instance is a Redis key with a TTL, refreshed by a heartbeat.

Key ``cs:registry:{role}:{id}`` holds ``{"role", "id", "url", "started_at", "last_seen", "restarts",
"run_id"}`` as JSON and expires after ``REGISTRY_TTL_S``. A heartbeat rewrites it every
``REGISTRY_HEARTBEAT_S``; a clean shutdown deletes it; a SIGKILLed instance simply stops refreshing and is
gone within the TTL. No process of its own to run or to fail, and readers need nothing but a Redis
connection. Readers find the keys through an index (``REGISTRY_INDEX_KEY``: ``{role}:{id}`` -> expiry) that
every registration writes in the same round trip, not by a SCAN of the keyspace: at the data tier bench's 1M
messages Redis held 2.1M keys, and each gateway's once-a-second read was ~4,300 SCAN round trips that every
request through that gateway waited behind (docs/benchmarks.md, "The list's cards at 1M").

Restarts: every start of a role slot (role and instance number) within one run increments the counter
``cs:starts:{run_id}:{role}:{instance}`` (:func:`start_count_incr`, called by ``manage.py role`` before it
execs the server); the registration carries ``restarts`` = that count - 1. ``make run`` generates a fresh
``CHATSTREAM_RUN_ID`` per run (its supervisord config), so the count is per run and is not fooled by a
restarted process getting a new instance id; without one (docker compose, a role started by hand) the run is
the host (a container keeps its hostname across its ``restart:`` restarts).

The heartbeat is a daemon thread with a synchronous client, so it works the same under daphne, Celery
worker and Celery beat, and never runs on an event loop.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from core.keys import REGISTRY_INDEX_KEY, REGISTRY_PREFIX, registry_key, starts_key
from core.values import as_str

logger = logging.getLogger(__name__)

# A run's start counters outlive any restart back-off; the heartbeat renews them, so they only lapse a week after
# the slot's last instance stopped (then a new start counts from 0, as in a new run).
STARTS_TTL_S = 7 * 24 * 3600
ROLES = ("gateway", "broker", "api", "storage", "storage-beat")


@dataclass(frozen=True, slots=True)
class Instance:
    role: str
    id: str
    url: str
    started_at: str
    last_seen: str
    # Added after the first five (the JSON of `manage.py services --json` is a public interface: fields are only
    # ever added); entries written before them read as 0 and "".
    restarts: int = 0
    run_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _parse(raw: bytes | str | None) -> Instance | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return Instance(role=str(data["role"]), id=str(data["id"]), url=str(data["url"]),
                        started_at=str(data["started_at"]), last_seen=str(data["last_seen"]),
                        restarts=int(data.get("restarts", 0)), run_id=str(data.get("run_id", "")))
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("registry: ignoring a malformed entry %r", raw)
        return None


def start_count_incr(client: redis.Redis, *, run_id: str, role: str, instance: str) -> int:
    """Count one more start of the slot ``(run_id, role, instance)`` and return the count (1 on the first).
    Side effect: INCR and EXPIRE of ``cs:starts:{run_id}:{role}:{instance}`` in one transaction."""
    pipe = client.pipeline(transaction=True)
    key = starts_key(run_id, role, instance)
    pipe.incr(key)
    pipe.expire(key, STARTS_TTL_S)
    count, _ = pipe.execute()
    return int(count)


# How long past its expiry an index entry is still read (and then pruned): the entry's key decides who is live,
# so this only absorbs clock skew between the registering host and the reader. A minute is far above NTP's.
REGISTRY_INDEX_GRACE_S = 60


def instance_register(client: redis.Redis, *, instance: Instance, ttl_s: int, slot: str | None = None) -> None:
    """Write (or refresh) ``instance`` with a TTL and its index entry. Side effect: one round trip (SET with EX,
    ZADD); with ``slot`` (the instance number) and a run id it also renews the slot's start counter."""
    pipe = client.pipeline(transaction=False)
    pipe.set(registry_key(instance.role, instance.id), instance.to_json(), ex=ttl_s)
    pipe.zadd(REGISTRY_INDEX_KEY, {f"{instance.role}:{instance.id}": time.time() + ttl_s})
    if slot is not None and instance.run_id:
        pipe.expire(starts_key(instance.run_id, instance.role, slot), STARTS_TTL_S)
    pipe.execute()


def instance_deregister(client: redis.Redis, *, role: str, instance_id: str) -> None:
    """Remove an instance at once (clean shutdown)."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(registry_key(role, instance_id))
    pipe.zrem(REGISTRY_INDEX_KEY, f"{role}:{instance_id}")
    pipe.execute()


def _index_queue(pipe: Any) -> None:
    """Queue the index's read on ``pipe`` (sync or asyncio): prune entries past the grace, then the rest."""
    oldest = time.time() - REGISTRY_INDEX_GRACE_S
    pipe.zremrangebyscore(REGISTRY_INDEX_KEY, "-inf", f"({oldest}")
    pipe.zrangebyscore(REGISTRY_INDEX_KEY, oldest, "+inf")


def _index_keys(members: list[Any], role: str | None) -> list[str]:
    names = (as_str(m) for m in members)
    return sorted(REGISTRY_PREFIX + n for n in names if role is None or n.startswith(f"{role}:"))


def _instances(raws: list[Any]) -> list[Instance]:
    found = [_parse(raw) for raw in raws]
    return sorted((i for i in found if i is not None), key=lambda i: (i.role, i.id))


def instances_list(client: redis.Redis, *, role: str | None = None) -> list[Instance]:
    """Live instances, sorted by role then id: the index (one round trip), then one MGET of its keys. An empty
    index (instances registered by a version before it) is read with SCAN, never KEYS."""
    pipe = client.pipeline(transaction=False)
    _index_queue(pipe)
    members: Any = pipe.execute()[1]
    if members:
        keys = _index_keys(members, role)
    else:
        pattern = f"{REGISTRY_PREFIX}{role}:*" if role else f"{REGISTRY_PREFIX}*"
        keys = sorted(as_str(k) for k in client.scan_iter(match=pattern, count=500))
    return _instances(client.mget(keys)) if keys else []


async def instances_list_async(client: redis.asyncio.Redis, *, role: str | None = None) -> list[Instance]:
    """The same as :func:`instances_list`, on an asyncio client (for the gateway's event loop)."""
    pipe = client.pipeline(transaction=False)
    _index_queue(pipe)
    members: Any = (await pipe.execute())[1]
    if members:
        keys = _index_keys(members, role)
    else:
        pattern = f"{REGISTRY_PREFIX}{role}:*" if role else f"{REGISTRY_PREFIX}*"
        keys = sorted([as_str(k) async for k in client.scan_iter(match=pattern, count=500)])
    return _instances(await client.mget(keys)) if keys else []


class Heartbeat:
    """Registers one instance, refreshes it from a daemon thread, deregisters on stop or interpreter exit.

    A failed refresh (Redis restarting) is logged and retried at the next beat; the instance reappears as
    soon as Redis answers again.
    """

    def __init__(self, *, redis_url: str, role: str, instance_id: str, url: str,
                 interval_s: float, ttl_s: int, restarts: int = 0, run_id: str = "",
                 slot: str | None = None) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._role = role
        self._id = instance_id
        self._url = url
        self._started_at = _now()
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._restarts = restarts
        self._run_id = run_id
        self._slot = slot
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"registry-{role}", daemon=True)

    @property
    def instance_id(self) -> str:
        return self._id

    def _beat(self) -> None:
        instance = Instance(role=self._role, id=self._id, url=self._url, started_at=self._started_at,
                            last_seen=_now(), restarts=self._restarts, run_id=self._run_id)
        instance_register(self._client, instance=instance, ttl_s=self._ttl_s, slot=self._slot)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._beat()
            except redis.RedisError as exc:
                logger.warning("registry heartbeat of %s failed: %s", self._id, exc)
            self._stop.wait(self._interval_s)

    def start(self) -> None:
        """Register now (raises if Redis is unreachable), then keep the entry alive in the background."""
        self._beat()
        self._thread.start()
        atexit.register(self.stop)
        logger.info("registered %s %s at %s (ttl %ss)", self._role, self._id, self._url, self._ttl_s)

    def stop(self) -> None:
        """Stop refreshing and delete the entry; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # A beat in flight would re-register right after the delete below.
            self._thread.join(timeout=3)
        try:
            instance_deregister(self._client, role=self._role, instance_id=self._id)
            logger.info("deregistered %s %s", self._role, self._id)
        except redis.RedisError as exc:  # it will expire by itself within the TTL
            logger.warning("deregistering %s failed (%s); it expires within %ss", self._id, exc, self._ttl_s)
