"""Message buckets (docs/adr/0028): the drain mirrors every message into ``message_buckets`` (50 seqs a
document, ``_id`` "<conversation>:<n>") so cold history is read by ``_id`` equality, the only read FerretDB v1
does not scan for; ``manage.py buckets_build`` builds them from existing messages.
"""

from __future__ import annotations

from typing import Any

import bson.errors
from mongoengine.connection import get_db

from core.documents import BUCKET_SEQS, bucket_id
from storage.rules import Item, Seen, edited_mentions, older_edit, reaction_bucket_update
from storage.writes import DUPLICATE_KEY, UPDATE_STATEMENTS_MAX


def _bucket_message(item: Item) -> dict[str, Any]:
    assert item.event is not None
    return {"id": item.doc["id"], "seq": item.event.seq, "sender_id": item.doc["sender_id"],
            "content": item.doc["content"], "timestamp": item.doc["timestamp"],
            "client_msg_id": item.doc["client_msg_id"], "deleted": False,
            **({"mentions": item.doc["mentions"]} if item.doc["mentions"] else {}),
            **({"reply_to": item.doc["reply_to"]} if item.doc.get("reply_to") is not None else {})}


def buckets_write(db: Any, items: list[Item], *, seen: Seen | None = None) -> None:
    """Mirror the batch into ``message_buckets`` with inserts and ``_id``-keyed updates only: one unordered
    ``insert`` of the shells of every bucket a sequenced event falls in (a duplicate ``_id``: it exists), one
    unordered ``update`` per bucket ``$set``-ing its new messages under their seq (idempotent), then one
    update by ``_id`` per edit/delete (its message's seq found by ``_id``; its guard decided on the bucket read by
    ``_id``, ``seen``, as FerretDB v1 scans for a filter that does not match). Entries that failed or are dead
    are skipped. Raises the transient pymongo errors; any other write error fails the batch (it is retried),
    since the buckets must not miss a message the entry's ack would declare persisted."""
    live = [i for i in items if i.event is not None and i.event.seq > 0 and i.failure is None and i.dead is None]
    if not live:
        return
    shells: dict[str, dict[str, Any]] = {}
    news: dict[str, dict[str, Any]] = {}
    for i in live:
        assert i.event is not None
        n = (i.event.seq - 1) // BUCKET_SEQS
        bid = bucket_id(i.event.conversation_id, i.event.seq)
        # A bucket created by a later event than its range's first one may lack messages persisted before the
        # buckets existed (or a deferred first entry): readers skip a partial bucket until the first seq's
        # event (or manage.py buckets_build) completes it.
        first = i.event.seq == n * BUCKET_SEQS + 1
        shells.setdefault(bid, {"_id": bid, "conversation_id": i.conversation, "n": n, "m": {},
                                "partial": not first})
        if first:
            news.setdefault(bid, {})["partial"] = False
        if i.event.type == "message.new":
            news.setdefault(bid, {})[f"m.{i.event.seq}"] = _bucket_message(i)
    reply = db.command("insert", "message_buckets", documents=list(shells.values()), ordered=False)
    _buckets_raise([e for e in reply.get("writeErrors") or [] if int(e.get("code", 0)) != DUPLICATE_KEY])
    statements = [{"q": {"_id": bid}, "u": {"$set": fields}} for bid, fields in news.items()]
    for at in range(0, len(statements), UPDATE_STATEMENTS_MAX):
        reply = db.command("update", "message_buckets", ordered=False,
                           updates=statements[at:at + UPDATE_STATEMENTS_MAX])
        _buckets_raise(reply.get("writeErrors") or [])
    changes = [i for i in live if i.event is not None and i.event.type in (
        "message.edited", "message.deleted", "reaction.added", "reaction.removed")]
    seen = seen or Seen(db)
    ops = []
    for i in changes:
        assert i.event is not None
        found = seen.message(i.doc["id"])  # by _id: no scan, even on FerretDB
        if found is None:
            continue  # not persisted yet: the drain defers this entry and comes back
        seq = int(found["seq"])
        path = f"m.{seq}"
        bid = bucket_id(i.event.conversation_id, seq)
        bucket = seen.bucket(bid)
        entry = ((bucket or {}).get("m") or {}).get(str(seq))
        if not isinstance(entry, dict) or entry.get("id") != i.doc["id"]:
            continue  # not in its bucket (a partial one)
        q = {"_id": bid}
        if i.event.type in ("reaction.added", "reaction.removed"):
            if (fields := reaction_bucket_update(i, entry, path)) is not None:
                ops.append({"q": q, "u": {"$set": fields}})
            continue
        if not older_edit(entry, i.event.seq):
            continue  # a newer change is there already
        if i.event.type == "message.edited":
            if entry.get("deleted") is True:
                continue
            entry.update(edit_seq=i.event.seq)
            ops.append({"q": q, "u": {"$set": {
                f"{path}.content": i.doc["content"], f"{path}.edited_at": i.doc["edited_at"],
                f"{path}.edit_seq": i.event.seq, **edited_mentions(i, f"{path}.")}}})
        else:
            entry.update(deleted=True, edit_seq=i.event.seq)
            ops.append({"q": q, "u": {"$set": {f"{path}.deleted": True, f"{path}.content": "",
                                               f"{path}.deleted_at": i.doc["deleted_at"],
                                               f"{path}.edit_seq": i.event.seq}}})
    # An edit whose content no store can hold fails its own messages update next, where it is isolated and
    # dead-lettered (docs/adr/0025); here it must not fail the bucket writes of the whole batch first.
    ops = [op for op in ops if _encodable(op)]
    for at in range(0, len(ops), UPDATE_STATEMENTS_MAX):
        reply = db.command("update", "message_buckets", updates=ops[at:at + UPDATE_STATEMENTS_MAX], ordered=True)
        _buckets_raise(reply.get("writeErrors") or [])


