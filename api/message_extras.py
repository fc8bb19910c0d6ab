"""What a history page adds to its messages for replies and reactions (docs/adr/0037). Reads only.

``message_history_get`` (``api/selectors.py``) calls :func:`extras_apply` once per page, after it has the page's
messages from the recent window and the store:

* **Reactions.** A message of the recent window carries its reactions already (the reaction script rewrites
  its copy there). A message served from the store carries what the drain persisted; its reaction state hash
  (``core.keys.reactions_key``), present for a day after a change, is newer: one pipelined HGETALL for
  the store-served messages of the page.
* **Quotes.** A reply carries the quote the send made (``messaging.replies``). The page refreshes it to the
  original's current content and deletion, from wherever that is known without a scan: the page itself, the
  recent window (one HMGET), the window's edits hash (read with the page), else the original's message bucket
  (read by ``_id``: its seq is in the quote; at most ``QUOTE_BUCKET_READS`` per page). An original found
  nowhere keeps the quote as sent.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from core.bus import bus_sync
from core.documents import MessageBucket, bucket_id
from core.keys import partition_of, recent_docs_key
from messaging.reactions import reactions_live_sync
from messaging.replies import quote_refreshed

if TYPE_CHECKING:
    from api.history import PageMessage

# Bucket reads one page may spend on quotes of originals older than the window (~1 ms each by _id on
# FerretDB v1): a page of 50 replies to 50 old messages costs at most this many, the rest keep their quotes.
QUOTE_BUCKET_READS = 5


def extras_apply(rows: list[PageMessage], *, conversation_id: str, window_ids: set[str],
                 edits: dict[str, dict[str, Any]]) -> None:
    """Bring the page's reactions and quotes up to date, in place. ``window_ids``: the messages read from the
    recent window; ``edits``: the window's edits hash (message id -> newest edit/delete), as the page read it.
    Cost: at most one pipeline of HGETALLs, one HMGET and ``QUOTE_BUCKET_READS`` bucket reads by ``_id``."""
    bus = bus_sync()
    stored = [m.id for m in rows if m.id not in window_ids]
    for mid, reactions in reactions_live_sync(bus, conversation_id=conversation_id, message_ids=stored).items():
        for m in rows:
            if m.id == mid:
                m.reactions = reactions
    replies = [m for m in rows if isinstance(m.reply_to, dict) and m.reply_to.get("id")]
    if not replies:
        return
    known: dict[str, tuple[str, bool]] = {m.id: (m.content or "", bool(m.deleted)) for m in rows}
    missing = sorted({str(m.reply_to["id"]) for m in replies} - set(known))
    if missing:
        docs = bus.hmget(recent_docs_key(partition_of(conversation_id), conversation_id), missing)
        for mid, raw in zip(missing, docs, strict=True):
            if raw is not None:
                doc = json.loads(raw)
                known[mid] = (doc.get("content") or "", bool(doc.get("deleted")))
    reads = 0
    for m in replies:
        quote = m.reply_to
        mid = str(quote["id"])
        if mid not in known and reads < QUOTE_BUCKET_READS and isinstance(quote.get("seq"), int):
            reads += 1
            bucket = MessageBucket._get_collection().find_one({"_id": bucket_id(conversation_id, quote["seq"])})
            entry = ((bucket or {}).get("m") or {}).get(str(quote["seq"]))
            if isinstance(entry, dict) and entry.get("id") == mid:
                known[mid] = (entry.get("content") or "", bool(entry.get("deleted")))
        edit = edits.get(mid)
        if edit is not None and mid in known and not known[mid][1]:
            known[mid] = ("" if edit.get("deleted") else edit.get("content") or known[mid][0],
                          bool(edit.get("deleted")))
        if mid in known:
            content, deleted = known[mid]
            m.reply_to = quote_refreshed(quote, content=content, deleted=deleted)
