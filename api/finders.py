"""The read of ``GET /search`` (no side effect but its cursor): the messages of the caller's own conversations
that contain a query's words (docs/api.md, docs/adr/0038, 0045). ``GET /mentions`` is api/mention_list.py.

Search on the default store (FerretDB v1 on SQLite, where only ``_id`` equality reads are cheap) reads what a
history page reads: each of the caller's conversations newest first, its recent window from Redis (every
acknowledged message, edits applied: searchable at once) and then those of its ``message_buckets`` that the
drain's word index (``search_blocks``, storage/search_index.py, ADR 0045) names for the query's words, by
``_id``, 50 messages per read. On MongoDB, the text index instead (api/search_text.py).
Conversations are merged newest first; a request reads at most ``SEARCH_BUCKET_READS`` buckets, and its cursor (kept
in Redis for ``SEARCH_CURSOR_TTL_S``, owned by the caller) says where each conversation stopped, so the next page
continues there. Only the caller's conversations are ever read, so the cost follows the size of the caller's history,
not of the store.
"""

from __future__ import annotations

import heapq
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bson import ObjectId

from api import search_text
from api.history import WINDOW_READ_LUA
from core.bus import bus_is_cluster, bus_sync
from core.clients import sync_redis
from core.documents import BUCKET_SEQS, Message, MessageBucket
from core.errors import ValidationFailed
from core.keys import (
    partition_of,
    read_cursor_key,
    recent_docs_key,
    recent_edits_key,
    recent_key,
    search_cursor_key,
    seq_key,
)
from core.values import as_str, iso_ms
from messaging.selectors import user_conversation_ids
from storage.search_index import BLOCK_BUCKETS, COLLECTION, WORD_RE, block_id, block_of, store_is_ferretdb, term_key

SEARCH_PAGE_MAX = 50
# A query: at most 100 characters and 8 words (the words are ANDed; more words narrow a chat search no further
# in practice, and each costs a regex pass over every message read).
SEARCH_QUERY_MAX_CHARS = 100
SEARCH_TERMS_MAX = 8
# Bucket reads (50 messages each, ~0.5-1 ms by _id on FerretDB v1) one request may make: 200 bounds a
# request to ~10,000 stored messages and ~0.2-0.4 s (docs/benchmarks.md, "Search"); past it the page ends
# early with a cursor.
SEARCH_BUCKET_READS = 200
# ... and at most this long reading buckets (a loaded store reads a 50-message bucket in 40 ms rather than 4: at
# load average 30 on 2 cores, 200 reads took 8 s); a person waits about a second for a page. The first
# SEARCH_BUCKET_READS_MIN reads of a request are always made, so every page moves the cursor on.
SEARCH_TIME_BUDGET_S = 1.0
SEARCH_BUCKET_READS_MIN = 4
# Search blocks (storage/search_index.py, 1,000 seqs each, a read by _id of the query's words only) one request
# may read: 200 covers 200,000 messages of the caller's history; the time budget above bounds them too.
SEARCH_BLOCK_READS = 200
SEARCH_CURSOR_TTL_S = 600
_WORD_RE = WORD_RE  # the one tokenizer, shared with the index the drain writes (storage/search_index.py)


def search_terms(query: Any) -> list[str]:
    """The distinct lower-cased words of a query. Raises ValidationFailed: ``query_too_long`` (over
    SEARCH_QUERY_MAX_CHARS), ``too_many_terms`` (over SEARCH_TERMS_MAX words), ``invalid_query`` (no word). Pure."""
    if not isinstance(query, str):
        raise ValidationFailed("q must be a string", code="invalid_query", details={"field": "q"})
    if len(query) > SEARCH_QUERY_MAX_CHARS:
        raise ValidationFailed(f"q is {len(query)} characters; the limit is {SEARCH_QUERY_MAX_CHARS}",
                               code="query_too_long", details={"field": "q", "limit": SEARCH_QUERY_MAX_CHARS})
    terms = list(dict.fromkeys(_WORD_RE.findall(query.lower())))
    if not terms:
        raise ValidationFailed("q must contain a word (letters or digits)", code="invalid_query",
                               details={"field": "q"})
    if len(terms) > SEARCH_TERMS_MAX:
        raise ValidationFailed(f"q has {len(terms)} words; the limit is {SEARCH_TERMS_MAX}", code="too_many_terms",
                               details={"field": "q", "limit": SEARCH_TERMS_MAX})
    return terms


