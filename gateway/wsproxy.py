"""The WebSocket proxy: load balancer → circuit breaker → proxy for ``/ws/`` (websockets).

The gateway connects to the broker first and accepts the client only once the broker accepted, then pumps
frames both ways. Back-pressure: each direction awaits the other side's send (websockets waits for its write
buffer to drain), so a slow reader slows its writer instead of growing a buffer. Close codes pass through
both ways; a broker that vanishes without a close frame closes the client with 1012. The HTTP proxy and the
helpers both share are ``gateway/proxy.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import websockets
import websockets.exceptions
from django.conf import settings
from websockets.asyncio.client import ClientConnection

from core.closecodes import (
    CLOSE_FORBIDDEN,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_MANY_SOCKETS,
    CLOSE_TRY_AGAIN,
    CLOSE_UPSTREAM_LOST,
)
from gateway.asgi import (
    Receive,
    RequestState,
    Scope,
    Send,
    state_of,
    ws_refuse,
)
from gateway.proxy import MAX_ATTEMPTS, WS_SKIP, upstream_headers, upstream_url
from gateway.ratelimit import RateLimiter, TokenBucket
from gateway.upstreams import OpenedState, Unavailable, UpstreamFailed, Upstreams
from gateway.userlimits import SocketSlots

logger = logging.getLogger(__name__)


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
        headers = upstream_headers(scope, state=state, skip=WS_SKIP)
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
            url = upstream_url(picked.url, scope, websocket=True, drop_query=frozenset({"ticket"}))
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
