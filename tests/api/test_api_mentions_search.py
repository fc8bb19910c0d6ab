"""Mentions and search over REST, against the session's Redis and FerretDB: the mention count beside unread
and its reset, ``GET /mentions`` (only the caller's, paged), history carrying mentions before and after the
real drain, and search that never returns another user's messages, pages, and refuses bad input with its
documented codes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from django.core.management import call_command

from api.finders import SEARCH_QUERY_MAX_CHARS, SEARCH_TERMS_MAX, search_match
from core.keys import partition_of, recent_docs_key, recent_key
from tests.support.api import Account, account, error_code, persist

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def group(owner: Account, *others: Account) -> str:
    """A group made over REST (which indexes the members' usernames); the test accounts are made straight in
    MongoDB, so the owner's comes from ``manage.py usernames_index``, as for any account made before it."""
    call_command("usernames_index")
    response = owner.client.post("/api/v1/chats/group", {"name": "g", "members": [o.username for o in others]},
                                 format="json")
    assert response.status_code == 201, response.content
    return str(response.json()["conversation_id"])


def send(a: Account, cid: str, content: str) -> dict[str, Any]:
    response = a.client.post(f"/api/v1/conversations/{cid}/messages",
                             {"content": content, "client_msg_id": uuid.uuid4().hex}, format="json")
    assert response.status_code == 201, response.content
    return dict(response.json())


def card(a: Account, cid: str) -> dict[str, Any]:
    return dict(a.client.get(f"/api/v1/conversations/{cid}").json())


def test_mention_count_beside_unread_resets_on_read_and_history_carries_mentions(servers: Any) -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    cid = group(alice, bob, carol)
    first = send(alice, cid, f"@{bob.username} look")
    send(alice, cid, "no one")
    third = send(carol, cid, f"@{bob.username} and @{alice.username}")
    assert (card(bob, cid)["unread"], card(bob, cid)["mentions"]) == (3, 2)
    assert card(alice, cid)["mentions"] == 1 and card(carol, cid)["mentions"] == 0
    listed = {c["id"]: c for c in bob.client.get("/api/v1/conversations").json()["results"]}
    assert listed[cid]["mentions"] == 2
    # Reading past the first mention leaves one; past the last, none.
    bob.client.post(f"/api/v1/conversations/{cid}/read", {"seq": first["seq"]}, format="json")
    assert card(bob, cid)["mentions"] == 1
    bob.client.post(f"/api/v1/conversations/{cid}/read", {"seq": third["seq"]}, format="json")
    assert (card(bob, cid)["unread"], card(bob, cid)["mentions"]) == (0, 0)
    url = f"/api/v1/conversations/{cid}/messages"
    from_window = [m["mentions"] for m in bob.client.get(url).json()["results"]]
    assert from_window == [[bob.id], [], [bob.id, alice.id]]
    persist(servers, cid)
    import redis

    from core.keys import partition_of, recent_docs_key, recent_key
    r = redis.Redis.from_url(servers.redis_url)
    r.delete(recent_key(partition_of(cid), cid), recent_docs_key(partition_of(cid), cid))  # the store serves it
    assert [m["mentions"] for m in bob.client.get(url).json()["results"]] == from_window


def test_mentions_list_is_the_callers_own_newest_first_and_paged() -> None:
    alice, bob, eve = account("alice"), account("bob"), account("eve")
    cid = group(alice, bob)
    other = group(eve, bob)
    sent = [send(alice, cid, f"@{bob.username} #{i}") for i in range(3)]
    sent.append(send(eve, other, f"hey @{bob.username}"))
    send(alice, cid, "nothing")
    page = bob.client.get("/api/v1/mentions", {"limit": 2}).json()
    assert [m["message_id"] for m in page["results"]] == [sent[3]["id"], sent[2]["id"]]
    assert page["has_more"] is True
    assert page["results"][1]["content"] == f"@{bob.username} #2" and page["results"][1]["conversation_id"] == cid
    rest = bob.client.get("/api/v1/mentions", {"limit": 2, "before": page["results"][1]["cursor"]}).json()
    assert [m["message_id"] for m in rest["results"]] == [sent[1]["id"], sent[0]["id"]]
    assert rest["has_more"] is False
    # Nobody else sees bob's mentions; eve, removed from nothing, has none.
    assert eve.client.get("/api/v1/mentions").json() == {"results": [], "has_more": False}
    assert alice.client.get("/api/v1/mentions").json()["results"] == []
    # A deleted message stays listed as deleted; leaving a group drops its mentions from the list.
    alice.client.delete(f"/api/v1/messages/{sent[0]['id']}")
    last = bob.client.get("/api/v1/mentions").json()["results"][-1]
    assert (last["message_id"], last["deleted"], last["content"]) == (sent[0]["id"], True, "")
    group_id = bob.client.get(f"/api/v1/conversations/{other}").json()["group_id"]
    assert bob.client.post(f"/api/v1/chats/group/{group_id}/leave").status_code in (200, 204)
    assert sent[3]["id"] not in [m["message_id"] for m in bob.client.get("/api/v1/mentions").json()["results"]]
    bad = bob.client.get("/api/v1/mentions", {"before": "{\"$gt\": \"\"}"})
    assert bad.status_code == 400 and error_code(bad) == "invalid"


def test_search_finds_only_the_callers_messages_newest_first_with_highlights(servers: Any) -> None:
    alice, bob, eve = account("alice"), account("bob"), account("eve")
    shared = group(alice, bob)
    private = group(eve)  # eve alone: her words must never reach alice or bob
    secret = group(eve, alice)  # alice sees this one, bob does not
    older = send(alice, shared, "The Quokka smiles")
    persist(servers, shared)  # one hit from the store (its bucket), the others from the recent window
    r = redis.Redis.from_url(servers.redis_url)
    r.delete(recent_key(partition_of(shared), shared), recent_docs_key(partition_of(shared), shared))
    send(eve, private, "quokka smiles in private")
    send(eve, secret, "quokka smiles for alice")
    send(bob, shared, "nothing here")
    newer = send(bob, shared, "quokka-smiles twice: QUOKKA")
    found = bob.client.get("/api/v1/search", {"q": "quokka SMILES"}).json()
    assert [h["message_id"] for h in found["results"]] == [newer["id"], older["id"]]
    assert found["next_cursor"] is None
    hit = found["results"][0]
    assert [hit["content"][s:e] for s, e in hit["highlights"]] == ["quokka", "smiles", "QUOKKA"]
    assert {h["conversation_id"] for h in alice.client.get("/api/v1/search", {"q": "quokka"}).json()["results"]} \
        == {shared, secret}
    assert [h["conversation_id"] for h in eve.client.get("/api/v1/search", {"q": "smiles private"}).json()
            ["results"]] == [private]
    # Whole words only; a deleted message is not found.
    assert bob.client.get("/api/v1/search", {"q": "quok"}).json()["results"] == []
    bob.client.delete(f"/api/v1/messages/{newer['id']}")
    assert [h["message_id"] for h in bob.client.get("/api/v1/search", {"q": "quokka"}).json()["results"]] \
        == [older["id"]]


def test_search_pages_with_a_cursor_owned_by_the_caller() -> None:
    alice, bob = account("alice"), account("bob")
    cid = group(alice, bob)
    sent = [send(alice, cid, f"wombat {i}") for i in range(5)]
    first = bob.client.get("/api/v1/search", {"q": "wombat", "limit": 2}).json()
    assert [h["message_id"] for h in first["results"]] == [sent[4]["id"], sent[3]["id"]]
    assert first["next_cursor"]
    second = bob.client.get("/api/v1/search", {"q": "wombat", "limit": 2, "cursor": first["next_cursor"]}).json()
    assert [h["message_id"] for h in second["results"]] == [sent[2]["id"], sent[1]["id"]]
    third = bob.client.get("/api/v1/search", {"q": "wombat", "limit": 2, "cursor": second["next_cursor"]}).json()
    assert [h["message_id"] for h in third["results"]] == [sent[0]["id"]]
    # Another user's cursor, or another query's, is refused.
    stolen = alice.client.get("/api/v1/search", {"q": "wombat", "cursor": first["next_cursor"]})
    assert stolen.status_code == 400 and error_code(stolen) == "invalid_cursor"
    other_query = bob.client.get("/api/v1/search", {"q": "quokka", "cursor": first["next_cursor"]})
    assert other_query.status_code == 400 and error_code(other_query) == "invalid_cursor"


def test_search_refuses_bad_input_with_its_codes(settings: Any) -> None:
    bob = account("bob")
    cases = [
        ({"q": "x" * (SEARCH_QUERY_MAX_CHARS + 1)}, "query_too_long"),
        ({"q": " ".join(f"w{i}" for i in range(SEARCH_TERMS_MAX + 1))}, "too_many_terms"),
        ({"q": "  !!  "}, "invalid_query"),
        ({}, "invalid"),
        ({"q": "ok", "limit": "many"}, "invalid"),
        ({"q": "ok", "cursor": "{\"$gt\": \"\"}"}, "invalid_cursor"),
        ({"q": "ok", "sort": "x"}, "invalid"),
    ]
    for query, code in cases:
        response = bob.client.get("/api/v1/search", query)
        assert response.status_code == 400 and error_code(response) == code, (query, response.content)
    settings.API_RATE_SEARCH_USER = "3/m"
    codes = [bob.client.get("/api/v1/search", {"q": "fine"}).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    limited = bob.client.get("/api/v1/search", {"q": "fine"})
    assert error_code(limited) == "rate_limited" and limited["Retry-After"]


def test_search_match_is_whole_words_of_every_term() -> None:
    assert search_match("Hello, World", ["hello", "world"]) == [(0, 5), (7, 12)]
    assert search_match("Hello", ["hello", "world"]) is None
    assert search_match("héllo wörld", ["wörld"]) == [(6, 11)]


def test_search_walks_stored_buckets_across_conversations_page_by_page(servers: Any, monkeypatch: Any) -> None:
    """With a budget of one bucket read per request, following the cursor still returns every hit exactly
    once, newest first, across conversations interleaved in time and across the window/bucket seam."""
    from api import finders

    alice, bob = account("alice"), account("bob")
    first, second = group(alice, bob), group(bob, alice)
    sent = []
    for i in range(130):
        sent.append(send(alice if i % 3 else bob, first if i % 2 else second, f"otter {i}" if i % 4 else f"seal {i}"))
    r = redis.Redis.from_url(servers.redis_url)
    for cid in (first, second):
        persist(servers, cid)
        r.delete(recent_key(partition_of(cid), cid), recent_docs_key(partition_of(cid), cid))
    tail = [send(alice, first, "otter late"), send(alice, second, "otter later")]  # in the new windows
    monkeypatch.setattr(finders, "SEARCH_BUCKET_READS", 1)
    monkeypatch.setattr(finders, "SEARCH_BUCKET_READS_MIN", 1)
    got, cursor, pages = [], None, 0
    while True:
        query = {"q": "otter", "limit": 7, **({"cursor": cursor} if cursor else {})}
        page = bob.client.get("/api/v1/search", query).json()
        got += [(h["timestamp"], h["message_id"]) for h in page["results"]]
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None or pages > 400:
            break
    expected = [m["id"] for m in reversed(sent) if m["content"].startswith("otter")]
    # Every hit once; newest first by time (two conversations' messages may share a millisecond, so the order
    # of sends is not the order of times).
    assert sorted(i for _t, i in got) == sorted([tail[0]["id"], tail[1]["id"], *expected])
    assert [t for t, _i in got] == sorted((t for t, _i in got), reverse=True)
    assert pages > len(got) // 7  # the budget really cut pages short


def test_an_edit_moves_the_mention_over_rest_and_a_lost_removal_stays_hidden(servers: Any) -> None:
    from core.mention_index import mention_record_commands

    alice, bob, carol = account("alice"), account("bob"), account("carol")
    cid = group(alice, bob, carol)
    sent = send(alice, cid, f"ping @{bob.username}")
    assert card(bob, cid)["mentions"] == 1
    edited = alice.client.patch(f"/api/v1/messages/{sent['id']}", {"content": f"ping @{carol.username}"},
                                format="json")
    assert edited.status_code == 200
    assert (card(bob, cid)["mentions"], card(carol, cid)["mentions"]) == (0, 1)
    assert bob.client.get("/api/v1/mentions").json()["results"] == []
    assert [m["message_id"] for m in carol.client.get("/api/v1/mentions").json()["results"]] == [sent["id"]]
    # The removal lost (a process died after the edit's append): bob's list still holds the message, but it
    # does not name him now, so it is not listed; after the drain the store says the same.
    r = redis.Redis.from_url(servers.redis_url)
    for command in mention_record_commands(conversation_id=cid, message_id=sent["id"], seq=sent["seq"],
                                           timestamp=sent["timestamp"], user_ids=[bob.id]):
        r.execute_command(*command)
    assert bob.client.get("/api/v1/mentions").json()["results"] == []
    persist(servers, cid)
    r.delete(recent_key(partition_of(cid), cid), recent_docs_key(partition_of(cid), cid))
    assert bob.client.get("/api/v1/mentions").json()["results"] == []
    assert [m["mentions"] for m in carol.client.get(f"/api/v1/conversations/{cid}/messages").json()["results"]] \
        == [[carol.id]]
