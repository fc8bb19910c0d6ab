"""One event builder and one drain table (issue 12, finding 2), against the session's real Redis and FerretDB:
every event type the services append is built by ``messaging.events`` and applied by the real drain's
``storage.rules.EVENT_RULES``; a staff delete is a sender delete's event; an unknown type is dead-lettered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
import redis.asyncio
from bson import ObjectId
from mongoengine.connection import get_db

from api import services as api_services
from chatstream_site.localservers import Servers, run_with_redis
from core.documents import Conversation
from core.entries import Event, event_decode
from core.errors import NotFound
from core.keys import DEADLETTERS, partition_of, stream_key
from messaging import events, reactions, services
from storage.rules import EVENT_RULES
from tests.support.api import persist

ALICE, BOB = str(ObjectId()), str(ObjectId())


@pytest.fixture
def r(servers: Servers) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(servers.redis_url)
    yield client
    client.close()


@pytest.fixture
def conversation(servers: Servers) -> str:
    """A fresh 1:1 chat of ALICE and BOB."""
    return str(Conversation(type="single", room_id=ObjectId(), members=[ObjectId(ALICE), ObjectId(BOB)]).save().id)


def run(servers: Servers, body: Any) -> Any:
    return run_with_redis(servers.redis_url, body)


def entries_of(r: redis.Redis, conversation_id: str) -> list[tuple[str, dict[bytes, bytes], Event]]:
    raw: Any = r.xrange(stream_key(partition_of(conversation_id)))
    out = []
    for entry_id, fields in raw:
        event = event_decode(entry_id, fields)
        if event.conversation_id == conversation_id:
            out.append((event.entry_id, fields, event))
    return out


def dead_letters_of(r: redis.Redis, entry_ids: set[str]) -> list[dict[bytes, bytes]]:
    found: Any = r.xrange(DEADLETTERS)
    return [f for _, f in found if f[b"entry_id"].decode() in entry_ids]


def test_every_event_type_the_services_append_is_built_alike_and_applied_by_the_drain_table(
        servers: Servers, r: redis.Redis, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> list[str]:
        sent = [await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id=f"m{i}",
                                            content=f"message {i}") for i in range(3)]
        await services.message_edit(c, user_id=ALICE, message_id=sent[0].message_id, content="message 0, edited")
        await services.message_delete(c, user_id=ALICE, message_id=sent[1].message_id)
        await services.message_delete_by_staff(c, staff_username="mod", message_id=sent[2].message_id)
        assert await services.read_mark(c, user_id=BOB, conversation_id=conversation, seq=2) == 2
        reply = await services.message_send(c, user_id=BOB, conversation_id=conversation, client_msg_id="r",
                                            content="a reply", reply_to=sent[0].message_id)
        await reactions.reaction_change(c, user_id=BOB, message_id=reply.message_id, emoji="👍", op="add")
        await reactions.reaction_change(c, user_id=BOB, message_id=reply.message_id, emoji="👍", op="remove")
        return [s.message_id for s in sent]

    ids = run(servers, body)
    mine = entries_of(r, conversation)
    # The services append every type the builder knows, and the drain has a rule for each, no more.
    assert [e.type for _, _, e in mine] == ["message.new"] * 3 + [
        "message.edited", "message.deleted", "message.deleted", "read.updated", "message.new", "reaction.added",
        "reaction.removed"]
    assert set(EVENT_RULES) == set(events.PAYLOAD_FIELDS) == {e.type for _, _, e in mine}
    for _, _, event in mine:
        optional = [f for f in events.PAYLOAD_OPTIONAL.get(event.type, ()) if f in event.data]
        assert tuple(event.data) == events.PAYLOAD_FIELDS[event.type] + tuple(optional), event
    assert [e.data.get("reply_to", {}).get("id") for _, _, e in mine if e.type == "message.new"] == [
        None, None, None, ids[0]]

    persist(servers, conversation)  # the real drain
    db = get_db()
    msgs = {m["_id"]: m for m in db.messages.find({"conversation_id": ObjectId(conversation)})}
    assert [msgs[i]["seq"] for i in ids] == [1, 2, 3]
    assert msgs[ids[0]]["content"] == "message 0, edited" and msgs[ids[0]]["edit_seq"] == 4
    assert [(msgs[i]["deleted"], msgs[i]["content"], msgs[i]["edit_seq"]) for i in ids[1:]] == [
        (True, "", 5), (True, "", 6)]
    # 1:1: Bob read up to seq 2, so Alice's messages 1 and 2 are read, 3 is not.
    assert [msgs[i]["read_status"] for i in ids] == ["read", "read", "sent"]
    reply = db.messages.find_one({"conversation_id": ObjectId(conversation), "seq": 7})
    assert reply["reply_to"]["id"] == ids[0] and reply["reactions"] == [] and reply["rx_seq"] == 9
    conv = db.conversations.find_one({"_id": ObjectId(conversation)})
    assert conv["last_seq"] == 9 and conv["read_cursors"] == {BOB: 2}
    assert conv["lastMessage"]["id"] == reply["_id"]
    assert dead_letters_of(r, {eid for eid, _, _ in mine}) == []


@pytest.fixture
def unknown_entry(r: redis.Redis, conversation: str) -> Iterator[str]:
    """An entry of a type no code appends yet (say, next quarter's reactions); removed afterwards, since
    other tests read whole partitions."""
    key = stream_key(partition_of(conversation))
    entry_id = r.xadd(key, {"t": "message.reacted", "c": conversation, "s": "0", "v": "1",
                            "d": json.dumps({"id": "a" * 32, "conversation_id": conversation, "emoji": "+1"})})
    yield entry_id.decode()
    r.xdel(key, entry_id)


def test_an_event_type_without_a_rule_is_dead_lettered_and_the_rest_persists(
        servers: Servers, r: redis.Redis, conversation: str, unknown_entry: str) -> None:
    async def body(c: redis.asyncio.Redis) -> str:
        sent = await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id="after",
                                           content="after the unknown entry")
        return sent.message_id

    after = run(servers, body)
    persist(servers, conversation)
    letters = dead_letters_of(r, {unknown_entry})
    assert len(letters) == 1 and "unknown event type 'message.reacted'" in letters[0][b"reason"].decode()
    assert get_db().messages.find_one({"_id": after})["content"] == "after the unknown entry"


def test_a_staff_delete_is_a_sender_delete_by_someone_else_and_is_in_mongodb_at_once(
        servers: Servers, r: redis.Redis, conversation: str) -> None:
    async def send(c: redis.asyncio.Redis) -> list[str]:
        return [(await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id=f"s{i}",
                                             content=f"m{i}")).message_id for i in range(2)]

    by_sender, by_staff = run(servers, send)
    persist(servers, conversation)  # the admin deletes persisted messages

    async def sender_delete(c: redis.asyncio.Redis) -> None:
        await services.message_delete(c, user_id=ALICE, message_id=by_sender)

    run(servers, sender_delete)
    seq = api_services.message_tombstone_by_staff(message_id=by_staff, staff_username="mod")

    deletes = {e.data["id"]: (fields, e) for _, fields, e in entries_of(r, conversation) if e.type == "message.deleted"}
    (sender_fields, sender_event), (staff_fields, staff_event) = deletes[by_sender], deletes[by_staff]
    assert staff_event.seq == seq == sender_event.seq + 1
    # The same entry and payload fields, in the same order; only who deleted it differs.
    assert list(sender_fields) == list(staff_fields)
    assert list(sender_event.data) == list(staff_event.data) == list(events.PAYLOAD_FIELDS["message.deleted"])
    assert (sender_event.data["deleter_id"], staff_event.data["deleter_id"]) == (ALICE, "staff:mod")
    # Both leave the same meta hash: the message is deleted, its sender is remembered.
    for mid in (by_sender, by_staff):
        assert r.hgetall(events.message_meta_key(mid)) == {b"c": conversation.encode(), b"u": ALICE.encode(),
                                                           b"x": b"1"}

    # Before any drain, MongoDB already holds what the drain writes for the staff delete.
    db = get_db()
    now = db.messages.find_one({"_id": by_staff})
    deleted_at = datetime.fromisoformat(staff_event.data["deleted_at"].replace("Z", "+00:00"))
    assert (now["deleted"], now["content"], now["edit_seq"]) == (True, "", seq)
    assert now["deleted_at"].replace(tzinfo=None) == deleted_at.replace(tzinfo=None)

    async def edit(c: redis.asyncio.Redis) -> None:
        await services.message_edit(c, user_id=ALICE, message_id=by_staff, content="back")

    with pytest.raises(NotFound):
        run(servers, edit)
    with pytest.raises(NotFound):  # already deleted
        api_services.message_tombstone_by_staff(message_id=by_staff, staff_username="mod")
    persist(servers, conversation)
    assert db.messages.find_one({"_id": by_staff}) == now  # the drain's own statement, again: no change
    assert db.messages.find_one({"_id": by_sender})["deleted"] is True


def test_the_read_updated_entry_is_the_builders_payload_with_the_cursor_the_script_chose(
        servers: Servers, r: redis.Redis, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        for i in range(3):
            await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id=f"r{i}",
                                        content=str(i))
        assert await services.read_mark(c, user_id=BOB, conversation_id=conversation, seq=99) == 3

    run(servers, body)
    (_, fields, event), = [m for m in entries_of(r, conversation) if m[2].type == "read.updated"]
    built = events.event_build(type="read.updated", conversation_id=conversation, actor_id=BOB, seq=3)
    assert fields[b"d"].decode() == json.dumps(built.payload, separators=(",", ":"))
    assert fields[b"v"].decode() == "1" and event.seq == 0
    head, tail = built.json_around_seq()
    assert head + "3" + tail == fields[b"d"].decode()
