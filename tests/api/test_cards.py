"""The conversation list's cached cards (and the bucket summaries of its unread counts below a window) live a day
and are dropped by every write of what they show (docs/adr/0050): the list is right the moment after each such
write, and a fill that read the store before a write cannot cache what it read. Against the session's real Redis
and FerretDB."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio
from django.test import override_settings
from rest_framework.test import APIClient

from api import conversation_list
from chatstream_site.localcluster import wait_until
from chatstream_site.localservers import Servers
from core.keys import (
    bucket_summary_key,
    conversation_card_key,
    group_card_key,
    partition_of,
    recent_docs_key,
    recent_key,
    recent_unread_key,
    user_card_key,
)
from messaging import presence
from tests.support.api import PASSWORD, persist, registered

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def listed(client: APIClient) -> dict[str, dict[str, Any]]:
    response = client.get("/api/v1/conversations", {"limit": 50})
    assert response.status_code == 200, response.content
    return {c["id"]: c for c in response.json()["results"]}


def chat(client: APIClient, username: str) -> str:
    made = client.post("/api/v1/chats/single", {"username": username}, format="json")
    assert made.status_code in (200, 201), made.content
    return str(made.json()["conversation_id"])


def connected(servers: Servers, user_id: str, *, connect: bool, session: str) -> None:
    """A broker's presence call for one WebSocket (Redis at once; a disconnect's StatusWriter writes
    ``users.status``/``last_seen``, a connect nothing: docs/adr/0051)."""
    async def body() -> None:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            call = presence.presence_connect if connect else presence.presence_disconnect
            assert await call(client, user_id=user_id, session_id=session, conversation_ids=[])
        finally:
            await client.aclose()

    asyncio.run(body())


def test_the_list_shows_every_change_of_a_card_at_once(servers: Servers) -> None:
    _, _, alice_client = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    _, carol_name, _ = registered("carol")
    ab = chat(alice_client, bob_name)
    made = alice_client.post("/api/v1/chats/group", {"name": "Team", "members": [bob_name]}, format="json")
    assert made.status_code == 201, made.content
    gid, group = str(made.json()["group_id"]), str(made.json()["conversation_id"])
    first = listed(alice_client)
    assert first[ab]["peer"]["status"] == "offline" and first[group]["title"] == "Team"
    r = redis.Redis.from_url(servers.redis_url)
    # Cached for a day, not a minute: the next list reads no store.
    for key in (user_card_key(bob), conversation_card_key(ab), group_card_key(gid)):
        assert r.ttl(key) > 3600, key

    def peer() -> dict[str, Any]:
        return dict(listed(alice_client)[ab]["peer"])

    assert bob_client.patch("/api/v1/users/me", {"status": "busy"}, format="json").status_code == 200
    busy = peer()
    assert busy["status"] == "busy" and busy["last_seen"] is not None
    session = uuid.uuid4().hex
    connected(servers, bob, connect=True, session=session)
    online = peer()
    assert online["status"] == "online" and online["last_seen"] >= busy["last_seen"]
    connected(servers, bob, connect=False, session=session)
    assert peer()["status"] == "offline"
    # The sweep's write for a user whose last session expired (their broker was killed).
    assert bob_client.patch("/api/v1/users/me", {"status": "away"}, format="json").status_code == 200
    assert peer()["status"] == "away"
    expired = datetime.now(UTC) + timedelta(seconds=5)
    presence._user_expired(bob, expired)
    swept = peer()
    assert swept["status"] == "offline" and swept["last_seen"].startswith(expired.strftime("%Y-%m-%dT%H:%M:%S"))

    assert alice_client.patch(f"/api/v1/chats/group/{gid}", {"name": "Renamed"}, format="json").status_code == 200
    assert listed(alice_client)[group]["title"] == "Renamed"
    added = alice_client.post(f"/api/v1/chats/group/{gid}/members", {"username": carol_name}, format="json")
    assert added.status_code in (200, 201), added.content
    assert len(listed(alice_client)[group]["members"]) == 3

    assert bob_client.patch("/api/v1/users/me", {"status": "busy"}, format="json").status_code == 200
    assert peer()["status"] == "busy"
    assert bob_client.delete("/api/v1/users/me", {"password": PASSWORD}, format="json").status_code == 204
    after = listed(alice_client)
    assert after[ab]["peer"]["status"] == "offline" and len(after[group]["members"]) == 2


def test_a_fill_that_read_before_a_write_caches_nothing(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, alice_client = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    ab = chat(alice_client, bob_name)
    r = redis.Redis.from_url(servers.redis_url)
    r.delete(user_card_key(bob))
    load = conversation_list._user_card_load

    def read_then_written(uid: str) -> dict[str, Any] | None:
        card = load(uid)  # what the store had; then bob's status changes before the fill writes the card
        assert bob_client.patch("/api/v1/users/me", {"status": "busy"}, format="json").status_code == 200
        return card

    monkeypatch.setattr(conversation_list, "_user_card_load", read_then_written)
    assert listed(alice_client)[ab]["peer"]["status"] == "offline"  # read before the write: answered as read
    monkeypatch.setattr(conversation_list, "_user_card_load", load)
    assert r.get(user_card_key(bob)) is None  # not cached: the write's drop ended the fill's lease
    assert listed(alice_client)[ab]["peer"]["status"] == "busy"
    assert r.ttl(user_card_key(bob)) > 3600


def test_a_key_another_fill_holds_is_read_from_the_store_and_left_to_it(servers: Servers) -> None:
    _, _, alice_client = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    ab = chat(alice_client, bob_name)
    assert bob_client.patch("/api/v1/users/me", {"status": "away"}, format="json").status_code == 200
    r = redis.Redis.from_url(servers.redis_url)
    r.set(user_card_key(bob), b"~another-fill", ex=conversation_list.CARD_LEASE_S)
    assert listed(alice_client)[ab]["peer"]["status"] == "away"
    assert r.get(user_card_key(bob)) == b"~another-fill"


def test_a_peers_disconnect_rewrites_their_card_and_any_other_write_between_drops_it(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/adr/0060: the offline write of a user's last disconnect rewrites their cached card (the next list of
    their contacts reads no store), unless the key changed between the write's read and its rewrite."""
    _, _, alice_client = registered("alice")
    bob, bob_name, _ = registered("bob")
    ab = chat(alice_client, bob_name)
    r = redis.Redis.from_url(servers.redis_url)
    key = user_card_key(bob)
    listed(alice_client)
    before = json.loads(r.get(key) or b"null")
    assert before is not None
    session = uuid.uuid4().hex
    connected(servers, bob, connect=True, session=session)
    connected(servers, bob, connect=False, session=session)
    card = json.loads(r.get(key) or b"null")  # not dropped: rewritten with what the store now holds
    assert card == conversation_list._user_card_load(bob)
    assert card["status"] == "offline" and card["last_seen"] > (before["last_seen"] or "")
    assert r.ttl(key) > 3600
    loads: list[str] = []
    load = conversation_list._user_card_load

    def counted(uid: str) -> dict[str, Any] | None:
        loads.append(uid)
        return load(uid)

    monkeypatch.setattr(conversation_list, "_user_card_load", counted)
    peer = listed(alice_client)[ab]["peer"]
    assert loads == [] and peer["status"] == "offline" and peer["last_seen"] == card["last_seen"]

    # Every other interleaving ends as ADR 0050's drop: the next fill reads the store.
    moment = datetime.now(UTC)
    for held_before, written_between, left in (
            (b"~a-fill", None, None),  # a fill's lease: ended, the fill writes nothing
            (None, b'{"username": "bob", "status": "busy", "last_seen": null}', None),  # a fill that read earlier
            (b'{"username": "x", "status": "away", "last_seen": null}', b"~a-fill", None),  # dropped, then leased
            (b"{not json", None, None),  # a value this code cannot read: dropped
            (None, None, None)):  # nothing cached, nothing written
        r.delete(key)
        if held_before is not None:
            r.set(key, held_before, ex=60)
        read = presence.user_cards_read(r, user_ids=[bob])
        if written_between is not None:
            r.set(key, written_between, ex=60)
        presence.user_cards_rewrite(r, before={bob: read[0]}, status="offline", last_seen={bob: moment})
        assert r.get(key) == left, (held_before, written_between)
    # Unchanged between: rewritten, its other fields and its TTL kept.
    r.set(key, json.dumps({"username": "bob", "status": "busy", "last_seen": None}), ex=500)
    presence.user_cards_rewrite(r, before={bob: presence.user_cards_read(r, user_ids=[bob])[0]}, status="offline",
                                last_seen={bob: moment})
    assert json.loads(r.get(key) or b"null") == {"username": "bob", "status": "offline",
                                                 "last_seen": moment.isoformat(timespec="milliseconds")
                                                 .replace("+00:00", "Z")}
    assert 400 < r.ttl(key) <= 500
    # The sweep's guarded write that matched nothing (the store is newer) leaves the card alone.
    kept = r.get(key)
    presence._user_expired(bob, datetime(2020, 1, 1, tzinfo=UTC))
    assert r.get(key) == kept


