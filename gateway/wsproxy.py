"""The WebSocket proxy: load balancer → circuit breaker → proxy for ``/ws/``.

The gateway connects to the broker first and accepts the client only once the broker accepted, then passes
frames both ways: the broker's frames straight to the client's transport, the client's framed and masked to
the broker (gateway/wslink.py, docs/adr/0039). Back-pressure: a client that does not read stops the gateway
reading its broker link (the broker's slow-reader rule then applies); a broker that does not read makes the
client's frames wait. Close codes pass through both ways; a broker that vanishes without a close frame closes
the client with 1012. The HTTP proxy and the helpers both share are ``gateway/proxy.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from typing import Any

from django.conf import settings

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
from gateway.pingwheel import PingWheel
from gateway.proxy import MAX_ATTEMPTS, WS_SKIP, upstream_headers, upstream_url
from gateway.ratelimit import RateLimiter, TokenBucket
from gateway.upstreams import OpenedState, Unavailable, UpstreamFailed, Upstreams
from gateway.userlimits import SocketSlots
from gateway.wslink import (
    SERVER_SEND,
    AsgiFrames,
    ClientGate,
    HandshakeRefused,
    UpstreamLink,
    link_open,
    raw_output,
    tcp_keepalive,
)

# The kernel's probes of an idle client connection (after GATEWAY_WS_KEEPALIVE_IDLE_S): 4 probes 5 s apart,
# so the default 20 s idle notices a vanished client within 40 s, the bound uvicorn's 20 s ping + 20 s pong
# timeout gave (docs/protocol.md, Liveness).
KEEPALIVE_PROBE_INTERVAL_S = 5
KEEPALIVE_PROBES = 4


def _client_close_code(code: int | None) -> int:
    """A close code the gateway may send to the upstream on behalf of a client that left."""
    if code is None or code in (1005, 1006, 1015) or not (1000 <= code <= 4999):
        return 1000
    return code

logger = logging.getLogger(__name__)


class WebSocketProxy:
    """Proxy one WebSocket to the broker with the fewest open connections, within the user's socket slots and
    frame budget (gateway/userlimits.py); ``pings`` pings the clients (else the server does)."""

    def __init__(self, *, upstreams: Upstreams, slots: SocketSlots | None = None,
                 limiter: RateLimiter | None = None, pings: PingWheel | None = None) -> None:
        self.upstreams = upstreams
        self.slots = slots
        self.limiter = limiter
        self.pings = pings

    async def _connect(self, scope: Scope, state: RequestState) -> tuple[UpstreamLink, Any] | Unavailable | int:
        """An open upstream link and its instance, Unavailable, or a close code for the client."""
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in upstream_headers(scope, state=state, skip=WS_SKIP)]
        subprotocols = [p.strip() for p in _header_values(scope, b"sec-websocket-protocol") if p.strip()]
        origin = next(iter(_header_values(scope, b"origin")), None)
        target = upstream_url("", scope, websocket=True, drop_query=frozenset({"ticket"}))
        tried: set[str] = set()
        unavailable: Unavailable | None = None
        while len(tried) < MAX_ATTEMPTS:
            picked = await self.upstreams.pick(role="broker", kind="ws", exclude=frozenset(tried))
            if isinstance(picked, Unavailable):
                unavailable = picked
                break
            tried.add(picked.id)
            address = urllib.parse.urlsplit(picked.url)
            try:
                async with self.upstreams.attempt(picked, kind="ws"):
                    try:
                        link = await link_open(host=address.hostname or "127.0.0.1", port=address.port or 80,
                                               target=target, headers=headers, subprotocols=subprotocols,
                                               origin=origin, connect_timeout_s=settings.GATEWAY_CONNECT_TIMEOUT_S,
                                               answer_timeout_s=settings.GATEWAY_READ_TIMEOUT_S)
                    except HandshakeRefused as exc:
                        # The broker answered, and refused: its decision, not a transport failure.
                        state.reason = f"upstream_refused_{exc.status}"
                        return CLOSE_FORBIDDEN if exc.status in (401, 403) else 1011
                    except (OSError, TimeoutError, ConnectionError) as exc:
                        raise UpstreamFailed("connect") from exc
            except OpenedState:
                continue
            except UpstreamFailed as exc:
                logger.warning("gateway: broker %s refused a WebSocket (%s)", picked.id, exc.__cause__)
                continue
            state.upstream = picked.id
            return link, picked
        return unavailable or Unavailable(role="broker", retry_after_s=1, instances=len(tried))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit, connect upstream and accept; the accepted connection's life is left in ``state.after``
        (GatewayApp runs it once the layers have returned), which then owns the link and the slot."""
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
            await self._proxy(scope, receive, send, state=state, slot=slot)
        finally:
            if state.after is None:
                await self._slot_release(slot)

    async def _slot_release(self, slot: str | None) -> None:
        if slot is not None and self.slots is not None:
            await self.slots.release(slot)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, *, state: RequestState,
                     slot: str | None) -> None:
        connected = await self._connect(scope, state)
        if isinstance(connected, Unavailable):
            state.reason = "no_broker"
            await ws_refuse(receive, send, code=CLOSE_TRY_AGAIN,
                            reason=f"no broker available; retry in {connected.retry_after_s}s")
            return
        if isinstance(connected, int):
            await ws_refuse(receive, send, code=connected, reason="refused by the broker")
            return
        link, instance = connected
        try:
            message = await receive()
            if message["type"] != "websocket.connect":  # the client left while we connected upstream
                return
            accept: dict[str, Any] = {"type": "websocket.accept"}
            if link.subprotocol:
                accept["subprotocol"] = link.subprotocol
            await send(accept)
            state.after = _Session(self, link, self.upstreams.load(instance.id), receive,
                                   scope.get(SERVER_SEND) or send, state=state, slot=slot).run
        finally:
            if state.after is None:
                link.close()


