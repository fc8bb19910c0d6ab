"""Message buckets (docs/adr/0028, 0041): the drain mirrors every message into ``message_buckets`` (50 seqs a
document, ``_id`` "<conversation>:<n>") so cold history is read by ``_id`` equality, the only read FerretDB v1
does not scan for; ``manage.py buckets_build`` builds them from existing messages.

Each bucket is written once, whole, when its range is complete (docs/adr/0041): until then it is a *tail*, a
Redis hash per conversation (``core.keys.bucket_tail_key``) the drain keeps with the messages and changes of
the range, because FerretDB v1 rewrites a whole document on every ``$set`` (11 ms into a 49-message bucket
against 3 ms into an empty one: bench/drain_scale.py), so setting each message into its growing bucket made
the drain slower the more the store held. The tail's messages stay in the recent window meanwhile (the drain
holds the window's persisted watermark below the tail's range), so no read needs the tail from the store.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import bson
import bson.errors
from bson import ObjectId
from django.conf import settings
from mongoengine.connection import get_db

from core.bus import BusSync, bus_sync
from core.clients import sync_redis
from core.documents import BUCKET_SEQS, bucket_id
from core.keys import (
    bucket_summary_key,
    bucket_tail_key,
    bucket_tails_key,
    partition_of,
    persisted_key,
    recent_unread_key,
)
from core.values import as_str
from storage.rules import Item, Seen, edited_mentions, older_edit, reaction_bucket_update
from storage.search_index import search_index_write
from storage.writes import DUPLICATE_KEY, UPDATE_STATEMENTS_MAX


def _bucket_message(item: Item) -> dict[str, Any]:
    assert item.event is not None
    return {"id": item.doc["id"], "seq": item.event.seq, "sender_id": item.doc["sender_id"],
            "content": item.doc["content"], "timestamp": item.doc["timestamp"],
            "client_msg_id": item.doc["client_msg_id"], "deleted": False,
            **({"mentions": item.doc["mentions"]} if item.doc["mentions"] else {}),
            **({"reply_to": item.doc.get("reply_to")} if item.doc.get("reply_to") is not None else {})}


@dataclass
class Tail:
    """A conversation's bucket in progress: bucket number ``n``, whether it holds its range's first seq's event
    (else it may lack messages persisted before it: it is inserted ``partial``), its entries by seq: ``m`` those
    decoded, ``packed`` those still BSON as loaded (all of them: :meth:`entries`)."""

    n: int
    first: bool
    m: dict[str, dict[str, Any]]
    new: bool = False  # replaces what Redis holds for the conversation (a new range)
    dirty: set[str] = field(default_factory=set)  # entries (seqs) to write
    mark: int = 0  # the persisted watermark the window was held below (raised to it when the tail is stored)
    # Entries are decoded only when a batch needs them (the tail completes, or a change or read mark of the
    # conversation looks into it): most batches only add a message, and decoding a 25-message tail for it cost
    # more than the rest of its Redis work at 1M messages stored (bench/drain_scale.py, docs/benchmarks.md).
    packed: dict[str, bytes] = field(default_factory=dict)

    def has(self, seq: str) -> bool:
        return seq in self.m or seq in self.packed

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every entry, decoded (once)."""
        if self.packed:
            self.m.update({k: bson.decode(v) for k, v in self.packed.items() if k not in self.m})
            self.packed.clear()
        return self.m


@dataclass
class Tails:
    """The tails of a batch's conversations (``None``: none), loaded before its writes, saved after them."""

    partition: int
    of: dict[str, Tail | None] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)  # the window's persisted watermark before the batch

    def caps(self) -> dict[str, int]:
        """Per conversation with a tail: the highest seq its window may drop (below the tail's range)."""
        return {cid: t.n * BUCKET_SEQS for cid, t in self.of.items() if t is not None}


def tails_enabled() -> bool:
    """Tails need the recent window (it serves their messages): with ``CHATSTREAM_RECENT_MESSAGES=0`` every
    message is set into its stored bucket at once, as before docs/adr/0041."""
    return int(settings.RECENT_MESSAGES) > 0


def tails_load(r: BusSync, *, partition: int, conversation_ids: list[str]) -> Tails:
    """Read the tails of ``conversation_ids`` (one pipelined HGETALL each). Read-only."""
    tails = Tails(partition=partition)
    if not conversation_ids or not tails_enabled():
        return tails
    pipe = r.pipeline(transaction=False)
    for cid in conversation_ids:
        pipe.hgetall(bucket_tail_key(partition, cid))
    pipe.hmget(persisted_key(partition), conversation_ids)
    *raws, marks = pipe.execute()
    for cid, raw, mark in zip(conversation_ids, raws, marks, strict=True):
        tails.of[cid] = _tail_decode(raw) if raw else None
        tails.marks[cid] = int(mark or 0)
    return tails


