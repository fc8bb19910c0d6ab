"""The gateway's outer layers, outermost first. Each is an ASGI app wrapping the next (see ``gateway/app.py``).

request id → access log (+ security headers) → path check → origin check (WebSocket) → rate limit per IP →
then ``gateway/auth.py``: authentication → rate limit per user → route authorization → the router (own
routes, or load balancer → circuit breaker → proxy).
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

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from core.closecodes import CLOSE_RATE_LIMITED
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
from gateway.ratelimit import Counter, RateLimiter
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

    For WebSockets the line is written when the connection ends, with its close code (by GatewayApp, when the
    connection goes on after the layers, ``state.after``). The query string is
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
            if state.after is None and access_logger.isEnabledFor(logging.INFO):  # built only when read
                self.log(scope, state)

    @staticmethod
    def log(scope: Scope, state: RequestState) -> None:
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


async def refuse_limited(scope: Scope, receive: Receive, send: Send, *, retry_after_s: int, scope_name: str) -> None:
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
    """Per-IP limits: every HTTP request, plus a stricter budget on sensitive routes; WebSocket handshakes.

    With ``defer`` (the gateway's stack), a request to a ``jwt`` or ``ticket`` route leaves its counters in
    ``state.deferred``: the authentication layer counts them first in its own Redis round trip
    (gateway/admission.py), and refuses exactly as this layer would have.
    """

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, defer: bool = False) -> None:
        self.app = app
        self.limiter = limiter
        self.defer = defer

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
        counters = [self.limiter.counter(group=group, rate=rate, value=ip) for group, rate in checks]
        if self.defer and state.route is not None and state.route.auth in ("jwt", "ticket") and self.limiter.shared():
            state.deferred = counters
        elif not await limits_hit(self.limiter, counters, scope, receive, send):
            return
        await self.app(scope, receive, send)


async def limits_hit(limiter: RateLimiter, counters: list[Counter], scope: Scope, receive: Receive,
                     send: Send) -> bool:
    """Count ``counters`` one by one (one round trip each); on the first over its limit refuse the request
    (429 or 4008) and answer False."""
    for counter in counters:
        usage = await limiter.hit_counter(counter)
        if usage.should_limit:
            await refuse_limited(scope, receive, send, retry_after_s=usage.retry_after_s, scope_name=counter.group)
            return False
    return True