def test_the_cards_of_the_rows_below_a_page_are_filled_after_the_answer(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversation that rises into the page finds its peer's card cached: the list before filled it on its
    prefetch thread (api/conversation_list.PREFETCH_ROWS), not inside a later answer."""
    _, _, alice_client = registered("alice")
    peers = [registered(name) for name in ("bob", "carol", "dave")]
    convs = [chat(alice_client, name) for _uid, name, _client in peers]
    r = redis.Redis.from_url(servers.redis_url)
    for uid, _name, _client in peers:
        r.delete(user_card_key(uid))
    page = alice_client.get("/api/v1/conversations", {"limit": 1})
    assert page.status_code == 200 and len(page.json()["results"]) == 1
    shown = page.json()["results"][0]["peer"]["id"]
    others = [uid for uid, _name, _client in peers if uid != shown]
    wait_until(lambda: all(r.exists(user_card_key(uid)) for uid in others), timeout_s=10,
               what="the rows below the page to have their peers' cards")
    loads: list[str] = []
    load = conversation_list._user_card_load

    def counted(uid: str) -> dict[str, Any] | None:
        loads.append(uid)
        return load(uid)

    monkeypatch.setattr(conversation_list, "_user_card_load", counted)
    # The lowest conversation takes a message and rises to the top: its peer is shown without a store read.
    last_uid, _last_name, last_client = next(p for p in peers if p[0] == others[-1])
    low = convs[[uid for uid, _n, _c in peers].index(last_uid)]
    sent = last_client.post(f"/api/v1/conversations/{low}/messages",
                            {"content": "up", "client_msg_id": uuid.uuid4().hex}, format="json")
    assert sent.status_code in (200, 201, 202), sent.content
    top = alice_client.get("/api/v1/conversations", {"limit": 1}).json()["results"][0]
    assert top["id"] == low and top["peer"]["id"] == last_uid and top["peer"]["username"] == _last_name
    assert loads == []


def test_cards_memory_is_what_docs_budget(servers: Servers) -> None:
    """docs/adr/0050's budget per card (MEMORY USAGE on the session's Redis)."""
    _, _, alice_client = registered("alice")
    bob, bob_name, bob_client = registered("bob")
    ab = chat(alice_client, bob_name)
    made = alice_client.post("/api/v1/chats/group", {"name": "A group of a few", "members": [bob_name]},
                             format="json")
    sent = bob_client.post(f"/api/v1/conversations/{ab}/messages",
                           {"content": "x" * 60, "client_msg_id": uuid.uuid4().hex}, format="json")
    assert made.status_code == 201 and sent.status_code == 201, (made.content, sent.content)
    persist(servers, ab)  # the conversation card holds the store's last message
    r = redis.Redis.from_url(servers.redis_url)
    r.delete(conversation_card_key(ab))
    listed(alice_client)
    assert b"x" * 60 in (r.get(conversation_card_key(ab)) or b"")
    user, conv, group = (r.memory_usage(k) for k in (user_card_key(bob), conversation_card_key(ab),
                                                      group_card_key(str(made.json()["group_id"]))))
    assert user is not None and conv is not None and group is not None
    assert user <= 200 and conv <= 700 and group <= 160, (user, conv, group)  # 168, 600, 136 measured


def test_unread_below_the_window_is_counted_from_cached_bucket_summaries_and_a_deletion_at_once(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _, alice_client = registered("alice")
    _, bob_name, bob_client = registered("bob")
    ab = chat(alice_client, bob_name)

    def send(client: APIClient, text: str) -> str:
        sent = client.post(f"/api/v1/conversations/{ab}/messages",
                           {"content": text, "client_msg_id": uuid.uuid4().hex}, format="json")
        assert sent.status_code == 201, sent.content
        return str(sent.json()["id"])

    with override_settings(RECENT_MESSAGES=5):
        ids = [send(bob_client, f"b{i}") for i in range(60)]
        send(alice_client, "mine")
        persist(servers, ab)  # buckets 0 (seqs 1-50, complete) and 1 (flushed as idle) stored
        ids += [send(bob_client, f"c{i}") for i in range(3)]  # the window drops what is persisted
    floor = int(redis.Redis.from_url(servers.redis_url).hget(recent_docs_key(partition_of(ab), ab), "floor") or 0)
    assert floor > 50  # alice is behind the window: two buckets count her unread
    # She read the first message: a count of hers walks the window and sums the summaries below it (one who never
    # read is counted from the window's counts alone, docs/adr/0059: tests below).
    read = alice_client.post(f"/api/v1/conversations/{ab}/read", {"seq": 1}, format="json")
    assert read.status_code == 200, read.content

    def unread() -> int:
        return int(listed(alice_client)[ab]["unread"])

    # The drain wrote both buckets' summaries as it inserted them (bucket 0 whole, bucket 1 flushed when idle):
    # no list reads a bucket by _id for them (storage.buckets.summaries_remember).
    r = redis.Redis.from_url(servers.redis_url)
    assert r.ttl(bucket_summary_key(f"{ab}:0")) > 3600 and r.ttl(bucket_summary_key(f"{ab}:1")) > 3600
    summary_bytes = r.memory_usage(bucket_summary_key(f"{ab}:0"))  # 50 messages: docs/adr/0050's budget
    assert summary_bytes is not None and summary_bytes <= 800, summary_bytes  # 728 measured
    load = conversation_list._bucket_summary_load

    def refuse(bid: str) -> None:
        raise AssertionError(f"bucket {bid} read from the store: its summary is cached")

    monkeypatch.setattr(conversation_list, "_bucket_summary_load", refuse)
    assert unread() == 62
    kept = recent_unread_key(partition_of(ab), ab)
    kind, _last, _cursor, total, *_counts = (r.hget(kept, alice) or b"").decode().split(":")
    assert (kind, int(total)) == ("e", 62)  # the window's part and the summaries' part, kept as one total
    # New messages advance the kept total by themselves, across the trims that move messages below the window:
    # nothing is counted below it again (docs/adr/0059).
    below = conversation_list.unread_from_buckets

    def nothing_below(**kw: Any) -> dict[str, tuple[int, bool]]:
        assert not kw["behind"], kw["behind"]
        return {}

    monkeypatch.setattr(conversation_list, "unread_from_buckets", nothing_below)
    with override_settings(RECENT_MESSAGES=5):
        ids += [send(bob_client, f"d{i}") for i in range(3)]
        persist(servers, ab)
        ids.append(send(bob_client, "e"))  # the window drops what is persisted
    assert int(r.hget(recent_docs_key(partition_of(ab), ab), "floor") or 0) > floor
    assert unread() == 66
    monkeypatch.setattr(conversation_list, "unread_from_buckets", below)
    # Counted afresh (no kept total), an expired or evicted summary is read from the store once, then cached again.
    r.delete(kept, bucket_summary_key(f"{ab}:0"))
    monkeypatch.setattr(conversation_list, "_bucket_summary_load", load)
    assert unread() == 66
    assert r.ttl(bucket_summary_key(f"{ab}:0")) > 3600
    r.delete(kept)
    monkeypatch.setattr(conversation_list, "_bucket_summary_load", refuse)
    assert unread() == 66
    assert listed(alice_client)[ab]["unread_capped"] is False
    r.delete(kept)
    # Further behind than one list's summaries (a budget of one bucket here, two needed): on FerretDB a lower
    # bound, the window's count alone, never a scan of ``messages``; on MongoDB the exact count from its index.
    monkeypatch.setattr(conversation_list, "UNREAD_BUCKET_READS_MAX", 1)
    if conversation_list._is_ferretdb():
        def no_scan(**_kw: Any) -> None:
            raise AssertionError("messages scanned for an unread count")

        monkeypatch.setattr(conversation_list, "unread_counts", no_scan)
        row = listed(alice_client)[ab]
        window = r.zrange(recent_key(partition_of(ab), ab), 0, -1)
        docs = r.hmget(recent_docs_key(partition_of(ab), ab), window)
        in_window = sum(1 for doc in docs if doc and json.loads(doc)["sender_id"] != alice)
        assert 0 < in_window < 66
        assert (row["unread"], row["unread_capped"]) == (in_window, True)
        # A lower bound is kept as such: new messages advance it, still capped.
        with override_settings(RECENT_MESSAGES=5):
            ids.append(send(bob_client, "f"))
        row = listed(alice_client)[ab]
        assert (row["unread"], row["unread_capped"]) == (in_window + 1, True)
        expected = 67
    else:
        monkeypatch.setattr(conversation_list, "_bucket_summary_load", load)
        row = listed(alice_client)[ab]
        assert (row["unread"], row["unread_capped"]) == (66, False)
        expected = 66
    monkeypatch.undo()
    r.delete(kept)
    assert unread() == expected
    # A deletion below the window: a list before the drain wrote it counts the bucket's old summary (the store
    # does not have it yet); the drain's write to the stored bucket drops that summary and the kept totals it
    # went into, so the next list counts it (docs/adr/0059).
    assert bob_client.delete(f"/api/v1/messages/{ids[9]}").status_code == 200
    assert unread() in (expected - 1, expected)
    persist(servers, ab)
    assert unread() == expected - 1


def test_a_reader_who_never_read_is_counted_from_the_windows_counts_and_the_summaries_below_its_birth(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing read nor deleted since a window was born (docs/adr/0059): the reader's count is the window's
    messages but theirs, from its counts (no walk), plus what came before its birth from the bucket summaries
    the drain wrote (no store read)."""
    alice, _, alice_client = registered("alice")
    _, bob_name, bob_client = registered("bob")
    ab = chat(alice_client, bob_name)
    r = redis.Redis.from_url(servers.redis_url)
    p = partition_of(ab)

    def send(client: APIClient, text: str) -> str:
        sent = client.post(f"/api/v1/conversations/{ab}/messages",
                           {"content": text, "client_msg_id": uuid.uuid4().hex}, format="json")
        assert sent.status_code == 201, sent.content
        return str(sent.json()["id"])

    for i in range(60):
        send(bob_client, f"old {i}")
    persist(servers, ab)  # buckets 0 (whole) and 1 (its tail, flushed) stored, with their summaries
    r.delete(recent_key(p, ab), recent_docs_key(p, ab))  # the window expired (a week quiet)
    late = [send(bob_client, "new 1"), send(bob_client, "new 2")]
    send(alice_client, "mine")
    assert int(r.hget(recent_docs_key(p, ab), "born") or 0) == 61
    # A walk would see this one as deleted; the counts do not look at documents.
    docs = recent_docs_key(p, ab)
    r.hset(docs, late[0], (r.hget(docs, late[0]) or b"{").replace(b"{", b'{"deleted":true,', 1))

    def refuse(bid: str) -> None:
        raise AssertionError(f"bucket {bid} read from the store: the drain wrote its summary")

    monkeypatch.setattr(conversation_list, "_bucket_summary_load", refuse)
    row = listed(alice_client)[ab]
    assert (row["unread"], row["unread_capped"]) == (62, False)
    kind, _last, _cursor, total, *_ = (r.hget(recent_unread_key(p, ab), alice) or b"").decode().split(":")
    assert (kind, int(total)) == ("e", 62)


