"""Fault tests of the storage pipeline with real processes (Celery workers and beat, or plain drainers) on
private Redis and FerretDB servers of each test, so stopping and killing them disturbs no other test."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
from bson import ObjectId
from redis import Redis

from chatstream_site.localcluster import child_env, wait_until
from chatstream_site.localservers import ROOT, Server, ferretdb_server, free_port, redis_server
from core.keys import GROUP, stream_key
from storage.selectors import deadletters_list, partitions_state
from tests.support.storage import append_events, conversation_in, edit_event, new_event, send_messages

pytestmark = pytest.mark.cluster
PARTITION = 9
CELERY = str(Path(sys.executable).parent / "celery")


@dataclass
class Rig:
    """Private servers, and the storage processes started on them."""

    tmp: Path
    redis: Server
    mongo: Server
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    @property
    def mongo_uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo.port}/chatstream_faults"

    def env(self, **extra: str) -> dict[str, str]:
        # Short intervals so a fault test takes seconds: a tick every 0.5 s, locks of killed drains gone in
        # 3 s, orphaned entries reclaimed after 1 s idle, MongoDB declared away after 1.5 s.
        base = dict(REDIS_URL=self.redis_url, MONGODB_URI=self.mongo_uri, DEBUG="1",
                    CHATSTREAM_FLUSH_INTERVAL="0.5", CHATSTREAM_DRAIN_LOCK_TTL="3",
                    CHATSTREAM_DRAIN_RECLAIM_IDLE="1", CHATSTREAM_MONGODB_TIMEOUT_MS="1500")
        return child_env(**{**base, **extra})

    def spawn(self, name: str, argv: list[str], **extra: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(**extra), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, **extra: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, [CELERY, "-A", "chatstream_site", "worker", "-Q", "storage", "--pool", "solo",
                                 "-n", f"{name}@%h", "--loglevel", "INFO"], **extra)

    def beat(self) -> subprocess.Popen[bytes]:
        return self.spawn("beat", [CELERY, "-A", "chatstream_site", "beat", "--schedule",
                                   str(self.tmp / "beat-schedule"), "--loglevel", "INFO"])

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))

    def r(self) -> Redis:
        return Redis(port=self.redis.port)

    def messages(self, cid: str) -> list[dict[str, Any]]:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(self.mongo_uri,
                                                                          serverSelectionTimeoutMS=5000)
        try:
            return list(client.get_default_database().messages.find({"conversation_id": ObjectId(cid)}))
        finally:
            client.close()

    def state(self, partition: int = PARTITION) -> Any:
        client = self.r()
        try:
            return partitions_state(partitions=[partition], client=client)[0]
        finally:
            client.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rd, mg = redis_server(tmp_path), ferretdb_server(tmp_path)
    rd.start()
    mg.start()
    rig = Rig(tmp_path, rd, mg)
    try:
        yield rig
    finally:
        for proc in rig.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        rd.stop()
        mg.stop()


def assert_exactly_once(rig: Rig, cid: str, expected_ids: list[str], *, seqs: list[int] | None = None) -> None:
    """Every expected message is in MongoDB once, with its own seq (1..n unless ``seqs`` says otherwise)."""
    docs = rig.messages(cid)
    ids = [d["_id"] for d in docs]
    assert len(ids) == len(set(ids)) == len(expected_ids), (len(ids), len(expected_ids))
    assert set(ids) == set(expected_ids)
    assert sorted(d["seq"] for d in docs) == (sorted(seqs) if seqs is not None
                                              else list(range(1, len(expected_ids) + 1)))


def test_sigkilled_worker_mid_batch_is_reclaimed_by_another_and_every_message_lands_once(rig: Rig) -> None:
    cid, sender = conversation_in(PARTITION), str(ObjectId())
    first = send_messages(rig.redis_url, cid, sender, 150)
    # Worker A writes its batch of 100 to MongoDB, then stops before XACK (the test hook): killed there.
    a = rig.worker("storage-a", CHATSTREAM_TEST_PAUSE_BEFORE_ACK="600", CHATSTREAM_BATCH_SIZE="100")
    rig.beat()
    wait_until(lambda: "paused before ack" in rig.log("storage-a"), timeout_s=120, what="worker A to pause")
    written = rig.messages(cid)
    assert len(written) == 100 and rig.state().pending == 100  # in MongoDB, not acknowledged
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    more = send_messages(rig.redis_url, cid, sender, 50, prefix="after-kill")

    # Worker B, started as `make run` starts the storage role (with its /metrics), takes over.
    port = free_port()
    rig.spawn("storage-b", [sys.executable, "manage.py", "role", "storage", "--instance", "2", "--port", str(port)],
              CHATSTREAM_BATCH_SIZE="100")
    try:
        wait_until(lambda: rig.state().backlog == 0, timeout_s=180, interval_s=0.5, what="the backlog to drain")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    assert_exactly_once(rig, cid, [x.message_id for x in first + more])
    lines = [json.loads(line.split("storage.drain ", 1)[1]) for line in rig.log("storage-b").splitlines()
             if "storage.drain {" in line]
    assert sum(line["reclaimed"] for line in lines) >= 100, lines  # A's batch, taken over by B
    metrics = wait_until(lambda: _get(f"http://127.0.0.1:{port}/metrics"), timeout_s=30, what="/metrics")
    assert f'chatstream_storage_backlog{{partition="{PARTITION}"}} 0.0' in metrics
    assert f'chatstream_storage_persisted_total{{partition="{PARTITION}"}}' in metrics


def _get(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def test_mongodb_outage_acks_nothing_unpersisted_and_the_backlog_drains_after(rig: Rig) -> None:
    cid, sender = conversation_in(PARTITION), str(ObjectId())
    rig.worker("storage-1")
    rig.beat()
    sent = send_messages(rig.redis_url, cid, sender, 50)
    wait_until(lambda: len(rig.messages(cid)) == 50 and rig.state().backlog == 0, timeout_s=120,
               what="the first messages to persist")
    rig.mongo.stop()
    outages_before = int(rig.r().hget(f"cs:{{p{PARTITION:02d}}}:drain:stats", "outages") or 0)
    during = send_messages(rig.redis_url, cid, sender, 100, prefix="during")  # appends go on
    # Longer than a drain interval: the worker tried, and failed, at least twice.
    wait_until(lambda: int(rig.r().hget(f"cs:{{p{PARTITION:02d}}}:drain:stats", "outages") or 0)
               >= outages_before + 2, timeout_s=120, what="drain attempts during the outage")
    during += send_messages(rig.redis_url, cid, sender, 50, prefix="later")
    state = rig.state()
    assert state.backlog == 150, state  # nothing acknowledged that is not persisted
    assert state.lag_s() > 0
    rig.mongo.start()
    try:
        wait_until(lambda: rig.state().backlog == 0, timeout_s=180, interval_s=0.5,
                   what="the backlog to drain after the outage")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    assert_exactly_once(rig, cid, [x.message_id for x in sent + during])
    assert "unavailable" in rig.log("storage-1")


DRAINER = """
import os, sys, django, json
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatstream_site.settings")
django.setup()
import redis
from django.conf import settings
from storage.services import partition_drain
partition, consumer, stop_key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
r = redis.Redis.from_url(settings.REDIS_URL)
r.set(f"test:ready:{consumer}", "1")
persisted = batches = 0
from storage.selectors import partitions_state
for _ in range(20000):  # bounded
    res = partition_drain(partition=partition, batch_size=15, consumer=consumer)
    persisted += res.persisted
    batches += 1 if res.read else 0
    if not res.read and r.exists(stop_key) and partitions_state(partitions=[partition])[0].backlog == 0:
        break
