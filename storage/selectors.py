"""Reads of the storage pipeline: backlog, lag and throughput per partition, and the dead letters.

Nothing here writes. Every figure is read from Redis, so any storage instance (and the admin) reports the
same cluster-wide view.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from core.bus import BusSync, bus_sync
from core.keys import DEADLETTERS, GROUP, RATE_BUCKET_S, RATE_WINDOW_S, rate_key, stats_key, stream_key
from core.values import as_str


def entry_ms(entry_id: str) -> int:
    """The wall-clock milliseconds a stream entry id was made at."""
    return int(entry_id.split("-", 1)[0])


def entry_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id (stream order, hence seq order within a conversation)."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


@dataclass(frozen=True, slots=True)
class PartitionState:
    partition: int
    appended: int  # entries ever added to the stream
    undelivered: int  # entries not yet read by the storage group
    pending: int  # read but not acknowledged (being written, or orphaned by a dead worker)
    oldest_unpersisted: str | None  # entry id, None when everything is persisted
    persisted: int  # events written and acknowledged (total, from the drain's stats)
    dead: int  # entries dead-lettered (total)
    last_batch_ms: int

    @property
    def backlog(self) -> int:
        """Entries appended and not yet persisted (nor dead-lettered)."""
        return self.undelivered + self.pending

    def lag_s(self, *, now_ms: int | None = None) -> float:
        """Age of the oldest unpersisted entry: how far MongoDB is behind Redis, in seconds."""
        if self.oldest_unpersisted is None:
            return 0.0
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        return max(0.0, (now_ms - entry_ms(self.oldest_unpersisted)) / 1000)


# Undelivered entries counted one by one when the group's lag is unknown: at most this many (~300 KB of entries
# read, in a read that runs every few seconds only while Redis cannot give the lag).
UNDELIVERED_COUNTED_MAX = 1000


def partitions_state(*, partitions: list[int] | None = None, client: BusSync | None = None) -> list[PartitionState]:
    """The state of each partition (all by default), in two pipelined round trips."""
    r = client or bus_sync()
    parts = partitions if partitions is not None else list(range(int(settings.PARTITIONS)))
    pipe = r.pipeline(transaction=False)
    for p in parts:
        pipe.xinfo_groups(stream_key(p))
        pipe.xpending(stream_key(p), GROUP)
        pipe.xinfo_stream(stream_key(p))
        pipe.hgetall(stats_key(p))
    first = pipe.execute(raise_on_error=False)
    pipe = r.pipeline(transaction=False)
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(parts):
        groups, pending, info, stats = first[4 * i: 4 * i + 4]
        group = None
        if not isinstance(groups, Exception):
            group = next((g for g in groups if as_str(g["name"]) == GROUP), None)
        appended = 0 if isinstance(info, Exception) else int(info.get("entries-added") or info.get("length") or 0)
        stats = {} if isinstance(stats, Exception) else {as_str(k): as_str(v) for k, v in stats.items()}
        row: dict[str, Any] = {"partition": p, "appended": appended, "stats": stats}
        if group is None:
            # No group yet: nothing was ever drained, every entry still in the stream is unpersisted.
            row.update(undelivered=0 if isinstance(info, Exception) else int(info.get("length") or 0),
                       pending=0, pending_min=None, after="-")
        else:
            lag = group.get("lag")
            row.update(undelivered=lag, pending=int(group["pending"]),
                       pending_min=as_str(pending["min"]) if not isinstance(pending, Exception) and pending["min"]
                       else None, after="(" + as_str(group["last-delivered-id"]))
        rows.append(row)
        if row["undelivered"] is None:
            # Redis cannot say (an entry after the group's last delivered one was deleted, which a test's XDEL
            # does): count what follows it, up to a bound, past which the stream's length less the pending
            # entries (an overcount: it includes the acknowledged entries not yet trimmed).
            pipe.xrange(stream_key(p), min=row["after"], count=UNDELIVERED_COUNTED_MAX)
            pipe.xlen(stream_key(p))
        else:
            pipe.xrange(stream_key(p), min=row["after"], count=1)
    second = iter(pipe.execute(raise_on_error=False))
    states = []
    for row in rows:
        nxt = next(second)
        if row["undelivered"] is None:
            total = next(second)
            if not isinstance(nxt, Exception) and len(nxt) < UNDELIVERED_COUNTED_MAX:
                row["undelivered"] = len(nxt)
            else:
                row["undelivered"] = max(0, int(total) - row["pending"]) if not isinstance(total, Exception) else 0
        candidates = [row["pending_min"]] if row["pending_min"] else []
        if not isinstance(nxt, Exception) and nxt:
            candidates.append(as_str(nxt[0][0]))
        elif not isinstance(nxt, Exception):
            # Nothing after last-delivered-id: nothing undelivered, whatever the group's lag says (after a
            # restart Redis 7.0 restores the group's entries-read inexactly, and the lag overcounts).
            row["undelivered"] = 0
        stats = row["stats"]
        states.append(PartitionState(
            partition=row["partition"], appended=row["appended"], undelivered=int(row["undelivered"]),
            pending=row["pending"], oldest_unpersisted=min(candidates, key=entry_key) if candidates else None,
            persisted=int(stats.get("persisted", 0)), dead=int(stats.get("dead", 0)),
            last_batch_ms=int(stats.get("last_batch_ms", 0)),
        ))
    return states


def persisted_rates(*, client: BusSync | None = None, now_s: float | None = None) -> dict[int, float]:
    """Events persisted per second per partition, averaged over the last ``RATE_WINDOW_S`` full buckets."""
    r = client or bus_sync()
    current = int((now_s if now_s is not None else time.time()) // RATE_BUCKET_S)
    buckets = [current - i for i in range(1, RATE_WINDOW_S // RATE_BUCKET_S + 1)]
    pipe = r.pipeline(transaction=False)
    for b in buckets:
        pipe.hgetall(rate_key(b))
    totals: dict[int, int] = {}
    for found in pipe.execute():
        for k, v in found.items():
            totals[int(as_str(k))] = totals.get(int(as_str(k)), 0) + int(v)
    return {p: n / RATE_WINDOW_S for p, n in totals.items()}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str  # id in the dead-letter stream
    partition: int
    entry_id: str  # the original entry's id in its partition stream
    reason: str
    failed_at_ms: int
    fields: dict[str, str]  # the original entry's fields (undecodable bytes replaced)


def _deadletter(entry_id: Any, raw: dict[Any, Any]) -> DeadLetter:
    f = {as_str(k): as_str(v) for k, v in raw.items()}
    try:
        fields = json.loads(f.get("fields", "{}"))
    except ValueError:
        fields = {}
    return DeadLetter(id=as_str(entry_id), partition=int(f.get("partition", -1)), entry_id=f.get("entry_id", ""),
                      reason=f.get("reason", ""), failed_at_ms=int(f.get("failed_at_ms", 0)), fields=fields)


def deadletters_list(*, limit: int = 100, client: BusSync | None = None) -> list[DeadLetter]:
    """The newest ``limit`` dead letters, newest first."""
    r = client or bus_sync()
    found: Any = r.xrevrange(DEADLETTERS, count=limit)
    return [_deadletter(i, f) for i, f in found]


def deadletters_count(*, client: BusSync | None = None) -> int:
    return int((client or bus_sync()).xlen(DEADLETTERS))


def deadletter_get(*, id: str, client: BusSync | None = None) -> DeadLetter | None:
    r = client or bus_sync()
    found: Any = r.xrange(DEADLETTERS, min=id, max=id, count=1)
    return _deadletter(*found[0]) if found else None
