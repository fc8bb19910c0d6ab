"""The gateway's admission round trips: rate-limit counters, the revocation read, the ticket's GETDEL or SET, in
one Lua call each (issue 16, docs/adr/0044).

Why: a connect (``POST /api/v1/auth/ws-ticket``, then the ``/ws/`` handshake) made ~9 Redis round trips in
the gateway, one per layer (per-IP limit, revocation MGET, per-user limit, the ticket's SET; then per-IP limit,
GETDEL, revocation read, per-user limit, the socket slot), each a ``send`` and a wake-up that cost more than
the command. Here the per-IP limit layer *defers* its counters to the authentication layer, which runs them in
the same script as the credential's check:

* a ``jwt`` route: one script counts the per-IP counters, reads the token's revocation (jti and the user's
  generation marker), counts the per-user counter and, on the ticket route, stores the new ticket, in that
  order, stopping at the first refusal, so what is counted is exactly what the layers one by one counted;
* the ``/ws/`` handshake: one script counts the per-IP counter and consumes the ticket (GETDEL); a second one
  reads the owner's generation marker and counts the per-user counter (its key needs the user the ticket
  names, and django-ratelimit's key is an MD5 Lua cannot compute).

The counters are django-ratelimit's (keys, windows, ``SET NX EX`` + ``INCR``: :class:`RateLimiter`), so the
numbers are the ones ``django_ratelimit.core.get_usage`` reads. When the limiter counts locally (Redis failed,
docs/adr/0005) nothing is deferred and the counters stay local; a failed script counts its counters locally
and fails the revocation read open, as the layers did apart. The scripts go to the gateway's main Redis (2 s
timeout, which already bounded the revocation read and the ticket on these routes) over one pipelined
connection (``messaging/resp.py``, docs/adr/0040): every request in flight shares it, with no pool checkout,
``Retry`` or ``Timeout`` object per call; a server redis-py reaches by TLS or as a cluster keeps redis-py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.exceptions

from core.keys import REVOKED_PREFIX, REVOKED_USER_PREFIX, TICKET_PREFIX
from core.tokens import TicketOwner, ticket_owner_parse
from gateway.ratelimit import Counter, RateLimiter, Usage
from messaging.resp import RespClient, resp_client_for, script_run

# Counters: KEYS[first..last] with ARGV[arg], ARGV[arg + 1] = TTL and limit of each. Appends each count to
# `counts`; false at the first counter over its limit (counted, as django-ratelimit counts a refused hit).
_COUNT = """
local counts = {}
local function count(first, last, arg)
  for i = first, last do
    redis.call('SET', KEYS[i], 0, 'EX', ARGV[arg], 'NX')
    local c = redis.call('INCR', KEYS[i])
    counts[#counts + 1] = c
    if c > tonumber(ARGV[arg + 1]) then return false end
    arg = arg + 2
  end
  return true
end
local function refused(gen, marker)
  return marker and tonumber(gen) < tonumber(marker)
end
"""

# A jwt route. KEYS: n_ip IP counters, n_user user counters, the jti's revocation key, the user's marker, then
# the ticket's key if one is to be stored. ARGV: n_ip, n_user, TTL/limit pairs, gen, then the ticket's value
# and TTL. -> {verdict, counts...}: 0 admitted (ticket stored), 1 limited (the last count is the refusing
# one), 2 revoked.
_JWT = _COUNT + """
local n_ip, n_user = tonumber(ARGV[1]), tonumber(ARGV[2])
local arg = 3 + 2 * (n_ip + n_user)
if not count(1, n_ip, 3) then return {1, unpack(counts)} end
local k = n_ip + n_user
if redis.call('EXISTS', KEYS[k + 1]) == 1 or refused(ARGV[arg], redis.call('GET', KEYS[k + 2])) then
  return {2, unpack(counts)}
end
if not count(n_ip + 1, k, 3 + 2 * n_ip) then return {1, unpack(counts)} end
if KEYS[k + 3] then redis.call('SET', KEYS[k + 3], ARGV[arg + 1], 'EX', ARGV[arg + 2]) end
return {0, unpack(counts)}
"""

# The handshake's first step. KEYS: n IP counters, the ticket's key. ARGV: n, TTL/limit pairs.
# -> {verdict, the ticket's value or false, counts...}: 0 counted (the value says whether the ticket was
# there), 1 limited (the ticket is left alone).
_TICKET = _COUNT + """
local n = tonumber(ARGV[1])
if not count(1, n, 2) then return {1, false, unpack(counts)} end
return {0, redis.call('GETDEL', KEYS[n + 1]), unpack(counts)}
"""

# The handshake's second step, once the ticket named its owner. KEYS: the owner's marker, n user counters.
# ARGV: gen, n, TTL/limit pairs. -> {verdict, counts...}: 0 admitted, 1 limited, 2 revoked (nothing counted).
_OWNER = _COUNT + """
if refused(ARGV[1], redis.call('GET', KEYS[1])) then return {2} end
if not count(2, 1 + tonumber(ARGV[2]), 3) then return {1, unpack(counts)} end
return {0, unpack(counts)}
"""

ADMITTED, LIMITED, REVOKED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one admission call decided. ``usages`` are the counters counted, in order (the last one refused
    when ``outcome`` is LIMITED); ``owner`` is the ticket's owner (handshake step one), ``failed`` says Redis
    failed (the counters were counted locally and the revocation read failed open)."""

    outcome: int
    usages: tuple[tuple[Counter, Usage], ...] = ()
    owner: TicketOwner | None = None
    failed: bool = False

    def limited(self) -> tuple[Counter, Usage] | None:
        """The counter that refused the request, if one did."""
        return self.usages[-1] if self.outcome == LIMITED and self.usages else None

    def usage_of(self, group: str) -> Usage | None:
        return next((usage for counter, usage in self.usages if counter.group == group), None)


def _pairs(counters: list[Counter]) -> list[Any]:
    return [value for counter in counters for value in (counter.ttl_s, counter.limit)]


class Admission:
    """The combined round trips of the gateway's admission layers. One per gateway process."""

    def __init__(self, *, client: redis.asyncio.Redis, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._resp: RespClient | None = resp_client_for(client)
        self._jwt = client.register_script(_JWT)
        self._ticket = client.register_script(_TICKET)
        self._owner = client.register_script(_OWNER)

    async def _run(self, script: Any, *, keys: list[str], args: list[Any]) -> Any:
        """Run a registered script: EVALSHA on the pipelined connection (EVAL once on NOSCRIPT: first use, a
        restarted or flushed Redis), or redis-py's own where that connection is not available. Raises the
        client's errors."""
        return await script_run(self._resp, script, keys=keys, args=args)

    def close(self) -> None:
        """Close the pipelined connection (the gateway's shutdown)."""
        if self._resp is not None:
            self._resp.close()

    def _verdict(self, reply: list[Any], counters: list[Counter], *, skip: int = 1,
                 owner: TicketOwner | None = None) -> Verdict:
        counts = [int(c) for c in reply[skip:]]
        return Verdict(outcome=int(reply[0]), owner=owner, usages=tuple(
            (counter, self.limiter.usage(counter, count)) for counter, count in zip(counters, counts, strict=False)))

    def _local(self, counters: list[Counter], *, outcome_if_admitted: int = ADMITTED) -> Verdict:
        """Count ``counters`` in this process (Redis failed), stopping at the first over its limit."""
        usages: list[tuple[Counter, Usage]] = []
        for counter in counters:
            usage = self.limiter.local_hit(counter)
            usages.append((counter, usage))
            if usage.should_limit:
                return Verdict(outcome=LIMITED, usages=tuple(usages), failed=True)
        return Verdict(outcome=outcome_if_admitted, usages=tuple(usages), failed=True)

    async def jwt(self, *, ip: list[Counter], user: list[Counter], jti: str, user_id: str, gen: int,
                  ticket: tuple[str, str, int] | None = None) -> Verdict:
        """Count ``ip``, check the token's revocation, count ``user`` and store ``ticket`` (key, value, TTL):
        one script. Side effects: the counters, the ticket (only when admitted). On a Redis failure the
        counters are counted locally, the token is taken as not revoked and the ticket is not stored."""
        keys = [c.key for c in ip + user] + [REVOKED_PREFIX + jti, REVOKED_USER_PREFIX + user_id]
        args: list[Any] = [len(ip), len(user), *_pairs(ip + user), gen]
        if ticket is not None:
            keys.append(ticket[0])
            args += [ticket[1], ticket[2]]
        try:
            reply = await self._run(self._jwt, keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            self.limiter.redis_failed(exc)
            return self._local(ip + user)
        return self._verdict(reply, ip + user)

    async def ticket_consume(self, *, ip: list[Counter], ticket: str) -> Verdict:
        """Count ``ip`` and consume ``ticket`` (GETDEL) unless limited: one script. ``owner`` None: unknown,
        expired or used. Raises the client's errors: without Redis no ticket can be checked (the caller
        refuses with 1013)."""
        if not ticket or len(ticket) > 128:  # not a ticket we issued: no lookup, but the IP is still counted
            ticket = "-"
        reply = await self._run(self._ticket, keys=[*(c.key for c in ip), TICKET_PREFIX + ticket],
                                args=[len(ip), *_pairs(ip)])
        raw = reply[1]
        return self._verdict(reply, ip, skip=2, owner=ticket_owner_parse(raw) if raw else None)

    async def owner_admit(self, *, owner: TicketOwner, user: list[Counter]) -> Verdict:
        """Refuse a ticket issued before its owner's password change or account removal, else count ``user``:
        one script. Fails open (local counters, not revoked) when Redis fails, as the revocation read did."""
        try:
            reply = await self._run(self._owner, keys=[REVOKED_USER_PREFIX + owner.user_id, *(c.key for c in user)],
                                    args=[owner.gen, len(user), *_pairs(user)])
        except (redis.RedisError, OSError) as exc:
            self.limiter.redis_failed(exc)
            return self._local(user)
        return self._verdict(reply, user)

