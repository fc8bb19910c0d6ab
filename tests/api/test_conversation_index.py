"""Each user's conversation ids kept as one ``user_conversations`` document by every membership change
(docs/adr/0043), so the conversation list and a connect after the user's cached ids are gone read one document
by ``_id``, never the members query (a scan of ``conversations`` on FerretDB). Against the session's real
Redis and FerretDB; the members query is made to fail wherever the document should answer."""

from __future__ import annotations

import io
import uuid
from typing import Any

import pytest
import redis
from bson import ObjectId
from django.core.management import call_command
from rest_framework.test import APIClient

from chatstream_site.localservers import Servers
from core.documents import UserConversations
from core.keys import user_conversations_key, user_conversations_version_key
from messaging import conversation_index, selectors
from tests.support.api import registered

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


class StoreScan(AssertionError):
    """The members query ran: the rebuild scanned ``conversations``."""


@pytest.fixture
def no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(user_id: str) -> list[str]:
        raise StoreScan(f"the conversations of user {user_id} were read by a members query")

    monkeypatch.setattr(conversation_index, "_members_scan", refuse)


def cold(servers: Servers, *user_ids: str) -> None:
    """Drop the users' cached conversation ids, as their 30-day TTL or a Redis without its data would."""
    redis.Redis.from_url(servers.redis_url).delete(*(user_conversations_key(u) for u in user_ids))


def ids_cold(servers: Servers, user_id: str) -> list[str]:
    cold(servers, user_id)
    return selectors.user_conversation_ids(user_id=user_id)


def listed_cold(servers: Servers, user_id: str, client: APIClient) -> list[str]:
    cold(servers, user_id)
    response = client.get("/api/v1/conversations", {"limit": 50})
    assert response.status_code == 200, response.content
    return sorted(c["id"] for c in response.json()["results"])


def test_every_membership_change_keeps_the_document_right_with_the_cache_dropped(servers: Servers,
                                                                                no_scan: None) -> None:
    alice, _, alice_client = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    carol, carol_name, carol_client = registered("carol")
    assert ids_cold(servers, alice) == [] and listed_cold(servers, carol, carol_client) == []
    single = alice_client.post("/api/v1/chats/single", {"username": bob_name}, format="json")
    assert single.status_code in (200, 201), single.content
    ab = str(single.json()["conversation_id"])
    assert ids_cold(servers, alice) == [ab] and ids_cold(servers, bob) == [ab]
    made = alice_client.post("/api/v1/chats/group", {"name": "Team", "members": [bob_name]}, format="json")
    assert made.status_code == 201, made.content
    gid, group = str(made.json()["group_id"]), str(made.json()["conversation_id"])
    assert listed_cold(servers, alice, alice_client) == sorted([ab, group])
    assert listed_cold(servers, bob, bob_client) == sorted([ab, group])
    added = alice_client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol_name}, format="json")
    assert added.status_code in (200, 201), added.content
    assert listed_cold(servers, carol, carol_client) == [group]
    assert alice_client.delete(f"/api/v1/chats/group/{gid}/members/{carol}").status_code in (200, 204)
    assert listed_cold(servers, carol, carol_client) == [] and ids_cold(servers, carol) == []
    assert bob_client.post(f"/api/v1/chats/group/{gid}/leave").status_code in (200, 204)
    assert listed_cold(servers, bob, bob_client) == [ab]
    assert listed_cold(servers, alice, alice_client) == sorted([ab, group])
    assert alice_client.delete(f"/api/v1/chats/group/{gid}").status_code in (200, 204)
    assert listed_cold(servers, alice, alice_client) == [ab] and ids_cold(servers, bob) == [ab]
    # A connect reads the same (the broker's async read, its cache gone too).
    assert ids_cold(servers, alice) == [ab]


