"""What the drain keeps in Redis so that a batch reads nothing and writes fewer statements (docs/adr/0048), in
process against the session's real Redis and FerretDB: each conversation's guarded fields (read by ``_id`` once,
then kept by the drain, right after edits, deletes, read marks and redeliveries), taken out while a batch writes
so a drain that dies mid-batch leaves the next one to read the document; and a new message's words indexed with
its bucket when the bucket is written, not one ``search_blocks`` update per message."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import bson
import pytest
import redis
from bson import ObjectId
from mongoengine.connection import get_db

from core.documents import Message
from core.keys import GROUP, conversation_state_key, stream_key
from storage import conversation_state, mongo, services
from storage.rules import Seen
from storage.search_index import COLLECTION, block_id, search_index_write, term_key
from tests.support.storage import (
    append_events,
    conversation_in,
    delete_event,
    drain_partition,
    edit_event,
    new_event,
    read_event,
    redeliver_newest_first,
    send_messages,
)

PARTITION = 15  # no other test module's


def drain(*, consumer: str = "test-state") -> int:
    return drain_partition(PARTITION, consumer=consumer)


def fresh_chat() -> tuple[str, str, str]:
    """A new 1:1 conversation of the partition, its document as the API creates it: (alice, bob, its id)."""
    drain()  # the partition's earlier entries out of the way
    alice, bob, cid = str(ObjectId()), str(ObjectId()), conversation_in(PARTITION)
    get_db().conversations.insert_one({"_id": ObjectId(cid), "type": "single", "room_id": ObjectId(),
                                       "members": [ObjectId(alice), ObjectId(bob)], "last_seq": 0,
                                       "read_cursors": {}})
    return alice, bob, cid


def state(r: redis.Redis, cid: str) -> dict[str, Any] | None:
    raw = r.get(conversation_state_key(PARTITION, cid))
    return None if raw is None else bson.decode(raw)


def as_kept(cid: str) -> dict[str, Any]:
    """The conversation's document as stored, cut to what the drain keeps of it."""
    doc = get_db().conversations.find_one({"_id": ObjectId(cid)})
    assert doc is not None
    return conversation_state.state_of(doc)


@pytest.fixture
def store_commands(monkeypatch: Any) -> Iterator[list[tuple[str, str, Any]]]:
    """Every ``find_one`` and every ``insert``/``update`` command of the drain: (kind, collection, detail)."""
    real_get_db = services.get_db
    seen: list[tuple[str, str, Any]] = []

    class Recording:
        def __init__(self, coll: Any) -> None:
            self.coll = coll

        def __getattr__(self, name: str) -> Any:
            if name == "find_one":
                def read(flt: Any, *args: Any, **kwargs: Any) -> Any:
                    seen.append(("find_one", self.coll.name, flt))
                    return self.coll.find_one(flt, *args, **kwargs)
                return read
            return getattr(self.coll, name)

    class RecordingDb:
        def __init__(self) -> None:
            self.db = real_get_db()

        def __getattr__(self, name: str) -> Any:
            return Recording(getattr(self.db, name))

        def __getitem__(self, name: str) -> Any:
            return Recording(self.db[name])

        def command(self, name: str, *args: Any, **kwargs: Any) -> Any:
            seen.append((name, args[0] if args else "", kwargs.get("updates") or kwargs.get("documents")))
            return self.db.command(name, *args, **kwargs)

    monkeypatch.setattr(services, "get_db", RecordingDb)
    yield seen


def conversation_reads(commands: list[tuple[str, str, Any]]) -> int:
    return sum(1 for kind, coll, _ in commands if kind == "find_one" and coll == "conversations")


