"""The WebSocket endpoint of the broker role (docs/protocol.md is the contract this implements).

One :class:`ChatConsumer` per connection. It is thin: it checks the frame (size, rate, JSON shape), calls
the write path in ``messaging.services`` or the reads in ``messaging.selectors``, and turns domain errors
into ``error`` frames. Live events are pushed to it by the process' hub (``messaging.hub``), not by the
channel layer: this consumer has no channel layer at all (no per-connection channel, no receive loop).
Resume is ``messaging/resume.py``. Over 400 lines: one class whose methods share one connection's state
(connect, frames, delivery and its slowness checks, membership re-checks); splitting it would only spread that
state over several files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import redis.exceptions
from asgiref.sync import sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from core.closecodes import CLOSE_BAD_TICKET, CLOSE_INTERNAL, CLOSE_RATE_LIMITED, CLOSE_TOO_LARGE, CLOSE_TOO_SLOW
from core.errors import DomainError, ValidationFailed
from messaging import frames, membership, presence, reactions, resume, selectors, services, streams, transports
from messaging.auth import connection_identify, connection_proxied
from messaging.hub import Hub, hub_get

logger = logging.getLogger(__name__)

# docs/interface.md: frames over 64 KiB close the connection with 1009.
MAX_FRAME_BYTES = 64 * 1024
# Refused frames in a row (each answered with ``error rate_limited``) before the connection is closed with
# 4008: ten is enough for a client to notice the errors and back off, few enough that a flood stops fast.
RATE_STRIKES = 10
# Live events of a conversation held while it is being resumed; past this the client is too slow (4009).
RESUME_BUFFER_MAX = 10_000
_background: set[asyncio.Task[None]] = set()
# A connection whose unsent bytes stay above WS_SEND_BUFFER_BYTES this long is too slow (4009): a healthy
# client on a bad network catches up within seconds; 5 s of traffic is what a stalled one may cost above
# the limit. Above SLOW_HARD_FACTOR x the limit it is closed at once, which bounds memory per connection.
SLOW_GRACE_S = 5.0
SLOW_HARD_FACTOR = 4
def _ref_of(data: Any) -> Any:
    if isinstance(data, dict):
        ref = data.get("ref", data.get("client_msg_id"))
        if isinstance(ref, str | int) and not isinstance(ref, bool) and len(str(ref)) <= 64:
            return ref
    return None


class ChatConsumer(AsyncWebsocketConsumer):
    # No channel layer per connection: messages come from the hub's stream reader, control and ephemeral
    # events from the hub's one pub/sub subscription (an alias that is not configured yields no layer).
    channel_layer_alias = "no-channel-layer"

    user_id: str = ""
    username: str = ""
    session_id: str = ""
    # Class-level defaults: the cleanup (websocket_disconnect) may run for a connection that ended before or
    # during websocket_connect.
    registered = False
    closing = False
    ended = False
    # Live events the hub delivered between the connection's registration and its ``ready`` (the registration
    # awaits the partitions' stream positions, and the hub delivers meanwhile): held, then sent right after
    # ``ready``, which docs/protocol.md promises is the first frame. None once ``ready`` is sent.
    early: list[tuple[str, int, bytes, bytes]] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' loop minus what this consumer does not need, measured as the biggest per-frame costs:
        no channel layer, no task per received message (``await_many_dispatch``), and no thread hop to close
        old database connections before every frame (``aclose_old_connections``; no ORM is used here)."""
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                message = await receive()
                handler = self.ASGI_HANDLERS.get(message["type"])
                if handler is None:
                    raise ValueError(f"no handler for ASGI message type {message['type']}")
                await handler(self, message)
        except StopConsumer:
            pass
        except Exception:
            # A bug, or the transport failing under a send: whatever it was, the client is told (1011, if
            # the socket can still carry it) and the cleanup below runs.
            logger.exception("connection of user %s failed; closing it with %s", self.user_id or "?",
                             CLOSE_INTERNAL)
            with contextlib.suppress(Exception):
                await self._close(CLOSE_INTERNAL)
        finally:
            # Every way out (the client's or the server's close, a transport error, any exception, the
            # server cancelling this task) runs the one cleanup: the hub forgets the socket and presence is
            # updated. Without it the hub kept a dead socket and refreshed its presence for ever.
            if not self.ended:
                with contextlib.suppress(StopConsumer):
                    await self.websocket_disconnect({"type": "websocket.disconnect", "code": CLOSE_INTERNAL})

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        self.hub: Hub = hub_get()
        self.conversations: set[str] = set()
        self.resuming: dict[str, list[tuple[int, str]]] = {}
        self.resumed_upto: dict[str, int] = {}
        # Read once: Django's settings object costs a Python-level __getattribute__ per access, and these are
        # read per frame and per delivery (measured: ~3% of a broker's CPU under `manage.py bench`).
        self.rate_per_s = float(settings.WS_RATE_PER_S)
        self.rate_burst = float(settings.WS_RATE_BURST)
        self.send_limit = int(settings.WS_SEND_BUFFER_BYTES)
        self.tokens = self.rate_burst
        self.tokens_at = time.monotonic()
        self.strikes = 0
        self.closing = False
        self.registered = False
        self.over_since = 0.0
        self.paced = 0
        self.presence_task: asyncio.Task[bool] | None = None
        daphne = transports.DaphneOutput.of(self.base_send)
        if daphne is not None:
            # autobahn enforces the limit while it reads the frame (it never buffers more) and closes with 1009
            # (uvicorn: --ws-max-size, set by the role command).
            daphne.protocol.maxMessagePayloadSize = MAX_FRAME_BYTES
            daphne.protocol.maxFramePayloadSize = MAX_FRAME_BYTES
            # Fail protocol violations with a close frame carrying the code (1009 here), not a bare TCP drop.
            daphne.protocol.failByDrop = False
        self.out: transports.Output = (daphne or transports.UvicornOutput.of(self.base_send)
                                       or transports.AsgiOutput(self.base_send))
        await self.accept()  # close codes exist only on an accepted WebSocket (a refused handshake is a 403)
        proxied = connection_proxied(self.scope)
        try:
            owner = await connection_identify(self.scope)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
            logger.warning("connect: Redis unavailable while checking a ticket")
            await self._close(CLOSE_INTERNAL)
            return
        if owner is None:
            await self.send_frame(frames.frame("error", code="unauthenticated",
                                               message="missing, unknown, expired or used ticket", ref=None))
            await self._close(CLOSE_BAD_TICKET)
            return
        self.user_id, self.username = owner.user_id, owner.username
        self.out.identified()
        if proxied:
            self.out.keepalive_by_kernel()
        self.session_id = uuid.uuid4().hex
        try:
            found, joined = await self.hub.connection_read(self)
            self.conversations = set(found)
            self.early = []
            await self.hub.connection_add(self, conversation_ids=found, joined=joined)
            self.registered = True
            await self.send_frame(frames.frame("ready", user_id=self.user_id, session_id=self.session_id,
                                               conversations=sorted(self.conversations)))
            self._early_send()
            # In the background: the presence script and announcement queue behind others in a wave of connects,
            # and the client's first frames must not wait for them. Disconnect waits for it (online before offline).
            self.presence_task = asyncio.get_running_loop().create_task(presence.presence_connect(
                self.hub.redis, user_id=self.user_id, session_id=self.session_id,
                conversation_ids=sorted(self.conversations), resp=self.hub.fast))
            self.presence_task.add_done_callback(self._presence_connected)
        except Exception:
            logger.exception("connect: could not set up the session of user %s", self.user_id)
            if not self.registered:
                self.hub.connection_remove(self, conversation_ids=list(self.conversations))
            await self._close(CLOSE_INTERNAL)

    def _presence_connected(self, task: asyncio.Task[bool]) -> None:
        # A finished Task (with its result) is ~0.6 KB an idle connection would carry for its life; a failed
        # one is kept for the disconnect to log.
        if self.presence_task is task and not task.cancelled() and task.exception() is None:
            self.presence_task = None

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """The one cleanup of a connection, whatever ended it (``__call__`` runs it on every exit); runs once."""
        if self.ended:
            raise StopConsumer
        self.ended = True
        self.closing = True
        out = getattr(self, "out", None)
        if isinstance(out, transports.AsgiOutput):
            out.stop()
        if self.registered:
            self.registered = False
            self.hub.connection_remove(self, conversation_ids=list(self.conversations))
            try:
                if self.presence_task is not None:
                    await self.presence_task
            except Exception:
                logger.exception("connect: presence update of user %s failed", self.user_id)
            try:
                await presence.presence_disconnect(self.hub.redis, user_id=self.user_id,
                                                   session_id=self.session_id,
                                                   conversation_ids=sorted(self.conversations), resp=self.hub.fast)
            except Exception:
                logger.exception("disconnect: presence update of user %s failed", self.user_id)
        raise StopConsumer

    # ------------------------------------------------------------------ output

    async def send_frame(self, frame: str) -> None:
        """Send one frame of this connection's own (ready, ack, error, resume...). Async for the callers'
        sake; it never waits (a resume paces itself, ``messaging.resume``)."""
        if not self.closing and self.out.is_open():
            # A client's own strings come back in its frames (a ref, a key of a resume): one holding a lone
            # surrogate (legal in JSON as "\ud800") has no UTF-8; written back as that same JSON escape.
            data = frame.encode("utf-8", "backslashreplace")
            self.out.write(frames.ws_wire(data), data)

    async def _close(self, code: int) -> None:
        if not self.closing:
            self.closing = True
            await self._send_close(code)

    async def _send_close(self, code: int) -> None:
        if isinstance(self.out, transports.AsgiOutput):
            await self.out.finish()
        await self.base_send({"type": "websocket.close", "code": code})

    def _close_too_slow(self) -> None:
        """Close with 4009 from the hub's synchronous fan-out; no frame is written from now on."""
        if self.closing:
            return
        self.closing = True
        self.hub.stats["closed_too_slow"] += 1
        if not self.out.force_close(CLOSE_TOO_SLOW):
            task = asyncio.get_running_loop().create_task(self._send_close(CLOSE_TOO_SLOW))
            _background.add(task)
            task.add_done_callback(_background.discard)

    def session_end(self, *, code: int) -> None:
        """Called by the hub when the user's session ended elsewhere (logout, password change, account
        removal; docs/adr/0027): close with ``code`` (4010); no frame is written from now on."""
        if self.closing:
            return
        self.closing = True
        if not self.out.force_close(code):
            task = asyncio.get_running_loop().create_task(self._send_close(code))
            _background.add(task)
            task.add_done_callback(_background.discard)

    def _too_slow(self, backlog: int) -> bool:
        """Called with ``backlog`` (unsent bytes) above ``WS_SEND_BUFFER_BYTES``: true once it has stayed
        above for longer than SLOW_GRACE_S, or at once above SLOW_HARD_FACTOR times it. A burst (one XREAD
        batch is written in one loop turn, before the socket is flushed) may pass the soft limit for a moment;
        a reader that does not read stays there."""
        now = time.monotonic()
        if not self.over_since:
            self.over_since = now
        return backlog > SLOW_HARD_FACTOR * self.send_limit or now - self.over_since > SLOW_GRACE_S

    def deliver(self, *, conversation_id: str, seq: int, text: bytes, wire: bytes) -> None:
        """Called by the hub for each live event: ``text`` is the UTF-8 JSON, ``wire`` the same as a complete
        WebSocket frame, both built once per fan-out; ``seq`` 0: unsequenced. Never blocks: a connection
        whose unsent bytes exceed ``WS_SEND_BUFFER_BYTES`` is closed with 4009 instead."""
        if self.closing:
            return
        early = self.early
        if early is not None:  # not ready yet
            if len(early) >= RESUME_BUFFER_MAX:
                self._close_too_slow()
                return
            early.append((conversation_id, seq, text, wire))
            return
        buffered = self.resuming.get(conversation_id) if self.resuming else None
        if buffered is not None:
            if len(buffered) >= RESUME_BUFFER_MAX:
                self._close_too_slow()
                return
            buffered.append((seq, text.decode()))
            return
        if seq and self.resumed_upto and seq <= self.resumed_upto.get(conversation_id, 0):
            return  # already sent by this connection's resume
        out = self.out
        backlog = out.write_within(wire, text, limit=self.send_limit)
        if backlog:  # over the limit, nothing written: too slow, or still within its grace (then written)
            if self._too_slow(backlog):
                self._close_too_slow()
                return
            if out.is_open():
                out.write(wire, text)
        elif self.over_since:
            self.over_since = 0.0

    def _early_send(self) -> None:
        """Deliver, in order, what the hub delivered before ``ready``; from now on events go out as they come."""
        early, self.early = self.early or [], None
        for conversation_id, seq, text, wire in early:
            self.deliver(conversation_id=conversation_id, seq=seq, text=text, wire=wire)

    def membership_recheck(self, *, conversation_id: str | None) -> None:
        if not self.closing:
            task = asyncio.get_running_loop().create_task(
                self._membership_recheck(conversation_id=conversation_id))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _membership_recheck(self, *, conversation_id: str | None) -> None:
        try:
            if conversation_id is None:
                current = set(await sync_to_async(selectors.user_conversation_ids, thread_sensitive=False)(
                    user_id=self.user_id))
                changed = current ^ self.conversations
            else:
                members = await membership.conversation_members(self.hub.redis, conversation_id=conversation_id)
                is_member = members is not None and self.user_id in members
                changed = {conversation_id} if is_member != (conversation_id in self.conversations) else set()
            for conv in sorted(changed):
                if self.closing or not self.registered:
                    return
                if conv in self.conversations:
                    self.conversations.discard(conv)
                    self.hub.unsubscribe(self, conversation_id=conv)
                    await self.send_frame(frames.frame("membership", conversation_id=conv, status="left"))
                else:
                    self.conversations.add(conv)
                    await self.hub.subscribe(self, conversation_id=conv)
                    last = await streams.last_accepted_seq(self.hub.redis, conversation_id=conv)
                    await self.send_frame(frames.frame("membership", conversation_id=conv, status="joined",
                                                       last_seq=last))
        except Exception:
            logger.exception("membership re-check of user %s failed", self.user_id)

    async def _error(self, exc: DomainError, *, ref: Any) -> None:
        await self.send_frame(frames.frame("error", code=exc.code, message=exc.message, ref=ref,
                                           details=exc.details))

    # ------------------------------------------------------------------ input

    def _rate_admit(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate_burst, self.tokens + (now - self.tokens_at) * self.rate_per_s)
        self.tokens_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.strikes = 0
            return True
        self.strikes += 1
        return False

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        if self.closing or not self.registered:
            return
        text = message.get("text")
        if text is None:
            raw = message.get("bytes") or b""
            if len(raw) > MAX_FRAME_BYTES:
                await self._close(CLOSE_TOO_LARGE)
                return
            await self._error(ValidationFailed("binary frames are not supported; send JSON text"), ref=None)
            return
        # Reached only under an ASGI server other than daphne and uvicorn (both refuse bigger frames while reading).
        if len(text) > MAX_FRAME_BYTES // 4 and len(text.encode()) > MAX_FRAME_BYTES:
            await self._close(CLOSE_TOO_LARGE)
            return
        if not self._rate_admit():
            if self.strikes > RATE_STRIKES:
                await self._close(CLOSE_RATE_LIMITED)
                return
            await self.send_frame(frames.frame(
                "error", code="rate_limited", ref=None, details={"retry_after": 1},
                message=f"more than {settings.WS_RATE_PER_S:g} frames/s (burst {settings.WS_RATE_BURST}); "
                        f"slow down or the connection is closed with 4008"))
            return
        try:
            data = json.loads(text)
        except ValueError:
            await self._error(ValidationFailed("frame is not valid JSON", code="invalid_json"), ref=None)
            return
        except RecursionError:  # not a ValueError: a frame nested deeper than the interpreter's recursion limit
            await self._error(ValidationFailed("frame nests too deeply (the limit is about 1,000 levels)",
                                               code="invalid_json", details={"reason": "too_deep"}), ref=None)
            return
        ref = _ref_of(data)
        kind = data.get("type") if isinstance(data, dict) else None
        handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            shown = kind if isinstance(kind, str) and len(kind) <= 40 else None
            await self._error(ValidationFailed(
                f"unknown frame type {shown!r}" if shown else "a frame is a JSON object with a string 'type'",
                code="unknown_type", details={"types": sorted(self.HANDLERS)}), ref=ref)
            return
        try:
            await handler(self, data, ref)
        except DomainError as exc:
            await self._error(exc, ref=ref)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
            logger.warning("frame %s of user %s: Redis unavailable", kind, self.user_id, exc_info=True)
            await self.send_frame(frames.frame("error", code="unavailable", ref=ref,
                                               message="the message bus is unavailable; retry shortly"))
        except Exception:
            logger.exception("frame %s of user %s failed", kind, self.user_id)
            await self.send_frame(frames.frame("error", code="internal", ref=ref,
                                               message="internal error; it has been logged"))

    async def on_send(self, data: dict[str, Any], ref: Any) -> None:
        accepted = await services.message_send(
            self.hub.redis, user_id=self.user_id, conversation_id=data.get("conversation_id"),
            client_msg_id=data.get("client_msg_id"), content=data.get("content"), reply_to=data.get("reply_to"))
        await self.send_frame(frames.frame("ack", client_msg_id=data.get("client_msg_id"),
                                           conversation_id=accepted.conversation_id,
                                           message_id=accepted.message_id, seq=accepted.seq,
                                           duplicate=accepted.duplicate))

    async def on_edit(self, data: dict[str, Any], ref: Any) -> None:
        accepted = await services.message_edit(self.hub.redis, user_id=self.user_id,
                                               message_id=data.get("message_id"), content=data.get("content"))
        await self.send_frame(frames.frame("ack", ref=ref, conversation_id=accepted.conversation_id,
                                           message_id=accepted.message_id, seq=accepted.seq))

    async def on_delete(self, data: dict[str, Any], ref: Any) -> None:
        accepted = await services.message_delete(self.hub.redis, user_id=self.user_id,
                                                 message_id=data.get("message_id"))
        await self.send_frame(frames.frame("ack", ref=ref, conversation_id=accepted.conversation_id,
                                           message_id=accepted.message_id, seq=accepted.seq))

    async def on_read(self, data: dict[str, Any], ref: Any) -> None:
        cursor = await services.read_mark(self.hub.redis, user_id=self.user_id,
                                          conversation_id=data.get("conversation_id"), seq=data.get("seq"))
        await self.send_frame(frames.frame("ack", ref=ref, conversation_id=data.get("conversation_id"),
                                           read_seq=cursor))

    async def _on_reaction(self, data: dict[str, Any], ref: Any, *, op: str) -> None:
        change = await reactions.reaction_change(self.hub.redis, user_id=self.user_id,
                                                 message_id=data.get("message_id"), emoji=data.get("emoji"), op=op)
        await self.send_frame(frames.frame("ack", ref=ref, conversation_id=change.conversation_id,
                                           message_id=change.message_id, emoji=change.emoji, changed=change.changed,
                                           seq=change.seq, user_ids=change.user_ids))

    async def on_reaction_add(self, data: dict[str, Any], ref: Any) -> None:
        await self._on_reaction(data, ref, op="add")

    async def on_reaction_remove(self, data: dict[str, Any], ref: Any) -> None:
        await self._on_reaction(data, ref, op="remove")

    async def on_typing(self, data: dict[str, Any], ref: Any) -> None:
        await services.typing_signal(self.hub.redis, user_id=self.user_id,
                                     conversation_id=data.get("conversation_id"))

    async def on_ping(self, data: dict[str, Any], ref: Any) -> None:
        await self.send_frame(frames.frame("pong", ref=ref))

    async def on_resume(self, data: dict[str, Any], ref: Any) -> None:
        await resume.resume_handle(self, data, ref)

    ASGI_HANDLERS = {"websocket.connect": websocket_connect, "websocket.receive": websocket_receive,
                     "websocket.disconnect": websocket_disconnect}
    HANDLERS = {
        "message.send": on_send, "message.edit": on_edit, "message.delete": on_delete, "read": on_read,
        "typing": on_typing, "resume": on_resume, "ping": on_ping, "reaction.add": on_reaction_add,
        "reaction.remove": on_reaction_remove,
    }
