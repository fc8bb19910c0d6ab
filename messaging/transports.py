"""How a broker writes to a WebSocket: straight to the ASGI server's transport where we know the server's
internals (uvicorn, daphne), through plain ASGI messages anywhere else.

The fan-out writes one pre-framed ``bytes`` to every receiver without awaiting (docs/adr/0023); that needs the
server's transport, which no ASGI API exposes, so :class:`UvicornOutput` and :class:`DaphneOutput` reach into
private attributes of uvicorn's websockets-sansio protocol and of autobahn/Twisted. That code is confined to
this module and used only with the versions it was written and tested against (``TESTED``): with any other
version of the server the connection gets :class:`AsgiOutput` (correct everywhere, slower) and one warning
says what to re-check. tests/realtime/test_realtime.py runs every broker test under both servers;
tests/realtime/test_realtime_units.py tests the slim queue and flag, and the version gate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.metadata
import logging
import socket
from typing import Any

logger = logging.getLogger(__name__)

# Server packages whose private internals this module touches -> the "major.minor" releases it is known to
# work with (the versions pinned in requirements.txt). An upgrade that is not listed here falls back to plain
# ASGI until someone re-runs the realtime tests against it and adds it.
TESTED: dict[str, tuple[str, ...]] = {"uvicorn": ("0.54",), "daphne": ("4.2",), "autobahn": ("26.11",)}


@functools.cache
def internals_known(package: str) -> bool:
    """Whether the installed ``package`` is a release whose internals this module was tested against; warns
    once per process when it is not."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    if version.startswith(tuple(f"{v}." for v in TESTED.get(package, ())) + TESTED.get(package, ())):
        return True
    logger.warning("%s %s is not a release messaging/transports.py was tested with (%s): its connections "
                   "use plain ASGI sends (slower). Run tests/realtime/test_realtime.py against it, then add it to "
                   "TESTED.", package, version, ", ".join(TESTED.get(package, ())) or "none")
    return False


# TCP keepalive of a broker's socket to a gateway (UvicornOutput.keepalive_by_kernel): a vanished gateway host
# is found within 60 + 3 x 10 s, about the 20 + 20 s of the WebSocket pings it replaces plus a minute; a
# gateway process that exits closes its sockets at once anyway.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 3
# How long a slow reader closed with 4009 has to answer the close frame (queued behind its unread data)
# before the TCP connection is dropped, which frees its buffer: uvicorn's default close timeout.
SLOW_CLOSE_TIMEOUT_S = 5.0
_AUTOBAHN_OPEN = 3  # autobahn.websocket.protocol.WebSocketProtocol.STATE_OPEN


class Output:
    """Where a connection's server -> client frames go once it is accepted. Each subclass writes a complete,
    pre-framed WebSocket text frame (``frames.ws_wire``) straight to the server's transport without awaiting,
    so the hub hands one shared ``bytes`` to every receiver of a fan-out (docs/adr/0023), and reports the
    bytes written that the kernel has not taken yet (the slow-reader bound)."""

    def is_open(self) -> bool:
        raise NotImplementedError

    def write(self, wire: bytes, text: bytes) -> None:
        raise NotImplementedError

    def backlog(self) -> int:
        raise NotImplementedError

    def write_within(self, wire: bytes, text: bytes, *, limit: int) -> int:
        """A fan-out's write: the backlog when more than ``limit`` bytes are unsent (then nothing is written:
        the caller decides whether the reader is too slow); else 0, after writing the frame if the connection
        is open."""
        backlog = self.backlog()
        if backlog > limit:
            return backlog
        if self.is_open():
            self.write(wire, text)
        return 0

    def identified(self) -> None:
        """Called once the WebSocket is accepted and its user known: the handshake is no longer needed."""

    def force_close(self, code: int) -> bool:
        """Queue a close frame behind what is unsent and drop the connection if the client does not finish
        the close handshake soon; False when this server's own ASGI close must be used instead."""
        return False

    def keepalive_by_kernel(self) -> None:
        """For a socket whose peer is a gateway: trade the server's WebSocket pings for TCP keepalive."""