def test_a_conversation_is_read_once_then_its_guards_come_from_redis_and_stay_right(
        servers: Any, r: redis.Redis, store_commands: list[tuple[str, str, Any]]) -> None:
    alice, bob, cid = fresh_chat()
    ids = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 3)]
    store_commands.clear()
    drain()
    assert conversation_reads(store_commands) == 1  # its first batch: no state yet
    assert state(r, cid) == as_kept(cid) == {"type": "single", "read_cursors": {},
                                             "lastMessage": {"id": ids[2], "seq": 3}}

    # Later batches: edits and a delete of lastMessage and of an older message, read marks (the 1:1 read
    # mirror starts at the kept cursor), new messages; then everything redelivered newest first.
    store_commands.clear()
    append_events(servers.redis_url, [edit_event(cid, ids[2], "last, edited", alice), read_event(cid, bob, 2)])
    drain()
    more = [a.message_id for a in send_messages(servers.redis_url, cid, alice, 2, prefix="n")]
    append_events(servers.redis_url, [edit_event(cid, more[1], "newest, edited", alice), read_event(cid, bob, 5),
                                      delete_event(cid, ids[0], alice)])
    drain()
    assert conversation_reads(store_commands) == 0
    db = get_db()
    conv = db.conversations.find_one({"_id": ObjectId(cid)})
    assert conv["lastMessage"]["id"] == more[1] and conv["lastMessage"]["content"] == "newest, edited"
    assert conv["read_cursors"] == {bob: 5} and conv["last_seq"] == 8
    msgs = list(db.messages.find({"conversation_id": ObjectId(cid)}).sort("seq", 1))
    assert [m["read_status"] for m in msgs] == ["read"] * 4 + ["sent"] and msgs[0]["deleted"] is True
    assert state(r, cid) == as_kept(cid) == {"type": "single", "read_cursors": {bob: 5},
                                             "lastMessage": {"id": more[1], "seq": 6, "edit_seq": 7}}

    redeliver_newest_first(r, PARTITION, cid)
    append_events(servers.redis_url, [read_event(cid, bob, 1)])
    drain()
    assert db.conversations.find_one({"_id": ObjectId(cid)}) == conv
    assert list(db.messages.find({"conversation_id": ObjectId(cid)}).sort("seq", 1)) == msgs
    assert state(r, cid) == as_kept(cid)
    assert conversation_reads(store_commands) == 0


def test_a_drain_that_dies_after_writing_leaves_the_state_out_and_no_later_batch_undoes_an_edit(
        servers: Any, r: redis.Redis, monkeypatch: Any) -> None:
    """The drain dies between its conversation statements and the ack (the state not put back): a newer batch
    (an edit of the message it made lastMessage) is drained before the dead batch is reclaimed. Kept state that
    survived the crash would show the older lastMessage: the edit would not be mirrored, and the reclaimed
    batch would set the unedited message again. The state was taken out, so the newer batch reads the
    document, and the redelivery changes nothing."""
    alice, _bob, cid = fresh_chat()
    send_messages(servers.redis_url, cid, alice, 3)
    drain()
    assert state(r, cid) is not None
    last = send_messages(servers.redis_url, cid, alice, 1, prefix="last")[0].message_id

    def dies(*_a: Any, **_kw: Any) -> None:
        raise RuntimeError("the worker died here")

    monkeypatch.setattr(services, "conversation_states_put", dies)
    with pytest.raises(RuntimeError):
        services.partition_drain(partition=PARTITION, batch_size=500, consumer="dead-worker")
    monkeypatch.undo()
    conv = get_db().conversations.find_one({"_id": ObjectId(cid)})
    assert conv["lastMessage"]["id"] == last  # written, but not acknowledged
    assert state(r, cid) is None
    assert r.xpending(stream_key(PARTITION), GROUP)["pending"] >= 1

    append_events(servers.redis_url, [edit_event(cid, last, "edited after the crash", alice)])
    drain(consumer="live-worker")  # the dead worker's entry is not idle yet: only the edit is drained
    assert get_db().conversations.find_one({"_id": ObjectId(cid)})["lastMessage"]["content"] == \
        "edited after the crash"
    pending = [p["message_id"] for p in r.xpending_range(stream_key(PARTITION), GROUP, "-", "+", 100,
                                                             consumername="dead-worker")]
    assert len(pending) == 1
    # Its entry idles past the reclaim threshold (as if the worker were gone that long): the next drain takes it.
    r.xclaim(stream_key(PARTITION), GROUP, "dead-worker", 0, pending, idle=10**9)
    drain(consumer="live-worker")
    assert r.xpending(stream_key(PARTITION), GROUP)["pending"] == 0
    conv = get_db().conversations.find_one({"_id": ObjectId(cid)})
    assert conv["lastMessage"]["id"] == last and conv["lastMessage"]["content"] == "edited after the crash"
    assert state(r, cid) == as_kept(cid)


