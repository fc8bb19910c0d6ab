"""Where a drain batch's time goes as the store grows (docs/adr/0041), on a private Redis and FerretDB (SQLite,
``make run``'s store), the drain run in this process so each phase can be timed.

    nice -n 5 .venv/bin/python -m bench.drain_scale --sizes 10000 100000 [--conversations 20000 --probe 3000]
        [--trees /path/to/another/checkout] [--rounds 2] [--quiet-lock /work/wt] [--profile DIR]

Per size, from empty servers: ``--conversations`` 1:1 conversations hold ``size`` messages between them (a
few conversations, ``--hot``, a tenth of them), stored as the drain would have stored them (``messages``,
complete ``message_buckets``, ``conversations.last_seq`` and the seq counters in Redis), written in bulk. Then
``--probe`` ``message.new`` events, each into another random conversation (the drain's worst case: every
message is its conversation's only one in the batch), are appended with ``messaging.streams.event_append`` and
drained with ``storage.services.partition_drain`` (``CHATSTREAM_BATCH_SIZE``). Reported: msg/s, the wall time
of each drain phase (``insert_new``, ``buckets_write``, ``conversation_ops`` with its ``_id`` reads, the
``conversations`` update, ``search_index_write``), and FerretDB's CPU seconds (``/proc``) per 1,000 messages.

The store also holds each conversation's ``search_blocks`` (storage/search_index.py) as the drain leaves them,
and whatever ``storage.services.drain_state_fill`` (if the code has it) says the drain keeps in Redis. Each probe
runs in its own process, ``--rounds`` times per source tree of ``--trees`` (default: this checkout; another
checkout of the repo, e.g. ``git worktree add /tmp/before <commit>``, measures its drain on the same filled store,
alternating, so before and after are compared in one run). ``--quiet-lock DIR`` holds the machine's benchmark
locks (bench/quiet_lock.py) around each probe's drain only, not the fill. ``--profile DIR``: py-spy records
each probe's drain process (a flame graph SVG per probe).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
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
from bench.quiet_lock import quiet_lock  # noqa: E402
from chatstream_site.localservers import ferretdb_server, redis_server  # noqa: E402

TIMES: dict[str, float] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--hot", type=int, default=10)
    parser.add_argument("--probe", type=int, default=3_000)
    parser.add_argument("--trees", nargs="+", default=[str(ROOT)],
                        help="checkouts whose drain is measured on each filled store, in turn (default: this one)")
    parser.add_argument("--rounds", type=int, default=1, help="probes per tree and size, alternating trees")
    parser.add_argument("--variants", nargs="+", default=["random"],
                        choices=["random", "ordered", "random-nosender", "ordered-nosender", "random-lean",
                                 "ordered-lean"],
                        help="per round, a probe of each: its message ids uuid4 (random, as the write path makes "
                             "them) or time-ordered (ordered); -nosender: after the messages' (sender_id, "
                             "timestamp) index is dropped (it is, before the first such variant); -lean: the "
                             "conversations' (members, -updated_at) index too")
    parser.add_argument("--ids", default="random", choices=["random", "ordered"], help=argparse.SUPPRESS)
    parser.add_argument("--quiet-lock", default="", metavar="DIR", help="hold DIR's benchmark locks while draining")
    parser.add_argument("--profile", default="", metavar="DIR", help="py-spy each probe's drain into DIR")
    parser.add_argument("--perf", default="", metavar="DIR", help="perf record FerretDB during each drain into DIR")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # one size, in a child process
    parser.add_argument("--probe-spec", default="", help=argparse.SUPPRESS)  # one probe, in a grandchild
    parser.add_argument("--ferretdb-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_spec:
        print(json.dumps(probe(args)), flush=True)
        return
    if not args.one:  # every size in its own process (Django reads its settings once) on fresh servers
        for size in sorted(args.sizes):
            subprocess.run([sys.executable, "-m", "bench.drain_scale", "--one", str(size), "--conversations",
                            str(args.conversations), "--hot", str(args.hot), "--probe", str(args.probe),
                            "--trees", *args.trees, "--rounds", str(args.rounds), "--quiet-lock", args.quiet_lock,
                            "--variants", *args.variants, "--perf", args.perf,
                            "--profile", args.profile], check=True, cwd=ROOT)
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
        spec = workdir / "spec.json"
        filled = fill_store(args, args.one, spec=spec)
        print(json.dumps(filled), flush=True)
        for r in range(args.rounds):  # bounded: rounds x variants x trees probes
            for v, variant in enumerate(args.variants):
                if variant.endswith(("-nosender", "-lean")):
                    index_drop("messages", ["sender_id", "timestamp"])
                if variant.endswith("-lean"):
                    index_drop("conversations", ["members", "updated_at"])
                for tree in args.trees:
                    cmd = [sys.executable, "-m", "bench.drain_scale", "--probe-spec", str(spec),
                           "--probe", str(args.probe), "--ferretdb-pid", str(mg.proc.pid),
                           "--seed", str(1000 * r + 100 * v + args.trees.index(tree)),
                           "--ids", variant.split("-")[0], "--quiet-lock", args.quiet_lock, "--profile", args.profile,
                           "--perf", args.perf,
                           "--one", str(args.one)]
                    out = subprocess.run(cmd, check=True, cwd=tree, stdout=subprocess.PIPE, text=True).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    print(json.dumps({"messages_stored": args.one, "tree": tree, "round": r, "variant": variant,
                                      **row}), flush=True)
    finally:
        rd.stop()
        mg.stop()


def index_drop(collection: str, keys: list[str]) -> None:
    """Drop ``collection``'s index on ``keys`` if there (FerretDB maintains every index on every write, and
    uses none but ``_id``'s to answer a query)."""
    from mongoengine.connection import get_db

    db = get_db()
    for name, spec in db[collection].index_information().items():
        if [k for k, _ in spec["key"]] == keys:
            db[collection].drop_index(name)


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
         rnd: random.Random) -> tuple[list[Any], dict[Any, int], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``size`` messages over ``conversations`` conversations as the drain leaves them, in bulk: complete
    buckets stored, each conversation's incomplete one returned (the caller puts it in Redis as a tail), and
    the ``conversations`` documents (``CONTENTS``: each conversation's contents by seq, for its search blocks)."""
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

    lasts: dict[Any, dict[str, Any]] = {}
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
            CONTENTS.setdefault(c, []).append(f"bench {mid[:24]}")
            lasts[c] = {"id": mid, "seq": seq, "sender_id": str(sender), "content": f"bench {mid[:24]}",
                        "timestamp": now, "deleted": False}
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
             "last_seq": last[c], "read_cursors": {}, "created_at": now, "updated_at": now,
             **({"lastMessage": lasts[c]} if c in lasts else {})}
            for n, c in enumerate(convs)]
    for at in range(0, len(docs), 2000):
        db.conversations.insert_many(docs[at:at + 2000], ordered=False)
    return users, last, tails, docs


