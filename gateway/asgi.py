"""ASGI plumbing shared by the gateway's layers: types, per-request state, and the gateway's own answers."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core import errors
from core.tokens import TicketOwner
from gateway.routes import Route

if TYPE_CHECKING:
    from gateway.ratelimit import Counter, Usage

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE_KEY = "chatstream.gateway"



@dataclass(slots=True)
class RequestState:
    """What the layers learn about one request, read by the access log at the end. Slotted: an accepted
    WebSocket keeps its state for its whole life."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    route: Route | None = None
    user: TicketOwner | None = None
    upstream: str = ""
    status: int = 0
    close_code: int | None = None
    reason: str = ""  # why the gateway refused it, if it did
    # The per-IP counters the IP layer left to the authentication layer's round trip (gateway/admission.py).
    deferred: list[Counter] = field(default_factory=list)
    # The per-user counter, when the authentication layer counted it in its round trip.
    user_usage: Usage | None = None
    ticket: str | None = None  # a WebSocket ticket stored in the authentication round trip (the ticket route)
    # What the request goes on doing once the layers have returned: an accepted WebSocket's life
    # (gateway/wsproxy.py), which GatewayApp runs outside the layers' coroutines, then writes the access line.
    after: Callable[[], Awaitable[None]] | None = None


def state_of(scope: Scope) -> RequestState:
    """The request's state (precondition: the request-id layer ran)."""
    state: RequestState = scope[STATE_KEY]
    return state


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case) in ``scope``, or None. Pure."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def client_ip(scope: Scope) -> str:
    """The peer address as the ASGI server reports it (never a client-sent X-Forwarded-For). Pure."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def error_body(*, code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    """:func:`core.errors.error_body` as the bytes of a response. Pure."""
    return json.dumps(errors.error_body(code=code, message=message, details=details)).encode()


async def send_response(send: Send, *, status: int, body: bytes, content_type: bytes = b"application/json",
                        headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a complete small response. Side effect: two ASGI messages."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                    *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, *, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON error the gateway answers itself; never cached by anyone in between."""
    await send_response(send, status=status, body=error_body(code=code, message=message, details=details),
                        headers=[(b"cache-control", b"no-store"), *(headers or [])])


async def ws_refuse(receive: Receive, send: Send, *, code: int, reason: str = "") -> None:
    """Refuse a WebSocket handshake. Precondition: its ``websocket.connect`` was not received yet.

    ``code`` 403 refuses the HTTP handshake itself (before accept: the server answers 403); any other code
    accepts and closes at once with that close code, so a browser client can read why (4001, 4008, 1013).
    """
    await receive()  # websocket.connect
    if code == 403:
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code, "reason": reason[:120]})
