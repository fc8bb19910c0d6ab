"""The recent window (docs/adr/0028): REST history sees every acknowledged message, edit and delete in the very
next request, served from Redis for the newest messages and from the store below the window's floor, with no
gap and no duplicate at the seam; the window survives a Redis crash (AOF) and a killed drain; its memory stays
within the budget. Against the session's real Redis and FerretDB (and a private Redis for the crash)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.test import override_settings

from chatstream_site.localservers import Servers, redis_server
from core.keys import GROUP, partition_of, persisted_key, recent_docs_key, recent_key, stream_key
from storage import services as storage
from tests.support.api import Account, account
from tests.support.realtime import Broker, brokers_running, connect_user, send_frame
from tests.support.storage import edit_event, new_event, send_messages, tails_flush

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def single(a: Account, b: Account) -> str:
    return str(a.client.post("/api/v1/chats/single", {"username": b.username}, format="json")
               .json()["conversation_id"])


def send(a: Account, cid: str, content: str) -> dict[str, Any]:
    response = a.client.post(f"/api/v1/conversations/{cid}/messages",
                             {"content": content, "client_msg_id": uuid.uuid4().hex}, format="json")
    assert response.status_code == 201, response.content
    return dict(response.json())


def history(a: Account, cid: str, **query: int) -> dict[str, Any]:
    response = a.client.get(f"/api/v1/conversations/{cid}/messages", query)
    assert response.status_code == 200, response.content
    return dict(response.json())


def drain(partition: int) -> None:
    """The real drain, in this process, until the partition is empty (bounded), then the idle flush of its
    buckets in progress (docs/adr/0041): these tests are about the store below the window."""
    for _ in range(200):
        if not storage.partition_drain(partition=partition, batch_size=500, consumer="window-test").more:
            tails_flush(partition)  # and the buckets in progress, as a day's idleness stores them (ADR 0041)
            return
    raise AssertionError("the drain did not finish")


def floor_of(servers: Servers, cid: str) -> int | None:
    raw = redis.Redis.from_url(servers.redis_url).hget(recent_docs_key(partition_of(cid), cid), "floor")
    return None if raw is None else int(raw)


def walk(a: Account, cid: str, *, limit: int, backwards: bool) -> list[int]:
    """Every seq of the conversation, page by page in one direction (bounded)."""
    seqs: list[int] = []
    query: dict[str, int] = {"limit": limit} if backwards else {"limit": limit, "after_seq": 0}
    for _ in range(1000):
        page = history(a, cid, **query)
        got = [m["seq"] for m in page["results"]]
        seqs = got + seqs if backwards else seqs + got
        if not page["has_more"]:
            return seqs
        query = {"limit": limit, "before_seq": got[0]} if backwards else {"limit": limit, "after_seq": got[-1]}
    raise AssertionError("paging did not end")


def test_a_rest_send_edit_and_delete_are_in_history_in_the_very_next_request() -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    sent = send(alice, cid, "hello")  # nothing drains here: the store has none of it
    page = history(bob, cid)
    assert [(m["id"], m["seq"], m["content"]) for m in page["results"]] == [(sent["id"], 1, "hello")]
    assert page["results"][0]["sender_id"] == alice.id and page["results"][0]["timestamp"] == sent["timestamp"]
    assert alice.client.patch(f"/api/v1/messages/{sent['id']}", {"content": "hello!"}, format="json").status_code == 200
    edited = history(bob, cid)["results"][0]
    assert edited["content"] == "hello!" and edited["edited_at"] is not None
    assert alice.client.delete(f"/api/v1/messages/{sent['id']}").status_code == 200
    assert [(m["seq"], m["deleted"], m["content"]) for m in history(bob, cid)["results"]] == [(1, True, "")]
    # 1:1 read status follows the reader's cursor at once, as the drain mirrors it into the store.
    second = send(alice, cid, "read me")
    assert history(alice, cid)["results"][-1]["read_status"] == "sent"
    read = bob.client.post(f"/api/v1/conversations/{cid}/read", {"seq": second["seq"]}, format="json")
    assert read.status_code == 200
    assert history(alice, cid)["results"][-1]["read_status"] == "read"


def test_pages_across_the_window_and_the_store_have_no_gap_and_no_duplicate(servers: Servers) -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    with override_settings(RECENT_MESSAGES=10):
        first = [send(alice if i % 2 else bob, cid, f"m{i}") for i in range(25)]
        assert floor_of(servers, cid) == 0  # nothing persisted: the window keeps all 25
        drain(partition_of(cid))
        later = [send(alice, cid, f"n{i}") for i in range(12)]
    ids = [m["id"] for m in first + later]
    floor = floor_of(servers, cid)
    # The drain persisted the first 25; the next appends dropped persisted ones down to 10 messages.
    assert floor is not None and 0 < floor < 37
    assert redis.Redis.from_url(servers.redis_url).zcard(recent_key(partition_of(cid), cid)) <= 12 + 10
    for limit in (1, 3, 7, 10, 50):
        assert walk(bob, cid, limit=limit, backwards=True) == list(range(1, 38)), limit
        assert walk(bob, cid, limit=limit, backwards=False) == list(range(1, 38)), limit
    full = history(bob, cid, limit=200)["results"]
    assert [m["id"] for m in full] == ids and [m["content"] for m in full][24:26] == ["m24", "n0"]
    # Pages that start exactly at the seam, on both sides.
    assert [m["seq"] for m in history(bob, cid, before_seq=floor + 1, limit=2)["results"]] == [floor - 1, floor]
    assert [m["seq"] for m in history(bob, cid, after_seq=floor - 1, limit=2)["results"]] == [floor, floor + 1]
    assert [m["seq"] for m in history(bob, cid, after_seq=floor - 2, before_seq=floor + 2)["results"]] == [
        floor - 1, floor, floor + 1]
    # An edit of a message below the window is visible at once, before the drain writes it.
    edit = alice.client.patch(f"/api/v1/messages/{first[1]['id']}", {"content": "old, edited"}, format="json")
    assert edit.status_code == 200
    assert history(bob, cid, after_seq=1, limit=1)["results"][0]["content"] == "old, edited"
    assert bob.client.delete(f"/api/v1/messages/{first[0]['id']}").status_code == 200
    assert history(bob, cid, before_seq=2)["results"][0]["deleted"] is True


def test_a_killed_drain_loses_nothing_the_window_keeps_what_is_not_persisted(servers: Servers,
                                                                              settings: Any) -> None:
    settings.RECENT_MESSAGES = 5
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    r = redis.Redis.from_url(servers.redis_url)
    partition = partition_of(cid)
    drain(partition)  # other tests' entries out of the way
    for i in range(8):
        send(alice, cid, f"a{i}")
    storage.group_ensure(partition=partition, client=r)
    # A worker reads the batch and dies before it writes or acknowledges anything.
    taken: Any = r.xreadgroup(GROUP, "dead-worker", {stream_key(partition): ">"}, count=1000)
    for i in range(8):
        send(alice, cid, f"b{i}")
    assert floor_of(servers, cid) == 0  # nothing persisted, so nothing was dropped past the budget of 5
    assert walk(bob, cid, limit=4, backwards=True) == list(range(1, 17))
    # Its entries have been idle past the reclaim threshold (as after DRAIN_RECLAIM_IDLE_S): the next drain
    # takes them over.
    storage._hand_back(r, partition=partition, consumer="dead-worker", ids=[e.decode() for e, _ in taken[0][1]])
    drain(partition)
    assert int(r.hget(persisted_key(partition), cid) or 0) == 16
    send(alice, cid, "c")
    assert r.zcard(recent_key(partition, cid)) == 5 and floor_of(servers, cid) == 12
    assert walk(bob, cid, limit=4, backwards=True) == list(range(1, 18))
    assert walk(bob, cid, limit=4, backwards=False) == list(range(1, 18))


def test_watermark_stops_below_a_deferred_entry() -> None:
    from core.entries import Event
    from storage.rules import Item as _Item
    from storage.services import recent_persisted_watermarks

    def item(cid: str, seq: int, *, failure: str | None = None, dead: str | None = None) -> _Item:
        it = _Item(entry_id=f"1-{seq}", fields={}, failure=failure, dead=dead)
        it.event = Event(entry_id=it.entry_id, type="message.new", conversation_id=cid, seq=seq, data={})
        return it

    marks = recent_persisted_watermarks([item("a", 1), item("a", 2, failure="x"), item("a", 3),
                                         item("b", 4), item("b", 5, dead="poison"), item("c", 6, failure="x")])
    assert marks == {"a": 1, "b": 5}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    server = redis_server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_window_survives_a_redis_crash_with_aof(private_redis: Any) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    cid, sender = "6650f0c0a1b2c3d4e5f60718", "6650f0c0a1b2c3d4e5f60719"
    sent = send_messages(url, cid, sender, 3)
    from tests.support.storage import append_events

    append_events(url, [edit_event(cid, sent[1].message_id, "edited", sender)])
    private_redis.stop(sig=signal.SIGKILL)
    private_redis.start()
    r = redis.Redis.from_url(url)
    p = partition_of(cid)
    assert [m.decode() for m in r.zrange(recent_key(p, cid), 0, -1)] == [s.message_id for s in sent]
    assert r.hget(recent_docs_key(p, cid), "floor") == b"0"
    assert b'"content":"edited"' in (r.hget(recent_docs_key(p, cid), sent[1].message_id) or b"")
    assert append_events(url, [new_event(cid, sender, "after")])[0].seq == 5


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with brokers_running(tmp_path_factory.mktemp("window-broker"), 1) as started:
        yield started[0]


@pytest.mark.cluster
def test_a_websocket_send_is_in_rest_history_in_the_next_request_after_its_ack(servers: Servers,
                                                                                 broker: Broker) -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)

    async def over_ws() -> dict[str, Any]:
        client = await connect_user(broker.url, servers.redis_url, alice.id)
        try:
            await client.send(send_frame(cid, "over the socket"))
            return await client.recv_type("ack")
        finally:
            await client.close()

    ack = asyncio.run(over_ws())
    page = history(bob, cid)["results"]
    assert [(m["seq"], m["content"], m["sender_id"]) for m in page] == [(ack["seq"], "over the socket", alice.id)]


# ------------------------------------------------------------------ conversation list and connect from Redis


class StoreRead(AssertionError):
    pass


@pytest.fixture
def no_store_reads(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Call it to make every document-store query from then on fail the test."""
    import pymongo.collection

    def forbid() -> None:
        def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise StoreRead(f"a document-store read of {self.name}: {args!r:.200}")

        for name in ("find", "find_one", "aggregate", "count_documents"):
            monkeypatch.setattr(pymongo.collection.Collection, name, refuse)

    return forbid