def _django() -> None:
    import django

    django.setup()
    from mongoengine.connection import disconnect

    from storage.mongo import mongo_connect

    disconnect()
    mongo_connect()


def search_blocks_fill(db: Any, last: dict[Any, int], contents: dict[Any, list[str]]) -> int:
    """Each conversation's ``search_blocks`` as the drain leaves them: per block, each word's bucket bits."""
    from core.documents import BUCKET_SEQS
    from storage.search_index import BLOCK_BUCKETS, COLLECTION, block_id, block_of, term_key, words_of

    docs: list[dict[str, Any]] = []
    written = 0
    for c, top in last.items():
        blocks: dict[int, dict[str, int]] = {}
        for seq in range(1, top + 1):
            n = (seq - 1) // BUCKET_SEQS
            t = blocks.setdefault(block_of(n), {})
            for word in words_of(contents[c][seq - 1]):
                t[term_key(word)] = t.get(term_key(word), 0) | (1 << (n % BLOCK_BUCKETS))
        docs.extend({"_id": block_id(str(c), b), "conversation_id": c, "t": t, "partial": False}
                    for b, t in blocks.items())
        if len(docs) >= 1000:
            db[COLLECTION].insert_many(docs, ordered=False)
            written += len(docs)
            docs.clear()
    if docs:
        db[COLLECTION].insert_many(docs, ordered=False)
        written += len(docs)
    return written


