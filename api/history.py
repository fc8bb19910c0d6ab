"""Message history of the REST API (no side effects): pages within the recent window come from Redis
(docs/adr/0028), older ones from the ``message_buckets`` read by ``_id`` and, below them, ``messages``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId

from api.message_extras import extras_apply
from api.selectors import HISTORY_MAX_LIMIT, member_require, time_parse
from core.bus import bus_sync
from core.documents import (
    BUCKET_SEQS,
    Conversation,
    Message,
    MessageBucket,
)
from core.keys import (
    partition_of,
    read_cursor_key,
    recent_docs_key,
    recent_edits_key,
    recent_key,
    seq_key,
)
from core.values import as_str

# ------------------------------------------------------------------ history


@dataclass(slots=True)
class PageMessage:
    """One message of a history page, with the fields of ``core.documents.Message`` the answer shows. A plain
    slotted object, not a mongoengine ``Message``: building one of those costs ~105 µs (its field machinery),
    5 ms of every 50-message page on this machine, for a value that is never saved."""

    id: str
    conversation_id: ObjectId
    seq: int
    sender_id: ObjectId
    client_msg_id: str | None
    content: str
    timestamp: datetime | None
    edited_at: datetime | None
    deleted: bool
    deleted_at: datetime | None
    edit_seq: int | None
    read_status: str
    mentions: list[str]
    reply_to: Any
    reactions: Any


@dataclass(frozen=True, slots=True)
class HistoryPage:
    messages: list[PageMessage]  # ascending seq
    has_more: bool  # more messages exist beyond the page in the direction of travel


def _window_message(raw: bytes | str, *, cursors: dict[str, int], members: set[str]) -> PageMessage:
    """A message of the recent window (JSON written by the append script) as a ``PageMessage``. Its
    ``read_status`` is derived from the read cursors of a two-member conversation (1:1), as the drain mirrors
    it into the store."""
    doc = json.loads(raw)
    seq = int(doc["seq"])
    sender = str(doc["sender_id"])
    read = len(members) == 2 and any(cursors.get(m, 0) >= seq for m in members if m != sender)
    return PageMessage(id=doc["id"], conversation_id=ObjectId(doc["conversation_id"]), seq=seq,
                       sender_id=ObjectId(sender), client_msg_id=doc.get("client_msg_id"),
                       content=doc.get("content") or "", timestamp=time_parse(doc["timestamp"]),
                       edited_at=time_parse(doc.get("edited_at")), deleted=bool(doc.get("deleted")),
                       deleted_at=time_parse(doc.get("deleted_at")), edit_seq=doc.get("edit_seq"),
                       read_status="read" if read else "sent", mentions=list(doc.get("mentions") or ()),
                       reply_to=doc.get("reply_to"), reactions=doc.get("reactions") or [])


def _edits_apply(rows: list[PageMessage], edits: dict[str, dict[str, Any]]) -> None:
    """Apply to store-read messages the edits/deletes the append script recorded for messages older than the
    window and the drain may not have written yet (the newer edit seq wins)."""
    for m in rows:
        edit = edits.get(m.id)
        if edit is None or int(edit.get("edit_seq") or 0) <= int(m.edit_seq or 0):
            continue
        if edit.get("deleted"):
            m.deleted, m.content, m.deleted_at = True, "", time_parse(edit.get("deleted_at"))
        elif not m.deleted:
            m.content, m.edited_at = edit.get("content") or "", time_parse(edit.get("edited_at"))
        m.edit_seq = int(edit["edit_seq"])


# KEYS[1] recent_key, KEYS[2] recent_docs_key, KEYS[3] recent_edits_key, KEYS[4] read-cursor hash (one slot);
# ARGV[1] "1" newest first, ARGV[2] min, ARGV[3] max (ZRANGEBYSCORE syntax), ARGV[4] count
# -> {floor or false, [message JSON...], [edits field, value...], [cursor field, value...]}: one atomic read,
# so a concurrent append's eviction can never show a floor that does not match the messages read.
WINDOW_READ_LUA = """
local floor = redis.call('HGET', KEYS[2], 'floor')
local edits = redis.call('HGETALL', KEYS[3])
local cursors = redis.call('HGETALL', KEYS[4])
if not floor then return {false, {}, edits, cursors} end
local ids
if ARGV[1] == '1' then
  ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
