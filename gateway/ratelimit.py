"""Rate limits shared by every gateway process: django-ratelimit's algorithm on the shared Redis cache.

django-ratelimit's ``get_usage`` is synchronous (Django's cache API over a blocking Redis client), and the
gateway must never block its event loop, so this module keeps the library's *algorithm and keys* —
``_split_rate`` (``"30/m"``), ``_get_window`` (fixed windows with a per-key jitter) and ``_make_cache_key``
— and does the one round trip (``SET NX EX`` + ``INCR`` in a MULTI, exactly what ``cache.add`` +
``cache.incr`` do) on an asyncio Redis client. The counters live under the same cache keys as
``django_ratelimit.core.get_usage`` with ``CACHES['default']``, so both read the same numbers (tested).

When Redis fails, limiting *fails open to per-process limits*: the same rates are counted in this process's
memory until Redis answers again (docs/adr/0005).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis
import redis.asyncio
from django.core.cache import caches
from django_ratelimit.core import EXPIRATION_FUDGE, _get_window, _make_cache_key, _split_rate

logger = logging.getLogger(__name__)

# After a failed Redis call, count locally for this long before trying Redis again, so an outage costs
# one failed round trip per 2 s per process instead of one per request.
REDIS_RETRY_S = 2.0


@dataclass(frozen=True, slots=True)
class Counter:
    """One fixed-window counter of one value (an IP, a user id) in one group, keyed as django-ratelimit keys it."""

    group: str
    key: str
    limit: int
    ttl_s: int
    window_end: float


@dataclass(frozen=True, slots=True)
class Usage:
    count: int
    limit: int
    should_limit: bool
    retry_after_s: int
    shared: bool  # False when counted in this process only (Redis down)


def rate_validate(rate: str) -> tuple[int, int]:
    """``(limit, period_s)`` of a django-ratelimit rate such as ``"30/m"``; ValueError if malformed. Pure."""
    try:
        limit, period = _split_rate(rate)
    except (AttributeError, KeyError, ValueError, TypeError):
        raise ValueError(f"{rate!r} is not a rate like 30/m, 5/10s or 1000/h") from None
    if limit <= 0 or period <= 0:
        raise ValueError(f"{rate!r}: limit and period must be positive")
    return int(limit), int(period)


class RateLimiter:
    """Fixed-window counters keyed like django-ratelimit, on the shared cache's Redis.

    Precondition: ``CACHES['default']`` is the Redis cache (``django.core.cache.backends.redis``); its
    KEY_PREFIX and version shape the keys. The client should have short timeouts: a slow Redis must not
    hold requests (the gateway uses 250 ms).
    """

    def __init__(self, *, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._cache = caches["default"]
        self._redis_down_until = 0.0
        self._local: dict[str, tuple[int, float]] = {}

    def _local_incr(self, key: str, *, expires_at: float) -> int:
        now = time.time()
        if len(self._local) > 100_000:  # bound the memory of a long outage: drop expired windows
            self._local = {k: v for k, v in self._local.items() if v[1] > now}
        # The key names its window, so a new window is a new key; the expiry only bounds the memory.
        count = self._local.get(key, (0, expires_at))[0] + 1
        self._local[key] = (count, expires_at)
        return count

    def shared(self) -> bool:
        """Whether counters go to Redis now (False for REDIS_RETRY_S after a failure: counted locally)."""
        return time.time() >= self._redis_down_until

    def redis_failed(self, exc: BaseException) -> None:
        """Count locally for REDIS_RETRY_S after a failed Redis call (by this limiter or a combined script)."""
        self._redis_down_until = time.time() + REDIS_RETRY_S
        logger.warning("gateway: rate-limit Redis unavailable (%s); counting per process for %.0fs",
                       exc, REDIS_RETRY_S)

    def counter(self, *, group: str, rate: str, value: str) -> Counter:
        """The counter of one hit of ``value`` (an IP, a user id) in ``group`` at ``rate``, in the current
        window (django-ratelimit's key, TTL and jittered window end). Pure but for the clock."""
        limit, period = rate_validate(rate)
        window = _get_window(value, period)
        key = self._cache.make_key(_make_cache_key(group, window, rate, value, None))
        return Counter(group=group, key=key, limit=limit, ttl_s=period + EXPIRATION_FUDGE, window_end=window)

    def usage(self, counter: Counter, count: int, *, shared: bool = True) -> Usage:
        """What ``count`` hits of ``counter`` mean. Pure but for the clock."""
        # The window ends at `window_end` (django-ratelimit's jittered edge); at least 1 s, as Retry-After is whole.
        retry_after = max(1, math.ceil(counter.window_end - time.time()))
        return Usage(count=count, limit=counter.limit, should_limit=count > counter.limit,
                     retry_after_s=retry_after, shared=shared)

    def local_hit(self, counter: Counter) -> Usage:
        """Count one hit in this process only (Redis is down)."""
        count = self._local_incr(counter.key, expires_at=counter.window_end + EXPIRATION_FUDGE)
        return self.usage(counter, count, shared=False)

    async def hit(self, *, group: str, rate: str, value: str) -> Usage:
        """Count one hit of ``value`` (an IP, a user id) in ``group`` at ``rate``; say whether to refuse it.

        Side effect: one Redis MULTI (SET NX EX, INCR), or a local count while Redis is down.
        """
        return await self.hit_counter(self.counter(group=group, rate=rate, value=value))

    async def hit_counter(self, counter: Counter) -> Usage:
        """:meth:`hit` of a counter made by :meth:`counter`."""
        if self.shared():
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.set(counter.key, 0, ex=counter.ttl_s, nx=True)
                    pipe.incr(counter.key)
                    _, count = await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                self.redis_failed(exc)
            else:
                return self.usage(counter, int(count))
        return self.local_hit(counter)


class TokenBucket:
    """A per-connection frame budget: ``rate`` tokens a second, at most ``burst`` saved. In-process only
    (a WebSocket lives on one gateway process), so no Redis round trip per frame. Slotted: one per socket."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, *, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        """Spend one token if there is one. Pure apart from the bucket's own state."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
