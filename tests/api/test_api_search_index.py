"""Search on the default store through the drain's word index (``search_blocks``, storage/search_index.py,
docs/adr/0045), against the session's Redis and FerretDB and the real drain: the same hits as a walk of every
bucket (edits drained and pending, deletes, strangers' conversations), with fewer bucket reads; the index is
written by the drain and by ``manage.py buckets_build``; and the MongoDB text-search query, as a unit."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from bson import ObjectId
from django.core.management import call_command
from mongoengine.connection import get_db

from api import finders, search_text
from core.keys import partition_of, recent_docs_key, recent_key
from storage.search_index import COLLECTION, block_id, term_key
from tests.api.test_api_mentions_search import group, send
from tests.support.api import account, persist

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def search_all(client: Any, q: str, limit: int = 5) -> list[str]:
    got, cursor = [], None
    for _ in range(200):
        page = client.get("/api/v1/search", {"q": q, "limit": limit, **({"cursor": cursor} if cursor else {})}).json()
        got += [h["message_id"] for h in page["results"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return got
    raise AssertionError("search never ended")


def test_index_gives_the_walks_hits_with_fewer_bucket_reads(servers: Any, monkeypatch: Any) -> None:
    alice, bob, eve = account("alice"), account("bob"), account("eve")
    cid, other, strangers = group(alice, bob), group(bob, alice), group(eve, alice)
    sent = [send(alice, cid, f"filler {i} w{i % 7}" + (" Narwhal!" if i in (5, 120, 200, 250) else ""))
            for i in range(260)]
    side = send(bob, other, "a narwhal elsewhere")
    send(eve, strangers, "narwhal of strangers")
    edit = {30: "now a narwhal", 120: "no longer"}
    for i, text in edit.items():
        assert alice.client.patch(f"/api/v1/messages/{sent[i]['id']}", {"content": text}, format="json").status_code \
            == 200
    assert alice.client.delete(f"/api/v1/messages/{sent[200]['id']}").status_code == 200
    r = redis.Redis.from_url(servers.redis_url)
    for c in (cid, other, strangers):
        persist(servers, c)
        r.delete(recent_key(partition_of(c), c), recent_docs_key(partition_of(c), c))  # the store serves them
    # An edit the drain has not applied: kept in the window's edits hash, not in the index yet.
    assert alice.client.patch(f"/api/v1/messages/{sent[60]['id']}", {"content": "late narwhal"},
                              format="json").status_code == 200

    block = get_db()[COLLECTION].find_one({"_id": block_id(cid, 0)})
    assert block is not None and block["partial"] is False
    assert int(block["t"][term_key("narwhal")]) & 1 << 0  # bucket 0 holds message 5
    assert term_key("filler") in block["t"] and len(block["t"]) < 300

    reads: list[int] = []
    real_read = finders._bucket_read

    def counted(source: Any) -> None:
        reads.append(source.next_bucket)
        real_read(source)

    monkeypatch.setattr(finders, "_bucket_read", counted)
    indexed = search_all(bob.client, "NARWHAL")
    with_index = len(reads)
    monkeypatch.setattr(finders, "_block_mask", lambda *_a: None)  # every block "partial": the full walk
    reads.clear()
    walked = search_all(bob.client, "NARWHAL")
    expected = [sent[60]["id"], sent[30]["id"], sent[250]["id"], side["id"], sent[5]["id"]]
    assert sorted(indexed) == sorted(walked) == sorted(expected)
    assert indexed == walked  # same order, newest first
    assert with_index < len(reads) and len(reads) >= 6


def test_buckets_build_indexes_existing_messages(servers: Any) -> None:
    alice, bob = account("alice"), account("bob")
    cid = group(alice, bob)
    sent = [send(alice, cid, f"pelican {i}") for i in range(3)]
    persist(servers, cid)
    db = get_db()
    # As if drained before the index existed: no block; the walk still finds everything, then the build
    # completes the index.
    db[COLLECTION].delete_many({"conversation_id": ObjectId(cid)})
    r = redis.Redis.from_url(servers.redis_url)
    r.delete(recent_key(partition_of(cid), cid), recent_docs_key(partition_of(cid), cid))
    assert sorted(search_all(bob.client, "pelican")) == sorted(m["id"] for m in sent)
    call_command("buckets_build")
    block = db[COLLECTION].find_one({"_id": block_id(cid, 0)})
    assert block is not None and block["partial"] is False and int(block["t"]["pelican"]) == 1
    assert sorted(search_all(bob.client, "pelican")) == sorted(m["id"] for m in sent)


def test_mongodb_text_query_is_built_from_the_callers_conversations_and_the_cursor() -> None:
    mine = [str(ObjectId()), str(ObjectId())]
    query = search_text.text_query(conversation_ids=mine, terms=["quokka", "smiles"], after=None)
    assert query == {"$text": {"$search": '"quokka" "smiles"'},
                     "conversation_id": {"$in": [ObjectId(c) for c in mine]}, "deleted": {"$ne": True}}
    from datetime import UTC, datetime
    at = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    paged = search_text.text_query(conversation_ids=mine, terms=["x"], after=(at, "m1"))
    assert paged["$or"] == [{"timestamp": {"$lt": at}}, {"timestamp": at, "_id": {"$lt": "m1"}}]
    assert search_text.TEXT_SORT == [("timestamp", -1), ("_id", -1)]
    # Terms are the tokenizer's words: nothing of the caller's text reaches the query but \w runs.
    assert finders.search_terms('{"$gt": ""} "a') == ["gt", "a"]