class ReceiveQueue:
    """What uvicorn's WebSocket protocol needs of its receive queue (``put_nowait``, ``get``, ``get_nowait``,
    ``empty``) for one getter, the connection's ASGI task, without an ``asyncio.Queue``'s three deques and
    Event (2.5 KB + 0.7 KB per connection). Items stay in the list until a getter takes them, so a ``get``
    cancelled after its wake-up loses nothing."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self.items:
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self.waiter is waiter:
                    self.waiter = None
        return self.items.pop(0)

    def get_nowait(self) -> Any:
        if not self.items:
            raise asyncio.QueueEmpty
        return self.items.pop(0)

    def empty(self) -> bool:
        return not self.items


class Flag:
    """What uvicorn's WebSocket protocol needs of its ``writable`` ``asyncio.Event`` (``set``, ``clear``,
    ``is_set``, ``wait``), with the waiters' list allocated only while someone waits (an Event holds a deque
    per connection: ~0.7 KB)."""

    __slots__ = ("value", "waiters")

    def __init__(self, value: bool) -> None:
        self.value = value
        self.waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self.value

    def set(self) -> None:
        self.value = True
        waiters, self.waiters = self.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self.value = False

    async def wait(self) -> bool:
        if self.value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = []
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if self.waiters is not None and waiter in self.waiters:
                self.waiters.remove(waiter)
        return True


class UvicornOutput(Output):
    """uvicorn's websockets-sansio protocol (``send`` is its bound method) on an asyncio/uvloop transport."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.transport = protocol.transport

    @staticmethod
    def of(send: Any) -> UvicornOutput | None:
        protocol = getattr(send, "__self__", None)
        if protocol is not None and internals_known("uvicorn") and all(
                hasattr(protocol, a) for a in ("transport", "conn", "close_sent")):
            return UvicornOutput(protocol)
        return None

    def is_open(self) -> bool:
        return not self.protocol.close_sent and not self.transport.is_closing()

    def write(self, wire: bytes, text: bytes) -> None:
        self.transport.write(wire)

    def backlog(self) -> int:
        return int(self.transport.get_write_buffer_size())

    def write_within(self, wire: bytes, text: bytes, *, limit: int) -> int:
        # The base class' three calls in one: this runs once per receiver of every event.
        transport = self.transport
        backlog: int = transport.get_write_buffer_size()
        if backlog > limit:
            return backlog
        if not self.protocol.close_sent and not transport.is_closing():
            transport.write(wire)
        return 0

    def identified(self) -> None:
        """Drop what uvicorn keeps per connection but uses no more once accepted, and trade its asyncio
        receive queue and ``writable`` Event for slim equivalents: together ~7 KB of an idle connection's
        ~23 KB of Python objects (bench/ws_memory.py; docs/benchmarks.md). Precondition: called by the
        consumer while it handles ``websocket.connect``, so nobody is waiting on the queue or the Event."""
        protocol = self.protocol
        request = protocol.request
        if request is not None:
            # websockets' parser generator keeps the request in its frame for the connection's life, so
            # dropping uvicorn's reference alone frees nothing: empty the headers it holds.
            request.headers.clear()
        protocol.request = None
        protocol.response = None
        # The scope's header list is shared by uvicorn's scope and Channels' copies of it; the Origin check
        # and the identity (the gateway's signed headers or the ticket) have been read.
        scope = getattr(protocol, "scope", None)
        if scope is not None:
            scope["headers"].clear()
        queue = ReceiveQueue()
        while not protocol.queue.empty():
            queue.put_nowait(protocol.queue.get_nowait())
        protocol.queue = queue
        protocol.writable = Flag(protocol.writable.is_set())

    def keepalive_by_kernel(self) -> None:
        """The peer is a gateway (docs/adr/0039), which pings the client itself and answers our pings: on that
        internal link the kernel's TCP keepalive (KEEPALIVE_IDLE_S, then KEEPALIVE_COUNT probes
        KEEPALIVE_INTERVAL_S apart) finds a vanished gateway host, for no Python timer, ping or pong per socket
        (uvicorn's keepalive was ~1-2 % of a core at 5,000 idle sockets; bench/connects.py)."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                                  ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
                if hasattr(socket, option):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        except OSError:
            return  # keep the WebSocket pings
        self.protocol.stop_keepalive()

    def pings_itself(self) -> bool:
        """Whether uvicorn's own keepalive timer pings this socket (``--ws-ping-interval`` above 0)."""
        return bool(self.protocol.ping_interval)

    def ping_written(self, payload: bytes) -> None:
        """Note a ping with ``payload`` that the caller wrote to this socket itself (gateway/pingwheel.py):
        uvicorn's pong handler clears it when the client's pong carries the same payload."""
        self.protocol.pending_ping_payload = payload

    def pong_awaited(self) -> bool:
        return self.protocol.pending_ping_payload is not None

    def pong_missing(self, payload: bytes) -> bool:
        """Whether the pong of the ping noted with ``payload`` has not come (and the socket is still open)."""
        return self.protocol.pending_ping_payload is payload and self.is_open()

    def ping_timed_out(self) -> None:
        """Close as uvicorn's own keepalive does when a pong is late: 1011, then the TCP connection; the ASGI
        app then receives ``websocket.disconnect``."""
        protocol = self.protocol
        protocol.pending_ping_payload = None
        if protocol.close_sent or self.transport.is_closing():
            return
        protocol.conn.fail(1011, "keepalive ping timeout")
        # Through the protocol's transport: the gateway's gate when installed (``writes_through``).
        protocol.transport.write(b"".join(protocol.conn.data_to_send()))
        protocol.close_sent = True
        protocol.transport.close()

    def writes_through(self, gate: Any) -> None:
        """Have uvicorn's protocol write to the client through ``gate`` (an object with the transport's
        methods: gateway/wslink.py ``ClientGate``), so its own frames wait for the end of a broker frame the
        gateway is passing through. ``self.transport`` stays the real one."""
        self.protocol.transport = gate

    def force_close(self, code: int) -> bool:
        # What uvicorn's own ``websocket.close`` does, minus its wait for the transport to become writable:
        # a reader that stopped reading would hold that wait (and its buffer) for ever.
        protocol = self.protocol
        if protocol.close_sent or self.transport.is_closing():
            return True
        try:
            protocol.conn.send_close(code, "")
        except Exception:  # websockets' InvalidState: the peer is closing already
            self.transport.abort()
            return True
        self.transport.write(b"".join(protocol.conn.data_to_send()))
        protocol.close_sent = True
        protocol.queue.put_nowait({"type": "websocket.disconnect", "code": code})
        protocol.close_timer = asyncio.get_running_loop().call_later(SLOW_CLOSE_TIMEOUT_S, self.transport.abort)
        return True


