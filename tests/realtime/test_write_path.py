"""The write path (messaging.services) against the session's real Redis and FerretDB."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio
from bson import ObjectId

from chatstream_site.localservers import Servers, run_with_redis
from core.documents import Conversation
from core.entries import event_decode
from core.errors import DomainError, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from core.keys import partition_of, stream_key
from messaging import membership, services

ALICE, BOB, EVE = (str(ObjectId()) for _ in range(3))


@pytest.fixture
def conversation(servers: Servers) -> str:
    conv = Conversation(type="single", room_id=ObjectId(), members=[ObjectId(ALICE), ObjectId(BOB)]).save()
    return str(conv.id)


def run(servers: Servers, body: Any) -> Any:
    return run_with_redis(servers.redis_url, body)


def test_send_is_acked_with_seq_and_deduplicated(servers: Servers, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        first = await services.message_send(c, user_id=ALICE, conversation_id=conversation,
                                            client_msg_id="m-1", content="hello")
        again = await services.message_send(c, user_id=ALICE, conversation_id=conversation,
                                            client_msg_id="m-1", content="hello")
        other = await services.message_send(c, user_id=BOB, conversation_id=conversation,
                                            client_msg_id="m-1", content="hi")
        assert (first.seq, again.seq, other.seq) == (1, 1, 2)
        assert again.duplicate and again.message_id == first.message_id
        entries = await c.xrange(stream_key(partition_of(conversation)))
        events = [event_decode(i, f) for i, f in entries]
        assert [(e.type, e.seq) for e in events if e.conversation_id == conversation] == [
            ("message.new", 1), ("message.new", 2)]

    run(servers, body)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"conversation_id": {"$gt": ""}}, ValidationFailed),
        ({"conversation_id": "not-an-id"}, ValidationFailed),
        ({"client_msg_id": ""}, ValidationFailed),
        ({"client_msg_id": 5}, ValidationFailed),
        ({"content": ["x"]}, ValidationFailed),
        ({"content": "   "}, ValidationFailed),
        ({"content": "x" * 4001}, PayloadTooLarge),
    ],
)
def test_bad_input_is_refused_and_nothing_is_appended(servers: Servers, conversation: str,
                                                      kwargs: dict[str, Any], error: type[DomainError]) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        args = {"conversation_id": conversation, "client_msg_id": uuid.uuid4().hex, "content": "ok", **kwargs}
        with pytest.raises(error):
            await services.message_send(c, user_id=ALICE, **args)
        entries = await c.xrange(stream_key(partition_of(conversation)))
        assert [e for e in entries if event_decode(*e).conversation_id == conversation] == []

    run(servers, body)


def test_strangers_and_unknown_conversations_look_the_same(servers: Servers, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        with pytest.raises(NotFound):
            await services.message_send(c, user_id=EVE, conversation_id=conversation, client_msg_id="a",
                                        content="let me in")
        with pytest.raises(NotFound):
            await services.message_send(c, user_id=ALICE, conversation_id=str(ObjectId()), client_msg_id="a",
                                        content="anyone?")

    run(servers, body)


def test_membership_cache_is_invalidated(servers: Servers, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        assert await membership.conversation_members(c, conversation_id=conversation) == {ALICE, BOB}
        Conversation.objects(id=conversation).update_one(push__members=ObjectId(EVE))
        assert EVE not in (await membership.conversation_members(c, conversation_id=conversation) or set())
        membership.membership_changed_sync(redis.Redis.from_url(servers.redis_url), user_ids=[EVE],
                                           conversation_id=conversation)  # what the REST services call
        await services.message_send(c, user_id=EVE, conversation_id=conversation, client_msg_id="e",
                                    content="joined")

    run(servers, body)


def test_edit_and_delete_are_for_the_sender_only(servers: Servers, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        sent = await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id="x",
                                           content="tpyo")
        with pytest.raises(Forbidden):
            await services.message_edit(c, user_id=BOB, message_id=sent.message_id, content="hacked")
        edited = await services.message_edit(c, user_id=ALICE, message_id=sent.message_id, content="typo")
        assert edited.seq == sent.seq + 1 and edited.event["content"] == "typo"
        deleted = await services.message_delete(c, user_id=ALICE, message_id=sent.message_id)
        assert deleted.seq == edited.seq + 1
        with pytest.raises(NotFound):
            await services.message_edit(c, user_id=ALICE, message_id=sent.message_id, content="again")
        with pytest.raises(ValidationFailed):
            await services.message_delete(c, user_id=ALICE, message_id={"$ne": None})

    run(servers, body)


def test_read_cursor_moves_forward_only_and_is_clamped(servers: Servers, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        for i in range(3):
            await services.message_send(c, user_id=BOB, conversation_id=conversation, client_msg_id=f"r{i}",
                                        content=str(i))
        assert await services.read_mark(c, user_id=ALICE, conversation_id=conversation, seq=2) == 2
        assert await services.read_mark(c, user_id=ALICE, conversation_id=conversation, seq=1) == 2
        assert await services.read_mark(c, user_id=ALICE, conversation_id=conversation, seq=99) == 3
        entries = await c.xrange(stream_key(partition_of(conversation)))
        decoded = [event_decode(i, f) for i, f in entries]
        reads = [e.data for e in decoded if e.type == "read.updated" and e.conversation_id == conversation]
        assert reads == [{"conversation_id": conversation, "user_id": ALICE, "seq": 2},
                         {"conversation_id": conversation, "user_id": ALICE, "seq": 3}]
        with pytest.raises(ValidationFailed):
            await services.read_mark(c, user_id=ALICE, conversation_id=conversation, seq=True)

    run(servers, body)


def conversations_in_one_partition(members: list[str]) -> tuple[str, str]:
    """Two conversations of ``members`` whose ids hash to the same partition (16 partitions: a handful of
    tries; bounded)."""
    seen: dict[int, str] = {}
    for _ in range(200):
        conv = str(Conversation(type="group", room_id=ObjectId(), members=[ObjectId(m) for m in members]).save().id)
        partition = partition_of(conv)
        if partition in seen:
            return seen[partition], conv
        seen[partition] = conv
    raise AssertionError("no two conversations in one partition among 200")


def test_a_client_msg_id_reused_in_another_conversation_of_the_partition_is_another_message(
        servers: Servers) -> None:
    first_conv, second_conv = conversations_in_one_partition([ALICE, BOB])

    async def body(c: redis.asyncio.Redis) -> None:
        first = await services.message_send(c, user_id=ALICE, conversation_id=first_conv, client_msg_id="1",
                                            content="to the first")
        second = await services.message_send(c, user_id=ALICE, conversation_id=second_conv, client_msg_id="1",
                                             content="to the second")
        assert not second.duplicate and second.message_id != first.message_id
        assert (first.seq, second.seq) == (1, 1)
        # Within a conversation the retry is still one message.
        again = await services.message_send(c, user_id=ALICE, conversation_id=second_conv, client_msg_id="1",
                                            content="to the second")
        assert again.duplicate and (again.message_id, again.seq) == (second.message_id, second.seq)
        entries = await c.xrange(stream_key(partition_of(first_conv)))
        news = [(e.conversation_id, e.data["content"]) for e in (event_decode(i, f) for i, f in entries)
                if e.type == "message.new" and e.conversation_id in (first_conv, second_conv)]
        assert news == [(first_conv, "to the first"), (second_conv, "to the second")]

    run(servers, body)


def test_a_dedup_key_of_the_old_format_answers_nothing(servers: Servers, conversation: str) -> None:
    """Rolling upgrade: a key ``cs:{pNN}:dedup:{sender}:{client_msg_id}`` written by an old broker (for any
    conversation of the partition) is never read, so it cannot answer with another conversation's message."""

    async def body(c: redis.asyncio.Redis) -> None:
        partition = partition_of(conversation)
        await c.set(f"cs:{{p{partition:02d}}}:dedup:{ALICE}:old-1", f"{'e' * 32}:7", ex=3600)
        sent = await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id="old-1",
                                           content="after the upgrade")
        assert not sent.duplicate and sent.message_id != "e" * 32 and sent.seq == 1

    run(servers, body)


