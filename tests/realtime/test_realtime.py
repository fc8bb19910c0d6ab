"""The WebSocket protocol against two real broker processes, the session's Redis and FerretDB; every test
that uses the module's brokers runs under both supported ASGI servers (uvicorn, the default, and daphne).

Each test talks to the brokers only over WebSockets, as a client would; users and conversations are
created directly as MongoDB documents (the REST API is another issue's), tickets with ``ws_ticket_issue``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from bson import ObjectId

from chatstream_site.localcluster import wait_until
from chatstream_site.localservers import Servers
from core.documents import Conversation, Message, User
from core.keys import partition_of, stream_key
from tests.support.realtime import (
    RESUMED,
    Broker,
    Client,
    brokers_running,
    brokers_start,
    collect_by_conversation,
    collect_messages,
    connect,
    connect_user,
    group_create,
    groups_in_one_partition,
    messages_cross_brokers,
    resume_returns_exactly_the_missed_events,
    retried_client_msg_id_is_one_message,
    send_frame,
    status_shown,
    ticket_for,
    user_create,
    wait_until_async,
)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def server(request: pytest.FixtureRequest) -> str:
    """The brokers' ASGI server (CHATSTREAM_BROKER_SERVER): the consumer's output path differs per server."""
    return str(request.param)


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory, server: str) -> Iterator[list[Broker]]:
    workdir = tmp_path_factory.mktemp(f"brokers-{server}")
    # A low rate limit keeps the flood test short; every other test stays far below it.
    with brokers_running(workdir, 2, CHATSTREAM_WS_RATE="20", CHATSTREAM_WS_BURST="60",
                         CHATSTREAM_BROKER_SERVER=server) as started:
        yield started


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(body())


def test_messages_cross_brokers_in_seq_order_to_every_device(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    run(lambda: messages_cross_brokers(brokers, servers.redis_url, alice=alice, bob=bob, conversations=[conv]))


def test_retried_client_msg_id_is_one_message(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    run(lambda: retried_client_msg_id_is_one_message(brokers, servers.redis_url, alice=alice, bob=bob,
                                                     conversation=conv))


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


def test_edit_history_is_live_on_the_other_broker_comes_back_on_resume_and_is_readable(
        servers: Servers, brokers: list[Broker]) -> None:
    from api.selectors import message_versions_get

    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        await sender.send(send_frame(conv, "first"))
        mid = (await sender.recv_type("ack"))["message_id"]
        for text in ("second", "third"):
            await sender.send({"type": "message.edit", "message_id": mid, "content": text})
            await sender.recv_type("ack")
        await reader.recv_type("message.new")
        first = await reader.recv_type("message.edited")
        later = await reader.recv_type("message.edited")
        # The first edit carries the original (the start of the history), later ones do not.
        assert first["message"]["original"]["content"] == "first" and first["message"]["original"]["seq"] == 1
        assert later["message"]["original"] is None and later["message"]["content"] == "third"
        await reader.close()
        # A reconnect that resumes from before the edits gets the same events back.
        again = await connect_user(brokers[0].url, servers.redis_url, bob)
        await again.send({"type": "resume", "conversations": {conv: 1}})
        resumed = [await again.recv_type("message.edited") for _ in range(2)]
        assert [e["message"]["original"] and e["message"]["original"]["content"] for e in resumed] == ["first", None]
        await again.close()
        await sender.close()
        found = await asyncio.to_thread(message_versions_get, user_id=bob, message_id=mid)
        assert [(v.seq, v.content) for v in found.versions] == [(1, "first"), (2, "second"), (3, "third")]

    run(body)


def test_resume_returns_exactly_the_missed_events_from_the_stream(servers: Servers,
                                                                  brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    run(lambda: resume_returns_exactly_the_missed_events(brokers, servers.redis_url, alice=alice, bob=bob,
                                                         conversation=conv))


def test_resume_beyond_the_stream_reads_mongodb(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        acks = []
        for i in range(5):
            await sender.send(send_frame(conv, f"old {i}"))
            acks.append(await sender.recv_type("ack"))
        # The drain (another issue) persisted seqs 1..5 and the stream was trimmed past them: simulate both.
        for i, ack in enumerate(acks):
            Message(id=ack["message_id"], conversation_id=ObjectId(conv), seq=ack["seq"],
                    sender_id=ObjectId(alice), content=f"old {i}" if i != 3 else "old 3, edited",
                    edited_at=datetime.now(UTC) if i == 3 else None, timestamp=datetime.now(UTC),
                    client_msg_id=ack["client_msg_id"]).save()
        client = redis.Redis.from_url(servers.redis_url)
        key = stream_key(partition_of(conv))
        entries: Any = client.xrange(key)
        mine = [entry_id for entry_id, fields in entries if fields[b"c"] == conv.encode()]
        assert len(mine) == 5 and client.xdel(key, *mine) == 5
        client.close()
        for i in range(2):
            await sender.send(send_frame(conv, f"new {i}"))
            await sender.recv_type("ack")

        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        await reader.send({"type": "resume", "conversations": {conv: 2}})
        frames = []
        while (frame := await reader.recv_type(*RESUMED))["type"] != "resumed":
            frames.append(frame)
        assert frame["last_seq"] == 7
        assert [(f["seq"], f["message"]["content"], f.get("source")) for f in frames] == [
            (3, "old 2", "archive"), (4, "old 3, edited", "archive"), (5, "old 4", "archive"),
            (6, "new 0", None), (7, "new 1", None)]
        assert "edited_at" in frames[1]["message"] and "edited_at" not in frames[0]["message"]
        await reader.close()
        await sender.close()

    run(body)


BAD_FRAMES: list[tuple[Any, str]] = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "unknown_type"),
    ('"just a string"', "unknown_type"),
    (json.dumps({"type": "no.such.thing"}), "unknown_type"),
    (json.dumps({"type": 7}), "unknown_type"),
    (json.dumps({"content": "no type"}), "unknown_type"),
    (json.dumps({"type": "message.send"}), "invalid"),
    (json.dumps({"type": "message.send", "conversation_id": {"$gt": ""}, "client_msg_id": "a",
                 "content": "x"}), "invalid"),
    (json.dumps({"type": "message.send", "conversation_id": "CONV", "client_msg_id": {"$ne": None},
                 "content": "x"}), "invalid"),
    (json.dumps({"type": "message.send", "conversation_id": "CONV", "client_msg_id": "a",
                 "content": 5}), "invalid"),
    (json.dumps({"type": "message.send", "conversation_id": "CONV", "client_msg_id": "a",
                 "content": "x" * 5000}), "too_large"),
    # Content no store can hold (docs/protocol.md "Content"): a lone surrogate, legal JSON, and U+0000.
    (json.dumps({"type": "message.send", "conversation_id": "CONV", "client_msg_id": "a",
                 "content": "x\ud800y"}), "invalid"),
    (json.dumps({"type": "message.send", "conversation_id": "CONV", "client_msg_id": "a",
                 "content": "x\u0000y"}), "invalid"),
    (json.dumps({"type": "message.edit", "message_id": "f" * 32, "content": "\udfff"}), "invalid"),
    ("[" * 20_000 + "]" * 20_000, "invalid_json"),
    ('{"type": "ping", "x": ' + "[" * 20_000 + "]" * 20_000 + "}", "invalid_json"),
    (json.dumps({"type": "message.send", "conversation_id": "FOREIGN", "client_msg_id": "a",
                 "content": "let me in"}), "not_found"),
    (json.dumps({"type": "message.edit", "message_id": {"$gt": ""}, "content": "x"}), "invalid"),
    (json.dumps({"type": "message.delete", "message_id": "f" * 32}), "not_found"),
    (json.dumps({"type": "read", "conversation_id": "CONV", "seq": "1"}), "invalid"),
    (json.dumps({"type": "typing", "conversation_id": "FOREIGN"}), "not_found"),
    (json.dumps({"type": "resume", "conversations": ["CONV"]}), "invalid"),
    (json.dumps({"type": "resume", "conversations": {"CONV": -1}}), "invalid"),
    (json.dumps({"type": "resume", "conversations": {"FOREIGN": 0}}), "not_found"),
]


def test_bad_input_gets_error_frames_and_the_connection_stays_open(servers: Servers,
                                                                   brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    eve, _ = user_create()
    conv = group_create([alice, bob])
    foreign = group_create([bob, eve])

    async def body() -> None:
        client = await connect_user(brokers[0].url, servers.redis_url, alice)
        bystander = await connect_user(brokers[0].url, servers.redis_url, bob)
        for i, (raw, code) in enumerate(BAD_FRAMES):
            text = raw.replace("CONV", conv).replace("FOREIGN", foreign) if isinstance(raw, str) else raw
            await client.send(text)
            error = await client.recv_type("error", "pong", "ack")
            assert error["type"] == "error" and error["code"] == code, (raw[:80], error)
            assert isinstance(error["message"], str) and "ref" in error
            await client.send({"type": "ping", "ref": f"p{i}"})
            assert await client.recv_type("pong", "error") == {"type": "pong", "ref": f"p{i}"}
        await client.ws.send(b"\x00\x01binary")
        assert (await client.recv_type("error"))["code"] == "invalid"
        # The error echoes the offending frame's ref.
        await client.send({"type": "message.send", "ref": "mine-1", "conversation_id": "x"})
        assert (await client.recv_type("error"))["ref"] == "mine-1"
        # Nothing bad was appended, and the bystander on the same broker noticed nothing but real traffic.
        await client.send(send_frame(conv, "still here"))
        ack = await client.recv_type("ack")
        assert ack["seq"] == 1
        got = await bystander.recv_type("message.new")
        assert (got["seq"], got["message"]["content"]) == (1, "still here")
        assert [f for f in bystander.seen if f["type"] == "error"] == []
        await client.close()
        await bystander.close()

    run(body)


def test_frame_over_64_kib_closes_1009_and_others_carry_on(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        big = await connect_user(brokers[1].url, servers.redis_url, alice)
        other = await connect_user(brokers[1].url, servers.redis_url, bob)
        await big.send(send_frame(conv, "y" * (64 * 1024 + 1)))
        assert await big.recv_closed() == 1009
        # Exactly at the limit is not "over": the frame is read and refused by the content rule instead.
        exact = await connect_user(brokers[1].url, servers.redis_url, alice)
        frame = json.dumps(send_frame(conv, ""))
        await exact.send(frame[:-2] + "z" * (64 * 1024 - len(frame)) + '"}')
        assert (await exact.recv_type("error"))["code"] == "too_large"
        await other.send(send_frame(conv, "fine"))
        assert (await other.recv_type("ack"))["seq"] == 1
        await exact.close()
        await other.close()

    run(body)


def test_flooding_gets_rate_limited_then_closed_4008(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()

    async def body() -> None:
        client = await connect_user(brokers[0].url, servers.redis_url, alice)
        calm = await connect_user(brokers[0].url, servers.redis_url, alice)
        for i in range(300):
            try:
                await client.send({"type": "ping", "ref": i})
            except Exception:
                break
        code = await client.recv_closed()
        assert code == 4008
        answers = [f for f in client.seen]
        pongs = [f for f in answers if f["type"] == "pong"]
        limited = [f for f in answers if f["type"] == "error" and f["code"] == "rate_limited"]
        assert 60 <= len(pongs) < 300 and len(limited) == 10, (len(pongs), len(limited))
        await calm.send({"type": "ping"})
        assert (await calm.recv_type("pong"))["type"] == "pong"
        await calm.close()

    run(body)


def test_bad_missing_or_reused_ticket_closes_4001(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()

    async def body() -> None:
        for ticket in (None, "", "not-a-ticket", "x" * 500):
            client = await connect(brokers[0].url, ticket, expect_ready=False)
            assert (await client.recv())["code"] == "unauthenticated"
            assert await client.recv_closed() == 4001
        ticket = ticket_for(servers.redis_url, alice)
        first = await connect(brokers[0].url, ticket)
        assert first.ready["user_id"] == alice
        again = await connect(brokers[1].url, ticket, expect_ready=False)
        assert await again.recv_closed() == 4001
        await first.close()

    run(body)


def test_presence_flips_when_the_last_device_leaves_and_typing_crosses(servers: Servers,
                                                                       brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        watcher = await connect_user(brokers[1].url, servers.redis_url, bob)
        laptop = await connect_user(brokers[0].url, servers.redis_url, alice)
        online = await watcher.recv_type("presence")
        assert online == {"type": "presence", "user_id": alice, "status": "online"}
        # Redis is the truth (docs/adr/0051): every read shows her online; the connect wrote no users.status.
        assert status_shown(alice) == "online" and User.objects(id=alice).get().status == "offline"
        phone = await connect_user(brokers[1].url, servers.redis_url, alice)

        await watcher.send({"type": "typing", "conversation_id": conv})
        for device in (laptop, phone):
            assert await device.recv_type("typing") == {"type": "typing", "conversation_id": conv, "user_id": bob}
        await laptop.close()
        # Alice is still online on her phone: typing and a ping still go through, and no "offline" came first.
        await phone.send({"type": "typing", "conversation_id": conv})
        assert (await watcher.recv_type("typing", "presence"))["type"] == "typing"
        await phone.close()
        assert await watcher.recv_type("presence") == {"type": "presence", "user_id": alice, "status": "offline"}
        user = User.objects(id=alice).get()
        assert user.status == "offline" and user.last_seen is not None and status_shown(alice) == "offline"
        # Typing never reaches the stream.
        client = redis.Redis.from_url(servers.redis_url)
        entries: Any = client.xrange(stream_key(partition_of(conv)))
        client.close()
        assert [f for _, f in entries if f[b"c"] == conv.encode()] == []
        await watcher.close()

    run(body)


def test_frames_that_broke_the_consumer_are_answered_and_every_exit_is_cleaned_up(servers: Servers,
                                                                                  brokers: list[Broker]) -> None:
    """A frame nested 20,000 deep (RecursionError, not ValueError) and a lone surrogate the broker echoes
    back (a ref, a resume key: no UTF-8) each dropped the socket without the cleanup: the hub kept it and
    presence said online for ever. Now each gets its answer on a connection that keeps working, and the
    close that follows announces the user offline."""
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        watcher = await connect_user(brokers[1].url, servers.redis_url, bob)
        client = await connect_user(brokers[0].url, servers.redis_url, alice)
        assert await watcher.recv_type("presence") == {"type": "presence", "user_id": alice, "status": "online"}
        await client.send("[" * 20_000 + "]" * 20_000)
        error = await client.recv_type("error")
        assert (error["code"], error["details"]) == ("invalid_json", {"reason": "too_deep"})
        await client.send('{"type": "ping", "ref": "\\ud800"}')
        assert await client.recv_type("pong") == {"type": "pong", "ref": "\ud800"}
        await client.send('{"type": "resume", "conversations": {"\\udfff": 0}}')
        error = await client.recv_type("error")
        assert (error["code"], error["details"]) == ("not_found", {"conversation_id": "\udfff"})
        await client.send(send_frame(conv, "still here"))
        assert (await client.recv_type("ack"))["seq"] == 1
        await client.close()
        assert await watcher.recv_type("presence") == {"type": "presence", "user_id": alice, "status": "offline"}
        await watcher.close()

    run(body)


def test_a_server_close_and_a_connection_reset_are_cleaned_up_too(servers: Servers, brokers: list[Broker]) -> None:
    """The other ways a connection ends: the broker closes it (1009, a frame over 64 KiB), and the client's TCP
    connection is reset (RST, no close frame). Each announces the user offline (the cleanup ran)."""
    alice, _ = user_create()
    bob, _ = user_create()
    group_create([alice, bob])

    async def body() -> None:
        watcher = await connect_user(brokers[1].url, servers.redis_url, bob)
        big = await connect_user(brokers[0].url, servers.redis_url, alice)
        assert await watcher.recv_type("presence") == {"type": "presence", "user_id": alice, "status": "online"}
        await big.send("x" * (64 * 1024 + 1))
        assert await big.recv_closed() == 1009
        assert await watcher.recv_type("presence") == {"type": "presence", "user_id": alice, "status": "offline"}

        reader, writer = await asyncio.open_connection("127.0.0.1", brokers[0].port)
        writer.write((f"GET /ws/?ticket={ticket_for(servers.redis_url, alice)} HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{brokers[0].port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      "Origin: http://127.0.0.1\r\n\r\n").encode())
        assert b" 101 " in await asyncio.wait_for(reader.readline(), 20)
        assert await watcher.recv_type("presence") == {"type": "presence", "user_id": alice, "status": "online"}
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
        writer.transport.abort()
        assert await watcher.recv_type("presence") == {"type": "presence", "user_id": alice, "status": "offline"}
        await watcher.close()

    run(body)


def test_a_client_msg_id_reused_in_another_conversation_is_another_message(servers: Servers,
                                                                           brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    first, second = groups_in_one_partition([alice, bob])

    async def body() -> None:
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        acks = []
        for conv in (first, second):
            await sender.send(send_frame(conv, f"one to {conv}", client_msg_id="1"))
            acks.append(await sender.recv_type("ack"))
        assert [(a["conversation_id"], a["seq"], a["duplicate"]) for a in acks] == [
            (first, 1, False), (second, 1, False)]
        assert acks[0]["message_id"] != acks[1]["message_id"]
        got = await collect_by_conversation(reader, {first: 1, second: 1})
        assert [got[c][0]["content"] for c in (first, second)] == [f"one to {first}", f"one to {second}"]
        await reader.close()
        await sender.close()

    run(body)


def test_membership_changes_apply_live(servers: Servers, brokers: list[Broker]) -> None:
    from messaging.membership import membership_changed_sync

    alice, _ = user_create()
    bob, _ = user_create()
    carol, _ = user_create()
    conv = group_create([alice, bob])
    sync_redis = redis.Redis.from_url(servers.redis_url)

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        bob_conn = await connect_user(brokers[1].url, servers.redis_url, bob)
        newcomer = await connect_user(brokers[1].url, servers.redis_url, carol)
        assert conv not in newcomer.ready["conversations"]

        Conversation.objects(id=conv).update_one(push__members=ObjectId(carol))
        membership_changed_sync(sync_redis, user_ids=[carol], conversation_id=conv)
        joined = await newcomer.recv_type("membership")
        assert joined == {"type": "membership", "conversation_id": conv, "status": "joined", "last_seq": 0}
        await sender.send(send_frame(conv, "welcome"))
        assert (await newcomer.recv_type("message.new"))["message"]["content"] == "welcome"
        await newcomer.send(send_frame(conv, "thanks"))
        assert (await newcomer.recv_type("ack"))["seq"] == 2
        assert (await newcomer.recv_type("message.new"))["message"]["content"] == "thanks"

        Conversation.objects(id=conv).update_one(pull__members=ObjectId(carol))
        membership_changed_sync(sync_redis, user_ids=[carol], conversation_id=conv)
        assert await newcomer.recv_type("membership") == {"type": "membership", "conversation_id": conv,
                                                          "status": "left"}
        await sender.send(send_frame(conv, "after you left"))
        # Bob is on carol's broker: once he has the message, the broker has already passed carol by, so
        # her next frame is the pong, not the message.
        assert [(await collect_messages(bob_conn, conv, 3))[-1]["content"]] == ["after you left"]
        await newcomer.send({"type": "ping"})
        nxt = await newcomer.recv_type("pong", "message.new")
        assert nxt["type"] == "pong"
        await newcomer.send(send_frame(conv, "can I still?"))
        assert (await newcomer.recv_type("error"))["code"] == "not_found"
        for c in (sender, bob_conn, newcomer):
            await c.close()

    try:
        run(body)
    finally:
        sync_redis.close()


def test_a_deleted_group_leaves_every_members_live_sockets(servers: Servers, brokers: list[Broker]) -> None:
    from api import services as api_services

    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    group_id = str(Conversation.objects(id=conv).get().room_id)

    async def body() -> None:
        admin = await connect_user(brokers[0].url, servers.redis_url, alice)
        member = await connect_user(brokers[1].url, servers.redis_url, bob)
        assert conv in member.ready["conversations"]
        await admin.send(send_frame(conv, "before"))
        assert (await member.recv_type("message.new"))["message"]["content"] == "before"
        await asyncio.to_thread(api_services.group_delete, user_id=alice, group_id=group_id)
        for conn in (admin, member):
            assert await conn.recv_type("membership") == {"type": "membership", "conversation_id": conv,
                                                          "status": "left"}
        await member.send(send_frame(conv, "after"))
        assert (await member.recv_type("error"))["code"] == "not_found"
        for c in (admin, member):
            await c.close()

    run(body)


def test_killing_a_broker_does_not_disturb_the_others(servers: Servers, brokers: list[Broker],
                                                      tmp_path: Path) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    (doomed,) = brokers_start(tmp_path, 1)

    async def body() -> None:
        victim = await connect_user(doomed.url, servers.redis_url, bob)
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        await sender.send(send_frame(conv, "before"))
        await victim.recv_type("message.new")
        doomed.kill()
        assert await victim.recv_closed() in (None, 1006)
        for i in range(5):
            await sender.send(send_frame(conv, f"after {i}"))
            await sender.recv_type("ack")
        got = await collect_messages(reader, conv, 6)
        assert [m["content"] for m in got] == ["before"] + [f"after {i}" for i in range(5)]
        await sender.close()
        await reader.close()

    try:
        run(body)
    finally:
        doomed.stop()


def test_a_reader_that_stops_reading_is_closed_4009_and_others_get_everything(servers: Servers, server: str,
                                                                              tmp_path: Path) -> None:
    # A broker of its own, without a frame rate limit in the way of the sender; the default 1 MiB send buffer
    # (closed at once above 4 MiB unsent).
    (broker,) = brokers_start(tmp_path, 1, CHATSTREAM_WS_RATE="10000", CHATSTREAM_WS_BURST="10000",
                              CHATSTREAM_BROKER_SERVER=server)
    users = [user_create()[0] for _ in range(3)]
    conv = group_create(users)
    # 400 messages of 4,000 four-byte characters: ~6.4 MB for the stalled reader, more than the kernel's
    # socket buffers can absorb (loopback send buffers autotune up to 4 MB), so the server's buffer fills.
    count, content = 400, "\U0001f600" * 4000

    async def body() -> None:
        # max_queue=1 and a pinned 4 KB receive buffer: the client stops reading once one frame waits unread.
        stalled = await connect(broker.url, ticket_for(servers.redis_url, users[0]), max_queue=1, rcvbuf=4096)
        # The healthy reader reads all the time (no client-side queue limit), concurrently with the sending.
        healthy = await connect(broker.url, ticket_for(servers.redis_url, users[1]), max_queue=None)
        sender = await connect(broker.url, ticket_for(servers.redis_url, users[2]), max_queue=None)
        got: list[dict[str, Any]] = []
        reading = asyncio.ensure_future(collect_messages(healthy, conv, count, got))
        for i in range(count):
            await sender.send(send_frame(conv, content, client_msg_id=f"big-{i}"))
            if i % 40 == 39:
                # The healthy reader shares this process (and its CPU) with the sender: let it catch up every
                # 40 messages (~640 KB), so only the stalled reader can pass the 4 MiB bound.
                await wait_until_async(lambda n=i: len(got) > n - 20 or reading.done(), what="the healthy reader")
        acks = [await sender.recv_type("ack") for _ in range(count)]
        assert sorted(a["seq"] for a in acks) == list(range(1, count + 1))
        got = await reading
        assert [m["seq"] for m in got] == list(range(1, count + 1))
        # The 4009 close frame queues behind what the reader never read, so it usually sees the TCP drop that
        # follows the close handshake timeout instead; either way it was cut off: it never got everything.
        assert await stalled.recv_closed() in (4009, None)
        assert len([f for f in stalled.seen if f["type"] == "message.new"]) < count
        await healthy.close()
        await sender.close()

    try:
        run(body)
    finally:
        broker.stop()


def test_a_backlog_of_a_batch_makes_the_broker_enqueue_a_drain(servers: Servers, tmp_path: Path) -> None:
    from core.keys import drain_lock_key

    (broker,) = brokers_start(tmp_path, 1, CHATSTREAM_BATCH_SIZE="5")
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    partition = partition_of(conv)
    client = redis.Redis.from_url(servers.redis_url)
    client.delete(drain_lock_key(partition))
    queue = "cs:celery:storage"
    queued_before = client.llen(queue)

    async def body() -> None:
        sender = await connect_user(broker.url, servers.redis_url, alice)
        for i in range(6):
            await sender.send(send_frame(conv, f"batch {i}"))
            await sender.recv_type("ack")
        await sender.close()

    try:
        run(body)
        # The size trigger runs in the background of the acks: wait for its lock and its Celery message.
        wait_until(lambda: client.exists(drain_lock_key(partition)), timeout_s=20, what="the drain lock")
        wait_until(lambda: client.llen(queue) > queued_before, timeout_s=20, what="a queued drain task")
    finally:
        # No worker runs here: take back what was queued so later tests' workers do not inherit it.
        client.delete(drain_lock_key(partition))
        client.delete(queue)
        client.close()
        broker.stop()


def test_foreign_origin_is_refused_and_a_missing_one_is_a_non_browser_client(servers: Servers,
                                                                            brokers: list[Broker]) -> None:
    import websockets
    import websockets.exceptions

    alice, _ = user_create()

    async def body() -> None:
        url = f"{brokers[0].url}?ticket={ticket_for(servers.redis_url, alice)}"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(url, origin="https://evil.example")
        assert refused.value.response.status_code == 403
        # The refused handshake did not consume the ticket: it is still good for a proper client.
        ws = await websockets.connect(url)  # no Origin header at all: the gateway's proxy, an app
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.close()

    run(body)


def test_a_websocket_on_another_path_is_refused_and_the_ticket_kept(servers: Servers,
                                                                     brokers: list[Broker]) -> None:
    import websockets
    import websockets.exceptions

    alice, _ = user_create()

    async def body() -> None:
        ticket = ticket_for(servers.redis_url, alice)
        base = brokers[0].url.removesuffix("/ws/")
        for path in ("/ws", "/ws/x/", "/other/"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                await websockets.connect(f"{base}{path}?ticket={ticket}")
            assert refused.value.response.status_code == 403, path
        ws = await websockets.connect(f"{brokers[0].url}?ticket={ticket}")
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.close()

    run(body)


def test_the_gateway_carries_the_websocket_to_a_broker(servers: Servers, tmp_path: Path) -> None:
    """The `make run` cluster: a client on the gateway's /ws/ reaches a broker and gets its own message."""
    from chatstream_site.localcluster import Cluster

    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        cluster.wait_ready()
        url = cluster.url.replace("http://", "ws://") + "/ws/"

        async def body() -> None:
            sender = await connect_user(url, servers.redis_url, alice)
            reader = await connect_user(url, servers.redis_url, bob)
            await sender.send(send_frame(conv, "through the gateway"))
            assert (await sender.recv_type("ack"))["seq"] == 1
            got = await reader.recv_type("message.new")
            assert got["message"]["content"] == "through the gateway"
            await sender.close()
            await reader.close()

        run(body)
    finally:
        cluster.stop()


