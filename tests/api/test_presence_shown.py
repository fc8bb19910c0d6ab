"""Redis presence is the truth for online/offline (docs/adr/0051): a connect writes no ``users.status``, and every
public read (users search, contacts, my profile, a conversation's members, the list's cards) shows the status
Redis says at once, laid over the store's last offline or chosen status. Against the session's real Redis and
FerretDB; the brokers' presence calls made directly (tests/realtime hold the same through real brokers)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import redis.asyncio
from django.conf import settings
from rest_framework.test import APIClient

from chatstream_site.localservers import Servers
from core.documents import User
from core.keys import PRESENCE_SINCE_KEY
from messaging import presence
from tests.support.api import registered

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def in_redis(servers: Servers, call: Callable[[redis.asyncio.Redis], Awaitable[Any]]) -> Any:
    async def body() -> Any:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(body())


def shown(viewer: APIClient, owner: APIClient, *, user_id: str, username: str, conversation_id: str) -> set[
        tuple[str, str | None]]:
    """(status, last_seen) of the user in every REST read that shows them; one element if they all agree."""
    seen = []
    found = viewer.get("/api/v1/users", {"username": username}).json()["results"]
    seen.append(next(u for u in found if u["id"] == user_id))
    seen.append(next(u for u in viewer.get("/api/v1/users/me/contacts").json()["results"] if u["id"] == user_id))
    seen.append(owner.get("/api/v1/users/me").json())
    members = viewer.get(f"/api/v1/conversations/{conversation_id}/members").json()["results"]
    seen.append(next(u for u in members if u["id"] == user_id))
    listed = viewer.get("/api/v1/conversations", {"limit": 50}).json()["results"]
    seen.append(next(c for c in listed if c["id"] == conversation_id)["peer"])
    seen.append(viewer.get(f"/api/v1/conversations/{conversation_id}").json()["peer"])
    return {(u["status"], u["last_seen"]) for u in seen}


def test_every_read_shows_redis_presence_at_once_and_a_connect_writes_no_store(servers: Servers) -> None:
    _, _, alice = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    assert alice.post("/api/v1/users/me/contacts", {"username": bob_name}, format="json").status_code == 201
    cid = str(alice.post("/api/v1/chats/single", {"username": bob_name}, format="json").json()["conversation_id"])
    r = redis.Redis.from_url(servers.redis_url)

    def reads() -> set[tuple[str, str | None]]:
        return shown(alice, bob_client, user_id=bob, username=bob_name, conversation_id=cid)

    ((status, _),) = reads()
    assert status == "offline"
    session = uuid.uuid4().hex
    before = datetime.now(UTC)
    assert in_redis(servers, lambda c: presence.presence_connect(c, user_id=bob, session_id=session,
                                                                 conversation_ids=[cid]))
    ((status, online_since),) = reads()
    assert status == "online" and online_since is not None and online_since >= before.isoformat()[:19]
    record = User.objects(id=bob).get()
    assert record.status == "offline" and record.last_seen is None  # no store write on connect
    members = alice.get(f"/api/v1/conversations/{cid}/members").json()["results"]
    assert next(u for u in members if u["id"] == bob)["online"] is True

    # A status chosen while online shows, as before; so does the next disconnect's offline.
    assert bob_client.patch("/api/v1/users/me", {"status": "busy"}, format="json").json()["status"] == "busy"
    ((status, chosen_at),) = reads()
    assert status == "busy" and chosen_at is not None and chosen_at >= online_since

    # The Redis step of a last disconnect, before its store write: offline at once, with that moment.
    at_ms = int(time.time() * 1000)
    assert in_redis(servers, lambda c: presence._presence_transition(
        c, user_id=bob, session_id=session, add=False, at_ms=at_ms)) == (0, True)
    ((status, last_seen),) = reads()
    assert status == "offline" and last_seen == datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    # Then the store write; the Redis entry goes, the store says the same.
    presence._users_offline({bob: at_ms})
    assert r.hget(PRESENCE_SINCE_KEY, bob) is None
    assert reads() == {("offline", last_seen)}
    assert User.objects(id=bob).get().status == "offline"

    # A late offline write of an earlier disconnect does not hide a reconnect.
    again = uuid.uuid4().hex
    assert in_redis(servers, lambda c: presence.presence_connect(c, user_id=bob, session_id=again,
                                                                 conversation_ids=[cid]))
    presence._users_offline({bob: at_ms})
    ((status, _),) = reads()
    assert status == "online"
    assert in_redis(servers, lambda c: presence.presence_disconnect(c, user_id=bob, session_id=again,
                                                                    conversation_ids=[cid]))
    ((status, _),) = reads()
    assert status == "offline" and r.hget(PRESENCE_SINCE_KEY, bob) is None


def test_a_killed_brokers_user_shows_offline_once_the_session_expired_and_the_sweep_records_it(
        servers: Servers) -> None:
    _, _, alice = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    assert alice.post("/api/v1/users/me/contacts", {"username": bob_name}, format="json").status_code == 201
    cid = str(alice.post("/api/v1/chats/single", {"username": bob_name}, format="json").json()["conversation_id"])
    ttl = int(settings.PRESENCE_TTL_S)
    t0 = int(time.time()) - ttl - 2  # connected on a broker that was killed: nobody refreshed the session
    assert in_redis(servers, lambda c: presence._presence_transition(c, user_id=bob, session_id="s", add=True,
                                                                     now=t0)) == (1, True)
    expired = datetime.fromtimestamp(t0 + ttl, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # Before any sweep: offline, last seen when the session expired.
    assert shown(alice, bob_client, user_id=bob, username=bob_name, conversation_id=cid) == {("offline", expired)}
    # The sweep (any live broker) writes the same to the store and drops the Redis entry.
    in_redis(servers, lambda c: presence.presence_sweep(c, limit=10_000))
    record = User.objects(id=bob).get()
    assert record.status == "offline" and record.last_seen.replace(tzinfo=UTC).timestamp() == t0 + ttl
    assert redis.Redis.from_url(servers.redis_url).hget(PRESENCE_SINCE_KEY, bob) is None
    assert shown(alice, bob_client, user_id=bob, username=bob_name, conversation_id=cid) == {("offline", expired)}


def test_status_shown_rules() -> None:
    at = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    t = int(at.timestamp() * 1000)
    later = datetime(2026, 12, 1, 7, 5, tzinfo=UTC)
    # Nothing in Redis: the store's.
    assert presence.status_shown(status="busy", last_seen=at, live=False, since=None, gone=None) == ("busy", at)
    # Online since T: online from T, unless chosen after T.
    assert presence.status_shown(status="offline", last_seen=None, live=True, since=f"+{t}", gone=None) == (
        "online", at)
    assert presence.status_shown(status="away", last_seen=later, live=True, since=f"+{t}", gone=None) == (
        "away", later)
    # Offline since T (the store not yet written), or expired at T without a disconnect.
    assert presence.status_shown(status="busy", last_seen=None, live=False, since=f"-{t}", gone=None) == (
        "offline", at)
    assert presence.status_shown(status="offline", last_seen=None, live=False, since=f"+{t}",
                                 gone=int(at.timestamp())) == ("offline", at)
    # A naive datetime (as MongoDB returns them) is UTC.
    assert presence.status_shown(status="away", last_seen=later.replace(tzinfo=None), live=True, since=f"+{t}",
                                 gone=None)[0] == "away"
