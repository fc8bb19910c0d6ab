"""Accounts and tokens over REST: register, login, refresh rotation, logout, ws-ticket, rate limits."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
import redis
from django.conf import settings

from chatstream_site.localservers import Servers
from core.documents import User
from core.keys import TICKET_PREFIX
from core.tokens import token_issue
from tests.support.api import PASSWORD, account, anonymous, error_code

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def register(username: str, *, email: str | None = None, password: str = PASSWORD, ip: str = "2001:db8::1"):
    return anonymous().post("/api/v1/auth/register",
                            {"username": username, "email": email or f"{username}@example.com", "password": password},
                            format="json", HTTP_X_FORWARDED_FOR=ip)


def login(username: str, password: str = PASSWORD, *, ip: str = "2001:db8::1"):
    return anonymous().post("/api/v1/auth/login", {"username": username, "password": password}, format="json",
                            HTTP_X_FORWARDED_FOR=ip)


def test_register_login_refresh_logout_happy_path() -> None:
    name = f"Alice{uuid.uuid4().hex[:8]}"
    created = register(name)
    assert created.status_code == 201, created.content
    body = created.json()
    assert set(body) == {"id", "username", "email"} and body["username"] == name
    stored = User.objects(id=body["id"]).get()
    assert stored.password.startswith("argon2$argon2id$") and PASSWORD not in stored.password

    pair = login(name.upper())  # usernames are case-insensitive
    assert pair.status_code == 200, pair.content
    tokens = pair.json()
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] <= 900
    claims = jwt.decode(tokens["access"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 15 * 60

    me = anonymous()
    me.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    profile = me.get("/api/v1/users/me")
    assert profile.status_code == 200 and profile.json()["username"] == name

    rotated = anonymous().post("/api/v1/auth/refresh", {"refresh": tokens["refresh"]}, format="json")
    assert rotated.status_code == 200
    new = rotated.json()
    assert new["refresh"] != tokens["refresh"] and new["access"] != tokens["access"]

    out = me.post("/api/v1/auth/logout", {"refresh": new["refresh"]}, format="json")
    assert out.status_code == 204
    # Logged out: the refresh token is refused, and so is the access token that logged out.
    again = anonymous().post("/api/v1/auth/refresh", {"refresh": new["refresh"]}, format="json")
    assert again.status_code == 401 and error_code(again) == "token_revoked"
    assert me.get("/api/v1/users/me").status_code == 401


def test_reused_refresh_token_is_refused() -> None:
    user = account()
    refresh = token_issue(user_id=user.id, username=user.username, type="refresh")
    first = anonymous().post("/api/v1/auth/refresh", {"refresh": refresh}, format="json")
    assert first.status_code == 200
    second = anonymous().post("/api/v1/auth/refresh", {"refresh": refresh}, format="json")
    assert second.status_code == 401 and error_code(second) == "token_revoked"
    assert second["WWW-Authenticate"].startswith("Bearer")


def test_access_token_cannot_refresh_and_refresh_token_cannot_authenticate() -> None:
    user = account()
    wrong = anonymous().post("/api/v1/auth/refresh", {"refresh": user.access}, format="json")
    assert wrong.status_code == 401 and error_code(wrong) == "token_invalid"
    client = anonymous()
    client.credentials(HTTP_AUTHORIZATION="Bearer " + token_issue(user_id=user.id, username=user.username,
                                                                   type="refresh"))
    assert client.get("/api/v1/users/me").status_code == 401


@pytest.mark.parametrize("forge", ["none", "wrong-key", "expired", "garbage", "no-scheme"])
def test_forged_or_expired_access_tokens_are_refused(forge: str) -> None:
    user = account()
    now = int(time.time())
    claims = {"sub": user.id, "username": user.username, "typ": "access", "jti": uuid.uuid4().hex, "iat": now,
              "exp": now + 60, "iss": "chatstream"}
    header = {
        "none": lambda: "Bearer " + jwt.encode(claims, key=None, algorithm="none"),
        "wrong-key": lambda: "Bearer " + jwt.encode(claims, "x" * 40, algorithm="HS256"),
        "expired": lambda: "Bearer " + token_issue(user_id=user.id, username=user.username, type="access",
                                                   now=time.time() - 3600),
        "garbage": lambda: "Bearer not.a.jwt",
        "no-scheme": lambda: user.access,
    }[forge]()
    client = anonymous()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/users/me")
    assert response.status_code == 401
    assert error_code(response) in {"token_invalid", "token_expired"}


def test_anonymous_requests_are_401_with_the_error_body() -> None:
    response = anonymous().get("/api/v1/conversations")
    assert response.status_code == 401 and error_code(response) == "unauthenticated"


def test_login_failures_look_the_same() -> None:
    user = account()
    wrong = login(user.username, "not-the-password")
    unknown = login("nobody-" + uuid.uuid4().hex[:8])
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()


def test_duplicates_are_409() -> None:
    name = f"bob{uuid.uuid4().hex[:8]}"
    assert register(name).status_code == 201
    same_name = register(name.upper(), email=f"other-{name}@example.com")
    assert same_name.status_code == 409 and error_code(same_name) == "username_taken"
    same_email = register(f"x{name}", email=f"{name.upper()}@EXAMPLE.com")
    assert same_email.status_code == 409 and error_code(same_email) == "email_taken"


@pytest.mark.parametrize(
    "body",
    [
        {"username": "ab", "email": "a@example.com", "password": PASSWORD},
        {"username": "has space", "email": "a@example.com", "password": PASSWORD},
        {"username": "okname1", "email": "not-an-email", "password": PASSWORD},
        {"username": "okname2", "email": "b@example.com", "password": "short"},
        {"username": "okname3", "email": "c@example.com", "password": "password123"},  # too common
        {"username": "similarname", "email": "g@example.com", "password": "similarname1"},  # like the username
        {"username": {"$ne": None}, "email": "d@example.com", "password": PASSWORD},
        {"username": 12345, "email": "e@example.com", "password": PASSWORD},
        {"email": "f@example.com", "password": PASSWORD},
    ],
)
def test_register_refuses_bad_input(body: dict) -> None:
    response = anonymous().post("/api/v1/auth/register", body, format="json")
    assert response.status_code == 400, response.content
    assert error_code(response) == "invalid"


def test_login_refuses_operator_injection() -> None:
    response = anonymous().post("/api/v1/auth/login", {"username": {"$ne": None}, "password": {"$ne": None}},
                                format="json")
    assert response.status_code == 400 and error_code(response) == "invalid"


def test_ws_ticket_is_single_use_and_short_lived(servers: Servers) -> None:
    user = account()
    response = user.client.post("/api/v1/auth/ws-ticket")
    assert response.status_code == 200
    body = response.json()
    assert 0 < body["expires_in"] <= 30
    r = redis.Redis.from_url(servers.redis_url)
    assert 0 < r.ttl(TICKET_PREFIX + body["ticket"]) <= 30
    assert anonymous().post("/api/v1/auth/ws-ticket").status_code == 401


def test_failed_logins_back_off_per_username_and_client_and_the_owner_elsewhere_gets_in(settings) -> None:
    settings.LOGIN_FREE_FAILURES = 3
    settings.LOGIN_BACKOFF_BASE_S = 60.0
    user = account()
    attacker = f"2001:db8:{uuid.uuid4().hex[:4]}::1"
    codes = [login(user.username, "wrong-password", ip=attacker).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]  # the third failure starts a 60 s back-off
    limited = login(user.username, ip=attacker)  # even the right password, from the attacker's client
    assert limited.status_code == 429 and int(limited["Retry-After"]) >= 1
    assert error_code(limited) == "rate_limited"
    # The same /64 is the same client; another client, the owner's, is not affected.
    assert login(user.username, ip=attacker.replace("::1", "::2")).status_code == 429
    assert login(user.username, ip=f"2001:db8:{uuid.uuid4().hex[:4]}::1").status_code == 200

    settings.API_RATE_LOGIN_IP = "2/m"
    ip = f"2001:db8::{uuid.uuid4().hex[:4]}"
    codes = [login(f"someone{i}-{uuid.uuid4().hex[:6]}", ip=ip).status_code for i in range(3)]
    assert codes == [401, 401, 429]


def test_register_is_rate_limited_per_ip(settings) -> None:
    settings.API_RATE_REGISTER_IP = "1/h"
    ip = f"2001:db8::{uuid.uuid4().hex[:4]}"
    assert register(f"r{uuid.uuid4().hex[:8]}", ip=ip).status_code == 201
    response = register(f"r{uuid.uuid4().hex[:8]}", ip=ip)
    assert response.status_code == 429 and error_code(response) == "rate_limited"


def test_access_token_lifetime_is_at_most_15_minutes() -> None:
    assert settings.JWT_ACCESS_TTL_S <= 900


def test_client_ip_believes_x_forwarded_for_only_from_trusted_proxies() -> None:
    from types import SimpleNamespace

    from api.ratelimit import client_ip

    via_gateway = SimpleNamespace(META={"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "spoof, 2001:db8::7"})
    direct = SimpleNamespace(META={"REMOTE_ADDR": "2001:db8::9", "HTTP_X_FORWARDED_FOR": "2001:db8::7"})
    assert client_ip(via_gateway) == "2001:db8::7"
    assert client_ip(direct) == "2001:db8::9"


def test_a_password_like_the_username_is_a_400_not_a_500() -> None:
    name = "sender" + uuid.uuid4().hex[:6]
    response = register(name, password=name + "1")
    assert response.status_code == 400, response.content
    assert error_code(response) == "invalid" and "similar" in response.json()["error"]["message"]
