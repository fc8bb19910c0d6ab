"""Conversations and messages over REST: send (the shared write path), history paging at the edges,
edit/delete by the sender only, read cursor and unread counts."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from bson import ObjectId

from chatstream_site.localservers import Servers
from core.documents import Conversation
from core.entries import event_decode
from core.keys import partition_of, stream_key
from tests.support.api import Account, account, bulk_messages, error_code, persist

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def single(a: Account, b: Account) -> str:
    return str(a.client.post("/api/v1/chats/single", {"username": b.username}, format="json")
               .json()["conversation_id"])


def send(a: Account, cid: str, content: str, client_msg_id: str | None = None):
    return a.client.post(f"/api/v1/conversations/{cid}/messages",
                         {"content": content, "client_msg_id": client_msg_id or uuid.uuid4().hex}, format="json")


def test_send_goes_to_the_stream_and_is_deduplicated(servers: Servers) -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    first = send(alice, cid, "hello", "m-1")
    assert first.status_code == 201, first.content
    body = first.json()
    assert body["seq"] == 1 and len(body["id"]) == 32 and body["sender_id"] == alice.id
    assert body["duplicate"] is False
    retry = send(alice, cid, "hello", "m-1")
    assert retry.status_code == 201 and retry.json()["id"] == body["id"] and retry.json()["duplicate"] is True
    entries = redis.Redis.from_url(servers.redis_url).xrange(stream_key(partition_of(cid)))
    events = [event_decode(i, f) for i, f in entries]
    mine = [e for e in events if e.conversation_id == cid]
    assert [(e.type, e.seq, e.data["id"]) for e in mine] == [("message.new", 1, body["id"])]


def test_send_refuses_bad_input() -> None:
    alice, bob, eve = account("alice"), account("bob"), account("eve")
    cid = single(alice, bob)
    too_long = send(alice, cid, "x" * 4001)
    assert too_long.status_code == 413 and error_code(too_long) == "too_large"
    cases = [
        {"content": 5, "client_msg_id": "a"},
        {"content": "hi", "client_msg_id": {"$ne": None}},
        {"content": "hi"},
        {"content": "   ", "client_msg_id": "a"},
        {"content": "hi", "client_msg_id": "bad id with spaces"},
    ]
    for body in cases:
        response = alice.client.post(f"/api/v1/conversations/{cid}/messages", body, format="json")
        assert response.status_code == 400, (body, response.content)
    malformed = alice.client.post(f"/api/v1/conversations/{cid}/messages", data="{not json",
                                  content_type="application/json")
    assert malformed.status_code == 400 and error_code(malformed) == "malformed"
    form = alice.client.post(f"/api/v1/conversations/{cid}/messages", data="content=hi",
                             content_type="application/x-www-form-urlencoded")
    assert form.status_code == 415 and error_code(form) == "unsupported_media_type"
    assert send(eve, cid, "let me in").status_code == 404
    assert send(alice, str(ObjectId()), "anyone?").status_code == 404
    assert send(alice, "not-an-id", "anyone?").status_code == 404


def test_history_pages_in_both_directions_and_at_the_edges() -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    url = f"/api/v1/conversations/{cid}/messages"
    empty = alice.client.get(url).json()
    assert empty == {"results": [], "has_more": False}

    bulk_messages(conversation_id=cid, sender_id=bob.id, count=120)
    newest = alice.client.get(url, {"limit": 50}).json()
    assert [m["seq"] for m in newest["results"]] == list(range(71, 121)) and newest["has_more"] is True
    back = alice.client.get(url, {"limit": 50, "before_seq": 71}).json()
    assert [m["seq"] for m in back["results"]] == list(range(21, 71)) and back["has_more"] is True
    last = alice.client.get(url, {"limit": 50, "before_seq": 21}).json()
    assert [m["seq"] for m in last["results"]] == list(range(1, 21)) and last["has_more"] is False
    # Beyond the newest: the newest page. Before the first message: an empty page, not an error.
    beyond = alice.client.get(url, {"limit": 50, "before_seq": 10**6}).json()
    assert [m["seq"] for m in beyond["results"]] == list(range(71, 121))
    assert alice.client.get(url, {"before_seq": 1}).json() == {"results": [], "has_more": False}

    forward = alice.client.get(url, {"limit": 50, "after_seq": 0}).json()
    assert [m["seq"] for m in forward["results"]] == list(range(1, 51)) and forward["has_more"] is True
    exact = alice.client.get(url, {"limit": 20, "after_seq": 100}).json()  # exactly one page left
    assert [m["seq"] for m in exact["results"]] == list(range(101, 121)) and exact["has_more"] is False
    assert alice.client.get(url, {"after_seq": 120}).json() == {"results": [], "has_more": False}
    between = alice.client.get(url, {"after_seq": 10, "before_seq": 14}).json()
    assert [m["seq"] for m in between["results"]] == [11, 12, 13]
    page = alice.client.get(url, {"limit": 120}).json()
    assert len(page["results"]) == 120 and page["has_more"] is False  # exactly one page: nothing more

    for bad in ({"limit": 0}, {"limit": 201}, {"before_seq": "x"}, {"after_seq": -1}, {"before_seq": 0}):
        response = alice.client.get(url, bad)
        assert response.status_code == 400, (bad, response.content)


def test_edit_and_delete_by_the_sender_only(servers: Servers) -> None:
    alice, bob, eve = account("alice"), account("bob"), account("eve")
    cid = single(alice, bob)
    mid = send(alice, cid, "tpyo").json()["id"]
    assert bob.client.patch(f"/api/v1/messages/{mid}", {"content": "hacked"}, format="json").status_code == 403
    assert eve.client.patch(f"/api/v1/messages/{mid}", {"content": "hacked"}, format="json").status_code == 404
    assert bob.client.delete(f"/api/v1/messages/{mid}").status_code == 403
    too_long = alice.client.patch(f"/api/v1/messages/{mid}", {"content": "y" * 4001}, format="json")
    assert too_long.status_code == 413
    edited = alice.client.patch(f"/api/v1/messages/{mid}", {"content": "typo"}, format="json")
    assert edited.status_code == 200 and edited.json()["seq"] == 2 and edited.json()["content"] == "typo"
    persist(servers, cid)
    history = alice.client.get(f"/api/v1/conversations/{cid}/messages").json()["results"]
    assert history[0]["content"] == "typo" and history[0]["edited_at"] is not None

    deleted = alice.client.delete(f"/api/v1/messages/{mid}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True and deleted.json()["seq"] == 3
    assert alice.client.patch(f"/api/v1/messages/{mid}", {"content": "again"}, format="json").status_code == 404
    persist(servers, cid)
    tomb = alice.client.get(f"/api/v1/conversations/{cid}/messages").json()["results"]
    assert [(m["seq"], m["deleted"], m["content"]) for m in tomb] == [(1, True, "")]
    assert alice.client.delete(f"/api/v1/messages/{uuid.uuid4().hex}").status_code == 404
    assert alice.client.delete("/api/v1/messages/not-a-message").status_code == 404


def test_read_cursor_and_unread_count(servers: Servers) -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    for i in range(3):
        assert send(bob, cid, f"m{i}").status_code == 201
    send(alice, cid, "mine does not count")
    persist(servers, cid)

    def mine(who: Account) -> dict:
        return next(c for c in who.client.get("/api/v1/conversations").json()["results"] if c["id"] == cid)

    before = mine(alice)
    assert before["last_seq"] == 4 and before["unread"] == 3 and before["read_seq"] == 0
    assert before["last_message"]["content"] == "mine does not count"
    assert before["peer"]["id"] == bob.id and before["title"] == bob.username
    read = alice.client.post(f"/api/v1/conversations/{cid}/read", {"seq": 2}, format="json")
    assert read.status_code == 200 and read.json() == {"conversation_id": cid, "seq": 2}
    assert mine(alice)["unread"] == 1
    back = alice.client.post(f"/api/v1/conversations/{cid}/read", {"seq": 1}, format="json")
    assert back.json()["seq"] == 2  # forward only
    assert alice.client.post(f"/api/v1/conversations/{cid}/read", {"seq": 99}, format="json").json()["seq"] == 4
    assert mine(alice)["unread"] == 0
    assert mine(bob)["unread"] == 1  # Alice's message; his own three never count
    for bad in ({"seq": "3"}, {"seq": -1}, {"seq": True}, {"seq": {"$gt": 0}}, {}):
        assert alice.client.post(f"/api/v1/conversations/{cid}/read", bad, format="json").status_code == 400
    outsider = account("eve")
    assert outsider.client.post(f"/api/v1/conversations/{cid}/read", {"seq": 1}, format="json").status_code == 404


def test_persist_writes_what_the_storage_workers_write(servers: Servers) -> None:
    """``persist`` is the real drain: in a 1:1 chat the reader's cursor marks the other's messages read
    (the drain's rule; a stand-in that only upserted messages and set cursors left them "sent")."""
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    for i in range(3):
        assert send(alice, cid, f"m{i}").status_code == 201
    assert bob.client.post(f"/api/v1/conversations/{cid}/read", {"seq": 2}, format="json").status_code == 200
    persist(servers, cid)
    history = alice.client.get(f"/api/v1/conversations/{cid}/messages").json()["results"]
    assert [(m["seq"], m["read_status"]) for m in history] == [(1, "read"), (2, "read"), (3, "sent")]


def test_conversations_newest_first() -> None:
    alice = account("alice")
    peers = [account(f"p{i}") for i in range(3)]
    cids = [single(alice, p) for p in peers]
    # Activity order: the storage pipeline moves updated_at; here it is set directly.
    from datetime import UTC, datetime, timedelta

    base = datetime(2026, 5, 1, tzinfo=UTC)
    for offset, cid in zip((2, 0, 1), cids, strict=True):
        Conversation.objects(id=cid).update_one(set__updated_at=base + timedelta(minutes=offset))
    listed = alice.client.get("/api/v1/conversations").json()["results"]
    assert [c["id"] for c in listed] == [cids[0], cids[2], cids[1]]
    assert [c["id"] for c in alice.client.get("/api/v1/conversations", {"limit": 1, "offset": 1})
            .json()["results"]] == [cids[2]]
    group = alice.client.post("/api/v1/chats/group", {"name": "G", "members": [peers[0].username]},
                              format="json").json()
    one = alice.client.get(f"/api/v1/conversations/{group['conversation_id']}").json()
    assert one["type"] == "group" and one["group_id"] == group["group_id"] and one["title"] == "G"
    assert one["last_message"] is None and one["unread"] == 0


def test_members_with_presence_and_read_cursors(servers: Servers) -> None:
    """What a reloaded client needs before any live frame: who is in, who is online, who read up to where."""
    import asyncio

    import redis.asyncio

    from messaging.presence import presence_connect

    alice, bob, carol = account("alice"), account("bob"), account("carol")
    created = alice.client.post("/api/v1/chats/group", {"name": "trio", "members": [bob.username, carol.username]},
                                format="json")
    assert created.status_code == 201, created.content
    cid = str(created.json()["conversation_id"])
    for i in range(3):
        assert send(alice, cid, f"m{i}").status_code == 201
    assert bob.client.post(f"/api/v1/conversations/{cid}/read", {"seq": 2}, format="json").status_code == 200

    async def connect_bob() -> None:  # the broker's own presence write, as a WebSocket connect makes it
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            await presence_connect(client, user_id=bob.id, session_id="s-members-test", conversation_ids=[cid])
        finally:
            await client.aclose()

    asyncio.run(connect_bob())
    got = carol.client.get(f"/api/v1/conversations/{cid}/members")
    assert got.status_code == 200, got.content
    by_id = {m["id"]: m for m in got.json()["results"]}
    assert set(by_id) == {alice.id, bob.id, carol.id}
    assert by_id[bob.id]["username"] == bob.username and by_id[bob.id]["online"] is True
    assert by_id[bob.id]["read_seq"] == 2 and by_id[carol.id]["read_seq"] == 0
    assert by_id[alice.id]["online"] is False and by_id[carol.id]["online"] is False

    outsider = account("dave")
    assert error_code(outsider.client.get(f"/api/v1/conversations/{cid}/members")) == "not_found"
    assert error_code(alice.client.get("/api/v1/conversations/not-an-id/members")) == "not_found"


@pytest.mark.parametrize(("content", "reason", "index"), [("x\ud800y", "surrogate", 1), ("a\x00b", "nul", 1)])
def test_content_no_store_can_hold_gets_the_websockets_error(content: str, reason: str, index: int) -> None:
    """The same rule and the same error as message.send/message.edit on the WebSocket (docs/protocol.md)."""
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    sent = send(alice, cid, "fine")
    assert sent.status_code == 201
    # json.dumps writes the surrogate as the escape "\ud800", as a client's JSON encoder would.
    for method, path, body in (
        ("post", f"/api/v1/conversations/{cid}/messages", {"content": content, "client_msg_id": "bad-1"}),
        ("patch", f"/api/v1/messages/{sent.json()['id']}", {"content": content}),
    ):
        response = getattr(alice.client, method)(path, data=json.dumps(body), content_type="application/json")
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "invalid"
        assert response.json()["error"]["details"] == {"field": "content", "reason": reason, "index": index}


def test_a_body_nested_too_deep_is_a_400_not_a_500() -> None:
    alice, bob = account("alice"), account("bob")
    cid = single(alice, bob)
    for body in ("[" * 20_000 + "]" * 20_000,
                 '{"content": ' + "[" * 20_000 + "]" * 20_000 + ', "client_msg_id": "deep"}'):
        response = alice.client.post(f"/api/v1/conversations/{cid}/messages", data=body,
                                     content_type="application/json")
        assert response.status_code == 400 and error_code(response) == "malformed", response.content
