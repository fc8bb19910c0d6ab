"""The gateway's inner layers: authentication → rate limit per user → route authorization (see
``gateway/app.py``; the outer ones, request id to the per-IP limit, are ``gateway/middleware.py``).

The per-user limit sits after authentication because its key must be the *verified* user: a limit keyed on
an unverified token would let anyone spend another user's budget with a forged ``sub``.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse

import redis
import redis.asyncio
from django.conf import settings

from core.closecodes import CLOSE_BAD_TICKET
from core.errors import Unauthenticated
from core.revocation import access_refused_async
from core.tokens import TicketOwner, token_decode, ws_ticket_consume
from gateway.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    client_ip,
    header,
    send_error,
    state_of,
    ws_refuse,
)
from gateway.middleware import refuse_limited
from gateway.ratelimit import RateLimiter


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None. Pure."""
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None

logger = logging.getLogger(__name__)


def query_param(scope: Scope, name: str) -> str | None:
    values = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


class AuthenticationLayer:
    """Verify the caller at the edge; nothing unauthenticated reaches an upstream on a protected route.

    * ``jwt`` routes: an access token (algorithm pinned, expiry, issuer, type, not revoked: one MGET of its
      jti and its user's generation marker) → 401 with a reason if not.
    * ``ticket`` routes (``/ws/``): the single-use ticket is consumed HERE (GETDEL), → close 4001 if unknown,
      expired, reused, or issued before its user's password change or account removal. The upstream
      receives the signed identity instead (:mod:`core.identity`).
    * ``public`` and ``upstream`` routes: nothing checked.
    """

    def __init__(self, app: ASGIApp, *, redis_client: redis.asyncio.Redis) -> None:
        self.app = app
        self.redis = redis_client

    async def _refused(self, *, jti: str | None, user_id: str, gen: int) -> bool:
        """Whether a verified token (or a ticket, ``jti`` None) was revoked: logged out, or issued before the
        user's password change or account removal (:func:`core.revocation.access_refused_async`, one MGET).
        Fails open when Redis is down, like the rate limits (docs/adr/0005): the api checks again."""
        try:
            return await access_refused_async(self.redis, jti=jti, user_id=user_id, gen=gen)
        except (redis.RedisError, OSError) as exc:
            logger.warning("gateway: cannot read the revocation list: %s", exc)
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope) if scope["type"] in ("http", "websocket") else None
        route = state.route if state else None
        if state is None or route is None:
            await self.app(scope, receive, send)
            return
        if route.auth == "jwt":
            token = bearer_token(scope)
            try:
                if token is None:
                    raise Unauthenticated("an access token is required (Authorization: Bearer <token>)",
                                          code="unauthenticated")
                claims = token_decode(token, expected_type="access")
                if await self._refused(jti=claims.jti, user_id=claims.user_id, gen=claims.gen):
                    raise Unauthenticated("token revoked; log in again", code="token_revoked")
            except Unauthenticated as exc:
                state.reason = exc.code
                if scope["type"] == "websocket":
                    await ws_refuse(receive, send, code=CLOSE_BAD_TICKET, reason=exc.code)
                    return
                await send_error(send, status=401, code=exc.code, message=exc.message,
                                 headers=[(b"www-authenticate", b'Bearer realm="chatstream"')])
                return
            state.user = TicketOwner(user_id=claims.user_id, username=claims.username, gen=claims.gen)
        elif route.auth == "ticket":
            if scope["type"] != "websocket":
                state.reason = "websocket_only"
                await send_error(send, status=400, code="invalid", message="this route takes WebSocket handshakes")
                return
            ticket = query_param(scope, "ticket") or ""
            try:
                owner = await ws_ticket_consume(self.redis, ticket=ticket)
            except (redis.RedisError, OSError) as exc:
                logger.warning("gateway: cannot consume a ticket: %s", exc)
                state.reason = "ticket_store_unavailable"
                await ws_refuse(receive, send, code=1013, reason="try again shortly")
                return
            if owner is None or await self._refused(jti=None, user_id=owner.user_id, gen=owner.gen):
                state.reason = "bad_ticket"
                await ws_refuse(receive, send, code=CLOSE_BAD_TICKET, reason="unknown, expired or used ticket")
                return
            state.user = owner
        await self.app(scope, receive, send)


class UserRateLimitLayer:
    """Per-user limits on authenticated requests (HTTP) and handshakes (WebSocket)."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope) if scope["type"] in ("http", "websocket") else None
        if state is not None and state.user is not None:
            ws = scope["type"] == "websocket"
            group, rate = (("gw:ws-user", settings.GATEWAY_RATE_WS_USER) if ws
                           else ("gw:user", settings.GATEWAY_RATE_USER))
            usage = await self.limiter.hit(group=group, rate=rate, value=state.user.user_id)
            if usage.should_limit:
                await refuse_limited(scope, receive, send, retry_after_s=usage.retry_after_s, scope_name=group)
                return
        await self.app(scope, receive, send)


class RouteAuthorizationLayer:
    """What a route allows beyond identity: unknown paths are 404, and Django admin only from admin networks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.admin_networks = [ipaddress.ip_network(n, strict=False) for n in settings.GATEWAY_ADMIN_NETWORKS]

    def _admin_allowed(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.admin_networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = state_of(scope)
        route = state.route
        refusal: tuple[int, str, str] | None = None
        if route is None:
            refusal = (404, "not_found", f"no route for {scope['path']}")
        elif route.auth == "upstream" and not self._admin_allowed(client_ip(scope)):
            refusal = (403, "forbidden", "the admin is reachable only from the operators' networks")
        elif scope["type"] == "websocket" and route.target != "broker":
            refusal = (404, "not_found", f"no WebSocket route for {scope['path']}")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refusal
        state.reason = code
        if scope["type"] == "websocket":
            await ws_refuse(receive, send, code=403)
            return
        await send_error(send, status=status, code=code, message=message)
