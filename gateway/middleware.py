"""The gateway's layers, outermost first. Each is an ASGI app wrapping the next (see ``gateway/app.py``).

request id → access log (+ security headers) → path check → origin check (WebSocket) → rate limit per IP →
authentication → rate limit per user → route authorization → the router (own routes, or load balancer →
circuit breaker → proxy).

The per-user limit sits after authentication because its key must be the *verified* user: a limit keyed on
an unverified token would let anyone spend another user's budget with a forged ``sub``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import urllib.parse
import uuid
from typing import Any

import redis
import redis.asyncio
from django.conf import settings
from django.http.request import split_domain_port, validate_host

from core.closecodes import CLOSE_BAD_TICKET, CLOSE_RATE_LIMITED
from core.errors import Unauthenticated
from core.revocation import access_refused_async
from core.tokens import TicketOwner, token_decode, ws_ticket_consume
from gateway.asgi import (
    STATE_KEY,
    ASGIApp,
    Message,
    Receive,
    RequestState,
    Scope,
    Send,
    client_ip,
    header,
    send_error,
    state_of,
    ws_refuse,
)
from gateway.ratelimit import RateLimiter
from gateway.routes import path_checked, route_match

access_logger = logging.getLogger("chatstream.gateway.access")
logger = logging.getLogger(__name__)

# A client's request id is kept when it looks like an id (UUIDs, ULIDs, hex, dashed ids) and is short
# enough for a log line; anything else (spaces, quotes, newlines that could forge log lines) is replaced.
REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")
# Set on every response unless the upstream set its own (Django admin sets X-Frame-Options itself).
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)

# Only over TLS (a browser ignores it over plain HTTP): a year, the preload lists' minimum.
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


class RequestIdLayer:
    """Give every request an id (the client's ``X-Request-Id`` if well-formed, else a new one).

    Side effects: creates the request's :class:`RequestState`; echoes the id on the response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = header(scope, b"x-request-id")
        request_id = given.decode() if given and REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        scope[STATE_KEY] = RequestState(request_id=request_id)
        echo = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        await self.app(scope, receive, send_with_id)


class AccessLogLayer:
    """One structured (JSON) log line per request: status, route, upstream instance, user, duration.

    For WebSockets the line is written when the connection ends, with its close code. The query string is
    never logged (it carries tickets). Also adds :data:`SECURITY_HEADERS` to HTTP responses, and :data:`HSTS`
    when the request came over TLS.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = state_of(scope)
        # Served over TLS (uvicorn with a certificate, or a trusted proxy's X-Forwarded-Proto: https).
        tls = scope.get("scheme") in ("https", "wss")

        async def send_logged(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                state.status = int(message["status"])
                present = {k.lower() for k, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()),
                                      *(h for h in SECURITY_HEADERS if h[0] not in present)]
                if tls and b"strict-transport-security" not in present:
                    message["headers"].append(HSTS)
            elif kind == "websocket.accept":
                state.status = 101
            elif kind == "websocket.close":
                state.close_code = int(message.get("code", 1000))
                if not state.status:
                    state.status = 403  # closed before accept: the server refuses the handshake
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            entry: dict[str, Any] = {
                "event": "access",
                "request_id": state.request_id,
                "type": scope["type"],
                "method": scope.get("method", "GET"),
                "path": scope.get("path", ""),
                "status": state.status or 500,
                "upstream": state.upstream or None,
                "user_id": state.user.user_id if state.user else None,
                "client": client_ip(scope),
                "duration_ms": round((time.perf_counter() - state.started) * 1000, 2),
            }
            if state.close_code is not None:
                entry["close_code"] = state.close_code
            if state.reason:
                entry["reason"] = state.reason
            access_logger.info("%s", json.dumps(entry, separators=(",", ":")))


class PathLayer:
    """Refuse a path that is not canonical (dot segments, ``//``, encoded separators, control characters) with
    400 ``invalid_path`` (a WebSocket handshake with 403) before it is routed: the routes match the decoded
    path and the proxy forwards that same path, so what is checked is what the upstream serves."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and path_checked(
                raw_path=scope.get("raw_path"), path=scope["path"]) is None:
            state_of(scope).reason = "invalid_path"
            if scope["type"] == "websocket":
                await ws_refuse(receive, send, code=403)
                return
            await send_error(send, status=400, code="invalid_path",
                             message="the path has dot segments, empty segments, encoded separators or control "
                                     "characters")
            return
        await self.app(scope, receive, send)


def origin_allowed(origin: bytes | None, *, allowed_hosts: list[str], allowed_origins: list[str]) -> bool:
    """Whether a WebSocket handshake's ``Origin`` may connect. Pure.

    No Origin (not a browser: tests, mobile apps, servers) is allowed — a browser always sends one, and the
    check exists to stop other sites' pages from riding a user's browser. Otherwise the origin must be listed
    in ``allowed_origins`` or its host must match ``allowed_hosts`` (Channels' AllowedHostsOriginValidator rule),
    where a ``*`` never matches: a wildcard host list must not turn the check off (docs/security.md).
    """
    if origin is None:
        return True
    allowed_hosts = [host for host in allowed_hosts if host != "*"]
    text = origin.decode("latin-1").strip().lower()
    if text in {o.lower().rstrip("/") for o in allowed_origins}:
        return True
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return False
    domain, _port = split_domain_port(parsed.netloc)
    return bool(domain) and validate_host(domain, allowed_hosts)


class OriginLayer:
    """Refuse WebSocket handshakes from foreign Origins with HTTP 403, before they cost anything."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and not origin_allowed(
            header(scope, b"origin"), allowed_hosts=list(settings.WS_ORIGIN_HOSTS),
            allowed_origins=list(settings.GATEWAY_ALLOWED_ORIGINS),
        ):
            state_of(scope).reason = "foreign_origin"
            await ws_refuse(receive, send, code=403)
            return
        await self.app(scope, receive, send)


async def _refuse_limited(scope: Scope, receive: Receive, send: Send, *, retry_after_s: int, scope_name: str) -> None:
    state_of(scope).reason = f"rate_limited:{scope_name}"
    if scope["type"] == "websocket":
        await ws_refuse(receive, send, code=CLOSE_RATE_LIMITED, reason=f"rate limited; retry in {retry_after_s}s")
        return
    await send_error(send, status=429, code="rate_limited",
                     message=f"too many requests; retry in {retry_after_s}s",
                     details={"retry_after": retry_after_s, "scope": scope_name},
                     headers=[(b"retry-after", str(retry_after_s).encode())])


def ip_key(ip: str) -> str:
    """The rate-limit key of an address: IPv4 as is, IPv6 by its /64 (one host usually owns a whole /64)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False).network_address)
    return str(address)


class IpRateLimitLayer:
    """Per-IP limits: every HTTP request, plus a stricter budget on sensitive routes; WebSocket handshakes."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = state_of(scope)
        state.route = route_match(scope["path"])
        if state.route is not None and not state.route.limited:
            await self.app(scope, receive, send)
            return
        ip = ip_key(client_ip(scope))
        checks: list[tuple[str, str]]
        if scope["type"] == "websocket":
            checks = [("gw:ws-ip", settings.GATEWAY_RATE_WS_IP)]
        else:
            checks = [("gw:ip", settings.GATEWAY_RATE_IP)]
            if state.route is not None and state.route.sensitive:
                checks.append(("gw:sensitive-ip", settings.GATEWAY_RATE_SENSITIVE))
        for group, rate in checks:
            usage = await self.limiter.hit(group=group, rate=rate, value=ip)
            if usage.should_limit:
                await _refuse_limited(scope, receive, send, retry_after_s=usage.retry_after_s, scope_name=group)
                return
        await self.app(scope, receive, send)


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None. Pure."""
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


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
            state.user = TicketOwner(user_id=claims.user_id, username=claims.username)
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
                await _refuse_limited(scope, receive, send, retry_after_s=usage.retry_after_s, scope_name=group)
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
