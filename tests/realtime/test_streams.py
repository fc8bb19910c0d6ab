"""The atomic append against the session's real Redis: seqs are gap-free and retries deduplicate."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio

from chatstream_site.localservers import Servers
from core.entries import MalformedEntry, event_decode
from core.keys import partition_of, stream_key
from messaging.streams import event_append, last_accepted_seq


@pytest.fixture
def conversation_id() -> str:
    return uuid.uuid4().hex[:24]


def test_partition_is_stable_and_in_range() -> None:
    assert partition_of("65f000000000000000000001") == partition_of("65f000000000000000000001")
    assert {partition_of(uuid.uuid4().hex) for _ in range(500)} == set(range(16))


def test_concurrent_appends_get_gap_free_seqs_and_retries_dedup(servers: Servers, conversation_id: str) -> None:
    async def run() -> None:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            async def send(i: int) -> tuple[int, str]:
                result = await event_append(
                    client, type="message.new", conversation_id=conversation_id,
                    payload={"content": f"m{i}"}, message_id=uuid.uuid4().hex, dedup=("u1", f"c{i}"),
                )
                return result.seq, result.message_id

            first = await asyncio.gather(*(send(i) for i in range(50)))
            assert sorted(seq for seq, _ in first) == list(range(1, 51))
            retried = await asyncio.gather(*(send(i) for i in range(50)))
            assert retried == first  # same (seq, message_id) for every retried client_msg_id
            assert await last_accepted_seq(client, conversation_id=conversation_id) == 50

            entries = await client.xrange(stream_key(partition_of(conversation_id)))
            mine = [event_decode(eid, f) for eid, f in entries]
            mine = [e for e in mine if e.conversation_id == conversation_id]
            assert [e.seq for e in mine] == list(range(1, 51))  # stream order is seq order
            read = await event_append(client, type="read.updated", conversation_id=conversation_id,
                                      payload={"user_id": "u1", "seq": 50}, message_id="")
            assert read.seq == 0 and not read.duplicate
            assert await last_accepted_seq(client, conversation_id=conversation_id) == 50
        finally:
            await client.aclose()

    asyncio.run(run())


@pytest.mark.parametrize(
    "fields",
    [{b"t": b"message.new"}, {b"v": b"9", b"t": b"x", b"c": b"c", b"s": b"1", b"d": b"{}"},
     {b"v": b"1", b"t": b"x", b"c": b"c", b"s": b"one", b"d": b"{}"},
     {b"v": b"1", b"t": b"x", b"c": b"c", b"s": b"1", b"d": b"[1]"},
     {b"v": b"1", b"t": b"x", b"c": b"c", b"s": b"1", b"d": b"\xff"}],
)
def test_malformed_entries_are_refused(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(MalformedEntry):
        event_decode(b"1-0", fields)
