"""Service discovery against the session's real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis
import redis.asyncio

from chatstream_site.localcluster import child_env, manage
from chatstream_site.localservers import Servers
from core.keys import REGISTRY_INDEX_KEY
from core.registry import (
    Heartbeat,
    Instance,
    instance_deregister,
    instance_register,
    instances_list,
    instances_list_async,
)


@pytest.fixture
def client(servers: Servers) -> redis.Redis:
    c = redis.Redis.from_url(servers.redis_url)
    for key in c.scan_iter(match="cs:registry:*"):
        c.delete(key)
    c.delete(REGISTRY_INDEX_KEY)
    return c


def make(role: str, n: int) -> Instance:
    return Instance(role=role, id=f"{role}-{n}", url=f"http://127.0.0.1:{9000 + n}",
                    started_at="2026-01-01T00:00:00+00:00", last_seen="2026-01-01T00:00:00+00:00")


def test_entries_expire_with_their_ttl(client: redis.Redis) -> None:
    instance_register(client, instance=make("api", 1), ttl_s=1)
    instance_register(client, instance=make("broker", 1), ttl_s=30)
    assert [i.id for i in instances_list(client)] == ["api-1", "broker-1"]
    time.sleep(1.3)
    assert [i.id for i in instances_list(client)] == ["broker-1"]


def test_readers_list_instances_from_the_index_without_scanning_the_keyspace(
        servers: Servers, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SCAN walks every key of the Redis (2.1M at the data tier bench's 1M messages): readers use the index."""
    client.set("cs:registry:api:old", make("api", 9).to_json(), ex=30)  # registered before the index existed
    assert [i.id for i in instances_list(client)] == ["api-9"]  # an empty index: read with SCAN, as before
    client.delete("cs:registry:api:old")
    instance_register(client, instance=make("api", 3), ttl_s=30)
    instance_register(client, instance=make("broker", 3), ttl_s=30)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the registry was read with SCAN")

    monkeypatch.setattr(redis.Redis, "scan_iter", refuse)
    monkeypatch.setattr(redis.asyncio.Redis, "scan_iter", refuse)
    assert [i.id for i in instances_list(client)] == ["api-3", "broker-3"]
    assert [i.id for i in instances_list(client, role="broker")] == ["broker-3"]

    async def listed_async() -> list[str]:
        aclient = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            return [i.id for i in await instances_list_async(aclient, role="api")]
        finally:
            await aclient.aclose()

    assert asyncio.run(listed_async()) == ["api-3"]
    instance_deregister(client, role="api", instance_id="api-3")
    assert [i.id for i in instances_list(client)] == ["broker-3"]
    assert client.zscore(REGISTRY_INDEX_KEY, "api:3") is None


def test_malformed_entries_are_ignored(client: redis.Redis) -> None:
    client.set("cs:registry:api:bad", "{not json", ex=10)
    client.set("cs:registry:api:partial", json.dumps({"role": "api"}), ex=10)
    instance_register(client, instance=make("api", 2), ttl_s=10)
    assert [i.id for i in instances_list(client, role="api")] == ["api-2"]


def test_heartbeat_refreshes_then_deregisters(servers: Servers, client: redis.Redis) -> None:
    beat = Heartbeat(redis_url=servers.redis_url, role="storage", instance_id="storage-x",
                     url="http://127.0.0.1:1", interval_s=0.2, ttl_s=1)
    beat.start()
    try:
        first = instances_list(client)[0]
        time.sleep(1.5)  # longer than the TTL: only the heartbeat keeps it alive
        second = instances_list(client)[0]
        assert second.id == "storage-x" and second.last_seen > first.last_seen
        assert second.started_at == first.started_at
    finally:
        beat.stop()
    assert instances_list(client) == []


def test_services_command_prints_json_and_table(client: redis.Redis) -> None:
    instance_register(client, instance=make("gateway", 0), ttl_s=30)
    as_json = manage("services", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [
        {"role": "gateway", "id": "gateway-0", "url": "http://127.0.0.1:9000",
         "started_at": "2026-01-01T00:00:00+00:00", "last_seen": "2026-01-01T00:00:00+00:00",
         "restarts": 0, "run_id": ""}
    ]
    table = manage("services")
    assert table.returncode == 0
    header, row = table.stdout.strip().splitlines()
    assert header.split() == ["ROLE", "ID", "URL", "STARTED_AT", "LAST_SEEN", "RESTARTS"]
    assert row.split()[:3] == ["gateway", "gateway-0", "http://127.0.0.1:9000"]


def test_services_command_says_what_to_fix_when_redis_is_down() -> None:
    result = manage("services", "--json", env=child_env(REDIS_URL="redis://127.0.0.1:1/0"))
    assert result.returncode != 0
    assert "Redis unreachable" in result.stderr and "REDIS_URL=redis://127.0.0.1:1/0" in result.stderr


def test_starts_are_counted_per_run_and_slot_and_older_entries_read_as_no_restarts(client: redis.Redis) -> None:
    from core.registry import start_count_incr

    run = f"run-{time.time_ns()}"
    assert [start_count_incr(client, run_id=run, role="api", instance="1") for _ in range(3)] == [1, 2, 3]
    assert start_count_incr(client, run_id=run, role="api", instance="2") == 1  # another slot
    assert start_count_incr(client, run_id=run + "-next", role="api", instance="1") == 1  # another run
    assert 0 < client.ttl(f"cs:starts:{run}:api:1") <= 7 * 24 * 3600
    # An entry written before `restarts` existed (an instance of the previous release) still reads.
    client.set("cs:registry:api:old", json.dumps({"role": "api", "id": "old", "url": "http://127.0.0.1:1",
                                                  "started_at": "t", "last_seen": "t"}), ex=10)
    (old,) = instances_list(client, role="api")
    assert (old.id, old.restarts, old.run_id) == ("old", 0, "")
