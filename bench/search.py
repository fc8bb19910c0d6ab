"""Search latency (``GET /search``'s selector, ``api.finders.messages_search``) against the store's size, in
process, on a private Redis and FerretDB (SQLite, ``make run``'s default store):

    .venv/bin/python bench/search.py --sizes 100000 1000000 [--own 10000] [--json out.json]

The store is filled directly (``insert_many`` into ``messages`` and the same messages as 50-message
``message_buckets``, as the drain writes them), not through the write path: 1M sends plus their drain take
hours on this machine. One user (the searcher) has ``--own-conversations`` 1:1 conversations holding
``--own`` messages; everything else goes to ``--conversations`` other conversations. Each of the searcher's
conversations then gets ``--recent`` messages through the real write path (its recent window). Contents are 8
words from a 5,000-word vocabulary; ``zebra`` is in 1 of 2,000 of the searcher's messages (a rare word: the
search reads all of the searcher's history, up to its read budget), ``w1`` is the most frequent word. After
the first size only the other conversations grow, so the searcher's results are the same at every size.

Per size and query, one request at a time, p50/p99 ms of ``--samples`` first pages (limit 20), and for the rare
word the time to walk every page with the cursor, each both through the drain's word index (``search_blocks``,
written here as the drain writes it) and by the walk of every bucket (the search before that index), alternated
in one run; it stops if their hits differ. Prints one JSON line per size; ``--json`` writes them.
``--quiet-lock /work/wt`` holds that folder's benchmark locks while measuring only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data_tier import seed_population, stats  # noqa: E402
from bench.quiet_lock import quiet_lock  # noqa: E402
from chatstream_site.localservers import servers_start  # noqa: E402

VOCABULARY = 5000
RARE_EVERY = 2000


def words(rnd: random.Random, *, own: bool) -> str:
    # Zipf-like: low word numbers are frequent (w1 the most).
    picked = [f"w{int(rnd.paretovariate(1.1)) % VOCABULARY}" for _ in range(8)]
    if own and rnd.randrange(RARE_EVERY) == 0:
        picked[rnd.randrange(8)] = "zebra"
    return " ".join(picked)


def fill(n: int, *, convs: list[tuple[str, list[str]]], tops: dict[str, int], rnd: random.Random,
         own: bool, start_at: datetime, span_ms: int) -> None:
    """``n`` messages spread evenly over ``convs`` (each starting at seq 1), at random times within
    ``span_ms`` after ``start_at`` (increasing with the seq), into ``messages`` and, 50 at a time,
    ``message_buckets`` as the drain writes them: inserts only (blocking)."""
    from bson import ObjectId
    from mongoengine.connection import get_db

    from core.documents import BUCKET_SEQS
    from storage.search_index import BLOCK_BUCKETS, COLLECTION, block_id, block_of, term_key, words_of

    db = get_db()
    batch: list[dict[str, Any]] = []
    buckets: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    progress = tqdm(total=n, desc=f"fill {'own' if own else 'others'}", unit="msg", mininterval=5)
    for i, (cid, members) in enumerate(convs):
        count = n // len(convs) + (1 if i < n % len(convs) else 0)
        times = sorted(rnd.randrange(span_ms) for _ in range(count))
        bucket: dict[str, Any] | None = None
        block: dict[str, Any] | None = None
        for k, offset in enumerate(times):
            tops[cid] = seq = tops.get(cid, 0) + 1
            when = start_at + timedelta(milliseconds=offset)
            doc = {"_id": uuid.uuid4().hex, "conversation_id": ObjectId(cid), "seq": seq,
                   "sender_id": ObjectId(members[k % 2]), "content": words(rnd, own=own), "client_msg_id": None,
                   "timestamp": when, "deleted": False, "read_status": "sent"}
            batch.append(doc)
            if bucket is None or (seq - 1) // BUCKET_SEQS != bucket["n"]:
                bucket = {"_id": f"{cid}:{(seq - 1) // BUCKET_SEQS}", "n": (seq - 1) // BUCKET_SEQS,
                          "conversation_id": ObjectId(cid), "m": {}}
                buckets.append(bucket)
            bucket["m"][str(seq)] = {"id": doc["_id"], "seq": seq, "sender_id": doc["sender_id"],
                                     "content": doc["content"], "timestamp": when, "client_msg_id": None,
                                     "deleted": False}
            bn = (seq - 1) // BUCKET_SEQS
            if block is None or block_id(cid, block_of(bn)) != block["_id"]:
                block = {"_id": block_id(cid, block_of(bn)), "conversation_id": ObjectId(cid), "t": {},
                         "partial": False}
                blocks.append(block)
            for word in words_of(str(doc["content"])):
                key = term_key(word)
                block["t"][key] = block["t"].get(key, 0) | 1 << (bn % BLOCK_BUCKETS)
            if len(batch) >= 2000:
                db.messages.insert_many(batch, ordered=False)
                progress.update(len(batch))
                batch = []
        if len(buckets) >= 40:
            db.message_buckets.insert_many([{k: v for k, v in b.items() if k != "n"} for b in buckets],
                                           ordered=False)
            buckets = []
        if len(blocks) >= 20:
            db[COLLECTION].insert_many(blocks[:-1], ordered=False)  # the last may still grow
            blocks = blocks[-1:]
    if batch:
        db.messages.insert_many(batch, ordered=False)
        progress.update(len(batch))
    if buckets:
        db.message_buckets.insert_many([{k: v for k, v in b.items() if k != "n"} for b in buckets], ordered=False)
    if blocks:
        db[COLLECTION].insert_many(blocks, ordered=False)
    progress.close()


async def recent(*, convs: list[tuple[str, list[str]]], tops: dict[str, int], count: int) -> None:
    """``count`` messages to each of ``convs`` through the real write path (their recent windows)."""
    import redis.asyncio
    from django.conf import settings

    from core.keys import partition_of, seq_key
    from messaging.services import message_send

    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    rnd = random.Random(11)  # noqa: S311 - a reproducible workload, not a secret
    try:
        for cid, members in convs:
            await client.hset(seq_key(partition_of(cid)), cid, tops.get(cid, 0))  # the store's seqs were given
            for k in range(count):
                await message_send(client, user_id=members[k % 2], conversation_id=cid,
                                   client_msg_id=uuid.uuid4().hex, content=words(rnd, own=True))
            tops[cid] = tops.get(cid, 0) + count
    finally:
        await client.aclose()


def measure(*, searcher: str, samples: int) -> dict[str, Any]:
    from api.finders import messages_search

    out: dict[str, Any] = {}
    # Walk (every bucket: the search before the index, and still the reference) and index, alternated per
    # sample so both see the same load; their hits must be the same.
    for name, query in (("rare", "zebra"), ("common", "w1"), ("two_words", "w1 w2")):
        times: dict[str, list[float]] = {"walk": [], "index": []}
        hits: dict[str, list[str]] = {}
        for _ in range(samples):
            for mode in ("walk", "index"):
                t = time.perf_counter()
                found, _cursor = messages_search(user_id=searcher, query=query, cursor=None, limit=20,
                                                 use_index=mode == "index")
                times[mode].append((time.perf_counter() - t) * 1000)
                hits[mode] = [h.message_id for h in found]
        # The walk's page may end early (its read budget spent, a cursor handed out): it must then be the
        # start of the index's page.
        if hits["index"][:len(hits["walk"])] != hits["walk"]:
            raise SystemExit(f"{query!r}: the index's first page differs from the walk's")
        for mode in ("walk", "index"):
            out[f"{name}_first_page_ms_{mode}"] = stats(times[mode])
        out[f"{name}_first_page_hits"] = len(hits["index"])
    # Every page of the rare word, following the cursor: the whole of the searcher's history read once.
    for mode in ("walk", "index"):
        t = time.perf_counter()
        pages, cursor = 0, None
        got: list[str] = []
        while True:
            found, cursor = messages_search(user_id=searcher, query="zebra", cursor=cursor, limit=20,
                                            use_index=mode == "index")
            pages, got = pages + 1, got + [h.message_id for h in found]
            if cursor is None or pages > 1000:
                break
        out[f"rare_all_pages_{mode}"] = {"ms": round((time.perf_counter() - t) * 1000, 1), "pages": pages,
                                         "hits": len(got)}
        hits[mode] = got
    if hits["walk"] != hits["index"]:
        raise SystemExit("all pages of 'zebra': the index's hits differ from the walk's")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--own", type=int, default=10_000, help="messages in the searcher's conversations")
    parser.add_argument("--own-conversations", type=int, default=20)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--conversations", type=int, default=5_000)
    parser.add_argument("--recent", type=int, default=60)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--json", default="")
    parser.add_argument("--quiet-lock", default="", metavar="DIR",
                        help="hold DIR/gate.lock and DIR/bench.lock (flock) while measuring, not while seeding")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-search-"))
    servers = servers_start(workdir)
    os.environ.update(servers.env())
    os.environ.update(CHATSTREAM_DOTENV="", DEBUG="0", DJANGO_SETTINGS_MODULE="chatstream_site.settings",
                      SECRET_KEY="bench-secret-key-that-is-long-enough-0123456789abcdef")  # noqa: S106 - bench only
    import django

    django.setup()
    from bson import ObjectId
    from mongoengine.connection import get_db

    rnd = random.Random(5)  # noqa: S311 - a reproducible workload, not a secret
    rows = []
    try:
        uids, convs = seed_population(users=args.users, conversations=args.conversations + args.own_conversations)
        searcher = uids[0]
        mine = [c for c in convs if searcher in c[1]]
        others = [c for c in convs if searcher not in c[1]]
        # The searcher's conversations: theirs by seed_population's pairs, topped up from the others.
        while len(mine) < args.own_conversations:
            cid, members = others.pop()
            get_db().conversations.update_one({"_id": ObjectId(cid)},
                                              {"$set": {"members": [ObjectId(searcher), ObjectId(members[1])]}})
            mine.append((cid, [searcher, members[1]]))
        # The searcher's conversation ids (docs/adr/0043) as a membership change would leave them.
        get_db().user_conversations.update_one({"_id": ObjectId(searcher)},
                                               {"$set": {"c": [ObjectId(c) for c, _ in mine], "complete": True}})
        import redis
        from django.conf import settings

        from core.keys import membership_key, user_conversations_key
        client = redis.Redis.from_url(settings.REDIS_URL)
        for cid, members in mine:
            client.delete(membership_key(cid))
            client.sadd(membership_key(cid), *members)
        client.delete(user_conversations_key(searcher))
        tops: dict[str, int] = {}
        start_at = datetime(2026, 1, 1, tzinfo=UTC)
        t = time.perf_counter()
        span_ms = 30 * 24 * 3600 * 1000  # a month of history
        fill(args.own, convs=mine, tops=tops, rnd=rnd, own=True, start_at=start_at, span_ms=span_ms)
        asyncio.run(recent(convs=mine, tops=tops, count=args.recent))
        have = args.own + args.recent * len(mine)
        sizes = sorted(args.sizes)
        # Each size's growth goes into conversations of its own (each starts at seq 1: inserts only).
        share = len(others) // len(sizes)
        for step, size in enumerate(sizes):
            fill(max(0, size - have), convs=others[step * share:(step + 1) * share], tops=tops, rnd=rnd,
                 own=False, start_at=start_at, span_ms=span_ms)
            have = max(have, size)
            row: dict[str, Any] = {"messages": get_db().messages.estimated_document_count() + args.recent * len(mine),
                                   "own_messages": args.own + args.recent * len(mine),
                                   "seed_s": round(time.perf_counter() - t, 1)}
            with quiet_lock(args.quiet_lock):
                row["load_average"] = os.getloadavg()
                row.update(measure(searcher=searcher, samples=args.samples))
            rows.append(row)
            print(json.dumps(row), flush=True)
            t = time.perf_counter()
        if args.json:
            Path(args.json).write_text(json.dumps({"command": "bench/search.py " + " ".join(sys.argv[1:]),
                                                   "results": rows}, indent=2))
    finally:
        servers.stop()


if __name__ == "__main__":
    main()