def _tail_decode(raw: dict[Any, Any]) -> Tail | None:
    fields = {as_str(k): v for k, v in raw.items()}
    if "n" not in fields:
        return None
    n, first = int(fields.pop("n")), as_str(fields.pop("first", b"0")) == "1"
    mark = int(fields.pop("mark", 0))
    return Tail(n=n, first=first, m={}, packed={k: bytes(v) for k, v in fields.items()}, mark=mark)


def tails_save(r: BusSync, tails: Tails, *, now_ms: int | None = None, marks: dict[str, int] | None = None) -> None:
    """Write what the batch changed in its tails (new entries, changed entries, completed tails deleted), in one
    pipeline; must run before the batch's entries are acknowledged, so a redelivery finds what it wrote.
    ``marks``: the conversations' persisted watermarks as the batch settles them, before the tails' cap (kept in
    the tail: the watermark the window gets once the tail is stored)."""
    if not tails.of:
        return
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    index = bucket_tails_key(tails.partition)
    pipe = r.pipeline(transaction=False)
    for cid, tail in tails.of.items():
        key = bucket_tail_key(tails.partition, cid)
        if tail is None:
            pipe.delete(key)
            pipe.zrem(index, cid)
            continue
        if tail.new:
            pipe.delete(key)
        mark = max(tail.mark, (marks or {}).get(cid, 0))
        if tail.new or tail.dirty or mark > tail.mark:
            pipe.hset(key, mapping={"n": tail.n, "first": "1" if tail.first else "0", "mark": mark,
                                    **{seq: bson.encode(tail.m[seq]) for seq in (tail.m if tail.new else tail.dirty)
                                       if seq in tail.m}})
            pipe.zadd(index, {cid: now_ms})
    pipe.execute()


def _whole(cid: str, tail: Tail) -> dict[str, Any]:
    return {"_id": bucket_id(cid, tail.n * BUCKET_SEQS + 1), "conversation_id": ObjectId(cid), "n": tail.n,
            "m": tail.entries(), "partial": not tail.first}


@dataclass
class BucketsWritten:
    """What :func:`buckets_write` did that the word index follows (storage/search_index.py): the buckets it wrote
    whole (inserted, or merged into a stored one), and the ``message.new`` entries (entry ids) whose message is in
    a tail, to be indexed with their bucket when it is written (docs/adr/0048)."""

    whole: list[dict[str, Any]] = field(default_factory=list)
    in_tails: set[str] = field(default_factory=set)


# A stored bucket's summary (its messages' seq, sender and deleted flag) is what the conversation list counts a
# reader's unread messages below the recent window from (api/conversation_list.py). The drain writes it when it
# inserts a bucket whole, from the document it has in hand, so a list never reads a new bucket by ``_id`` for it
# (3-6 ms each on FerretDB at 1M messages; docs/benchmarks.md, "Issue 13: the unread total kept and advanced by
# the window's counts, bucket summaries written by the drain"); a list's miss (an older bucket, an expired
# summary) still fills it by ``_id``. Kept a day (a reader who lists daily finds them); ~730 bytes per
# 50-message bucket by MEMORY USAGE (tests/api/test_cards.py): ~15 MB per million messages written in a day.
BUCKET_SUMMARY_TTL_S = 86400


