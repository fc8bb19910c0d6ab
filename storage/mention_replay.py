"""The drain's replay of the mention indexes (docs/adr/0046): what the write path writes into Redis right after
an append (``messaging.mentions``: each named user's mention seqs and list), written again by the drain from the
persisted events before it acknowledges them. So a broker or API process that died between an append and its
mention writes (or met a Redis error there) loses nothing: the drain repairs it within a tick (~2 s).

Idempotent: ZADD of the same member and score, ZREM. Never against a later edit: the users written are those
the event names *and* the message names now (its recent window copy, else the newest pending edit in the
window's edits hash, both updated by the append script of every edit), and an edit's replay removes only
users the message does not name now.
"""

from __future__ import annotations

import json
from typing import Any

from core.bus import BusSync, bus_is_cluster
from core.keys import partition_of, recent_docs_key, recent_edits_key
from core.mention_index import Command, mention_record_commands, mention_remove_commands
from core.values import iso_ms
from storage.rules import Item, Seen


def _now_named(raw_doc: Any, raw_edit: Any) -> list[str] | None:
    """The mentions the message has now per the window (None: the window does not know the message)."""
    for raw in (raw_doc, raw_edit):
        if raw is not None:
            doc = json.loads(raw)
            if isinstance(doc, dict) and "mentions" in doc:
                return [str(u) for u in doc.get("mentions") or ()]
    return None


def mentions_replay(r: BusSync, items: list[Item], seen: Seen) -> int:
    """Re-write the mention indexes of the batch's persisted ``message.new`` and ``message.edited`` events
    that name someone (or, for edits, may have stopped naming someone). One pipelined read of the window
    copies and one pipelined write; nothing when no event names anyone. Returns the commands sent. Raises
    redis errors (the batch is then not acknowledged, and replayed)."""
    todo: list[tuple[Item, str]] = []
    for i in items:
        if i.event is None or i.failure is not None or i.dead is not None:
            continue
        named = i.doc.get("mentions")
        if i.event.type == "message.new" and named:
            todo.append((i, i.doc["id"]))
        elif i.event.type == "message.edited" and named is not None:
            stored = seen.message(i.doc["id"])
            if named or (stored or {}).get("mentions"):
                todo.append((i, i.doc["id"]))
    if not todo:
        return 0
    reads: list[tuple[str, str, str]] = []
    for i, mid in todo:
        assert i.event is not None
        cid = i.event.conversation_id
        p = partition_of(cid)
        reads.append((recent_docs_key(p, cid), recent_edits_key(p, cid), mid))
    if bus_is_cluster(r):
        replies = [(r.hget(d, m), r.hget(e, m)) for d, e, m in reads]
    else:
        pipe = r.pipeline(transaction=False)
        for d, e, m in reads:
            pipe.hget(d, m)
            pipe.hget(e, m)
        flat = pipe.execute()
        replies = list(zip(flat[::2], flat[1::2], strict=True))
    commands: list[Command] = []
    for (i, mid), (raw_doc, raw_edit) in zip(todo, replies, strict=True):
        assert i.event is not None
        cid = i.event.conversation_id
        now = _now_named(raw_doc, raw_edit)
        named = [str(u) for u in i.doc.get("mentions") or ()]
        if i.event.type == "message.new":
            seq, when = i.event.seq, iso_ms(i.doc["timestamp"])
        else:
            stored = seen.message(mid)
            if stored is None or "timestamp" not in stored:
                continue  # not persisted yet: this entry is deferred and replayed when it is
            seq, when = int(stored["seq"]), iso_ms(stored["timestamp"])
            gone = [str(u) for u in stored.get("mentions") or () if now is not None and str(u) not in now]
            commands += mention_remove_commands(conversation_id=cid, message_id=mid, seq=seq, user_ids=gone)
        users = [u for u in named if now is None or u in now]
        if users and when:
            commands += mention_record_commands(conversation_id=cid, message_id=mid, seq=seq, timestamp=when,
                                                user_ids=users)
    if commands:
        if bus_is_cluster(r):
            for command in commands:
                r.execute_command(*command)
        else:
            pipe = r.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            pipe.execute()
    return len(commands)
