"""The innermost layers: load balancer → circuit breaker → proxy, for HTTP (aiohttp) and WebSocket (websockets).

HTTP (aiohttp): the request body is buffered (bounded by ``GATEWAY_MAX_BODY``) so a failed connect can be retried on
another instance; the response is streamed back as it arrives. Retries: a refused or timed-out *connect*
is retried on another instance for every method (nothing reached the upstream); a connection that breaks
before any answer is retried only for idempotent methods (the upstream may have acted on it).

WebSocket: the gateway connects to the broker first and accepts the client only once the broker accepted,
then pumps frames both ways. Back-pressure: each direction awaits the other side's send (websockets waits
for its write buffer to drain), so a slow reader slows its writer instead of growing a buffer. Close codes
pass through both ways; a broker that vanishes without a close frame closes the client with 1012.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from typing import Any

import aiohttp
import websockets
import websockets.exceptions
from django.conf import settings
from multidict import CIMultiDict
from websockets.asyncio.client import ClientConnection

from core.closecodes import (
    CLOSE_FORBIDDEN,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_MANY_SOCKETS,
    CLOSE_TRY_AGAIN,
    CLOSE_UPSTREAM_LOST,
)
from core.identity import identity_headers, identity_strip
from gateway.asgi import (
    Receive,
    RequestState,
    Scope,
    Send,
    client_ip,
    send_error,
    state_of,
    ws_refuse,
)
from gateway.ratelimit import RateLimiter, TokenBucket
from gateway.upstreams import OpenedState, Unavailable, UpstreamFailed, Upstreams
from gateway.userlimits import SocketSlots

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


def _upstream_headers(scope: Scope, *, state: RequestState, skip: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
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


def _target(instance_url: str, scope: Scope, *, websocket: bool, drop_query: frozenset[str] = frozenset()) -> str:
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
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30),
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
                   for k, v in _upstream_headers(scope, state=state, skip=HOP_BY_HOP)]
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
                    response = await self._send(method, _target(picked.url, scope, websocket=False),
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


def _client_close_code(code: int | None) -> int:
    """A close code the gateway may send to the upstream on behalf of a client that left."""
    if code is None or code in (1005, 1006, 1015) or not (1000 <= code <= 4999):
        return 1000
    return code


class WebSocketProxy:
    """Proxy one WebSocket to the broker with the fewest open connections, within the user's socket slots and
    frame budget (gateway/userlimits.py)."""

    def __init__(self, *, upstreams: Upstreams, slots: SocketSlots | None = None,
                 limiter: RateLimiter | None = None) -> None:
        self.upstreams = upstreams
        self.slots = slots
        self.limiter = limiter

    async def _connect(self, scope: Scope, state: RequestState) -> tuple[ClientConnection, Any] | Unavailable | int:
        """An open upstream connection and its instance, Unavailable, or a close code for the client."""
        headers = _upstream_headers(scope, state=state, skip=WS_SKIP)
        subprotocols = [p.strip() for p in _header_values(scope, b"sec-websocket-protocol") if p.strip()]
        origin = next(iter(_header_values(scope, b"origin")), None)
        tried: set[str] = set()
        unavailable: Unavailable | None = None
        while len(tried) < MAX_ATTEMPTS:
            picked = await self.upstreams.pick(role="broker", kind="ws", exclude=frozenset(tried))
            if isinstance(picked, Unavailable):
                unavailable = picked
                break
            tried.add(picked.id)
            url = _target(picked.url, scope, websocket=True, drop_query=frozenset({"ticket"}))
            try:
                async with self.upstreams.attempt(picked, kind="ws"):
                    try:
                        upstream = await websockets.connect(
                            url, additional_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                            subprotocols=subprotocols or None,  # type: ignore[arg-type]
                            origin=origin,  # type: ignore[arg-type]
                            open_timeout=settings.GATEWAY_CONNECT_TIMEOUT_S, max_size=None, compression=None,
                            proxy=None, user_agent_header=None,
                        )
                    except websockets.exceptions.InvalidStatus as exc:
                        # The broker answered, and refused: its decision, not a transport failure.
                        status = exc.response.status_code
                        state.reason = f"upstream_refused_{status}"
                        return CLOSE_FORBIDDEN if status in (401, 403) else 1011
                    except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
                        raise UpstreamFailed("connect") from exc
            except OpenedState:
                continue
            except UpstreamFailed as exc:
                logger.warning("gateway: broker %s refused a WebSocket (%s)", picked.id, exc.__cause__)
                continue
            state.upstream = picked.id
            return upstream, picked
        return unavailable or Unavailable(role="broker", retry_after_s=1, instances=len(tried))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        slot: str | None = None
        if self.slots is not None and state.user is not None:
            slot = await self.slots.acquire(user_id=state.user.user_id)
            if slot is None:
                state.reason = "too_many_sockets"
                await ws_refuse(receive, send, code=CLOSE_TOO_MANY_SOCKETS,
                                reason=f"at most {self.slots.cap} open connections per user")
                return
        try:
            await self._proxy(scope, receive, send, state=state)
        finally:
            if slot is not None and self.slots is not None:
                await self.slots.release(slot)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, *, state: RequestState) -> None:
        connected = await self._connect(scope, state)
        if isinstance(connected, Unavailable):
            state.reason = "no_broker"
            await ws_refuse(receive, send, code=CLOSE_TRY_AGAIN,
                            reason=f"no broker available; retry in {connected.retry_after_s}s")
            return
        if isinstance(connected, int):
            await ws_refuse(receive, send, code=connected, reason="refused by the broker")
            return
        upstream, instance = connected
        try:
            message = await receive()
            if message["type"] != "websocket.connect":  # the client left while we connected upstream
                return
            accept: dict[str, Any] = {"type": "websocket.accept"}
            if upstream.subprotocol:
                accept["subprotocol"] = upstream.subprotocol
            await send(accept)
            async with self.upstreams.holding(instance, kind="ws"):
                await self._pump(upstream, receive, send, state=state, limiter=self.limiter)
        finally:
            await upstream.close()

    @staticmethod
    async def _pump(upstream: ClientConnection, receive: Receive, send: Send, *, state: RequestState,
                    limiter: RateLimiter | None = None) -> None:
        bucket = TokenBucket(rate=settings.GATEWAY_WS_FRAME_RATE, burst=settings.GATEWAY_WS_FRAME_BURST)
        user_rate = settings.GATEWAY_RATE_WS_USER_FRAMES
        client_gone = False  # once the client side ended, nothing more is sent to it

        async def client_to_upstream() -> None:
            nonlocal client_gone
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    client_gone = True
                    await upstream.close(code=_client_close_code(message.get("code")))
                    return
                if not bucket.take():
                    client_gone = True
                    state.reason = "frame_rate_limited"
                    await send({"type": "websocket.close", "code": CLOSE_RATE_LIMITED,
                                "reason": "too many frames; slow down"})
                    await upstream.close(code=CLOSE_RATE_LIMITED, reason="client sent too many frames")
                    return
                if limiter is not None and state.user is not None and (await limiter.hit(
                        group="gw:ws-user-frames", rate=user_rate, value=state.user.user_id)).should_limit:
                    # The user's frames over all their sockets, on every gateway, passed the budget.
                    client_gone = True
                    state.reason = "user_frame_budget"
                    await send({"type": "websocket.close", "code": CLOSE_RATE_LIMITED,
                                "reason": "too many frames from this user; slow down"})
                    await upstream.close(code=CLOSE_RATE_LIMITED, reason="user sent too many frames")
                    return
                if message.get("text") is not None:
                    await upstream.send(message["text"])
                elif message.get("bytes") is not None:
                    await upstream.send(message["bytes"])

        async def upstream_to_client() -> None:
            try:
                async for data in upstream:
                    await send({"type": "websocket.send", ("text" if isinstance(data, str) else "bytes"): data})
            except websockets.exceptions.ConnectionClosed:
                pass
            received = upstream.protocol.close_rcvd  # None: the broker vanished without a close frame
            if received is None:
                code, reason = CLOSE_UPSTREAM_LOST, "broker lost; reconnect"
            else:
                code = received.code if received.code not in (1005, 1006, 1015) else 1000
                reason = received.reason
            state.reason = state.reason or ("upstream_lost" if received is None else "")
            if not client_gone:
                await send({"type": "websocket.close", "code": code, "reason": reason})

        tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    logger.info("gateway: WebSocket pump ended: %r", task.exception())
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _header_values(scope: Scope, name: bytes) -> list[str]:
    values: list[str] = []
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            values += value.decode("latin-1").split(",") if name == b"sec-websocket-protocol" else [
                value.decode("latin-1")]
    return values
