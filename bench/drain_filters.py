"""Which of the drain's statement shapes FerretDB v1 (SQLite, ``make run``'s store) serves by ``_id`` and which
scan the collection: the measurement behind the drain's "``_id``-keyed writes only" rule (docs/adr/0028).

    nice .venv/bin/python bench/drain_filters.py --sizes 10000 50000 [--tries 5]

Each size is seeded from empty (``messages`` with the chat schema over ``--conversations`` conversations, and
as many ``conversations`` documents with a ``lastMessage``); then, median and max of ``--tries`` (ms):

* ``update_id``: ``update_one({_id}, $set)`` of one message that changes nothing (the value it has),
* ``update_id_modifying``: the same setting a new value each time (what the drain's writes do),
* ``update_id_or_guard`` / ``_nomatch``: ``{_id, deleted: {$ne: true}, $or: [edit_seq ...]}`` (an edit's guard),
  matching and not matching,
* ``conv_update_id_or_guard``: ``{_id: cid, $or: [{lastMessage: null}, {lastMessage.seq: {$lt}}]}``,
* ``conv_update_dotted_guard``: ``{_id: cid, lastMessage.id, $or: [lastMessage.edit_seq ...]}``,
* ``update_many_conversation``: the 1:1 read-status mirror as it was,
  ``{conversation_id, seq: {$lte}, sender_id: {$ne}, read_status: {$ne: read}}``,
* ``find_in_ids``: ``find({_id: {$in: [8 ids]}, type: single})`` on conversations,
* ``find_one_ids``: the same 8 documents by ``find_one({_id})`` each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymongo  # noqa: E402
from bson import ObjectId  # noqa: E402

from bench.store_scale import timed  # noqa: E402
from chatstream_site.localservers import ferretdb_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--conversations", type=int, default=2_000)
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cs-filters-") as tmp:
        server = ferretdb_server(Path(tmp))
        server.start()
        try:
            db: Any = pymongo.MongoClient(f"mongodb://127.0.0.1:{server.port}/")["cs_filters"]
            for size in sorted(args.sizes):
                db.messages.drop()
                db.conversations.drop()
                db.messages.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
                convs = [ObjectId() for _ in range(args.conversations)]
                seqs = dict.fromkeys(convs, 0)
                sender = ObjectId()
                batch: list[dict[str, Any]] = []
                for n in range(size):  # bounded: size messages
                    cid = convs[n % len(convs)]
                    seqs[cid] += 1
                    batch.append({"_id": uuid.uuid4().hex, "conversation_id": cid, "seq": seqs[cid],
                                  "sender_id": sender, "content": "x" * 60, "deleted": False, "read_status": "sent"})
                    if len(batch) == 1000:
                        db.messages.insert_many(batch, ordered=False)
                        batch = []
                if batch:
                    db.messages.insert_many(batch, ordered=False)
                db.conversations.insert_many([{"_id": c, "type": "single", "last_seq": seqs[c],
                                               "lastMessage": {"id": "m", "seq": seqs[c]}} for c in convs])
                cid = convs[0]
                first = db.messages.find_one({"conversation_id": cid, "seq": 1}, {"_id": 1})
                assert first is not None
                mid = first["_id"]
                guard = {"$or": [{"edit_seq": {"$exists": False}}, {"edit_seq": None}, {"edit_seq": {"$lt": 10**9}}]}
                some = convs[:8]
                row: dict[str, Any] = {"messages": size, "conversations": len(convs)}
                row["update_id"] = timed(lambda: db.messages.update_one(
                    {"_id": mid}, {"$set": {"read_status": "sent"}}), args.tries)  # noqa: B023
                counter = iter(range(10**9))
                row["update_id_modifying"] = timed(lambda: db.messages.update_one(
                    {"_id": mid}, {"$set": {"edit_seq": next(counter)}}), args.tries)  # noqa: B023
                row["update_id_or_guard"] = timed(lambda: db.messages.update_one(
                    {"_id": mid, "deleted": {"$ne": True}, **guard}, {"$set": {"read_status": "sent"}}),  # noqa: B023
                    args.tries)
                row["update_id_or_guard_nomatch"] = timed(lambda: db.messages.update_one(
                    {"_id": mid, "deleted": True, **guard}, {"$set": {"read_status": "sent"}}),  # noqa: B023
                    args.tries)
                row["conv_update_id_or_guard"] = timed(lambda: db.conversations.update_one(
                    {"_id": cid, "$or": [{"lastMessage": None}, {"lastMessage.seq": {"$lt": 10**9}}]},  # noqa: B023
                    {"$set": {"x": 1}}), args.tries)
                row["conv_update_dotted_guard"] = timed(lambda: db.conversations.update_one(
                    {"_id": cid, "lastMessage.id": "m",  # noqa: B023
                     "$or": [{"lastMessage.edit_seq": {"$exists": False}}, {"lastMessage.edit_seq": {"$lt": 10**9}}]},
                    {"$set": {"x": 1}}), args.tries)
                row["update_many_conversation"] = timed(lambda: db.messages.update_many(
                    {"conversation_id": cid, "seq": {"$lte": 3}, "sender_id": {"$ne": ObjectId()},  # noqa: B023
                     "read_status": {"$ne": "read"}}, {"$set": {"read_status": "sent"}}), args.tries)
                row["find_in_ids"] = timed(lambda: list(db.conversations.find(
                    {"_id": {"$in": some}, "type": "single"}, {"_id": 1})), args.tries)  # noqa: B023
                row["find_one_ids"] = timed(lambda: [db.conversations.find_one(
                    {"_id": c}, {"type": 1}) for c in some], args.tries)  # noqa: B023
                print(json.dumps(row), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
