"""A broker's heap (messaging/heap.py, docs/adr/0052): what survives is frozen out of the cyclic GC's reach, and
what a frozen object leaves in reference cycles is collected at the next thaw. The real collector, in this
process; and real brokers settling and thawing all the time while they carry messages."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatstream_site.localservers import Servers
from messaging.heap import Heap
from tests.support.realtime import brokers_running, connect_user, group_create, messages_cross_brokers, user_create


class Node:
    """An object in a reference cycle (``self.me``): only the cyclic collector frees it once unreachable."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Leave this process' collector as the test found it (a settle freezes the whole process)."""
    yield
    gc.unfreeze()


def _cycle() -> weakref.ref[Node]:
    return weakref.ref(Node())


def test_a_settle_collects_garbage_cycles_before_it_freezes(unfrozen: None) -> None:
    garbage = _cycle()
    assert garbage() is not None  # unreachable, yet alive until a collection
    Heap(thaw_after_closes=10).settle()
    assert garbage() is None


def test_a_frozen_cycle_is_kept_until_the_closes_since_the_last_thaw_reach_the_bound(unfrozen: None) -> None:
    heap = Heap(thaw_after_closes=3)
    held: list[Any] = [Node()]
    frozen = weakref.ref(held[0])
    assert heap.settle() is False
    assert gc.get_freeze_count() > 0
    held.clear()  # now garbage, but frozen: collections skip it
    gc.collect()
    assert frozen() is not None
    for _ in range(2):
        heap.connection_closed()
    assert heap.settle() is False  # two closes: no thaw yet
    gc.collect()
    assert frozen() is not None
    heap.connection_closed()
    assert heap.settle() is True  # the third: everything thawed and collected, then frozen again
    assert frozen() is None
    assert heap.closes == 0 and heap.thaws == 1
    assert gc.get_freeze_count() > 0


def test_brokers_that_settle_and_thaw_all_the_time_deliver_everything_in_order(tmp_path: Path,
                                                                               servers: Servers) -> None:
    """Every 50 ms a settle, a thaw at every close: messages cross two brokers, in seq order, nothing lost, while
    sockets come and go; no hub task fails."""
    alice, _ = user_create()
    bob, _ = user_create()
    # Two rounds, each in conversations of its own (a round's client_msg_ids start again at c0), each within a
    # connection's burst of frames (60).
    rounds = [[group_create([alice, bob]) for _ in range(2)] for _ in range(2)]

    async def churn(url: str) -> None:
        for _ in range(5):
            client = await connect_user(url, servers.redis_url, bob)
            await client.close()

    with brokers_running(tmp_path, 2, CHATSTREAM_BROKER_GC_FREEZE="0.05",
                         CHATSTREAM_BROKER_GC_THAW_AFTER_CLOSES="1") as brokers:
        for at, conversations in enumerate(rounds):
            asyncio.run(churn(brokers[at].url))
            asyncio.run(messages_cross_brokers(brokers, servers.redis_url, alice=alice, bob=bob,
                                               conversations=conversations, count=25))
        logs = [broker.log.read_text(errors="replace") for broker in brokers]
    for log in logs:
        assert "task failed" not in log and "Traceback" not in log, log[-4000:]
