"""Housekeeping of the partition streams, run by beat's tick at most once a minute per partition: trim what is
both persisted and older than the resume window, forget idle consumers of dead workers.
"""

from __future__ import annotations

import time

import redis
from django.conf import settings

from core.bus import BusSync, bus_sync
from core.keys import GROUP, stream_key
from core.values import as_str
from storage.selectors import entry_key, partitions_state


def trim_boundary(*, partition: int, now_ms: int | None = None, client: BusSync | None = None) -> str:
    """The MINID below which entries may go: both acknowledged by the storage group and older than the
    resume window. ``0-0`` (nothing) when the group does not exist yet."""
    r = client or bus_sync()
    state = partitions_state(partitions=[partition], client=r)[0]
    try:
        groups = r.xinfo_groups(stream_key(partition))
    except redis.ResponseError:
        return "0-0"
    if not any(as_str(g["name"]) == GROUP for g in groups):
        return "0-0"
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    window = f"{now_ms - int(settings.RESUME_WINDOW_S) * 1000}-0"
    if state.oldest_unpersisted is None:
        # Everything read is acked; everything after last-delivered is unread, hence above any boundary.
        return window
    return min(window, state.oldest_unpersisted, key=entry_key)


def partition_trim(*, partition: int, now_ms: int | None = None, approximate: bool = True,
                   client: BusSync | None = None) -> int:
    """XTRIM MINID the trim boundary; returns how many entries went. Approximate (``~``, the default):
    Redis removes whole nodes only, which is cheap and may keep a few more entries, never fewer."""
    r = client or bus_sync()
    boundary = trim_boundary(partition=partition, now_ms=now_ms, client=r)
    if boundary == "0-0":
        return 0
    return int(r.xtrim(stream_key(partition), minid=boundary, approximate=approximate))


def consumers_forget(*, partition: int, idle_s: int = 3600, client: BusSync | None = None) -> int:
    """Delete consumers of the group that own no pending entry and were idle over ``idle_s`` (every
    restarted worker is a new consumer); returns how many."""
    r = client or bus_sync()
    try:
        consumers = r.xinfo_consumers(stream_key(partition), GROUP)
    except redis.ResponseError:
        return 0
    gone = 0
    for c in consumers:
        if int(c["pending"]) == 0 and int(c["idle"]) > idle_s * 1000:
            r.xgroup_delconsumer(stream_key(partition), GROUP, as_str(c["name"]))
            gone += 1
    return gone