def test_a_new_message_is_indexed_with_its_bucket_not_one_block_update_per_message(
        servers: Any, r: redis.Redis, store_commands: list[tuple[str, str, Any]]) -> None:
    alice, _bob, cid = fresh_chat()
    db = get_db()
    contents = [f"word{i}" + (" walrus" if i == 9 else "") for i in range(40)]
    append_events(servers.redis_url, [new_event(cid, alice, c) for c in contents])
    store_commands.clear()
    drain()
    assert [c for c in store_commands if c[1] == COLLECTION] == []  # every message is in the bucket's tail
    assert db[COLLECTION].find_one({"_id": block_id(cid, 0)}) is None
    # An edit of a message still in the tail is indexed at once, as before (edits are few).
    first = db.messages.find_one({"conversation_id": ObjectId(cid), "seq": 1})
    append_events(servers.redis_url, [edit_event(cid, first["_id"], "now a narwhal", alice)])
    drain()
    block = db[COLLECTION].find_one({"_id": block_id(cid, 0)})
    assert block is not None and block["partial"] is True and int(block["t"][term_key("narwhal")]) == 1
    assert term_key("walrus") not in block["t"]
    # Seqs 42-50 (every event takes a seq) complete bucket 0: written whole, its words with it in one statement.
    store_commands.clear()
    send_messages(servers.redis_url, cid, alice, 9, prefix="fifty")
    drain()
    assert db.message_buckets.find_one({"_id": f"{cid}:0"}) is not None
    assert [(kind, len(detail)) for kind, coll, detail in store_commands if coll == COLLECTION] == \
        [("insert", 1), ("update", 1)]
    block = db[COLLECTION].find_one({"_id": block_id(cid, 0)})
    assert block["partial"] is False
    for word in ("walrus", "word1", "word39", "fifty8", "narwhal"):
        assert int(block["t"][term_key(word)]) == 1, word
    # The next bucket's messages: indexed when its tail is written idle.
    send_messages(servers.redis_url, cid, alice, 2, prefix="otter")
    drain()
    assert term_key("otter0") not in db[COLLECTION].find_one({"_id": block_id(cid, 0)})["t"]
    assert services.tails_flush_idle(partition=PARTITION, idle_s=0) >= 1
    block = db[COLLECTION].find_one({"_id": block_id(cid, 0)})
    assert int(block["t"][term_key("otter0")]) == 2 and int(block["t"][term_key("otter1")]) == 2


def test_a_bucket_written_partial_makes_its_block_untrusted(servers: Any) -> None:
    """A bucket written without its range's first messages (a tail begun after Redis lost one) may hold words
    the index never saw: its block is marked partial, so search reads every bucket of it."""
    db = get_db()
    cid = conversation_in(PARTITION)
    db[COLLECTION].insert_one({"_id": block_id(cid, 0), "conversation_id": ObjectId(cid), "t": {"old": 1},
                               "partial": False})
    doc = {"_id": f"{cid}:1", "conversation_id": ObjectId(cid), "n": 1, "partial": True,
           "m": {"60": {"id": "x", "seq": 60, "content": "Seal here", "deleted": False}}}
    search_index_write(db, [], seen=Seen(db), whole=[doc])
    block = db[COLLECTION].find_one({"_id": block_id(cid, 0)})
    assert block["partial"] is True and int(block["t"]["seal"]) == 2 and int(block["t"]["old"]) == 1


def test_a_sent_message_gets_a_time_ordered_id(servers: Any) -> None:
    """Message ids sort by creation time (``core.documents.message_id_new``), so the drain's ``messages`` inserts
    land at the end of the ``_id`` index; still 32 hex digits, as clients and the API's id checks expect."""
    from tests.api.test_api_mentions_search import group, send
    from tests.support.api import account

    alice, bob = account("alice"), account("bob")
    cid = group(alice, bob)
    ids = []
    for i in range(3):
        ids.append(send(alice, cid, f"ordered {i}")["id"])
        before = time.time_ns()
        while time.time_ns() - before < 2_000_000:  # into the next millisecond (bounded: 2 ms)
            pass
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert abs(int(ids[0][:12], 16) - time.time_ns() // 1_000_000) < 60_000  # its first 12 digits: the time


def test_the_drain_drops_the_sender_index_on_ferretdb_and_keeps_the_unique_one(servers: Any) -> None:
    """A store made before docs/adr/0048 has ``messages``' (sender_id, timestamp) index, which FerretDB maintains
    on every insert and uses for no query: the drain's first batch in a process drops it there (MongoDB keeps and
    creates it: the staff admin's messages by sender). The unique (conversation_id, seq) stays."""
    db = get_db()
    Message.ensure_indexes()  # as mongoengine does on the first use of Message in a process (the API's)
    db.messages.create_index(mongo.SENDER_INDEX)
    mongo.messages_indexes_settle.cache_clear()
    alice, _bob, cid = fresh_chat()
    send_messages(servers.redis_url, cid, alice, 1)
    drain()
    keys = [[tuple(k) for k in spec["key"]] for spec in db.messages.index_information().values()]
    assert [("sender_id", 1), ("timestamp", 1)] not in keys
    assert [("conversation_id", 1), ("seq", 1)] in keys
