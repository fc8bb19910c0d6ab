"""Where a drain batch's time goes as the store grows (docs/adr/0041), on a private Redis and FerretDB (SQLite,
``make run``'s store), the drain run in this process so each phase can be timed.

    nice -n 5 .venv/bin/python -m bench.drain_scale --sizes 10000 100000 [--conversations 20000 --probe 3000]

Per size, from empty servers: ``--conversations`` 1:1 conversations hold ``size`` messages between them (a
few conversations, ``--hot``, a tenth of them), stored as the drain would have stored them (``messages``,
complete ``message_buckets``, ``conversations.last_seq`` and the seq counters in Redis), written in bulk. Then
``--probe`` ``message.new`` events, each into another random conversation (the drain's worst case: every
message is its conversation's only one in the batch), are appended with ``messaging.streams.event_append`` and
drained with ``storage.services.partition_drain`` (``CHATSTREAM_BATCH_SIZE``). Reported: msg/s, the wall time
of each drain phase (``insert_new``, ``buckets_write``, ``conversation_ops`` with its ``_id`` reads, the
``conversations`` update), and FerretDB's CPU seconds (``/proc``) per 1,000 messages.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.drain_guards import drain_all  # noqa: E402
from chatstream_site.localservers import ferretdb_server, redis_server  # noqa: E402

TIMES: dict[str, float] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--hot", type=int, default=10)
    parser.add_argument("--probe", type=int, default=3_000)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # one size, in a child process
    args = parser.parse_args()
    if not args.one:  # every size in its own process (Django reads its settings once) on fresh servers
        for size in sorted(args.sizes):
            subprocess.run([sys.executable, "-m", "bench.drain_scale", "--one", str(size), "--conversations",
                            str(args.conversations), "--hot", str(args.hot), "--probe", str(args.probe)],
                           check=True, cwd=ROOT)
        return
    workdir = Path(tempfile.mkdtemp(prefix="cs-drain-scale-"))
    rd, mg = redis_server(workdir), ferretdb_server(workdir)
    rd.start()
    mg.start()
    os.environ.update(REDIS_URL=f"redis://127.0.0.1:{rd.port}/0", CHATSTREAM_DOTENV="", DEBUG="1",
                      MONGODB_URI=f"mongodb://127.0.0.1:{mg.port}/chatstream_bench",
                      DJANGO_SETTINGS_MODULE="chatstream_site.settings", LOG_LEVEL="WARNING")
    try:
        assert mg.proc is not None
        print(json.dumps(run(args, args.one, ferretdb_pid=mg.proc.pid)), flush=True)
    finally:
        rd.stop()
        mg.stop()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - t
    return wrapper


def fill(db: Any, *, size: int, conversations: int, hot: int,
         rnd: random.Random) -> tuple[list[Any], dict[Any, int], dict[str, dict[str, Any]]]:
    """``size`` messages over ``conversations`` conversations as the drain leaves them, in bulk: complete
    buckets stored, each conversation's incomplete one returned (the caller puts it in Redis as a tail)."""
    from bson import ObjectId

    from core.documents import BUCKET_SEQS, bucket_id

    users = [ObjectId() for _ in range(2 * conversations)]
    convs = [ObjectId() for _ in range(conversations)]
    last: dict[Any, int] = dict.fromkeys(convs, 0)
    hot_convs = convs[:hot]
    for _ in range(size):  # bounded: size messages
        c = rnd.choice(hot_convs) if rnd.random() < 0.1 else rnd.choice(convs)
        last[c] += 1
    now = datetime.now(UTC)
    msgs: list[dict[str, Any]] = []
    buckets: dict[str, dict[str, Any]] = {}

    def flush() -> None:
        if msgs:
            db.messages.insert_many(msgs, ordered=False)
            msgs.clear()
        whole = [b for b in buckets.values() if not any(b is t for t in tails.values())]
        if whole:
            db.message_buckets.insert_many(whole, ordered=False)
        buckets.clear()

    tails: dict[str, dict[str, Any]] = {}  # each conversation's last, incomplete bucket: a tail in Redis
    for n, c in enumerate(convs):
        a, b = users[2 * n], users[2 * n + 1]
        if last[c] % BUCKET_SEQS:
            tails[str(c)] = buckets.setdefault(bucket_id(str(c), last[c]), {
                "_id": bucket_id(str(c), last[c]), "conversation_id": c, "n": (last[c] - 1) // BUCKET_SEQS,
                "m": {}, "partial": False})
        for seq in range(1, last[c] + 1):
            mid = uuid.uuid4().hex
            sender = (a, b)[seq % 2]
            msgs.append({"_id": mid, "conversation_id": c, "seq": seq, "sender_id": sender, "client_msg_id": mid,
                         "content": f"bench {mid[:24]}", "timestamp": now, "deleted": False, "read_status": "sent"})
            bid = bucket_id(str(c), seq)
            bucket = buckets.setdefault(bid, {"_id": bid, "conversation_id": c, "n": (seq - 1) // BUCKET_SEQS,
                                              "m": {}, "partial": False})
            bucket["m"][str(seq)] = {"id": mid, "seq": seq, "sender_id": sender, "content": f"bench {mid[:24]}",
                                     "timestamp": now, "client_msg_id": mid, "deleted": False}
        if len(msgs) >= 2000:  # between conversations: a bucket is inserted whole
            flush()
    flush()
    docs = [{"_id": c, "type": "single", "room_id": ObjectId(), "members": [users[2 * n], users[2 * n + 1]],
             "last_seq": last[c], "read_cursors": {}, "created_at": now, "updated_at": now}
            for n, c in enumerate(convs)]
    for at in range(0, len(docs), 2000):
        db.conversations.insert_many(docs[at:at + 2000], ordered=False)
    return users, last, tails