def search_match(content: str, terms: list[str]) -> list[tuple[int, int]] | None:
    """The ``[start, end)`` character offsets of every occurrence of the terms as whole words of ``content``
    (case-insensitive), in order, if every term occurs; else None. The one predicate of search on every store.
    Pure."""
    words = set(_WORD_RE.findall(content.lower()))
    if not all(t in words for t in terms):
        return None
    spans: list[tuple[int, int]] = []
    lowered = content.lower()
    for match in _WORD_RE.finditer(lowered):
        if match.group() in terms:
            spans.append((match.start(), match.end()))
    return spans


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: str
    message_id: str
    seq: int
    sender_id: str
    content: str
    timestamp: str | None
    highlights: list[tuple[int, int]]


@dataclass(slots=True)
class _Source:
    """One conversation read newest first: its window's messages (already read), then its buckets from
    ``next_bucket`` down. ``below``: every message with a seq below it is still to be read; ``bound``: a key
    ``(time, seq)`` no unread message of it exceeds (None: unknown, as new as can be)."""

    conversation_id: str
    below: int
    window: list[dict[str, Any]]
    edits: dict[str, dict[str, Any]]
    next_bucket: int  # -1: no stored message left to read
    bound: tuple[str, int] | None = None
    buffered: list[dict[str, Any]] = field(default_factory=list)
    # Per search block read this request, the buckets that may hold a hit (bitmask; None: the block is
    # partial or missing, so every bucket may), and buckets that must be read whatever the index says
    # (those of messages with an edit the drain has not applied yet that matches).
    blocks: dict[int, int | None] = field(default_factory=dict)
    forced: set[int] = field(default_factory=set)

    def take(self) -> dict[str, Any] | None:
        """The next message already read (window, then the last bucket read), or None."""
        if self.window:
            return self.window.pop(0)
        if self.buffered:
            return self.buffered.pop(0)
        return None


def _ts_key(doc: dict[str, Any]) -> tuple[str, int]:
    ts = doc.get("timestamp")
    text = iso_ms(ts) if isinstance(ts, datetime) else str(ts or "")
    return text or "", int(doc["seq"])


def _sources(conversation_ids: list[str], state: dict[str, Any] | None) -> list[_Source]:
    """Each conversation's window below its bound (newest first), in one pipeline of window reads.
    ``state``: a cursor's ``{conversation id: [below, bound key or null, next bucket or null]}`` (None: a
    first page)."""
    bus = bus_sync()
    script = bus.register_script(WINDOW_READ_LUA)
    wanted = [c for c in conversation_ids if state is None or c in state]

    def call(cid: str, client: Any = None) -> Any:
        p = partition_of(cid)
        top = "+inf" if state is None else f"({int(state[cid][0])}"
        return script(keys=[recent_key(p, cid), recent_docs_key(p, cid), recent_edits_key(p, cid),
                            read_cursor_key(cid)], args=["1", "-inf", top, 100_000], client=client)

    if bus_is_cluster(bus):
        replies = [call(c) for c in wanted]
    else:
        pipe = bus.pipeline(transaction=False)
        for cid in wanted:
            call(cid, pipe)
        replies = list(pipe.execute())
    sources = []
    for cid, (raw_floor, docs, raw_edits, _cursors) in zip(wanted, replies, strict=True):
        window = [json.loads(d) for d in docs if d is not None] if raw_floor else []
        edits = {as_str(k): json.loads(v) for k, v in zip(raw_edits[::2], raw_edits[1::2], strict=True)}
        top_stored = int(raw_floor) if raw_floor else _last_seq(cid)
        below, bound = (1 << 53, None) if state is None else (int(state[cid][0]), state[cid][1])
        top_stored = min(top_stored, below - 1)
        next_bucket = (top_stored - 1) // BUCKET_SEQS if top_stored > 0 else -1
        if state is not None and len(state[cid]) > 2 and state[cid][2] is not None:
            next_bucket = min(next_bucket, int(state[cid][2]))  # buckets the index already ruled out
        sources.append(_Source(conversation_id=cid, below=below, window=window, edits=edits,
                               next_bucket=next_bucket,
                               bound=None if bound is None else (str(bound[0]), int(bound[1]))))
    return sources


def _last_seq(conversation_id: str) -> int:
    return int(bus_sync().hget(seq_key(partition_of(conversation_id)), conversation_id) or 0)


