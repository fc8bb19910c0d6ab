"""Presence after a broker crash: the sweep announces ``offline`` exactly once for users whose last session
was on a SIGKILLed broker, and never for users with a device elsewhere.

The claim script is tested against the session's Redis with an explicit clock (``now``), the whole path
against real broker processes with a 3 s presence TTL. Every wait is bounded (reaching the bound fails the
test); nothing asserts how fast it went.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from django.conf import settings

from chatstream_site.localservers import Servers, run_with_redis
from core.documents import User
from messaging import frames, presence
from tests.support.realtime import (
    Broker,
    Client,
    brokers_start,
    connect_user,
    group_create,
    status_shown,
    user_create,
    wait_until_async,
)

TTL_S = 3
# The brokers' presence settings: refresh every second, sweep every quarter second.
FAST_PRESENCE = {"CHATSTREAM_PRESENCE_TTL": str(TTL_S)}
# How long a test listens to show that a second (or any) offline did NOT come: past several sweeps of every
# broker after the expiry.
QUIET_S = 3 * TTL_S


# ------------------------------------------------------------------ the claim (one Redis, explicit clock)


def _ttl() -> int:
    return int(settings.PRESENCE_TTL_S)


async def _index_score(c: redis.asyncio.Redis, user: str) -> float | None:
    return await c.zscore(presence.PRESENCE_EXPIRING_KEY, user)


def test_an_expired_last_session_is_claimed_by_one_of_many_concurrent_callers(servers: Servers) -> None:
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        other = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            t0, ttl = int(time.time()), _ttl()
            assert await presence._presence_transition(c, user_id=user, session_id="a", add=True,
                                                       now=t0) == (1, True)
            assert await presence.presence_claim(c, user_id=user, now=t0 + ttl - 1) is None  # still live
            claims = await asyncio.gather(*(presence.presence_claim(client, user_id=user, now=t0 + ttl + 1)
                                            for _ in range(4) for client in (c, other)))
            assert sorted(claims, key=lambda a: a is None) == [t0 + ttl] + [None] * 7
            # Leased while its offline is announced, then released.
            assert await _index_score(c, user) == t0 + ttl + 1 + presence.PRESENCE_CLAIM_LEASE_S
            assert await presence.presence_release(c, user_id=user, at=t0 + ttl)
            assert await _index_score(c, user) is None
            assert not await c.exists(presence.presence_key(user))
            # Announced offline, so the next connect is a new "online".
            assert await presence._presence_transition(c, user_id=user, session_id="b", add=True,
                                                       now=t0 + ttl + 2) == (1, True)
        finally:
            await other.aclose()

    run_with_redis(servers.redis_url, body)


def test_a_claim_whose_sweep_died_is_handed_out_again_once_its_lease_ran_out(servers: Servers) -> None:
    """At least once: a broker killed between its claim and its release leaves the claim to run out."""
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        t0, ttl, lease = int(time.time()), _ttl(), presence.PRESENCE_CLAIM_LEASE_S
        await presence._presence_transition(c, user_id=user, session_id="a", add=True, now=t0)
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 1) == t0 + ttl  # then it "dies"
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + lease) is None  # lease running
        # Another sweep, after the lease: the same moment, to be announced again.
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 2 + lease) == t0 + ttl
        assert await presence.presence_claimed(c, user_id=user, at=t0 + ttl)
        assert await presence.presence_release(c, user_id=user, at=t0 + ttl)
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 3 + 2 * lease) is None
        assert await _index_score(c, user) is None

    run_with_redis(servers.redis_url, body)


def test_a_connect_during_a_claim_is_online_and_the_claiming_sweep_stands_down(servers: Servers) -> None:
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        t0, ttl = int(time.time()), _ttl()
        await presence._presence_transition(c, user_id=user, session_id="a", add=True, now=t0)
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 1) == t0 + ttl
        # A new device while the sweep writes users.status: a new "online" (the offline is being announced).
        assert await presence._presence_transition(c, user_id=user, session_id="b", add=True,
                                                   now=t0 + ttl + 2) == (1, True)
        assert not await presence.presence_claimed(c, user_id=user, at=t0 + ttl)
        assert not await presence.presence_release(c, user_id=user, at=t0 + ttl)
        assert await _index_score(c, user) == t0 + 2 * ttl + 2  # b's expiry: online, tracked as usual
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 3) is None

    run_with_redis(servers.redis_url, body)


def test_a_stale_disconnect_during_a_claim_leaves_the_offline_to_the_sweep(servers: Servers) -> None:
    """The killed broker's client disconnects late (its session already expired): no second offline, and the
    claim stands, lease included, so a dead sweeper is still redone."""
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        t0, ttl, lease = int(time.time()), _ttl(), presence.PRESENCE_CLAIM_LEASE_S
        await presence._presence_transition(c, user_id=user, session_id="a", add=True, now=t0)
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 1) == t0 + ttl
        assert await presence._presence_transition(c, user_id=user, session_id="a", add=False,
                                                   now=t0 + ttl + 2) == (0, False)
        assert await presence.presence_claimed(c, user_id=user, at=t0 + ttl)
        assert await _index_score(c, user) == t0 + ttl + 1 + lease

    run_with_redis(servers.redis_url, body)


def test_a_refreshed_session_is_not_claimed_until_it_expires(servers: Servers) -> None:
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        t0, ttl = int(time.time()), _ttl()
        await presence._presence_transition(c, user_id=user, session_id="a", add=True, now=t0)
        assert await presence.presence_refresh(c, sessions=[(user, "a")], now=t0 + ttl - 1) == []
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 1) is None
        assert await _index_score(c, user) == t0 + 2 * ttl - 1
        assert await presence.presence_claim(c, user_id=user, now=t0 + 2 * ttl) == t0 + 2 * ttl - 1

    run_with_redis(servers.redis_url, body)


def test_a_user_who_reconnected_before_the_sweep_is_not_claimed(servers: Servers) -> None:
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        t0, ttl = int(time.time()), _ttl()
        await presence._presence_transition(c, user_id=user, session_id="a", add=True, now=t0)
        # "a" expired (its broker was killed) and no sweep ran; a new device connects: no second "online",
        # since no "offline" was announced.
        assert await presence._presence_transition(c, user_id=user, session_id="b", add=True,
                                                   now=t0 + ttl + 1) == (1, False)
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 2) is None
        # Its disconnect is the one that announces offline; the sweep finds nothing after it.
        assert await presence._presence_transition(c, user_id=user, session_id="b", add=False,
                                                   now=t0 + ttl + 3) == (0, True)
        assert await presence.presence_claim(c, user_id=user, now=t0 + 3 * ttl) is None

    run_with_redis(servers.redis_url, body)


def test_a_device_on_a_live_broker_keeps_the_user_online(servers: Servers) -> None:
    user = uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        t0, ttl = int(time.time()), _ttl()
        await presence._presence_transition(c, user_id=user, session_id="dead", add=True, now=t0)
        assert await presence._presence_transition(c, user_id=user, session_id="live", add=True,
                                                   now=t0 + 1) == (2, False)
        assert await presence.presence_refresh(c, sessions=[(user, "live")], now=t0 + ttl - 1) == []
        assert await presence.presence_claim(c, user_id=user, now=t0 + ttl + 1) is None
        assert await c.zrange(presence.presence_key(user), 0, -1) == [b"live"]
        assert await presence.presence_claim(c, user_id=user, now=t0 + 2 * ttl - 1) == t0 + 2 * ttl - 1

    run_with_redis(servers.redis_url, body)


def test_refresh_does_not_resurrect_a_disconnected_or_swept_session(servers: Servers) -> None:
    closed, stalled = uuid.uuid4().hex[:24], uuid.uuid4().hex[:24]

    async def body(c: redis.asyncio.Redis) -> None:
        t0, ttl = int(time.time()), _ttl()
        # A refresh that raced the session's disconnect.
        await presence._presence_transition(c, user_id=closed, session_id="a", add=True, now=t0)
        assert await presence._presence_transition(c, user_id=closed, session_id="a", add=False,
                                                   now=t0 + 1) == (0, True)
        assert await presence.presence_refresh(c, sessions=[(closed, "a")], now=t0 + 1) == [(closed, "a")]
        assert not await c.exists(presence.presence_key(closed))
        assert await _index_score(c, closed) is None
        # A broker that stalled past the TTL: its session was swept; the refresh reports it, the hub re-adds.
        await presence._presence_transition(c, user_id=stalled, session_id="s", add=True, now=t0)
        assert await presence.presence_claim(c, user_id=stalled, now=t0 + ttl + 1) == t0 + ttl
        assert await presence.presence_refresh(c, sessions=[(stalled, "s")], now=t0 + ttl + 2) == [(stalled, "s")]
        assert await presence._presence_transition(c, user_id=stalled, session_id="s", add=True,
                                                   now=t0 + ttl + 2) == (1, True)

    run_with_redis(servers.redis_url, body)


def test_two_concurrent_sweeps_announce_and_record_the_offline_once(servers: Servers) -> None:
    user, _ = user_create()
    friend, _ = user_create()
    conv = group_create([user, friend])
    User.objects(id=user).update_one(set__status="online", set__last_seen=datetime.now(UTC))
    # A database of its own: the sweep scans the global index, and other tests' brokers live in db 0.
    url = servers.redis_url.rsplit("/", 1)[0] + "/7"
    t0, ttl = int(time.time()), _ttl()

    async def body(c: redis.asyncio.Redis) -> list[dict[str, Any]]:
        other = redis.asyncio.Redis.from_url(url)
        pubsub = c.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(frames.CONTROL_CHANNEL)
            await presence._presence_transition(c, user_id=user, session_id="a", add=True, now=t0)
            results = await asyncio.gather(presence.presence_sweep(c, now=t0 + ttl + 1),
                                           presence.presence_sweep(other, now=t0 + ttl + 1))
            assert sorted(u for gone, _looked in results for u in gone) == [user]
            # Both publications (if there were two) are on their way once the sweeps returned.
            heard: list[dict[str, Any]] = []
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is not None:
                    heard.append(json.loads(message["data"]))
            return [m for m in heard if m.get("u") == user]
        finally:
            await pubsub.aclose()
            await other.aclose()

    heard = run_with_redis(url, body)
    assert heard == [{"k": "presence", "u": user, "s": "offline", "c": [conv]}]
    record = User.objects(id=user).get()
    assert record.status == "offline"
    assert record.last_seen.replace(tzinfo=UTC) == datetime.fromtimestamp(t0 + ttl, UTC)


# ------------------------------------------------------------------ real brokers, one SIGKILLed


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[[int], list[Broker]]]:
    """Start ``count`` brokers with a short presence TTL; all are stopped after the test."""
    started: list[Broker] = []

    def start(count: int) -> list[Broker]:
        brokers = brokers_start(tmp_path, count, **FAST_PRESENCE)
        started.extend(brokers)
        return brokers

    yield start
    for broker in started:
        broker.stop()


def offlines(client: Client, user_id: str) -> list[dict[str, Any]]:
    return [f for f in client.seen
            if f["type"] == "presence" and f["user_id"] == user_id and f["status"] == "offline"]


async def presence_of(client: Client, user_id: str, status: str) -> None:
    """Wait (each frame bounded by WAIT_S) for ``presence`` ``status`` of ``user_id``. Every frame stays in
    ``client.seen``, which the counts below read."""
    while True:
        frame = await client.recv_type("presence")
        if frame["user_id"] == user_id and frame["status"] == status:
            return


@pytest.mark.cluster
def test_a_user_only_on_a_killed_broker_is_announced_offline_once(servers: Servers,
                                                                   fleet: Callable[[int], list[Broker]]) -> None:
    doomed, surviving = fleet(2)
    alice, _ = user_create()
    bob, _ = user_create()
    group_create([alice, bob])

    async def body() -> None:
        bob_ws = await connect_user(surviving.url, servers.redis_url, bob)
        await connect_user(doomed.url, servers.redis_url, alice)
        await presence_of(bob_ws, alice, "online")
        assert status_shown(alice) == "online"
        doomed.kill()
        await presence_of(bob_ws, alice, "offline")
        assert status_shown(alice) == "offline"
        await bob_ws.recv_during(QUIET_S)
        assert len(offlines(bob_ws, alice)) == 1, bob_ws.seen
        await bob_ws.close()

    asyncio.run(body())
    record = User.objects(id=alice).get()
    assert record.status == "offline" and record.last_seen is not None


@pytest.mark.cluster
def test_a_broker_nobody_connected_to_records_the_offline(servers: Servers,
                                                          fleet: Callable[[int], list[Broker]]) -> None:
    """The hub starts with the broker (ASGI lifespan, uvicorn), not with its first connection: the only
    survivor of a crash sweeps even if no client ever connected to it."""
    doomed, idle = fleet(2)
    alice, _ = user_create()

    async def body() -> None:
        ws = await connect_user(doomed.url, servers.redis_url, alice)
        await wait_until_async(lambda: status_shown(alice) == "online", what="alice online")
        doomed.kill()
        await wait_until_async(lambda: User.objects(id=alice).get().status == "offline",
                               timeout_s=QUIET_S + 10 * TTL_S, what="the idle broker to record alice offline")
        with contextlib.suppress(Exception):
            await ws.close()

    asyncio.run(body())
    assert idle.proc is not None and idle.proc.poll() is None


@pytest.mark.cluster
def test_a_user_with_a_device_on_a_surviving_broker_stays_online(servers: Servers,
                                                                  fleet: Callable[[int], list[Broker]]) -> None:
    doomed, surviving = fleet(2)
    alice, _ = user_create()  # laptop on the doomed broker, phone on the surviving one
    carol, _ = user_create()  # only on the doomed broker: the control, she must go offline
    bob, _ = user_create()
    conv = group_create([alice, bob, carol])

    async def body() -> None:
        bob_ws = await connect_user(surviving.url, servers.redis_url, bob)
        await connect_user(doomed.url, servers.redis_url, alice)
        await presence_of(bob_ws, alice, "online")
        phone = await connect_user(surviving.url, servers.redis_url, alice)
        await connect_user(doomed.url, servers.redis_url, carol)
        await presence_of(bob_ws, carol, "online")
        doomed.kill()
        await presence_of(bob_ws, carol, "offline")
        # Alice's laptop session expired with Carol's; listen well past the sweeps that followed.
        await bob_ws.recv_during(QUIET_S)
        assert offlines(bob_ws, alice) == [], bob_ws.seen
        assert len(offlines(bob_ws, carol)) == 1, bob_ws.seen
        # Her phone still works, and she is still online in the database.
        await phone.send({"type": "typing", "conversation_id": conv})
        assert (await bob_ws.recv_type("typing"))["user_id"] == alice
        assert status_shown(alice) == "online"
        await phone.close()
        await presence_of(bob_ws, alice, "offline")
        await bob_ws.close()

    asyncio.run(body())
    assert User.objects(id=carol).get().status == "offline" and status_shown(carol) == "offline"


@pytest.mark.cluster
def test_with_two_surviving_brokers_the_offline_is_announced_once(servers: Servers,
                                                                   fleet: Callable[[int], list[Broker]]) -> None:
    doomed, second, third = fleet(3)
    alice, _ = user_create()
    bob, _ = user_create()
    carol, _ = user_create()
    group_create([alice, bob, carol])

    async def body() -> None:
        bob_ws = await connect_user(second.url, servers.redis_url, bob)
        carol_ws = await connect_user(third.url, servers.redis_url, carol)
        await connect_user(doomed.url, servers.redis_url, alice)
        for watcher in (bob_ws, carol_ws):
            await presence_of(watcher, alice, "online")
        doomed.kill()
        for watcher in (bob_ws, carol_ws):
            await presence_of(watcher, alice, "offline")
        # Both surviving brokers sweep; a second announcement would reach both watchers (pub/sub fan-out).
        await asyncio.gather(bob_ws.recv_during(QUIET_S), carol_ws.recv_during(QUIET_S))
        for watcher in (bob_ws, carol_ws):
            assert len(offlines(watcher, alice)) == 1, watcher.seen
            await watcher.close()

    asyncio.run(body())
    assert User.objects(id=alice).get().status == "offline"
