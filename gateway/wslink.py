"""The gateway's link to a broker for one proxied WebSocket: an asyncio protocol, not a WebSocket library.

Why (issue 16, docs/adr/0039): with ``websockets``' asyncio client each proxied socket cost the gateway a
client connection object (its frame assembler, keepalive task and buffers) and two pump tasks, ~50 KB and
~5 ms of CPU per connect, and every frame from the broker was parsed, decoded, handed over as an ASGI message
and framed again. A broker's frames are unmasked server frames, exactly what the client must receive: here
they are written to the client's transport as they arrive, and only their headers are read, to answer the
broker's pings (the gateway answers them: uvicorn does not hand a client's pongs to the app) and to turn its
close frame into the client's close (the codes pass through, docs/protocol.md). The client's frames arrive
as ASGI messages (uvicorn parsed and unmasked them, enforcing the 64 KiB limit) and are masked and framed
here. The broker's own keepalive pings watch the link; the gateway sends none (a killed broker's socket is
closed by the kernel, and the client is told 1012).

Preconditions: one link per client socket; :meth:`attach` is called once the client is accepted. Frames the
broker sends before that (its ``ready`` may arrive with the handshake's answer) are held until then.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from messaging.transports import UvicornOutput

try:  # websockets' C helper (a dependency of the gateway already); the pure-Python one otherwise
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - only without websockets' compiled extension
    from websockets.utils import apply_mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The scope key under which the gateway keeps the ASGI server's own ``send`` of a WebSocket (the layers wrap
# the one they pass on), so the proxy can reach uvicorn's transport (messaging/transports.py UvicornOutput).
SERVER_SEND = "chatstream.server_send"
MAX_HEAD = 16 * 1024  # a broker's handshake answer is a few hundred bytes
# A client that does not take what the broker sends: above this many unsent bytes the link stops reading the
# broker (TCP pushes back on it, and the broker's own slow-reader rule applies), and reads again below
# RESUME_BELOW. 1 MiB is the brokers' own send buffer bound (CHATSTREAM_WS_SEND_BUFFER).
PAUSE_ABOVE = 1024 * 1024
RESUME_BELOW = 256 * 1024
RESUME_POLL_S = 0.05
# How long a close of the gateway's own waits for the end of the broker frame it would otherwise land inside
# (docs/adr/0049). The rest of a frame the broker is writing arrives within milliseconds on the internal
# network; 2 s also covers a busy loop's lateness (ADR 0044 saw timers ~1 s late) and stays inside uvicorn's
# 5 s close timeout. Past it the client's TCP connection is aborted: a close code lost, never a corrupt stream.
OWN_CLOSE_WAIT_S = 2.0
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10


def frame_masked(opcode: int, payload: bytes) -> bytes:
    """One final client-to-server frame (masked, as RFC 6455 requires of a client). Pure but for the mask."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