@pytest.mark.parametrize(("content", "reason", "index"), [
    ("x\ud800y", "surrogate", 1), ("\udfff", "surrogate", 0), ("ok \U0001F600 \udbff", "surrogate", 5),
    ("a\x00b", "nul", 1),
])
def test_content_no_store_can_hold_is_refused_on_send_and_edit(servers: Servers, conversation: str, content: str,
                                                               reason: str, index: int) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        sent = await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id="fine",
                                           content="fine")
        for attempt in (
            services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id="bad",
                                  content=content),
            services.message_edit(c, user_id=ALICE, message_id=sent.message_id, content=content),
        ):
            with pytest.raises(ValidationFailed) as refused:
                await attempt
            assert refused.value.code == "invalid"
            assert refused.value.details == {"field": "content", "reason": reason, "index": index}
        entries = await c.xrange(stream_key(partition_of(conversation)))
        assert [event_decode(*e).seq for e in entries if event_decode(*e).conversation_id == conversation] == [1]

    run(servers, body)


def test_other_control_characters_are_content(servers: Servers, conversation: str) -> None:
    async def body(c: redis.asyncio.Redis) -> None:
        content = "bell\x07 esc\x1b[31m del\x7f nel\x85 \ufffe\uffff tab\t"
        sent = await services.message_send(c, user_id=ALICE, conversation_id=conversation, client_msg_id="ctl",
                                           content=content)
        assert sent.event["content"] == content

    run(servers, body)


