"""When partitions get drained: the time trigger (beat's tick) and the size trigger (brokers, when a backlog
reaches the batch size) queue one Celery drain per partition at a time (a SET NX lock per partition).

Side effects of every function here are Redis writes and Celery messages; the drain itself is
``storage/services.py``.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings

from core.bus import BusSync, bus_sync
from core.keys import drain_lock_key, maintenance_key
from storage.maintenance import consumers_forget, partition_trim
from storage.selectors import partitions_state
from storage.services import tails_flush_idle

logger = logging.getLogger("chatstream.storage")


def drain_enqueue(*, partition: int, client: BusSync | None = None) -> bool:
    """Queue a drain of ``partition`` unless one is already queued or running; return whether it queued.

    Used by beat's tick (the time trigger) and by brokers when a partition's backlog reaches the batch size
    (the size trigger). Side effects: SET NX of the partition's drain lock (TTL ``DRAIN_LOCK_TTL_S``, released
    by the drain when it ends), then one Celery message on queue ``storage``.
    """
    r = client or bus_sync()
    if not r.set(drain_lock_key(partition), str(int(time.time() * 1000)), nx=True, ex=settings.DRAIN_LOCK_TTL_S):
        return False
    from storage.tasks import partition_drain_task

    try:
        partition_drain_task.apply_async(kwargs={"partition": partition}, queue="storage")
    except Exception:
        r.delete(drain_lock_key(partition))  # the message did not leave: let the next trigger try
        raise
    return True


async def drain_enqueue_async(*, partition: int) -> bool:
    """:func:`drain_enqueue` for an event loop (the brokers' size trigger): the Redis call and the Celery
    publish block, so they run in a worker thread."""
    from asgiref.sync import sync_to_async

    return bool(await sync_to_async(drain_enqueue, thread_sensitive=False)(partition=partition))


def drain_release(*, partition: int, backoff_s: int = 0, client: BusSync | None = None) -> None:
    """End of a drain: free the partition's lock, or keep it ``backoff_s`` more seconds (after an outage)."""
    r = client or bus_sync()
    if backoff_s > 0:
        r.set(drain_lock_key(partition), "backoff", ex=backoff_s)
    else:
        r.delete(drain_lock_key(partition))


def drain_tick(*, client: BusSync | None = None) -> list[int]:
    """The time trigger (beat, every ``FLUSH_INTERVAL_S``): enqueue a drain of every partition with a backlog,
    and run each partition's maintenance (trim, forget, idle bucket tails) at most once a minute.
    Returns the partitions it enqueued."""
    r = client or bus_sync()
    enqueued = []
    for state in partitions_state(client=r):
        if state.backlog > 0 and drain_enqueue(partition=state.partition, client=r):
            enqueued.append(state.partition)
        if r.set(maintenance_key(state.partition), "1", nx=True, ex=60):
            partition_trim(partition=state.partition, client=r)
            consumers_forget(partition=state.partition, client=r)
            try:
                tails_flush_idle(partition=state.partition, client=r)
            except Exception:  # the store is away: the tails wait in Redis for the next minute's try
                logger.exception("storage.tails could not flush the idle tails of partition %d", state.partition)
    return enqueued