class DaphneOutput(Output):
    """daphne's ``send`` is ``partial(server.handle_reply, protocol)``; the protocol is the autobahn WebSocket
    on a Twisted transport."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    @staticmethod
    def of(send: Any) -> DaphneOutput | None:
        if isinstance(send, functools.partial) and send.args:
            protocol = send.args[0]
            if (hasattr(protocol, "transport") and hasattr(protocol, "maxMessagePayloadSize")
                    and internals_known("daphne") and internals_known("autobahn")):
                return DaphneOutput(protocol)
        return None

    def is_open(self) -> bool:
        return bool(self.protocol.state == _AUTOBAHN_OPEN)

    def write(self, wire: bytes, text: bytes) -> None:
        if self.protocol.send_queue:  # autobahn is feeding its own queue: stay behind it
            self.protocol.sendData(wire)
        else:
            self.protocol.transport.write(wire)

    def backlog(self) -> int:
        transport = self.protocol.transport
        try:
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        except (AttributeError, TypeError):
            return 0


class AsgiOutput(Output):
    """Any other ASGI server: plain ``websocket.send`` messages from one writer task per connection, behind a
    queue whose size in bytes is the backlog (correct everywhere, slower than the two above)."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.queue: collections.deque[str] = collections.deque()
        self.queued_bytes = 0
        self.ready = asyncio.Event()
        self.closed = False
        self.finishing = False
        self.task = asyncio.get_running_loop().create_task(self._writer())

    def is_open(self) -> bool:
        return not self.closed

    def write(self, wire: bytes, text: bytes) -> None:
        self.queue.append(text.decode())
        self.queued_bytes += len(text)
        self.ready.set()

    def backlog(self) -> int:
        return self.queued_bytes

    async def _writer(self) -> None:
        try:
            while True:
                await self.ready.wait()
                self.ready.clear()
                while self.queue:
                    text = self.queue.popleft()
                    self.queued_bytes -= len(text)
                    await self.send({"type": "websocket.send", "text": text})
                if self.finishing:
                    return
        except Exception:
            self.closed = True  # the client went away; the disconnect event ends the consumer

    async def finish(self, *, timeout_s: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout_s``), then stop: a close frame must not overtake the
        frames written before it (the error that explains a 4001, for one)."""
        self.finishing = True
        self.ready.set()
        with contextlib.suppress(Exception):  # TimeoutError, or the writer's own failure
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
        self.stop()

    def stop(self) -> None:
        self.closed = True
        self.queue.clear()
        self.task.cancel()
