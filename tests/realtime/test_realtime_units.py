"""Pure and single-process parts of the real-time path: frames, the size trigger, presence counting."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from chatstream_site.localservers import Servers, run_with_redis
from core.keys import stream_key
from messaging import frames, presence, services
from messaging.transports import Flag as _Flag
from messaging.transports import ReceiveQueue as _ReceiveQueue
from tests.support.realtime import presence_live


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


@pytest.fixture
def enqueued(settings: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The partitions the size trigger enqueues a drain of (recorded instead of sent), with a batch of 3."""
    settings.BATCH_SIZE = 3
    import storage.trigger

    calls: list[int] = []

    async def drain_enqueue_async(*, partition: int) -> bool:
        calls.append(partition)
        return True

    monkeypatch.setattr(storage.trigger, "drain_enqueue_async", drain_enqueue_async)
    return calls


def test_size_trigger_enqueues_a_drain_when_the_backlog_reaches_the_batch(servers: Servers,
                                                                           enqueued: list[int]) -> None:
    calls = enqueued
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


def test_the_lean_size_trigger_reads_the_same_backlog_and_skips_a_partition_whose_drain_is_queued(
        servers: Servers, enqueued: list[int]) -> None:
    """A broker's check (its client has an append batcher, hence a lean connection): one round trip that must
    say what partition_backlog says in every state of the stream, and no enqueue while the drain lock is held."""
    from core.keys import drain_lock_key
    from messaging import streams

    calls = enqueued
    partition = 700 + uuid.uuid4().int % 100
    key = stream_key(partition)

    async def body(c: redis.asyncio.Redis) -> None:
        streams.append_batching_enable(c)
        lean = streams.append_client_lean(c)
        assert lean is not None

        async def both() -> tuple[int, int, bool]:
            backlog, locked = await services._backlog_lean(lean, partition=partition)
            return backlog, await services.partition_backlog(c, partition=partition), locked

        assert await both() == (0, 0, False)  # no stream yet
        for i in range(5):
            await c.xadd(key, {"n": i})
        assert await both() == (5, 5, False)  # a stream, no group
        await c.xgroup_create(key, "drain", id="0")
        await c.xreadgroup("drain", "w1", {key: ">"}, count=1)
        assert await both() == (4, 4, False)  # the group's lag
        await c.xgroup_create(key, "other", id="0")
        assert await both() == (5, 5, False)  # the largest lag of two groups
        await c.set(drain_lock_key(partition), "1")
        assert await both() == (5, 5, True)
        await services._drain_check(c, partition=partition)
        assert calls == []  # queued or running already
        await c.delete(drain_lock_key(partition))
        await services._drain_check(c, partition=partition)
        assert calls == [partition]
        await c.delete(key)
        await c.set(key, "a string")  # a wrong type is an error, not an empty stream
        with pytest.raises(redis.exceptions.ResponseError):
            await services._backlog_lean(lean, partition=partition)
        await c.delete(key)
        lean.close()

    run(servers, body)


def test_presence_counts_devices_across_brokers(servers: Servers) -> None:
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        async def change(session: str, *, add: bool) -> tuple[int, bool]:
            return await presence._presence_transition(c, user_id=user, session_id=session, add=add)

        # (live sessions after the change, whether this change took the user online/offline)
        assert await change("a", add=True) == (1, True)
        assert await change("b", add=True) == (2, False)  # a second device: already online, nothing announced
        assert await presence_live(c, user)
        assert await change("a", add=False) == (1, False)
        assert await change("b", add=False) == (0, True)  # the last device: offline, announced once
        assert not await presence_live(c, user)

    run(servers, body)


def test_the_slim_receive_queue_keeps_order_and_loses_nothing_to_a_cancelled_get() -> None:
    """What uvicorn's protocol gets instead of an asyncio.Queue after the handshake (consumers._ReceiveQueue)."""

    async def body() -> None:
        queue = _ReceiveQueue()
        assert queue.empty()
        with pytest.raises(asyncio.QueueEmpty):
            queue.get_nowait()
        queue.put_nowait(1)
        queue.put_nowait(2)
        assert [await queue.get(), queue.get_nowait()] == [1, 2]
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        assert not getter.done()
        queue.put_nowait(3)
        assert await getter == 3
        # Woken, then cancelled before it ran: the item stays for the next get.
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait(4)
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter
        assert not queue.empty() and await queue.get() == 4
        assert queue.waiter is None

    asyncio.run(body())


