"""The data tier's read state survives its faults (docs/adr/0028, 0036): a storage worker (a real Celery
process) SIGKILLed after writing its batch but before acknowledging it, then Redis SIGKILLed and restarted from
its append-only file, lose nothing of REST history (every seq once, both directions, across the window/store
seam) or of the conversation list (order, last message, unread), before and after the drain catches up.

Against the session's real Redis (restarted in place: its AOF is on) and FerretDB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from django.test import override_settings

from chatstream_site.localcluster import child_env, wait_until
from chatstream_site.localservers import ROOT, Servers
from core.keys import partition_of, persisted_key, recent_key
from storage import services as storage
from tests.api.test_recent_window import floor_of, history, listed, send, single, walk
from tests.support.api import account
from tests.support.storage import tails_flush

pytestmark = [pytest.mark.usefixtures("servers", "generous_rates"), pytest.mark.cluster]
CELERY = str(Path(sys.executable).parent / "celery")


def state(a: Any) -> list[tuple[str, int, str | None, int]]:
    """The caller's conversation list as (id, last seq, last message's content, unread), in its order."""
    return [(c["id"], c["last_seq"], (c.get("last_message") or {}).get("content"), c["unread"])
            for c in listed(a)]


def _answers(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except (redis.BusyLoadingError, redis.ConnectionError):
        return False


def test_a_killed_storage_worker_and_a_redis_crash_lose_nothing_of_history_or_the_list(
        servers: Servers, settings: Any, tmp_path: Path) -> None:
    settings.DRAIN_RECLAIM_IDLE_S = 1.0  # the killed worker's entries are taken over after 1 s
    storage.drain_all(batch_size=500, consumer="faults-setup")  # other tests' entries out of the way
    alice, bob = account("alice"), account("bob")
    busy = single(alice, bob)
    quiet = str(alice.client.post("/api/v1/chats/group", {"name": "Q", "members": [bob.username]},
                                  format="json").json()["conversation_id"])
    with override_settings(RECENT_MESSAGES=5):
        send(bob, quiet, "quiet one")
        storage.drain_all(batch_size=500, consumer="faults-setup")
        for i in range(12):
            send(alice if i % 3 else bob, busy, f"busy {i}")
    contents = [f"busy {i}" for i in range(12)]
    # A real worker drains the 12 messages into the store, then is killed before its XACK.
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - closed below
    env = child_env(REDIS_URL=servers.redis_url, MONGODB_URI=servers.mongodb_uri, DEBUG="1",
                    CHATSTREAM_FLUSH_INTERVAL="0.5", CHATSTREAM_DRAIN_RECLAIM_IDLE="1",
                    CHATSTREAM_TEST_PAUSE_BEFORE_ACK="600")
    worker = subprocess.Popen([CELERY, "-A", "chatstream_site", "worker", "-Q", "storage", "--pool", "solo",
                               "-n", "faults@%h", "--loglevel", "INFO"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    beat = subprocess.Popen([CELERY, "-A", "chatstream_site", "beat", "--schedule", str(tmp_path / "beat"),
                             "--loglevel", "INFO"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until(lambda: "paused before ack" in (tmp_path / "worker.log").read_text(errors="replace"),
                   timeout_s=120, what="the worker to pause before its ack")
    finally:
        for proc in (worker, beat):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    with override_settings(RECENT_MESSAGES=5):
        send(bob, busy, "after the kill")
    contents.append("after the kill")
    assert floor_of(servers, busy) == 0  # nothing acknowledged: the window dropped nothing
    before = state(bob), state(alice)
    # Unread: the other member's messages (alice sent 8 of the 12, bob 4 and the 13th).
    assert before == ([(busy, 13, "after the kill", 8), (quiet, 1, "quiet one", 0)],
                      [(busy, 13, "after the kill", 5), (quiet, 1, "quiet one", 1)])

    def agree() -> None:
        seqs = list(range(1, len(contents) + 1))
        assert walk(bob, busy, limit=4, backwards=True) == seqs
        assert walk(bob, busy, limit=4, backwards=False) == seqs
        assert [m["content"] for m in history(alice, busy, limit=50)["results"]] == contents

    agree()
    # Redis crashes (no clean shutdown) and comes back from its AOF.
    servers.redis.stop(sig=signal.SIGKILL)
    servers.redis.start()
    r = redis.Redis.from_url(servers.redis_url)
    wait_until(lambda: _answers(r), timeout_s=120, what="Redis to load its AOF")
    assert (state(bob), state(alice)) == before
    agree()
    # The next drain takes the killed worker's entries over; the window then drops what is persisted.
    # (Its bucket in progress stored as after a day's idleness, docs/adr/0041: the window may then drop them.)
    wait_until(lambda: storage.drain_all(batch_size=500, consumer="faults-after") >= 0
               and tails_flush(partition_of(busy)) >= 0
               and r.hget(persisted_key(partition_of(busy)), busy) == b"13",
               timeout_s=60, interval_s=1.1, what="the drain to persist the killed worker's batch")
    with override_settings(RECENT_MESSAGES=5):
        send(alice, busy, "last")
    contents.append("last")
    assert r.zcard(recent_key(partition_of(busy), busy)) == 5 and floor_of(servers, busy) == 9
    agree()
    assert state(bob) == [(busy, 14, "last", 9), (quiet, 1, "quiet one", 0)]
    assert state(alice) == [(busy, 14, "last", 5), (quiet, 1, "quiet one", 1)]
