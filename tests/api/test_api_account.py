"""Password change (POST /auth/password) and account removal (DELETE /users/me) over REST, against the real
Redis and FerretDB of the test plugin. The two-broker socket closing and the gateway's refusals are in
tests/gateway/test_security.py."""

from __future__ import annotations

import uuid

import pytest
import redis
from bson import ObjectId

from chatstream_site.localservers import Servers
from core.documents import Conversation, GroupChat, User
from core.keys import REVOKED_USER_PREFIX as USER_PREFIX
from core.tokens import token_decode, token_issue
from tests.support.api import PASSWORD, account, anonymous, error_code

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")

NEW_PASSWORD = "another-horse-battery-7"


def login(username: str, password: str = PASSWORD, *, ip: str = "2001:db8::7"):
    return anonymous().post("/api/v1/auth/login", {"username": username, "password": password}, format="json",
                            HTTP_X_FORWARDED_FOR=ip)


def bearer(access: str):
    client = anonymous()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    return client


def test_a_password_change_refuses_every_older_token_and_returns_a_working_pair(servers: Servers) -> None:
    user = account()
    other_device = login(user.username).json()  # a second session, not the caller's
    answer = user.client.post("/api/v1/auth/password", {"old_password": PASSWORD, "new_password": NEW_PASSWORD},
                              format="json")
    assert answer.status_code == 200, answer.content
    assert answer["Cache-Control"] == "no-store"
    fresh = answer.json()
    assert token_decode(fresh["access"], expected_type="access").gen == 1
    # Every refresh token issued before is refused (MongoDB's token_gen), every access token too (Redis).
    stale = anonymous().post("/api/v1/auth/refresh", {"refresh": other_device["refresh"]}, format="json")
    assert stale.status_code == 401 and error_code(stale) == "token_revoked"
    for access in (user.access, other_device["access"]):
        refused = bearer(access).get("/api/v1/users/me")
        assert refused.status_code == 401 and error_code(refused) == "token_revoked"
    assert bearer(fresh["access"]).get("/api/v1/users/me").status_code == 200
    rotated = anonymous().post("/api/v1/auth/refresh", {"refresh": fresh["refresh"]}, format="json")
    assert rotated.status_code == 200 and token_decode(rotated.json()["access"], expected_type="access").gen == 1
    assert login(user.username).status_code == 401
    assert login(user.username, NEW_PASSWORD).status_code == 200
    # The marker lives only as long as an access token can (refresh tokens are checked in MongoDB).
    ttl = redis.Redis.from_url(servers.redis_url).ttl(USER_PREFIX + user.id)
    assert 0 < ttl <= 15 * 60 + 31


def test_a_password_change_needs_the_old_password_and_a_strong_new_one() -> None:
    user = account()
    wrong = user.client.post("/api/v1/auth/password", {"old_password": "not-it", "new_password": NEW_PASSWORD},
                             format="json")
    assert wrong.status_code == 403 and error_code(wrong) == "wrong_password"
    weak = user.client.post("/api/v1/auth/password", {"old_password": PASSWORD, "new_password": "password"},
                            format="json")
    assert weak.status_code == 400 and weak.json()["error"]["details"]["field"] == "new_password"
    like_name = user.client.post("/api/v1/auth/password",
                                 {"old_password": PASSWORD, "new_password": user.username + "1"}, format="json")
    assert like_name.status_code == 400
    assert anonymous().post("/api/v1/auth/password", {"old_password": PASSWORD, "new_password": NEW_PASSWORD},
                            format="json").status_code == 401
    assert bearer(user.access).get("/api/v1/users/me").status_code == 200  # nothing changed