def bucket_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A stored bucket document as its summary, ``{"u": [sender ids], "m": [[seq, sender index, deleted 0/1],
    ...]}``; None for a partial bucket (it may lack messages: the list counts such a range otherwise)."""
    if doc.get("partial"):
        return None
    senders: dict[str, int] = {}
    rows = [[int(m["seq"]), senders.setdefault(str(m["sender_id"]), len(senders)), int(bool(m.get("deleted")))]
            for m in (doc.get("m") or {}).values()]
    return {"u": list(senders), "m": rows}


def summaries_remember(docs: list[dict[str, Any]]) -> None:
    """After inserting ``docs`` whole (and before any later write to them, which drops them again): cache their
    summaries. A list's fill that read one of them before the insert holds a lease this SET ends, so it caches
    nothing (docs/adr/0050). One pipeline of SET EX on REDIS_URL."""
    summaries = [(doc["_id"], summary) for doc in docs if (summary := bucket_summary(doc)) is not None]
    if summaries:
        pipe = sync_redis().pipeline(transaction=False)
        for bid, summary in summaries:
            pipe.set(bucket_summary_key(bid), json.dumps(summary, separators=(",", ":")), ex=BUCKET_SUMMARY_TTL_S)
        pipe.execute()


def summaries_forget(bucket_ids: list[str]) -> None:
    """After a write to stored buckets: drop their cached summaries (the conversation list's unread counts below
    a window, ``api.conversation_list``), so the next list reads what was written, a deletion included; a list
    whose fill read a bucket before this write holds a lease that this drop ends, and caches nothing
    (docs/adr/0050). One DEL on REDIS_URL."""
    if bucket_ids:
        sync_redis().delete(*map(bucket_summary_key, bucket_ids))


def unread_kept_forget(conversation_ids: set[str]) -> None:
    """After a deletion was written into a stored bucket: drop the conversations' kept unread counts
    (``core.keys.recent_unread_key``). A reader's kept total (api/conversation_list.py, docs/adr/0059) counted
    below the window from the bucket's summary, which until this write did not have the deletion when the list
    came between the deletion's append and the drain; the next list counts again. (New messages set into a
    stored bucket change no total: each was counted when it arrived.) One pipeline of DELs on the bus, the keys
    in their partitions' slots."""
    if conversation_ids:
        pipe = bus_sync().pipeline(transaction=False)
        for cid in sorted(conversation_ids):
            pipe.delete(recent_unread_key(partition_of(cid), cid))
        pipe.execute()


