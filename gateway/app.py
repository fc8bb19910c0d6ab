"""The gateway: the only public entry, a plain ASGI app in front of every other role.

The stack, outermost first (each layer in ``gateway/middleware.py``, ``gateway/auth.py``, ``gateway/proxy.py`` or
``gateway/wsproxy.py``):

1. request id — the client's ``X-Request-Id`` if well-formed, else a new one; echoed and passed upstream;
2. access log — one JSON line per request (status, upstream instance, user, duration) + security headers;
3. path check — dot segments, ``//``, encoded separators and control characters are refused with 400
   (docs/security.md); the proxy forwards exactly the path that was routed;
   origin check — WebSocket handshakes from foreign Origins are refused with 403;
4. rate limit per IP — django-ratelimit's algorithm on the shared Redis cache (429 + Retry-After, or 4008);
5. authentication — JWT for ``jwt`` routes, the single-use ticket for ``/ws/`` (401, or close 4001);
6. rate limit per user — keyed on the verified user;
7. route authorization — unknown routes 404, admin only from the admin networks (403);
8. router — the gateway's own routes (``/healthz``, ``/readyz``, the web client at ``/`` and ``/app/``),
   else load balancer (least outstanding, registry-driven) → circuit breaker per instance → proxy (HTTP or
   WebSocket).

Routes and which of them are public are in ``gateway/routes.py``; the identity passed upstream is
specified in ``core/identity.py``.
"""

from __future__ import annotations

import json
import logging

import redis.asyncio
from django.conf import settings

from core.registry import ROLES
from core.roles import instance_number
from core.tokens import ws_ticket_issue_async
from gateway.admission import Admission
from gateway.asgi import (
    STATE_KEY,
    ASGIApp,
    Receive,
    RequestState,
    Scope,
    Send,
    header,
    send_error,
    send_response,
    state_of,
)
from gateway.auth import AuthenticationLayer, RouteAuthorizationLayer, UserRateLimitLayer
from gateway.middleware import AccessLogLayer, IpRateLimitLayer, OriginLayer, PathLayer, RequestIdLayer, access_logger
from gateway.pingwheel import PingWheel
from gateway.proxy import HttpProxy
from gateway.ratelimit import RateLimiter
from gateway.routes import WS_TICKET_PATH
from gateway.upstreams import Upstreams
from gateway.userlimits import SocketSlots
from gateway.webclient import webclient_file, webclient_headers
from gateway.wslink import SERVER_SEND
from gateway.wsproxy import WebSocketProxy

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 2