def test_a_list_of_fifty_answers_each_conversation_with_its_own_peer_last_message_and_unread() -> None:
    """The list's rows are built from cards and the window as plain values (api/conversation_list.py): 50
    conversations, each with one message of its peer, each row names its own peer, message and count."""
    me, _, my_client = registered("fifty")
    peers: dict[str, tuple[str, str]] = {}  # conversation id -> (peer id, peer username)
    for k in range(50):
        peer_id, peer_name, peer_client = registered(f"p{k}x")
        cid = chat(my_client, peer_name)
        peers[cid] = (peer_id, peer_name)
        sent = peer_client.post(f"/api/v1/conversations/{cid}/messages",
                                {"content": f"hello from {peer_name}", "client_msg_id": uuid.uuid4().hex},
                                format="json")
        assert sent.status_code in (200, 201), sent.content
    rows = listed(my_client)
    assert set(rows) == set(peers)
    for cid, (peer_id, peer_name) in peers.items():
        row = rows[cid]
        assert row["peer"]["id"] == peer_id and row["title"] == peer_name and row["type"] == "single"
        assert row["last_message"]["sender_id"] == peer_id
        assert row["last_message"]["content"] == f"hello from {peer_name}"
        assert row["unread"] == 1 and row["last_seq"] == row["last_message"]["seq"] and row["read_seq"] == 0
        assert sorted(row["members"]) == sorted([me, peer_id])
        assert row["updated_at"] == row["last_message"]["timestamp"].replace("+00:00", "Z")
    order = [c["id"] for c in my_client.get("/api/v1/conversations", {"limit": 50}).json()["results"]]
    assert [rows[c]["updated_at"] for c in order] == sorted((r["updated_at"] for r in rows.values()), reverse=True)