print(json.dumps({"persisted": persisted, "batches": batches}))
"""


def test_two_workers_draining_one_partition_concurrently_write_each_message_once_in_order(rig: Rig) -> None:
    r = rig.r()
    convs = [conversation_in(PARTITION) for _ in range(3)]
    sender = str(ObjectId())
    drainers = [subprocess.Popen([sys.executable, "-c", DRAINER, str(PARTITION), f"drainer-{i}", "test:stop"],
                                 cwd=ROOT, env=rig.env(CHATSTREAM_DRAIN_RECLAIM_IDLE="30"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    rig.procs.extend(drainers)  # type: ignore[arg-type,unused-ignore]
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(rig.mongo_uri)
    db = client.get_default_database()
    for cid in convs:
        db.conversations.insert_one({"_id": ObjectId(cid), "type": "group", "room_id": ObjectId(),
                                     "members": [ObjectId(sender)], "last_seq": 0})
    seen: dict[str, list[int]] = {cid: [] for cid in convs}
    stop_watch = threading.Event()

    def watch() -> None:  # last_seq as readers see it while both drainers write
        while not stop_watch.is_set():
            for c in db.conversations.find({"_id": {"$in": [ObjectId(x) for x in convs]}}):
                seen[str(c["_id"])].append(int(c.get("last_seq", 0)))

    wait_until(lambda: r.exists("test:ready:drainer-0", "test:ready:drainer-1") == 2, timeout_s=60,
               what="both drainers to start")  # so both take part from the first message on
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sent: dict[str, list[str]] = {cid: [] for cid in convs}
    sent_seqs: dict[str, list[tuple[str, int]]] = {cid: [] for cid in convs}
    final: dict[str, str] = {}
    try:
        for round_ in range(10):
            for cid in convs:
                batch = send_messages(rig.redis_url, cid, sender, 20, prefix=f"r{round_}-", concurrency=5)
                sent[cid] += [b.message_id for b in batch]
                sent_seqs[cid] += [(b.message_id, b.seq) for b in batch]
                # Edits right behind their messages: a drainer may get the edit before the other wrote the create.
                target = batch[-1].message_id
                append_events(rig.redis_url, [edit_event(cid, target, f"edit {n} of r{round_}", sender)
                                              for n in range(3)])
                final[target] = f"edit 2 of r{round_}"
        r.set("test:stop", "1")
        outputs = [d.communicate(timeout=300) for d in drainers]
    finally:
        stop_watch.set()
        watcher.join(timeout=10)
    for d, (_out, err) in zip(drainers, outputs, strict=True):
        assert d.returncode == 0, err[-3000:]
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(s["batches"] > 0 for s in stats), stats  # both really drained
    assert rig.state().backlog == 0
    assert not [d for d in deadletters_list(limit=1000, client=r)]
    for cid in convs:
        assert_exactly_once(rig, cid, sent[cid], seqs=[seq for _, seq in sent_seqs[cid]])
        conv: Any = db.conversations.find_one({"_id": ObjectId(cid)})
        assert conv["last_seq"] == 20 * 10 + 3 * 10  # messages and edits, every seq of the conversation
        newest = max(sent_seqs[cid], key=lambda pair: pair[1])
        assert (conv["lastMessage"]["id"], conv["lastMessage"]["seq"]) == newest
        assert seen[cid] == sorted(seen[cid]), "last_seq moved backwards"
    for mid, content in final.items():
        found: Any = db.messages.find_one({"_id": mid})
        assert found["content"] == content
    client.close()


def _last_delivered(r: Redis) -> str:
    groups: Any = r.xinfo_groups(stream_key(PARTITION))
    return next(g["last-delivered-id"].decode() for g in groups if g["name"] == GROUP.encode())


def test_redis_crash_with_aof_keeps_streams_groups_pending_entries_and_seqs(rig: Rig) -> None:
    cid, sender = conversation_in(PARTITION), str(ObjectId())
    worker = rig.worker("storage-1")
    beat = rig.beat()
    first = send_messages(rig.redis_url, cid, sender, 100)
    wait_until(lambda: rig.state().backlog == 0, timeout_s=120, what="the first messages to persist")
    for proc in (worker, beat):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    second = send_messages(rig.redis_url, cid, sender, 100, prefix="second")
    probe = new_event(cid, sender, "probe")
    accepted = append_events(rig.redis_url, [probe])[0]
    assert accepted.seq == 201
    r = rig.r()
    r.xreadgroup(GROUP, "ghost", {stream_key(PARTITION): ">"}, count=30)  # a worker that died mid-batch
    before = rig.state()
    assert (before.pending, before.undelivered) == (30, 71)

    # A crash, not a clean shutdown: with appendonly yes (appendfsync everysec), Redis writes each command to
    # the AOF before it replies, so everything a client was told is accepted survives a killed process.
    rig.redis.stop(sig=signal.SIGKILL)
    rig.redis.start()
    after = rig.state()
    assert (after.pending, after.appended) == (30, 201), after
    undelivered = r.xrange(stream_key(PARTITION), min=f"({_last_delivered(r)}", count=1000)
    assert len(undelivered) == 71
    # Redis 7.0 restores the group's entries-read counter inexactly: its lag (our backlog figure) may
    # overcount until the group has read to the end, never undercount.
    assert after.undelivered >= 71
    again = append_events(rig.redis_url, [probe])[0]  # a client retrying a send accepted before the crash
    assert again.duplicate and (again.message_id, again.seq) == (accepted.message_id, accepted.seq)
    third = send_messages(rig.redis_url, cid, sender, 1, prefix="third")
    assert third[0].seq == 202  # the seq counter survived: no seq is handed out twice

    rig.worker("storage-2")
    rig.beat()
    try:
        wait_until(lambda: rig.state().backlog == 0, timeout_s=180, interval_s=0.5, what="the backlog to drain")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    assert_exactly_once(rig, cid, [x.message_id for x in first + second + [accepted] + third])


def test_make_run_cluster_persists_accepted_messages_and_serves_storage_metrics(tmp_path: Path,
                                                                                servers: Any) -> None:
    """The storage roles exactly as `make run` starts them (two workers and beat under supervisord) drain what
    the write path's primitive appends, and each worker serves /metrics on its registered URL."""
    from chatstream_site.localcluster import Cluster, manage

    cluster = Cluster(tmp_path, CHATSTREAM_FLUSH_INTERVAL="0.5")
    cluster.start()
    try:
        cluster.wait_ready()
        cid, sender = conversation_in(4), str(ObjectId())
        sent = send_messages(servers.redis_url, cid, sender, 120, concurrency=10)
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(servers.mongodb_uri)
        try:
            messages = client.get_default_database().messages
            wait_until(lambda: messages.count_documents({"conversation_id": ObjectId(cid)}) == 120,
                       timeout_s=120, interval_s=0.5, what="the cluster to persist the messages")
            assert {m["_id"] for m in messages.find({"conversation_id": ObjectId(cid)})} == \
                {a.message_id for a in sent}
        finally:
            client.close()
        listed = manage("services", "--json", env=cluster.env)
        storage_urls = [i["url"] for i in json.loads(listed.stdout) if i["role"] == "storage"]
        assert len(storage_urls) == 2
        for url in storage_urls:
            text = wait_until(functools.partial(_get, f"{url}/metrics"), timeout_s=30, what=f"{url}/metrics")
            assert 'chatstream_storage_backlog{partition="4"}' in text
            assert "chatstream_storage_persisted_per_second" in text
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.log_tail(80)}") from None
    finally:
        cluster.stop()


