"""The streams path on a real 3-master Redis Cluster (docs/adr/0022).

A cluster started by this module on loopback ports holds the message bus (``CHATSTREAM_STREAMS_REDIS_URL``
with ``CHATSTREAM_STREAMS_REDIS_CLUSTER=1``); everything else stays on the session's single Redis. Two real
broker processes run the same cross-broker scenarios as tests/realtime/test_realtime.py, over conversations whose
partitions live on every master; the storage drain persists what was appended on the cluster.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from bson import ObjectId
from mongoengine.connection import get_db

from chatstream_site.localservers import RedisCluster, Servers
from core.bus import bus_async_new
from core.keys import GROUP, partition_of, recent_unread_key, seq_key, stream_key
from messaging import services, streams
from storage import services as storage
from storage.selectors import partitions_state
from tests.support.realtime import (
    Broker,
    group_create,
    master_of,
    messages_cross_brokers,
    resume_returns_exactly_the_missed_events,
    retried_client_msg_id_is_one_message,
    user_create,
)

pytestmark = pytest.mark.cluster

MASTERS = 3


# The cluster the conftest starts for this module (tests/support/realtime.py, ``cluster``).
REDIS_CLUSTER = {"masters": MASTERS}

@pytest.fixture(scope="module")
def cluster_sync(cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    yield client
    client.close()


def conversations_on_every_master(client: redis.cluster.RedisCluster, members: list[str]) -> list[str]:
    """New group conversations of ``members``, at least one per master; fails if the slots say otherwise."""
    masters = {str(node.name) for node in client.get_primaries()}
    assert len(masters) == MASTERS
    found: dict[str, str] = {}
    for _ in range(200):
        conv = group_create(members)
        found.setdefault(master_of(client, conv), conv)
        if len(found) == MASTERS:
            break
    assert set(found) == masters, f"conversations only on {sorted(found)} of {sorted(masters)}"
    return list(found.values())


def assert_on_the_cluster_only(servers: Servers, cluster: redis.cluster.RedisCluster,
                               conversations: list[str], *, last_seq: int) -> None:
    """The conversations' streams and seq counters are on the cluster, and nothing of them on REDIS_URL."""
    single = redis.Redis.from_url(servers.redis_url)
    try:
        for conv in conversations:
            key = seq_key(partition_of(conv))
            assert int(cluster.hget(key, conv) or 0) == last_seq
            assert cluster.xlen(stream_key(partition_of(conv))) > 0
            assert single.hget(key, conv) is None
    finally:
        single.close()


