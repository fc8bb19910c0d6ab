"""MongoDB away for longer than a drain interval, with real brokers, a real worker and beat: live delivery
goes on, nothing is acknowledged that is not persisted, and once the server is back every message lands once.
"""

from __future__ import annotations

import asyncio

import pymongo
from bson import ObjectId

from chatstream_site.localcluster import wait_until
from chatstream_site.localservers import free_port
from core.keys import partition_of
from tests.storage.test_storage_faults import Rig, assert_exactly_once, rig
from tests.support.realtime import Broker, Client, connect, ticket_for

__all__ = ["rig"]


def conversation_create(rig: Rig, members: list[str]) -> str:
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(rig.mongo_uri)
    try:
        conv = client.get_default_database().conversations.insert_one(
            {"type": "single", "room_id": ObjectId(), "members": [ObjectId(m) for m in members], "last_seq": 0})
        return str(conv.inserted_id)
    finally:
        client.close()


def test_live_delivery_continues_while_mongodb_is_down_and_the_backlog_drains_after(rig: Rig) -> None:
    alice, bob = str(ObjectId()), str(ObjectId())
    cid = conversation_create(rig, [alice, bob])
    env = rig.env()
    brokers = [Broker(port=free_port(), log=rig.tmp / f"broker-{i}.log") for i in (1, 2)]
    for broker in brokers:
        broker.start(**{k: env[k] for k in ("REDIS_URL", "MONGODB_URI", "DEBUG", "CHATSTREAM_FLUSH_INTERVAL",
                                            "CHATSTREAM_MONGODB_TIMEOUT_MS")})
    rig.worker("storage-1")
    rig.beat()
    ids: list[str] = []

    async def send(sender: Client, reader: Client, text: str) -> None:
        await sender.send({"type": "message.send", "conversation_id": cid, "client_msg_id": text, "content": text})
        ack = await sender.recv_type("ack", "error")
        assert ack["type"] == "ack", ack
        ids.append(ack["message_id"])
        delivered = await reader.recv_type("message.new")
        assert delivered["message"]["content"] == text

    async def scenario() -> None:
        a = await connect(brokers[0].url, ticket_for(rig.redis_url, alice))
        b = await connect(brokers[1].url, ticket_for(rig.redis_url, bob))
        try:
            await send(a, b, "before")
            await asyncio.to_thread(wait_until, lambda: len(rig.messages(cid)) == 1, timeout_s=60,
                                    what="the first message to be persisted")
            rig.mongo.stop()
            for i in range(5):
                await send(a, b, f"during-{i}")  # acked by Redis and pushed live across brokers
            await asyncio.sleep(3)  # several flush intervals (0.5 s) of failing drains
        finally:
            await a.close()
            await b.close()

    try:
        asyncio.run(scenario())
        state = rig.state(partition_of(cid))
        assert state.backlog >= 5, state  # nothing acknowledged that is not persisted
        rig.mongo.start()
        wait_until(lambda: len(rig.messages(cid)) == 6, timeout_s=120, interval_s=0.5,
                   what=f"the backlog to drain after the restart; logs:\n{rig.logs()}")
        wait_until(lambda: rig.state(partition_of(cid)).backlog == 0, timeout_s=60, what="backlog zero")
        assert_exactly_once(rig, cid, ids)
    finally:
        for broker in brokers:
            broker.stop()
