"""Buckets written once, when complete (docs/adr/0041), in-process against the session's real Redis and FerretDB:
the bucket in progress lives in Redis (its tail) with edits, deletes and reactions applied; the whole bucket is
inserted once its 50 seqs are persisted; no ``message_buckets`` update is sent for a new message; the window
keeps the tail's messages; redeliveries change nothing; an idle tail is written as it is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bson import ObjectId
from mongoengine.connection import get_db

from core.keys import GROUP, bucket_tail_key, bucket_tails_key, persisted_key, stream_key
from storage import buckets, services
from tests.support.storage import (
    append_events,
    conversation_in,
    delete_event,
    edit_event,
    read_event,
    send_messages,
)

PARTITION = 10  # no other test module's


def drain(partition: int = PARTITION, *, batch_size: int = 500) -> int:
    total = 0
    for _ in range(100):  # bounded: a drain that never ends fails the test instead of hanging it
        res = services.partition_drain(partition=partition, batch_size=batch_size, consumer="test-tails")
        total += res.persisted
        if not res.more:
            return total
    raise AssertionError("the partition never ran empty")


@pytest.fixture
def bucket_commands(monkeypatch: Any) -> Iterator[list[tuple[str, int]]]:
    """Every ``insert``/``update`` command the drain sends to ``message_buckets``: (name, statements)."""
    real_get_db = services.get_db
    seen: list[tuple[str, int]] = []

    class Counting:
        def __init__(self) -> None:
            self.db = real_get_db()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.db, name)

        def command(self, name: str, *args: Any, **kwargs: Any) -> Any:
            if args[:1] == ("message_buckets",):
                seen.append((name, len(kwargs.get("documents") or kwargs.get("updates") or [])))
            return self.db.command(name, *args, **kwargs)

    monkeypatch.setattr(services, "get_db", Counting)
    yield seen


def make_conversation(cid: str, members: list[str]) -> None:
    get_db().conversations.insert_one({"_id": ObjectId(cid), "type": "single", "room_id": ObjectId(),
                                       "members": [ObjectId(m) for m in members], "last_seq": 0})


def tail_of(r: redis.Redis, cid: str) -> buckets.Tail | None:
    tail = buckets.tails_load(r, partition=PARTITION, conversation_ids=[cid]).of[cid]
    if tail is not None:
        tail.entries()
    return tail


def stored(cid: str, n: int) -> dict[str, Any] | None:
    return get_db().message_buckets.find_one({"_id": f"{cid}:{n}"})


def test_a_bucket_is_inserted_once_whole_when_its_range_is_complete_with_every_change_applied(
        servers: Any, r: redis.Redis, bucket_commands: list[tuple[str, int]]) -> None:
    drain()
    alice, bob = str(ObjectId()), str(ObjectId())
    cid = conversation_in(PARTITION)
    make_conversation(cid, [alice, bob])
    ids = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 30)]  # seqs 1..30
    append_events(servers.redis_url, [edit_event(cid, ids[1], "edited", alice),  # seq 31
                                      delete_event(cid, ids[2], alice),  # seq 32
                                      read_event(cid, bob, 10)])  # no seq
    bucket_commands.clear()
    drain(batch_size=7)  # several batches, each with part of the range
    # Nothing in the store yet, not one message_buckets command: the range is in progress, in Redis.
    assert stored(cid, 0) is None and bucket_commands == []
    tail = tail_of(r, cid)
    assert tail is not None and tail.n == 0 and tail.first and sorted(map(int, tail.m)) == list(range(1, 31))
    assert tail.m["2"]["content"] == "edited" and tail.m["2"]["edit_seq"] == 31
    assert tail.m["3"]["deleted"] is True and tail.m["3"]["content"] == ""
    # The window may drop nothing of the range yet: it is in no stored bucket.
    assert int(r.hget(persisted_key(PARTITION), cid) or 0) == 0
    # The 1:1 read mirror found the tail's messages (alice's 1..10 read by bob).
    reads = {m["seq"]: m["read_status"] for m in get_db().messages.find({"conversation_id": ObjectId(cid)})}
    assert [reads[s] for s in range(1, 12)] == ["read"] * 10 + ["sent"]
    append_events(servers.redis_url, [read_event(cid, bob, 20)])  # a batch of a read mark alone
    drain()
    reads = {m["seq"]: m["read_status"] for m in get_db().messages.find({"conversation_id": ObjectId(cid)})}
    assert [reads[s] for s in range(1, 22)] == ["read"] * 20 + ["sent"]

    more = [a.message_id for a in send_messages(servers.redis_url, cid, bob, 22, prefix="b")]  # seqs 33..54
    bucket_commands.clear()
    drain()
    # Bucket 0 (seqs 1..50) inserted once, whole, by one insert; 51..54 are the next tail.
    assert bucket_commands == [("insert", 1)]
    doc = stored(cid, 0)
    assert doc is not None and doc["partial"] is False
    assert sorted(map(int, doc["m"])) == [*range(1, 31), *range(33, 51)]
    assert [doc["m"][str(s)]["id"] for s in range(33, 51)] == more[:18]
    assert doc["m"]["2"]["content"] == "edited" and doc["m"]["3"]["deleted"] is True
    nxt = tail_of(r, cid)
    assert nxt is not None and nxt.n == 1 and sorted(map(int, nxt.m)) == [51, 52, 53, 54]
    assert int(r.hget(persisted_key(PARTITION), cid) or 0) == 50

    # A change of a message of a stored bucket is one update by _id; of the tail, none.
    append_events(servers.redis_url, [edit_event(cid, ids[0], "late edit", alice),
                                      edit_event(cid, more[-1], "tail edit", bob)])
    bucket_commands.clear()
    drain()
    assert bucket_commands == [("update", 1)]
    doc = stored(cid, 0)
    assert doc is not None and doc["m"]["1"]["content"] == "late edit"
    nxt = tail_of(r, cid)
    assert nxt is not None and nxt.m["54"]["content"] == "tail edit"

    # Redelivered in the worst order (newest first): the stored bucket and the tail do not change.
    before, tail_before = stored(cid, 0), tail_of(r, cid)
    entries: Any = r.xrange(stream_key(PARTITION))
    for _eid, fields in reversed(entries):
        if fields[b"c"].decode() == cid:
            r.xadd(stream_key(PARTITION), fields)
    drain()
    assert stored(cid, 0) == before and tail_of(r, cid) == tail_before
    assert stored(cid, 1) is None


def test_an_idle_tail_is_written_as_it_is_and_later_messages_are_set_into_it(
        servers: Any, r: redis.Redis, settings: Any) -> None:
    drain()
    alice = str(ObjectId())
    cid = conversation_in(PARTITION)
    make_conversation(cid, [alice, str(ObjectId())])
    ids = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 12)]
    drain()
    assert stored(cid, 0) is None and r.zscore(bucket_tails_key(PARTITION), cid) is not None
    settings.BUCKET_TAIL_IDLE_S = 1
    far = int(r.zscore(bucket_tails_key(PARTITION), cid) or 0) + 5_000
    assert services.tails_flush_idle(partition=PARTITION, now_ms=far) >= 1
    doc = stored(cid, 0)
    assert doc is not None and doc["partial"] is False and [doc["m"][str(s)]["id"] for s in range(1, 13)] == ids
    assert not r.exists(bucket_tail_key(PARTITION, cid)) and r.zscore(bucket_tails_key(PARTITION), cid) is None
    # Later messages of that range go into the stored bucket (no tail for it), the next range into a tail.
    later = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 40, prefix="later")]  # 13..52
    drain()
    doc = stored(cid, 0)
    assert doc is not None and [doc["m"][str(s)]["id"] for s in range(13, 51)] == later[:38]
    tail = tail_of(r, cid)
    assert tail is not None and tail.n == 1 and sorted(tail.m) == ["51", "52"]


def test_a_range_whose_first_event_came_late_is_partial_until_it_arrives(servers: Any, r: redis.Redis) -> None:
    """A tail begun mid-range (its first seq's event deferred, or Redis lost the tail) may lack messages: it is
    inserted ``partial`` (readers then use ``messages``) and made whole when the first event is persisted."""
    drain()
    alice = str(ObjectId())
    cid = conversation_in(PARTITION)
    make_conversation(cid, [alice, str(ObjectId())])
    sent = send_messages(servers.redis_url, cid, alice, 50)
    # Seq 1 is taken by a worker that dies before writing it: the others are persisted first.
    services.group_ensure(partition=PARTITION, client=r)
    taken: Any = r.xreadgroup(GROUP, "dead-worker", {stream_key(PARTITION): ">"}, count=1)
    assert taken[0][1][0][1][b"c"].decode() == cid
    drain()
    doc = stored(cid, 0)
    assert doc is not None and doc["partial"] is True and "1" not in doc["m"]
    services._hand_back(r, partition=PARTITION, consumer="dead-worker", ids=[taken[0][1][0][0].decode()])
    drain()
    doc = stored(cid, 0)
    assert doc is not None and doc["partial"] is False and doc["m"]["1"]["id"] == sent[0].message_id


def test_with_the_window_off_every_message_is_set_into_its_stored_bucket(servers: Any, r: redis.Redis,
                                                                         settings: Any) -> None:
    settings.RECENT_MESSAGES = 0
    drain()
    alice = str(ObjectId())
    cid = conversation_in(PARTITION)
    make_conversation(cid, [alice, str(ObjectId())])
    ids = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 3)]
    drain()
    doc = stored(cid, 0)
    assert doc is not None and [doc["m"][str(s)]["id"] for s in (1, 2, 3)] == ids
    assert not r.exists(bucket_tail_key(PARTITION, cid))


def test_a_tail_completed_after_buckets_build_stored_its_range_adds_only_what_the_stored_bucket_lacks(
        servers: Any, r: redis.Redis) -> None:
    drain()
    alice = str(ObjectId())
    cid = conversation_in(PARTITION)
    make_conversation(cid, [alice, str(ObjectId())])
    ids = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 30)]
    drain()
    buckets.buckets_build()  # run beside the drain: stores bucket 0 from messages 1..30
    get_db().message_buckets.update_one({"_id": f"{cid}:0"}, {"$set": {"m.1.content": "changed since"}})
    ids += [a.message_id for a in send_messages(servers.redis_url, cid, alice, 20, prefix="more")]
    drain()
    doc = stored(cid, 0)
    assert doc is not None and [doc["m"][str(s)]["id"] for s in range(1, 51)] == ids
    assert doc["m"]["1"]["content"] == "changed since"  # what the stored bucket had is left alone
    assert tail_of(r, cid) is None
