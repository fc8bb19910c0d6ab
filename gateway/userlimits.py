"""Per-user limits of the gateway that hold across gateways and brokers (docs/security.md, docs/adr/0027).

* :class:`SocketSlots`: at most ``GATEWAY_WS_MAX_SOCKETS_PER_USER`` open WebSockets per user, counted in a
  Redis sorted set per user (``cs:gw:socks:<user>``, one member per socket scored by its expiry). Each gateway
  renews the expiry of its own sockets every third of the TTL, so the slots of a gateway that was killed free
  themselves within the TTL. Every client socket passes a gateway (brokers are internal), so the count is the
  user's, whichever broker holds each socket.
* The aggregate frame budget per user is a fixed-window counter of :class:`gateway.ratelimit.RateLimiter`
  (``gw:ws-user-frames``), hit for each client frame in ``gateway/wsproxy.py``.

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
from messaging.resp import RespClient, resp_client_for, script_run

logger = logging.getLogger(__name__)

# KEYS[1] the user's set; ARGV: now, expiry, cap, member, key TTL. 1: admitted, 0: the user is at the cap.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: the users' sets, one per slot (a user's set repeats for each of their slots); ARGV: expiry, key TTL,
# then the slot members in KEYS order. Moves each slot's expiry forward if it is still there (XX: a slot
# released meanwhile stays released).
_RENEW = """
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', ARGV[1], ARGV[i + 2])
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return #KEYS
"""
# Slots per renewal script: each call is a few milliseconds of Redis time at most, so other clients never
# wait long behind one.
RENEW_SLICE = 500


class SocketSlots:
    """The open-socket slots of users, shared by every gateway through Redis. One per gateway process."""

    def __init__(self, *, client: redis.asyncio.Redis, cap: int, ttl_s: float) -> None:
        self._client = client
        self.cap = cap
        self.ttl_s = ttl_s
        self.held: dict[str, str] = {}  # slot member -> user id, of this process's open sockets
        self._renewer: asyncio.Task[None] | None = None
        # A connect's slot and a close's release over one pipelined connection (messaging/resp.py, as the
        # admission scripts): through redis-py they were ~6 % of the gateway's CPU in a wave of connects (pool,
        # Retry, health check, a write per command; docs/benchmarks.md). None: redis-py's own (TLS, cluster).
        self._resp: RespClient | None = resp_client_for(client)
        # EVALSHA: the script's text is not sent with every connect (EVAL once on a NOSCRIPT answer).
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    async def acquire(self, *, user_id: str) -> str | None:
        """A slot for one more socket of ``user_id`` (release it when the socket ends), or None at the cap.
        Side effect: one Lua call on Redis; with Redis down, a local slot (fail open)."""
        member = uuid.uuid4().hex
        now = time.time()
        try:
            admitted = await script_run(self._resp, self._acquire, keys=[GATEWAY_SOCKETS_PREFIX + user_id],
                                        args=[now, now + self.ttl_s, self.cap, member, int(self.ttl_s) + 1])
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
            if self._resp is None:
                await self._client.zrem(GATEWAY_SOCKETS_PREFIX + user_id, member)
            else:
                await self._resp.execute([["ZREM", GATEWAY_SOCKETS_PREFIX + user_id, member]])

    def close(self) -> None:
        """Close the pipelined connection (the gateway's shutdown)."""
        if self._resp is not None:
            self._resp.close()

    async def _renew_loop(self) -> None:
        """Push the expiry of this process's slots forward every third of the TTL, while it holds any: one
        script call per RENEW_SLICE slots (a pipeline of two commands per slot cost an idle gateway ~1 % of a
        core at 5,000 sockets in redis-py's command packing alone; bench/connects.py)."""
        while self.held:
            await asyncio.sleep(self.ttl_s / 3)
            expiry = time.time() + self.ttl_s
            held = list(self.held.items())
            try:
                for start in range(0, len(held), RENEW_SLICE):
                    part = held[start:start + RENEW_SLICE]
                    await self._renew(keys=[GATEWAY_SOCKETS_PREFIX + user_id for _, user_id in part],
                                      args=[expiry, int(self.ttl_s) + 1, *(member for member, _ in part)])
            except (redis.RedisError, OSError) as exc:
                logger.warning("gateway: could not renew socket slots (%s)", exc)
