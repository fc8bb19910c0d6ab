"""The revocation list of JWTs, in Redis: ``cs:revoked:<jti>`` with a TTL equal to the token's remaining life.

A refresh token is revoked when it is used (rotation) or logged out; an access token when its session logs
out. An entry outlives the token by at most a second, so the list never grows beyond the live tokens.

Every token of a user at once (password change, account removal): ``cs:revoked:user:<id>`` holds the
user's current token generation; an access token or ticket of a lower ``gen`` is refused. It lives only as
long as an access token can (refresh tokens are checked against ``users.token_gen`` in MongoDB).
"""

from __future__ import annotations

import time

import redis.asyncio
from django.conf import settings

from core.clients import sync_redis
from core.keys import REVOKED_PREFIX, REVOKED_USER_PREFIX


def revoke(*, jti: str, expires_at: int) -> bool:
    """Add ``jti`` to the list until the token expires. Returns False if it was already there.

    Atomic (SET NX): of two concurrent uses of one refresh token exactly one gets True.
    """
    ttl = max(1, int(expires_at - time.time()) + 1)
    return bool(sync_redis().set(REVOKED_PREFIX + jti, "1", nx=True, ex=ttl))


# ------------------------------------------------------------------ every token of a user at once

# Raise the user's marker to ARGV[1] (never lower it: of two concurrent password changes the later
# generation must win whatever order the SETs land in) and (re)start its TTL.
_MARKER_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local gen = tonumber(ARGV[1])
if gen > current then current = gen end
redis.call('SET', KEYS[1], current, 'EX', tonumber(ARGV[2]))
return current
"""


def marker_ttl_s() -> int:
    """How long a user's marker must live: until every access token and WebSocket ticket of an older
    generation has expired (refresh tokens are checked against ``users.token_gen`` in MongoDB instead, so
    the marker never has to outlive the 14-day refresh tokens)."""
    return int(settings.JWT_ACCESS_TTL_S) + int(settings.WS_TICKET_TTL_S) + 1


def user_tokens_revoke(*, user_id: str, gen: int) -> None:
    """Refuse every access token and ticket of ``user_id`` issued in a generation below ``gen`` (the value
    ``users.token_gen`` was just raised to). Side effect: one Lua call on Redis (``cs:revoked:user:<id>``,
    expires after :func:`marker_ttl_s`)."""
    sync_redis().eval(_MARKER_RAISE, 1, REVOKED_USER_PREFIX + user_id, gen, marker_ttl_s())


def _refused(values: list[bytes | str | None], *, gen: int) -> bool:
    revoked, marker = values
    return revoked is not None or (marker is not None and gen < int(marker))


def access_refused(*, jti: str, user_id: str, gen: int) -> bool:
    """Whether an access token is refused: its ``jti`` was revoked (logout) or its generation is below the
    user's marker (password change, account removal). One MGET: the same single round trip as the jti check
    alone."""
    return _refused(sync_redis().mget([REVOKED_PREFIX + jti, REVOKED_USER_PREFIX + user_id]), gen=gen)


async def access_refused_async(client: redis.asyncio.Redis, *, jti: str | None, user_id: str, gen: int) -> bool:
    """:func:`access_refused` on an asyncio client (the gateway). ``jti`` None checks only the marker (a
    WebSocket ticket). Raises the client's errors (the caller decides to fail open)."""
    keys = [REVOKED_PREFIX + (jti or "-"), REVOKED_USER_PREFIX + user_id]
    return _refused(list(await client.mget(keys)), gen=gen)
