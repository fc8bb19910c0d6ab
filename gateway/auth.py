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
from core.keys import TICKET_PREFIX
from core.revocation import access_refused_async
from core.tokens import Claims, TicketOwner, token_decode, ws_ticket_consume, ws_ticket_new, ws_ticket_value
from gateway.admission import REVOKED, Admission, Verdict
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
from gateway.middleware import limits_hit, refuse_limited
from gateway.ratelimit import Counter, RateLimiter
from gateway.routes import WS_TICKET_PATH


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


def user_limit(scope: Scope) -> tuple[str, str]:
    """The per-user limit of a request: ``(group, rate)``, handshakes apart from HTTP requests. Pure."""
    if scope["type"] == "websocket":
        return "gw:ws-user", settings.GATEWAY_RATE_WS_USER
    return "gw:user", settings.GATEWAY_RATE_USER


class AuthenticationLayer:
    """Verify the caller at the edge; nothing unauthenticated reaches an upstream on a protected route.

    * ``jwt`` routes: an access token (algorithm pinned, expiry, issuer, type, not revoked: its jti and its
      user's generation marker) → 401 with a reason if not.
    * ``ticket`` routes (``/ws/``): the single-use ticket is consumed HERE (GETDEL), → close 4001 if unknown,
      expired, reused, or issued before its user's password change or account removal. The upstream
      receives the signed identity instead (:mod:`core.identity`).
    * ``public`` and ``upstream`` routes: nothing checked.

    With an :class:`~gateway.admission.Admission` (the gateway's stack) the per-IP counters the IP layer
    deferred, the credential's Redis reads, the per-user counter (left in ``state.user_usage`` for the next
    layer) and, on the ticket route, the new ticket go in one script (two for a handshake); refusals, their
    order and their codes are the layers' own (docs/adr/0044).
    """

    def __init__(self, app: ASGIApp, *, redis_client: redis.asyncio.Redis, admission: Admission | None = None,
                 ) -> None:
        self.app = app
        self.redis = redis_client
        self.admission = admission

    async def _refused(self, *, jti: str | None, user_id: str, gen: int) -> bool:
        """Whether a verified token (or a ticket, ``jti`` None) was revoked: logged out, or issued before the
        user's password change or account removal (:func:`core.revocation.access_refused_async`, one MGET).
        Fails open when Redis is down, like the rate limits (docs/adr/0005): the api checks again."""
        try:
            return await access_refused_async(self.redis, jti=jti, user_id=user_id, gen=gen)
        except (redis.RedisError, OSError) as exc:
            logger.warning("gateway: cannot read the revocation list: %s", exc)
            return False

    def _user_counters(self, scope: Scope, *, user_id: str) -> list[Counter]:
        """The per-user counter to count in the admission round trip (none while the limiter counts locally:
        the per-user layer then counts it)."""
        assert self.admission is not None
        if not self.admission.limiter.shared():
            return []
        group, rate = user_limit(scope)
        return [self.admission.limiter.counter(group=group, rate=rate, value=user_id)]

    async def _admitted(self, verdict: Verdict, scope: Scope, receive: Receive, send: Send,
                        user: list[Counter]) -> bool:
        """Refuse a request a counter of ``verdict`` limited (answered False); keep the user's usage."""
        limited = verdict.limited()
        if limited is not None:
            await refuse_limited(scope, receive, send, retry_after_s=limited[1].retry_after_s,
                                 scope_name=limited[0].group)
            return False
        if user:
            state_of(scope).user_usage = verdict.usage_of(user[0].group)
        return True

    async def _jwt_revoked(self, claims: Claims, scope: Scope, receive: Receive, send: Send) -> bool | None:
        """Whether the token was revoked; None when a rate limit refused the request (answered)."""
        state = state_of(scope)
        if self.admission is None:
            return await self._refused(jti=claims.jti, user_id=claims.user_id, gen=claims.gen)
        user = self._user_counters(scope, user_id=claims.user_id)
        ticket = stored = None
        route = state.route
        if (scope["type"] == "http" and scope["method"] == "POST" and route is not None
                and route.target == "gateway" and route.path == WS_TICKET_PATH):
            ticket = ws_ticket_new()
            stored = (TICKET_PREFIX + ticket, ws_ticket_value(user_id=claims.user_id, username=claims.username,
                                                              gen=claims.gen), int(settings.WS_TICKET_TTL_S))
        verdict = await self.admission.jwt(ip=state.deferred, user=user, jti=claims.jti, user_id=claims.user_id,
                                           gen=claims.gen, ticket=stored)
        state.deferred = []
        if verdict.outcome == REVOKED:
            return True
        if not await self._admitted(verdict, scope, receive, send, user):
            return None
        if ticket is not None and not verdict.failed:
            state.ticket = ticket
        return False

    async def _ticket_owner(self, ticket: str, scope: Scope, receive: Receive, send: Send,
                            ) -> TicketOwner | bool | None:
        """The ticket's owner if admitted; None for a bad ticket; False when refused here (answered)."""
        state = state_of(scope)
        if self.admission is None:
            try:
                owner = await ws_ticket_consume(self.redis, ticket=ticket)
            except (redis.RedisError, OSError) as exc:
                logger.warning("gateway: cannot consume a ticket: %s", exc)
                state.reason = "ticket_store_unavailable"
                await ws_refuse(receive, send, code=1013, reason="try again shortly")
                return False
            if owner is None or await self._refused(jti=None, user_id=owner.user_id, gen=owner.gen):
                return None
            return owner
        try:
            verdict = await self.admission.ticket_consume(ip=state.deferred, ticket=ticket)
        except (redis.RedisError, OSError) as exc:
            logger.warning("gateway: cannot consume a ticket: %s", exc)
            state.reason = "ticket_store_unavailable"
            await ws_refuse(receive, send, code=1013, reason="try again shortly")
            return False
        state.deferred = []
        if not await self._admitted(verdict, scope, receive, send, []):
            return False
        if verdict.owner is None:
            return None
        user = self._user_counters(scope, user_id=verdict.owner.user_id)
        admitted = await self.admission.owner_admit(owner=verdict.owner, user=user)
        if admitted.outcome == REVOKED:
            return None
        if not await self._admitted(admitted, scope, receive, send, user):
            return False
        return verdict.owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope) if scope["type"] in ("http", "websocket") else None
        route = state.route if state else None
        if state is None or route is None:
            await self.app(scope, receive, send)
            return
        if route.auth == "jwt":
            token = bearer_token(scope)
            failure: Unauthenticated | None = None
            claims: Claims | None = None
            try:
                if token is None:
                    raise Unauthenticated("an access token is required (Authorization: Bearer <token>)",
                                          code="unauthenticated")
                claims = token_decode(token, expected_type="access")
            except Unauthenticated as exc:
                failure = exc
            if claims is None:
                # No user to check: the deferred per-IP counters are counted on their own, first.
                if self.admission is not None and not await limits_hit(self.admission.limiter, state.deferred,
                                                                       scope, receive, send):
                    return
            else:
                revoked = await self._jwt_revoked(claims, scope, receive, send)
                if revoked is None:
                    return
                if revoked:
                    failure = Unauthenticated("token revoked; log in again", code="token_revoked")
            if failure is not None or claims is None:
                refusal = failure or Unauthenticated("invalid token", code="token_invalid")
                state.reason = refusal.code
                if scope["type"] == "websocket":
                    await ws_refuse(receive, send, code=CLOSE_BAD_TICKET, reason=refusal.code)
                    return
                await send_error(send, status=401, code=refusal.code, message=refusal.message,
                                 headers=[(b"www-authenticate", b'Bearer realm="chatstream"')])
                return
            state.user = TicketOwner(user_id=claims.user_id, username=claims.username, gen=claims.gen)
        elif route.auth == "ticket":
            if scope["type"] != "websocket":
                if self.admission is not None and not await limits_hit(self.admission.limiter, state.deferred,
                                                                       scope, receive, send):
                    return
                state.reason = "websocket_only"
                await send_error(send, status=400, code="invalid", message="this route takes WebSocket handshakes")
                return
            owner = await self._ticket_owner(query_param(scope, "ticket") or "", scope, receive, send)
            if owner is False:
                return
            if owner is None or owner is True:
                state.reason = "bad_ticket"
                await ws_refuse(receive, send, code=CLOSE_BAD_TICKET, reason="unknown, expired or used ticket")
                return
            state.user = owner
        await self.app(scope, receive, send)


class UserRateLimitLayer:
    """Per-user limits on authenticated requests (HTTP) and handshakes (WebSocket). A counter the
    authentication layer already counted in its round trip (``state.user_usage``) is not counted again."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope) if scope["type"] in ("http", "websocket") else None
        if state is not None and state.user is not None:
            group, rate = user_limit(scope)
            usage = state.user_usage or await self.limiter.hit(group=group, rate=rate, value=state.user.user_id)
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