def test_a_user_without_a_document_is_rebuilt_once_then_read_by_id(servers: Servers,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _, alice_client = registered("alice")
    _bob, bob_name, _ = registered("bob")
    ab = str(alice_client.post("/api/v1/chats/single", {"username": bob_name}, format="json")
             .json()["conversation_id"])
    UserConversations.objects(id=ObjectId(alice)).delete()  # data from before the documents
    scans: list[str] = []
    real = conversation_index._members_scan

    def counted(user_id: str) -> list[str]:
        scans.append(user_id)
        return real(user_id)

    monkeypatch.setattr(conversation_index, "_members_scan", counted)
    assert listed_cold(servers, alice, alice_client) == [ab]
    assert scans == [alice]
    stored = UserConversations.objects(id=ObjectId(alice)).first()
    assert stored is not None and stored.complete and [str(c) for c in stored.c] == [ab]
    assert listed_cold(servers, alice, alice_client) == [ab]
    assert scans == [alice]  # the second cold read was the document's


def test_the_build_command_writes_every_users_document_for_existing_data(servers: Servers,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _, alice_client = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    loner, _, loner_client = registered("loner")
    ab = str(alice_client.post("/api/v1/chats/single", {"username": bob_name}, format="json")
             .json()["conversation_id"])
    group = str(alice_client.post("/api/v1/chats/group", {"name": "G", "members": [bob_name]}, format="json")
                .json()["conversation_id"])
    # As before the documents existed: none, or one a change created for a user who had none (incomplete).
    UserConversations.objects(id__in=[ObjectId(alice), ObjectId(loner)]).delete()
    UserConversations.objects(id=ObjectId(bob)).update_one(set__c=[ObjectId(group)], set__complete=False)
    out = io.StringIO()
    call_command("user_conversations_build", stdout=out)
    assert "wrote" in out.getvalue()

    def refuse(user_id: str) -> list[str]:
        raise StoreScan(user_id)

    monkeypatch.setattr(conversation_index, "_members_scan", refuse)
    assert listed_cold(servers, alice, alice_client) == sorted([ab, group])
    assert listed_cold(servers, bob, bob_client) == sorted([ab, group])
    assert listed_cold(servers, loner, loner_client) == []


def test_a_rebuild_raced_by_membership_changes_leaves_the_document_for_the_next_read(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _, alice_client = registered("alice")
    _bob, bob_name, _ = registered("bob")
    ab = str(alice_client.post("/api/v1/chats/single", {"username": bob_name}, format="json")
             .json()["conversation_id"])
    UserConversations.objects(id=ObjectId(alice)).delete()
    sync = redis.Redis.from_url(servers.redis_url)
    real = conversation_index._members_scan

    def raced(user_id: str) -> list[str]:
        found = real(user_id)
        sync.incr(user_conversations_version_key(user_id))  # a membership change of theirs meanwhile
        return found

    monkeypatch.setattr(conversation_index, "_members_scan", raced)
    assert conversation_index.user_conversations_rebuild(sync, user_id=alice) == [ab]  # answered, not trusted
    stored = UserConversations.objects(id=ObjectId(alice)).first()
    assert stored is not None and not stored.complete
    assert conversation_index.user_conversations_stored(user_id=alice) is None


def test_two_racing_changes_are_settled_by_the_reread(servers: Servers) -> None:
    user, other = str(ObjectId()), str(ObjectId())
    conversation = str(ObjectId())
    conversation_index.user_conversations_created(user_id=user)
    conversation_index.user_conversations_created(user_id=other)
    reads: list[Any] = [[]]  # after its write, the change sees the user removed by a later change

    conversation_index.user_conversations_record(user_ids=[user, other], conversation_id=conversation,
                                                 members=[user, other], members_read=lambda: reads[0])
    assert conversation_index.user_conversations_stored(user_id=user) == []
    assert conversation_index.user_conversations_stored(user_id=other) == []
    conversation_index.user_conversations_record(user_ids=[user], conversation_id=conversation, members=[user],
                                                 members_read=lambda: [user])
    assert conversation_index.user_conversations_stored(user_id=user) == [conversation]


def test_the_build_writes_more_users_than_the_stores_connection_pool(servers: Servers) -> None:
    """FerretDB v1 holds a pooled connection (100 in all) per matching statement of a command until it ends: a
    build sending its users' updates in one command of hundreds hung the store (and every later command)."""
    from core.documents import User

    uids = [ObjectId() for _ in range(150)]
    tag = uuid.uuid4().hex[:6]
    User._get_collection().insert_many([{"_id": u, "username": f"pool{tag}{i}", "username_key": f"pool{tag}{i}",
                                         "email": f"pool{tag}{i}@x.test", "password": "!", "contacts": []}
                                        for i, u in enumerate(uids)])
    # Incomplete documents, as changes leave for users who had none: the build rewrites each.
    UserConversations._get_collection().insert_many([{"_id": u, "c": [], "complete": False} for u in uids])
    call_command("user_conversations_build", stdout=io.StringIO())
    built = list(UserConversations.objects(id__in=uids).as_pymongo())
    assert len(built) == len(uids) and all(d["complete"] and d.get("c", []) == [] for d in built)