class _Budget:
    """Bucket reads left to a request, and its deadline (SEARCH_TIME_BUDGET_S)."""

    def __init__(self, reads: int) -> None:
        self.left = reads
        self.blocks_left = SEARCH_BLOCK_READS
        self.made = 0
        self.deadline = time.monotonic() + SEARCH_TIME_BUDGET_S

    def spend_block(self) -> bool:
        """Take one read of a search block (not counted among the bucket reads, so a page that reads the
        index still reads its minimum of buckets)."""
        if self.blocks_left <= 0 or (self.made >= SEARCH_BUCKET_READS_MIN and time.monotonic() > self.deadline):
            return False
        self.blocks_left -= 1
        return True

    def spend(self) -> bool:
        """Take one read if the budget allows it."""
        if self.left <= 0 or (self.made >= SEARCH_BUCKET_READS_MIN and time.monotonic() > self.deadline):
            return False
        self.left -= 1
        self.made += 1
        return True


def _block_mask(source: _Source, block: int, keys: list[str]) -> int | None:
    """The buckets of ``block`` (bits) where every key may occur, from its ``search_blocks`` document read by
    ``_id`` with only those keys projected; None when the block is missing or partial (read every bucket)."""
    doc = MessageBucket._get_db()[COLLECTION].find_one(
        {"_id": block_id(source.conversation_id, block)}, {"partial": 1, **{f"t.{k}": 1 for k in keys}})
    if doc is None or doc.get("partial") is not False:
        return None
    words = doc.get("t") or {}
    mask = (1 << BLOCK_BUCKETS) - 1
    for key in keys:
        mask &= int(words.get(key) or 0)
    return mask


def _seek(source: _Source, keys: list[str] | None, budget: _Budget) -> bool | None:
    """Move ``source.next_bucket`` down to the next bucket that may hold a hit: True (one is there), False (no
    stored message left can match), None (the budget ran out first; ``next_bucket`` keeps what was skipped).
    ``keys`` None: no index (MongoDB-less walk), every bucket is a candidate. Each block read is one read of
    """
    while source.next_bucket >= 0:
        n = source.next_bucket
        if keys is None or n in source.forced:
            return True
        block = block_of(n)
        if block not in source.blocks:
            if not budget.spend_block():
                return None
            source.blocks[block] = _block_mask(source, block, keys)
        mask = source.blocks[block]
        if mask is None:
            return True
        below = mask & ((1 << (n % BLOCK_BUCKETS + 1)) - 1)  # this bucket and the older ones of the block
        forced = [f for f in source.forced if block * BLOCK_BUCKETS <= f <= n]
        if below or forced:
            source.next_bucket = max(([block * BLOCK_BUCKETS + below.bit_length() - 1] if below else []) + forced)
            return True
        source.next_bucket = block * BLOCK_BUCKETS - 1
    return False