class HandshakeRefused(Exception):
    """The broker answered the handshake with another status than 101 (its decision: ``status``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"broker answered {status}")
        self.status = status


class UpstreamLink(asyncio.Protocol):
    """One WebSocket to a broker, as a client. Create it with :func:`link_open`."""

    # Slots, not an instance dict: a link lives as long as its client's socket, and issue 16 counts each idle
    # socket's bytes (bench/ws_memory.py --gateway). The rare close-in-a-frame path's state: ``sealing``: a
    # close frame of the gateway's own waits in ``control`` for the end of the broker frame being passed;
    # ``sealed``: it was written, nothing of the broker's follows it; ``client``: the client's real transport
    # (the gate's) to close or abort; ``client_close_due``: the client's transport was asked to close while the
    # close frame waited; ``link_close_due``: the same for this link (its close would stop the rest of the frame
    # arriving).
    __slots__ = (
        "accept_value",
        "client",
        "client_backlog",
        "client_close_due",
        "close_sent",
        "control",
        "drained",
        "ended",
        "head",
        "held",
        "link_close_due",
        "opened",
        "passing",
        "paused",
        "request",
        "seal_timer",
        "sealed",
        "sealing",
        "subprotocol",
        "transport",
        "write",
    )

    def __init__(self, request: bytes, key: bytes) -> None:
        self.request = request
        self.accept_value = base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324 - RFC 6455
        self.transport: asyncio.Transport | None = None
        # The handshake's answer; None once :func:`link_open` has returned (the link is open for good).
        self.opened: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[tuple[int, str] | None] = asyncio.get_running_loop().create_future()
        self.subprotocol: str | None = None
        self.head = b""  # unparsed bytes: the handshake answer, then an incomplete frame header/control frame
        self.passing = 0  # bytes of the current data frame still to pass through
        self.held: list[bytes] = []  # broker frames that came before attach()
        self.write: Callable[[bytes], None] | None = None  # the client's transport.write, once attached
        self.client_backlog: Callable[[], int] | None = None
        self.paused = False
        self.drained: asyncio.Future[None] | None = None
        self.close_sent = False
        self.control = b""  # a frame of the gateway's own for the client, written once ``passing`` is done
        self.sealing = False
        self.sealed = False
        self.client: Any = None
        self.client_close_due = False
        self.link_close_due: tuple[int, str] | None = None
        self.seal_timer: asyncio.TimerHandle | None = None

    def handshaking(self) -> bool:
        return self.opened is not None and not self.opened.done()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)
        self.request = b""  # ~0.5-1 KB (the identity headers) an idle link would keep for its life

    def data_received(self, data: bytes) -> None:
        if self.handshaking():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self._fail(ConnectionError("oversized handshake answer"))
                return
            answer, data, self.head = self.head[:end].decode("latin-1"), self.head[end + 4:], b""
            try:
                self._answer_check(answer)
            except Exception as exc:
                self._fail(exc)
                return
            self.accept_value = b""
            assert self.opened is not None
            self.opened.set_result(None)
            if not data:
                return
        self._frames(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sealing:
            self._seal_missed()  # a close of the gateway's own waited for a frame that will never end
        if self.handshaking():
            assert self.opened is not None
            self.opened.set_exception(ConnectionError("the broker closed the connection during the handshake"))
        if not self.ended.done():
            self.ended.set_result(None)  # no close frame: the broker vanished
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    # ------------------------------------------------------------------ broker -> client

    def _answer_check(self, answer: str) -> None:
        lines = answer.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {lines[0][:80]!r}")
        if int(parts[1]) != 101:
            raise HandshakeRefused(int(parts[1]))
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept", "").encode() != self.accept_value:
            raise ConnectionError("the broker's Sec-WebSocket-Accept does not match")
        self.subprotocol = headers.get("sec-websocket-protocol") or None

    def _frames(self, data: bytes) -> None:
        """Pass data frames through as they are; act on control frames. ``data`` continues the stream."""
        out: list[bytes] = []
        # Once the gateway's own close frame is in ``out`` (after the frame it waited for), nothing of the
        # broker's after it is written; the stream is still parsed (its close frame, its pings).
        sealed_at = -1 if not self.sealed else 0
        view = memoryview(data)
        at, size = 0, len(data)
        if self.head:  # an incomplete header or control frame from the previous read
            view = memoryview(self.head + data)
            size = len(view)
            self.head = b""
        while at < size:
            if self.passing:
                take = min(self.passing, size - at)
                out.append(view[at:at + take].tobytes())
                self.passing -= take
                at += take
                if not self.passing and self.control:
                    out.append(self.control)
                    self.control = b""
                    if self.sealing:
                        self.sealing, self.sealed, sealed_at = False, True, len(out)
                continue
            if size - at < 2:
                break
            first, second = view[at], view[at + 1]
            length, offset = second & 0x7F, 2
            if length == 126:
                if size - at < 4:
                    break
                length, offset = struct.unpack_from("!H", view, at + 2)[0], 4
            elif length == 127:
                if size - at < 10:
                    break
                length, offset = struct.unpack_from("!Q", view, at + 2)[0], 10
            if second & 0x80:
                offset += 4  # a masked server frame is a protocol error; passed on, the client will say so
            opcode = first & 0x0F
            if opcode >= OP_CLOSE:
                if size - at < offset + length:
                    break  # control frames are at most 125 bytes: wait for the rest
                self._control(opcode, view[at + offset:at + offset + length].tobytes())
                at += offset + length
                continue
            if size - at < offset:
                break
            out.append(view[at:at + offset].tobytes())
            self.passing = length
            at += offset
        if at < size:
            self.head = view[at:size].tobytes()
        if sealed_at >= 0:
            out = out[:sealed_at]
        if out:
            self._to_client(b"".join(out))
        if sealed_at > 0:
            self._seal_done()

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.send_frame(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            reason = payload[2:].decode("utf-8", "replace")
            if not self.ended.done():
                self.ended.set_result((code, reason))
            self.close(code if 1000 <= code <= 4999 and code not in (1005, 1006, 1015) else 1000)

    def _to_client(self, data: bytes) -> None:
        if self.write is None:
            self.held.append(data)
            return
        self.write(data)
        if not self.paused and self.client_backlog is not None and self.client_backlog() > PAUSE_ABOVE:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(RESUME_POLL_S, self._resume_check)

    def _resume_check(self) -> None:
        if self.transport is None or self.transport.is_closing() or self.client_backlog is None:
            return
        if self.client_backlog() < RESUME_BELOW:
            self.paused = False
            self.transport.resume_reading()
        else:
            asyncio.get_running_loop().call_later(RESUME_POLL_S, self._resume_check)

    def control_to_client(self, frame: bytes) -> None:
        """Write frames of the gateway's own (the wheel's ping; through :class:`ClientGate` everything uvicorn
        writes: its pongs, its close frames) to the client between two of the broker's frames: now, or when the
        data frame still arriving from the broker has passed (a frame written inside it would corrupt the
        client's stream). Those that wait are written in order. After a close frame nothing more of the
        broker's is passed on. A close that cannot wait (the broker is gone, so the rest of its frame will
        never come; or it does not come within OWN_CLOSE_WAIT_S) aborts the client's TCP connection instead.
        Precondition: attached."""
        if self.sealed or self.write is None:
            return
        is_close = bool(frame) and frame[0] & 0x0F == OP_CLOSE
        if not self.passing:
            self.write(frame)
            if is_close:
                self.sealed = True
            return
        self.control += frame
        if is_close and not self.sealing:
            self.sealing = True
            if self.transport is None or self.transport.is_closing():
                self._seal_missed()  # the broker is gone mid-frame: the rest will never come
            else:
                self.seal_timer = asyncio.get_running_loop().call_later(OWN_CLOSE_WAIT_S, self._seal_missed)

    def client_close(self) -> None:
        """Close the client's transport (``ClientGate.close``): at once, or once a close frame of the
        gateway's own that waits for a frame boundary has been written."""
        if self.sealing:
            self.client_close_due = True
        elif self.client is not None:
            self.client.close()

    def _seal_done(self) -> None:
        """The waiting close frame was written: do the closes that waited for it."""
        if self.seal_timer is not None:
            self.seal_timer.cancel()
            self.seal_timer = None
        if self.client_close_due and self.client is not None:
            self.client.close()
        if self.link_close_due is not None:
            code, reason = self.link_close_due
            self.link_close_due = None
            self.close(code, reason)

    def _seal_missed(self) -> None:
        """The broker frame did not end in time (or cannot): abort the client's connection rather than
        write the close inside the frame; the client sees 1006 and reconnects as after any drop."""
        self.sealing, self.sealed, self.control = False, True, b""
        if self.client is not None:
            self.client.abort()
        self._seal_done()

    def attach(self, write: Callable[[bytes], None], backlog: Callable[[], int]) -> None:
        """Start passing the broker's frames to the client (``write``: its transport's write). Side effect:
        the frames held so far are written now."""
        self.write, self.client_backlog = write, backlog
        held, self.held = self.held, []
        for data in held:
            self._to_client(data)

    # ------------------------------------------------------------------ client -> broker

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.close_sent:
            self.transport.write(frame_masked(opcode, payload))

    async def send(self, payload: str | bytes) -> None:
        """Frame one client message to the broker; waits while the broker is not taking what was sent."""
        if isinstance(payload, str):
            self.send_frame(OP_TEXT, payload.encode())
        else:
            self.send_frame(OP_BINARY, payload)
        if self.drained is not None:
            await self.drained

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close frame (once) and end the TCP connection once it is flushed. Idempotent. While a
        close of the gateway's own waits for the broker frame being passed, the link stays open until that
        frame has arrived (or OWN_CLOSE_WAIT_S passed)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.sealing:
            if self.link_close_due is None:
                self.link_close_due = (code, reason)
            return
        if not self.close_sent:
            self.transport.write(frame_masked(OP_CLOSE, close_payload(code, reason)))
            self.close_sent = True
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        if self.handshaking():
            assert self.opened is not None
            self.opened.set_exception(exc)
        self.abort()


