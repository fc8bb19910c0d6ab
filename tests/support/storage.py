"""Helpers for the storage pipeline tests: append through the real write primitive, read MongoDB raw."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
from bson import ObjectId

from core.keys import partition_of
from messaging.streams import Appended, event_append

MIN_PARTITION_CONV_TRIES = 10_000


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def conversation_in(partition: int) -> str:
    """A fresh conversation id (ObjectId hex) that hashes to ``partition``."""
    for _ in range(MIN_PARTITION_CONV_TRIES):
        cid = str(ObjectId())
        if partition_of(cid) == partition:
            return cid
    raise AssertionError(f"no conversation id found for partition {partition}")


def new_event(conversation_id: str, sender_id: str, content: str) -> dict[str, Any]:
    return {"type": "message.new", "conversation_id": conversation_id, "message_id": uuid.uuid4().hex,
            "payload_extra": {"sender_id": sender_id, "content": content, "timestamp": iso_now(),
                              "client_msg_id": uuid.uuid4().hex[:16]}}


def append_events(redis_url: str, events: list[dict[str, Any]], *, concurrency: int = 1) -> list[Appended]:
    """Append ``events`` with ``messaging.streams.event_append`` (in order unless ``concurrency`` > 1).

    Each event: ``{type, conversation_id, message_id, payload_extra}``; the payload gets ``id`` and
    ``conversation_id`` as the write path sets them.
    """

    async def run() -> list[Appended]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            async def one(ev: dict[str, Any]) -> Appended:
                payload = {"id": ev["message_id"], "conversation_id": ev["conversation_id"], **ev["payload_extra"]}
                dedup = None
                if ev["type"] == "message.new":
                    dedup = (payload["sender_id"], payload["client_msg_id"])
                return await event_append(client, type=ev["type"], conversation_id=ev["conversation_id"],
                                          payload=payload, message_id=ev["message_id"], dedup=dedup)

            out: list[Appended] = []
            for i in range(0, len(events), concurrency):
                out.extend(await asyncio.gather(*(one(ev) for ev in events[i:i + concurrency])))
            return out
        finally:
            await client.aclose()

    return asyncio.run(run())


def send_messages(redis_url: str, conversation_id: str, sender_id: str, n: int, *, prefix: str = "m",
                  concurrency: int = 1) -> list[Appended]:
    return append_events(redis_url, [new_event(conversation_id, sender_id, f"{prefix}{i}") for i in range(n)],
                         concurrency=concurrency)


def edit_event(conversation_id: str, message_id: str, content: str, editor: str) -> dict[str, Any]:
    return {"type": "message.edited", "conversation_id": conversation_id, "message_id": message_id,
            "payload_extra": {"content": content, "edited_at": iso_now(), "editor_id": editor}}


def delete_event(conversation_id: str, message_id: str, deleter: str) -> dict[str, Any]:
    return {"type": "message.deleted", "conversation_id": conversation_id, "message_id": message_id,
            "payload_extra": {"deleted_at": iso_now(), "deleter_id": deleter}}


def read_event(conversation_id: str, user_id: str, seq: int) -> dict[str, Any]:
    return {"type": "read.updated", "conversation_id": conversation_id, "message_id": "",
            "payload_extra": {"user_id": user_id, "seq": seq}}


def backlog(client: redis.Redis, partition: int) -> int:
    from storage.selectors import partitions_state

    return partitions_state(partitions=[partition], client=client)[0].backlog


def tails_flush(partition: int) -> int:
    """Store every bucket in progress of ``partition`` (docs/adr/0041) as the idle flush does after a day, and
    raise the window's watermarks accordingly: the store then holds every persisted message in a bucket, as
    before the tails. For tests about the store below the window, not about the tails."""
    from storage.services import tails_flush_idle

    return tails_flush_idle(partition=partition, idle_s=0, now_ms=int(time.time() * 1000) + 1000)


def drain_partition(partition: int, *, consumer: str, batch_size: int = 500) -> int:
    """Run ``storage.services.partition_drain`` in this process until ``partition`` is empty; returns the entries
    persisted. Bounded: a drain that never ends fails the test instead of hanging it."""
    from storage.services import partition_drain

    total = 0
    for _ in range(100):
        res = partition_drain(partition=partition, batch_size=batch_size, consumer=consumer)
        total += res.persisted
        if not res.more:
            return total
    raise AssertionError(f"partition {partition} never ran empty")


def redeliver_newest_first(client: redis.Redis, partition: int, conversation_id: str) -> None:
    """Append every entry of the conversation in ``partition``'s stream again, newest first: the worst order
    reclaims and concurrent drains could deliver them in."""
    from core.keys import stream_key

    key = stream_key(partition)
    entries: Any = client.xrange(key)
    for _eid, fields in reversed(entries):
        if fields[b"c"].decode() == conversation_id:
            client.xadd(key, fields)


def stream_entries_drop(client: redis.Redis, conversation_id: str) -> None:
    """Delete the conversation's entries from its partition's stream, as a trim past them would: from then on
    only MongoDB holds its persisted events (a resume must read them from the store)."""
    from core.keys import stream_key

    key = stream_key(partition_of(conversation_id))
    entries: Any = client.xrange(key)
    for entry_id, fields in entries:
        if fields.get(b"c") == conversation_id.encode():
            client.xdel(key, entry_id)