def test_guessing_the_old_password_backs_off_like_login(settings) -> None:
    settings.LOGIN_FREE_FAILURES = 2
    settings.LOGIN_BACKOFF_BASE_S = 60.0
    user = account()
    body = {"old_password": "guess", "new_password": NEW_PASSWORD}
    codes = [user.client.post("/api/v1/auth/password", body, format="json", HTTP_X_FORWARDED_FOR="2001:db8:9::1")
             .status_code for _ in range(3)]
    assert codes == [403, 403, 429]
    # Login shares the back-off of (username, client): the token thief's client cannot guess there either.
    assert login(user.username, ip="2001:db8:9::1").status_code == 429
    removal = user.client.delete("/api/v1/users/me", {"password": "guess"}, format="json",
                                 HTTP_X_FORWARDED_FOR="2001:db8:9::1")
    assert removal.status_code == 429


def test_removing_an_account_deactivates_it_and_keeps_its_messages_sender(servers: Servers) -> None:
    user, peer = account(), account()
    assert peer.client.post("/api/v1/users/me/contacts", {"username": user.username}, format="json").status_code == 201
    group = user.client.post("/api/v1/chats/group", {"name": "g", "members": [peer.username]}, format="json").json()
    refresh = login(user.username).json()["refresh"]
    wrong = user.client.delete("/api/v1/users/me", {"password": "not-it"}, format="json")
    assert wrong.status_code == 403 and error_code(wrong) == "wrong_password"
    removed = user.client.delete("/api/v1/users/me", {"password": PASSWORD}, format="json")
    assert removed.status_code == 204, removed.content

    assert login(user.username).status_code == 401
    assert anonymous().post("/api/v1/auth/refresh", {"refresh": refresh}, format="json").status_code == 401
    assert user.client.get("/api/v1/users/me").status_code == 401
    assert user.client.post("/api/v1/auth/ws-ticket").status_code == 401
    # The document stays (messages keep their sender id) with no password, no e-mail, no contacts.
    stored = User.objects(id=user.id).get()
    assert stored.deactivated_at is not None and stored.password.startswith("!") and not stored.contacts
    assert stored.email == f"{user.id}@removed.invalid"
    # The group was left through the leave path: the admin rights went to the remaining member.
    left = GroupChat.objects(id=group["group_id"]).get()
    assert left.members == [ObjectId(peer.id)] and left.admins == [ObjectId(peer.id)]
    assert Conversation.objects(id=group["conversation_id"]).get().members == [ObjectId(peer.id)]
    # Nobody finds or adds the removed account; its username stays reserved, its e-mail is free again.
    found = peer.client.get("/api/v1/users", {"username": user.username}).json()["results"]
    assert found == []
    assert peer.client.post("/api/v1/chats/single", {"username": user.username}, format="json").status_code == 404
    assert peer.client.post("/api/v1/chats/group", {"name": "h", "members": [user.username]},
                            format="json").status_code == 404
    email = f"{user.username}@example.com"
    again = anonymous().post("/api/v1/auth/register", {"username": user.username, "email": email,
                                                        "password": PASSWORD}, format="json")
    assert again.status_code == 409 and error_code(again) == "username_taken"
    fresh_name = "n" + uuid.uuid4().hex[:10]
    reuse = anonymous().post("/api/v1/auth/register", {"username": fresh_name, "email": email,
                                                        "password": PASSWORD}, format="json")
    assert reuse.status_code == 201, reuse.content


def test_an_access_token_of_an_older_generation_is_refused_even_if_its_jti_is_fresh() -> None:
    user = account()
    assert user.client.post("/api/v1/auth/password", {"old_password": PASSWORD, "new_password": NEW_PASSWORD},
                            format="json").status_code == 200
    # Minted after the change but with the old generation: the marker, not the jti list, refuses it.
    old_gen = token_issue(user_id=user.id, username=user.username, type="access", gen=0)
    assert bearer(old_gen).get("/api/v1/users/me").status_code == 401
    assert bearer(token_issue(user_id=user.id, username=user.username, type="access", gen=1)).get(
        "/api/v1/users/me").status_code == 200