def test_a_removal_racing_the_cache_refill_is_not_cached(servers: Servers, conversation: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The race made deterministic: the refill's MongoDB read returns, then bob is removed (MongoDB write and
    invalidation, as api.services does), then the refill writes. bob must not come back from the cache."""
    read_members = membership._members_from_db
    sync = redis.Redis.from_url(servers.redis_url)

    def read_then_removal(conversation_id: str) -> list[str] | None:
        found = read_members(conversation_id)
        Conversation.objects(id=conversation_id).update_one(pull__members=ObjectId(BOB))
        membership.membership_invalidate_sync(sync, conversation_id=conversation_id)
        return found

    async def body(c: redis.asyncio.Redis) -> None:
        monkeypatch.setattr(membership, "_members_from_db", read_then_removal)
        assert await membership.conversation_members(c, conversation_id=conversation) == {ALICE, BOB}
        monkeypatch.setattr(membership, "_members_from_db", read_members)
        assert await membership.conversation_members(c, conversation_id=conversation) == {ALICE}
        with pytest.raises(NotFound):
            await services.message_send(c, user_id=BOB, conversation_id=conversation, client_msg_id="b",
                                        content="still in?")

    try:
        run(servers, body)
    finally:
        sync.close()


def test_two_racing_membership_changes_leave_the_later_set(servers: Servers, conversation: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The write path writes the new member set (issue 16), so a stale write must not land: eve is added and
    her change's MongoDB read returns bob still in; before that change writes its set, bob is removed (MongoDB
    write and membership_invalidate_sync, as api.services does). bob must not come back, and the set that
    stays is the removal's, read after both changes; the sends below never read MongoDB."""
    query = membership._members_query
    sync = redis.Redis.from_url(servers.redis_url)
    interleaved: list[bool] = []

    def read_then_removal(conversation_id: str) -> list[str] | None:
        found = query(conversation_id)
        if not interleaved:
            interleaved.append(True)
            Conversation.objects(id=conversation_id).update_one(pull__members=ObjectId(BOB))
            membership.membership_invalidate_sync(sync, conversation_id=conversation_id)
        return found

    def no_mongodb(conversation_id: str) -> list[str] | None:
        raise AssertionError("the hot path read MongoDB")

    async def body(c: redis.asyncio.Redis) -> None:
        with pytest.raises(NotFound):
            await services.message_send(c, user_id=BOB, conversation_id=conversation, client_msg_id="b",
                                        content="gone")
        await services.message_send(c, user_id=EVE, conversation_id=conversation, client_msg_id="e",
                                    content="joined")

    try:
        Conversation.objects(id=conversation).update_one(push__members=ObjectId(EVE))
        monkeypatch.setattr(membership, "_members_query", read_then_removal)
        membership.membership_changed_sync(sync, user_ids=[EVE], conversation_id=conversation)
        assert interleaved
        assert {m.decode() for m in sync.smembers(membership.membership_key(conversation))} == {ALICE, EVE}
        monkeypatch.setattr(membership, "_members_from_db", no_mongodb)
        run(servers, body)
    finally:
        sync.close()
