"""The innermost layers for HTTP: load balancer → circuit breaker → proxy (aiohttp), and what the WebSocket
proxy (``gateway/wsproxy.py``) shares with it: the headers and URL sent upstream, the retry bound.

The request body is buffered (bounded by ``GATEWAY_MAX_BODY``) so a failed connect can be retried on
another instance; the response is streamed back as it arrives. Retries: a refused or timed-out *connect*
is retried on another instance for every method (nothing reached the upstream); a connection that breaks
before any answer is retried only for idempotent methods (the upstream may have acted on it).
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

import aiohttp
from django.conf import settings
from multidict import CIMultiDict

from core.identity import identity_headers, identity_strip
from gateway.asgi import (
    Receive,
    RequestState,
    Scope,
    Send,
    client_ip,
    send_error,
    state_of,
)
from gateway.upstreams import OpenedState, Unavailable, UpstreamFailed, Upstreams

logger = logging.getLogger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailers",
    b"transfer-encoding", b"upgrade", b"content-length", b"x-request-id", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
})
# Headers a WebSocket upstream must not receive from the client's handshake (websockets sets its own).
WS_SKIP = HOP_BY_HOP | {b"host", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                        b"sec-websocket-protocol", b"origin", b"cookie", b"authorization"}
# At most 3 instances tried per request: enough to ride out one or two dead instances, bounded so a
# request never walks a large fleet while every breaker is still closed.
MAX_ATTEMPTS = 3
# Seconds an idle upstream connection stays in the pool for the next request (aiohttp's default is 15): the api
# keeps its side open longer (chatstream_site/management/commands/role.py), so the gateway closes first.
UPSTREAM_KEEPALIVE_S = 30


def upstream_headers(scope: Scope, *, state: RequestState, skip: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """Client headers minus hop-by-hop and identity headers, plus forwarding, request id and signed identity."""
    headers = [(k.lower(), v) for k, v in identity_strip(scope.get("headers", ())) if k.lower() not in skip]
    headers += [
        (b"x-forwarded-for", client_ip(scope).encode()),
        (b"x-forwarded-proto", b"https" if scope.get("scheme") in ("https", "wss") else b"http"),
        (b"x-request-id", state.request_id.encode()),
    ]
    if state.user is not None:
        headers += identity_headers(owner=state.user, request_id=state.request_id)
    return headers


def upstream_url(instance_url: str, scope: Scope, *, websocket: bool, drop_query: frozenset[str] = frozenset()) -> str:
    # The decoded path the routes matched (gateway/routes.py path_checked), re-encoded: never the client's raw
    # bytes, which the upstream's URL library could resolve to another route (%2e%2e, %2f).
    path = urllib.parse.quote(scope["path"], safe="/:@!$&'()*+,;=~")
    query = scope.get("query_string", b"").decode("latin-1")
    if drop_query and query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode([(k, v) for k, v in pairs if k not in drop_query])
    base = instance_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) if websocket else instance_url
    return f"{base}{path}" + (f"?{query}" if query else "")


class ClientGone(Exception):
    """The client disconnected before its request body was complete: nothing to answer."""


async def _read_body(receive: Receive, *, limit: int) -> bytes | None:
    """The whole request body, or None if it exceeds ``limit`` bytes; raises ClientGone if the client left."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return bytes(body)


async def _unavailable(send: Send, state: RequestState, unavailable: Unavailable) -> None:
    state.reason = "no_instance" if unavailable.instances == 0 else "all_breakers_open"
    await send_error(
        send, status=503, code="unavailable",
        message=f"no {unavailable.role} instance is available; retry in {unavailable.retry_after_s}s",
        details={"role": unavailable.role, "retry_after": unavailable.retry_after_s},
        headers=[(b"retry-after", str(unavailable.retry_after_s).encode())],
    )


