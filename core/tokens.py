"""JWT access/refresh tokens and single-use WebSocket tickets: the identity contract of every role.

* Tokens are HS256-signed with ``JWT_SIGNING_KEY`` and the algorithm is pinned on decode, so ``alg: none``
  and tokens signed with another key or algorithm are refused. Claims: ``sub`` (user id), ``username``,
  ``typ`` (``access`` or ``refresh``), ``jti``, ``iat``, ``exp``, ``iss``, and ``gen``: the user's token
  generation when it was issued (``users.token_gen``; a password change or an account removal raises it
  and every token of an older generation is refused, :mod:`core.revocation`). Absent means 0.
* A WebSocket ticket is an opaque random string stored in Redis (``cs:ticket:<ticket>``) for at most
  ``WS_TICKET_TTL_S`` and consumed with GETDEL, so it works exactly once, on any broker.

Refresh rotation and the revocation list build on :func:`token_decode` (a ``jti`` per token).
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import jwt
import redis
import redis.asyncio
from django.conf import settings

from core.errors import Unauthenticated
from core.keys import TICKET_PREFIX

TokenType = Literal["access", "refresh"]
ISSUER = "chatstream"


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: str
    username: str
    type: TokenType
    jti: str
    issued_at: int
    expires_at: int
    gen: int = 0


def token_issue(*, user_id: str, username: str, type: TokenType, now: float | None = None, gen: int = 0) -> str:
    """Sign a token of ``type`` for the user. Pure: no I/O."""
    issued = int(now if now is not None else time.time())
    ttl = settings.JWT_ACCESS_TTL_S if type == "access" else settings.JWT_REFRESH_TTL_S
    payload = {
        "sub": user_id, "username": username, "typ": type, "jti": uuid.uuid4().hex,
        "iat": issued, "exp": issued + ttl, "iss": ISSUER, "gen": gen,
    }
    return jwt.encode(payload, settings.JWT_SIGNING_KEY, algorithm=settings.JWT_ALGORITHM)


@functools.lru_cache(maxsize=4)
def _verifying_key(key: str, algorithm: str) -> jwt.PyJWK:
    """The signing key as PyJWT's prepared key, built once: given the raw string, PyJWT re-checks on every
    decode that it is not a PEM, SSH or JWK key (a third of a decode's time, ~80 us: a py-spy profile of the
    gateway's connects, docs/benchmarks.md). Bound to ``algorithm``, as the decode's pin is."""
    return jwt.PyJWK({"kty": "oct", "k": base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()},
                     algorithm=algorithm)


def token_decode(token: str, *, expected_type: TokenType) -> Claims:
    """Verify signature (pinned algorithm), expiry, issuer and type; raise :class:`Unauthenticated` with why."""
    try:
        payload = jwt.decode(
            token, _verifying_key(settings.JWT_SIGNING_KEY, settings.JWT_ALGORITHM),
            algorithms=[settings.JWT_ALGORITHM], issuer=ISSUER,
            options={"require": ["sub", "typ", "jti", "iat", "exp", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired; refresh it", code="token_expired") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"invalid token ({exc})", code="token_invalid") from None
    if payload.get("typ") != expected_type:
        raise Unauthenticated(f"expected an {expected_type} token", code="token_invalid")
    gen = payload.get("gen", 0)
    if type(gen) is not int or gen < 0:
        raise Unauthenticated("invalid token (gen)", code="token_invalid")
    return Claims(user_id=str(payload["sub"]), username=str(payload.get("username", "")), type=expected_type,
                  jti=str(payload["jti"]), issued_at=int(payload["iat"]), expires_at=int(payload["exp"]), gen=gen)


@dataclass(frozen=True, slots=True)
class TicketOwner:
    user_id: str
    username: str
    gen: int = 0  # the token generation of the access token the ticket was issued with (0: unknown)


def ws_ticket_new() -> str:
    """A fresh ticket: 32 random bytes, URL-safe. Pure but for the randomness."""
    return secrets.token_urlsafe(32)


def ws_ticket_value(*, user_id: str, username: str, gen: int) -> str:
    """What a ticket's key holds: its owner, as JSON. Pure."""
    return json.dumps({"user_id": user_id, "username": username, "gen": gen})


def ticket_owner_parse(raw: bytes | str | None) -> TicketOwner | None:
    """The owner a ticket's stored value names (None for no value). Pure."""
    if raw is None:
        return None
    data = json.loads(raw)
    return TicketOwner(user_id=str(data["user_id"]), username=str(data["username"]), gen=int(data.get("gen", 0)))


def ws_ticket_issue(client: redis.Redis, *, user_id: str, username: str, gen: int = 0) -> str:
    """Store a fresh single-use ticket for the user (``gen``: the caller's token generation, checked when the
    ticket is consumed). Side effect: one Redis SET with EX."""
    ticket = ws_ticket_new()
    client.set(TICKET_PREFIX + ticket, ws_ticket_value(user_id=user_id, username=username, gen=gen),
               ex=settings.WS_TICKET_TTL_S)
    return ticket


async def ws_ticket_issue_async(client: redis.asyncio.Redis, *, user_id: str, username: str, gen: int = 0) -> str:
    """:func:`ws_ticket_issue` for async code (the gateway answers ``POST /api/v1/auth/ws-ticket`` itself).
    Side effect: one Redis SET with EX."""
    ticket = ws_ticket_new()
    await client.set(TICKET_PREFIX + ticket, ws_ticket_value(user_id=user_id, username=username, gen=gen),
                     ex=settings.WS_TICKET_TTL_S)
    return ticket


async def ws_ticket_consume(client: redis.asyncio.Redis, *, ticket: str) -> TicketOwner | None:
    """The ticket's owner, or None if unknown, expired or already used. Side effect: deletes it (GETDEL)."""
    if not ticket or len(ticket) > 128:
        return None
    return ticket_owner_parse(await client.getdel(TICKET_PREFIX + ticket))
