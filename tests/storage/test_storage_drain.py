"""The drain in-process against the session's real Redis and FerretDB: what it writes, idempotency,
poison entries and dead letters, trimming, the enqueue lock and the metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from bson import ObjectId
from mongoengine.connection import get_db

from chatstream_site.localcluster import manage
from chatstream_site.localservers import Servers
from core.documents import Conversation
from core.entries import MalformedEntry, event_decode
from core.keys import DEADLETTERS, GROUP, drain_lock_key, stream_key
from storage import deadletters, maintenance, services, trigger
from storage.selectors import deadletters_list, partitions_state
from tests.support.storage import (
    append_events,
    backlog,
    conversation_in,
    delete_event,
    edit_event,
    new_event,
    read_event,
    redeliver_newest_first,
    send_messages,
)

PARTITION = 3  # any: each test uses fresh conversations and looks only at its own entries


@pytest.fixture(autouse=True)
def _no_poison_left(r: redis.Redis) -> Iterator[None]:
    """The session's streams are shared: remove the undecodable entries a test added (other tests decode
    whole partitions)."""
    yield
    for partition in range(16):
        entries: Any = r.xrange(stream_key(partition))
        for eid, fields in entries:
            try:
                event_decode(eid, fields)
            except MalformedEntry:
                r.xdel(stream_key(partition), eid)


def drain_until_empty(partition: int, *, consumer: str = "test-consumer", batch_size: int = 50) -> int:
    total = 0
    for _ in range(100):  # bounded: a drain that never ends fails the test instead of hanging it
        res = services.partition_drain(partition=partition, batch_size=batch_size, consumer=consumer)
        total += res.persisted
        if not res.more:
            return total
    raise AssertionError("the partition never ran empty")


def make_conversation(cid: str, members: list[str], *, type: str = "single") -> None:
    Conversation(id=ObjectId(cid), type=type, room_id=ObjectId(), members=[ObjectId(m) for m in members]).save()


def test_drain_applies_every_event_type_in_seq_order_and_redelivery_changes_nothing(
        servers: Servers, r: redis.Redis) -> None:
    alice, bob = str(ObjectId()), str(ObjectId())
    cid = conversation_in(PARTITION)
    make_conversation(cid, [alice, bob])
    sent = send_messages(servers.redis_url, cid, alice, 5)
    ids = [a.message_id for a in sent]
    append_events(servers.redis_url, [
        edit_event(cid, ids[1], "first edit", alice),
        edit_event(cid, ids[1], "second edit", alice),
        delete_event(cid, ids[2], alice),
        read_event(cid, bob, 4),
        edit_event(cid, ids[4], "last one, edited", alice),
    ])
    drain_until_empty(PARTITION)

    db = get_db()

    def snapshot() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        msgs = list(db.messages.find({"conversation_id": ObjectId(cid)}).sort("seq", 1))
        return msgs, db.conversations.find_one({"_id": ObjectId(cid)})

    msgs, conv = snapshot()
    assert [m["_id"] for m in msgs] == ids and [m["seq"] for m in msgs] == [1, 2, 3, 4, 5]
    assert msgs[1]["content"] == "second edit" and msgs[1]["edit_seq"] == 7
    assert msgs[2]["deleted"] is True and msgs[2]["content"] == ""
    # 1:1 chat: bob read up to seq 4, so alice's messages 1-4 are read, 5 is not.
    assert [m["read_status"] for m in msgs] == ["read"] * 4 + ["sent"]
    assert conv["last_seq"] == 9 and conv["read_cursors"] == {bob: 4}
    assert conv["lastMessage"]["id"] == ids[4] and conv["lastMessage"]["content"] == "last one, edited"
    assert backlog(r, PARTITION) == 0

    # Redelivery, in the worst order: every entry of this conversation appended again newest first (as
    # reclaims and concurrent drains could interleave them), plus an older read cursor. Nothing may change:
    # no older edit wins, no delete is undone, lastMessage and last_seq do not move back.
    redeliver_newest_first(r, PARTITION, cid)
    append_events(servers.redis_url, [read_event(cid, bob, 2)])
    drain_until_empty(PARTITION)
    assert snapshot() == (msgs, conv)


def test_poison_entries_are_dead_lettered_and_the_entries_behind_them_persist(
        servers: Servers, r: redis.Redis, settings: Any) -> None:
    alice = str(ObjectId())
    cid = conversation_in(PARTITION)
    key = stream_key(PARTITION)
    before = send_messages(servers.redis_url, cid, alice, 3, prefix="before")
    garbage_id = r.xadd(key, {"t": "message.new", "v": "1", "c": cid, "s": "oops", "d": "{"}).decode()
    bad_sender = new_event(cid, "not-an-object-id", "x")
    bad = append_events(servers.redis_url, [bad_sender])[0]
    after = send_messages(servers.redis_url, cid, alice, 3, prefix="after")
    drain_until_empty(PARTITION)

    persisted = {m["_id"] for m in get_db().messages.find({"conversation_id": ObjectId(cid)})}
    assert persisted == {a.message_id for a in before + after}
    letters = {d.entry_id: d for d in deadletters_list(limit=1000)}
    assert "undecodable" in letters[garbage_id].reason
    assert "sender_id" in letters[bad.entry_id].reason
    assert letters[garbage_id].fields["d"] == "{" and letters[garbage_id].partition == PARTITION
    assert backlog(r, PARTITION) == 0  # dead letters are acknowledged: they block nothing

    # Staff see it with the command and can retry it: it comes back through the stream (and, still
    # undecodable, lands in the dead letters again).
    listed = manage("deadletters", "--json")
    assert listed.returncode == 0, listed.stderr
    assert garbage_id in {d["entry_id"] for d in json.loads(listed.stdout)}
    retried = manage("deadletters", "--retry", letters[garbage_id].id)
    assert retried.returncode == 0, retried.stderr
    assert letters[garbage_id].id not in {d.id for d in deadletters_list(limit=1000)}
    drain_until_empty(PARTITION)
    again = [d for d in deadletters_list(limit=1000) if d.fields.get("s") == "oops" and d.fields.get("c") == cid]
    assert len(again) == 1 and again[0].entry_id != garbage_id


def test_an_edit_that_keeps_failing_is_dead_lettered_after_its_attempts_and_can_be_retried(
        servers: Servers, r: redis.Redis, settings: Any) -> None:
    settings.DRAIN_RECLAIM_IDLE_S = 0.05  # retry deferred entries at once
    settings.DRAIN_MAX_ATTEMPTS = 3
    alice = str(ObjectId())
    cid = conversation_in(PARTITION)
    ghost = new_event(cid, alice, "original")
    edit = append_events(servers.redis_url, [edit_event(cid, ghost["message_id"], "edited", alice)])[0]
    attempts = 0
    while edit.entry_id not in {d.entry_id for d in deadletters_list(limit=1000)}:
        attempts += 1
        assert attempts <= 10, "the failing edit was never dead-lettered"
        import time

        time.sleep(0.06)  # past the reclaim threshold, so the deferred entry is taken again
        services.partition_drain(partition=PARTITION, batch_size=50, consumer="test-consumer")
    assert attempts == 3
    letter = next(d for d in deadletters_list(limit=1000) if d.entry_id == edit.entry_id)
    assert "failed 3 times" in letter.reason and "not persisted yet" in letter.reason

    # The message arrives after all (say its create was itself dead-lettered and retried): retrying the edit
    # now applies it.
    append_events(servers.redis_url, [ghost])
    drain_until_empty(PARTITION)
    deadletters.deadletter_retry(id=letter.id)
    drain_until_empty(PARTITION)
    assert get_db().messages.find_one({"_id": ghost["message_id"]})["content"] == "edited"


def test_trim_keeps_unacknowledged_and_recent_entries(servers: Servers, r: redis.Redis, settings: Any) -> None:
    partition = 11
    settings.RESUME_WINDOW_S = 3600
    alice = str(ObjectId())
    cid = conversation_in(partition)
    key = stream_key(partition)
    services.group_ensure(partition=partition)
    drain_until_empty(partition)  # whatever other tests left there
    acked = send_messages(servers.redis_url, cid, alice, 5, prefix="acked")
    drain_until_empty(partition)
    unacked = send_messages(servers.redis_url, cid, alice, 5, prefix="unacked")
    # Read but not acknowledged, as a worker that died mid-batch leaves them.
    r.xreadgroup(GROUP, "dead-worker", {key: ">"}, count=2)
    now_ms = int(r.time()[0]) * 1000

    # Within the resume window nothing goes, acknowledged or not.
    maintenance.partition_trim(partition=partition, now_ms=now_ms, approximate=False)
    assert {a.entry_id for a in acked + unacked} <= {e[0].decode() for e in r.xrange(key)}
    # Two windows later only the acknowledged entries may go, every unacknowledged one stays.
    maintenance.partition_trim(partition=partition, now_ms=now_ms + 2 * 3600 * 1000, approximate=False)
    left = {e[0].decode() for e in r.xrange(key)}
    assert not ({a.entry_id for a in acked} & left)
    assert {a.entry_id for a in unacked} <= left
    r.xack(key, GROUP, *[a.entry_id for a in unacked])  # tidy: the session's streams are shared


def test_drain_enqueue_is_deduplicated_per_partition(r: redis.Redis) -> None:
    partition = 7
    r.delete(drain_lock_key(partition))
    assert trigger.drain_enqueue(partition=partition) is True
    assert trigger.drain_enqueue(partition=partition) is False
    assert trigger.drain_enqueue(partition=partition + 1) in (True, False)  # another partition: its own lock
    trigger.drain_release(partition=partition)
    assert trigger.drain_enqueue(partition=partition) is True
    trigger.drain_release(partition=partition)
    # The same from an event loop (the brokers' size trigger).
    assert asyncio.run(trigger.drain_enqueue_async(partition=partition)) is True
    assert asyncio.run(trigger.drain_enqueue_async(partition=partition)) is False
    trigger.drain_release(partition=partition)
    r.delete(drain_lock_key(partition + 1))


def test_metrics_report_backlog_lag_and_rate_per_partition(servers: Servers, r: redis.Redis) -> None:
    from storage.metrics import metrics_text

    partition = 5
    cid = conversation_in(partition)
    services.group_ensure(partition=partition)
    drain_until_empty(partition)
    # What the session's earlier tests left in this partition's stream that the drain keeps deferring (an edit
    # of a message never persisted): counted in the backlog before as after, so the figures are deltas.
    left = partitions_state(partitions=[partition])[0].backlog
    send_messages(servers.redis_url, cid, str(ObjectId()), 4)
    text = metrics_text().decode()
    # The partition's lines and its stream's groups in the message: this assertion failed once in a whole-suite
    # run (session 10) with the figure elided, and passes alone.
    said = [line for line in text.splitlines() if f'partition="{partition}"' in line]
    assert f'chatstream_storage_backlog{{partition="{partition}"}} {float(left + 4)}' in said, (
        left, said, r.xinfo_groups(stream_key(partition)), r.xlen(stream_key(partition)))
    lag = next(line for line in text.splitlines()
               if line.startswith(f'chatstream_storage_drain_lag_seconds{{partition="{partition}"}}'))
    assert float(lag.split()[-1]) >= 0
    state_before = partitions_state(partitions=[partition])[0]
    drain_until_empty(partition)
    text = metrics_text().decode()
    assert f'chatstream_storage_backlog{{partition="{partition}"}} {float(left)}' in text
    if not left:
        assert f'chatstream_storage_drain_lag_seconds{{partition="{partition}"}} 0.0' in text
    assert (f'chatstream_storage_persisted_total{{partition="{partition}"}} '
            f'{float(state_before.persisted + 4)}') in text
    assert "chatstream_storage_persisted_per_second" in text and "chatstream_storage_deadletters" in text
    assert r.exists(DEADLETTERS) in (0, 1)


def test_the_backlog_is_counted_when_redis_cannot_give_the_groups_lag(servers: Servers, r: redis.Redis) -> None:
    """An entry deleted after the group's last delivered one (the tests' XDEL) leaves Redis 7.0 without the
    group's lag: the backlog is then the undelivered entries counted (storage.selectors), not the stream's
    length, which counts the acknowledged entries too (a backlog of 170 for 4 sent, once in a whole-suite run)."""
    partition = 9
    cid = conversation_in(partition)
    services.group_ensure(partition=partition)
    send_messages(servers.redis_url, cid, str(ObjectId()), 2, prefix="acked")
    drain_until_empty(partition)
    left = partitions_state(partitions=[partition])[0].backlog
    sent = send_messages(servers.redis_url, cid, str(ObjectId()), 6)
    assert r.xlen(stream_key(partition)) > left + 6  # acknowledged entries stay until the trim
    r.xdel(stream_key(partition), sent[2].entry_id)
    group = next(g for g in r.xinfo_groups(stream_key(partition)) if g["name"] == GROUP.encode())
    assert group["lag"] is None  # what the code below must not take the stream's length for
    assert partitions_state(partitions=[partition])[0].backlog == left + 5
    drain_until_empty(partition)
    assert partitions_state(partitions=[partition])[0].backlog == left


@pytest.mark.django_db
def test_staff_see_the_pipeline_and_retry_a_dead_letter_in_the_admin(admin_client: Any, client: Any,
                                                                     servers: Servers, r: redis.Redis) -> None:
    cid = conversation_in(PARTITION)
    garbage_id = r.xadd(stream_key(PARTITION), {"t": "message.new", "v": "1", "c": cid, "s": "1", "d": "nope"})
    drain_until_empty(PARTITION)
    letter = next(d for d in deadletters_list(limit=1000) if d.entry_id == garbage_id.decode())

    assert client.get("/admin/storage/").status_code == 302  # anonymous: to the login page
    page = admin_client.get("/admin/storage/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Storage pipeline" in html and letter.id in html and "drain lag" in html
    done = admin_client.post(f"/admin/storage/deadletters/{letter.id}/retry")
    assert done.status_code == 302
    assert letter.id not in {d.id for d in deadletters_list(limit=1000)}
    back: Any = r.xrange(stream_key(PARTITION), min=garbage_id)
    assert any(f[b"d"] == b"nope" and f[b"c"] == cid.encode() for _, f in back)
    assert admin_client.post("/admin/storage/deadletters/0-1/discard").status_code == 302


def test_drain_command_empties_the_partitions_it_is_given(servers: Servers, r: redis.Redis) -> None:
    partition = 13
    cid = conversation_in(partition)
    sent = send_messages(servers.redis_url, cid, str(ObjectId()), 7)
    done = manage("drain", "--partition", str(partition))
    assert done.returncode == 0, done.stderr
    assert "persisted" in done.stdout
    assert backlog(r, partition) == 0
    assert {m["_id"] for m in get_db().messages.find({"conversation_id": ObjectId(cid)})} == \
        {a.message_id for a in sent}
    assert manage("drain", "--partition", "99").returncode != 0


def test_an_entry_whose_workers_keep_dying_is_dead_lettered(servers: Servers, r: redis.Redis, settings: Any) -> None:
    settings.DRAIN_RECLAIM_IDLE_S = 0.05
    settings.DRAIN_MAX_DELIVERIES = 4
    partition = 14
    cid = conversation_in(partition)
    services.group_ensure(partition=partition)
    drain_until_empty(partition)
    killer = send_messages(servers.redis_url, cid, str(ObjectId()), 1, prefix="kills-its-worker")[0]
    key = stream_key(partition)
    r.xreadgroup(GROUP, "victim", {key: ">"}, count=1)
    # Four workers took it and died before acking (XCLAIM sets the delivery count as XAUTOCLAIM would).
    r.xclaim(key, GROUP, "victim", 0, [killer.entry_id], retrycount=4)
    import time

    time.sleep(0.06)
    res = services.partition_drain(partition=partition, batch_size=50, consumer="test-consumer")
    assert res.dead_lettered == 1 and res.reclaimed == 1
    letter = next(d for d in deadletters_list(limit=1000) if d.entry_id == killer.entry_id)
    assert "delivered 5 times" in letter.reason
    assert backlog(r, partition) == 0


def test_the_tick_enqueues_a_drain_only_for_partitions_with_a_backlog(servers: Servers, r: redis.Redis) -> None:
    for p in range(16):
        services.group_ensure(partition=p)
        drain_until_empty(p)
        r.delete(drain_lock_key(p))
    partition = 2
    send_messages(servers.redis_url, conversation_in(partition), str(ObjectId()), 3)
    # (Other tests may have left entries pending on a "dead" consumer: those partitions have a backlog too.)
    expected = {s.partition for s in partitions_state() if s.backlog > 0}
    assert partition in expected
    assert set(trigger.drain_tick(client=r)) == expected
    assert trigger.drain_tick(client=r) == []  # already queued: deduplicated
    assert r.ttl(drain_lock_key(partition)) > 0  # and the lock expires should the drain never run
    for p in expected:
        trigger.drain_release(partition=p)
    drain_until_empty(partition)


def test_a_drain_that_lost_its_lease_writes_nothing(servers: Servers, r: redis.Redis, monkeypatch: Any) -> None:
    from core.keys import drain_lease_key

    partition = 12
    services.group_ensure(partition=partition)
    drain_until_empty(partition)
    cid = conversation_in(partition)
    sent = send_messages(servers.redis_url, cid, str(ObjectId()), 3)
    real_parse = services._parse

    def stall_then_parse(item: Any) -> None:  # as if this drain stalled and another took the partition over
        r.set(drain_lease_key(partition), "someone-else", px=60_000)
        real_parse(item)

    monkeypatch.setattr(services, "_parse", stall_then_parse)
    res = services.partition_drain(partition=partition, batch_size=50, consumer="stalled")
    assert res.busy and res.read == 3 and res.persisted == 0
    assert get_db().messages.count_documents({"conversation_id": ObjectId(cid)}) == 0
    assert partitions_state(partitions=[partition])[0].pending == 3  # left for the new owner to reclaim
    assert r.get(drain_lease_key(partition)) == b"someone-else"  # and its lease left alone
    monkeypatch.undo()
    r.delete(drain_lease_key(partition))
    r.xack(stream_key(partition), GROUP, *[a.entry_id for a in sent])  # tidy: the session's streams are shared


# ------------------------------------------------------------------ isolation of a bad entry (issue 11)
#
# Each class of entry that MongoDB cannot take, mixed in one batch with good events of other users and
# conversations: only the bad entry is dead-lettered, with a reason saying what failed, and everything else
# persists once. The entries go in through the real append primitive, as an old entry, a direct XADD or a
# bug of the edge would put them there. What FerretDB really does with each (probed against the session's
# server): a lone surrogate, a NUL byte in a key, an integer over 64 bits and a document over 16 MiB do not
# encode in pymongo (the whole command raises before it is sent); a '$'-prefixed or dotted key, nested
# arrays and +Inf are refused per document (a write error, code 2); NaN makes FerretDB v1 close the
# connection, which looks like an outage until the server answers a ping right after.
BIG = 17 * 1024 * 1024  # over the 16 MiB BSON document limit the server advertises


def _nested_arrays(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_NEW_MESSAGES: dict[str, tuple[dict[str, Any], str, bool]] = {
    # case: (payload fields replaced, text the dead letter's reason holds, dead-lettered at the first attempt)
    "lone-surrogate-in-content": ({"content": "x\ud800y"}, "surrogates not allowed", True),
    "nul-byte-in-a-key": ({"client_msg_id": {"a\x00b": 1}}, "NULL byte", True),
    "integer-over-64-bits": ({"client_msg_id": 2**70}, "8-byte ints", True),
    "document-over-16-mib": ({"content": "x" * BIG}, "too large", True),
    "dollar-key": ({"client_msg_id": {"$where": "1"}}, "must not start with '$'", False),
    "dotted-key": ({"client_msg_id": {"a.b": 1}}, "must not contain '.'", False),
    "nested-arrays": ({"client_msg_id": _nested_arrays(3)}, "nested arrays", False),
    "infinity": ({"client_msg_id": float("inf")}, "infinity", False),
    "nan-closes-the-connection": ({"client_msg_id": float("nan")}, "closed", False),
}


@dataclass
class _Mixed:
    good_convs: list[str]
    good_ids: dict[str, list[str]]  # conversation -> message ids that must persist once
    edited: tuple[str, str]  # (message id, content it must end with)
    bad_entry: str
    bad_conv: str
    reader: tuple[str, str]  # (conversation, user) of a read mark in the batch


def _mixed_batch(redis_url: str, bad: dict[str, Any]) -> _Mixed:
    """Good events of two users in two conversations (messages, an edit, a read mark) around one bad event
    of another conversation, all of one partition: 11 entries, one drain batch."""
    alice, bob = str(ObjectId()), str(ObjectId())
    c1, c2 = conversation_in(PARTITION), conversation_in(PARTITION)
    make_conversation(c1, [alice, bob])
    make_conversation(c2, [bob, alice], type="group")
    first = send_messages(redis_url, c1, alice, 3, prefix="alice")
    accepted = append_events(redis_url, [bad])
    second = send_messages(redis_url, c2, bob, 3, prefix="bob")
    append_events(redis_url, [edit_event(c1, first[0].message_id, "alice edited", alice), read_event(c1, bob, 2)])
    third = send_messages(redis_url, c1, alice, 2, prefix="alice-after")
    return _Mixed([c1, c2], {c1: [a.message_id for a in first + third], c2: [a.message_id for a in second]},
                  (first[0].message_id, "alice edited"), accepted[-1].entry_id, bad["conversation_id"], (c1, bob))


def _drain_until_settled(partition: int, *, rounds: int = 10) -> list[services.DrainResult]:
    """Drain until nothing of the partition is pending or unread; entries left pending after a failure are
    taken again at once (the test sets a tiny reclaim threshold)."""
    results = []
    for _ in range(rounds):  # bounded
        time.sleep(0.06)  # past the reclaim threshold: a deferred entry is due again
        results.append(services.partition_drain(partition=partition, batch_size=100, consumer="test-isolation"))
        if partitions_state(partitions=[partition])[0].backlog == 0:
            return results
    raise AssertionError(f"the partition never settled: {results}")


def _assert_only_the_bad_entry_is_dead(r: redis.Redis, mixed: _Mixed, reason_part: str) -> None:
    db = get_db()
    for cid, ids in mixed.good_ids.items():
        docs = list(db.messages.find({"conversation_id": ObjectId(cid)}))
        assert sorted(d["_id"] for d in docs) == sorted(ids), cid  # each once, none missing
    edited: Any = db.messages.find_one({"_id": mixed.edited[0]})
    assert edited["content"] == mixed.edited[1]
    c1: Any = db.conversations.find_one({"_id": ObjectId(mixed.good_convs[0])})
    assert c1["last_seq"] == 6 and c1["lastMessage"]["id"] == mixed.good_ids[mixed.good_convs[0]][-1]
    assert c1["read_cursors"] == {mixed.reader[1]: 2}
    assert db.messages.count_documents({"conversation_id": ObjectId(mixed.bad_conv)}) == 0
    mine = {*mixed.good_convs, mixed.bad_conv}
    letters = [d for d in deadletters_list(limit=1000) if d.fields.get("c") in mine]
    assert [d.entry_id for d in letters] == [mixed.bad_entry], [(d.entry_id, d.reason) for d in letters]
    assert reason_part in letters[0].reason, letters[0].reason
    assert backlog(r, PARTITION) == 0


@pytest.mark.parametrize("case", list(BAD_NEW_MESSAGES))
def test_a_new_message_the_store_cannot_take_is_dead_lettered_alone_and_the_batch_persists_once(
        case: str, servers: Servers, r: redis.Redis, settings: Any) -> None:
    replaced, reason_part, at_once = BAD_NEW_MESSAGES[case]
    # Retried cases: a deferred entry is taken again at once. (Not for the others: the reclaim threshold is
    # also the drain's lease, and reading a 17 MiB entry may take longer than 50 ms.)
    settings.DRAIN_RECLAIM_IDLE_S = 30 if at_once else 0.05
    settings.DRAIN_MAX_ATTEMPTS = 3
    drain_until_empty(PARTITION)  # whatever other tests left there
    bad = new_event(conversation_in(PARTITION), str(ObjectId()), "bad")
    bad["payload_extra"].update(replaced)
    mixed = _mixed_batch(servers.redis_url, bad)
    try:
        results = _drain_until_settled(PARTITION)
        assert results[0].read == 11 and results[0].persisted == 10  # the good ones, at the first attempt
        assert results[0].dead_lettered == (1 if at_once else 0)
        if not at_once:  # refused by the server: retried like any entry that fails alone, then dead-lettered
            assert sum(res.dead_lettered for res in results) == 1 and len(results) == 3
        _assert_only_the_bad_entry_is_dead(r, mixed, reason_part)
    finally:
        for letter in deadletters_list(limit=1000):
            if letter.entry_id == mixed.bad_entry:
                deadletters.deadletter_discard(id=letter.id)  # (a 17 MiB one would slow every later listing)
        r.xdel(stream_key(PARTITION), mixed.bad_entry)


def test_an_edit_with_unencodable_content_is_dead_lettered_alone(servers: Servers, r: redis.Redis,
                                                                  settings: Any) -> None:
    settings.DRAIN_RECLAIM_IDLE_S = 0.05
    drain_until_empty(PARTITION)
    dave = str(ObjectId())
    c4 = conversation_in(PARTITION)
    make_conversation(c4, [dave, str(ObjectId())])
    target = send_messages(servers.redis_url, c4, dave, 1, prefix="dave")[0]
    drain_until_empty(PARTITION)  # the edited message is in MongoDB, as in the issue
    mixed = _mixed_batch(servers.redis_url, edit_event(c4, target.message_id, "x\ud800y", dave))
    results = _drain_until_settled(PARTITION)
    assert len(results) == 1 and results[0].dead_lettered == 1 and results[0].persisted == 10
    got: Any = get_db().messages.find_one({"_id": target.message_id})
    assert got["content"] == "dave0"  # the edit did not land, the message is intact
    db = get_db()
    for cid, ids in mixed.good_ids.items():
        assert sorted(d["_id"] for d in db.messages.find({"conversation_id": ObjectId(cid)})) == sorted(ids)
    letters = [d for d in deadletters_list(limit=1000) if d.fields.get("c") in {*mixed.good_convs, c4}]
    assert [d.entry_id for d in letters] == [mixed.bad_entry]
    assert "surrogates not allowed" in letters[0].reason and "messages update" in letters[0].reason
    assert backlog(r, PARTITION) == 0


def test_an_invalid_edit_is_dead_lettered_alone(servers: Servers, r: redis.Redis, settings: Any) -> None:
    settings.DRAIN_RECLAIM_IDLE_S = 0.05
    drain_until_empty(PARTITION)
    invalid = edit_event(conversation_in(PARTITION), "no-such-message", "x", str(ObjectId()))
    invalid["payload_extra"]["content"] = 42  # validation: content must be a string
    mixed = _mixed_batch(servers.redis_url, invalid)
    results = _drain_until_settled(PARTITION)
    assert len(results) == 1 and results[0].dead_lettered == 1 and results[0].persisted == 10
    _assert_only_the_bad_entry_is_dead(r, mixed, "'content' is missing or not a string")


def test_isolating_one_bad_entry_in_a_batch_of_64_costs_a_few_commands(
        servers: Servers, r: redis.Redis, monkeypatch: Any) -> None:
    """Bisection, not one command per entry: one bad message among 64 costs 1 + 2·log2(64) inserts."""
    drain_until_empty(PARTITION)
    convs = [conversation_in(PARTITION) for _ in range(8)]
    events = [new_event(convs[i % 8], str(ObjectId()), f"m{i}") for i in range(64)]
    events[37]["payload_extra"]["content"] = "x\ud800y"
    appended = append_events(servers.redis_url, events)
    real_get_db = services.get_db
    inserts: list[int] = []

    class Counting:  # the drain's database, counting the insert commands of messages it is sent
        def __init__(self) -> None:
            self.db = real_get_db()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.db, name)

        def command(self, name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "insert" and args[:1] == ("messages",):  # not the buckets' one insert of shells
                inserts.append(len(kwargs["documents"]))
            return self.db.command(name, *args, **kwargs)

    monkeypatch.setattr(services, "get_db", Counting)
    res = services.partition_drain(partition=PARTITION, batch_size=64, consumer="test-isolation")
    assert (res.read, res.persisted, res.dead_lettered) == (64, 63, 1)
    # The whole batch, then both halves at each level down to the bad message alone (depth first).
    assert sorted(inserts, reverse=True) == [64] + [n for n in (32, 16, 8, 4, 2, 1) for _ in range(2)], inserts
    persisted = {m["_id"] for m in get_db().messages.find({"conversation_id": {"$in": [ObjectId(c) for c in convs]}})}
    assert persisted == {a.message_id for i, a in enumerate(appended) if i != 37}
    assert backlog(r, PARTITION) == 0


def test_a_read_mark_whose_seq_does_not_fit_in_64_bits_is_dead_lettered_alone(
        servers: Servers, r: redis.Redis, settings: Any) -> None:
    """Validation: MongoDB has no integer over 64 bits. Written, the read mark would fail its conversation's
    update, which carries every event of that conversation in the batch."""
    settings.DRAIN_RECLAIM_IDLE_S = 0.05
    drain_until_empty(PARTITION)
    cid = conversation_in(PARTITION)
    make_conversation(cid, [str(ObjectId()), str(ObjectId())])
    mixed = _mixed_batch(servers.redis_url, read_event(cid, str(ObjectId()), 2**70))
    results = _drain_until_settled(PARTITION)
    assert len(results) == 1 and results[0].dead_lettered == 1 and results[0].persisted == 10
    _assert_only_the_bad_entry_is_dead(r, mixed, "does not fit in 64 bits")


def test_every_statement_and_read_of_the_drain_is_keyed_by_id_equality_alone(
        servers: Servers, r: redis.Redis, monkeypatch: Any) -> None:
    """FerretDB v1 pushes only ``_id`` equality down: a filter with anything else (a guard that does not match,
    ``$in``, a conversation's messages) scans the collection (bench/drain_filters.py). So every update statement
    and every read of the drain names one ``_id``, including redeliveries in the worst order, older edits and
    the 1:1 read-status mirror; and the result is still right."""
    drain_until_empty(PARTITION)
    alice, bob = str(ObjectId()), str(ObjectId())
    cid = conversation_in(PARTITION)
    make_conversation(cid, [alice, bob])
    group = conversation_in(PARTITION)
    make_conversation(group, [alice, bob, str(ObjectId())], type="group")
    ids = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 5)]
    send_messages(servers.redis_url, group, alice, 2)
    append_events(servers.redis_url, [
        edit_event(cid, ids[1], "first edit", alice), edit_event(cid, ids[1], "second edit", alice),
        delete_event(cid, ids[2], alice), read_event(cid, bob, 4), read_event(group, bob, 2),
        edit_event(cid, ids[4], "last one, edited", alice)])
    real_get_db = services.get_db
    filters: list[tuple[str, str, Any]] = []

    class Recording:  # a collection that records the filters it is read with
        def __init__(self, coll: Any) -> None:
            self.coll = coll

        def __getattr__(self, name: str) -> Any:
            if name in ("find", "find_one"):
                def read(flt: Any, *args: Any, **kwargs: Any) -> Any:
                    filters.append((name, self.coll.name, flt))
                    return getattr(self.coll, name)(flt, *args, **kwargs)
                return read
            return getattr(self.coll, name)

    class RecordingDb:  # the drain's database, recording every update statement and every read
        def __init__(self) -> None:
            self.db = real_get_db()

        def __getattr__(self, name: str) -> Any:
            return Recording(getattr(self.db, name))

        def command(self, name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "update":
                filters.extend(("update", args[0], s["q"]) for s in kwargs["updates"])
            return self.db.command(name, *args, **kwargs)

    monkeypatch.setattr(services, "get_db", RecordingDb)
    drain_until_empty(PARTITION)
    db = get_db()
    msgs = list(db.messages.find({"conversation_id": ObjectId(cid)}).sort("seq", 1))
    conv = db.conversations.find_one({"_id": ObjectId(cid)})
    assert [m["content"] for m in msgs] == ["m0", "second edit", "", "m3", "last one, edited"]
    assert [m["read_status"] for m in msgs] == ["read"] * 4 + ["sent"]
    assert conv["lastMessage"]["content"] == "last one, edited" and conv["read_cursors"] == {bob: 4}
    # Redelivered newest first, and an older cursor: nothing changes, and still only _id.
    redeliver_newest_first(r, PARTITION, cid)
    append_events(servers.redis_url, [read_event(cid, bob, 2)])
    drain_until_empty(PARTITION)
    assert list(db.messages.find({"conversation_id": ObjectId(cid)}).sort("seq", 1)) == msgs
    assert db.conversations.find_one({"_id": ObjectId(cid)}) == conv

    assert {kind for kind, _, _ in filters} >= {"update", "find_one"}
    not_by_id = [(kind, coll, flt) for kind, coll, flt in filters
                 if set(flt) != {"_id"} or isinstance(flt["_id"], dict)]
    assert not_by_id == []