def fill_store(args: argparse.Namespace, size: int, *, spec: Path) -> dict[str, Any]:
    """Fill the store and Redis as the drain leaves them; write the probes' spec (conversations, users).
    ``CONTENTS`` is filled by :func:`fill`."""
    _django()
    import redis
    from django.conf import settings
    from mongoengine.connection import get_db

    from core.documents import BUCKET_SEQS, Message, MessageBucket
    from core.keys import partition_of, persisted_key, seq_key
    from storage import buckets

    Message.ensure_indexes()
    MessageBucket.ensure_indexes()
    db = get_db()
    rnd = random.Random(5)  # noqa: S311 - a reproducible workload
    t = time.perf_counter()
    users, last, tails, docs = fill(db, size=size, conversations=args.conversations, hot=args.hot, rnd=rnd)
    fill_s = time.perf_counter() - t
    t = time.perf_counter()
    blocks = search_blocks_fill(db, last, CONTENTS)
    blocks_s = time.perf_counter() - t
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
    try:  # what the drain keeps in Redis of each conversation (docs/adr/0048), as it would have left it
        from storage.conversation_state import conversation_states_put
    except ImportError:  # a checkout from before it
        pass
    else:
        by_p: dict[int, dict[Any, dict[str, Any]]] = {}
        for doc in docs:
            by_p.setdefault(partition_of(str(doc["_id"])), {})[doc["_id"]] = doc
        for p, states in by_p.items():
            conversation_states_put(sync, partition=p, docs=states)
    spec.write_text(json.dumps({"conversations": [str(c) for c in last], "users": [str(u) for u in users]}))
    return {"messages_stored": size, "conversations": args.conversations, "fill_s": round(fill_s, 1),
            "search_blocks": blocks, "search_blocks_s": round(blocks_s, 1), "load": os.getloadavg()}


CONTENTS: dict[Any, list[str]] = {}  # each conversation's contents by seq, as fill() wrote them


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Append ``--probe`` messages, each into a random conversation of the spec, and drain them, timed."""
    _django()
    import redis.asyncio
    from django.conf import settings

    from messaging.streams import event_append
    from storage import rules, services, writes

    try:
        from core.documents import message_id_new
    except ImportError:  # a checkout from before time-ordered ids: the bench's own
        def message_id_new() -> str:
            return f"{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:20]}"

    spec = json.loads(Path(args.probe_spec).read_text())
    convs, users = spec["conversations"], spec["users"]
    rnd = random.Random(args.seed)  # noqa: S311 - a reproducible workload
    for name in ("insert_new", "buckets_write", "message_ops", "insert_versions", "conversation_ops",
                 "updates_write", "search_index_write", "mentions_replay", "tails_load", "tails_save"):
        if hasattr(services, name):
            setattr(services, name, timed(name, getattr(services, name)))
    for name in ("message", "conversation", "bucket"):
        setattr(rules.Seen, name, timed(f"seen.{name}", getattr(rules.Seen, name)))
    writes.write_isolating_failures = timed("commands", writes.write_isolating_failures)

    async def append() -> None:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            async def one(k: int) -> None:
                n = rnd.randrange(len(convs))
                mid = message_id_new() if args.ids == "ordered" else uuid.uuid4().hex
                c, sender = convs[n], users[2 * n + k % 2]
                await event_append(client, type="message.new", conversation_id=c,
                                   payload={"id": mid, "conversation_id": c, "sender_id": sender,
                                            "content": f"probe {mid[:12]}", "timestamp": now, "client_msg_id": mid},
                                   message_id=mid, dedup=(sender, mid))

            for at in range(0, args.probe, 100):
                await asyncio.gather(*(one(k) for k in range(at, min(args.probe, at + 100))))
        finally:
            await client.aclose()

    asyncio.run(append())
    spy = None
    with quiet_lock(args.quiet_lock) as held:
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            out = Path(args.profile) / f"drain-{args.one}-{Path.cwd().name}-{args.seed}.txt"
            spy = subprocess.Popen([str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid", str(os.getpid()),
                                    "--rate", "50", "--format", "raw", "--output", str(out), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
        perf = None
        if args.perf:
            Path(args.perf).mkdir(parents=True, exist_ok=True)
            perf = subprocess.Popen(["perf", "record", "-F", "250", "-g", "-p", str(args.ferretdb_pid), "-o",
                                     str(Path(args.perf) / f"ferretdb-{args.one}-{args.ids}-{args.seed}.data")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # perf attaches
        load = os.getloadavg()
        cpu0, t = cpu_s(args.ferretdb_pid), time.perf_counter()
        done = drain_all()
        wall = time.perf_counter() - t
        cpu = cpu_s(args.ferretdb_pid) - cpu0
        for tool in (spy, perf):
            if tool is not None:
                tool.send_signal(signal.SIGINT)
                tool.wait(timeout=60)
    return {"persisted": done, "drain_msg_s": round(done / wall), "drain_s": round(wall, 2),
            "ferretdb_cpu_s_per_1000": round(cpu / max(done, 1) * 1000, 2),
            "phase_ms_per_1000": {k: round(v / max(done, 1) * 1e6) for k, v in sorted(TIMES.items())},
            "quiet": held, "load": load}


if __name__ == "__main__":
    main()
