"""Celery tasks of the storage role: thin wrappers over ``storage.services``.

Reliability comes from the settings (late acks, reject on worker lost, prefetch off, a visibility timeout
longer than any drain) and from the drain being idempotent: a task that runs twice is harmless.
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from core.errors import Retryable
from core.keys import consumer_name
from storage import services, trigger

logger = logging.getLogger("chatstream.storage")


@shared_task(name="storage.tasks.partition_drain_task", ignore_result=True)
def partition_drain_task(*, partition: int) -> int:
    """Drain one batch of ``partition``; queue the next batch if more is waiting (one batch per task, never a
    loop). Side effects: see ``services.partition_drain``; frees the partition's drain lock at the end (or
    keeps it ``DRAIN_RETRY_BACKOFF_S`` after an outage, so beat retries later without a hot loop)."""
    try:
        result = services.partition_drain(partition=partition, batch_size=settings.BATCH_SIZE,
                                          consumer=consumer_name())
    except Retryable as exc:
        logger.warning("storage.drain partition=%d unavailable, retry in %ds: %s", partition,
                       settings.DRAIN_RETRY_BACKOFF_S, exc.message)
        try:
            trigger.drain_release(partition=partition, backoff_s=settings.DRAIN_RETRY_BACKOFF_S)
        except Exception:  # Redis itself is away: the lock's TTL frees the partition
            logger.warning("storage.drain partition=%d could not set its backoff", partition)
        return 0
    except Exception:
        trigger.drain_release(partition=partition)
        raise
    trigger.drain_release(partition=partition)
    if result.more and not result.busy:  # a busy partition's running drain queues its own successor
        trigger.drain_enqueue(partition=partition)
    return result.persisted


@shared_task(name="storage.tasks.drain_tick", ignore_result=True)
def drain_tick() -> int:
    """Beat's time trigger: enqueue a drain of every partition with unpersisted entries."""
    return len(trigger.drain_tick())
