"""JWT and ticket rules (pure logic plus the session's real Redis for tickets)."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
import redis
import redis.asyncio
from django.conf import settings

from chatstream_site.localservers import Servers
from core.errors import Unauthenticated
from core.tokens import token_decode, token_issue, ws_ticket_consume, ws_ticket_issue


def test_round_trip_and_type_is_checked() -> None:
    token = token_issue(user_id="u1", username="alice", type="access")
    claims = token_decode(token, expected_type="access")
    assert (claims.user_id, claims.username, claims.type) == ("u1", "alice", "access")
    assert claims.expires_at - claims.issued_at == settings.JWT_ACCESS_TTL_S <= 900
    with pytest.raises(Unauthenticated, match="expected an refresh token"):
        token_decode(token, expected_type="refresh")


def test_expired_token_is_refused() -> None:
    token = token_issue(user_id="u1", username="a", type="access", now=time.time() - 3600)
    with pytest.raises(Unauthenticated) as err:
        token_decode(token, expected_type="access")
    assert err.value.code == "token_expired"


@pytest.mark.parametrize("forge", ["none", "wrong-key", "hs512", "garbage"])
def test_forged_tokens_are_refused(forge: str) -> None:
    claims = {"sub": "u1", "username": "a", "typ": "access", "jti": "j", "iat": int(time.time()),
              "exp": int(time.time()) + 60, "iss": "chatstream"}
    token = {
        "none": lambda: jwt.encode(claims, key=None, algorithm="none"),
        "wrong-key": lambda: jwt.encode(claims, "another-key-another-key-another-key!", algorithm="HS256"),
        "hs512": lambda: jwt.encode(claims, settings.JWT_SIGNING_KEY, algorithm="HS512"),
        "garbage": lambda: "not.a.token",
    }[forge]()
    with pytest.raises(Unauthenticated) as err:
        token_decode(token, expected_type="access")
    assert err.value.code == "token_invalid"


def test_ticket_works_exactly_once(servers: Servers) -> None:
    ticket = ws_ticket_issue(redis.Redis.from_url(servers.redis_url), user_id="u9", username="bob")

    async def consume_twice() -> tuple[object, object]:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            return (await ws_ticket_consume(client, ticket=ticket), await ws_ticket_consume(client, ticket=ticket))
        finally:
            await client.aclose()

    first, second = asyncio.run(consume_twice())
    assert first is not None and first.user_id == "u9" and first.username == "bob"
    assert second is None
