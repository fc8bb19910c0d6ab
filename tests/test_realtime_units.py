"""Pure and single-process parts of the real-time path: frames, the size trigger, presence counting."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis.asyncio

from messaging import frames, services
from messaging.streams import stream_key
from tests.servers import Servers, run_with_redis


def test_event_frames_are_spliced_from_the_stored_payload() -> None:
    payload = json.dumps({"id": "m1", "conversation_id": "c1", "sender_id": "u1", "content": "hé \"quoted\"",
                          "timestamp": "t", "client_msg_id": "k"}, separators=(",", ":"))
    new = json.loads(frames.event_frame(type="message.new", conversation_id="c1", seq=7, payload_json=payload)
                     or "")
    assert new == {"type": "message.new", "conversation_id": "c1", "seq": 7,
                   "message": {**json.loads(payload), "seq": 7}}
    edited = json.loads(frames.event_frame(type="message.edited", conversation_id="c1", seq=8,
                                           payload_json='{"id":"m1","content":"x"}') or "")
    assert edited == {"type": "message.edited", "conversation_id": "c1", "seq": 8,
                      "message": {"id": "m1", "content": "x"}}
    read = json.loads(frames.event_frame(type="read.updated", conversation_id="c1", seq=0,
                                         payload_json='{"conversation_id":"c1","user_id":"u2","seq":5}') or "")
    assert read == {"type": "read.updated", "conversation_id": "c1", "user_id": "u2", "seq": 5}
    assert frames.event_frame(type="message.new", conversation_id="c1", seq=1, payload_json="[1]") is None
    assert frames.event_frame(type="something.else", conversation_id="c1", seq=1, payload_json="{}") is None


def run(servers: Servers, body: Any) -> Any:
    return run_with_redis(servers.redis_url, body)


def test_backlog_is_the_drain_groups_lag_or_the_stream_length(servers: Servers) -> None:
    partition = 900 + uuid.uuid4().int % 100  # a key no other test uses

    async def body(c: redis.asyncio.Redis) -> None:
        key = stream_key(partition)
        assert await services.partition_backlog(c, partition=partition) == 0
        for i in range(5):
            await c.xadd(key, {"n": i})
        assert await services.partition_backlog(c, partition=partition) == 5
        await c.xgroup_create(key, "drain", id="0")
        await c.xreadgroup("drain", "w1", {key: ">"}, count=3)
        assert await services.partition_backlog(c, partition=partition) == 2

    run(servers, body)


def test_size_trigger_enqueues_a_drain_when_the_backlog_reaches_the_batch(
        servers: Servers, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.BATCH_SIZE = 3
    import storage.services

    calls: list[int] = []

    async def drain_enqueue_async(*, partition: int) -> bool:
        calls.append(partition)
        return True

    monkeypatch.setattr(storage.services, "drain_enqueue_async", drain_enqueue_async)
    partition = 800 + uuid.uuid4().int % 100

    async def body(c: redis.asyncio.Redis) -> None:
        await c.xadd(stream_key(partition), {"n": 1})
        await services._drain_check(c, partition=partition)
        assert calls == []
        for i in range(2):
            await c.xadd(stream_key(partition), {"n": i})
        await services._drain_check(c, partition=partition)
        assert calls == [partition]

    run(servers, body)


def test_presence_counts_devices_across_brokers(servers: Servers) -> None:
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        first = await services._presence_change(c, user_id=user, session_id="a", add=True)
        second = await services._presence_change(c, user_id=user, session_id="b", add=True)
        assert (first, second) == (1, 2)
        assert await services.presence_online(c, user_id=user)
        assert await services._presence_change(c, user_id=user, session_id="a", add=False) == 1
        assert await services._presence_change(c, user_id=user, session_id="b", add=False) == 0
        assert not await services.presence_online(c, user_id=user)

    run(servers, body)