end
if #ids == 0 then return {floor, {}, edits, cursors} end
return {floor, redis.call('HMGET', KEYS[2], unpack(ids)), edits, cursors}
"""


# Buckets a page may read before it falls back to a ``messages`` query (a long run of seqs taken by edits and
# deletes has few messages per bucket); each read is ~1 ms by ``_id`` on FerretDB.
BUCKET_READS_MAX = 20


def _bucket_page(*, conversation_id: str, lowest: int, highest: int, limit: int, backwards: bool,
                 cursors: dict[str, int], members: set[str]) -> list[PageMessage] | None:
    """Up to ``limit`` messages with ``lowest <= seq <= highest`` from ``message_buckets``, each bucket read by
    ``_id`` equality; None when a bucket of the range is missing (data from before the buckets, or not yet
    persisted) or the page needs too many buckets: the caller then queries ``messages``."""
    if highest < lowest:
        return []
    first, last = (lowest - 1) // BUCKET_SEQS, (highest - 1) // BUCKET_SEQS
    order = range(last, first - 1, -1) if backwards else range(first, last + 1)
    out: list[dict[str, Any]] = []
    collection = MessageBucket._get_collection()
    for reads, n in enumerate(order):
        if reads >= BUCKET_READS_MAX:
            return None
        doc = collection.find_one({"_id": f"{conversation_id}:{n}"})
        if doc is None or doc.get("partial"):
            return None
        got = sorted((m for k, m in (doc.get("m") or {}).items() if lowest <= int(k) <= highest),
                     key=lambda m: int(m["seq"]), reverse=backwards)
        out.extend(got)
        if len(out) >= limit:
            break
    return [_bucket_message(m, conversation_id=conversation_id, cursors=cursors, members=members)
            for m in out[:limit]]


def _bucket_message(m: dict[str, Any], *, conversation_id: str, cursors: dict[str, int],
                    members: set[str]) -> PageMessage:
    seq, sender = int(m["seq"]), str(m["sender_id"])
    read = len(members) == 2 and any(cursors.get(u, 0) >= seq for u in members if u != sender)
    return PageMessage(id=m["id"], conversation_id=ObjectId(conversation_id), seq=seq, sender_id=ObjectId(sender),
                       client_msg_id=m.get("client_msg_id"), content=m.get("content") or "",
                       timestamp=m.get("timestamp"), edited_at=m.get("edited_at"), deleted=bool(m.get("deleted")),
                       deleted_at=m.get("deleted_at"), edit_seq=m.get("edit_seq"),
                       read_status="read" if read else "sent", mentions=list(m.get("mentions") or ()),
                       reply_to=m.get("reply_to"), reactions=m.get("reactions") or [])


def _stored_message(row: dict[str, Any]) -> PageMessage:
    """A ``messages`` document (as pymongo reads it) as a ``PageMessage``: ``read_status`` as the drain stored it."""
    return PageMessage(id=row["_id"], conversation_id=row["conversation_id"], seq=int(row["seq"]),
                       sender_id=row["sender_id"], client_msg_id=row.get("client_msg_id"),
                       content=row.get("content") or "", timestamp=row.get("timestamp"),
                       edited_at=row.get("edited_at"), deleted=bool(row.get("deleted")),
                       deleted_at=row.get("deleted_at"), edit_seq=row.get("edit_seq"),
                       read_status=row.get("read_status") or "sent", mentions=list(row.get("mentions") or ()),
                       reply_to=row.get("reply_to"), reactions=row.get("reactions") or [])


def _store_page(*, conversation_id: str, after: int | None, below: int | None, limit: int,
                backwards: bool, cursors: dict[str, int], members: set[str]) -> list[PageMessage]:
    """Up to ``limit`` stored messages with ``after < seq < below`` (either bound optional), newest first
    when ``backwards``, else oldest first: from the buckets when they cover the range, else ``messages``."""
    # What exists bounds the read, whatever ``below`` the caller asked (a member may page back from any seq):
    # the last seq Redis gave, else the stored conversation's last_seq read by _id (a conversation with no
    # message yet, or a Redis that lost its data). 0 is an empty history, answered without a ``messages``
    # query (a scan on FerretDB: seconds at 10k messages, a minute at 1M; docs/adr/0036).
    known = int(bus_sync().hget(seq_key(partition_of(conversation_id)), conversation_id) or 0)
    if known <= 0:
        stored = Conversation._get_collection().find_one({"_id": ObjectId(conversation_id)}, {"last_seq": 1})
        if stored is not None and isinstance(stored.get("last_seq"), int):
            known = stored["last_seq"]
            if known <= (after or 0):
                return []
    highest = known if below is None else (below - 1 if known <= 0 else min(below - 1, known))
    # highest 0 with no bound: nothing says how far the conversation goes (data stored by other means).
    from_buckets = None if highest <= 0 and below is None else _bucket_page(
        conversation_id=conversation_id, lowest=(after or 0) + 1, highest=highest, limit=limit,
        backwards=backwards, cursors=cursors, members=members)
    if from_buckets is not None:
        return from_buckets
    query: dict[str, Any] = {}
    if below is not None:
        query["seq__lt"] = below
    if after is not None:
        query["seq__gt"] = after
    base = Message.objects(conversation_id=ObjectId(conversation_id), **query)
    return [_stored_message(r) for r in base.order_by("-seq" if backwards else "seq").limit(limit).as_pymongo()]


def message_history_get(*, user_id: str, conversation_id: str, before_seq: int | None = None,
                        after_seq: int | None = None, limit: int = 50) -> HistoryPage:
    """A page of messages ordered by ``seq`` (ascending in the page): every acknowledged one, from the
    conversation's recent window in Redis (docs/adr/0028) above its ``floor`` and from the store at or below
    it, so the newest pages cost no document-store read and the seam has no gap and no duplicate.

    * neither bound: the newest ``limit`` messages;
    * ``before_seq``: the ``limit`` messages just below it (paging back in time);
    * ``after_seq``: the ``limit`` messages just above it (catching up, paging forward);
    * both: those strictly between, oldest first.

    Deleted messages are included as tombstones (their seq keeps the order gap-free to the client). Replies'
    quotes and reactions are brought up to date by ``api.message_extras.extras_apply`` (docs/adr/0037).
    Raises NotFound if the caller is not a member (membership from the Redis cache).
    """
    members = member_require(user_id=user_id, conversation_id=conversation_id)
    limit = max(1, min(limit, HISTORY_MAX_LIMIT))
    backwards = after_seq is None  # newest-first read, then reversed
    partition = partition_of(conversation_id)
    raw_floor, docs, raw_edits, raw_cursors = bus_sync().register_script(WINDOW_READ_LUA)(
        keys=[recent_key(partition, conversation_id), recent_docs_key(partition, conversation_id),
              recent_edits_key(partition, conversation_id), read_cursor_key(conversation_id)],
        args=["1" if backwards else "0", f"({after_seq}" if after_seq is not None else "-inf",
              f"({before_seq}" if before_seq is not None else "+inf", limit + 1])
    cursors = {as_str(k): int(v) for k, v in zip(raw_cursors[::2], raw_cursors[1::2], strict=True)}
    # No window (never written, or expired with the conversation idle): everything is in the store.
    floor = int(raw_floor) if raw_floor else None
    rows = [_window_message(d, cursors=cursors, members=members) for d in docs] if floor is not None else []
    window_ids = {m.id for m in rows}
    edits = {as_str(k): json.loads(v) for k, v in zip(raw_edits[::2], raw_edits[1::2], strict=True)}
    # The store serves exactly the messages at or below the floor (all of them when there is no window).
    below = before_seq if floor is None else min(floor + 1, before_seq if before_seq is not None else floor + 1)
    lowest = after_seq or 0
    if (not backwards or len(rows) <= limit) and (below is None or below > lowest + 1):
        stored = _store_page(conversation_id=conversation_id, after=after_seq, below=below,
                             limit=limit + 1 - (len(rows) if backwards else 0), backwards=backwards,
                             cursors=cursors, members=members)
        _edits_apply(stored, edits)
        # Newest first, the window's part is above the store's; oldest first, below it.
        rows = rows + stored if backwards else (stored + rows)[:limit + 1]
    has_more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
    extras_apply(rows, conversation_id=conversation_id, window_ids=window_ids, edits=edits)
    return HistoryPage(messages=rows, has_more=has_more)