def listed(a: Account) -> list[dict[str, Any]]:
    response = a.client.get("/api/v1/conversations", {"limit": 50})
    assert response.status_code == 200, response.content
    return list(response.json()["results"])


def test_the_conversation_list_is_right_the_moment_after_a_send_and_served_from_redis(no_store_reads: Any) -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    ab, ac = single(alice, bob), single(alice, carol)
    group = alice.client.post("/api/v1/chats/group", {"name": "G", "members": [bob.username, carol.username]},
                              format="json").json()["conversation_id"]
    send(bob, ab, "first")
    send(carol, ac, "second")
    send(bob, group, "third")
    assert [c["id"] for c in listed(alice)] == [group, ac, ab]  # warms the caches
    assert len(listed(bob)) == 2
    no_store_reads()
    send(bob, ab, "newest")  # nothing drained: the store knows none of these messages
    mine = listed(alice)
    assert [c["id"] for c in mine] == [ab, group, ac]
    top = mine[0]
    assert top["last_message"]["content"] == "newest" and top["last_message"]["sender_id"] == bob.id
    assert top["last_seq"] == 2 and top["unread"] == 2 and top["title"] == bob.username
    assert mine[1]["title"] == "G" and mine[1]["unread"] == 1
    assert alice.client.post(f"/api/v1/conversations/{ab}/read", {"seq": 1}, format="json").status_code == 200
    assert listed(alice)[0]["unread"] == 1
    mid = send(bob, ab, "to be deleted")["id"]
    assert listed(alice)[0]["unread"] == 2
    assert bob.client.delete(f"/api/v1/messages/{mid}").status_code == 200
    assert listed(alice)[0]["unread"] == 1  # a deleted message is not unread
    assert listed(alice)[0]["last_message"]["deleted"] is True
    assert [c["unread"] for c in listed(bob) if c["id"] == ab] == [0]  # own messages never count
    page = alice.client.get(f"/api/v1/conversations/{ab}/messages", {"limit": 2}).json()
    assert [m["content"] for m in page["results"]] == ["newest", ""]