def test_messages_cross_brokers_on_every_master(servers: Servers, cluster_sync: redis.cluster.RedisCluster,
                                                brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conversations = conversations_on_every_master(cluster_sync, [alice, bob])
    asyncio.run(messages_cross_brokers(brokers, servers.redis_url, alice=alice, bob=bob,
                                       conversations=conversations, count=20))
    assert_on_the_cluster_only(servers, cluster_sync, conversations, last_seq=20)


# (scenario on one conversation, the conversation's last seq after it)
ONE_CONVERSATION_SCENARIOS = [
    pytest.param(retried_client_msg_id_is_one_message, 2, id="a retried client_msg_id is one message"),
    pytest.param(resume_returns_exactly_the_missed_events, 10, id="resume returns exactly the missed events"),
]


@pytest.mark.parametrize(("scenario", "last_seq"), ONE_CONVERSATION_SCENARIOS)
def test_cross_broker_scenario_on_every_master(servers: Servers, cluster_sync: redis.cluster.RedisCluster,
                                               brokers: list[Broker], scenario: Callable[..., Awaitable[None]],
                                               last_seq: int) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conversations = conversations_on_every_master(cluster_sync, [alice, bob])
    for conv in conversations:
        asyncio.run(scenario(brokers, servers.redis_url, alice=alice, bob=bob, conversation=conv))
    assert_on_the_cluster_only(servers, cluster_sync, conversations, last_seq=last_seq)


def test_append_without_dedup_key_runs_on_the_cluster(cluster: RedisCluster) -> None:
    """Edits and deletes are not deduplicated: the script's third key must still be in the stream's slot
    (an empty key name is slot 0, a cross-slot error on a cluster)."""
    conversation_id = uuid.uuid4().hex[:24]

    async def body() -> None:
        bus = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
        try:
            first = await streams.event_append(bus, type="message.edited", conversation_id=conversation_id,
                                               payload={"content": "a"}, message_id=uuid.uuid4().hex)
            second = await streams.event_append(
                bus, type="message.deleted", conversation_id=conversation_id, payload={}, message_id="m2",
                meta=(services.message_meta_key("m2"), {"c": conversation_id, "u": "u1", "x": "1"}, 60))
            assert (first.seq, second.seq, first.duplicate, second.duplicate) == (1, 2, False, False)
            assert await bus.hgetall(services.message_meta_key("m2")) == {b"c": conversation_id.encode(),
                                                                          b"u": b"u1", b"x": b"1"}
            assert await bus.xlen(stream_key(partition_of(conversation_id))) >= 2
        finally:
            await bus.aclose()

    asyncio.run(body())


def test_a_fresh_bus_client_serves_concurrent_first_reads(cluster: RedisCluster, settings: Any) -> None:
    """A broker's first per-partition XREADs all start together on a fresh client. redis-py's own asyncio
    cluster client lost some of them for good (a third of fresh clients, measured); the bus client
    (``core.bus.BusCluster``) must not. Twenty fresh clients, eight concurrent first reads each."""
    settings.STREAMS_REDIS_URL, settings.STREAMS_REDIS_CLUSTER = cluster.url, True
    writer = redis.cluster.RedisCluster.from_url(cluster.url)

    async def one_client(run: str) -> dict[str, int]:
        reader = bus_async_new(socket_timeout=10.0)
        keys = [f"{stream_key(p)}:first-use:{run}" for p in range(8)]  # in the partitions' slots, all masters
        got = dict.fromkeys(keys, 0)

        async def read(key: str) -> None:
            reply: Any = await reader.xread({key: "0-0"}, block=3000)  # [[key, entries]] or None
            got[key] = sum(len(stream[1]) for stream in reply or [])

        try:
            tasks = [asyncio.create_task(read(key)) for key in keys]
            await asyncio.sleep(0.05)  # the reads are blocked (or lost) by now
            for key in keys:
                writer.xadd(key, {"n": "1"})
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
        finally:
            await reader.aclose()
        return got

    try:
        for run in range(20):
            got = asyncio.run(one_client(f"{uuid.uuid4().hex[:8]}-{run}"))
            assert set(got.values()) == {1}, f"fresh client {run}: reads that got nothing: {got}"
    finally:
        writer.close()


def test_the_drain_persists_what_was_appended_on_the_cluster_exactly_once(
        servers: Servers, cluster: RedisCluster, cluster_sync: redis.cluster.RedisCluster) -> None:
    """Messages sent through the write path with the cluster as bus (in-process, REDIS_URL for membership)
    are drained from the cluster into MongoDB once, acknowledged, and a second drain writes nothing."""
    alice, _ = user_create()
    bob, _ = user_create()
    conversations = conversations_on_every_master(cluster_sync, [alice, bob])
    per_conversation = 5

    async def send_all() -> None:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        bus = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
        try:
            for conv in conversations:
                for i in range(per_conversation):
                    await services.message_send(client, bus=bus, user_id=alice, conversation_id=conv,
                                                client_msg_id=f"d{i}", content=f"drained {i}")
                # A retry is one message, in MongoDB too.
                again = await services.message_send(client, bus=bus, user_id=alice, conversation_id=conv,
                                                     client_msg_id="d0", content="drained 0")
                assert again.duplicate
        finally:
            await bus.aclose()
            await client.aclose()

    asyncio.run(send_all())
    partitions = sorted({partition_of(c) for c in conversations})
    for _ in range(2):  # the second pass finds nothing new: at most redeliveries, which change nothing
        for p in partitions:
            while True:
                result = storage.partition_drain(partition=p, batch_size=50, consumer="test-cluster",
                                                 client=cluster_sync)
                assert not result.busy
                if not result.more:
                    break
    db = get_db()
    for conv in conversations:
        docs = list(db.messages.find({"conversation_id": ObjectId(conv)}, {"seq": 1, "content": 1}).sort("seq", 1))
        assert [(d["seq"], d["content"]) for d in docs] == [(i + 1, f"drained {i}") for i in range(per_conversation)]
    for state in partitions_state(partitions=partitions, client=cluster_sync):
        assert (state.backlog, state.pending) == (0, 0), state
    for p in partitions:
        assert cluster_sync.xpending(stream_key(p), GROUP)["pending"] == 0


def test_brokers_are_ready_with_the_cluster_as_their_bus(brokers: list[Broker]) -> None:
    # /readyz pings every master of the bus (chatstream_site.health.bus_check); a failing check would be 503.
    for broker in brokers:
        with urllib.request.urlopen(f"http://127.0.0.1:{broker.port}/readyz", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["status"] == "ready"


def test_the_lists_conversation_states_are_read_on_the_cluster(
        servers: Servers, cluster: RedisCluster, cluster_sync: redis.cluster.RedisCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversation list's state script (api/conversation_list.py) runs once per conversation on a cluster
    (their keys live in other slots), with the same answer as the one call of a single Redis: last seq,
    cursor, the window's last message and unread."""
    from api import conversation_list

    alice, _ = user_create()
    bob, _ = user_create()
    conversations = conversations_on_every_master(cluster_sync, [alice, bob])

    async def send_all() -> None:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        bus = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
        try:
            for conv in conversations:
                for i in range(3):
                    await services.message_send(client, bus=bus, user_id=alice, conversation_id=conv,
                                                client_msg_id=f"s{i}", content=f"state {i}")
        finally:
            await bus.aclose()
            await client.aclose()

    asyncio.run(send_all())
    monkeypatch.setattr(conversation_list, "bus_sync", lambda: cluster_sync)
    cursors = [0] * len(conversations)
    for user, unread in ((bob, 3), (alice, 0)):
        states = conversation_list._conversation_states(conversations, user_id=user, card_cursors=cursors)
        assert len(states) == len(conversations)
        for last, cursor, _floor, lastdoc, counted, kind, _was in states:
            assert (int(last), int(cursor), int(counted), kind) == (3, 0, unread, b"e")
            assert json.loads(lastdoc)["content"] == "state 2"
    # A total is kept slot by slot where the state script's provisional value stands (docs/adr/0059), and
    # answered as kept while the last seq and cursor are those.
    for conv in conversations:
        cluster_sync.hset(recent_unread_key(partition_of(conv), conv), bob, "w:3:0:3")
    conversation_list._unread_keep({conv: ("w:3:0:3", "e:3:0:9:1:3:0") for conv in conversations}, user_id=bob)
    states = conversation_list._conversation_states(conversations, user_id=bob, card_cursors=cursors)
    assert [int(counted) for _l, _c, _f, _d, counted, _k, _w in states] == [9] * len(conversations)
