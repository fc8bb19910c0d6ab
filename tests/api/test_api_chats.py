"""Profile, contacts, single chats and groups over REST, with their authorization negatives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio
from bson import ObjectId

from chatstream_site.localservers import Servers
from core.documents import Conversation, GroupChat
from messaging import membership
from tests.support import api as api_support
from tests.support.api import account, error_code

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def test_profile_status_and_lookup() -> None:
    alice, bob = account("alice"), account("bob")
    me = alice.client.get("/api/v1/users/me").json()
    assert me["id"] == alice.id and me["email"] == f"{alice.username}@example.com" and me["status"] == "offline"
    changed = alice.client.patch("/api/v1/users/me", {"status": "busy"}, format="json")
    assert changed.status_code == 200 and changed.json()["status"] == "busy"
    bad = alice.client.patch("/api/v1/users/me", {"status": "sleeping"}, format="json")
    assert bad.status_code == 400 and error_code(bad) == "invalid"

    found = alice.client.get("/api/v1/users", {"username": bob.username.upper()}).json()["results"]
    assert [u["id"] for u in found] == [bob.id] and "email" not in found[0]
    # A regex in the query is only text: it finds nothing instead of everything.
    assert alice.client.get("/api/v1/users", {"username": ".*"}).json()["results"] == []
    assert alice.client.get("/api/v1/users").status_code == 400


def test_contacts_add_list_remove() -> None:
    alice, bob = account("alice"), account("bob")
    added = alice.client.post("/api/v1/users/me/contacts", {"username": bob.username}, format="json")
    assert added.status_code == 201 and added.json()["id"] == bob.id
    again = alice.client.post("/api/v1/users/me/contacts", {"username": bob.username}, format="json")
    assert again.status_code == 409
    myself = alice.client.post("/api/v1/users/me/contacts", {"username": alice.username}, format="json")
    assert myself.status_code == 400
    nobody = alice.client.post("/api/v1/users/me/contacts", {"username": "nobody-here-1"}, format="json")
    assert nobody.status_code == 404
    listed = alice.client.get("/api/v1/users/me/contacts").json()["results"]
    assert [c["username"] for c in listed] == [bob.username]
    assert alice.client.delete(f"/api/v1/users/me/contacts/{bob.id}").status_code == 204
    assert alice.client.delete(f"/api/v1/users/me/contacts/{bob.id}").status_code == 404
    assert alice.client.delete("/api/v1/users/me/contacts/not-an-id").status_code == 404
    assert alice.client.get("/api/v1/users/me/contacts").json()["results"] == []


def test_single_chat_is_one_per_pair() -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    first = alice.client.post("/api/v1/chats/single", {"username": bob.username}, format="json")
    assert first.status_code == 201 and first.json()["created"] is True
    second = bob.client.post("/api/v1/chats/single", {"username": alice.username}, format="json")
    assert second.status_code == 200 and second.json()["created"] is False
    assert first.json()["conversation_id"] == second.json()["conversation_id"]
    assert sorted(first.json()["members"]) == sorted([alice.id, bob.id])
    other = alice.client.post("/api/v1/chats/single", {"username": carol.username}, format="json")
    assert other.json()["conversation_id"] != first.json()["conversation_id"]
    assert alice.client.post("/api/v1/chats/single", {"username": alice.username}, format="json").status_code == 400
    assert alice.client.post("/api/v1/chats/single", {"username": "ghost-user-x"}, format="json").status_code == 404
    # Carol is no member: the conversation does not exist for her.
    cid = first.json()["conversation_id"]
    assert carol.client.get(f"/api/v1/conversations/{cid}").status_code == 404
    assert carol.client.get(f"/api/v1/conversations/{cid}/messages").status_code == 404


def test_group_lifecycle_and_admin_rules(servers: Servers) -> None:
    alice, bob, carol, dave = (account(n) for n in ("alice", "bob", "carol", "dave"))
    created = alice.client.post("/api/v1/chats/group", {"name": "Team", "members": [bob.username]}, format="json")
    assert created.status_code == 201, created.content
    group = created.json()
    gid, cid = group["group_id"], group["conversation_id"]
    assert group["admins"] == [alice.id] and sorted(group["members"]) == sorted([alice.id, bob.id])

    # Non-admin member: 403; non-member: 404.
    denied = bob.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username}, format="json")
    assert denied.status_code == 403 and error_code(denied) == "forbidden"
    assert bob.client.patch(f"/api/v1/chats/group/{gid}", {"name": "Mine"}, format="json").status_code == 403
    assert carol.client.get(f"/api/v1/chats/group/{gid}").status_code == 404
    assert carol.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username},
                             format="json").status_code == 404

    # Membership is cached for the write path: adding Carol must let her send at once.
    async def members() -> set[str] | None:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            return await membership.conversation_members(client, conversation_id=cid)
        finally:
            await client.aclose()

    assert asyncio.run(members()) == {alice.id, bob.id}
    added = alice.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username}, format="json")
    assert added.status_code == 201
    assert asyncio.run(members()) == {alice.id, bob.id, carol.id}
    sent = carol.client.post(f"/api/v1/conversations/{cid}/messages", {"content": "hi all", "client_msg_id": "c1"},
                             format="json")
    assert sent.status_code == 201
    dup = alice.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username}, format="json")
    assert dup.status_code == 409

    renamed = alice.client.patch(f"/api/v1/chats/group/{gid}", {"name": "Team 2"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["name"] == "Team 2"
    assert alice.client.patch(f"/api/v1/chats/group/{gid}", {"name": ""}, format="json").status_code == 400

    not_member = alice.client.post(f"/api/v1/chats/group/{gid}/admins", {"username": dave.username}, format="json")
    assert not_member.status_code == 400
    promoted = alice.client.post(f"/api/v1/chats/group/{gid}/admins", {"username": bob.username}, format="json")
    assert promoted.status_code == 201
    assert alice.client.post(f"/api/v1/chats/group/{gid}/admins", {"username": bob.username},
                             format="json").status_code == 409
    # Bob is an admin now and removes Carol, who then cannot send any more.
    assert bob.client.delete(f"/api/v1/chats/group/{gid}/members/{carol.id}").status_code == 204
    assert asyncio.run(members()) == {alice.id, bob.id}
    gone = carol.client.post(f"/api/v1/conversations/{cid}/messages", {"content": "still here?",
                                                                       "client_msg_id": "c2"}, format="json")
    assert gone.status_code == 404
    assert bob.client.delete(f"/api/v1/chats/group/{gid}/members/{carol.id}").status_code == 404

    # Alice leaves; Bob stays the admin. Bob leaves last: the group is empty, nobody can see it.
    assert alice.client.post(f"/api/v1/chats/group/{gid}/leave").status_code == 204
    assert alice.client.get(f"/api/v1/conversations/{cid}").status_code == 404
    stored = GroupChat.objects(id=gid).get()
    assert stored.admins == [ObjectId(bob.id)] and stored.members == [ObjectId(bob.id)]
    assert Conversation.objects(id=cid).get().members == [ObjectId(bob.id)]


def test_last_admin_leaving_hands_over() -> None:
    alice, bob = account("alice"), account("bob")
    group = alice.client.post("/api/v1/chats/group", {"name": "Pair", "members": [bob.username]},
                              format="json").json()
    assert alice.client.delete(f"/api/v1/chats/group/{group['group_id']}/members/{alice.id}").status_code == 204
    assert GroupChat.objects(id=group["group_id"]).get().admins == [ObjectId(bob.id)]


def test_group_create_validation() -> None:
    alice = account("alice")
    unknown = alice.client.post("/api/v1/chats/group", {"name": "X", "members": ["ghost-1", "ghost-2"]},
                                format="json")
    assert unknown.status_code == 404 and unknown.json()["error"]["details"]["usernames"] == ["ghost-1", "ghost-2"]
    bodies: list[dict[str, Any]] = [{"name": "X", "members": "not-a-list"}, {"name": ["X"]}, {"members": []},
                                    {"name": "X", "members": [{"$ne": None}]}]
    for body in bodies:
        response = alice.client.post("/api/v1/chats/group", body, format="json")
        assert response.status_code == 400, (body, response.content)
    alone = alice.client.post("/api/v1/chats/group", {"name": "Just me"}, format="json")
    assert alone.status_code == 201 and alone.json()["members"] == [alice.id]


def test_demoting_an_admin_never_leaves_the_group_without_one(servers: Servers) -> None:
    alice, bob, carol, dave = (account(n) for n in ("alice", "bob", "carol", "dave"))
    group = alice.client.post("/api/v1/chats/group", {"name": "Ops", "members": [bob.username, carol.username]},
                              format="json").json()
    gid, cid = group["group_id"], group["conversation_id"]
    url = f"/api/v1/chats/group/{gid}/admins"
    # The last admin cannot step down: a documented 409.
    last = alice.client.delete(f"{url}/{alice.id}")
    assert last.status_code == 409 and error_code(last) == "last_admin", last.content
    assert alice.client.post(url, {"username": bob.username}, format="json").status_code == 201
    # Non-admins 403, strangers 404, a member who is no admin 404, a malformed id 404.
    assert error_code(carol.client.delete(f"{url}/{bob.id}")) == "forbidden"
    assert dave.client.delete(f"{url}/{bob.id}").status_code == 404
    assert alice.client.delete(f"{url}/{carol.id}").status_code == 404
    assert alice.client.delete(f"{url}/not-an-id").status_code == 404

    # The demotion drops the cached membership (its generation moves), like every group change.
    sync = redis.Redis.from_url(servers.redis_url)
    try:
        before = int(sync.get(membership.membership_generation_key(cid)) or 0)
        assert bob.client.delete(f"{url}/{alice.id}").status_code == 204
        assert int(sync.get(membership.membership_generation_key(cid)) or 0) > before
    finally:
        sync.close()
    assert GroupChat.objects(id=gid).get().admins == [ObjectId(bob.id)]
    # Alice is a plain member now; Bob is the last admin and cannot demote himself.
    assert error_code(alice.client.delete(f"{url}/{bob.id}")) == "forbidden"
    assert error_code(bob.client.delete(f"{url}/{bob.id}")) == "last_admin"
    assert bob.client.get(f"/api/v1/chats/group/{gid}").json()["admins"] == [bob.id]


def test_who_added_whom_is_recorded_and_visible_to_members() -> None:
    alice, bob, carol, dave = (account(n) for n in ("alice", "bob", "carol", "dave"))
    gid = alice.client.post("/api/v1/chats/group", {"name": "Crew", "members": [bob.username]},
                            format="json").json()["group_id"]
    alice.client.post(f"/api/v1/chats/group/{gid}/admins", {"username": bob.username}, format="json")
    assert bob.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username},
                           format="json").status_code == 201
    seen = carol.client.get(f"/api/v1/chats/group/{gid}")
    assert seen.status_code == 200
    assert seen.json()["added_by"] == {alice.id: None, bob.id: alice.id, carol.id: bob.id}
    # Removed and added again by someone else: the record follows the latest addition.
    assert bob.client.delete(f"/api/v1/chats/group/{gid}/members/{carol.id}").status_code == 204
    assert alice.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username},
                             format="json").status_code == 201
    assert alice.client.get(f"/api/v1/chats/group/{gid}").json()["added_by"][carol.id] == alice.id
    assert dave.client.get(f"/api/v1/chats/group/{gid}").status_code == 404


def test_deleting_a_group_removes_it_for_every_member(servers: Servers) -> None:
    alice, bob, carol = (account(n) for n in ("alice", "bob", "carol"))
    group = alice.client.post("/api/v1/chats/group", {"name": "Gone", "members": [bob.username]},
                              format="json").json()
    gid, cid = group["group_id"], group["conversation_id"]
    sent = bob.client.post(f"/api/v1/conversations/{cid}/messages", {"content": "hello", "client_msg_id": "d1"},
                           format="json")
    assert sent.status_code == 201
    api_support.persist(servers, cid)
    assert error_code(bob.client.delete(f"/api/v1/chats/group/{gid}")) == "forbidden"
    assert carol.client.delete(f"/api/v1/chats/group/{gid}").status_code == 404
    assert alice.client.delete(f"/api/v1/chats/group/{gid}").status_code == 204
    for member in (alice, bob):
        assert member.client.get(f"/api/v1/chats/group/{gid}").status_code == 404
        assert member.client.get(f"/api/v1/conversations/{cid}").status_code == 404
        assert member.client.get(f"/api/v1/conversations/{cid}/messages").status_code == 404
        assert cid not in [c["id"] for c in member.client.get("/api/v1/conversations").json()["results"]]
    # The write path's cached membership was dropped: a send is refused at once.
    late = bob.client.post(f"/api/v1/conversations/{cid}/messages", {"content": "anyone?", "client_msg_id": "d2"},
                           format="json")
    assert late.status_code == 404
    assert alice.client.delete(f"/api/v1/chats/group/{gid}").status_code == 404
    assert not GroupChat.objects(id=gid).first() and not Conversation.objects(id=cid).first()
    from core.documents import Message
    assert Message.objects(conversation_id=ObjectId(cid)).count() == 0


def test_membership_changes_leave_the_members_in_redis(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16's cold start: every REST membership change writes the conversation's member set into Redis,
    so the first send after it reads no MongoDB (the hot path's reader fails here if called)."""
    alice, bob, carol = account("alice"), account("bob"), account("carol")

    def no_mongodb(conversation_id: str) -> list[str] | None:
        raise AssertionError(f"the hot path read MongoDB for {conversation_id}")

    monkeypatch.setattr(membership, "_members_from_db", no_mongodb)
    sync = redis.Redis.from_url(servers.redis_url)

    def cached(cid: str) -> set[str]:
        return {m.decode() for m in sync.smembers(membership.membership_key(cid))}

    def send(who: Any, cid: str, text: str) -> int:
        return int(who.client.post(f"/api/v1/conversations/{cid}/messages",
                                   {"content": text, "client_msg_id": text}, format="json").status_code)

    try:
        single = alice.client.post("/api/v1/chats/single", {"username": bob.username}, format="json").json()
        assert cached(single["conversation_id"]) == {alice.id, bob.id}
        assert send(bob, single["conversation_id"], "s1") == 201

        group = alice.client.post("/api/v1/chats/group", {"name": "Warm", "members": [bob.username]},
                                  format="json").json()
        gid, cid = group["group_id"], group["conversation_id"]
        assert cached(cid) == {alice.id, bob.id}
        assert send(alice, cid, "g1") == 201
        assert alice.client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol.username},
                                 format="json").status_code == 201
        assert cached(cid) == {alice.id, bob.id, carol.id}
        assert send(carol, cid, "g2") == 201
        assert alice.client.delete(f"/api/v1/chats/group/{gid}/members/{bob.id}").status_code == 204
        assert cached(cid) == {alice.id, carol.id}
        assert send(bob, cid, "g3") == 404
        assert carol.client.delete(f"/api/v1/chats/group/{gid}/members/{carol.id}").status_code == 204  # leaves
        assert cached(cid) == {alice.id}
        assert send(carol, cid, "g4") == 404
        assert alice.client.delete(f"/api/v1/chats/group/{gid}").status_code == 204
        assert send(alice, cid, "g5") == 404
    finally:
        sync.close()
