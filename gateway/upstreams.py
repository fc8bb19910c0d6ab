"""Upstream selection: live registry instances, least outstanding work, a circuit breaker per instance.

* The instance list follows the registry (one SCAN+MGET per ``REGISTRY_REFRESH_S``), so a new instance gets
  traffic within about a second and a vanished one none (it leaves the registry within its TTL, and its
  breaker opens sooner if requests to it fail).
* Least outstanding requests: each instance counts its in-flight HTTP requests and, separately, its open
  WebSockets; a request goes to the available instance with the fewest of its kind, ties broken round-robin per
  role and kind. The counts are this process' own: the gateways sharing a port (docs/adr/0056) start their
  rotations at their instance numbers, so that with nothing open each sends its first WebSocket to another broker.
* Circuit breaker per instance (purgatory, asyncio-native): closed → opened after
  ``GATEWAY_BREAKER_THRESHOLD`` consecutive transport failures (refused or timed-out connects, broken
  connections) → after ``GATEWAY_BREAKER_OPEN_S`` one probe request is let through (half-open) → closed on
  its success, opened again on its failure. Upstream HTTP statuses (even 5xx) are answers, not failures.
* When no instance of a role is available, :meth:`Upstreams.pick` says so at once (no connect attempted),
  with how long until the first breaker may probe, for ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import redis
import redis.asyncio
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from core.registry import Instance, instances_list_async

logger = logging.getLogger(__name__)

# A registry read at most once a second: new instances get traffic within ~1 s of registering, and each
# gateway adds one SCAN+MGET per second to Redis, whatever its request rate.
REGISTRY_REFRESH_S = 1.0
Kind = Literal["http", "ws"]


class UpstreamFailed(Exception):
    """A transport failure talking to one instance (counted by its breaker)."""


@dataclass
class Load:
    http: int = 0
    ws: int = 0
    probing: bool = False


@dataclass(frozen=True, slots=True)
class Unavailable:
    role: str
    retry_after_s: int
    instances: int  # how many are registered (all with open breakers) — 0 means none is live


class Upstreams:
    """The gateway's view of the upstream instances. One per process; every method runs on its event loop."""

    def __init__(self, *, client: redis.asyncio.Redis, breaker_threshold: int, breaker_open_s: float,
                 rotation_start: int = 0) -> None:
        self._client = client
        self._instances: list[Instance] = []
        self._fetched_at = -math.inf
        self._refreshing: asyncio.Future[None] | None = None
        self._rotation_start = rotation_start
        self._rotations: dict[tuple[str, Kind], itertools.count[int]] = {}
        self._load: dict[str, Load] = {}
        self._open_s = breaker_open_s
        self._breakers = AsyncCircuitBreakerFactory(default_threshold=breaker_threshold,
                                                    default_ttl=breaker_open_s)
        self._breakers.add_listener(self._on_breaker_event)

    @staticmethod
    def _on_breaker_event(name: str, event_name: str, event: Any) -> None:
        if event_name == "state_changed":
            # One line per transition, so operators (and the fault tests) can follow each breaker.
            logger.warning("gateway: breaker %s is now %s", name, event.state)

    async def _refresh(self) -> None:
        try:
            self._instances = await instances_list_async(self._client)
            live = {i.id for i in self._instances}
            # Forget the load of instances that left; their in-flight work finishes unaffected.
            for gone in set(self._load) - live:
                if not (self._load[gone].http or self._load[gone].ws):
                    del self._load[gone]
        except (redis.RedisError, OSError) as exc:
            # Keep routing to the last known instances while Redis is away.
            logger.warning("gateway: registry read failed: %s", exc)
        finally:
            self._fetched_at = time.monotonic()

    async def instances(self, role: str | None = None, *, fresh: bool = False) -> list[Instance]:
        """Live instances of ``role`` (all roles if None), re-read from the registry at most once a second.

        A stale list is refreshed in the background (one read at a time) while requests keep using the last
        one, so a slow or absent Redis never holds a request; only the very first call waits for a read.
        ``fresh``: wait for that read when the list is stale (``/readyz``: a gateway that had no request for a while
        would otherwise answer from the list of its last one, and the gateways sharing a port, docs/adr/0056,
        would disagree). Bounded by the registry client's socket timeout; still at most one read a second.
        """
        stale = time.monotonic() - self._fetched_at > REGISTRY_REFRESH_S
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(self._refresh())
        if (self._fetched_at == -math.inf or (fresh and stale)) and self._refreshing is not None:
            await asyncio.shield(self._refreshing)
        return [i for i in self._instances if role is None or i.role == role]

    async def _state(self, instance: Instance) -> tuple[bool, float]:
        """(may take a request now, seconds until it may if not). A half-open breaker takes one probe."""
        context = (await self._breakers.get_breaker(instance.id)).context
        load = self._load.setdefault(instance.id, Load())
        if context.state == "closed":
            return True, 0.0
        if load.probing:
            return False, 1.0
        if context.state == "opened":
            wait = (context.opened_at or 0.0) + self._open_s - time.time()
            return wait <= 0, max(wait, 0.0)
        return True, 0.0  # half-opened and no probe in flight

    async def pick(self, *, role: str, kind: Kind, exclude: frozenset[str] = frozenset()) -> Instance | Unavailable:
        """The available instance of ``role`` with the least outstanding ``kind`` work, or why there is none.

        No I/O beyond the (cached) registry read: an all-open role is answered without any connect.
        """
        found = [i for i in await self.instances(role) if i.id not in exclude]
        if not found:
            return Unavailable(role=role, retry_after_s=2, instances=0)
        # Per role and kind: a gateway's HTTP requests must not move where its next WebSocket's tie lands.
        rotation = self._rotations.setdefault((role, kind), itertools.count(self._rotation_start))
        start = next(rotation) % len(found)
        best: Instance | None = None
        best_load = math.inf
        soonest = math.inf
        for instance in found[start:] + found[:start]:
            ok, wait = await self._state(instance)
            if not ok:
                soonest = min(soonest, wait)
                continue
            load = self._load[instance.id]
            current = load.http if kind == "http" else load.ws
            if current < best_load:
                best, best_load = instance, current
        if best is None:
            return Unavailable(role=role, retry_after_s=max(1, math.ceil(soonest)), instances=len(found))
        return best

    @asynccontextmanager
    async def attempt(self, instance: Instance, *, kind: Kind) -> AsyncIterator[None]:
        """Count one unit of ``kind`` work on ``instance`` and run the body under its breaker.

        Raises :class:`OpenedState` before the body if the breaker is open (another request saw the failures
        first). An :class:`UpstreamFailed` raised in the body counts as a failure and propagates; a clean
        exit counts as a success; any other exception (the client left, a bug) counts as neither.
        """
        load = self._load.setdefault(instance.id, Load())
        breaker = await self._breakers.get_breaker(instance.id)
        context = breaker.context
        probe = context.state != "closed"
        context.handle_new_request()  # raises OpenedState while open; moves to half-opened after the wait
        if probe:
            load.probing = True
        if kind == "http":
            load.http += 1
        else:
            load.ws += 1
        try:
            yield
        except UpstreamFailed as exc:
            context.handle_exception(exc)
            raise
        else:
            context.handle_end_request()
        finally:
            if kind == "http":
                load.http -= 1
            else:
                load.ws -= 1
            if probe:
                load.probing = False
            # What purgatory's own `async with breaker` does on exit: persist the transition, fire the hooks.
            while context.messages:
                await self._breakers.messagebus.handle(context.messages.pop(0), self._breakers.uow)

    @asynccontextmanager
    async def holding(self, instance: Instance, *, kind: Kind) -> AsyncIterator[None]:
        """Count one unit of ``kind`` work on ``instance`` for the body (no breaker: the connect succeeded).

        For streaming a response body or holding an open WebSocket after :meth:`attempt` succeeded.
        """
        load = self._load.setdefault(instance.id, Load())
        if kind == "http":
            load.http += 1
        else:
            load.ws += 1
        try:
            yield
        finally:
            if kind == "http":
                load.http -= 1
            else:
                load.ws -= 1

    async def breaker_state(self, instance_id: str) -> str:
        """"closed", "opened" or "half-opened" (for tests and the status log)."""
        return str((await self._breakers.get_breaker(instance_id)).context.state)

    def load(self, instance_id: str) -> Load:
        return self._load.setdefault(instance_id, Load())


__all__ = ["OpenedState", "Unavailable", "UpstreamFailed", "Upstreams"]
