"""Redis keys of the storage pipeline, and the process's sync client of the message bus Redis.

Per-partition keys carry the partition's hash tag ``{pNN}`` (like the stream itself, see
``messaging/streams.py``), so on a Redis Cluster they live in the stream's slot and the lease scripts touch
one slot. The dead letters and rate buckets are in slots of their own: they are only ever used in single-key
commands or non-transactional pipelines, which a cluster client splits by node.
"""

from __future__ import annotations

import os
import socket

from messaging.bus import BusSync, bus_sync
from messaging.streams import tag

GROUP = "storage"  # the one consumer group that persists the streams
DEADLETTERS = "cs:deadletters"  # one stream for every partition: staff read one place


def drain_lock_key(partition: int) -> str:
    """SET NX with a TTL: a drain of this partition is queued or running."""
    return f"cs:{tag(partition)}:drain:lock"


def drain_lease_key(partition: int) -> str:
    """SET NX PX with a token: a drain is reading or writing this partition right now (mutual exclusion)."""
    return f"cs:{tag(partition)}:drain:lease"


def failures_key(partition: int) -> str:
    """Hash entry id -> failed attempts, and ``<entry id>:why`` -> the last reason."""
    return f"cs:{tag(partition)}:drain:failures"


def stats_key(partition: int) -> str:
    """Hash: ``persisted`` (events written and acked, total), ``batches``, ``dead``, ``outages``,
    ``last_batch_ms`` (wall clock of the last batch)."""
    return f"cs:{tag(partition)}:drain:stats"


def rate_key(bucket: int) -> str:
    """Hash partition -> events persisted in one ``RATE_BUCKET_S`` bucket (expires after the window)."""
    return f"cs:storage:rate:{bucket}"


def maintenance_key(partition: int) -> str:
    return f"cs:{tag(partition)}:drain:maint"


# Persisted msgs/s is averaged over RATE_WINDOW_S in RATE_BUCKET_S buckets: a minute, like Prometheus'
# usual rate() window, in 10 s buckets so a reading is never more than 10 s stale.
RATE_BUCKET_S = 10
RATE_WINDOW_S = 60

def redis_sync() -> BusSync:
    """The process's sync client of the message bus (``messaging.bus.bus_sync``), where the streams and
    every key above live: a Redis Cluster client when the bus is one (docs/adr/0022)."""
    return bus_sync()


def consumer_name() -> str:
    """This process's consumer in the ``storage`` group: host and pid, so a restarted worker is a new
    consumer and the entries its predecessor left pending are reclaimed, not silently owned."""
    return f"{socket.gethostname()}:{os.getpid()}"