def buckets_write(db: Any, items: list[Item], *, seen: Seen | None = None,
                  tails: Tails | None = None) -> BucketsWritten:
    """Mirror the batch into ``message_buckets`` with inserts and ``_id``-keyed updates only (docs/adr/0041).

    A message goes into its conversation's tail (``tails``, saved by the caller with :func:`tails_save`); a tail
    whose range is complete (its last seq persisted, or an event of a later range) is inserted whole, once
    (a duplicate ``_id`` is a redelivery: done). A message whose bucket is already stored (a tail flushed when
    idle, data from before the tails, an out-of-order retry) is ``$set`` into it by ``_id`` as before, unless it
    is there already. Then one update by ``_id`` per edit/delete/reaction of a stored bucket's message (its
    guard decided on the bucket read by ``_id``, ``seen``, as FerretDB v1 scans for a filter that does not
    match), or the change applied to the tail's entry. Entries that failed or are dead are skipped. Without
    ``tails`` (or with the window off) every message is set into its stored bucket. Returns what the word index
    follows (:class:`BucketsWritten`). Raises the transient pymongo errors; any other write error fails the batch
    (it is retried), since the buckets must not miss a message the entry's ack would declare persisted."""
    live = [i for i in items if i.event is not None and i.event.seq > 0 and i.failure is None and i.dead is None]
    seen = seen or Seen(db)
    tails = tails if tails is not None and tails_enabled() else None
    written = BucketsWritten()
    if not live:
        _tails_seen(seen, tails, items)  # a batch of read marks only: the read mirror looks in the tails
        return written
    shells: dict[str, dict[str, Any]] = {}
    sets: dict[str, dict[str, Any]] = {}
    complete: list[dict[str, Any]] = []

    def stored_set(i: Item, stored: dict[str, Any] | None, *, read: bool) -> None:
        """The way before tails: set the message into its stored bucket, created as a shell if missing (with
        ``read``, ``stored`` is the bucket as read by ``_id`` and a message it holds is left alone; without, the
        shell is inserted in case and the message set regardless: both idempotent)."""
        assert i.event is not None
        seq, n = i.event.seq, (i.event.seq - 1) // BUCKET_SEQS
        bid, first = bucket_id(i.event.conversation_id, seq), seq == n * BUCKET_SEQS + 1
        if (stored is None or not read) and bid not in shells:
            # A bucket created by a later event than its range's first one may lack messages persisted before
            # the buckets existed (or a deferred first entry): readers skip a partial bucket until the first
            # seq's event (or manage.py buckets_build) completes it.
            shells[bid] = {"_id": bid, "conversation_id": i.conversation, "n": n, "m": {}, "partial": not first}
            if read:
                seen.buckets[bid] = {**shells[bid], "m": {}}
        entries = (seen.buckets.get(bid) or {}).setdefault("m", {}) if read else {}
        if first:
            sets.setdefault(bid, {})["partial"] = False
        if i.event.type == "message.new" and str(seq) not in entries:
            entries[str(seq)] = entry = _bucket_message(i)
            sets.setdefault(bid, {})[f"m.{seq}"] = entry

    by_conv: dict[str, list[Item]] = {}
    for i in live:
        assert i.event is not None
        by_conv.setdefault(i.event.conversation_id, []).append(i)
    for cid, group in by_conv.items():
        if tails is None:
            for i in group:
                assert i.event is not None
                stored_set(i, None, read=False)
            continue
        tail = tails.of.get(cid)
        for i in sorted(group, key=lambda i: i.event.seq if i.event else 0):
            assert i.event is not None
            seq = i.event.seq
            n = (seq - 1) // BUCKET_SEQS
            first = seq == n * BUCKET_SEQS + 1
            if tail is not None and n < tail.n:
                stored_set(i, seen.bucket(bucket_id(cid, seq)), read=True)  # an older range, already written
                continue
            if tail is None or n > tail.n:
                # A new range. Its bucket may be stored already when the event is not its first (a tail flushed
                # when idle, data from before the tails), is a redelivery, or is at or below the window's
                # watermark (a range completed without it: a dead letter retried): one read by _id, rarely.
                if not first or i.deliveries > 1 or seq <= tails.marks.get(cid, 0):
                    stored = seen.bucket(bucket_id(cid, seq))
                    if stored is not None:
                        stored_set(i, stored, read=True)
                        continue
                if tail is not None:
                    complete.append(_whole(cid, tail))  # a later range has begun: this one is complete
                tail = Tail(n=n, first=first, m={}, new=True)
            if first and not tail.first:
                tail.first = True
                tail.dirty.add("first")
            if i.event.type == "message.new":
                written.in_tails.add(i.entry_id)
                if not tail.has(str(seq)):
                    tail.m[str(seq)] = _bucket_message(i)
                    tail.dirty.add(str(seq))
            if seq == (n + 1) * BUCKET_SEQS:  # the range's last seq: nothing more can come into it in order
                complete.append(_whole(cid, tail))
                tail = None
        tails.of[cid] = tail
    _tails_seen(seen, tails, items)
    for doc in complete:
        seen.buckets[doc["_id"]] = doc
    inserted: list[dict[str, Any]] = []
    for documents in (list(shells.values()), complete):
        if documents:
            reply = db.command("insert", "message_buckets", documents=documents, ordered=False)
            errors = reply.get("writeErrors") or []
            _buckets_raise([e for e in errors if int(e.get("code", 0)) != DUPLICATE_KEY])
            if documents is complete:
                for e in errors:  # stored already: a redelivery, or manage.py buckets_build ran meanwhile
                    _complete_into_stored(seen, documents[int(e["index"])], sets)
                dup = {int(e["index"]) for e in errors}
                inserted = [doc for k, doc in enumerate(documents) if k not in dup]
    statements = [{"q": {"_id": bid}, "u": {"$set": fields}} for bid, fields in sets.items() if fields]
    for at in range(0, len(statements), UPDATE_STATEMENTS_MAX):
        reply = db.command("update", "message_buckets", ordered=False,
                           updates=statements[at:at + UPDATE_STATEMENTS_MAX])
        _buckets_raise(reply.get("writeErrors") or [])
    summaries_forget(list(sets))
    summaries_remember(inserted)  # before the batch's changes to them, which drop them
    _changes_write(db, live, seen=seen, tails=tails)
    written.whole = complete
    return written


def _tails_seen(seen: Seen, tails: Tails | None, items: list[Item]) -> None:
    """Let ``seen.bucket`` answer a bucket in progress from its tail, for the conversations of ``items`` whose
    changes (edits, deletes, reactions) and read marks look into it (the others' tails stay undecoded)."""
    wanted = {i.event.conversation_id for i in items if i.event is not None and i.event.type != "message.new"}
    for cid, tail in (tails.of.items() if tails is not None else ()):
        if tail is not None and cid in wanted:
            seen.tails[bucket_id(cid, tail.n * BUCKET_SEQS + 1)] = {"m": tail.entries()}


def _complete_into_stored(seen: Seen, doc: dict[str, Any], sets: dict[str, dict[str, Any]]) -> None:
    """A completed tail whose bucket is stored already: set into it only the entries it lacks (the ones it has
    may carry later changes, which must not be undone), and clear ``partial`` if the tail had the first seq."""
    seen.buckets.pop(doc["_id"], None)
    there = seen.bucket(doc["_id"]) or {}
    entries = there.setdefault("m", {})
    fields = sets.setdefault(doc["_id"], {})
    for seq, entry in doc["m"].items():
        if seq not in entries:
            entries[seq] = entry
            fields[f"m.{seq}"] = entry
    if not doc["partial"] and there.get("partial"):
        fields["partial"] = False