def test_a_new_conversation_is_listed_at_once_and_unread_counts_beyond_the_window(
        servers: Servers, no_messages_reads: Any) -> None:
    alice, bob, dave = account("alice"), account("bob"), account("dave")
    ab = single(alice, bob)
    assert [c["id"] for c in listed(alice)] == [ab]  # the cached list of alice's conversations is warm
    ad = single(dave, alice)  # a membership change through the services drops it
    assert {c["id"] for c in listed(alice)} == {ab, ad}
    with override_settings(RECENT_MESSAGES=5):
        for i in range(12):
            send(bob, ab, f"b{i}")
        drain(partition_of(ab))
        send(alice, ab, "mine")
        for i in range(3):
            send(bob, ab, f"c{i}")
    floor = floor_of(servers, ab)
    assert floor is not None and floor > 2
    # Alice read up to seq 2, below the window: the store counts (2, floor], the window the rest.
    assert alice.client.post(f"/api/v1/conversations/{ab}/read", {"seq": 2}, format="json").status_code == 200
    # The part below the window is counted from the buckets by _id, not by a query of messages (a scan on
    # FerretDB, on every list of a user that far behind).
    no_messages_reads()
    assert next(c for c in listed(alice) if c["id"] == ab)["unread"] == 13
    assert bob.client.get(f"/api/v1/conversations/{ab}").json()["unread"] == 1