class Router:
    """The innermost layer: answer the gateway's own routes, proxy the rest."""

    def __init__(self, *, upstreams: Upstreams, tickets: redis.asyncio.Redis, slots: SocketSlots | None = None,
                 limiter: RateLimiter | None = None, pings: PingWheel | None = None) -> None:
        self.upstreams = upstreams
        self.tickets = tickets
        self.http = HttpProxy(upstreams=upstreams)
        self.ws = WebSocketProxy(upstreams=upstreams, slots=slots, limiter=limiter, pings=pings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = state_of(scope).route
        assert route is not None  # route authorization answered 404 otherwise
        if scope["type"] == "websocket":
            await self.ws(scope, receive, send)
        elif route.target != "gateway":
            await self.http(scope, receive, send)
        elif route.path == "/healthz":
            await send_response(send, status=200, body=b'{"status":"ok","role":"gateway"}')
        elif route.path == "/readyz":
            await self.readyz(send)
        elif route.path == WS_TICKET_PATH:
            await self.ws_ticket(scope, send)
        else:  # the web client: "/" and "/app/<file>"
            found = webclient_file(scope["path"]) if scope["method"] in ("GET", "HEAD") else None
            if found is None:
                state_of(scope).reason = "not_found"
                await send_error(send, status=404, code="not_found", message=f"no route for {scope['path']}")
                return
            content_type, body = found
            await send_response(send, status=200, body=body, content_type=content_type.encode(),
                                headers=webclient_headers(
                                    content_type, host=(header(scope, b"host") or b"").decode("latin-1"),
                                    secure=scope.get("scheme") == "https"))

    async def ws_ticket(self, scope: Scope, send: Send) -> None:
        """``POST /api/v1/auth/ws-ticket`` answered here, as the api answers it (docs/api.md): the access token
        was verified by the authentication layer, which normally stored the ticket too (single use); else
        (no admission, or its script failed) one Redis SET here."""
        state = state_of(scope)
        if scope["method"] != "POST":
            state.reason = "method_not_allowed"
            await send_error(send, status=405, code="method_not_allowed",
                             message=f"method {scope['method']} not allowed; use POST", headers=[(b"allow", b"POST")])
            return
        owner = state.user
        assert owner is not None  # a jwt route: the authentication layer answered 401 otherwise
        try:
            # Stored by the authentication layer's round trip (gateway/admission.py) unless that failed.
            ticket = state.ticket or await ws_ticket_issue_async(
                self.tickets, user_id=owner.user_id, username=owner.username, gen=owner.gen)
        except (redis.RedisError, OSError) as exc:
            logger.warning("gateway: cannot store a ticket: %s", exc)
            state.reason = "ticket_store_unavailable"
            await send_error(send, status=503, code="unavailable", message="the ticket store is unavailable; retry "
                             "in 1s", details={"retry_after": 1}, headers=[(b"retry-after", b"1")])
            return
        body = json.dumps({"ticket": ticket, "expires_in": int(settings.WS_TICKET_TTL_S)}).encode()
        await send_response(send, status=200, body=body,
                            headers=[(b"cache-control", b"no-store"), (b"pragma", b"no-cache")])

    async def readyz(self, send: Send) -> None:
        live = await self.upstreams.instances(fresh=True)
        counts = {role: sum(1 for i in live if i.role == role) for role in ROLES}
        missing = [role for role, n in counts.items() if n == 0]
        body = {"status": "unavailable" if missing else "ready", "instances": counts, "missing": missing}
        headers = [(b"retry-after", str(RETRY_AFTER_S).encode())] if missing else []
        await send_response(send, status=503 if missing else 200, body=json.dumps(body).encode(), headers=headers)


class GatewayApp:
    """The whole gateway as one ASGI app. Construct once per process (it owns Redis and HTTP clients)."""

    def __init__(self) -> None:
        # Registry and tickets: 2 s bounds a stuck Redis; the registry read is cached and off the hot path.
        self.redis = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        # Rate limits are on every request's path: 250 ms is ~1000 times a loopback round trip, and past it the
        # limiter counts locally rather than hold the request (docs/adr/0005).
        self.limits_redis = redis.asyncio.Redis.from_url(
            settings.CACHES["default"]["LOCATION"], socket_timeout=0.25, socket_connect_timeout=0.25)
        self.upstreams = Upstreams(client=self.redis, breaker_threshold=settings.GATEWAY_BREAKER_THRESHOLD,
                                   breaker_open_s=settings.GATEWAY_BREAKER_OPEN_S,
                                   rotation_start=instance_number() - 1)
        self.limiter = RateLimiter(client=self.limits_redis)
        self.slots = SocketSlots(client=self.limits_redis, cap=settings.GATEWAY_WS_MAX_SOCKETS_PER_USER,
                                 ttl_s=settings.GATEWAY_WS_SLOT_TTL_S)
        # The clients' WebSocket pings (docs/protocol.md, Liveness): this process' wheel, unless uvicorn was
        # started to send them itself (manage.py role gateway decides).
        self.pings = PingWheel(interval_s=settings.GATEWAY_WS_PING_INTERVAL_S,
                               timeout_s=settings.GATEWAY_WS_PING_TIMEOUT_S) if settings.GATEWAY_WS_PING_WHEEL else None
        self.router = Router(upstreams=self.upstreams, tickets=self.redis, slots=self.slots, limiter=self.limiter,
                             pings=self.pings)
        stack: ASGIApp = self.router
        stack = RouteAuthorizationLayer(stack)
        stack = UserRateLimitLayer(stack, limiter=self.limiter)
        self.admission = Admission(client=self.redis, limiter=self.limiter)
        stack = AuthenticationLayer(stack, redis_client=self.redis, admission=self.admission)
        stack = IpRateLimitLayer(stack, limiter=self.limiter, defer=True)
        stack = OriginLayer(stack)
        stack = PathLayer(stack)
        stack = AccessLogLayer(stack)
        stack = RequestIdLayer(stack)
        self.stack = stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "websocket":
            await self.stack(scope, receive, send)
            return
        scope[SERVER_SEND] = send  # the server's own send, which the layers wrap (gateway/wslink.py)
        try:
            await self.stack(scope, receive, send)
        finally:
            # An accepted WebSocket lives on here, not inside the layers' ten coroutines, which would stay
            # suspended (~3 KB) for the connection's life (bench/ws_memory.py --gateway; docs/adr/0049).
            state: RequestState | None = scope.get(STATE_KEY)
            if state is not None and state.after is not None:
                try:
                    await state.after()
                finally:
                    state.after = None  # it refers to the state: no cycle left for the GC
                    if access_logger.isEnabledFor(logging.INFO):
                        AccessLogLayer.log(scope, state)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        """Deregister and close the upstream clients on shutdown (servers without lifespan never call this)."""
        from core.roles import lifespan_serve

        async def close() -> None:
            await self.router.http.aclose()
            if self.pings is not None:
                await self.pings.aclose()
            self.admission.close()
            self.slots.close()
            await self.redis.aclose()
            await self.limits_redis.aclose()

        await lifespan_serve(receive, send, on_shutdown=close)

