"""What the search index (``search_blocks``, storage/search_index.py, docs/adr/0045) adds to the drain, in
one run, on private Redis and FerretDB servers:

    .venv/bin/python bench/search_index_cost.py --messages 5000 --conversations 50 --rounds 3 [--quiet-lock DIR]

Each round appends ``--messages`` chat-like messages (8 words of a 5,000-word Zipf vocabulary, as
bench/search.py) with ``messaging.streams.event_append`` and drains them with the real
``storage.services.partition_drain``, once with the index write replaced by a no-op and once with it, in
alternating order; the conversations carry on from round to round, so blocks grow as in a real store. Prints
per mode the median drain µs per message and, with the index, the µs per message spent in
``search_index_write`` itself; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quiet_lock import quiet_lock  # noqa: E402
from bench.search import words  # noqa: E402
from chatstream_site.localservers import servers_start  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="")
    parser.add_argument("--quiet-lock", default="", metavar="DIR")
    args = parser.parse_args()
    servers = servers_start(Path(tempfile.mkdtemp(prefix="chatstream-index-cost-")))
    os.environ.update(servers.env())
    os.environ.update(CHATSTREAM_DOTENV="", DEBUG="0", DJANGO_SETTINGS_MODULE="chatstream_site.settings",
                      SECRET_KEY="bench-secret-key-that-is-long-enough-0123456789abcdef")  # noqa: S106 - bench only
    try:
        out = run(args)
        print(json.dumps(out), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"command": "bench/search_index_cost.py " + " ".join(sys.argv[1:]),
                                                   "load_average": os.getloadavg(), **out}, indent=2))
    finally:
        servers.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import django

    django.setup()
    import redis.asyncio
    from bson import ObjectId
    from django.conf import settings

    from core.documents import Message
    from messaging.streams import event_append
    from storage import search_index, services

    Message.ensure_indexes()
    rnd = random.Random(3)  # noqa: S311 - a reproducible workload, not a secret
    convs = [str(ObjectId()) for _ in range(args.conversations)]
    sender = str(ObjectId())
    real_write = services.search_index_write
    spent = [0.0]

    def timed_write(db: Any, items: Any, *, seen: Any, **kw: Any) -> None:
        t = time.perf_counter()
        real_write(db, items, seen=seen, **kw)
        spent[0] += time.perf_counter() - t

    def no_write(db: Any, items: Any, *, seen: Any, **kw: Any) -> None:
        return None

    async def ingest(n: int) -> None:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        try:
            for start in range(0, n, 50):
                async def one(i: int) -> None:
                    cid = convs[i % len(convs)]
                    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                    mid, cmid = uuid.uuid4().hex, uuid.uuid4().hex
                    payload: dict[str, Any] = {"id": mid, "conversation_id": cid, "sender_id": sender,
                               "content": words(rnd, own=True), "timestamp": stamp, "client_msg_id": cmid,
                               "mentions": []}
                    await event_append(client, type="message.new", conversation_id=cid, payload=payload,
                                       message_id=mid, dedup=(sender, cmid))
                await asyncio.gather(*(one(i) for i in range(start, min(n, start + 50))))
        finally:
            await client.aclose()

    def drain() -> int:
        persisted = 0
        for p in range(int(settings.PARTITIONS)):
            for _ in range(100_000):
                res = services.partition_drain(partition=p, batch_size=settings.BATCH_SIZE, consumer="bench")
                persisted += res.persisted
                if not res.more:
                    break
        return persisted

    per: dict[str, list[float]] = {"without_index": [], "with_index": []}
    inside: list[float] = []
    for r in tqdm(range(args.rounds), desc="rounds"):
        order = ("without_index", "with_index") if r % 2 == 0 else ("with_index", "without_index")
        for mode in order:
            asyncio.run(ingest(args.messages))
            services.search_index_write = timed_write if mode == "with_index" else no_write
            spent[0] = 0.0
            with quiet_lock(args.quiet_lock):
                t = time.perf_counter()
                persisted = drain()
                elapsed = time.perf_counter() - t
            assert persisted == args.messages, (persisted, args.messages)
            per[mode].append(elapsed / persisted * 1e6)
            if mode == "with_index":
                inside.append(spent[0] / persisted * 1e6)
    services.search_index_write = real_write
    blocks = search_index.COLLECTION
    from mongoengine.connection import get_db

    return {"messages_per_round": args.messages, "conversations": args.conversations, "rounds": args.rounds,
            "drain_us_per_message": {k: round(statistics.median(v), 1) for k, v in per.items()},
            "index_write_us_per_message": round(statistics.median(inside), 1),
            "blocks": get_db()[blocks].count_documents({})}


if __name__ == "__main__":
    main()
