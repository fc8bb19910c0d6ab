"""Drain throughput with a store that already holds ``--sizes`` messages, on a private Redis and FerretDB
(SQLite, ``make run``'s store): does the drain's cost grow with the collections (docs/adr/0028)?

    nice .venv/bin/python bench/drain_guards.py --sizes 5000 20000 [--news 1000 --changes 30]

Per size, from empty: ``messages`` gets ``size`` filler messages (``insert_many``, the chat schema and its
indexes) over size/10 filler conversations, each with its ``conversations`` document; then ``--conversations``
fresh 1:1 conversations are created and, appended with ``messaging.streams.event_append`` and drained with
``storage.services.partition_drain`` (this process, one consumer, ``CHATSTREAM_BATCH_SIZE``):

1. **new**: ``--news`` ``message.new`` round robin over them: msg/s of the drain;
2. **changes**: in ``--changes`` of them, an edit of seq 1 (not the conversation's last message) and a read
   of the whole conversation by the other member: events/s of the drain. These are the statements whose
   guards (or non-``_id`` filters) FerretDB v1 answers with a scan of the collection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def drain_all() -> int:
    """Drain every partition in this process until each is empty (bounded); returns the entries persisted.
    Precondition: Django is set up against the bench's servers. Side effects: the drain's writes and acks."""
    from django.conf import settings

    from storage import services

    done = 0
    for p in range(int(settings.PARTITIONS)):
        for _ in range(100_000):  # bounded
            res = services.partition_drain(partition=p, batch_size=settings.BATCH_SIZE, consumer="bench")
            done += res.persisted
            if not res.more:
                break
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--news", type=int, default=1_000)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--ferretdb-bin", default="", help="another FerretDB build (default: .tools/bin's)")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # one size, in a child process
    args = parser.parse_args()
    if not args.one:  # every size in its own process (Django reads its settings once) on fresh servers
        for size in sorted(args.sizes):
            subprocess.run([sys.executable, __file__, "--one", str(size), "--conversations", str(args.conversations),
                            "--news", str(args.news), "--changes", str(args.changes),
                            "--ferretdb-bin", args.ferretdb_bin], check=True)
        return
    for size in [args.one]:
        workdir = Path(tempfile.mkdtemp(prefix="cs-drain-guards-"))
        rd = redis_server(workdir)
        mg = ferretdb_server(workdir, binary=Path(args.ferretdb_bin) if args.ferretdb_bin else None)
        rd.start()
        mg.start()
        os.environ.update(REDIS_URL=f"redis://127.0.0.1:{rd.port}/0", CHATSTREAM_DOTENV="", DEBUG="1",
                          MONGODB_URI=f"mongodb://127.0.0.1:{mg.port}/chatstream_bench",
                          DJANGO_SETTINGS_MODULE="chatstream_site.settings", LOG_LEVEL="WARNING")
        try:
            print(json.dumps(run(args, size)), flush=True)
        finally:
            rd.stop()
            mg.stop()


def run(args: argparse.Namespace, size: int) -> dict[str, Any]:
    import django

    django.setup()
    import redis.asyncio
    from bson import ObjectId
    from django.conf import settings
    from mongoengine.connection import disconnect, get_db

    from core.documents import Message
    from messaging.streams import event_append
    from storage.mongo import mongo_connect

    disconnect()
    mongo_connect()
    Message.ensure_indexes()
    db = get_db()
    sender = ObjectId()
    fillers = [ObjectId() for _ in range(max(1, size // 10))]
    batch: list[dict[str, Any]] = []
    for n in range(size):  # bounded: size filler messages
        cid = fillers[n % len(fillers)]
        batch.append({"_id": uuid.uuid4().hex, "conversation_id": cid, "seq": n // len(fillers) + 1,
                      "sender_id": sender, "content": "filler " + "x" * 60, "timestamp": datetime.now(UTC),
                      "deleted": False, "read_status": "sent"})
        if len(batch) == 1000:
            db.messages.insert_many(batch, ordered=False)
            batch = []
    if batch:
        db.messages.insert_many(batch, ordered=False)
    db.conversations.insert_many([{"_id": c, "type": "group", "room_id": ObjectId(), "members": [sender],
                                   "last_seq": size // len(fillers), "lastMessage": {"id": "x", "seq": 1}}
                                  for c in fillers])
    users = [ObjectId(), ObjectId()]
    convs = [ObjectId() for _ in range(args.conversations)]
    db.conversations.insert_many([{"_id": c, "type": "single", "room_id": ObjectId(), "members": users,
                                   "last_seq": 0} for c in convs])

    first: dict[str, tuple[str, int]] = {}  # conversation -> (id of its seq 1, its last seq)

    async def append(events: list[tuple[str, str, dict[str, Any], str]]) -> None:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        try:
            async def one(type_: str, cid: str, extra: dict[str, Any], mid: str) -> None:
                payload = {"id": mid, "conversation_id": cid, **extra}
                dedup = (extra["sender_id"], extra["client_msg_id"]) if type_ == "message.new" else None
                done = await event_append(client, type=type_, conversation_id=cid,  # type: ignore[arg-type]
                                          payload=payload, message_id=mid, dedup=dedup)
                if type_ == "message.new":
                    seq1, last = first.get(cid, (mid, 0))
                    first[cid] = (mid if done.seq == 1 else seq1, max(last, done.seq))

            for at in range(0, len(events), 50):
                await asyncio.gather(*(one(*ev) for ev in events[at:at + 50]))
        finally:
            await client.aclose()

    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    news = [("message.new", str(convs[i % len(convs)]),
             {"sender_id": str(users[i % 2]), "content": f"bench {i}", "timestamp": now, "client_msg_id": f"b{i}"},
             uuid.uuid4().hex) for i in range(args.news)]
    asyncio.run(append(news))
    t = time.perf_counter()
    persisted = drain_all()
    new_s = time.perf_counter() - t
    changes: list[tuple[str, str, dict[str, Any], str]] = []
    for conv_id in [str(c) for c in convs[:args.changes]]:
        mid, last = first[conv_id]
        changes.append(("message.edited", conv_id, {"content": "edited", "edited_at": now, "editor_id": str(users[0]),
                                                "original": None}, mid))
        changes.append(("read.updated", conv_id, {"user_id": str(users[1]), "seq": last}, ""))
    asyncio.run(append(changes))
    t = time.perf_counter()
    changed = drain_all()
    change_s = time.perf_counter() - t
    return {"messages_stored": size, "conversations_stored": len(fillers) + len(convs),
            "new_persisted": persisted, "new_msg_s": round(persisted / new_s),
            "changes_persisted": changed, "changes_events_s": round(changed / change_s, 1)}


if __name__ == "__main__":
    main()