def test_the_slim_flag_waits_while_clear_and_wakes_every_waiter_on_set() -> None:
    async def body() -> None:
        flag = _Flag(True)
        assert flag.is_set() and await flag.wait()
        flag.clear()
        waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        waiters[0].cancel()
        await asyncio.sleep(0)
        assert flag.waiters is not None and len(flag.waiters) == 2  # a cancelled wait leaves no waiter behind
        flag.set()
        assert await asyncio.gather(*waiters[1:]) == [True, True]
        assert flag.is_set() and flag.waiters is None

    asyncio.run(body())


def test_server_internals_are_used_only_with_the_releases_they_were_tested_against(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """messaging/transports.py writes to uvicorn's transport directly only for a uvicorn release it knows;
    any other release gets plain ASGI sends and one warning that says what to re-check."""
    from messaging import transports

    class Protocol:  # the attributes UvicornOutput reads of uvicorn's protocol
        transport = object()
        conn = object()
        close_sent = False

        def send(self, message: Any) -> None: ...

    send = Protocol().send
    transports.internals_known.cache_clear()
    try:
        assert isinstance(transports.UvicornOutput.of(send), transports.UvicornOutput)
        monkeypatch.setitem(transports.TESTED, "uvicorn", ("0.1",))
        transports.internals_known.cache_clear()
        with caplog.at_level("WARNING", logger="messaging.transports"):
            assert transports.UvicornOutput.of(send) is None
            assert transports.UvicornOutput.of(send) is None
        warnings = [r for r in caplog.records if "not a release" in r.getMessage()]
        assert len(warnings) == 1 and "uvicorn" in warnings[0].getMessage()
    finally:
        transports.internals_known.cache_clear()


def test_a_socket_from_a_gateway_trades_websocket_pings_for_tcp_keepalive() -> None:
    import socket
    from types import SimpleNamespace

    from messaging.transports import KEEPALIVE_IDLE_S, UvicornOutput

    async def scenario() -> tuple[int, int, int]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        stopped = []
        protocol = SimpleNamespace(transport=writer.transport, stop_keepalive=lambda: stopped.append(1))
        UvicornOutput(protocol).keepalive_by_kernel()
        sock = writer.transport.get_extra_info("socket")
        result = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                  sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), len(stopped))
        writer.close()
        server.close()
        return result

    keepalive, idle, stopped = asyncio.run(scenario())
    assert keepalive == 1 and idle == KEEPALIVE_IDLE_S and stopped == 1


def test_a_brokers_membership_reads_share_its_lean_connection_and_answer_as_before(servers: Servers) -> None:
    """The first sends of many conversations at once (a broker's in-process cache empty) read their member sets
    over the append batcher's one pipelined connection: Redis accepts no new connection for them (redis-py's
    pool opened one per concurrent read, hundreds at 10,000 connections), and members and strangers get the
    same answers as through redis-py."""
    from core.errors import NotFound
    from core.keys import membership_key
    from messaging import membership, streams

    conversations = [f"lean-{uuid.uuid4().hex}" for _ in range(40)]

    async def accepted(c: redis.asyncio.Redis) -> int:
        return int((await c.info("stats"))["total_connections_received"])

    async def body(c: redis.asyncio.Redis) -> None:
        for cid in conversations:
            await c.sadd(membership_key(cid), "member", "other")
        streams.append_batching_enable(c)
        lean = streams.append_client_lean(c)
        assert lean is not None
        await lean.call("PING")  # its one connection, made before counting
        before = await accepted(c)
        await asyncio.gather(*(membership.membership_require(c, user_id="member", conversation_id=cid)
                               for cid in conversations))
        strangers = await asyncio.gather(*(membership.membership_require(c, user_id="stranger", conversation_id=cid)
                                           for cid in conversations), return_exceptions=True)
        assert all(isinstance(s, NotFound) for s in strangers)
        assert await membership.conversation_members(c, conversation_id=conversations[0]) == {"member", "other"}
        assert await accepted(c) == before  # every read on the connection already open
        await c.delete(*[membership_key(cid) for cid in conversations])

    run(servers, body)
