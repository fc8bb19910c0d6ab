"""The drain: partition streams into MongoDB, one batch at a time (the trigger is ``storage/trigger.py``,
dead letters ``storage/deadletters.py``, trimming ``storage/maintenance.py``).

The drain is at least once and every write is idempotent (docs/adr/0003): an entry is acknowledged
(XACK) only after its effect is in MongoDB, and applying an entry twice, or an older entry after a newer
one, changes nothing. So a killed worker, a redelivered batch or two workers on one partition are harmless.

A batch is read here (new entries and reclaimed ones), parsed by its type's rule (``storage/rules.py``,
``EVENT_RULES``: docs/adr/0029), written with one command per kind (``storage/writes.py``; the buckets,
``storage/buckets.py``), then settled: acknowledged, dead-lettered or left pending, and counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from mongoengine.connection import get_db

from core.bus import BusSync, bus_sync
from core.entries import MalformedEntry, event_decode
from core.errors import Retryable
from core.keys import (
    GROUP,
    RATE_BUCKET_S,
    RATE_WINDOW_S,
    drain_lease_key,
    failures_key,
    persisted_key,
    rate_key,
    stats_key,
    stream_key,
)
from core.values import as_str
from storage.buckets import Tails, buckets_write, tail_flush, tails_idle, tails_load, tails_save
from storage.conversation_state import conversation_states_put, conversation_states_take
from storage.deadletters import deadletter_add, storable
from storage.mention_replay import mentions_replay
from storage.mongo import messages_indexes_settle
from storage.rules import Item, Seen, event_parse, rule_of
from storage.search_index import search_index_write
from storage.selectors import entry_key, partitions_state
from storage.writes import TRANSIENT_MONGO, conversation_ops, insert_new, insert_versions, message_ops, updates_write

logger = logging.getLogger("chatstream.storage")


_groups_ready: set[str] = set()
# Delete the lease only if it is still ours (it may have expired and been taken by another drain).
# Extend the lease only if it is still ours; 0 means another drain took the partition over.
_LEASE_RENEW_LUA = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
                    "end return 0")
_LEASE_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass
class DrainResult:
    partition: int
    read: int = 0  # entries taken this call (new, own pending and reclaimed)
    reclaimed: int = 0  # of which taken over from another consumer
    persisted: int = 0  # entries whose effect is in MongoDB and that are acknowledged
    dead_lettered: int = 0
    deferred: int = 0  # left pending for a later attempt (their write failed, or an edit came first)
    more: bool = False  # more is waiting: the caller should drain again
    busy: bool = False  # another drain holds the partition's lease: nothing was done
    duration_s: float = 0.0


def group_ensure(*, partition: int, client: BusSync | None = None) -> None:
    """Create the ``storage`` consumer group (from the stream's first entry) if missing; idempotent."""
    key = stream_key(partition)
    if key in _groups_ready:
        return
    r = client or bus_sync()
    try:
        r.xgroup_create(key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    _groups_ready.add(key)


def _read_batch(r: BusSync, *, partition: int, consumer: str, batch_size: int) -> tuple[list[Item], int]:
    """Pending entries idle past ``DRAIN_RECLAIM_IDLE_S`` (orphans of dead consumers, entries handed back
    after an outage, deferred ones due for another attempt; XAUTOCLAIM), then new entries, up to
    ``batch_size``, in stream order."""
    key = stream_key(partition)
    items: dict[str, Item] = {}
    reclaimed = 0
    room = batch_size - len(items)
    if room > 0:
        try:
            _, claimed, _deleted = r.xautoclaim(key, GROUP, consumer, int(settings.DRAIN_RECLAIM_IDLE_S * 1000),
                                                "0-0", count=room)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group vanished (FLUSHALL, a restore without it): recreate and start over.
            _groups_ready.discard(key)
            group_ensure(partition=partition, client=r)
            claimed = []
        if claimed:
            ids = [as_str(eid) for eid, _ in claimed]
            counts = {as_str(p["message_id"]): int(p["times_delivered"]) for p in r.xpending_range(
                key, GROUP, min=min(ids, key=entry_key), max=max(ids, key=entry_key), count=len(ids) + 100,
                consumername=consumer)}
            for eid, fields in claimed:
                if as_str(eid) not in items:
                    items[as_str(eid)] = Item(as_str(eid), fields, deliveries=counts.get(as_str(eid), 1))
                    reclaimed += 1
    room = batch_size - len(items)
    if room > 0:
        new: Any = r.xreadgroup(GROUP, consumer, {key: ">"}, count=room)
        for eid, fields in (new[0][1] if new else []):
            items[as_str(eid)] = Item(as_str(eid), fields)
    return sorted(items.values(), key=lambda i: entry_key(i.entry_id)), reclaimed


def _parse(item: Item) -> None:
    """Decode and validate one entry into ``item.event``/``item.doc``; a bad entry is marked dead."""
    if item.fields is None:
        return  # deleted from the stream while pending: nothing to write, only to acknowledge
    if item.deliveries > settings.DRAIN_MAX_DELIVERIES:
        item.dead = f"delivered {item.deliveries} times without being acknowledged (its workers died or hung)"
        return
    try:
        event = event_decode(item.entry_id, item.fields)
        item.conversation, item.doc = event_parse(event)
        item.event = event
    except MalformedEntry as exc:
        item.dead = f"malformed: {exc}"


def _pause_before_ack(partition: int, count: int) -> None:
    if settings.TEST_PAUSE_BEFORE_ACK_S > 0 and count:
        logger.warning("storage.drain paused before ack partition=%d entries=%d seconds=%.1f (test hook)",
                       partition, count, settings.TEST_PAUSE_BEFORE_ACK_S)
        time.sleep(settings.TEST_PAUSE_BEFORE_ACK_S)


def partition_drain(
    *, partition: int, batch_size: int, consumer: str, client: BusSync | None = None
) -> DrainResult:
    """Persist one batch (at most ``batch_size`` entries) of ``partition``'s stream, then acknowledge it.

    Preconditions: MongoDB is connected (``storage.mongo.mongo_connect``). Side effects: takes the
    partition's drain lease (returns ``busy`` at once if another drain holds it); reads as ``consumer`` of
    group ``storage`` (creating it if missing; taking over entries idle on dead consumers); one ``insert``
    of new messages, one ``update`` of edits/deletes/read marks, one ``insert`` of message versions (edit
    history), one ``update`` of conversations; XADD of
    dead letters; XACK of what is persisted or dead-lettered; failure counters; stats; one log line.
    Raises :class:`Retryable` when MongoDB or Redis is away: nothing was acknowledged, and the batch is
    handed back to be taken by the next drain. A write that fails for any other reason is narrowed down to the
    entries that fail alone, which are dead-lettered (at once if they do not encode) or left pending for
    another attempt; the others are written and acknowledged. Any other error leaves the batch pending: it is
    reclaimed after ``DRAIN_RECLAIM_IDLE_S`` and dead-lettered after ``DRAIN_MAX_DELIVERIES`` such failures.
    """
    started = time.monotonic()
    r = client or bus_sync()
    result = DrainResult(partition=partition)
    token = secrets.token_hex(8)
    try:
        # One drain per partition at a time. Correctness does not need it on MongoDB (every write is keyed
        # and guarded), but FerretDB v1 applies an update as read-modify-write without isolation, so two
        # concurrent drains could lose each other's $max or edit (seen in the fault test). The lease lasts
        # DRAIN_RECLAIM_IDLE_S: a drain that held it that long is presumed dead, like its pending entries.
        if not r.set(drain_lease_key(partition), token, nx=True, px=int(settings.DRAIN_RECLAIM_IDLE_S * 1000)):
            result.busy = True
            return result
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    try:
        return _drain_leased(r, partition=partition, batch_size=batch_size, consumer=consumer, result=result,
                             started=started, token=token)
    finally:
        with contextlib.suppress(redis.RedisError):  # if Redis is away, the lease expires by itself
            r.register_script(_LEASE_RELEASE_LUA)(keys=[drain_lease_key(partition)], args=[token])


def _drain_leased(r: BusSync, *, partition: int, batch_size: int, consumer: str, result: DrainResult,
                  started: float, token: str) -> DrainResult:
    try:
        group_ensure(partition=partition, client=r)
        items, result.reclaimed = _read_batch(r, partition=partition, consumer=consumer, batch_size=batch_size)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    result.read = len(items)
    if not items:
        result.duration_s = time.monotonic() - started
        return result
    for item in items:
        _parse(item)
    live = [i for i in items if i.event is not None]
    lease_ms = int(settings.DRAIN_RECLAIM_IDLE_S * 1000)
    if not r.register_script(_LEASE_RENEW_LUA)(keys=[drain_lease_key(partition)], args=[token, lease_ms]):
        # We stalled past the lease and another drain owns the partition now: write nothing (our entries stay
        # pending and are reclaimed by it), so two drains never write one document at once.
        result.busy = True
        return result
    try:
        # The batch's conversations' buckets in progress (docs/adr/0041), saved below before the ack.
        # Read marks' conversations too: the 1:1 read mirror finds a tail's message ids in it.
        conversation_ids = sorted({i.event.conversation_id for i in live if i.event is not None})
        tails = tails_load(r, partition=partition, conversation_ids=conversation_ids)
        # What the guards read of the conversations, as the drain last wrote it (docs/adr/0048): taken out of
        # Redis until this batch's statements are in, so a drain that dies meanwhile leaves it to be read again.
        states = conversation_states_take(r, partition=partition, conversation_ids=conversation_ids)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    try:
        db = get_db()
        messages_indexes_settle(db)  # once per process
        seen = Seen(db, conversations=dict(states))  # the rest read by _id after the inserts below, under the lease
        insert_new(db, live)
        written = buckets_write(db, live, seen=seen, tails=tails)
        search_index_write(db, live, seen=seen, whole=written.whole, in_tails=written.in_tails)
        ops, owners = message_ops(live, seen)
        for group, reason, deterministic in updates_write(db, "messages", ops, owners):
            for owner in group:
                owner.dead, owner.failure = (reason, None) if deterministic else (None, reason)
        # An edit or delete whose message is not in MongoDB yet (a concurrent drain holds the create) is
        # left pending and retried: it would otherwise be lost.
        targets = {i.doc["id"] for i in live if rule_of(i).needs_message and i.failure is None and i.dead is None}
        if targets:
            found = {mid for mid in targets if seen.message(mid) is not None}
            for i in live:
                if (rule_of(i).needs_message and i.doc["id"] not in found
                        and i.failure is None and i.dead is None):
                    i.failure = f"message {i.doc['id']} is not persisted yet"
        insert_versions(db, live)
        ok = [i for i in live if i.failure is None and i.dead is None]
        cops, cowners = conversation_ops(ok, seen)
        failed_conversations: set[Any] = set()
        for group, reason, _det in updates_write(db, "conversations", cops, cowners):
            for owner in group:
                owner.failure = reason
                failed_conversations.add(owner.conversation)
    except TRANSIENT_MONGO as exc:
        _hand_back(r, partition=partition, consumer=consumer, ids=[i.entry_id for i in items])
        r.hincrby(stats_key(partition), "outages", 1)
        raise Retryable(f"mongodb unavailable: {str(exc).split(',')[0]}") from exc

    try:
        # Before the ack: a redelivery of this batch finds what it wrote. A conversation whose statement failed
        # stays without its state (the document as Seen holds it was not written): the next batch reads it.
        conversation_states_put(r, partition=partition, docs={
            cid: doc for cid, doc in seen.conversations.items() if doc is not None and cid not in failed_conversations})
        tails_save(r, tails, marks=recent_persisted_watermarks(items))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    _pause_before_ack(partition, len(items))
    try:
        mentions_replay(r, live, seen)  # before the ack: a crash between the two replays it again
        _settle(r, partition=partition, items=items, result=result)
        recent_persisted_advance(r, partition=partition, items=items, tails=tails)
        state = partitions_state(partitions=[partition], client=r)[0]
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Retryable(f"redis unavailable: {exc}") from exc
    result.more = state.undelivered > 0 or result.read >= batch_size
    result.duration_s = time.monotonic() - started
    logger.info("storage.drain %s", json.dumps({
        "partition": partition, "consumer": consumer, "read": result.read, "reclaimed": result.reclaimed,
        "persisted": result.persisted, "dead_lettered": result.dead_lettered, "deferred": result.deferred,
        "backlog": state.backlog, "lag_s": round(state.lag_s(), 3), "more": result.more,
        "ms": round(result.duration_s * 1000, 1)}))
    return result


def tails_flush_idle(*, partition: int, now_ms: int | None = None, idle_s: float | None = None,
                     client: BusSync | None = None) -> int:
    """Write into the store the buckets in progress (docs/adr/0041) of ``partition``'s conversations idle for
    ``idle_s`` (default ``BUCKET_TAIL_IDLE_S``, at most half the window's TTL: their window, which serves those
    messages, must outlive them), under the partition's drain lease (skipped, 0, when a drain holds it), and
    raise each one's persisted watermark to what the tail held it below (the window may drop those messages
    now). Returns how many. Run by the partition's maintenance (beat's tick, at most once a minute). Raises
    what Redis and pymongo raise."""
    r = client or bus_sync()
    if idle_s is None:
        idle_s = min(float(settings.BUCKET_TAIL_IDLE_S), float(settings.RECENT_TTL_S) / 2)
    idle = tails_idle(r, partition=partition, idle_s=idle_s, now_ms=now_ms)
    if not idle:
        return 0
    token = secrets.token_hex(8)
    if not r.set(drain_lease_key(partition), token, nx=True, px=int(settings.DRAIN_RECLAIM_IDLE_S * 1000)):
        return 0
    try:
        db = get_db()
        marks = {cid: mark for cid in idle
                 if (mark := tail_flush(db, r, partition=partition, conversation_id=cid)) is not None}
        if any(marks.values()):
            r.register_script(_WATERMARK_LUA)(keys=[persisted_key(partition)],
                                              args=[x for cid, m in marks.items() if m for x in (cid, m)])
        return len(marks)
    finally:
        with contextlib.suppress(redis.RedisError):
            r.register_script(_LEASE_RELEASE_LUA)(keys=[drain_lease_key(partition)], args=[token])


# Raise a conversation's persisted watermark, never lower it (drains of one partition run one at a time, but a
# reclaimed old batch may settle after a newer one).
_WATERMARK_LUA = """
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


def recent_persisted_watermarks(items: list[Item], *, caps: dict[str, int] | None = None) -> dict[str, int]:
    """Per conversation of the batch, the seq up to which its events are settled (persisted, or dead-lettered
    and so never in the store): the highest settled seq, or just below the first deferred one; at most its
    ``caps`` entry (below its bucket in progress, whose messages the window must keep: docs/adr/0041)."""
    done: dict[str, int] = {}
    deferred: dict[str, int] = {}
    for i in items:
        if i.event is None or i.event.seq <= 0:
            continue
        cid, seq = i.event.conversation_id, i.event.seq
        if i.failure is not None and i.dead is None:
            deferred[cid] = min(deferred.get(cid, seq), seq)
        else:
            done[cid] = max(done.get(cid, 0), seq)
    marks = {cid: min(top, deferred[cid] - 1) if cid in deferred else top for cid, top in done.items()}
    return {cid: min(top, (caps or {}).get(cid, top)) for cid, top in marks.items()}


def recent_persisted_advance(r: BusSync, *, partition: int, items: list[Item], tails: Tails | None = None) -> None:
    """After a batch is settled: move each of its conversations' persisted watermark
    (``core.keys.persisted_key``) up, so the append script may drop those messages from the
    conversation's recent window (docs/adr/0028), but not into a bucket still in progress (``tails``, docs/adr/0041:
    its messages are in no stored bucket yet). Side effect: one script call on the partition's slot."""
    marks = recent_persisted_watermarks(items, caps=tails.caps() if tails is not None else None)
    if marks:
        args = [x for cid, seq in marks.items() for x in (cid, seq)]
        r.register_script(_WATERMARK_LUA)(keys=[persisted_key(partition)], args=args)


def _hand_back(r: BusSync, *, partition: int, consumer: str, ids: list[str]) -> None:
    """After an outage: keep the entries pending but make them look idle past the reclaim threshold, with
    their delivery count reset, so the next drain on any worker takes them at once and no entry is blamed."""
    try:
        r.xclaim(stream_key(partition), GROUP, consumer, 0, list[Any](ids),
                 idle=int(settings.DRAIN_RECLAIM_IDLE_S * 1000) + 1, retrycount=0, justid=True)
    except redis.RedisError:
        logger.exception("storage.drain could not hand back %d entries of partition %d", len(ids), partition)


def _settle(r: BusSync, *, partition: int, items: list[Item], result: DrainResult) -> None:
    """Dead-letter, acknowledge and count. Dead letters are added before the XACK, so a crash in between
    duplicates a dead letter at worst, never loses an entry."""
    key, fkey = stream_key(partition), failures_key(partition)
    failing = [i for i in items if i.failure is not None and i.dead is None]
    if failing:
        pipe = r.pipeline(transaction=False)
        for i in failing:
            pipe.hincrby(fkey, i.entry_id, 1)
            pipe.hset(fkey, f"{i.entry_id}:why", storable(i.failure or ""))
        counts = pipe.execute()[::2]
        for i, n in zip(failing, counts, strict=True):
            if int(n) >= settings.DRAIN_MAX_ATTEMPTS:
                i.dead = f"failed {n} times; last: {i.failure}"
    dead = [i for i in items if i.dead is not None]
    done = [i for i in items if i.dead is not None or i.failure is None]
    now_ms = int(time.time() * 1000)
    pipe = r.pipeline(transaction=False)
    for i in dead:
        deadletter_add(pipe, partition=partition, entry_id=i.entry_id, fields=i.fields or {}, reason=i.dead or "",
                        now_ms=now_ms)
        logger.warning("storage.deadletter partition=%d entry=%s reason=%s", partition, i.entry_id, i.dead)
    if done:
        pipe.xack(key, GROUP, *[i.entry_id for i in done])
        pipe.hdel(fkey, *[i.entry_id for i in done], *[f"{i.entry_id}:why" for i in done])
    result.dead_lettered = len(dead)
    result.persisted = len(done) - len(dead)
    result.deferred = len(items) - len(done)
    pipe.hincrby(stats_key(partition), "persisted", result.persisted)
    pipe.hincrby(stats_key(partition), "batches", 1)
    if dead:
        pipe.hincrby(stats_key(partition), "dead", len(dead))
    pipe.hset(stats_key(partition), "last_batch_ms", now_ms)
    bucket = rate_key(int(now_ms / 1000 // RATE_BUCKET_S))
    pipe.hincrby(bucket, str(partition), result.persisted)
    pipe.expire(bucket, RATE_WINDOW_S + 2 * RATE_BUCKET_S)
    pipe.execute()


def drain_all(*, batch_size: int, consumer: str, max_batches: int = 100_000,
              partitions: Iterable[int] | None = None) -> int:
    """Drain every partition until nothing is left (for commands and benchmarks, not for tasks); bounded
    by ``max_batches``. Returns how many events were persisted."""
    total = 0
    for p in partitions if partitions is not None else range(int(settings.PARTITIONS)):
        for _ in range(max_batches):
            res = partition_drain(partition=p, batch_size=batch_size, consumer=consumer)
            total += res.persisted
            if res.busy:  # a worker is on it right now: wait for its lease rather than skip the partition
                time.sleep(0.2)
                continue
            if not res.more:
                break
    return total
