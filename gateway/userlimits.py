"""Per-user limits of the gateway that hold across gateways and brokers (docs/security.md, docs/adr/0027).

* :class:`SocketSlots`: at most ``GATEWAY_WS_MAX_SOCKETS_PER_USER`` open WebSockets per user, counted in a
  Redis sorted set per user (``cs:gw:socks:<user>``, one member per socket scored by its expiry). Each gateway
  renews the expiry of its own sockets every third of the TTL, so the slots of a gateway that was killed free
  themselves within the TTL. Every client socket passes a gateway (brokers are internal), so the count is the
  user's, whichever broker holds each socket.
* The aggregate frame budget per user is a fixed-window counter of :class:`gateway.ratelimit.RateLimiter`
  (``gw:ws-user-frames``), hit for each client frame in ``gateway/proxy.py``.

Both fail open when Redis is down (as the rate limits do, docs/adr/0005): a Redis outage must not close every
socket; the per-socket limits still hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import redis
import redis.asyncio

from core.keys import GATEWAY_SOCKETS_PREFIX

logger = logging.getLogger(__name__)

# KEYS[1] the user's set; ARGV: now, expiry, cap, member, key TTL. 1: admitted, 0: the user is at the cap.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class SocketSlots:
    """The open-socket slots of users, shared by every gateway through Redis. One per gateway process."""

    def __init__(self, *, client: redis.asyncio.Redis, cap: int, ttl_s: float) -> None:
        self._client = client
        self.cap = cap
        self.ttl_s = ttl_s
        self.held: dict[str, str] = {}  # slot member -> user id, of this process's open sockets
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self, *, user_id: str) -> str | None:
        """A slot for one more socket of ``user_id`` (release it when the socket ends), or None at the cap.
        Side effect: one Lua call on Redis; with Redis down, a local slot (fail open)."""
        member = uuid.uuid4().hex
        now = time.time()
        try:
            admitted = await self._client.eval(_ACQUIRE, 1, GATEWAY_SOCKETS_PREFIX + user_id, now, now + self.ttl_s,
                                               self.cap, member, int(self.ttl_s) + 1)
        except (redis.RedisError, OSError) as exc:
            logger.warning("gateway: socket slots unavailable (%s); admitting the socket", exc)
            admitted = 1
        if not admitted:
            return None
        self.held[member] = user_id
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        return member

    async def release(self, member: str) -> None:
        """Free a slot. Side effect: one ZREM (a failure leaves the slot to expire within the TTL)."""
        user_id = self.held.pop(member, None)
        if user_id is None:
            return
        with contextlib.suppress(redis.RedisError, OSError):
            await self._client.zrem(GATEWAY_SOCKETS_PREFIX + user_id, member)

    async def _renew_loop(self) -> None:
        """Push the expiry of this process's slots forward every third of the TTL, while it holds any."""
        while self.held:
            await asyncio.sleep(self.ttl_s / 3)
            expiry = time.time() + self.ttl_s
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for member, user_id in list(self.held.items()):
                        pipe.zadd(GATEWAY_SOCKETS_PREFIX + user_id, {member: expiry}, xx=True)
                        pipe.expire(GATEWAY_SOCKETS_PREFIX + user_id, int(self.ttl_s) + 1)
                    await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                logger.warning("gateway: could not renew socket slots (%s)", exc)
