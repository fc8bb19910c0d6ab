"""Replies and reactions on the WebSocket (docs/adr/0037) against two real broker processes, the session's Redis
and FerretDB: a reply sent on one broker reaches the other with its quote; reactions added and removed on one
broker are live on the other with their own seq, come back on ``resume`` in seq order, and are in MongoDB
after the real drain; bad frames and strangers get their error frames and change nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from mongoengine.connection import get_db

from api import history as api_selectors
from chatstream_site.localservers import Servers
from tests.support.api import persist
from tests.support.realtime import Broker, brokers_running, connect_user, group_create, send_frame, user_create
from tests.support.storage import stream_entries_drop

pytestmark = pytest.mark.cluster

REACTION_FRAMES = ("reaction.added", "reaction.removed")


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Broker]]:
    with brokers_running(tmp_path_factory.mktemp("brokers-features"), 2) as started:
        yield started


def run(body: Any) -> Any:
    return asyncio.run(body())


def reply_frame(conversation_id: str, content: str, reply_to: Any) -> dict[str, Any]:
    return {**send_frame(conversation_id, content), "reply_to": reply_to}


def test_replies_and_reactions_are_live_across_brokers_resumed_and_persisted(servers: Servers,
                                                                              brokers: list[Broker]) -> None:
    alice, alice_name = user_create()
    bob, _ = user_create()
    carol, _ = user_create()  # not a member
    conv = group_create([alice, bob])

    async def body() -> tuple[str, str]:
        a = await connect_user(brokers[0].url, servers.redis_url, alice)
        b = await connect_user(brokers[1].url, servers.redis_url, bob)
        c = await connect_user(brokers[1].url, servers.redis_url, carol)
        await a.send(send_frame(conv, "what do you think?"))
        original = await a.recv_type("ack")
        await b.send(reply_frame(conv, "yes!", original["message_id"]))
        reply_ack = await b.recv_type("ack")
        live = await a.recv_type("message.new")
        while live["message"]["id"] != reply_ack["message_id"]:
            live = await a.recv_type("message.new")
        assert live["message"]["reply_to"] == {
            "id": original["message_id"], "seq": original["seq"], "sender_id": alice, "username": alice_name,
            "excerpt": "what do you think?", "deleted": False}

        # A reaction on broker 2 is live on broker 1, with its own seq.
        await b.send({"type": "reaction.add", "ref": "r1", "message_id": original["message_id"], "emoji": "👍"})
        ack = await b.recv_type("ack")
        assert (ack["ref"], ack["changed"], ack["user_ids"], ack["seq"]) == ("r1", True, [bob], reply_ack["seq"] + 1)
        seen = await a.recv_type(*REACTION_FRAMES)
        assert seen == {"type": "reaction.added", "conversation_id": conv, "seq": ack["seq"], "reaction": {
            "id": original["message_id"], "conversation_id": conv, "user_id": bob, "emoji": "👍",
            "user_ids": [bob], "at": seen["reaction"]["at"]}}
        # Idempotent: the same add again changes nothing and sends no frame to anyone.
        await b.send({"type": "reaction.add", "ref": "r2", "message_id": original["message_id"], "emoji": "👍"})
        again = await b.recv_type("ack")
        assert (again["changed"], again["seq"]) == (False, None)
        # Bad frames and a stranger: error frames, nothing appended.
        await b.send({"type": "reaction.add", "ref": "bad", "message_id": original["message_id"], "emoji": "+1"})
        assert (await b.recv_type("error"))["code"] == "invalid"
        await b.send({"type": "reaction.add", "ref": "bad2", "message_id": {"$gt": ""}, "emoji": "👍"})
        assert (await b.recv_type("error"))["code"] == "invalid"
        await c.send({"type": "reaction.add", "ref": "x", "message_id": original["message_id"], "emoji": "👍"})
        assert (await c.recv_type("error"))["code"] == "not_found"
        await b.send(reply_frame(conv, "to nothing", "0" * 32))
        refused = await b.recv_type("error")
        assert refused["code"] == "invalid" and refused["details"]["reason"] == "not_found"
        assert [f for f in await a.recv_during(0.5) if f["type"] in (*REACTION_FRAMES, "message.new")] == []
        last_seen = ack["seq"]
        await b.close()

        # While bob is away: alice reacts twice and takes one back.
        for op, emoji in (("add", "🎉"), ("add", "👍"), ("remove", "🎉")):
            await a.send({"type": f"reaction.{op}", "message_id": original["message_id"], "emoji": emoji})
            assert (await a.recv_type("ack"))["changed"] is True
        back = await connect_user(brokers[0].url, servers.redis_url, bob)
        await back.send({"type": "resume", "conversations": {conv: last_seen}})
        missed = []
        while (frame := await back.recv_type(*REACTION_FRAMES, "resumed"))["type"] != "resumed":
            missed.append(frame)
        assert frame["last_seq"] == last_seen + 3
        assert [(f["type"], f["seq"], f["reaction"]["emoji"], f["reaction"]["user_ids"]) for f in missed] == [
            ("reaction.added", last_seen + 1, "🎉", [alice]), ("reaction.added", last_seen + 2, "👍", [bob, alice]),
            ("reaction.removed", last_seen + 3, "🎉", [])]
        for client in (a, back, c):
            await client.close()
        return original["message_id"], reply_ack["message_id"]

    original_id, reply_id = run(body)
    persist(servers, conv)
    db = get_db()
    assert db.messages.find_one({"_id": original_id})["reactions"] == [{"emoji": "👍", "user_ids": [bob, alice]}]
    assert db.messages.find_one({"_id": reply_id})["reply_to"]["id"] == original_id
    page = {m.id: m for m in api_selectors.message_history_get(user_id=bob, conversation_id=conv).messages}
    assert page[original_id].reactions == [{"emoji": "👍", "user_ids": [bob, alice]}]
    assert page[reply_id].reply_to["excerpt"] == "what do you think?"
    assert uuid.UUID(hex=reply_id)  # ids stay 32-hex


def test_resume_from_the_store_after_the_drain_carries_quotes_and_reactions(servers: Servers,
                                                                            brokers: list[Broker]) -> None:
    """Once the drain has persisted them and the stream no longer holds them (as after a trim), a ``resume``
    is answered from MongoDB: the reply carries its quote, the original its reactions (count and who), on
    the broker that did not see them live."""
    import redis

    alice, alice_name = user_create()
    bob, _ = user_create()
    carol, _ = user_create()
    conv = group_create([alice, bob, carol])

    async def body() -> tuple[str, str]:
        a = await connect_user(brokers[0].url, servers.redis_url, alice)
        b = await connect_user(brokers[0].url, servers.redis_url, bob)
        await a.send(send_frame(conv, "lunch at noon?"))
        original = await a.recv_type("ack")
        await b.send(reply_frame(conv, "sure", original["message_id"]))
        reply = await b.recv_type("ack")
        for who, emoji in ((b, "👍"), (a, "👍"), (b, "🎉")):
            await who.send({"type": "reaction.add", "ref": emoji, "message_id": original["message_id"],
                            "emoji": emoji})
            assert (await who.recv_type("ack"))["changed"] is True
        await a.close()
        await b.close()
        return original["message_id"], reply["message_id"]

    original_id, reply_id = run(body)
    persist(servers, conv)
    stream_entries_drop(redis.Redis.from_url(servers.redis_url), conv)

    async def resume() -> list[dict[str, Any]]:
        c = await connect_user(brokers[1].url, servers.redis_url, carol)
        await c.send({"type": "resume", "conversations": {conv: 0}})
        frames = []
        while (frame := await c.recv_type("message.new", "resumed"))["type"] != "resumed":
            frames.append(frame)
        await c.close()
        return frames

    frames = run(resume)
    assert [f["message"]["id"] for f in frames] == [original_id, reply_id]
    assert {f.get("source") for f in frames} == {"archive"}
    assert frames[1]["message"]["reply_to"] == {"id": original_id, "seq": 1, "sender_id": alice,
                                                "username": alice_name, "excerpt": "lunch at noon?",
                                                "deleted": False}
    reactions = {r["emoji"]: r["user_ids"] for r in frames[0]["message"]["reactions"]}
    assert reactions == {"👍": [bob, alice], "🎉": [bob]}
