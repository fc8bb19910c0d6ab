"""History across a bucket in progress (docs/adr/0041), through the REST API, the real drain, Redis and FerretDB:
the drain stores a bucket only when its range is complete and holds the window's watermark below the range in
progress, so the window keeps those messages and every page, in both directions, is served from the window and
the stored buckets with no gap, no duplicate and no ``messages`` query."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from django.test import override_settings

from chatstream_site.localservers import Servers
from core.keys import partition_of, persisted_key
from storage import services as storage
from tests.api.test_recent_window import floor_of, history, no_messages_reads, send, single, walk
from tests.support.api import account

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")
__all__ = ["no_messages_reads"]  # the fixture, used by name


def test_pages_across_a_bucket_in_progress_have_no_gap_no_duplicate_and_no_messages_query(
        servers: Servers, no_messages_reads: Any) -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    partition = partition_of(cid)
    with override_settings(RECENT_MESSAGES=10):
        first = [send(alice if i % 2 else bob, cid, f"m{i}") for i in range(73)]
        for _ in range(50):  # the real drain, without the idle flush: bucket 0 stored, 51..73 in progress
            if not storage.partition_drain(partition=partition, batch_size=500, consumer="seam-test").more:
                break
        later = [send(alice, cid, f"n{i}") for i in range(12)]
    r = redis.Redis.from_url(servers.redis_url)
    # The window dropped what is in the stored bucket (down to 10 messages) and nothing of the range in progress.
    assert int(r.hget(persisted_key(partition), cid) or 0) == 50
    assert floor_of(servers, cid) == 50
    no_messages_reads()
    for limit in (1, 7, 50):
        assert walk(bob, cid, limit=limit, backwards=True) == list(range(1, 86)), limit
        assert walk(bob, cid, limit=limit, backwards=False) == list(range(1, 86)), limit
    full = history(bob, cid, limit=200)["results"]
    assert [m["id"] for m in full] == [m["id"] for m in first + later]
    assert [m["seq"] for m in history(bob, cid, before_seq=52, limit=3)["results"]] == [49, 50, 51]