def test_the_gateways_signed_identity_is_trusted_and_a_forged_one_refused(servers: Servers,
                                                                           brokers: list[Broker]) -> None:
    import websockets

    from core.identity import identity_headers
    from core.tokens import TicketOwner

    alice, _ = user_create()
    signed = identity_headers(owner=TicketOwner(user_id=alice, username="alice"), request_id="req-1")
    headers = [(k.decode(), v.decode()) for k, v in signed] + [("X-Request-Id", "req-1")]
    forged = [(k, v if k != "x-chatstream-user-id" else ObjectId().__str__()) for k, v in headers]

    async def body() -> None:
        ws = await websockets.connect(brokers[1].url, additional_headers=headers)
        assert json.loads(await ws.recv())["user_id"] == alice
        await ws.close()
        # A forged identity is refused even with a good ticket next to it: the headers decide.
        url = f"{brokers[1].url}?ticket={ticket_for(servers.redis_url, alice)}"
        bad = Client(ws=await websockets.connect(url, additional_headers=forged))
        assert await bad.recv_closed() == 4001

    run(body)


def test_a_client_that_vanished_is_noticed_by_the_keepalive_and_announced_offline(
        servers: Servers, server: str, tmp_path: Path) -> None:
    # A broker of its own with a 1 s keepalive (CHATSTREAM_WS_PING_INTERVAL/_TIMEOUT); the vanished client is a
    # raw socket that completes the handshake and then neither reads nor answers pings, as a phone that lost
    # its network (no FIN ever arrives).
    (broker,) = brokers_start(tmp_path, 1, CHATSTREAM_WS_PING_INTERVAL="1", CHATSTREAM_WS_PING_TIMEOUT="1",
                              CHATSTREAM_BROKER_SERVER=server)
    alice, _ = user_create()
    bob, _ = user_create()
    group_create([alice, bob])  # what makes bob one of those told about alice's presence

    async def body() -> None:
        watcher = await connect(broker.url, ticket_for(servers.redis_url, bob))
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        writer.write((f"GET /ws/?ticket={ticket_for(servers.redis_url, alice)} HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{broker.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        status = await asyncio.wait_for(reader.readline(), 20)
        assert b" 101 " in status, status
        online = await watcher.recv_type("presence")
        assert online == {"type": "presence", "user_id": alice, "status": "online"}
        # From here the raw client is silent; only the server's keepalive can tell it is gone.
        offline = await asyncio.wait_for(watcher.recv_type("presence"), 30)
        assert offline == {"type": "presence", "user_id": alice, "status": "offline"}
        writer.close()
        await watcher.close()

    try:
        run(body)
    finally:
        broker.stop()