def test_a_card_with_another_time_form_is_answered_in_the_apis_form(servers: Servers) -> None:
    """A card an older writer left (``+00:00``, microseconds) is answered as every time is (milliseconds, ``Z``)."""
    _, _, alice_client = registered("alice")
    _, bob_name, _ = registered("bob")
    cid = chat(alice_client, bob_name)
    listed(alice_client)  # fills the card
    r = redis.Redis.from_url(servers.redis_url)
    card = json.loads(r.get(conversation_card_key(cid)) or b"{}")
    card["created_at"] = "2026-11-28T17:40:56.373912+00:00"
    card["updated_at"] = "2026-11-28T17:40:57.000001+00:00"
    r.set(conversation_card_key(cid), json.dumps(card), ex=600)
    row = listed(alice_client)[cid]
    assert row["created_at"] == "2026-11-28T17:40:56.373Z"
    assert row["updated_at"] == "2026-11-28T17:40:57.000Z"


def test_the_windows_unread_count_is_kept_per_user_and_right_after_every_change(servers: Servers) -> None:
    """The list keeps each conversation's window count per user with the last seq, cursor and floor it was
    counted at (api/conversation_list.py): a send, an edit, a delete and a read each change the count at once,
    and an unchanged conversation's count is the kept one (a kept count with a stale signature is not used)."""
    alice, _, alice_client = registered("alice")
    _, bob_name, bob_client = registered("bob")
    ab = chat(alice_client, bob_name)
    r = redis.Redis.from_url(servers.redis_url)
    kept = recent_unread_key(partition_of(ab), ab)

    def send(client: APIClient, text: str) -> tuple[str, int]:
        sent = client.post(f"/api/v1/conversations/{ab}/messages",
                           {"content": text, "client_msg_id": uuid.uuid4().hex}, format="json")
        assert sent.status_code == 201, sent.content
        return str(sent.json()["id"]), int(sent.json()["seq"])

    def unread() -> int:
        return int(listed(alice_client)[ab]["unread"])

    first, _ = send(bob_client, "one")
    send(bob_client, "two")
    send(alice_client, "mine")
    # Her first count comes from the window's counts (nothing read nor deleted since it was born: every message
    # but hers), not a walk of its documents: one marked deleted behind the append script's back is not seen.
    docs = recent_docs_key(partition_of(ab), ab)
    r.hset(docs, first, (r.hget(docs, first) or b"{").replace(b"{", b'{"deleted":true,', 1))
    assert unread() == 2
    kind, last, cursor, count, *counts = (r.hget(kept, alice) or b"").decode().split(":")
    assert (kind, int(cursor), int(count)) == ("e", 0, 2) and int(last) == 3 and 0 < r.ttl(kept) <= 86400
    assert [int(x) for x in counts[1:]] == [3, 1]  # the window's messages and hers when counted (docs/adr/0059)
    memory = r.memory_usage(kept)
    assert memory is not None and memory <= 200, memory  # docs/storage.md's budget: ~100 bytes a user
    # The kept count is what an unchanged conversation answers (planted: 7 under the same last seq and cursor) ...
    r.hset(kept, alice, ":".join(["e", last, cursor, "7", *counts]))
    assert unread() == 7
    # ... new messages advance it by the window's counts, the window not walked again (7 + 1; her own adds
    # nothing) ...
    _, three = send(bob_client, "three")
    assert unread() == 8
    send(alice_client, "mine too")
    assert unread() == 8
    assert bob_client.patch(f"/api/v1/messages/{first}", {"content": "one!"}, format="json").status_code == 200
    assert unread() == 8
    # ... and a deletion (docs/adr/0059: ``dseq``) or a read counts it again: the true counts.
    assert bob_client.delete(f"/api/v1/messages/{first}").status_code == 200
    assert unread() == 2
    read = alice_client.post(f"/api/v1/conversations/{ab}/read", {"seq": three - 1}, format="json")
    assert read.status_code == 200, read.content
    assert unread() == 1
