"""Edit history over REST: every version of an edited message is readable by its conversation's members,
right after the edit's ack (from the message's meta hash on the bus) and after the drain (from MongoDB's
insert-only ``message_versions``), through the real write path, the real drain, Redis and FerretDB."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from bson import ObjectId
from mongoengine.connection import get_db

from chatstream_site.localservers import Servers
from core.keys import message_meta_key, partition_of, stream_key
from tests.support.api import Account, account, error_code, persist

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def group(admin: Account, *members: Account) -> str:
    return str(admin.client.post("/api/v1/chats/group", {"name": "History", "members": [m.username for m in members]},
                                 format="json").json()["conversation_id"])


def send(a: Account, cid: str, content: str) -> str:
    sent = a.client.post(f"/api/v1/conversations/{cid}/messages",
                         {"content": content, "client_msg_id": uuid.uuid4().hex}, format="json")
    assert sent.status_code == 201, sent.content
    return str(sent.json()["id"])


def edit(a: Account, message_id: str, content: str) -> dict[str, Any]:
    edited = a.client.patch(f"/api/v1/messages/{message_id}", {"content": content}, format="json")
    assert edited.status_code == 200, edited.content
    return dict(edited.json())


def versions(a: Account, message_id: str) -> list[tuple[int, str]]:
    answer = a.client.get(f"/api/v1/messages/{message_id}/versions")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body["message_id"] == message_id and body["has_more"] is False
    assert all(v["at"] and v["at"].endswith("Z") for v in body["results"])
    return [(v["seq"], v["content"]) for v in body["results"]]


def test_versions_are_readable_right_after_the_ack_and_after_the_drain(servers: Servers) -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    cid = group(alice, bob)
    # Edited before the drain ran: the original comes from the stream's undrained tail.
    mid = send(alice, cid, "first draft")
    one = edit(alice, mid, "second draft")
    two = edit(alice, mid, "final")
    expected = [(1, "first draft"), (one["seq"], "second draft"), (two["seq"], "final")]
    assert versions(alice, mid) == expected
    assert versions(bob, mid) == expected  # any member
    assert carol.client.get(f"/api/v1/messages/{mid}/versions").status_code == 404  # a stranger
    assert error_code(carol.client.get(f"/api/v1/messages/{'0' * 32}/versions")) == "not_found"
    assert alice.client.get("/api/v1/messages/not-a-message/versions").status_code == 404

    persist(servers, cid)
    db = get_db()
    stored = sorted((d["_id"], d["seq"], d["content"]) for d in db.message_versions.find({"message_id": mid}))
    assert stored == sorted((f"{mid}:{seq}", seq, text) for seq, text in expected)
    # MongoDB alone answers the same once the meta hash is gone (a day after the edit).
    bus = redis.Redis.from_url(servers.redis_url)
    try:
        bus.delete(message_meta_key(mid))
        assert versions(bob, mid) == expected

        # Redelivery of every entry of the conversation inserts duplicates only: nothing changes.
        key = stream_key(partition_of(cid))
        entries: Any = bus.xrange(key)
        for _eid, fields in entries:
            if fields[b"c"].decode() == cid:
                bus.xadd(key, fields)
        persist(servers, cid)
        again = sorted((d["_id"], d["seq"], d["content"]) for d in db.message_versions.find({"message_id": mid}))
        assert again == stored
    finally:
        bus.close()


def test_a_persisted_message_keeps_its_original_and_a_deleted_one_shows_none(servers: Servers) -> None:
    alice, bob = account("alice"), account("bob")
    cid = group(alice, bob)
    mid = send(alice, cid, "as sent")
    untouched = send(alice, cid, "never edited")
    persist(servers, cid)
    # The first edit of a persisted message takes the original from MongoDB.
    edited = edit(alice, mid, "as edited")
    assert versions(bob, mid) == [(1, "as sent"), (edited["seq"], "as edited")]
    assert versions(bob, untouched) == []
    persist(servers, cid)
    assert versions(bob, untouched) == []
    assert versions(bob, mid) == [(1, "as sent"), (edited["seq"], "as edited")]
    # A deleted message's versions are never served, before the drain and after.
    assert alice.client.delete(f"/api/v1/messages/{mid}").status_code == 200
    assert bob.client.get(f"/api/v1/messages/{mid}/versions").status_code == 404
    persist(servers, cid)
    assert get_db().message_versions.count_documents({"message_id": mid, "deleted": True}) == 1
    bus = redis.Redis.from_url(servers.redis_url)
    try:
        bus.delete(message_meta_key(mid))
    finally:
        bus.close()
    assert bob.client.get(f"/api/v1/messages/{mid}/versions").status_code == 404
    assert alice.client.get(f"/api/v1/messages/{untouched}/versions").status_code == 200


def test_deleting_a_group_removes_its_versions(servers: Servers) -> None:
    alice, bob = account("alice"), account("bob")
    created = alice.client.post("/api/v1/chats/group", {"name": "Short-lived", "members": [bob.username]},
                                format="json").json()
    mid = send(bob, created["conversation_id"], "v1")
    edit(bob, mid, "v2")
    persist(servers, created["conversation_id"])
    assert get_db().message_versions.count_documents({"conversation_id": ObjectId(created["conversation_id"])}) == 2
    assert alice.client.delete(f"/api/v1/chats/group/{created['group_id']}").status_code == 204
    assert get_db().message_versions.count_documents({"conversation_id": ObjectId(created["conversation_id"])}) == 0
    assert bob.client.get(f"/api/v1/messages/{mid}/versions").status_code == 404


def test_past_the_limit_the_newest_versions_are_answered_and_a_delete_still_hides_them(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    from api import selectors

    monkeypatch.setattr(selectors, "MESSAGE_VERSIONS_MAX", 2)
    alice, bob = account("alice"), account("bob")
    cid = group(alice, bob)
    mid = send(alice, cid, "v0")
    seqs = [edit(alice, mid, f"v{n}")["seq"] for n in (1, 2, 3)]
    persist(servers, cid)
    bus = redis.Redis.from_url(servers.redis_url)
    try:
        for from_meta in (True, False):
            if not from_meta:
                bus.delete(message_meta_key(mid))
            answer = bob.client.get(f"/api/v1/messages/{mid}/versions").json()
            assert [(v["seq"], v["content"]) for v in answer["results"]] == [(seqs[1], "v2"), (seqs[2], "v3")]
            assert answer["has_more"] is True
        assert alice.client.delete(f"/api/v1/messages/{mid}").status_code == 200
        persist(servers, cid)
        bus.delete(message_meta_key(mid))  # only MongoDB's marker says "deleted" now, past the limit's rows
        assert bob.client.get(f"/api/v1/messages/{mid}/versions").status_code == 404
    finally:
        bus.close()