@pytest.mark.cluster
def test_a_connect_reads_the_conversations_from_redis(servers: Servers, broker: Broker) -> None:
    from messaging import selectors

    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    assert selectors.user_conversation_ids(user_id=alice.id) == [cid]  # as the API's first read warms it
    raw = redis.Redis.from_url(servers.redis_url).smembers(selectors.user_conversations_key(alice.id))
    assert raw == {cid.encode()}

    async def ready() -> dict[str, Any]:
        client = await connect_user(broker.url, servers.redis_url, alice.id)
        try:
            return dict(client.ready)
        finally:
            await client.close()

    # The broker's connect uses the same cache: a conversation only the cache knows proves where it read.
    fake = "6650f0c0a1b2c3d4e5f6aaaa"
    redis.Redis.from_url(servers.redis_url).sadd(selectors.user_conversations_key(alice.id), fake)
    frame = asyncio.run(ready())
    assert sorted(frame["conversations"]) == sorted([cid, fake])


def test_membership_changes_and_a_rename_show_in_the_cached_lists_at_once() -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    made = alice.client.post("/api/v1/chats/group", {"name": "Team", "members": [bob.username]},
                             format="json").json()
    gid, cid = made["group_id"], made["conversation_id"]
    assert [c["title"] for c in listed(alice)] == ["Team"] and listed(carol) == []  # both cached now
    added = alice.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username}, format="json")
    assert added.status_code in (200, 201), added.content
    assert [c["id"] for c in listed(carol)] == [cid]
    assert sorted(next(c for c in listed(alice) if c["id"] == cid)["members"]) == sorted(
        [alice.id, bob.id, carol.id])
    assert alice.client.patch(f"/api/v1/chats/group/{gid}", {"name": "Team 2"}, format="json").status_code == 200
    assert [c["title"] for c in listed(carol)] == ["Team 2"]
    assert alice.client.delete(f"/api/v1/chats/group/{gid}/members/{carol.id}").status_code == 204
    assert listed(carol) == []
    assert carol.client.get(f"/api/v1/conversations/{cid}/messages").status_code == 404


