"""Search on MongoDB through its text index (docs/adr/0045): the query of one page, and its run. The default
store (FerretDB v1, no text index) is served by ``api.finders`` from the drain's word index instead; the choice
is made per process from ``buildInfo`` (``storage.search_index.store_is_ferretdb``).

The plan (``explain`` on MongoDB 7, documented in docs/storage.md, "Search"): ``TEXT_MATCH`` over the
``content_text`` index (each quoted word an index scan, ANDed), ``FETCH`` filtering ``conversation_id $in`` and
``deleted``, then a ``SORT`` by time of the matching documents only: the cost follows the number of messages
holding every word, not the store. The unpersisted tail (each conversation's recent window above what the
drain wrote) and edits the drain has not applied are merged in by ``api.finders``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from bson import ObjectId

from core.documents import Message

# Newest first; ``_id`` breaks ties of one millisecond so the cursor ``(timestamp, _id)`` is exact.
TEXT_SORT = [("timestamp", -1), ("_id", -1)]
# Candidates fetched per round: the text index's tokenizer differs from ``\w`` on some punctuation
# (``quokka-smiles``), so a few candidates fail the predicate; 4x the page keeps it to one round in practice.
TEXT_FETCH_FACTOR = 4
TEXT_ROUNDS_MAX = 5


def text_query(*, conversation_ids: list[str], terms: list[str],
               after: tuple[datetime, str] | None) -> dict[str, Any]:
    """The ``find`` filter of one page: every term as a quoted phrase (``$text`` ANDs phrases; a phrase of one
    word is that word, unstemmed under ``default_language: none``), only the caller's conversations, not
    deleted, older than ``after`` (the previous page's last ``(timestamp, _id)``). Pure: ``terms`` are ``\\w``
    runs (api.finders.search_terms), so no operator or quote of the caller's text reaches the query."""
    query: dict[str, Any] = {"$text": {"$search": " ".join(f'"{t}"' for t in terms)},
                             "conversation_id": {"$in": [ObjectId(c) for c in conversation_ids]},
                             "deleted": {"$ne": True}}
    if after is not None:
        at, mid = after
        query["$or"] = [{"timestamp": {"$lt": at}}, {"timestamp": at, "_id": {"$lt": mid}}]
    return query


def text_search(*, conversation_ids: list[str], terms: list[str], after: tuple[datetime, str] | None, limit: int,
                accept: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any] | None, int]:
    """Scan ``messages`` through the text index (MongoDB only), newest first below ``after``, handing each row
    to ``accept`` until it has kept ``limit`` + 1 or nothing is left. Returns the last row scanned when rows
    may be left unscanned below it (None: all were scanned), and how many were kept."""
    kept = 0
    collection = Message._get_collection()
    for _ in range(TEXT_ROUNDS_MAX):
        want = (limit + 1 - kept) * TEXT_FETCH_FACTOR
        rows = list(collection.find(text_query(conversation_ids=conversation_ids, terms=terms, after=after))
                    .sort(TEXT_SORT).limit(want))
        for row in rows:
            kept += bool(accept(row))
            if kept > limit:
                return row, kept
        if len(rows) < want:
            return None, kept
        after = (rows[-1]["timestamp"], str(rows[-1]["_id"]))
    return rows[-1], kept
