"""A partition's slot moves to another master while brokers read and write it (docs/adr/0022).

A real 3-master cluster on loopback ports, two real broker processes with the cluster as their bus. The slot
of a conversation's partition is migrated the way `redis-cli --cluster reshard` does it (SETSLOT IMPORTING /
MIGRATING, MIGRATE of its keys, SETSLOT NODE on every master). The clients follow MOVED: the next messages
are acknowledged (a send that met the move is retried with its client_msg_id) and the reader on the other
broker gets every message once, in seq order, now read from the new owner.
"""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.cluster

from chatstream_site.localservers import RedisCluster, Servers
from core.keys import partition_of, seq_key, stream_key
from tests.support.realtime import (
    Broker,
    collect_messages,
    connect_user,
    group_create,
    master_of,
    send_until_acked,
    user_create,
)

pytestmark = pytest.mark.cluster

# A send that meets the slot in the middle of its move gets "unavailable" (TRYAGAIN, ASK): retried this long.
RETRY_S = 30.0


# The cluster the conftest starts for this module (tests/support/realtime.py, ``cluster``).
REDIS_CLUSTER = {"masters": 3}

def node_client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port)


def slot_move(cluster: RedisCluster, *, slot: int, source: int, target: int) -> int:
    """Move ``slot`` from the master on port ``source`` to the one on ``target``; returns the keys moved."""
    src, dst = node_client(source), node_client(target)
    masters = [node_client(n.port) for n in cluster.nodes]
    try:
        src_id, dst_id = src.execute_command("CLUSTER MYID").decode(), dst.execute_command("CLUSTER MYID").decode()
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for master in masters:
            master.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return moved
    finally:
        for client in (src, dst, *masters):
            client.close()


def test_messages_keep_crossing_brokers_when_their_slot_moves(servers: Servers, cluster: RedisCluster,
                                                              brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    key = stream_key(partition_of(conv))
    slots = redis.cluster.RedisCluster.from_url(cluster.url)
    try:
        slot = slots.keyslot(key)
        source = int(master_of(slots, conv).rsplit(":", 1)[1])
    finally:
        slots.close()
    target = next(n.port for n in cluster.nodes if n.port != source)

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        for i in range(5):
            assert (await send_until_acked(sender, conv, f"before {i}", f"b{i}", within_s=RETRY_S))["seq"] == i + 1
        before = await collect_messages(reader, conv, 5)

        moved = await asyncio.to_thread(slot_move, cluster, slot=slot, source=source, target=target)
        assert moved >= 2  # the stream and the seq counters at least

        acks = [await send_until_acked(sender, conv, f"after {i}", f"a{i}", within_s=RETRY_S) for i in range(5)]
        assert [(a["seq"], a["duplicate"]) for a in acks] == [(i, False) for i in range(6, 11)]
        after = await collect_messages(reader, conv, 5)
        assert [m["seq"] for m in before + after] == list(range(1, 11))
        assert [m["content"] for m in after] == [f"after {i}" for i in range(5)]
        late = [f for f in await reader.recv_during(1.5) if f["type"] == "message.new"]
        assert late == [], late
        await sender.close()
        await reader.close()

    asyncio.run(body())
    # The partition's keys live on the new owner now, and nothing of them stayed behind.
    new, old = node_client(target), node_client(source)
    try:
        assert int(new.hget(seq_key(partition_of(conv)), conv) or 0) == 10
        assert new.xlen(key) >= 10
        assert old.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    finally:
        new.close()
        old.close()
