"""The WebSocket protocol against two real broker processes (daphne), the session's Redis and FerretDB.

Each test talks to the brokers only over WebSockets, as a client would; users and conversations are
created directly as MongoDB documents (the REST API is another issue's), tickets with ``ws_ticket_issue``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from bson import ObjectId

from messaging.streams import partition_of, stream_key
from storage.documents import Conversation, Message, User
from tests.realtime import (
    Broker,
    Client,
    brokers_start,
    connect,
    connect_user,
    group_create,
    ticket_for,
    user_create,
)
from tests.servers import Servers

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Broker]]:
    workdir = tmp_path_factory.mktemp("brokers")
    # A low rate limit keeps the flood test short; every other test stays far below it.
    started = brokers_start(workdir, 2, CHATSTREAM_WS_RATE="20", CHATSTREAM_WS_BURST="60")
    yield started
    for broker in started:
        broker.stop()


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(body())


def send_frame(conversation_id: str, content: str, client_msg_id: str | None = None) -> dict[str, Any]:
    return {"type": "message.send", "conversation_id": conversation_id,
            "client_msg_id": client_msg_id or uuid.uuid4().hex, "content": content}


async def collect_messages(client: Client, conversation_id: str, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = await client.recv_type("message.new")
        if frame["conversation_id"] == conversation_id:
            got.append(frame["message"])
    return got


def test_messages_cross_brokers_in_seq_order_to_every_device(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        alice_phone = await connect_user(brokers[1].url, servers.redis_url, alice)
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        assert reader.ready["user_id"] == bob and reader.ready["session_id"]
        assert conv in reader.ready["conversations"]
        acks = []
        for i in range(30):
            await sender.send(send_frame(conv, f"hello {i}", client_msg_id=f"c{i}"))
            acks.append(await sender.recv_type("ack"))
        assert [a["seq"] for a in acks] == list(range(1, 31))
        assert [a["client_msg_id"] for a in acks] == [f"c{i}" for i in range(30)]
        assert all(a["conversation_id"] == conv and len(a["message_id"]) == 32 for a in acks)
        for client in (reader, alice_phone, sender):
            got = await collect_messages(client, conv, 30)
            assert [m["seq"] for m in got] == list(range(1, 31))
            assert [m["content"] for m in got] == [f"hello {i}" for i in range(30)]
            assert [m["id"] for m in got] == [a["message_id"] for a in acks]
            assert all(m["sender_id"] == alice for m in got)
        for client in (sender, alice_phone, reader):
            await client.close()

    run(body)


def test_retried_client_msg_id_is_one_message(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        await sender.send(send_frame(conv, "once", client_msg_id="retry-me"))
        first = await sender.recv_type("ack")
        await sender.close()
        # The client lost the ack, reconnects elsewhere and retries.
        again = await connect_user(brokers[1].url, servers.redis_url, alice)
        await again.send(send_frame(conv, "once", client_msg_id="retry-me"))
        second = await again.recv_type("ack")
        assert (second["message_id"], second["seq"]) == (first["message_id"], first["seq"])
        assert second["duplicate"] is True
        await again.send(send_frame(conv, "next", client_msg_id="after"))
        await again.recv_type("ack")
        got = await collect_messages(reader, conv, 2)
        assert [(m["seq"], m["content"]) for m in got] == [(1, "once"), (2, "next")]
        await reader.close()
        await again.close()

    run(body)


def test_edit_delete_and_read_reach_the_other_broker(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        await sender.send(send_frame(conv, "tpyo"))
        ack = await sender.recv_type("ack")
        await sender.send({"type": "message.edit", "message_id": ack["message_id"], "content": "typo",
                           "ref": "e1"})
        edit_ack = await sender.recv_type("ack")
        assert edit_ack["ref"] == "e1" and edit_ack["seq"] == 2
        await sender.send({"type": "message.delete", "message_id": ack["message_id"], "ref": "d1"})
        assert (await sender.recv_type("ack"))["seq"] == 3
        await reader.send({"type": "read", "conversation_id": conv, "seq": 1, "ref": "r1"})
        assert (await reader.recv_type("ack"))["read_seq"] == 1
        new = await reader.recv_type("message.new")
        edited = await reader.recv_type("message.edited")
        deleted = await reader.recv_type("message.deleted")
        assert (new["seq"], edited["seq"], deleted["seq"]) == (1, 2, 3)
        assert edited["message"]["id"] == ack["message_id"] and edited["message"]["content"] == "typo"
        assert deleted["message"]["id"] == ack["message_id"]
        read = await sender.recv_type("read.updated")
        assert read == {"type": "read.updated", "conversation_id": conv, "user_id": bob, "seq": 1}
        await reader.close()
        await sender.close()

    run(body)
