"""The revocation list of JWTs, in Redis: ``cs:revoked:<jti>`` with a TTL equal to the token's remaining life.

A refresh token is revoked when it is used (rotation) or logged out; an access token when its session logs
out. An entry outlives the token by at most a second, so the list never grows beyond the live tokens.
"""

from __future__ import annotations

import time

from api.clients import sync_redis

PREFIX = "cs:revoked:"


def revoke(*, jti: str, expires_at: int) -> bool:
    """Add ``jti`` to the list until the token expires. Returns False if it was already there.

    Atomic (SET NX): of two concurrent uses of one refresh token exactly one gets True.
    """
    ttl = max(1, int(expires_at - time.time()) + 1)
    return bool(sync_redis().set(PREFIX + jti, "1", nx=True, ex=ttl))


def is_revoked(*, jti: str) -> bool:
    return bool(sync_redis().exists(PREFIX + jti))
