"""Storage drain benchmark: drain throughput against a raw ``insert_many`` of the same documents into the
same server, in one run, on private Redis and FerretDB servers (or ``--mongodb-uri`` for a real MongoDB).

    .venv/bin/python bench/storage_drain.py --messages 20000 [--steady-seconds 20 --rate 300]

Phases: (1) ingest: append the messages with ``messaging.streams.event_append`` (the write path's primitive),
(2) drain: ``storage.services.partition_drain`` over every partition until empty (in this process, one
consumer, ``CHATSTREAM_BATCH_SIZE`` entries a batch), (3) raw: ``insert_many`` of the same documents, in
batches of the same size, into another collection with the same indexes, (4) optionally a steady load through
a real Celery worker and beat, sampling the drain lag (age of the oldest unpersisted entry) every 100 ms.
Figures go to docs/benchmarks.md by hand, with the machine and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatstream_site.localservers import ferretdb_server, redis_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="ingest/drain/raw rounds; medians are reported")
    parser.add_argument("--concurrency", type=int, default=50, help="appends in flight during the ingest")
    parser.add_argument("--mongodb-uri", default="", help="use this MongoDB instead of a private FerretDB")
    parser.add_argument("--steady-seconds", type=float, default=0.0, help="steady-load phase length (0: skip)")
    parser.add_argument("--rate", type=float, default=300.0, help="messages/s during the steady phase")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="chatstream-bench-"))
    rd = redis_server(workdir)
    rd.start()
    mg = None
    uri = args.mongodb_uri
    if not uri:
        mg = ferretdb_server(workdir)
        mg.start()
        uri = f"mongodb://127.0.0.1:{mg.port}/chatstream_bench"
    os.environ.update(REDIS_URL=f"redis://127.0.0.1:{rd.port}/0", MONGODB_URI=uri, CHATSTREAM_DOTENV="",
                      DEBUG="1", DJANGO_SETTINGS_MODULE="chatstream_site.settings", LOG_LEVEL="WARNING")
    try:
        run(args, workdir)
    finally:
        rd.stop()
        if mg is not None:
            mg.stop()


def run(args: argparse.Namespace, workdir: Path) -> None:
    import django

    django.setup()
    import redis
    import redis.asyncio
    from bson import ObjectId
    from django.conf import settings
    from mongoengine.connection import get_db
    from tqdm import tqdm

    from core.documents import Message
    from messaging.streams import event_append
    from storage import services
    from storage.selectors import partitions_state

    Message.ensure_indexes()
    db = get_db()
    r = redis.Redis.from_url(settings.REDIS_URL)
    convs = [str(ObjectId()) for _ in range(args.conversations)]
    senders = [str(ObjectId()) for _ in range(20)]
    print(f"servers: redis {settings.REDIS_URL}, mongodb {settings.MONGODB_URI}; batch size {settings.BATCH_SIZE}, "
          f"{settings.PARTITIONS} partitions; {args.messages} messages in {args.conversations} conversations")

    raw = db.messages_raw
    raw.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
    raw.create_index([("sender_id", 1), ("timestamp", 1)])

    async def ingest(n: int, offset: int, bar: Any) -> list[dict[str, Any]]:
        """Append ``n`` messages; return the documents the drain should write for them."""
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        docs: list[dict[str, Any]] = []
        try:
            async def one(i: int) -> None:
                cid, sender = convs[i % len(convs)], senders[i % len(senders)]
                stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                payload = {"id": uuid.uuid4().hex, "conversation_id": cid, "sender_id": sender,
                           "content": f"benchmark message {i} " + "x" * 60, "timestamp": stamp,
                           "client_msg_id": f"b{i}"}
                done = await event_append(client, type="message.new", conversation_id=cid, payload=payload,
                                          message_id=payload["id"], dedup=(sender, payload["client_msg_id"]))
                docs.append({"_id": payload["id"], "conversation_id": ObjectId(cid), "seq": done.seq,
                             "sender_id": ObjectId(sender), "client_msg_id": payload["client_msg_id"],
                             "content": payload["content"],
                             "timestamp": datetime.fromisoformat(stamp.replace("Z", "+00:00")),
                             "deleted": False, "read_status": "sent"})

            for start in range(offset, offset + n, args.concurrency):
                stop = min(offset + n, start + args.concurrency)
                await asyncio.gather(*(one(i) for i in range(start, stop)))
                bar.update(stop - start)
        finally:
            await client.aclose()
        return docs

    # Rounds alternate the phases, so a burst of load from a neighbour on this shared machine hits
    # both sides alike; the medians are the figures.
    results = []
    for rnd in range(1, args.rounds + 1):
        with tqdm(total=args.messages, desc=f"round {rnd} ingest (event_append)", unit="msg") as bar:
            t0 = time.perf_counter()
            docs = asyncio.run(ingest(args.messages, (rnd - 1) * args.messages, bar))
            ingest_s = time.perf_counter() - t0
        with tqdm(total=args.messages, desc=f"round {rnd} drain (partition_drain)", unit="msg") as bar:
            t0 = time.perf_counter()
            persisted = 0
            for p in range(int(settings.PARTITIONS)):
                for _ in range(100_000):
                    res = services.partition_drain(partition=p, batch_size=settings.BATCH_SIZE, consumer="bench")
                    persisted += res.persisted
                    bar.update(res.persisted)
                    if not res.more:
                        break
            drain_s = time.perf_counter() - t0
        assert persisted == args.messages, (persisted, args.messages)
        with tqdm(total=len(docs), desc=f"round {rnd} raw insert_many", unit="doc") as bar:
            t0 = time.perf_counter()
            for i in range(0, len(docs), settings.BATCH_SIZE):
                chunk = docs[i:i + settings.BATCH_SIZE]
                raw.insert_many(chunk, ordered=True)
                bar.update(len(chunk))
            raw_s = time.perf_counter() - t0
        results.append((args.messages / ingest_s, args.messages / drain_s, len(docs) / raw_s))
    assert db.messages.count_documents({}) == args.messages * args.rounds
    for rnd, (ing, dr, rw) in enumerate(results, 1):
        print(f"round {rnd}: ingest {ing:7.0f} msg/s   drain {dr:7.0f} msg/s   raw insert_many {rw:7.0f} doc/s   "
              f"drain/raw {dr / rw:.2f}")
    ingest_rate = statistics.median(x[0] for x in results)
    drain_rate = statistics.median(x[1] for x in results)
    raw_rate = statistics.median(x[2] for x in results)
    ratio = statistics.median(x[1] / x[2] for x in results)
    print(f"median of {args.rounds}: ingest {ingest_rate:.0f} msg/s (event_append, {args.concurrency} in flight), "
          f"drain {drain_rate:.0f} msg/s, raw insert_many {raw_rate:.0f} doc/s")
    print(f"drain / raw insert_many = {ratio:.2f}  (target >= 0.5)")
    print(f"drain / ingest          = {drain_rate / ingest_rate:.2f}  (target >= 2)")

    if args.steady_seconds > 0:
        steady(args, workdir, r, partitions_state)


def steady(args: argparse.Namespace, workdir: Path, r: Any, partitions_state: Any) -> None:
    """A real worker and beat; appends at ``--rate`` for ``--steady-seconds``; the drain lag sampled."""
    import redis.asyncio
    from bson import ObjectId
    from django.conf import settings
    from tqdm import tqdm

    from messaging.streams import event_append

    celery = str(Path(sys.executable).parent / "celery")
    env = dict(os.environ, CHATSTREAM_DOTENV="", PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING")
    log = open(workdir / "steady.log", "wb")  # noqa: SIM115 - closed below
    procs = [subprocess.Popen([celery, "-A", "chatstream_site", "worker", "-Q", "storage", "--pool", "solo",
                               "-n", f"bench{i}@%h", "--loglevel", "WARNING"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT) for i in (1, 2)]
    procs.append(subprocess.Popen([celery, "-A", "chatstream_site", "beat", "--schedule",
                                   str(workdir / "beat-schedule"), "--loglevel", "WARNING"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    samples: list[float] = []
    try:
        time.sleep(5)  # workers up

        async def load(bar: Any) -> None:
            client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
            convs = [str(ObjectId()) for _ in range(100)]
            sender = str(ObjectId())
            t0 = time.monotonic()
            sent = 0
            next_sample = t0
            while (now := time.monotonic()) - t0 < args.steady_seconds:
                due = int((now - t0) * args.rate)
                while sent < due:
                    cid = convs[sent % len(convs)]
                    mid = uuid.uuid4().hex
                    await event_append(client, type="message.new", conversation_id=cid, message_id=mid,
                                       payload={"id": mid, "conversation_id": cid, "sender_id": sender,
                                                "content": f"steady {sent}", "client_msg_id": f"s{sent}",
                                                "timestamp": datetime.now(UTC).isoformat()},
                                       dedup=(sender, f"s{sent}"))
                    sent += 1
                    bar.update(1)
                if now >= next_sample:
                    states = partitions_state(client=r)
                    samples.append(max(s.lag_s() for s in states))
                    next_sample = now + 0.1
                await asyncio.sleep(0.005)
            await client.aclose()

        with tqdm(total=int(args.steady_seconds * args.rate), desc="steady load", unit="msg") as bar:
            asyncio.run(load(bar))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        log.close()
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f"steady {args.rate:.0f} msg/s for {args.steady_seconds:.0f} s, 2 workers + beat, flush interval "
          f"{settings.FLUSH_INTERVAL_S} s: drain lag (oldest unpersisted entry, sampled every 100 ms, "
          f"n={len(samples)}) median {statistics.median(samples):.2f} s, p99 {p99:.2f} s, max {samples[-1]:.2f} s "
          f"(target p99 <= {settings.FLUSH_INTERVAL_S + 1:.1f} s)")


if __name__ == "__main__":
    main()