def _forced_buckets(sources: list[_Source], terms: list[str]) -> None:
    """Mark, per source, the buckets of messages whose pending edit (the window's edits hash: not applied by
    the drain yet, so not in the index yet) matches ``terms``. The message's seq: from the edit's
    ``original`` (first edits), else ``messages`` by ``_id`` (rare: an edit that matches, not drained yet)."""
    for source in sources:
        for mid, edit in source.edits.items():
            if edit.get("deleted") or search_match(str(edit.get("content") or ""), terms) is None:
                continue
            seq = (edit.get("original") or {}).get("seq")
            if not isinstance(seq, int):
                row = Message._get_collection().find_one({"_id": mid}, {"seq": 1})
                seq = None if row is None else int(row["seq"])
            if seq is not None:
                source.forced.add((seq - 1) // BUCKET_SEQS)


def _bucket_read(source: _Source) -> None:
    """Read the source's next bucket (by ``_id``; a missing or partial one from ``messages``) into its buffer,
    newest first, with the window's pending edits applied."""
    n = source.next_bucket
    source.next_bucket -= 1
    doc = MessageBucket._get_collection().find_one({"_id": f"{source.conversation_id}:{n}"})
    rows = list(((doc or {}).get("m") or {}).values())
    if doc is None or doc.get("partial"):
        # Data from before the buckets (or a bucket not complete yet): this range from ``messages``.
        rows = list(Message.objects(conversation_id=ObjectId(source.conversation_id), seq__gt=n * BUCKET_SEQS,
                                    seq__lte=(n + 1) * BUCKET_SEQS).as_pymongo())
        for r in rows:
            r["id"] = r["_id"]
    rows = [r for r in rows if int(r["seq"]) < source.below]
    for r in rows:
        edit = source.edits.get(str(r["id"]))
        if edit is not None and int(edit.get("edit_seq") or 0) > int(r.get("edit_seq") or 0):
            r["deleted"] = bool(r.get("deleted")) or bool(edit.get("deleted"))
            r["content"] = edit.get("content") or ""
    source.buffered = sorted(rows, key=lambda r: int(r["seq"]), reverse=True)


# "As new as can be": sorts before every inverted key (an inverted ISO time is never empty).
_NEWEST = ("", -(1 << 62))


def messages_search(*, user_id: str, query: Any, cursor: str | None, limit: int,
                    use_index: bool = True) -> tuple[list[SearchHit], str | None]:
    """The caller's messages whose content has every word of ``query`` (whole words, case-insensitive),
    newest first, at most ``limit``, with the words' offsets; and a cursor for the next page (None: no more).
    Only conversations the caller is a member of are read. A page may hold fewer than ``limit`` hits and a
    cursor when the request's read budget ran out first; every page moves on by at least one bucket. Raises
    ValidationFailed (``invalid_query``, ``query_too_long``, ``too_many_terms``, ``invalid_cursor``: unknown,
    expired, another user's or another query's). Side effect: the cursor's state in Redis
    (SEARCH_CURSOR_TTL_S).

    A k-way merge by time: the heap holds, per conversation, either its next message (exact key) or, when
    its next message is in a bucket not read yet, a placeholder keyed by an upper bound of that message's
    time; popping a placeholder reads the bucket (one of the budget's reads). On the default store, the
    drain's word index (storage/search_index.py) says which buckets can hold a hit; ``use_index=False`` reads
    every bucket instead (the reference walk, same results: bench/search.py compares them)."""
    terms = search_terms(query)
    limit = max(1, min(limit, SEARCH_PAGE_MAX))
    redis_client = sync_redis()
    mine = set(user_conversation_ids(user_id=user_id))
    state: dict[str, Any] | None = None
    saved: dict[str, Any] | None = None
    if cursor is not None:
        raw = redis_client.get(search_cursor_key(user_id, cursor)) if re.fullmatch(r"[A-Za-z0-9_-]{8,64}",
                                                                                    cursor) else None
        saved = json.loads(raw) if raw else None
        if saved is None or saved.get("q") != terms:
            raise ValidationFailed("cursor is unknown or expired; search again", code="invalid_cursor",
                                   details={"field": "cursor"})
        state = {c: v for c, v in (saved.get("s") or {}).items() if c in mine}
    if not store_is_ferretdb(MessageBucket._get_db()):
        found, after = _search_text_index(terms=terms, mine=sorted(mine), after=(saved or {}).get("k"), limit=limit)
        return found, None if after is None else _cursor_save(user_id, {"q": terms, "k": after})
    sources = {s.conversation_id: s for s in _sources(sorted(mine), state)}
    # The default store's index (storage/search_index.py) rules out buckets; without it (MongoDB's path is
    # api/search_text.py) every bucket is read.
    keys = [term_key(t) for t in terms] if use_index and store_is_ferretdb(MessageBucket._get_db()) else None
    if keys is not None:
        _forced_buckets(list(sources.values()), terms)
    budget = _Budget(SEARCH_BUCKET_READS)
    heap: list[tuple[tuple[str, int], str, dict[str, Any] | None]] = []

    def push_next(source: _Source) -> None:
        doc = source.take()
        if doc is not None:
            heapq.heappush(heap, (_neg(_ts_key(doc)), source.conversation_id, doc))
        elif source.next_bucket >= 0:
            bound = _NEWEST if source.bound is None else _neg(source.bound)
            heapq.heappush(heap, (bound, source.conversation_id, None))
        else:
            source.below = 0  # nothing left

    for source in sources.values():
        push_next(source)
    hits: list[SearchHit] = []
    while heap and len(hits) < limit:
        _key, cid, doc = heap[0]
        source = sources[cid]
        if doc is None:
            candidate = _seek(source, keys, budget)
            if candidate is None or (candidate and not budget.spend()):
                break
            heapq.heappop(heap)
            if candidate:
                _bucket_read(source)
            push_next(source)
            continue
        heapq.heappop(heap)
        source.below, source.bound = int(doc["seq"]), _ts_key(doc)
        if not doc.get("deleted"):
            spans = search_match(str(doc.get("content") or ""), terms)
            if spans is not None:
                ts = doc.get("timestamp")
                hits.append(SearchHit(conversation_id=cid, message_id=str(doc["id"]), seq=int(doc["seq"]),
                                      sender_id=str(doc["sender_id"]), content=str(doc["content"]),
                                      timestamp=iso_ms(ts) if isinstance(ts, datetime) else ts, highlights=spans))
        push_next(source)
    # Where each conversation stands: a message still in the heap is read again next time (its key is exact).
    for _key, cid, doc in heap:
        if doc is not None:
            sources[cid].below, sources[cid].bound = int(doc["seq"]) + 1, _ts_key(doc)
    waiting = {c for _k, c, d in heap if d is None}  # next is a bucket not read: what the index skipped holds
    remaining = {cid: [s.below, None if s.bound is None else list(s.bound),
                       s.next_bucket if cid in waiting else None] for cid, s in sources.items()
                 if s.below > 1 and any(c == cid for _k, c, _d in heap)}
    if not remaining:
        return hits, None
    return hits, _cursor_save(user_id, {"q": terms, "s": remaining})


def _cursor_save(user_id: str, state: dict[str, Any]) -> str:
    """Keep a search's state for its next page (SEARCH_CURSOR_TTL_S) under a new token, owned by the caller."""
    token = secrets.token_urlsafe(16)
    sync_redis().set(search_cursor_key(user_id, token), json.dumps(state), ex=SEARCH_CURSOR_TTL_S)
    return token


def _hit(cid: str, doc: dict[str, Any], spans: list[tuple[int, int]]) -> SearchHit:
    ts = doc.get("timestamp")
    return SearchHit(conversation_id=cid, message_id=str(doc["id"]), seq=int(doc["seq"]),
                     sender_id=str(doc["sender_id"]), content=str(doc["content"]),
                     timestamp=iso_ms(ts) if isinstance(ts, datetime) else ts, highlights=spans)


def _search_text_index(*, terms: list[str], mine: list[str], after: list[str] | None,
                       limit: int) -> tuple[list[SearchHit], list[str] | None]:
    """MongoDB: a page from the text index (api/search_text.py) merged with the recent windows (the tail the
    drain has not written yet; a window's copy wins over the stored one) and the edits not applied yet, newest
    first by ``(timestamp, id)``; and the last hit's key when more may follow."""
    sources = _sources(mine, None)
    window: dict[str, tuple[str, dict[str, Any]]] = {}
    edits: dict[str, dict[str, Any]] = {}
    for source in sources:
        edits.update(source.edits)
        window.update({str(d["id"]): (source.conversation_id, d) for d in source.window})
    top = None if after is None else (str(after[0]), str(after[1]))

    def current(row: dict[str, Any]) -> dict[str, Any]:
        doc = {**row, "id": str(row.get("id") or row["_id"])}
        edit = edits.get(doc["id"])
        if edit is not None and int(edit.get("edit_seq") or 0) > int(doc.get("edit_seq") or 0):
            doc["deleted"] = bool(doc.get("deleted")) or bool(edit.get("deleted"))
            doc["content"] = "" if doc["deleted"] else edit.get("content") or ""
        return doc

    found: dict[str, tuple[tuple[str, str], str, dict[str, Any], list[tuple[int, int]]]] = {}

    def keep(cid: str, row: dict[str, Any]) -> bool:
        doc = current(row)
        key = (_ts_key(doc)[0], doc["id"])
        spans = None if doc.get("deleted") else search_match(str(doc.get("content") or ""), terms)
        if spans is None or (top is not None and key >= top):
            return False
        found[doc["id"]] = (key, cid, doc, spans)
        return True

    for cid, doc in window.values():
        keep(cid, doc)
    boundary, _kept = search_text.text_search(
        conversation_ids=mine, terms=terms, limit=limit,
        after=None if top is None else (datetime.fromisoformat(top[0].replace("Z", "+00:00")), top[1]),
        accept=lambda row: str(row["_id"]) not in window and keep(str(row["conversation_id"]), row))
    ranked = sorted(found.values(), key=lambda f: f[0], reverse=True)
    if boundary is not None:  # stored rows below it are not scanned yet: no window hit below it either
        edge = (_ts_key({**boundary, "seq": 0})[0], str(boundary["_id"]))
        ranked = [f for f in ranked if f[0] >= edge]
        if len(ranked) <= limit:
            return [_hit(cid, doc, spans) for _key, cid, doc, spans in ranked], [edge[0], edge[1]]
    page = [_hit(cid, doc, spans) for _key, cid, doc, spans in ranked[:limit]]
    if len(ranked) <= limit:
        return page, None
    last = ranked[limit - 1][0]
    return page, [last[0], last[1]]


def _neg(key: tuple[str, int]) -> tuple[str, int]:
    """Max-heap order on heapq's min-heap: invert each character of the ISO time (all ASCII) and the seq."""
    return "".join(chr(255 - ord(ch)) for ch in key[0]), -key[1]