# ------------------------------------------------------------------ cold history from message_buckets


@pytest.fixture
def no_messages_reads(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Call it to make every query of the ``messages`` collection fail the test (buckets stay readable)."""
    import pymongo.collection

    def forbid() -> None:
        for name in ("find", "find_one", "aggregate", "count_documents"):
            original = getattr(pymongo.collection.Collection, name)

            def refuse(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if self.name == "messages":
                    raise StoreRead(f"a query of messages: {args!r:.200}")
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(pymongo.collection.Collection, name, refuse)

    return forbid


def test_pages_below_the_window_come_from_buckets_by_id_with_edits_applied(servers: Servers,
                                                                            no_messages_reads: Any) -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    with override_settings(RECENT_MESSAGES=5):
        sent = [send(alice, cid, f"m{i}") for i in range(60)]
        drain(partition_of(cid))
        assert alice.client.patch(f"/api/v1/messages/{sent[2]['id']}", {"content": "edited"},
                                  format="json").status_code == 200
        assert alice.client.delete(f"/api/v1/messages/{sent[3]['id']}").status_code == 200
        sent += [send(alice, cid, f"n{i}") for i in range(8)]
        drain(partition_of(cid))
        send(alice, cid, "last")  # drops persisted ones from the window
    no_messages_reads()
    seqs = [m["seq"] for m in history(bob, cid, limit=200)["results"]]
    assert seqs == list(range(1, 61)) + list(range(63, 72)), seqs  # 61, 62: the edit and the delete
    assert walk(bob, cid, limit=7, backwards=True) == seqs
    assert walk(bob, cid, limit=7, backwards=False) == seqs
    old = history(bob, cid, after_seq=2, limit=2)["results"]
    assert [(m["content"], m["deleted"]) for m in old] == [("edited", False), ("", True)]
    assert old[0]["edited_at"] is not None


def test_existing_messages_are_bucketed_by_one_command_and_a_partial_bucket_is_not_trusted(
        servers: Servers, no_messages_reads: Any) -> None:
    from tests.support.api import bulk_messages

    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    bulk_messages(conversation_id=cid, sender_id=bob.id, count=10)  # stored before the buckets existed
    r = redis.Redis.from_url(servers.redis_url)
    from core.keys import seq_key

    r.hset(seq_key(partition_of(cid)), cid, 10)
    with override_settings(RECENT_MESSAGES=2):
        for i in range(5):
            send(alice, cid, f"new{i}")
        drain(partition_of(cid))
        send(alice, cid, "last")
    # The drain created bucket 0 at seq 11: it lacks 1..10, so it is partial and the page reads messages.
    assert [m["seq"] for m in history(bob, cid, before_seq=12)["results"]] == list(range(1, 12))
    from storage.buckets import buckets_build

    assert buckets_build() >= 15
    no_messages_reads()
    assert [m["seq"] for m in history(bob, cid, before_seq=12)["results"]] == list(range(1, 12))
    assert walk(bob, cid, limit=4, backwards=True) == list(range(1, 17))


def test_a_drain_batch_touching_many_conversations_completes(servers: Servers) -> None:
    """FerretDB v1 hangs on an update command of over 100 statements (bench/ferretdb_update_limit.py): a batch
    over 150 conversations (one conversations statement and one bucket statement each) must still persist."""
    from core.documents import MessageBucket
    from tests.support.storage import append_events, conversation_in

    partition = 5
    drain(partition)
    sender = "6650f0c0a1b2c3d4e5f60719"
    cids = [conversation_in(partition) for _ in range(150)]
    append_events(servers.redis_url, [new_event(cid, sender, "hi") for cid in cids])
    result = storage.partition_drain(partition=partition, batch_size=500, consumer="window-test")
    assert result.persisted >= 150 and result.deferred == 0
    assert tails_flush(partition) >= 150  # each one's bucket in progress, stored (docs/adr/0041)
    assert MessageBucket.objects(conversation_id__in=cids[:3]).count() == 3


def test_an_empty_conversation_and_one_whose_seq_redis_lost_are_paged_without_a_messages_query(
        servers: Servers, no_messages_reads: Any) -> None:
    """docs/adr/0036: with no seq in Redis, the stored conversation's last_seq (read by _id) bounds the buckets,
    with or without ``before_seq``; a ``messages`` query would scan the collection on FerretDB."""
    from core.keys import seq_key

    alice, bob = account("alice"), account("bob")
    empty, full = single(alice, bob), single(bob, account("carol"))
    with override_settings(RECENT_MESSAGES=2):
        for i in range(7):
            send(bob, full, f"m{i}")
        drain(partition_of(full))
    r = redis.Redis.from_url(servers.redis_url)
    for key in (recent_key(partition_of(full), full), recent_docs_key(partition_of(full), full)):
        r.delete(key)  # the window expired (a week idle) ...
    r.hdel(seq_key(partition_of(full)), full)  # ... and the seq is gone too (a Redis restored without it)
    no_messages_reads()
    page = history(alice, empty)
    assert page["results"] == [] and page["has_more"] is False
    # Paging back from a seq the conversation never reached is bounded the same way (any member may ask it:
    # it was a scan of ``messages``, seconds at 10k messages and a minute at 1M).
    for before in (2, 10**6):
        page = history(alice, empty, before_seq=before)
        assert page["results"] == [] and page["has_more"] is False
    assert [m["seq"] for m in history(bob, full)["results"]] == list(range(1, 8))
    assert [m["seq"] for m in history(bob, full, after_seq=3)["results"]] == [4, 5, 6, 7]
    assert [m["seq"] for m in history(bob, full, before_seq=10**6)["results"]] == list(range(1, 8))
    assert [m["seq"] for m in history(bob, full, before_seq=5)["results"]] == [1, 2, 3, 4]


def test_a_full_window_stays_within_its_documented_memory_budget(servers: Servers) -> None:
    """docs/storage.md: a window of CHATSTREAM_RECENT_MESSAGES (100) messages with a 60-character text is ~45 KB;
    budgeted at 64 KB per conversation; a user's cached conversation ids a few hundred bytes. Measured with
    MEMORY USAGE on the real keys after 130 sends, a drain and one more send (which drops the persisted excess)."""
    from core.keys import user_conversations_key

    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    for i in range(130):
        send(alice if i % 2 else bob, cid, f"{i:04d} " + "x" * 55)  # 60 characters
    drain(partition_of(cid))
    send(alice, cid, "one more " + "y" * 51)
    r = redis.Redis.from_url(servers.redis_url)
    p = partition_of(cid)
    assert r.zcard(recent_key(p, cid)) == 100
    window = sum(int(r.memory_usage(key) or 0) for key in (recent_key(p, cid), recent_docs_key(p, cid)))
    assert 20_000 < window <= 64 * 1024, window
    assert listed(alice)  # fills the user's conversation-id cache
    assert int(r.memory_usage(user_conversations_key(alice.id)) or 0) <= 512
