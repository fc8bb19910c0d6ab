"""The lean RESP client of the brokers' hot commands (messaging/resp.py) against the session's real Redis: replies
and errors as redis-py gives them, a lost or stuck connection fails what is in flight and the next call
reconnects, and the batched append keeps its promises over it (gap-free seqs, deduplicated retries)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions
import uvloop

from chatstream_site.localservers import Servers
from messaging import streams
from messaging.resp import RespClient, command_pack, resp_client_for


def test_command_pack_is_resp_arrays_of_bulk_strings() -> None:
    assert command_pack(["SET", "k", b"v\r\n", 42]) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$2\r\n42\r\n"
    assert command_pack(["ECHO", "é"]) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(redis.exceptions.DataError):
        command_pack(["SET", "k", 1.5])  # type: ignore[list-item]
    with pytest.raises(redis.exceptions.DataError):
        command_pack(["SET", "k", True])


def test_resp_client_for_follows_the_redis_py_client_or_declines(servers: Servers) -> None:
    plain = redis.asyncio.Redis.from_url(servers.redis_url + "?db=3", socket_timeout=7)
    fast = resp_client_for(plain)
    assert fast is not None and fast.db == 3 and fast.timeout_s == 7
    assert resp_client_for(redis.asyncio.Redis.from_url("rediss://127.0.0.1:1/0")) is None  # TLS: redis-py
    assert resp_client_for(object()) is None


class WriteCounter:
    """A transport that counts its writes."""

    def __init__(self, transport: Any) -> None:
        self.transport, self.count = transport, 0

    def write(self, data: bytes) -> None:
        self.count += 1
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


# Both loops the brokers run on: uvloop's transports are not asyncio.Transport subclasses.
@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_replies_errors_and_pipelining(servers: Servers, runner: Any) -> None:
    key = f"test:resp:{uuid.uuid4().hex}"

    async def run() -> None:
        client = resp_client_for(redis.asyncio.Redis.from_url(servers.redis_url))
        assert client is not None
        try:
            replies = await client.execute([["SET", key, "v"], ["GET", key], ["INCR", key], ["GET", key + ":none"],
                                            ["EVALSHA", "0" * 40, 0], ["RPUSH", key + ":l", "a", "b"]])
            assert replies[:2] == [b"OK", b"v"]
            assert isinstance(replies[2], redis.exceptions.ResponseError)  # not an integer: returned, not raised
            assert replies[3] is None
            assert isinstance(replies[4], redis.exceptions.NoScriptError)
            assert replies[5] == 2
            with pytest.raises(redis.exceptions.ResponseError):
                await client.call("INCR", key)
            # Many concurrent callers on the one connection each get their own replies, and what they sent in
            # one loop turn went out in one write (one send system call).
            protocol = client._protocol
            assert protocol is not None
            writes = WriteCounter(protocol.transport)
            protocol.transport = writes
            got = await asyncio.gather(*(client.call("ECHO", f"n{i}") for i in range(200)))
            assert got == [f"n{i}".encode() for i in range(200)]
            assert writes.count == 1
            assert await client.call("DEL", key, key + ":l") == 2
        finally:
            client.close()

    runner(run())


def test_a_lost_connection_fails_what_is_in_flight_and_the_next_call_reconnects(servers: Servers) -> None:
    admin = redis.Redis.from_url(servers.redis_url)
    key = f"test:resp:block:{uuid.uuid4().hex}"

    async def run() -> None:
        client = resp_client_for(redis.asyncio.Redis.from_url(servers.redis_url))
        assert client is not None
        try:
            own_id = await client.call("CLIENT", "ID")
            blocked = asyncio.ensure_future(client.call("BLPOP", key, 30))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(admin.client_kill_filter, _id=own_id)
            with pytest.raises(redis.exceptions.ConnectionError):
                await asyncio.wait_for(blocked, 10)
            assert await client.call("PING") == b"PONG"
            assert await client.call("CLIENT", "ID") != own_id
        finally:
            client.close()

    asyncio.run(run())
    admin.close()


def test_an_unanswered_batch_times_out_and_the_connection_is_replaced(servers: Servers) -> None:
    key = f"test:resp:block:{uuid.uuid4().hex}"

    async def run() -> None:
        client = RespClient(host="127.0.0.1", port=redis.Redis.from_url(servers.redis_url).connection_pool
                            .connection_kwargs["port"], timeout_s=0.3)
        try:
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.call("BLPOP", key, 5)  # Redis holds it 5 s; the client gives up at 0.3 s
            assert await client.call("PING") == b"PONG"
        finally:
            client.close()

    asyncio.run(run())


def test_batched_appends_over_the_lean_client_stay_gap_free_and_deduplicated(servers: Servers) -> None:
    conversation_id = uuid.uuid4().hex[:24]

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        streams.append_batching_enable(client)
        assert streams._batchers[client].fast is not None
        try:
            async def send(i: int) -> tuple[int, str]:
                result = await streams.event_append(
                    client, type="message.new", conversation_id=conversation_id,
                    payload={"content": f"m{i}"}, message_id=uuid.uuid4().hex, dedup=("u1", f"c{i}"),
                    meta=(f"cs:msgmeta:test:{conversation_id}:{i}", {"c": conversation_id, "u": "u1"}, 60))
                return result.seq, result.message_id

            await client.script_flush()  # the first batch meets NOSCRIPT and loads the script
            first = await asyncio.gather(*(send(i) for i in range(300)))  # more than one batch (MAX_BATCH)
            assert sorted(seq for seq, _ in first) == list(range(1, 301))
            # Connected now: batches are written at once and answered by a callback, which re-runs the
            # appends the server answered NOSCRIPT (its scripts flushed, as after a restart) in a task.
            await client.script_flush()
            assert await asyncio.gather(*(send(i) for i in range(300))) == first
            assert await client.hgetall(f"cs:msgmeta:test:{conversation_id}:7") == {
                b"c": conversation_id.encode(), b"u": b"u1"}
        finally:
            streams._batchers[client].fast.close()
            await client.aclose()

    asyncio.run(run())
