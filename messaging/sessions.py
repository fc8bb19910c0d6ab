"""Sessions ended elsewhere (docs/adr/0027): a broker is in the channel-layer group of every user with a socket
on it, so a logout, password change or account removal (``api.accounts.user_sessions_close``) reaches each
broker holding one of the user's sockets once, and it closes them with 4010. The only use of the channel
layer (channels-redis on REDIS_URL); messages never go through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import redis.asyncio

from core.closecodes import CLOSE_SESSION_ENDED
from messaging import frames
from messaging.resp import RespClient, script_run

# channels-redis forgets a group member after its group_expiry (1 day): members are renewed hourly.
GROUP_RENEW_S = 3600.0

# A connect's join of the user's group and its read of a set on the same Redis (the user's conversation ids), in
# one round trip: channels-redis' group_add (ZADD with the time as score, then EXPIRE) followed by SMEMBERS.
# KEYS: the set, the group (absent: read only). ARGV: this process' channel, the time, the group expiry.
_JOIN_READ_LUA = """
if KEYS[2] then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return redis.call('SMEMBERS', KEYS[1])
"""


class UserGroups:
    """This process' one channel on the channel layer and its membership of its users' groups. ``by_user`` and
    ``stats`` are the hub's (its sockets by user id; its counters)."""

    def __init__(self, *, by_user: dict[str, set[Any]], stats: Counter[str], client: redis.asyncio.Redis | None = None,
                 redis_url: str = "", fast: RespClient | None = None) -> None:
        self.by_user = by_user
        self.stats = stats
        # The hub's client of ``redis_url`` (REDIS_URL) and its pipelined connection there (None: redis-py): a
        # connect's join and read go through them when the channel layer keeps its groups on that same Redis.
        self.redis_url = redis_url
        self.fast = fast
        self._join_read = client.register_script(_JOIN_READ_LUA) if client is not None else None
        # Discards started so far: a connect whose join raced one joins again (:meth:`add_reading`).
        self.discards = 0
        self._joins_here: bool | None = None
        self._layer: Any = None
        self._channel = ""
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        # A user's group_discard still in flight: a new socket of theirs waits for it before its group_add,
        # so the two never cross on their way to Redis (which would leave the user out of the group).
        self._discarding: dict[str, asyncio.Task[None]] = {}

    async def _session_layer(self) -> tuple[Any, str]:
        """The channel layer and this process' channel on it (named once: a restarted loop keeps the groups)."""
        async with self._lock:  # two first connects must not name two channels
            if self._layer is None:
                from channels.layers import get_channel_layer

                layer = get_channel_layer()
                self._channel = await layer.new_channel("cs.broker.")
                self._layer = layer
        return self._layer, self._channel

    async def _joinable(self) -> bool:
        """Whether this process can join groups itself: the layer keeps them on one Redis, REDIS_URL, under
        channels-redis' own group key (decided once)."""
        if self._joins_here is None:
            layer, _ = await self._session_layer()
            hosts = getattr(layer, "hosts", None)
            self._joins_here = bool(hosts is not None and len(hosts) == 1 and hosts[0].get("address") == self.redis_url
                                    and callable(getattr(layer, "_group_key", None)))
        return self._joins_here

    async def add(self, user_id: str) -> None:
        """Join the user's group before their socket is ready, so a logout from then on reaches it. Side
        effect: one ZADD in Redis (channels-redis; membership expires after its group_expiry, 1 day, which the
        sessions loop renews for the users still here)."""
        layer, channel = await self._session_layer()
        pending = self._discarding.get(user_id)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        await layer.group_add(frames.user_group(user_id), channel)

    async def add_reading(self, user_id: str | None, *, key: str) -> tuple[list[Any], bool]:
        """The members of the set ``key`` (on REDIS_URL) and, with ``user_id``, this process joined to that
        user's group as :meth:`add` joins it, in one script on the pipelined connection: (members, True).
        (members, False) when the join was not made here (no ``user_id``, no pipelined connection, or a
        channel layer other than one channels-redis host on REDIS_URL): the caller joins with :meth:`add`.
        The caller must also join with :meth:`add` when :attr:`discards` moved during the call (a discard
        of the same user may have reached Redis after this join)."""
        if self._join_read is None:
            raise RuntimeError("UserGroups was made without the hub's client")
        if user_id is None or not await self._joinable():
            return list(await script_run(self.fast, self._join_read, keys=[key], args=[])), False
        layer, channel = self._layer, self._channel
        pending = self._discarding.get(user_id)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        group = layer._group_key(frames.user_group(user_id))
        members = await script_run(self.fast, self._join_read, keys=[key, group],
                                   args=[channel, repr(time.time()), int(layer.group_expiry)])
        return list(members), True

    def discard(self, user_id: str) -> None:
        """Leave the group of a user whose last socket here closed (in the background: called from a
        synchronous cleanup). A discard that fails leaves a stale member, which only costs a message to it."""
        if self._layer is None:
            return
        self.discards += 1
        task = asyncio.get_running_loop().create_task(
            self._layer.group_discard(frames.user_group(user_id), self._channel))
        self._background.add(task)
        self._discarding[user_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            self._background.discard(finished)
            if self._discarding.get(user_id) is finished:
                del self._discarding[user_id]

        task.add_done_callback(done)

    async def receive_loop(self) -> None:
        """Receive ``sessions.close`` events on this process' channel and close the user's sockets here."""
        layer, channel = await self._session_layer()
        while True:
            message = await layer.receive(channel)
            if message.get("type") != frames.SESSIONS_CLOSE:
                continue
            conns = tuple(self.by_user.get(str(message.get("user_id")), ()))
            self.stats["sessions_closed"] += len(conns)
            for conn in conns:
                conn.session_end(code=int(message.get("code", CLOSE_SESSION_ENDED)))

    async def renew_loop(self) -> None:
        """Renew this broker's membership of its users' groups before channels-redis forgets it (1 day)."""
        while True:
            await asyncio.sleep(GROUP_RENEW_S)
            layer, channel = await self._session_layer()
            for user_id in list(self.by_user):
                await layer.group_add(frames.user_group(user_id), channel)
