"""The store's side of search (docs/adr/0045): which words each stored message holds, so ``GET /search`` reads
only the buckets that can hold a hit.

* **MongoDB**: a text index on ``messages.content`` (``default_language: "none"``: no stemming, no stop
  words), created by :func:`text_index_ensure` (the drain's first batch, ``manage.py buckets_build``);
  ``api.finders`` queries it with ``$text``. Nothing else is written.
* **FerretDB v1 (the default store)**: no text index exists and every filter but ``_id`` equality scans, so the
  drain keeps ``search_blocks``: one document per conversation and ``BLOCK_BUCKETS`` buckets (1,000 seqs),
  ``_id`` ``"<conversation>:<block>"``, mapping each word (lower-cased, cut to ``TERM_KEY_CHARS``) to a bitmask
  of the block's buckets that hold it (``t.<word>``), written with ``$bit: {or}``: commutative and idempotent,
  so redeliveries, reorders and a ``buckets_build`` beside the drain need no read and no guard. Edits add the
  new content's words; nothing is ever removed (a deleted or edited-away word leaves a stale bit), so the
  index is a superset: a reader verifies every candidate bucket's messages with the one predicate
  (``api.finders.search_match``) and its results are those of a walk of every bucket.
* A block is trusted only when it is complete (``partial: false``): its shell is inserted by any event of its
  range; only the event with the range's first seq (or ``buckets_build``) clears ``partial``, as for
  ``message_buckets`` (storage/buckets.py), so data drained before this index existed is read bucket by bucket.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from core.documents import BUCKET_SEQS
from storage.rules import Item, Seen, rule_of
from storage.writes import DUPLICATE_KEY, UPDATE_STATEMENTS_MAX

# The tokenizer of search: runs of ``\w`` of the lower-cased text (api.finders.search_match uses this one).
WORD_RE = re.compile(r"\w+")
# Buckets per ``search_blocks`` document: 20 x 50 seqs = 1,000 seqs. A block of 1,000 chat messages has ~1-3k
# distinct words (~20-60 KB): one read by _id replaces 20 bucket reads for a word that is not there, and the
# drain's per-batch update rewrites one such document per conversation (measured: docs/benchmarks.md,
# "Search index").
BLOCK_BUCKETS = 20
# A word is indexed by its first 24 characters (queries are cut the same way, so a longer word still finds its
# blocks; the predicate checks the whole word): bounds a document's keys whatever the content.
TERM_KEY_CHARS = 24
COLLECTION = "search_blocks"


def term_key(term: str) -> str:
    """The index key of a (lower-cased) word. Pure."""
    return term[:TERM_KEY_CHARS]


def words_of(content: str) -> set[str]:
    """The distinct lower-cased words of ``content``. Pure."""
    return set(WORD_RE.findall(content.lower()))


def block_of(bucket_n: int) -> int:
    return bucket_n // BLOCK_BUCKETS


def block_id(conversation_id: str, block: int) -> str:
    return f"{conversation_id}:{block}"


@functools.cache
def store_is_ferretdb(db: Any) -> bool:
    """FerretDB names itself in ``buildInfo`` (it has no text index; MongoDB has). One command per process."""
    return "ferretdbVersion" in db.command("buildInfo")


@functools.cache
def text_index_ensure(db: Any) -> bool:
    """On MongoDB, create the text index of ``messages.content`` if missing (idempotent; ``createIndex`` of an
    existing identical index is a no-op). On FerretDB, nothing. Returns whether the store has it. Once per
    process."""
    if store_is_ferretdb(db):
        return False
    db.messages.create_index([("content", "text")], name="content_text", default_language="none")
    return True


def _masks(items: list[Item], seen: Seen) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]]]:
    """The block shells the batch's sequenced events need, and per block the bits to ``or`` in per key."""
    shells: dict[str, dict[str, Any]] = {}
    bits: dict[str, dict[str, int]] = {}
    for i in items:
        assert i.event is not None and i.conversation is not None
        cid, seq = i.event.conversation_id, i.event.seq
        block = block_of((seq - 1) // BUCKET_SEQS)
        bid = block_id(cid, block)
        first = seq == block * BLOCK_BUCKETS * BUCKET_SEQS + 1
        shells.setdefault(bid, {"_id": bid, "conversation_id": i.conversation, "t": {}, "partial": not first})
        if first:
            shells[bid]["partial"] = False
            bits.setdefault(bid, {})
        text = rule_of(i).search_text
        if text is None:
            continue
        at = seq if i.event.type == "message.new" else (seen.message(i.doc["id"]) or {}).get("seq")
        if not isinstance(at, int) or at < 1:
            continue  # an edit of a message not persisted yet: deferred, indexed when it is retried
        n = (at - 1) // BUCKET_SEQS
        target = bits.setdefault(block_id(cid, block_of(n)), {})
        for word in words_of(text(i)):
            key = term_key(word)
            target[key] = target.get(key, 0) | (1 << (n % BLOCK_BUCKETS))
        if at != seq:  # an edit's block (of its message) may differ from the edit's own
            shells.setdefault(block_id(cid, block_of(n)), {"_id": block_id(cid, block_of(n)),
                                                            "conversation_id": i.conversation, "t": {},
                                                            "partial": True})
    return shells, bits


def _bucket_masks(docs: list[dict[str, Any]], shells: dict[str, dict[str, Any]],
                  bits: dict[str, dict[str, int]]) -> set[str]:
    """Add to ``shells`` and ``bits`` the words of ``docs``, buckets written whole (their entries as they are:
    edits applied). Returns the blocks to mark ``partial`` again: those of a bucket written ``partial`` (its
    range's first messages may be missing from it, e.g. a tail lost with Redis's data, and so from the index)."""
    untrusted: set[str] = set()
    for doc in docs:
        n, cid = int(doc["n"]), str(doc["conversation_id"])
        bid = block_id(cid, block_of(n))
        shell = shells.setdefault(bid, {"_id": bid, "conversation_id": doc["conversation_id"], "t": {},
                                         "partial": True})
        target = bits.setdefault(bid, {})
        if doc.get("partial"):
            untrusted.add(bid)
        elif n % BLOCK_BUCKETS == 0:
            shell["partial"] = False  # the bucket holds the block's first seq's message
        for entry in (doc.get("m") or {}).values():
            content = entry.get("content") if isinstance(entry, dict) else None
            for word in words_of(content) if isinstance(content, str) else ():
                key = term_key(word)
                target[key] = target.get(key, 0) | (1 << (n % BLOCK_BUCKETS))
    for bid in untrusted:
        shells[bid]["partial"] = True
    return untrusted


def search_index_write(db: Any, items: list[Item], *, seen: Seen, whole: list[dict[str, Any]] | None = None,
                       in_tails: set[str] | None = None) -> None:
    """Record in ``search_blocks`` (FerretDB only; on MongoDB ensure the text index and write nothing) the words of
    the batch's edits and of its new messages set into stored buckets, and the words of ``whole``, the buckets
    written whole (``storage.buckets.BucketsWritten``). A new message whose bucket is still a tail (its entry id in
    ``in_tails``) is indexed with that bucket when it is written (docs/adr/0048): until then its message is in the
    recent window, which search reads first, and the window's floor stays below the tail's range, so no search
    consults the index for it. One unordered ``insert`` of block shells (a duplicate ``_id`` exists already) and
    one ``update`` by ``_id`` per touched block (``$bit or`` of its words' bucket bits, ``partial: false`` from
    the block's first event or first bucket, ``partial: true`` for a bucket written partial). Entries that failed
    or are dead are skipped. Raises RuntimeError on a write error (the batch is retried: a message in a bucket
    must be in its block) and the transient pymongo errors."""
    live = [i for i in items if i.event is not None and i.event.seq > 0 and i.failure is None and i.dead is None
            and not (i.event.type == "message.new" and i.entry_id in (in_tails or set()))]
    if (not live and not whole) or text_index_ensure(db):
        return
    shells, bits = _masks(live, seen)
    untrusted = _bucket_masks(whole or [], shells, bits)
    reply = db.command("insert", COLLECTION, documents=list(shells.values()), ordered=False)
    _raise([e for e in reply.get("writeErrors") or [] if int(e.get("code", 0)) != DUPLICATE_KEY])
    statements = []
    for bid, words in bits.items():
        update: dict[str, Any] = {}
        if words:
            update["$bit"] = {f"t.{k}": {"or": v} for k, v in words.items()}
        if bid in untrusted:
            update["$set"] = {"partial": True}
        elif bid in shells and not shells[bid]["partial"]:
            update["$set"] = {"partial": False}
        if update:
            statements.append({"q": {"_id": bid}, "u": update})
    for at in range(0, len(statements), UPDATE_STATEMENTS_MAX):
        reply = db.command("update", COLLECTION, ordered=False, updates=statements[at:at + UPDATE_STATEMENTS_MAX])
        _raise(reply.get("writeErrors") or [])


def _raise(errors: list[dict[str, Any]]) -> None:
    if errors:
        raise RuntimeError(f"{COLLECTION} write error {errors[0].get('code')}: {errors[0].get('errmsg', '')}"[:500])


def search_index_build(db: Any, *, batch: int = 1000) -> int:
    """Build ``search_blocks`` from ``messages`` (existing data: ``manage.py buckets_build``); on MongoDB
    ensure the text index instead. Safe beside the drain and when run again (``$bit or`` only). Marks every
    block it wrote complete. Returns how many messages it indexed. One scan of ``messages``."""
    if text_index_ensure(db):
        return 0
    pending: dict[str, dict[str, Any]] = {}
    shells: dict[str, dict[str, Any]] = {}
    written = 0

    def flush() -> None:
        if shells:
            db.command("insert", COLLECTION, documents=list(shells.values()), ordered=False)
        statements = [{"q": {"_id": bid}, "u": {"$set": {"partial": False},
                                                **({"$bit": bits} if bits else {})}}
                      for bid, bits in pending.items()]
        for at in range(0, len(statements), UPDATE_STATEMENTS_MAX):
            db.command("update", COLLECTION, ordered=False, updates=statements[at:at + UPDATE_STATEMENTS_MAX])
        shells.clear()
        pending.clear()

    for row in db.messages.find({}, {"conversation_id": 1, "seq": 1, "content": 1}, batch_size=batch):
        n = (int(row["seq"]) - 1) // BUCKET_SEQS
        bid = block_id(str(row["conversation_id"]), block_of(n))
        shells.setdefault(bid, {"_id": bid, "conversation_id": row["conversation_id"], "t": {}, "partial": True})
        target = pending.setdefault(bid, {})
        for word in words_of(str(row.get("content") or "")):
            path = f"t.{term_key(word)}"
            target[path] = {"or": int(target.get(path, {}).get("or", 0)) | (1 << (n % BLOCK_BUCKETS))}
        written += 1
        if len(pending) >= batch:
            flush()
    flush()
    return written