class ClientGate:
    """What uvicorn's WebSocket protocol writes to the client goes through the link (installed as its
    ``transport``: messaging/transports.py ``UvicornOutput.writes_through``), so its own frames (the close the
    proxy sends, 4008 or a passed-on code; the wheel's 1011; pongs; the close handshake's answer; 1012 at
    shutdown) wait for the end of a broker frame being passed through instead of landing inside it, and its
    close of the transport waits for them (docs/adr/0049). Everything else is the real transport's."""

    __slots__ = ("link", "transport")

    def __init__(self, transport: Any, link: UpstreamLink) -> None:
        self.transport = transport
        self.link = link
        link.client = transport

    def write(self, data: bytes) -> None:
        if data:
            self.link.control_to_client(bytes(data))

    def close(self) -> None:
        self.link.client_close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def link_open(*, host: str, port: int, target: str, headers: list[tuple[str, str]],
                    subprotocols: list[str], origin: str | None, connect_timeout_s: float,
                    answer_timeout_s: float) -> UpstreamLink:
    """Connect to a broker (within ``connect_timeout_s``) and complete the WebSocket handshake for ``target``
    (path and query; the answer within ``answer_timeout_s``: a broker busy with a wave of connects answers
    late, it is not dead). Raises :class:`HandshakeRefused` with the broker's status, or
    OSError/TimeoutError/ConnectionError when the broker cannot be reached or answers nonsense."""
    key = base64.b64encode(os.urandom(16))
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            continue  # the server parsed these already; never let one split the request
        lines.append(f"{name}: {value}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    loop = asyncio.get_running_loop()

    link = await connected_within(loop.create_connection(lambda: UpstreamLink(request, key), host, port),
                            timeout_s=connect_timeout_s, limit_s=answer_timeout_s)
    assert link.opened is not None
    try:
        await asyncio.wait_for(asyncio.shield(link.opened), answer_timeout_s)
    except BaseException:
        link.abort()
        raise
    link.opened = None  # ~150 bytes for the link's whole life otherwise
    return link


async def connected_within(connecting: Awaitable[tuple[Any, UpstreamLink]], *, timeout_s: float,
                     limit_s: float) -> UpstreamLink:
    """The link once TCP connected; TimeoutError if that took ``timeout_s`` *of a responsive event loop*.

    A gateway's loop busy with a wave of connects can run its timers a second late, and libuv runs due timers
    before it polls for I/O: a plain ``wait_for`` then times out connects the kernel finished long ago, and
    three in a row opened the broker's breaker and refused every connect for 5 s with 1013 (bench/connects.py,
    10,000 connects: 296 and 565 refused). So a wait whose timer came late by over half of it is this
    process's lag, not the broker's, and is waited again, up to ``limit_s`` in all (docs/adr/0044)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(connecting)
    started = loop.time()
    try:
        while True:
            waited_from = loop.time()
            await asyncio.wait({task}, timeout=timeout_s)
            if task.done():
                return task.result()[1]
            now = loop.time()
            if now - waited_from - timeout_s < timeout_s / 2 or now - started >= limit_s:
                raise TimeoutError(f"no TCP connect within {timeout_s} s")
    except BaseException:  # timed out, or the caller was cancelled: the connect must not live on
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if task.done() and not task.cancelled() and task.exception() is None:
            task.result()[0].abort()
        raise


def tcp_keepalive(transport: Any, *, idle_s: int, interval_s: int, count: int) -> bool:
    """Have the kernel watch a client's TCP connection (docs/protocol.md, Liveness; docs/adr/0044): after
    ``idle_s`` without traffic it sends up to ``count`` probes ``interval_s`` apart and resets the connection
    when none is answered, and unacknowledged data is given up after the same total
    (``TCP_USER_TIMEOUT``), so a vanished client is noticed within ``idle_s + count * interval_s`` with no
    timer, ping or pong in this process. False where the options are missing (the WebSocket pings remain)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not all(hasattr(socket, o) for o in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000 * (idle_s + count * interval_s))
    except OSError:
        return False
    return True


def raw_output(server_send: Any) -> UvicornOutput | None:
    """The client's uvicorn connection, if the server is the uvicorn this was tested with, slimmed (what
    uvicorn keeps per connection but needs no more once accepted: messaging/transports.py). Precondition:
    the client is accepted and the caller is not waiting on ``receive``."""
    output = UvicornOutput.of(server_send) if server_send is not None else None
    if output is not None:
        output.identified()
    return output


class AsgiFrames:
    """For an ASGI server whose transport the gateway cannot reach: decode the broker's frames (as the link
    passes them on, unmasked server frames) into whole messages and send them as ``websocket.send`` from one
    writer task, in order. ``backlog`` is what waits to be sent."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.send = send
        self.reader = StreamReader()
        self.parser = self._parse()
        next(self.parser)
        self.fragments: list[bytes] = []
        self.fragment_opcode = Opcode.TEXT
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.queued = 0
        self.wake = asyncio.Event()
        self.finishing = False
        self.task = asyncio.get_running_loop().create_task(self._writer())

    def _parse(self) -> Any:
        while True:
            frame = yield from Frame.parse(self.reader.read_exact, mask=False)
            self._message(frame)

    def _message(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CONT:
            self.fragments.append(bytes(frame.data))
        elif frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self.fragments, self.fragment_opcode = [bytes(frame.data)], frame.opcode
        else:
            return
        if frame.fin:
            data, self.fragments = b"".join(self.fragments), []
            key = "text" if self.fragment_opcode is Opcode.TEXT else "bytes"
            self.queue.append({"type": "websocket.send", key: data.decode() if key == "text" else data})
            self.queued += len(data)
            self.wake.set()

    def feed(self, data: bytes) -> None:
        self.reader.feed_data(data)
        next(self.parser)

    def backlog(self) -> int:
        return self.queued

    async def _writer(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                message = self.queue.popleft()
                self.queued -= len(message.get("text") or message.get("bytes") or b"")
                await self.send(message)
            if self.finishing:
                return

    async def finish(self) -> None:
        """Send what is queued (bounded: 5 s), then stop."""
        self.finishing = True
        self.wake.set()
        with contextlib.suppress(Exception):  # a client gone or too slow: the close follows anyway
            await asyncio.wait_for(asyncio.shield(self.task), 5.0)
        self.stop()

    def stop(self) -> None:
        self.task.cancel()
