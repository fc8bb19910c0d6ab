"""The gateway's WebSocket pings to its clients: one wheel per process instead of a timer per socket.

Why (issue 16, docs/adr/0049): uvicorn's keepalive gives every socket its own ping timer, a fresh random
payload, a frame built by websockets and a pong-deadline timer (two timers created and one cancelled per ping
and socket). Here one periodic task turns a wheel of ``spokes`` sets of sockets, one spoke per tick (a tick is
the ping interval divided into steps of at most ``MAX_TICK_S``): each socket of the spoke gets the same
pre-built frame, and the sockets of the spoke pinged ``timeout_ticks`` ago whose pong has not come are closed
with 1011 (docs/protocol.md, Liveness). uvicorn still parses the client's pong; its pong handler clears the
payload the wheel noted (messaging/transports.py ``UvicornOutput.ping_written``), so nothing else per socket
exists between pings. A ping is written between two of the broker's frames, never inside one still arriving
(gateway/wslink.py ``control_to_client``).

Precondition: the gateway's uvicorn runs with ``--ws-ping-interval 0`` (``manage.py role gateway`` does when
this wheel is on); a socket whose server pings it itself is not added.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import struct

from gateway.wslink import OP_PING, UpstreamLink
from messaging.transports import UvicornOutput

logger = logging.getLogger(__name__)

# A socket is pinged within one tick of its interval and closed within one tick of its pong timeout; a second
# keeps a tick's share of the sockets small (1/45 at the default 45 s) and the deadlines as uvicorn's.
MAX_TICK_S = 1.0


class PingWheel:
    """Ping every added client socket every ``interval_s`` and close it with 1011 when its pong does not come
    within ``timeout_s`` (both rounded up to whole ticks). One per gateway process."""

    def __init__(self, *, interval_s: float, timeout_s: float) -> None:
        self.spokes = max(1, math.ceil(interval_s / MAX_TICK_S))
        self.tick_s = interval_s / self.spokes
        self.timeout_ticks = max(1, math.ceil(timeout_s / self.tick_s))
        self.wheel: list[dict[UpstreamLink, UvicornOutput]] = [{} for _ in range(self.spokes)]
        self.spoke_of: dict[UpstreamLink, int] = {}
        # (tick at which to check, the payload pinged, the sockets pinged with it), oldest first.
        self.checks: collections.deque[tuple[int, bytes, list[UvicornOutput]]] = collections.deque()
        self.tick = 0
        self._task: asyncio.Task[None] | None = None

    def add(self, link: UpstreamLink, client: UvicornOutput) -> None:
        """Ping ``client`` (through ``link``, between the broker's frames) from now on, first in about one
        interval. Side effect: starts the wheel's task if it was stopped."""
        spoke = (self.tick - 1) % self.spokes  # the spoke just turned: its next turn is a whole interval away
        self.wheel[spoke][link] = client
        self.spoke_of[link] = spoke
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._turn())

    def discard(self, link: UpstreamLink) -> None:
        spoke = self.spoke_of.pop(link, None)
        if spoke is not None:
            self.wheel[spoke].pop(link, None)

    def step(self) -> None:
        """One tick: close the sockets whose pong is overdue, then ping the next spoke's."""
        self.tick += 1
        while self.checks and self.checks[0][0] <= self.tick:
            _, payload, pinged = self.checks.popleft()
            for client in pinged:
                if client.pong_missing(payload):
                    client.ping_timed_out()
        spoke = self.wheel[self.tick % self.spokes]
        if not spoke:
            return
        payload = struct.pack("!I", self.tick & 0xFFFFFFFF)
        frame = bytes((0x80 | OP_PING, len(payload))) + payload  # final, unmasked (a server's frame)
        pinged = []
        for link, client in spoke.items():
            if client.is_open() and not client.pong_awaited():  # a pong still awaited keeps its deadline
                client.ping_written(payload)
                link.control_to_client(frame)
                pinged.append(client)
        self.checks.append((self.tick + self.timeout_ticks, payload, pinged))

    async def _turn(self) -> None:
        while self.spoke_of or self.checks:
            await asyncio.sleep(self.tick_s)
            try:
                self.step()
            except Exception:  # one socket's failure must not stop every other socket's pings
                logger.exception("gateway: ping wheel step failed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
