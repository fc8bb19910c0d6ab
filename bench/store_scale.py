"""How the history queries scale with the store's size, on a private FerretDB (SQLite, ``make run``'s default
store) or ``--mongodb-uri``: the measurement behind docs/adr/0028.

    .venv/bin/python bench/store_scale.py --sizes 10000 100000 [--tries 5] [--json out.json]

Each size is seeded from empty: ``messages`` directly (``insert_many``, the chat schema and its unique
``(conversation_id, seq)`` index) with N messages over ``--conversations`` conversations, plus the same
messages as 50-message buckets (``_id = "conversation:bucket"``) in ``message_buckets``; then times, per
size (median and max of ``--tries``):

* ``latest_page``: the newest 50 messages of one conversation (``find({conversation_id}).sort(seq -1).limit(51)``),
* ``page_before``: the 50 below a seq,
* ``find_id``: ``find_one({_id})`` of one message,
* ``update_id``: ``update_one({_id}, $set)`` of one message,
* ``update_id_guarded``: the same with the guard the drain used to add to ``_id`` (an edit's
  ``{_id, deleted: {$ne: true}, $or: [edit_seq missing/None/lower]}``): FerretDB v1 pushes down only ``_id``
  equality, so any further condition makes it scan the collection,
* ``bucket_get``: ``find({_id: {$in: [two bucket ids]}})``: a page from the bucket collection,
* ``bucket_get_eq``: ``find_one({_id: bucket id})``: one bucket by ``_id`` equality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymongo  # noqa: E402
from bson import ObjectId  # noqa: E402

from chatstream_site.localservers import ferretdb_server  # noqa: E402

BUCKET = 50


def seed(db: Any, *, upto: int, have: int, conversations: list[ObjectId], seqs: dict[ObjectId, int]) -> None:
    """Add messages until the collection holds ``upto`` (round-robin over the conversations)."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    sender = ObjectId()
    batch: list[dict[str, Any]] = []
    buckets: dict[str, list[dict[str, Any]]] = {}
    for n in range(have, upto):
        cid = conversations[n % len(conversations)]
        seqs[cid] += 1
        doc = {"_id": uuid.uuid4().hex, "conversation_id": cid, "seq": seqs[cid], "sender_id": sender,
               "content": f"message {n} " + "x" * 60, "timestamp": base + timedelta(seconds=n),
               "deleted": False, "read_status": "sent"}
        batch.append(doc)
        buckets.setdefault(f"{cid}:{(seqs[cid] - 1) // BUCKET}", []).append(doc)
        if len(batch) == 1000:
            db.messages.insert_many(batch, ordered=False)
            batch = []
    if batch:
        db.messages.insert_many(batch, ordered=False)
    # A bench shortcut: whole buckets are inserted at once (each size is seeded from empty).
    rows = [{"_id": bid, "m": {str(d["seq"]): d for d in docs}} for bid, docs in buckets.items()]
    for start in range(0, len(rows), 200):
        db.message_buckets.insert_many(rows[start:start + 200], ordered=False)


def timed(fn: Any, tries: int) -> dict[str, float]:
    out = []
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(statistics.median(out), 1), "max_ms": round(max(out), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--conversations", type=int, default=2_000)
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--mongodb-uri", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    server = None
    with tempfile.TemporaryDirectory(prefix="cs-scale-") as tmp:
        uri = args.mongodb_uri
        if not uri:
            server = ferretdb_server(Path(tmp))
            server.start()
            uri = f"mongodb://127.0.0.1:{server.port}/"
        try:
            client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri)
            db = client["cs_scale"]
            db.messages.drop()
            db.message_buckets.drop()
            db.messages.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
            conversations = [ObjectId() for _ in range(args.conversations)]
            seqs = dict.fromkeys(conversations, 0)
            results: list[dict[str, Any]] = []
            have = 0
            for size in sorted(args.sizes):
                db.messages.delete_many({})
                db.message_buckets.delete_many({})
                seqs = dict.fromkeys(conversations, 0)
                have = 0
                t = time.perf_counter()
                seed(db, upto=size, have=have, conversations=conversations, seqs=seqs)
                seeded_s = time.perf_counter() - t
                have = size
                cid = conversations[0]
                top = seqs[cid]
                first = db.messages.find_one({"conversation_id": cid, "seq": 1}, {"_id": 1})
                assert first is not None, "the seeded conversation has no seq 1"
                some_id = first["_id"]
                row: dict[str, Any] = {"messages": size, "seed_s": round(seeded_s, 1)}
                row["latest_page"] = timed(lambda: list(db.messages.find({"conversation_id": cid})  # noqa: B023
                                                         .sort("seq", -1).limit(BUCKET + 1)), args.tries)
                row["page_before"] = timed(lambda: list(db.messages.find(
                    {"conversation_id": cid, "seq": {"$lt": max(2, top // 2)}})  # noqa: B023
                    .sort("seq", -1).limit(BUCKET + 1)), args.tries)
                row["find_id"] = timed(lambda: db.messages.find_one({"_id": some_id}), args.tries)  # noqa: B023
                row["update_id"] = timed(lambda: db.messages.update_one(
                    {"_id": some_id}, {"$set": {"read_status": "sent"}}), args.tries)  # noqa: B023
                row["update_id_guarded"] = timed(lambda: db.messages.update_one(
                    {"_id": some_id, "deleted": {"$ne": True},  # noqa: B023
                     "$or": [{"edit_seq": {"$exists": False}}, {"edit_seq": None}, {"edit_seq": {"$lt": 10**9}}]},
                    {"$set": {"read_status": "sent"}}), args.tries)
                ids = [f"{cid}:{(top - 1) // BUCKET}", f"{cid}:{max(0, (top - 1) // BUCKET - 1)}"]
                row["bucket_get"] = timed(lambda: list(db.message_buckets.find({"_id": {"$in": ids}})),  # noqa: B023
                                          args.tries)
                row["bucket_get_eq"] = timed(lambda: db.message_buckets.find_one({"_id": ids[0]}),  # noqa: B023
                                             args.tries)
                results.append(row)
                print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