class _Session:
    """An accepted WebSocket's life, until either side ends; then the link and the slot are released. Counted
    on its broker as ``Upstreams.holding`` counts. Broker -> client: the link writes the broker's frames to the
    client's transport (uvicorn), or re-sends them as ASGI messages (any other server); the client's frames
    are read in :meth:`run`, the connection's own task (no task per direction).

    One slotted object and one coroutine frame for the connection's whole life, and the server's own ``send``
    rather than the layers' wrappers of it (each holds a closure and its cells): what a proxied socket keeps
    idle counts against issue 16's per-connection memory (bench/ws_memory.py --gateway; docs/adr/0049)."""

    __slots__ = ("client_gone", "closing", "link", "load", "output", "proxy", "receive", "send", "slot", "state")

    def __init__(self, proxy: WebSocketProxy, link: UpstreamLink, load: Any, receive: Receive, send: Send, *,
                 state: RequestState, slot: str | None) -> None:
        self.proxy = proxy
        self.link = link
        self.load = load
        self.receive = receive
        self.send = send  # the server's own: the access log's close code is recorded here (:meth:`close`)
        self.state = state
        self.slot = slot
        self.output: AsgiFrames | None = None
        self.client_gone = False  # once the client side ended, nothing more is sent to it
        self.closing: asyncio.Task[None] | None = None

    async def close(self, code: int, reason: str) -> None:
        """Close the client's socket with ``code``, once the broker's frames before it have been sent."""
        self.state.close_code = code
        if self.output is not None:
            await self.output.finish()
        with contextlib.suppress(Exception):  # the client may have gone meanwhile
            await self.send({"type": "websocket.close", "code": code, "reason": reason})

    def upstream_ended(self, ended: asyncio.Future[tuple[int, str] | None]) -> None:
        received = None if ended.cancelled() else ended.result()
        if received is None:
            code, reason = CLOSE_UPSTREAM_LOST, "broker lost; reconnect"
        else:
            code = received[0] if received[0] not in (1005, 1006, 1015) else 1000
            reason = received[1]
        state = self.state
        state.reason = state.reason or ("upstream_lost" if received is None else "")
        if not self.client_gone:
            # uvicorn queues the client's websocket.disconnect as it sends the close: the loop in run() ends.
            self.closing = asyncio.ensure_future(self.close(code, reason))

    async def run(self) -> None:
        """Pass frames both ways until either side ends, then release the link, the slot and the count. The
        client's frames go to the broker within the socket's and the user's budgets; a client over one is
        closed. One coroutine for it all: a suspended frame costs every idle socket its bytes."""
        proxy, link, state, receive = self.proxy, self.link, self.state, self.receive
        pings, limiter = proxy.pings, proxy.limiter
        self.load.ws += 1
        raw = raw_output(self.send)
        try:
            if raw is not None:
                link.attach(raw.transport.write, raw.transport.get_write_buffer_size)
                # uvicorn's own frames (this proxy's closes among them) wait for the end of a broker frame
                # being passed through, instead of landing inside it (docs/adr/0049).
                raw.writes_through(ClientGate(raw.transport, link))
                idle_s = int(settings.GATEWAY_WS_KEEPALIVE_IDLE_S)
                if idle_s:
                    tcp_keepalive(raw.transport, idle_s=idle_s, interval_s=KEEPALIVE_PROBE_INTERVAL_S,
                                  count=KEEPALIVE_PROBES)
                if pings is not None and not raw.pings_itself():
                    pings.add(link, raw)
            else:
                self.output = AsgiFrames(self.send)
                link.attach(self.output.feed, self.output.backlog)
            link.ended.add_done_callback(self.upstream_ended)
            bucket = TokenBucket(rate=settings.GATEWAY_WS_FRAME_RATE, burst=settings.GATEWAY_WS_FRAME_BURST)
            user_rate = settings.GATEWAY_RATE_WS_USER_FRAMES
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    self.client_gone = True
                    link.close(_client_close_code(message.get("code")))
                    return
                if link.ended.done():
                    continue  # the broker is gone: its close to the client is on its way
                if not bucket.take():
                    self.client_gone = True
                    state.reason = "frame_rate_limited"
                    await self.close(CLOSE_RATE_LIMITED, "too many frames; slow down")
                    link.close(CLOSE_RATE_LIMITED, "client sent too many frames")
                    return
                if limiter is not None and state.user is not None and (await limiter.hit(
                        group="gw:ws-user-frames", rate=user_rate, value=state.user.user_id)).should_limit:
                    # The user's frames over all their sockets, on every gateway, passed the budget.
                    self.client_gone = True
                    state.reason = "user_frame_budget"
                    await self.close(CLOSE_RATE_LIMITED, "too many frames from this user; slow down")
                    link.close(CLOSE_RATE_LIMITED, "user sent too many frames")
                    return
                if message.get("text") is not None:
                    await link.send(message["text"])
                elif message.get("bytes") is not None:
                    await link.send(message["bytes"])
        finally:
            self.client_gone = True
            if pings is not None:
                pings.discard(link)
            link.ended.remove_done_callback(self.upstream_ended)
            if self.closing is not None:
                with contextlib.suppress(Exception):
                    await self.closing
            if self.output is not None:
                self.output.stop()
            self.load.ws -= 1
            link.close()
            await proxy._slot_release(self.slot)


def _header_values(scope: Scope, name: bytes) -> list[str]:
    values: list[str] = []
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            values += value.decode("latin-1").split(",") if name == b"sec-websocket-protocol" else [
                value.decode("latin-1")]
    return values