def _encodable(statement: dict[str, Any]) -> bool:
    """Whether pymongo can encode ``statement`` (a lone surrogate, a NUL in a key or an integer past 64 bits
    cannot be sent at all)."""
    try:
        bson.encode(statement)
    except (bson.errors.InvalidDocument, UnicodeEncodeError, OverflowError, ValueError):
        return False
    return True


def _buckets_raise(errors: list[dict[str, Any]]) -> None:
    if errors:
        raise RuntimeError(f"message_buckets write error {errors[0].get('code')}: {errors[0].get('errmsg', '')}"[:500])


def buckets_build(*, batch: int = 1000) -> int:
    """Build ``message_buckets`` from ``messages`` (existing data, once: ``manage.py buckets_build``); safe to
    run again and beside the drain (every write is an idempotent ``$set`` of a message's final state, guarded
    by ``edit_seq``). Returns how many messages it wrote. One scan of ``messages``."""
    db = get_db()
    written = 0
    pending: dict[str, dict[str, Any]] = {}
    shells: dict[str, dict[str, Any]] = {}

    def flush() -> None:
        if shells:
            db.command("insert", "message_buckets", documents=list(shells.values()), ordered=False)
        statements = [{"q": {"_id": bid}, "u": {"$set": f}} for bid, f in pending.items()]
        for at in range(0, len(statements), UPDATE_STATEMENTS_MAX):
            db.command("update", "message_buckets", ordered=False, updates=statements[at:at + UPDATE_STATEMENTS_MAX])
        shells.clear()
        pending.clear()

    for row in db.messages.find({}, batch_size=batch):
        cid, seq = str(row["conversation_id"]), int(row["seq"])
        bid = bucket_id(cid, seq)
        shells.setdefault(bid, {"_id": bid, "conversation_id": row["conversation_id"], "n": (seq - 1) // BUCKET_SEQS,
                                "m": {}, "partial": False})
        pending.setdefault(bid, {"partial": False})[f"m.{seq}"] = {
            "id": row["_id"], "seq": seq, "sender_id": row["sender_id"], "content": row.get("content", ""),
            "timestamp": row.get("timestamp"), "client_msg_id": row.get("client_msg_id"),
            "deleted": bool(row.get("deleted")), "edited_at": row.get("edited_at"),
            "deleted_at": row.get("deleted_at"), "edit_seq": row.get("edit_seq"), "reply_to": row.get("reply_to"),
            "reactions": row.get("reactions") or [], "rx_seq": row.get("rx_seq")}
        written += 1
        if len(pending) >= batch:
            flush()
    flush()
    return written