def _changes_write(db: Any, live: list[Item], *, seen: Seen, tails: Tails | None) -> None:
    """Edits, deletes and reactions of the batch on their messages' bucket entries: a ``$set`` by ``_id`` on a
    stored bucket, or the entry of a tail changed in place (saved with the tail)."""
    changes = [i for i in live if i.event is not None and i.event.type in (
        "message.edited", "message.deleted", "reaction.added", "reaction.removed")]
    tail_of = {bid: t for cid, t in (tails.of.items() if tails else ()) if t is not None
               for bid in [bucket_id(cid, t.n * BUCKET_SEQS + 1)]}
    ops: list[dict[str, Any]] = []
    deleted: set[str] = set()  # conversations with a deletion written into a stored bucket
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
        fields: dict[str, Any] | None
        if i.event.type in ("reaction.added", "reaction.removed"):
            fields = reaction_bucket_update(i, entry, path)
        elif not older_edit(entry, i.event.seq):
            fields = None  # a newer change is there already
        elif i.event.type == "message.edited":
            fields = None if entry.get("deleted") is True else {
                f"{path}.content": i.doc["content"], f"{path}.edited_at": i.doc["edited_at"],
                f"{path}.edit_seq": i.event.seq, **edited_mentions(i, f"{path}.")}
            if fields is not None:
                entry.update(edit_seq=i.event.seq)
        else:
            entry.update(deleted=True, edit_seq=i.event.seq)
            fields = {f"{path}.deleted": True, f"{path}.content": "", f"{path}.deleted_at": i.doc["deleted_at"],
                      f"{path}.edit_seq": i.event.seq}
        if fields is None:
            continue
        tail = tail_of.get(bid)
        if tail is not None:
            if _encodable({"u": fields}):
                entry.update({k.removeprefix(path + "."): v for k, v in fields.items()})
                tail.dirty.add(str(seq))
            continue
        ops.append({"q": {"_id": bid}, "u": {"$set": fields}})
        if i.event.type == "message.deleted":
            deleted.add(i.event.conversation_id)
    # An edit whose content no store can hold fails its own messages update next, where it is isolated and
    # dead-lettered (docs/adr/0025); here it must not fail the bucket writes of the whole batch first.
    ops = [op for op in ops if _encodable(op)]
    for at in range(0, len(ops), UPDATE_STATEMENTS_MAX):
        reply = db.command("update", "message_buckets", updates=ops[at:at + UPDATE_STATEMENTS_MAX], ordered=True)
        _buckets_raise(reply.get("writeErrors") or [])
    summaries_forget([op["q"]["_id"] for op in ops])
    unread_kept_forget(deleted)


def tail_flush(db: Any, r: BusSync, *, partition: int, conversation_id: str) -> int | None:
    """Write ``conversation_id``'s tail into ``message_buckets`` as it is (a duplicate ``_id``: stored already)
    and delete it; later messages of its range are set into the stored bucket. Precondition: the caller holds
    the partition's drain lease. Returns the watermark the window was held below (the caller raises it), or
    None when there was no tail."""
    tail = _tail_decode(r.hgetall(bucket_tail_key(partition, conversation_id)) or {})
    if tail is not None:
        doc = _whole(conversation_id, tail)
        reply = db.command("insert", "message_buckets", documents=[doc], ordered=False)
        errors = reply.get("writeErrors") or []
        _buckets_raise([e for e in errors if int(e.get("code", 0)) != DUPLICATE_KEY])
        if not errors:
            summaries_remember([doc])
        search_index_write(db, [], seen=Seen(db), whole=[doc])  # its messages were indexed with it (ADR 0048)
    pipe = r.pipeline(transaction=False)
    pipe.delete(bucket_tail_key(partition, conversation_id))
    pipe.zrem(bucket_tails_key(partition), conversation_id)
    pipe.execute()
    return tail.mark if tail is not None else None


def tails_idle(r: BusSync, *, partition: int, idle_s: float, now_ms: int | None = None, count: int = 200) -> list[str]:
    """Up to ``count`` conversations of ``partition`` whose tail has not changed for ``idle_s`` seconds."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    found = r.zrangebyscore(bucket_tails_key(partition), "-inf", now_ms - int(idle_s * 1000), start=0, num=count)
    return [as_str(c) for c in found]


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
        summaries_forget(list(pending))
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
