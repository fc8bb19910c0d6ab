"""Replies and reactions over REST (docs/adr/0037), through the real write path, the real drain, Redis and
FerretDB: a reply's quote in the send's answer and in history (from the recent window and from the store, kept
up to date when the original is deleted); reactions added and removed idempotently, with counts and who per
emoji in history and in ``GET /messages/{id}/reactions``, before and after the drain and after their Redis
state expired; the limits, bad input and strangers, each with its documented error."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import pytest
import redis
from django.conf import settings as django_settings
from django.test import override_settings
from mongoengine.connection import get_db

from chatstream_site.localservers import Servers
from core.documents import bucket_id
from core.keys import partition_of, recent_docs_key
from core.keys import reactions_key as state_key
from messaging.replies import QUOTE_CHARS
from tests.support.api import Account, account, error_code, persist

# The defaults (CHATSTREAM_REACTION_EMOJI and the two limits); a test below changes them.
REACTION_EMOJI = list(django_settings.REACTION_EMOJI)
REACTIONS_PER_MESSAGE_MAX = int(django_settings.REACTIONS_PER_MESSAGE)
REACTIONS_PER_USER_MAX = int(django_settings.REACTIONS_PER_USER)

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def group(admin: Account, *members: Account) -> str:
    return str(admin.client.post("/api/v1/chats/group", {"name": "Feature", "members": [m.username for m in members]},
                                 format="json").json()["conversation_id"])


def send(a: Account, cid: str, content: str, reply_to: Any = None) -> Any:
    body: dict[str, Any] = {"content": content, "client_msg_id": uuid.uuid4().hex}
    if reply_to is not None:
        body["reply_to"] = reply_to
    return a.client.post(f"/api/v1/conversations/{cid}/messages", body, format="json")


def sent(a: Account, cid: str, content: str, reply_to: str | None = None) -> dict[str, Any]:
    response = send(a, cid, content, reply_to)
    assert response.status_code == 201, response.content
    return dict(response.json())


def history(a: Account, cid: str, **query: int) -> list[dict[str, Any]]:
    response = a.client.get(f"/api/v1/conversations/{cid}/messages", {"limit": 200, **query})
    assert response.status_code == 200, response.content
    return list(response.json()["results"])


def by_id(a: Account, cid: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in history(a, cid)}


def react(a: Account, mid: Any, emoji: Any) -> Any:
    return a.client.post(f"/api/v1/messages/{mid}/reactions", {"emoji": emoji}, format="json")


def unreact(a: Account, mid: str, emoji: str) -> Any:
    return a.client.delete(f"/api/v1/messages/{mid}/reactions/{quote(emoji)}")


def test_a_reply_quotes_its_original_in_the_answer_and_in_history_from_the_window_and_the_store(
        servers: Servers) -> None:
    alice, bob = account("alice"), account("bob")
    cid = group(alice, bob)
    long_text = "original " + "x" * 300
    with override_settings(RECENT_MESSAGES=3):
        original = sent(alice, cid, long_text)
        reply = sent(bob, cid, "a reply", reply_to=original["id"])
        quote_of_original = {"id": original["id"], "seq": original["seq"], "sender_id": alice.id,
                             "username": alice.username, "excerpt": long_text[:QUOTE_CHARS], "deleted": False}
        assert reply["reply_to"] == quote_of_original
        # A reply to a reply quotes the reply's own text only: quotes never nest.
        second = sent(alice, cid, "a reply to the reply", reply_to=reply["id"])
        assert second["reply_to"] == {"id": reply["id"], "seq": reply["seq"], "sender_id": bob.id,
                                      "username": bob.username, "excerpt": "a reply", "deleted": False}
        plain = sent(alice, cid, "not a reply")
        assert plain["reply_to"] is None
        # From the recent window, before any drain.
        page = by_id(bob, cid)
        assert page[reply["id"]]["reply_to"] == quote_of_original and page[plain["id"]]["reply_to"] is None
        assert page[second["id"]]["reply_to"]["excerpt"] == "a reply"
        # Persisted, then pushed out of the window: the same quotes come from the store.
        persist(servers, cid)
        for i in range(5):
            sent(alice, cid, f"filler {i}")
        persist(servers, cid)
        floor = int(redis.Redis.from_url(servers.redis_url).hget(recent_docs_key(partition_of(cid), cid), "floor"))
        assert floor >= second["seq"]  # the replies are below the window now
        stored = get_db().messages.find_one({"_id": reply["id"]})
        assert stored["reply_to"] == quote_of_original
        assert "reply_to" not in get_db().messages.find_one({"_id": plain["id"]})
        bucket = get_db().message_buckets.find_one({"_id": bucket_id(cid, reply["seq"])})
        assert bucket["m"][str(reply["seq"])]["reply_to"] == quote_of_original
        old = {m["id"]: m for m in history(bob, cid, before_seq=floor + 1)}
        assert old[reply["id"]]["reply_to"] == quote_of_original
        assert old[second["id"]]["reply_to"]["excerpt"] == "a reply"
        # The original is deleted: every quote of it says so at once (before the drain) and after it.
        assert alice.client.delete(f"/api/v1/messages/{original['id']}").status_code == 200
        gone = {**quote_of_original, "excerpt": "", "deleted": True}
        assert {m["id"]: m for m in history(bob, cid, before_seq=floor + 1)}[reply["id"]]["reply_to"] == gone
        persist(servers, cid)
        assert {m["id"]: m for m in history(bob, cid, before_seq=floor + 1)}[reply["id"]]["reply_to"] == gone
        # An edited original shows its new text in the quote.
        assert alice.client.patch(f"/api/v1/messages/{plain['id']}", {"content": "now edited"},
                                  format="json").status_code == 200
        answer = sent(bob, cid, "about the edit", reply_to=plain["id"])
        assert answer["reply_to"]["excerpt"] == "now edited"


def test_a_bad_reply_to_gets_its_documented_error_and_sends_nothing() -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    cid = group(alice, bob)
    elsewhere = group(carol, bob)
    theirs = sent(carol, elsewhere, "in another conversation")
    deleted = sent(alice, cid, "soon gone")
    assert alice.client.delete(f"/api/v1/messages/{deleted['id']}").status_code == 200
    before = len(history(alice, cid))
    for value, reason in ((theirs["id"], "not_found"), ("f" * 32, "not_found"), (deleted["id"], "deleted")):
        response = send(alice, cid, "reply", value)
        assert response.status_code == 400 and error_code(response) == "invalid", response.content
        assert response.json()["error"]["details"] == {"field": "reply_to", "reason": reason, "message_id": value}
    for value in ("not-an-id", 12, {"$gt": ""}, ["a" * 32], "A" * 32):
        response = send(alice, cid, "reply", value)
        assert response.status_code == 400 and error_code(response) == "invalid", (value, response.content)
        details = response.json()["error"]["details"]  # the serializer's (wrong type) or the write path's
        assert details.get("field") == "reply_to" or set(details.get("fields", {})) == {"reply_to"}, details
    assert len(history(alice, cid)) == before  # nothing was sent
    # A stranger cannot reply into the conversation at all.
    response = send(carol, cid, "hi", deleted["id"])
    assert response.status_code == 404 and error_code(response) == "not_found"


def test_reactions_are_idempotent_per_user_and_emoji_and_show_counts_and_who(servers: Servers) -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    cid = group(alice, bob, carol)
    mid = sent(alice, cid, "react to me")["id"]
    thumbs, heart = REACTION_EMOJI[0], REACTION_EMOJI[2]
    first = react(bob, mid, thumbs)
    assert first.status_code == 200, first.content
    assert {k: first.json()[k] for k in ("changed", "count", "user_ids", "emoji", "conversation_id")} == {
        "changed": True, "count": 1, "user_ids": [bob.id], "emoji": thumbs, "conversation_id": cid}
    again = react(bob, mid, thumbs).json()
    assert again["changed"] is False and again["seq"] is None and again["user_ids"] == [bob.id]
    assert react(alice, mid, thumbs).json()["user_ids"] == [bob.id, alice.id]
    assert react(carol, mid, heart).json()["seq"] == first.json()["seq"] + 2  # each change took one seq
    want = [{"emoji": thumbs, "count": 2, "user_ids": [bob.id, alice.id]},
            {"emoji": heart, "count": 1, "user_ids": [carol.id]}]
    assert by_id(carol, cid)[mid]["reactions"] == want
    assert bob.client.get(f"/api/v1/messages/{mid}/reactions").json()["results"] == want
    # Removing is idempotent too.
    removed = unreact(bob, mid, thumbs).json()
    assert removed["changed"] is True and removed["user_ids"] == [alice.id] and removed["count"] == 1
    assert unreact(bob, mid, thumbs).json()["changed"] is False
    want = [{"emoji": thumbs, "count": 1, "user_ids": [alice.id]}, {"emoji": heart, "count": 1, "user_ids": [carol.id]}]
    assert by_id(alice, cid)[mid]["reactions"] == want

    # The drain persists them (messages and buckets, by _id).
    persist(servers, cid)
    stored = get_db().messages.find_one({"_id": mid})
    assert sorted((r["emoji"], r["user_ids"]) for r in stored["reactions"]) == sorted(
        (r["emoji"], r["user_ids"]) for r in want)
    bucket = get_db().message_buckets.find_one({"_id": bucket_id(cid, 1)})
    assert sorted(r["emoji"] for r in bucket["m"]["1"]["reactions"]) == sorted([thumbs, heart])
    # The Redis state expires (a day after the last change): reads and the next change load it again.
    bus = redis.Redis.from_url(servers.redis_url)
    bus.delete(state_key(cid, mid))
    bus.hdel(recent_docs_key(partition_of(cid), cid), mid)  # and the window no longer holds the message
    assert bob.client.get(f"/api/v1/messages/{mid}/reactions").json()["results"] == want
    assert react(alice, mid, thumbs).json()["changed"] is False  # state loaded from the store: she has it
    assert react(bob, mid, heart).json()["user_ids"] == [carol.id, bob.id]
    persist(servers, cid)
    stored = {r["emoji"]: r["user_ids"] for r in get_db().messages.find_one({"_id": mid})["reactions"]}
    assert stored == {thumbs: [alice.id], heart: [carol.id, bob.id]}


def test_reaction_limits_bad_input_strangers_and_deleted_messages_get_their_errors() -> None:
    alice, bob, carol, stranger = account("alice"), account("bob"), account("carol"), account("stranger")
    cid = group(alice, bob, carol)
    mid = sent(alice, cid, "limits")["id"]
    for emoji in REACTION_EMOJI[:REACTIONS_PER_USER_MAX]:
        assert react(alice, mid, emoji).json()["changed"] is True
    over = react(alice, mid, REACTION_EMOJI[REACTIONS_PER_USER_MAX])
    assert over.status_code == 409 and error_code(over) == "reaction_limit"
    assert over.json()["error"]["details"] == {"scope": "user", "limit": REACTIONS_PER_USER_MAX}
    for emoji in REACTION_EMOJI[REACTIONS_PER_USER_MAX:REACTIONS_PER_MESSAGE_MAX]:
        assert react(bob, mid, emoji).json()["changed"] is True
    full = react(carol, mid, REACTION_EMOJI[REACTIONS_PER_MESSAGE_MAX])
    assert full.status_code == 409 and full.json()["error"]["details"] == {
        "scope": "message", "limit": REACTIONS_PER_MESSAGE_MAX}
    assert react(carol, mid, REACTION_EMOJI[0]).json()["count"] == 2  # an emoji already there is fine
    # Bad input: 400 invalid, nothing changes.
    for bad in ("+1", "", "👍👍", 5, {"$gt": ""}, None, ["👍"]):
        response = react(bob, mid, bad)
        assert response.status_code == 400 and error_code(response) == "invalid", (bad, response.content)
    assert error_code(unreact(bob, mid, "nope")) == "invalid"
    response = react(bob, "not-a-message", REACTION_EMOJI[0])
    assert response.status_code == 404
    # Strangers: 404 everywhere, as for a message that does not exist.
    for response in (react(stranger, mid, REACTION_EMOJI[0]), unreact(stranger, mid, REACTION_EMOJI[0]),
                     stranger.client.get(f"/api/v1/messages/{mid}/reactions"), react(bob, "e" * 32, "👍")):
        assert response.status_code == 404 and error_code(response) == "not_found", response.content
    assert "conversation_id" not in react(stranger, mid, REACTION_EMOJI[0]).json()["error"]["details"]
    # A deleted message takes no reaction and shows none.
    assert alice.client.delete(f"/api/v1/messages/{mid}").status_code == 200
    assert react(bob, mid, REACTION_EMOJI[0]).status_code == 404
    assert by_id(bob, cid)[mid]["reactions"] == []


@pytest.mark.django_db
def test_the_admin_shows_a_replys_quote_and_the_reactions_once_persisted(servers: Servers, admin_client: Any) -> None:
    alice, bob = account("alice"), account("bob")
    cid = group(alice, bob)
    original = sent(alice, cid, "the admin sees this quoted")
    reply = sent(bob, cid, "replying", reply_to=original["id"])
    assert react(alice, reply["id"], "🎉").json()["changed"] is True
    assert react(bob, reply["id"], "🎉").json()["changed"] is True
    persist(servers, cid)
    page = admin_client.get(f"/admin/api/mongomessage/{reply['id']}/").content.decode()
    assert "the admin sees this quoted" in page and original["id"] in page and alice.username in page
    assert "🎉 2" in page and f"{alice.id}, {bob.id}" in page
    listing = admin_client.get("/admin/api/mongomessage/", {"conversation": cid}).content.decode()
    assert "🎉 2" in listing and "↪ " + alice.username in listing


def test_the_reaction_set_and_limits_are_settings_and_listed_for_clients(settings: Any) -> None:
    settings.REACTION_EMOJI = ["🦆", "🐢", "🐙"]
    settings.REACTIONS_PER_MESSAGE, settings.REACTIONS_PER_USER = 2, 1
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    listed = alice.client.get("/api/v1/reactions").json()
    assert listed == {"emoji": ["🦆", "🐢", "🐙"], "per_message": 2, "per_user": 1}
    cid = group(alice, bob, carol)
    mid = sent(alice, cid, "configured")["id"]
    refused = react(alice, mid, "👍")  # a default emoji outside the configured set
    assert refused.status_code == 400 and refused.json()["error"]["details"]["allowed"] == ["🦆", "🐢", "🐙"]
    assert react(alice, mid, "🦆").json()["changed"] is True
    over = react(alice, mid, "🐢")
    assert over.status_code == 409 and over.json()["error"]["details"] == {"scope": "user", "limit": 1}
    assert react(bob, mid, "🐢").json()["changed"] is True
    full = react(carol, mid, "🐙")
    assert full.status_code == 409 and full.json()["error"]["details"] == {"scope": "message", "limit": 2}
    assert [r["emoji"] for r in bob.client.get(f"/api/v1/messages/{mid}/reactions").json()["results"]] \
        == ["🦆", "🐢"]