def test_a_worker_isolates_bad_entries_after_an_outage_that_blamed_none(rig: Rig) -> None:
    """Issue 11: entries MongoDB cannot take (a lone surrogate that does not encode; a NaN on which FerretDB
    closes the connection, as an outage does) sit in a partition among good messages of another user while
    MongoDB is down. The outage dead-letters nothing and acknowledges nothing; once MongoDB is back, the worker
    persists every good message once and dead-letters exactly the two bad entries."""
    good_cid, bad_cid = conversation_in(PARTITION), conversation_in(PARTITION)
    alice, mallory = str(ObjectId()), str(ObjectId())
    rig.worker("storage-1")
    rig.beat()
    rig.mongo.stop()
    stats = f"cs:{{p{PARTITION:02d}}}:drain:stats"
    outages_before = int(rig.r().hget(stats, "outages") or 0)
    good = send_messages(rig.redis_url, good_cid, alice, 30, prefix="before")
    surrogate, nan = new_event(bad_cid, mallory, "x\ud800y"), new_event(bad_cid, mallory, "nan")
    nan["payload_extra"]["client_msg_id"] = float("nan")
    bad = append_events(rig.redis_url, [surrogate, nan])
    good += send_messages(rig.redis_url, good_cid, alice, 30, prefix="after")
    wait_until(lambda: int(rig.r().hget(stats, "outages") or 0) >= outages_before + 2, timeout_s=120,
               what="drain attempts during the outage")
    assert rig.state().backlog == 62 and deadletters_list(limit=1000, client=rig.r()) == []
    rig.mongo.start()
    try:
        wait_until(lambda: rig.state().backlog == 0, timeout_s=180, interval_s=0.5,
                   what="the backlog to drain after the outage")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    assert_exactly_once(rig, good_cid, [x.message_id for x in good])
    assert rig.messages(bad_cid) == []
    letters = {d.entry_id: d.reason for d in deadletters_list(limit=1000, client=rig.r())}
    assert set(letters) == {b.entry_id for b in bad}, letters
    assert "surrogates not allowed" in letters[bad[0].entry_id]
    assert "closed the connection" in letters[bad[1].entry_id]
