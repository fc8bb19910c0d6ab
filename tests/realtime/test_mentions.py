"""Mentions through real brokers (two processes), the session's Redis and FerretDB: resolved on send, live on
the other broker, back on ``resume``, persisted by the real drain, and counted for the named user only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
from django.core.management import call_command

from chatstream_site.localservers import Servers
from core.documents import Message, MessageBucket, bucket_id
from core.keys import mention_seqs_key
from messaging.mentions import MENTIONS_MAX, mention_names
from tests.support.api import persist
from tests.support.realtime import (
    RESUMED,
    Broker,
    brokers_running,
    connect_user,
    group_create,
    send_frame,
    user_create,
)
from tests.support.storage import stream_entries_drop

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Broker]]:
    with brokers_running(tmp_path_factory.mktemp("brokers-mentions"), 2) as started:
        yield started


def test_mention_names_are_bounded_and_skip_addresses() -> None:
    assert mention_names("hi @Bob, mail bob@example.com or @carol. @bob again") == ["bob", "carol.", "carol"]
    assert mention_names("no mention here") == []
    many = " ".join(f"@user{i:03d}" for i in range(MENTIONS_MAX + 10))
    assert len(mention_names(many)) == MENTIONS_MAX


def test_mentions_are_live_across_brokers_resumed_and_persisted(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, bob_name = user_create()
    carol, carol_name = user_create()
    _outsider, outsider_name = user_create()
    conv = group_create([alice, bob, carol])
    call_command("usernames_index")

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        reader = await connect_user(brokers[1].url, servers.redis_url, bob)
        text = f"hi @{bob_name.upper()} and @{carol_name}. not @{outsider_name} nor @nobody_here"
        await sender.send(send_frame(conv, text))
        await sender.recv_type("ack")
        live = await reader.recv_type("message.new")
        # Members only (the outsider is no member), in the order named, the sender never.
        assert live["message"]["mentions"] == [bob, carol]
        await sender.send(send_frame(conv, "nobody named"))
        await sender.recv_type("ack")
        assert (await reader.recv_type("message.new"))["message"]["mentions"] == []
        await reader.close()
        # While bob is away: a message naming him; he resumes on the other broker.
        await sender.send(send_frame(conv, f"@{bob_name} are you there?"))
        await sender.recv_type("ack")
        back = await connect_user(brokers[0].url, servers.redis_url, bob)
        await back.send({"type": "resume", "conversations": {conv: 2}})
        frames = []
        while (frame := await back.recv_type(*RESUMED))["type"] != "resumed":
            frames.append(frame)
        assert [(f["seq"], f["message"]["mentions"]) for f in frames] == [(3, [bob])]
        await back.close()
        await sender.close()

    asyncio.run(body())
    bus = redis.Redis.from_url(servers.redis_url)
    assert bus.zcard(mention_seqs_key(conv, bob)) == 2
    assert bus.zcard(mention_seqs_key(conv, carol)) == 1
    assert bus.zcard(mention_seqs_key(conv, alice)) == 0
    persist(servers, conv)
    stored = {m.seq: list(m.mentions) for m in Message.objects(conversation_id=conv)}
    assert stored == {1: [bob, carol], 2: [], 3: [bob]}
    bucket = MessageBucket._get_collection().find_one({"_id": bucket_id(conv, 1)})
    assert bucket["m"]["1"]["mentions"] == [bob, carol] and "mentions" not in bucket["m"]["2"]


def test_resume_beyond_the_stream_carries_mentions_from_mongodb(servers: Servers, brokers: list[Broker]) -> None:
    """An archived message (read back from MongoDB on resume) carries its mentions too."""
    alice, _ = user_create()
    bob, bob_name = user_create()
    conv = group_create([alice, bob])
    call_command("usernames_index")

    async def send() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        await sender.send(send_frame(conv, f"ping @{bob_name}"))
        await sender.recv_type("ack")
        await sender.close()

    asyncio.run(send())
    persist(servers, conv)
    # The stream's copy gone (as after a trim): only MongoDB has it now.
    stream_entries_drop(redis.Redis.from_url(servers.redis_url), conv)

    async def resume() -> None:
        back = await connect_user(brokers[1].url, servers.redis_url, bob)
        await back.send({"type": "resume", "conversations": {conv: 0}})
        frame = await back.recv_type("message.new")
        assert frame["message"]["mentions"] == [bob]
        await back.close()

    asyncio.run(resume())


def test_a_username_missing_from_the_index_is_plain_text(servers: Servers, brokers: list[Broker]) -> None:
    alice, _ = user_create()
    bob, bob_name = user_create()  # never indexed: the write path reads no MongoDB to find him
    conv = group_create([alice, bob])
    redis.Redis.from_url(servers.redis_url).hdel("cs:usernames", bob_name)

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        await sender.send(send_frame(conv, f"@{bob_name}"))
        ack = await sender.recv_type("ack")
        assert ack["seq"] == 1
        await sender.close()

    asyncio.run(body())
    assert redis.Redis.from_url(servers.redis_url).zcard(mention_seqs_key(conv, bob)) == 0


def test_an_edit_re_resolves_mentions_live_in_counts_lists_and_the_store(servers: Servers,
                                                                        brokers: list[Broker]) -> None:
    """An edit that names carol instead of bob: the ``message.edited`` frame on the other broker carries the
    new list, bob's count and list lose the message, carol's gain it; the drain stores the new list in
    ``messages`` and its bucket; ``resume`` from the stream carries it."""
    from core.keys import mention_list_key

    alice, _ = user_create()
    bob, bob_name = user_create()
    carol, carol_name = user_create()
    conv = group_create([alice, bob, carol])
    call_command("usernames_index")
    bus = redis.Redis.from_url(servers.redis_url)

    async def body() -> None:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        reader = await connect_user(brokers[1].url, servers.redis_url, carol)
        await sender.send(send_frame(conv, f"ask @{bob_name}"))
        mid = (await sender.recv_type("ack"))["message_id"]
        await reader.recv_type("message.new")
        assert bus.zcard(mention_seqs_key(conv, bob)) == 1 and bus.zcard(mention_seqs_key(conv, carol)) == 0
        await sender.send({"type": "message.edit", "message_id": mid, "content": f"ask @{carol_name} instead"})
        edited = await reader.recv_type("message.edited")
        assert edited["message"]["mentions"] == [carol]
        await reader.close()
        back = await connect_user(brokers[0].url, servers.redis_url, bob)
        await back.send({"type": "resume", "conversations": {conv: 0}})
        frames = []
        while (frame := await back.recv_type(*RESUMED))["type"] != "resumed":
            frames.append(frame)
        assert [(f["type"], f["message"].get("mentions")) for f in frames] == [
            ("message.new", [bob]), ("message.edited", [carol])]
        await back.close()
        await sender.close()

    asyncio.run(body())
    assert bus.zcard(mention_seqs_key(conv, bob)) == 0 and bus.zcard(mention_list_key(bob)) == 0
    assert bus.zcard(mention_seqs_key(conv, carol)) == 1 and bus.zcard(mention_list_key(carol)) == 1
    persist(servers, conv)
    stored = Message.objects(conversation_id=conv).first()
    assert list(stored.mentions) == [carol]
    bucket = MessageBucket._get_collection().find_one({"_id": bucket_id(conv, 1)})
    assert bucket["m"]["1"]["mentions"] == [carol]
    # The drain's replay wrote nothing back for bob (the message names carol now).
    assert bus.zcard(mention_seqs_key(conv, bob)) == 0 and bus.zcard(mention_seqs_key(conv, carol)) == 1


def test_the_drain_restores_mention_writes_lost_after_the_append(servers: Servers, brokers: list[Broker]) -> None:
    """A process that dies between an append and its mention writes: here the writes are undone by hand
    before the drain runs. The drain's replay writes them again before it acknowledges the entries; a later
    edit's removal is not undone by the replay of the older ``message.new``."""
    from core.keys import mention_list_key

    alice, _ = user_create()
    bob, bob_name = user_create()
    carol, carol_name = user_create()
    conv = group_create([alice, bob, carol])
    call_command("usernames_index")
    bus = redis.Redis.from_url(servers.redis_url)

    async def body() -> list[str]:
        sender = await connect_user(brokers[0].url, servers.redis_url, alice)
        ids = []
        for text in (f"one @{bob_name}", f"two @{bob_name} @{carol_name}"):
            await sender.send(send_frame(conv, text))
            ids.append((await sender.recv_type("ack"))["message_id"])
        await sender.send({"type": "message.edit", "message_id": ids[1], "content": "two, nobody"})
        await sender.recv_type("ack")
        await sender.close()
        return ids

    ids = asyncio.run(body())
    for user in (bob, carol):  # as if the writes after the appends never happened
        bus.delete(mention_seqs_key(conv, user), mention_list_key(user))
    persist(servers, conv)
    assert [m.decode() for m in bus.zrange(mention_seqs_key(conv, bob), 0, -1)] == [ids[0]]
    assert bus.zcard(mention_list_key(bob)) == 1
    assert bus.zcard(mention_seqs_key(conv, carol)) == 0  # the edit stopped naming her: not resurrected
