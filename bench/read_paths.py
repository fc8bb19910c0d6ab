"""The read paths of docs/adr/0028 against the store's size, in process (the whole Django/DRF stack through
DRF's test client, without the HTTP hop), on a private Redis and FerretDB (SQLite, ``make run``'s default):

    .venv/bin/python bench/read_paths.py --sizes 10000 100000 [--users 10000 --conversations 20000]

For each size the store is filled directly (``insert_many`` into ``messages``, spread over the conversations,
``--hot`` of them getting ``--hot-share`` of the messages), the buckets are built (``buckets_build``, as after
an upgrade), and each hot conversation then gets ``--recent`` more messages through the real write path
(``messaging.services.message_send``: the recent window, not yet drained). Then, one request at a time
(p50/p99 ms); after the first size only the other conversations grow. Measured: the **latest** page of 50 of
a hot conversation, a **deep** page (``before_seq`` a quarter in:
buckets), the **conversation list** (50) of a hot conversation's member (caches warm), and
**connect's read** (``user_conversation_ids``, warm). Prints one JSON line per size; ``--json`` writes them.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data_tier import seed_population, stats  # noqa: E402
from chatstream_site.localservers import servers_start  # noqa: E402


def fill(n: int, *, convs: list[tuple[str, list[str]]], hot: list[int], share: float, tops: dict[str, int],
         rnd: random.Random) -> None:
    from bson import ObjectId
    from mongoengine.connection import get_db

    db = get_db()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    batch: list[dict[str, Any]] = []
    cold = sorted(set(range(len(convs))) - set(hot))
    for k in range(n):
        cid, members = convs[rnd.choice(hot)] if rnd.random() < share else convs[rnd.choice(cold)]
        tops[cid] = tops.get(cid, 0) + 1
        batch.append({"_id": uuid.uuid4().hex, "conversation_id": ObjectId(cid), "seq": tops[cid],
                      "sender_id": ObjectId(members[k % 2]), "content": f"stored {k}", "client_msg_id": None,
                      "timestamp": base + timedelta(seconds=k), "deleted": False, "read_status": "sent"})
        if len(batch) == 1000:
            db.messages.insert_many(batch, ordered=False)
            batch = []
    if batch:
        db.messages.insert_many(batch, ordered=False)


async def recent(*, convs: list[tuple[str, list[str]]], hot: list[int], tops: dict[str, int], count: int) -> None:
    import redis.asyncio
    from django.conf import settings

    from core.keys import partition_of, seq_key
    from messaging.services import message_send

    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        for i in hot:
            cid, members = convs[i]
            await client.hset(seq_key(partition_of(cid)), cid, tops.get(cid, 0))  # the store's seqs were given
            for k in range(count):
                await message_send(client, user_id=members[k % 2], conversation_id=cid,
                                   client_msg_id=uuid.uuid4().hex, content=f"recent {k}")
            tops[cid] = tops.get(cid, 0) + count
    finally:
        await client.aclose()


def measure(args: argparse.Namespace, *, convs: list[tuple[str, list[str]]], hot: list[int],
            tops: dict[str, int]) -> dict[str, Any]:
    from rest_framework.test import APIClient

    from core.tokens import token_issue
    from messaging.selectors import user_conversation_ids

    def client(uid: str) -> APIClient:
        c = APIClient()
        c.credentials(HTTP_AUTHORIZATION=f"Bearer {token_issue(user_id=uid, username='bench', type='access')}")
        return c

    latest: list[float] = []
    deep: list[float] = []
    listing: list[float] = []
    connect: list[float] = []
    for k in range(args.samples):
        cid, members = convs[hot[k % len(hot)]]
        c = client(members[0])
        c.get("/api/v1/conversations", {"limit": 50})  # warm the user's caches
        for out, path, query in ((latest, f"/api/v1/conversations/{cid}/messages", {"limit": 50}),
                                 (deep, f"/api/v1/conversations/{cid}/messages",
                                  {"limit": 50, "before_seq": max(2, tops[cid] // 4)}),
                                 (listing, "/api/v1/conversations", {"limit": 50})):
            t = time.perf_counter()
            response = c.get(path, query)
            out.append((time.perf_counter() - t) * 1000)
            assert response.status_code == 200, response.content
        t = time.perf_counter()
        user_conversation_ids(user_id=members[0])
        connect.append((time.perf_counter() - t) * 1000)
    return {"latest_page": stats(latest), "deep_page": stats(deep), "conversation_list": stats(listing),
            "connect_read": stats(connect)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--hot", type=int, default=10)
    parser.add_argument("--hot-share", type=float, default=0.1)
    parser.add_argument("--recent", type=int, default=60, help="messages sent to each hot conversation")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-readpaths-"))
    servers = servers_start(workdir)
    os.environ.update(servers.env())
    os.environ.update(CHATSTREAM_DOTENV="", DEBUG="0", DJANGO_SETTINGS_MODULE="chatstream_site.settings",
                      SECRET_KEY="bench-secret-key-that-is-long-enough-0123456789abcdef")  # noqa: S106 - bench only
    import django

    django.setup()
    from mongoengine.connection import get_db

    from storage.buckets import buckets_build

    rnd = random.Random(5)  # noqa: S311 - a reproducible workload, not a secret
    rows = []
    try:
        _uids, convs = seed_population(users=args.users, conversations=args.conversations)
        hot = rnd.sample(range(len(convs)), args.hot)
        tops: dict[str, int] = {}
        have = 0
        for size in sorted(args.sizes):
            t = time.perf_counter()
            # After the first size the hot conversations keep their history (and their windows' invariant):
            # only the rest of the store grows.
            fill(size - have - args.hot * args.recent * (0 if have else 1), convs=convs, hot=hot,
                 share=0.0 if have else args.hot_share, tops=tops, rnd=rnd)
            built = buckets_build()
            asyncio.run(recent(convs=convs, hot=hot, tops=tops, count=args.recent if not have else 0))
            have = size
            row: dict[str, Any] = {"messages": get_db().messages.estimated_document_count() + args.hot * args.recent,
                                   "seed_s": round(time.perf_counter() - t, 1), "bucketed": built}
            row.update(measure(args, convs=convs, hot=hot, tops=tops))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"command": "bench/read_paths.py " + " ".join(sys.argv[1:]),
                                                   "results": rows}, indent=2))
    finally:
        servers.stop()


if __name__ == "__main__":
    main()
