"""A connect reads no document store (issue 16, docs/adr/0039): registration caches a new user's conversation ids
as none, and every membership change through the services moves the conversation into or out of each changed
user's cached set, so the read a broker's connect makes (``messaging.selectors.user_conversation_ids_async``)
never falls back to the store's members query. Against the session's real Redis and FerretDB."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from chatstream_site.localservers import Servers
from messaging import membership, selectors
from tests.support.api import registered

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


class StoreFill(AssertionError):
    """The store's members query ran: a connect would have read the document store."""


@pytest.fixture
def no_store_fill(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(user_id: str) -> list[str]:
        raise StoreFill(f"the conversations of user {user_id} were read from the store")

    monkeypatch.setattr(selectors, "_user_conversation_ids_from_db", refuse)


def conversations(servers: Servers, user_id: str) -> list[str]:
    """What a broker's connect reads (with its own async client, as the consumer does)."""
    async def read() -> list[str]:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            return await selectors.user_conversation_ids_async(client, user_id=user_id)
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_conversations_are_kept_in_redis_from_registration_through_every_membership_change(
        servers: Servers, no_store_fill: None) -> None:
    alice, _, alice_client = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    carol, carol_name, _ = registered("carol")
    assert conversations(servers, alice) == [] and conversations(servers, carol) == []
    single = alice_client.post("/api/v1/chats/single", {"username": bob_name}, format="json")
    assert single.status_code in (200, 201), single.content
    ab = str(single.json()["conversation_id"])
    assert conversations(servers, alice) == [ab] and conversations(servers, bob) == [ab]
    made = alice_client.post("/api/v1/chats/group", {"name": "Team", "members": [bob_name]}, format="json")
    assert made.status_code == 201, made.content
    gid, group = str(made.json()["group_id"]), str(made.json()["conversation_id"])
    assert conversations(servers, alice) == sorted([ab, group])
    added = alice_client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol_name}, format="json")
    assert added.status_code in (200, 201), added.content
    assert conversations(servers, carol) == [group]
    assert alice_client.delete(f"/api/v1/chats/group/{gid}/members/{carol}").status_code in (200, 204)
    assert conversations(servers, carol) == []
    assert bob_client.post(f"/api/v1/chats/group/{gid}/leave").status_code in (200, 204)
    assert conversations(servers, bob) == [ab]
    assert alice_client.delete(f"/api/v1/chats/group/{gid}").status_code in (200, 204)
    assert conversations(servers, alice) == [ab]
    # The REST list reads the same sets.
    listed = alice_client.get("/api/v1/conversations").json()["results"]
    assert [c["id"] for c in listed] == [ab]


def test_a_membership_change_raced_by_a_later_one_drops_the_users_sets(servers: Servers,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _, alice_client = registered("alice")
    bob, bob_name, _ = registered("bob")
    made = alice_client.post("/api/v1/chats/group", {"name": "Race", "members": [bob_name]}, format="json")
    group = str(made.json()["conversation_id"])
    assert conversations(servers, bob) == [group]
    sync = redis.Redis.from_url(servers.redis_url)
    real_query = membership._members_query

    def raced(conversation_id: str) -> Any:
        found = real_query(conversation_id)
        sync.incr(membership.membership_generation_key(conversation_id))  # a later change's bump
        return found

    monkeypatch.setattr(membership, "_members_query", raced)
    membership.membership_changed_sync(sync, user_ids=[alice, bob], conversation_id=group)
    # Not written from a read a later change may have outdated: dropped, so the next read fills from the store.
    assert not sync.exists(selectors.user_conversations_key(bob))
    assert not sync.exists(membership.membership_key(group))
    monkeypatch.setattr(membership, "_members_query", real_query)
    assert conversations(servers, bob) == [group]


def test_a_registration_after_a_membership_change_does_not_cache_none(servers: Servers) -> None:
    sync = redis.Redis.from_url(servers.redis_url)
    user_id = "66aa00000000000000000001"
    sync.delete(selectors.user_conversations_key(user_id), selectors.user_conversations_version_key(user_id))
    sync.incr(selectors.user_conversations_version_key(user_id))  # a change that saw no cached set
    assert selectors.user_conversations_init(sync, user_id=user_id) == 0
    assert not sync.exists(selectors.user_conversations_key(user_id))
    sync.delete(selectors.user_conversations_version_key(user_id))
    assert selectors.user_conversations_init(sync, user_id=user_id) == 1
    assert conversations(servers, user_id) == []
