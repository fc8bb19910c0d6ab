"""A master of the message bus fails over (docs/adr/0022): the brokers keep delivering.

A real cluster of 3 masters with a replica each on loopback ports, two real broker processes with the cluster
as their bus. The master that holds a conversation's partition is killed (SIGKILL: another master, then the
seed node of the bus URL); its replica takes over
after the node timeout. The sender's retried message is acknowledged once the new master answers, and the
reader on the other broker gets every message once, in seq order: the hub's reader fails, is restarted by
its supervisor and resumes from its cursor on the new master.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
import redis
import redis.cluster

from chatstream_site.localservers import RedisCluster, Server, Servers
from core.keys import partition_of, seq_key, stream_key
from tests.support.realtime import (
    Broker,
    collect_messages,
    connect_user,
    group_create,
    master_of,
    send_frame,
    send_until_acked,
    user_create,
    wait_until_async,
)

pytestmark = pytest.mark.cluster

# A master silent this long is failed over (the default, 5 s, only makes the test slower).
NODE_TIMEOUT_MS = 2000
# The sender retries its message this long while the partition has no master.
FAILOVER_WAIT_S = 60.0


# The cluster the conftest starts for this module (tests/support/realtime.py, ``cluster``).
REDIS_CLUSTER = {"masters": 3, "replicas": 1, "node_timeout_ms": NODE_TIMEOUT_MS}

def replica_of(cluster: RedisCluster, master: Server) -> Server:
    for node in cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            continue  # killed by an earlier test
        client = redis.Redis(host="127.0.0.1", port=node.port)
        try:
            role: Any = client.execute_command("ROLE")
        finally:
            client.close()
        if role[0] == b"slave" and int(role[2]) == master.port:
            return node
    raise AssertionError(f"no replica of {master.port}")


# Which master dies: one the clients learnt of from the cluster, then the seed node of the URL itself (the
# clients then find the cluster through the nodes they learnt of). In this order: the first failover leaves
# the seed a master with its replica.
VICTIMS = ["another master", "the seed node"]


@pytest.mark.parametrize("victim_kind", VICTIMS)
def test_messages_keep_crossing_brokers_when_a_master_fails_over(servers: Servers, cluster: RedisCluster,
                                                                 brokers: list[Broker], victim_kind: str) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    seed = f"127.0.0.1:{cluster.nodes[0].port}"
    slots = redis.cluster.RedisCluster.from_url(cluster.url)
    try:
        for _ in range(200):
            conv = group_create([alice, bob])
            owner = master_of(slots, conv)
            if (owner == seed) == (victim_kind == "the seed node"):
                break
        else:
            raise AssertionError(f"no conversation on {victim_kind} in 200 tries")
    finally:
        slots.close()
    victim = next(n for n in cluster.nodes if f"127.0.0.1:{n.port}" == owner)
    replica = replica_of(cluster, victim)

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        for i in range(5):
            await sender.send(send_frame(conv, f"before {i}"))
            assert (await sender.recv_type("ack"))["seq"] == i + 1
        before = await collect_messages(reader, conv, 5)

        # Replication is asynchronous: what a master acknowledged in its last moment may be lost with it.
        # This test is about the failover, so the replica holds the five first.
        copy = redis.Redis(host="127.0.0.1", port=replica.port)
        copy.execute_command("READONLY")

        def replicated() -> bool:
            return bool(copy.hget(seq_key(partition_of(conv)), conv) == b"5"
                        and copy.xlen(stream_key(partition_of(conv))) >= 5)

        await wait_until_async(replicated, timeout_s=10, what="the replica to hold the first five")
        copy.close()
        victim.stop(sig=signal.SIGKILL)

        # The client retries with the same client_msg_id until it is acknowledged (docs/protocol.md): errors
        # "unavailable" until the replica is promoted, then one ack.
        frame = await send_until_acked(sender, conv, "after the failover", "after-failover",
                                       within_s=FAILOVER_WAIT_S, pause_s=0.5)
        assert (frame["seq"], frame["duplicate"]) == (6, False), frame

        after = await collect_messages(reader, conv, 1)
        assert [m["seq"] for m in before + after] == [1, 2, 3, 4, 5, 6]
        assert after[0]["content"] == "after the failover"
        # Nothing twice: the restarted reader resumed from its cursor, not from an older position.
        late = [f for f in await reader.recv_during(1.5) if f["type"] == "message.new"]
        assert late == [], late
        # And the sender's own device saw the sixth once as well.
        mine = await collect_messages(sender, conv, 6)
        assert [m["seq"] for m in mine] == [1, 2, 3, 4, 5, 6]
        await sender.close()
        await reader.close()

    asyncio.run(body())