class HttpProxy:
    """Proxy one HTTP request to the least-loaded available instance of its route's role.

    The client is aiohttp: measured 3-10x httpx's requests/s at 1-32 concurrent requests on this machine
    (httpx's pool degrades with concurrency), which is the gateway's whole job (docs/adr/0004).
    """

    def __init__(self, *, upstreams: Upstreams) -> None:
        self.upstreams = upstreams
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The process's pooled client (created on first use, inside the server's event loop)."""
        if self._session is None:
            # No pool limit (the upstreams' own backlog is the limit; a gateway-side cap would only queue);
            # keep-alive connections are reused across requests to each instance. trust_env off: a
            # developer's HTTP_PROXY must never capture internal traffic. No decompression: bytes pass as is.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
                timeout=aiohttp.ClientTimeout(total=None, connect=settings.GATEWAY_CONNECT_TIMEOUT_S,
                                              sock_read=settings.GATEWAY_READ_TIMEOUT_S),
                auto_decompress=False, trust_env=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _send(self, method: str, url: str, *, headers: list[tuple[str, str]],
                    body: bytes) -> aiohttp.ClientResponse:
        """Send the request; translate transport failures into :class:`UpstreamFailed` (connect/timeout/broken)."""
        try:
            return await self.session.request(method, url, headers=CIMultiDict(headers), data=body or None,
                                              allow_redirects=False, compress=None)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamFailed("connect") from exc
        except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
            raise UpstreamFailed("timeout") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed("broken") from exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        assert state.route is not None  # the route authorization layer answered 404 otherwise
        role = state.route.target
        # Unauthenticated routes take small bodies only: nobody buffers 10 MiB here without a token.
        limit = settings.GATEWAY_MAX_PUBLIC_BODY if state.route.auth == "public" else settings.GATEWAY_MAX_BODY
        try:
            body = await _read_body(receive, limit=limit)
        except ClientGone:
            state.reason = "client_gone"
            state.status = 499  # nginx's "client closed request", for the access log only
            return
        if body is None:
            state.reason = "too_large"
            await send_error(send, status=413, code="too_large",
                             message=f"request body above {limit} bytes", details={"limit": limit})
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in upstream_headers(scope, state=state, skip=HOP_BY_HOP)]
        method = scope["method"]
        tried: set[str] = set()
        failures: list[str] = []
        while len(tried) < MAX_ATTEMPTS:
            picked = await self.upstreams.pick(role=role, kind="http", exclude=frozenset(tried))
            if isinstance(picked, Unavailable):
                if not tried:  # nothing to try at all: answer at once, no connect attempted
                    await _unavailable(send, state, picked)
                    return
                break
            tried.add(picked.id)
            try:
                async with self.upstreams.attempt(picked, kind="http"):
                    response = await self._send(method, upstream_url(picked.url, scope, websocket=False),
                                                headers=headers, body=body)
            except OpenedState:
                continue
            except UpstreamFailed as exc:
                failures.append(str(exc))
                logger.warning("gateway: %s %s failed (%s: %r) for %s %s", role, picked.id, exc, exc.__cause__,
                               method, scope["path"])
                if str(exc) == "connect" or (str(exc) == "broken" and method in IDEMPOTENT):
                    continue
                break
            state.upstream = picked.id
            await self._relay(response, send, state=state, instance=picked)
            return
        state.reason = f"upstream_{failures[-1] if failures else 'unavailable'}"
        if failures and failures[-1] == "timeout":
            await send_error(send, status=504, code="upstream_timeout", message=f"the {role} did not answer in time")
        elif failures and failures[-1] == "broken":
            await send_error(send, status=502, code="bad_gateway",
                             message=f"the {role} instance broke the connection; retry shortly",
                             details={"role": role, "tried": len(tried)})
        else:  # every instance tried refused the connection: the role is down, as far as we can see
            await send_error(send, status=503, code="unavailable",
                             message=f"no {role} instance accepted the request; retry in 1s",
                             details={"role": role, "tried": len(tried), "retry_after": 1},
                             headers=[(b"retry-after", b"1")])

    async def _relay(self, response: aiohttp.ClientResponse, send: Send, *, state: RequestState,
                     instance: Any) -> None:
        """Stream ``response`` to the client (raw bytes: its content-encoding stays as the upstream set it)."""
        headers = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]
        length = response.headers.get("content-length")
        if length is not None:
            headers.append((b"content-length", length.encode()))
        async with self.upstreams.holding(instance, kind="http"):
            try:
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Too late for a status: the client sees a truncated body and the access log says why.
                state.reason = "upstream_broke_mid_body"
                logger.warning("gateway: %s broke mid-response: %r", instance.id, exc)
                raise
            finally:
                response.release()