def run(args: argparse.Namespace, size: int, *, ferretdb_pid: int) -> dict[str, Any]:
    import django

    django.setup()
    import redis
    import redis.asyncio
    from django.conf import settings
    from mongoengine.connection import disconnect, get_db

    from core.documents import BUCKET_SEQS, Message, MessageBucket
    from core.keys import partition_of, persisted_key, seq_key
    from messaging.streams import event_append
    from storage import buckets, rules, services
    from storage.mongo import mongo_connect

    disconnect()
    mongo_connect()
    Message.ensure_indexes()
    MessageBucket.ensure_indexes()
    db = get_db()
    rnd = random.Random(5)  # noqa: S311 - a reproducible workload
    t = time.perf_counter()
    users, last, tails = fill(db, size=size, conversations=args.conversations, hot=args.hot, rnd=rnd)
    fill_s = time.perf_counter() - t
    sync = redis.Redis.from_url(settings.REDIS_URL)
    pipe = sync.pipeline(transaction=False)
    for c, seq in last.items():
        pipe.hset(seq_key(partition_of(str(c))), str(c), seq)
    for c, seq in last.items():  # the window keeps what is not in a stored bucket (docs/adr/0041)
        pipe.hset(persisted_key(partition_of(str(c))), str(c), seq - seq % BUCKET_SEQS)
    pipe.execute()
    by_partition: dict[int, buckets.Tails] = {}
    for cid, doc in tails.items():
        p = partition_of(cid)
        by_partition.setdefault(p, buckets.Tails(partition=p)).of[cid] = buckets.Tail(
            n=doc["n"], first=True, m=doc["m"], new=True)
    for group in by_partition.values():
        buckets.tails_save(sync, group)
    convs = list(last)
    for name in ("insert_new", "buckets_write", "message_ops", "insert_versions", "conversation_ops",
                 "updates_write"):
        setattr(services, name, timed(name, getattr(services, name)))
    for name in ("message", "conversation", "bucket"):
        setattr(rules.Seen, name, timed(f"seen.{name}", getattr(rules.Seen, name)))

    async def append() -> None:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            async def one(k: int) -> None:
                n = rnd.randrange(len(convs))
                c, mid, sender = convs[n], uuid.uuid4().hex, str(users[2 * n + k % 2])
                await event_append(client, type="message.new", conversation_id=str(c),
                                   payload={"id": mid, "conversation_id": str(c), "sender_id": sender,
                                            "content": f"probe {k}", "timestamp": now, "client_msg_id": mid},
                                   message_id=mid, dedup=(sender, mid))

            for at in range(0, args.probe, 100):
                await asyncio.gather(*(one(k) for k in range(at, min(args.probe, at + 100))))
        finally:
            await client.aclose()

    asyncio.run(append())
    cpu0, t = cpu_s(ferretdb_pid), time.perf_counter()
    done = drain_all()
    wall = time.perf_counter() - t
    cpu = cpu_s(ferretdb_pid) - cpu0
    return {"messages_stored": size, "conversations": args.conversations, "fill_s": round(fill_s, 1),
            "persisted": done, "drain_msg_s": round(done / wall), "drain_s": round(wall, 2),
            "ferretdb_cpu_s_per_1000": round(cpu / max(done, 1) * 1000, 2),
            "phase_ms_per_1000": {k: round(v / max(done, 1) * 1e6) for k, v in sorted(TIMES.items())},
            "load": os.getloadavg()}


if __name__ == "__main__":
    main()
