"""Security hardening (issue 14, docs/security.md): one test per finding, each against real processes —
a real gateway (``manage.py role gateway``) in front of stand-in upstreams that report what reached them
(chatstream_site/localstandin.py), real brokers and api instances. Run: ``pytest tests/gateway/test_security.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
import redis
import websockets
import websockets.exceptions
from bson import ObjectId
from django_ratelimit.core import _get_window

from chatstream_site.localcluster import wait_until
from chatstream_site.localfleet import Fleet, Proc, settle
from chatstream_site.localservers import Servers
from core.closecodes import CLOSE_SESSION_ENDED, CLOSE_TOO_MANY_SOCKETS
from core.documents import Conversation, GroupChat
from core.keys import partition_of, stream_key
from core.tokens import token_issue, ws_ticket_issue
from tests.support.gateway import stand_in_fleet
from tests.support.realtime import (
    brokers_running,
    connect,
    connect_user,
    group_create,
    send_frame,
    ticket_for,
    user_create,
)

pytestmark = pytest.mark.cluster

OUTSIDER = "127.0.0.31"  # a client address outside the admin networks


def stats(proc: Proc) -> dict[str, Any]:
    return dict(httpx.get(f"{proc.url}/__upstream/stats", timeout=5).json())


def raw_get(port: int, target: str, *, source: str = OUTSIDER) -> tuple[int, bytes]:
    """GET ``target`` byte for byte (HTTP clients normalise dot segments before sending); status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def edge(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A gateway with a wildcard host list (as docker-compose used to set) before a stand-in api and broker."""
    with stand_in_fleet(servers, tmp_path_factory.mktemp("security-edge"), db=12, brokers=1, ALLOWED_HOSTS="*",
                        CHATSTREAM_GATEWAY_ADMIN_NETWORKS="127.0.0.1/32") as fleet:
        yield fleet


# ------------------------------------------------------------------ critical: the Origin check stays on


def test_a_wildcard_host_list_does_not_switch_the_gateway_origin_check_off(edge: dict[str, Any]) -> None:
    gateway, broker = edge["gateway"], edge["broker"]
    before = stats(broker)["ws_handshakes"]

    async def scenario() -> None:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws/?ticket=x", origin="https://evil.example")
        assert refused.value.response.status_code == 403

    asyncio.run(scenario())
    assert stats(broker)["ws_handshakes"] == before
    assert any(e.get("reason") == "foreign_origin" for e in gateway.access_log())


def test_a_wildcard_host_list_does_not_switch_the_broker_origin_check_off(servers: Servers, tmp_path: Path) -> None:
    alice, _ = user_create()
    with brokers_running(tmp_path, 1, ALLOWED_HOSTS="*") as (broker,):
        async def scenario() -> None:
            url = f"{broker.url}?ticket={ticket_for(servers.redis_url, alice)}"
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                await websockets.connect(url, origin="https://evil.example")
            assert refused.value.response.status_code == 403

        asyncio.run(scenario())


# ------------------------------------------------------------------ high: route one path, forward the same


@pytest.mark.parametrize("target", [
    "/static/%2e%2e/admin/login/",  # the admin, from outside the admin networks
    "/static/%2E%2E/api/v1/users/me",  # the api, without a token
    "/static/..%2fadmin/login/",  # an encoded slash
    "/static/..%5cadmin/login/",  # an encoded backslash
    "/static/./x", "/static/../admin/login/", "/static//x",
    "/static/x%0a%7b%22event%22%3a%22access%22%7d",  # an encoded newline that would forge a log line upstream
])
def test_dot_segments_encoded_separators_and_newlines_are_refused_before_routing(
        edge: dict[str, Any], target: str) -> None:
    gateway, api = edge["gateway"], edge["api"]
    before = stats(api)["http"]
    status, body = raw_get(gateway.port, target)
    assert status == 400 and b'"invalid_path"' in body, (target, status, body[:200])
    assert stats(api)["http"] == before  # nothing reached the upstream
    assert not any(line.startswith('{"event":"access"}') for line in gateway.log().splitlines())


def test_the_upstream_receives_exactly_the_path_that_was_routed(edge: dict[str, Any]) -> None:
    gateway = edge["gateway"]
    status, body = raw_get(gateway.port, "/static/a%20b/c%25d.css")
    assert status == 200
    assert json.loads(body)["path"] == "/static/a b/c%d.css"


# ------------------------------------------------------------------ medium: logout closes live sockets


@pytest.fixture(scope="module")
def realtime(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two real brokers and a real api instance on one Redis database (the channel layer's)."""
    workdir = tmp_path_factory.mktemp("security-realtime")
    fleet = Fleet(servers, workdir, db=13, CHATSTREAM_LOGIN_BACKOFF_BASE="60")
    with brokers_running(workdir, 2, REDIS_URL=fleet.redis_url) as brokers:
        try:
            api = fleet.api(1)
            api.wait_healthy()
            yield {"brokers": brokers, "api": api, "redis_url": fleet.redis_url, "fleet": fleet}
        finally:
            fleet.stop()


def test_logout_closes_the_users_sockets_on_every_broker_with_4010(realtime: dict[str, Any]) -> None:
    brokers, api, redis_url = realtime["brokers"], realtime["api"], realtime["redis_url"]
    alice, alice_name = user_create()
    bob, _ = user_create()

    async def scenario() -> None:
        phone = await connect_user(brokers[0].url, redis_url, alice)
        laptop = await connect_user(brokers[1].url, redis_url, alice)
        other = await connect_user(brokers[0].url, redis_url, bob)
        refresh = token_issue(user_id=alice, username=alice_name, type="refresh")
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(f"{api.url}/api/v1/auth/logout", json={"refresh": refresh})
        assert answer.status_code == 204, answer.text
        assert await phone.recv_closed() == CLOSE_SESSION_ENDED
        assert await laptop.recv_closed() == CLOSE_SESSION_ENDED
        # Another user's socket on the same broker carries on.
        await other.send({"type": "ping", "ref": 1})
        assert (await other.recv_type("pong"))["ref"] == 1
        await other.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ medium: password change and account removal


@pytest.fixture(scope="module")
def account_gateway(realtime: dict[str, Any]) -> Proc:
    """A real gateway in front of the ``realtime`` fixture's real api instance."""
    fleet = realtime["fleet"]
    gateway = fleet.gateway("gw-account")
    gateway.wait_healthy()
    fleet.wait_registered("api", 1)
    settle(1.5)
    return gateway


def _account_with_sockets(realtime: dict[str, Any], client_ip: str) -> tuple[str, str, dict[str, Any]]:
    """A registered user (real password hash) logged in through the real api: id, password, token pair."""
    api = realtime["api"]
    name, password = "p" + uuid.uuid4().hex[:10], "correct horse battery staple 9"
    headers = {"X-Forwarded-For": client_ip}
    with httpx.Client(base_url=api.url, timeout=10, headers=headers) as client:
        created = client.post("/api/v1/auth/register",
                              json={"username": name, "email": f"{name}@example.test", "password": password})
        assert created.status_code == 201, created.text
        pair = client.post("/api/v1/auth/login", json={"username": name, "password": password})
        assert pair.status_code == 200, pair.text
    return str(created.json()["id"]), password, dict(pair.json())


def _gateway_refused(gateway: Proc, access: str, path: str = "/api/v1/users/me") -> dict[str, Any]:
    """GET ``path`` through the gateway with ``access``: assert a 401 ``token_revoked`` that the gateway
    itself gave (its access log names no upstream for it)."""
    request_id = "refused-" + uuid.uuid4().hex
    answer = httpx.get(f"{gateway.url}{path}", timeout=10,
                       headers={"Authorization": f"Bearer {access}", "X-Request-Id": request_id})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "token_revoked", answer.text
    # The access log line is written after the answer is sent: wait (bounded) for it.
    entry = wait_until(lambda: next((e for e in gateway.access_log() if e["request_id"] == request_id), None),
                       timeout_s=10, interval_s=0.05, what="the gateway's access-log line of the request")
    assert entry["upstream"] is None and entry["reason"] == "token_revoked", entry
    return entry


def test_a_password_change_ends_every_session_and_keeps_the_caller_logged_in(
        realtime: dict[str, Any], account_gateway: Proc) -> None:
    brokers, api, redis_url = realtime["brokers"], realtime["api"], realtime["redis_url"]
    user_id, password, old = _account_with_sockets(realtime, "198.51.100.21")
    auth = {"Authorization": f"Bearer {old['access']}", "X-Forwarded-For": "198.51.100.21"}
    new_password = "another horse battery staple 7"

    async def scenario() -> dict[str, Any]:
        phone = await connect_user(brokers[0].url, redis_url, user_id)
        laptop = await connect_user(brokers[1].url, redis_url, user_id)
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            # A ticket fetched before the change (not used yet) must not open a socket after it.
            ticket = (await client.post("/api/v1/auth/ws-ticket", headers=auth)).json()["ticket"]
            wrong = await client.post("/api/v1/auth/password", headers=auth,
                                      json={"old_password": "not my password", "new_password": new_password})
            assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "wrong_password", wrong.text
            changed = await client.post("/api/v1/auth/password", headers=auth,
                                        json={"old_password": password, "new_password": new_password})
            assert changed.status_code == 200, changed.text
            assert changed.headers["cache-control"] == "no-store"
        assert await phone.recv_closed() == CLOSE_SESSION_ENDED
        assert await laptop.recv_closed() == CLOSE_SESSION_ENDED
        late = await connect(brokers[0].url, ticket, expect_ready=False)
        assert await late.recv_closed() == 4001
        return dict(changed.json())

    fresh = asyncio.run(scenario())
    with httpx.Client(base_url=api.url, timeout=10, headers={"X-Forwarded-For": "198.51.100.21"}) as client:
        stale = client.post("/api/v1/auth/refresh", json={"refresh": old["refresh"]})
        assert stale.status_code == 401 and stale.json()["error"]["code"] == "token_revoked", stale.text
        assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {old['access']}"}).status_code == 401
        # The pair returned to the caller works: its access token, and its refresh token once.
        me = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {fresh['access']}"})
        assert me.status_code == 200 and me.json()["id"] == user_id
        assert client.post("/api/v1/auth/refresh", json={"refresh": fresh["refresh"]}).status_code == 200
        name = me.json()["username"]
        assert client.post("/api/v1/auth/login", json={"username": name, "password": password}).status_code == 401
        assert client.post("/api/v1/auth/login",
                           json={"username": name, "password": new_password}).status_code == 200
    # The gateway refuses the old access token itself; the new one passes it.
    _gateway_refused(account_gateway, old["access"])
    through = httpx.get(f"{account_gateway.url}/api/v1/users/me", timeout=10,
                        headers={"Authorization": f"Bearer {fresh['access']}"})
    assert through.status_code == 200, through.text


def test_removing_an_account_ends_every_session_and_refuses_its_tokens(
        realtime: dict[str, Any], account_gateway: Proc) -> None:
    brokers, api, redis_url = realtime["brokers"], realtime["api"], realtime["redis_url"]
    user_id, password, pair = _account_with_sockets(realtime, "198.51.100.22")
    peer, _ = user_create()
    conversation = group_create([user_id, peer])  # the removed user is the group's only admin
    auth = {"Authorization": f"Bearer {pair['access']}", "X-Forwarded-For": "198.51.100.22"}

    async def scenario() -> None:
        phone = await connect_user(brokers[0].url, redis_url, user_id)
        laptop = await connect_user(brokers[1].url, redis_url, user_id)
        # Through the gateway: it forwards the DELETE's body (the password) to the api.
        async with httpx.AsyncClient(base_url=account_gateway.url, timeout=10) as client:
            wrong = await client.request("DELETE", "/api/v1/users/me", headers=auth, json={"password": "nope nope"})
            assert wrong.status_code == 403, wrong.text
            removed = await client.request("DELETE", "/api/v1/users/me", headers=auth, json={"password": password})
            assert removed.status_code == 204, removed.text
        assert await phone.recv_closed() == CLOSE_SESSION_ENDED
        assert await laptop.recv_closed() == CLOSE_SESSION_ENDED

    asyncio.run(scenario())
    with httpx.Client(base_url=api.url, timeout=10, headers={"X-Forwarded-For": "198.51.100.22"}) as client:
        name = jwt_username(pair["access"])
        login = client.post("/api/v1/auth/login", json={"username": name, "password": password})
        assert login.status_code == 401, login.text
        refresh = client.post("/api/v1/auth/refresh", json={"refresh": pair["refresh"]})
        assert refresh.status_code == 401, refresh.text
        assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {pair['access']}"}).status_code == 401
    _gateway_refused(account_gateway, pair["access"])
    # The group was left through the leave path: the remaining member inherited the admin rights.
    group = GroupChat.objects(members=ObjectId(peer)).get()
    assert ObjectId(user_id) not in group.members and group.admins == [ObjectId(peer)]
    assert Conversation.objects(id=conversation).get().members == [ObjectId(peer)]


def jwt_username(token: str) -> str:
    return str(pyjwt.decode(token, options={"verify_signature": False})["username"])


# ------------------------------------------------------------------ medium: nobody can lock the owner out


def test_wrong_passwords_from_anywhere_do_not_lock_the_owner_out(realtime: dict[str, Any]) -> None:
    api = realtime["api"]
    name, password = "o" + uuid.uuid4().hex[:10], "correct horse battery staple 9"
    owner = {"X-Forwarded-For": "198.51.100.10"}  # the api trusts the gateway's (127.0.0.1) forwarding header
    with httpx.Client(base_url=api.url, timeout=10) as client:
        created = client.post("/api/v1/auth/register", headers=owner,
                              json={"username": name, "email": f"{name}@example.test", "password": password})
        assert created.status_code == 201, created.text
        wrong = {"username": name, "password": "wrong-password"}
        # Eleven wrong passwords, one from each of eleven clients ...
        spread = [client.post("/api/v1/auth/login", json=wrong,
                              headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(11)]
        assert spread == [401] * 11
        # ... and a dozen from one client, which backs off (429 + Retry-After) after its free failures.
        one = [client.post("/api/v1/auth/login", json=wrong, headers={"X-Forwarded-For": "203.0.113.99"})
               for _ in range(12)]
        assert [r.status_code for r in one][:5] == [401] * 5 and one[-1].status_code == 429
        assert int(one[-1].headers["retry-after"]) >= 1
        right = client.post("/api/v1/auth/login", headers={"X-Forwarded-For": "203.0.113.99"},
                            json={"username": name, "password": password})
        assert right.status_code == 429  # the backing-off client waits, even with the right password
        # The owner, from their own client, gets in at once.
        mine = client.post("/api/v1/auth/login", headers=owner, json={"username": name, "password": password})
        assert mine.status_code == 200, mine.text
        assert "access" in mine.json()


# ------------------------------------------------------------------ medium: limits per user, not per socket


@pytest.fixture(scope="module")
def limits(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two gateways with small per-user limits before a stand-in api and two stand-in brokers."""
    with stand_in_fleet(servers, tmp_path_factory.mktemp("security-limits"), db=14, brokers=2, gateways=("gw1", "gw2"),
                        CHATSTREAM_GATEWAY_WS_MAX_SOCKETS_PER_USER="2", CHATSTREAM_GATEWAY_RATE_WS_USER_FRAMES="30/h",
                        # As behind a TLS-terminating load balancer on this host: its X-Forwarded-Proto is believed.
                        CHATSTREAM_GATEWAY_TRUSTED_PROXIES="127.0.0.1") as fleet:
        yield fleet


def _ws_url(limits: dict[str, Any], gateway: str, user_id: str) -> str:
    client = redis.Redis.from_url(limits["fleet"].redis_url)
    try:
        ticket = ws_ticket_issue(client, user_id=user_id, username="limited")
    finally:
        client.close()
    return f"ws://127.0.0.1:{limits[gateway].port}/ws/?ticket={ticket}"


def test_open_sockets_are_capped_per_user_across_gateways_with_4011(limits: dict[str, Any]) -> None:
    user = "u-socks-" + uuid.uuid4().hex[:8]

    async def scenario() -> None:
        first = await websockets.connect(_ws_url(limits, "gw1", user))
        second = await websockets.connect(_ws_url(limits, "gw2", user))
        for ws in (first, second):
            assert json.loads(await ws.recv())["type"] == "ready"
        third = await websockets.connect(_ws_url(limits, "gw1", user))
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(third.recv(), 20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_TOO_MANY_SOCKETS
        # Another user is not affected, and a closed socket frees its slot.
        other = await websockets.connect(_ws_url(limits, "gw1", "u-other-" + uuid.uuid4().hex[:8]))
        assert json.loads(await other.recv())["type"] == "ready"
        await first.close()
        # The gateway releases the slot once the close handshake is done: retry (bounded) until then.
        for _ in range(10):
            again = await websockets.connect(_ws_url(limits, "gw1", user))
            try:
                assert json.loads(await asyncio.wait_for(again.recv(), 20))["type"] == "ready"
                break
            except websockets.exceptions.ConnectionClosed as refused:
                assert refused.rcvd is not None and refused.rcvd.code == CLOSE_TOO_MANY_SOCKETS
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("the slot of the closed socket was never released")
        for ws in (second, other, again):
            await ws.close()

    asyncio.run(scenario())


def test_the_frame_budget_is_per_user_across_sockets_and_gateways(limits: dict[str, Any]) -> None:
    user = "u-frames-" + uuid.uuid4().hex[:8]
    edge = _get_window(user, 3600)  # the user's fixed window must not end during the test (counters reset)
    if edge - time.time() < 60:
        time.sleep(max(0.0, edge - time.time()) + 1)

    async def scenario() -> None:
        one = await websockets.connect(_ws_url(limits, "gw1", user))
        two = await websockets.connect(_ws_url(limits, "gw2", user))
        for ws in (one, two):
            assert json.loads(await ws.recv())["type"] == "ready"
        # 30 frames in all, 15 per socket (each far below its own per-socket limit of 60 in a burst) ...
        for i in range(15):
            await one.send(f"a{i}")
            await two.send(f"b{i}")
        for ws, last in ((one, "a14"), (two, "b14")):  # each frame was counted before it was relayed back
            while json.loads(await asyncio.wait_for(ws.recv(), 20)).get("data") != last:
                pass
        # ... and the 31st, on either socket, passes the user's budget: that socket is closed with 4008.
        await two.send("over")
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(two.recv(), 20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
        await one.close()

    asyncio.run(scenario())


def test_unauthenticated_routes_take_small_bodies_only(limits: dict[str, Any]) -> None:
    gateway, api = limits["gw1"], limits["api"]
    before = stats(api)["http"]
    big = b'{"username": "' + b"x" * 20_000 + b'"}'
    with httpx.Client(timeout=10) as client:
        refused = client.post(f"{gateway.url}/api/v1/auth/login", content=big,
                              headers={"Content-Type": "application/json"})
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "too_large"
        assert stats(api)["http"] == before
        token = token_issue(user_id="u-body", username="body", type="access")
        allowed = client.post(f"{gateway.url}/api/v1/users/me", content=big,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert allowed.status_code == 200 and allowed.json()["body_len"] == len(big)


def test_one_request_cannot_add_a_crowd_to_a_group(realtime: dict[str, Any]) -> None:
    api = realtime["api"]
    creator, creator_name = user_create()
    crowd = [user_create()[1] for _ in range(51)]
    token = token_issue(user_id=creator, username=creator_name, type="access")
    with httpx.Client(base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        refused = client.post("/api/v1/chats/group", json={"name": "crowd", "members": crowd})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "too_many_members"
        assert refused.json()["error"]["details"]["limit"] == 50
        created = client.post("/api/v1/chats/group", json={"name": "team", "members": crowd[:50]})
        assert created.status_code == 201, created.text


# ------------------------------------------------------------------ low: internal ports, web hardening


def test_a_broker_port_serves_its_own_routes_only(realtime: dict[str, Any]) -> None:
    broker = realtime["brokers"][0]
    with httpx.Client(base_url=f"http://127.0.0.1:{broker.port}", timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/admin/login/", "/api/v1/schema", "/api/v1/users/me", "/static/admin/css/base.css"):
            answer = client.get(path)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", path


def test_the_api_believes_x_forwarded_for_only_from_the_gateway(realtime: dict[str, Any]) -> None:
    api = realtime["api"]
    name = "x" + uuid.uuid4().hex[:10]
    wrong = {"username": name, "password": "wrong-password"}
    # A peer that is not a trusted proxy (127.0.0.31) cannot pose as new clients with a forged header: its
    # failures all count against its own address, and it backs off after the free ones.
    with httpx.Client(transport=httpx.HTTPTransport(local_address=OUTSIDER), base_url=api.url, timeout=10) as peer:
        codes = [peer.post("/api/v1/auth/login", json=wrong,
                           headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(7)]
    assert codes[:5] == [401] * 5 and codes[-1] == 429, codes


def test_token_responses_are_never_cached(realtime: dict[str, Any]) -> None:
    api = realtime["api"]
    name, password = "c" + uuid.uuid4().hex[:10], "correct horse battery staple 9"
    with httpx.Client(base_url=api.url, timeout=10, headers={"X-Forwarded-For": "198.51.100.77"}) as client:
        assert client.post("/api/v1/auth/register", json={"username": name, "email": f"{name}@example.test",
                                                          "password": password}).status_code == 201
        pair = client.post("/api/v1/auth/login", json={"username": name, "password": password})
        refreshed = client.post("/api/v1/auth/refresh", json={"refresh": pair.json()["refresh"]})
        ticket = client.post("/api/v1/auth/ws-ticket",
                             headers={"Authorization": f"Bearer {refreshed.json()['access']}"})
        for answer in (pair, refreshed, ticket):
            assert answer.status_code == 200, answer.text
            assert "no-store" in answer.headers.get("cache-control", ""), answer.request.url


def test_cookies_are_secure_and_hsts_is_sent_over_tls_only(realtime: dict[str, Any], limits: dict[str, Any]) -> None:
    api, gateway = realtime["api"], limits["gw1"]
    with httpx.Client(timeout=10) as client:
        plain = client.get(f"{api.url}/admin/login/")
        tls = client.get(f"{api.url}/admin/login/", headers={"X-Forwarded-Proto": "https"})
        assert "csrftoken" in plain.cookies and "csrftoken" in tls.cookies
        assert "secure" not in plain.headers["set-cookie"].lower()
        assert "; secure" in tls.headers["set-cookie"].lower()
        assert "strict-transport-security" not in client.get(f"{gateway.url}/healthz").headers
        over_tls = client.get(f"{gateway.url}/healthz", headers={"X-Forwarded-Proto": "https"})
        assert over_tls.headers["strict-transport-security"].startswith("max-age=")


def test_the_web_client_may_open_websockets_to_its_own_origin_only(limits: dict[str, Any]) -> None:
    gateway = limits["gw1"]
    page = httpx.get(f"{gateway.url}/", timeout=10)
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    sources = csp["connect-src"].split()
    assert "ws:" not in sources and "wss:" not in sources
    assert sources == ["'self'", f"ws://127.0.0.1:{gateway.port}"]


def test_a_resume_reads_each_partition_once_not_once_per_conversation(realtime: dict[str, Any]) -> None:
    broker, redis_url = realtime["brokers"][0], realtime["redis_url"]
    alice, _ = user_create()
    first = group_create([alice])
    partition = partition_of(first)
    conversations = [first]
    while len(conversations) < 20:  # twenty conversations that share one partition stream
        conversation_id = group_create([alice])
        if partition_of(conversation_id) == partition:
            conversations.append(conversation_id)
    client = redis.Redis.from_url(redis_url)

    async def scenario() -> dict[str, int]:
        sender = await connect_user(broker.url, redis_url, alice)
        for conversation_id in conversations:
            await sender.send(send_frame(conversation_id, "before the gap"))
            assert (await sender.recv_type("ack", "error"))["type"] == "ack"
        await sender.close()
        # 3,000 entries of another conversation in the same partition after them: each conversation's missed
        # event lies 3 pages (of 1,000) below the top of the stream.
        pipe = client.pipeline(transaction=False)
        other = str(ObjectId())
        for i in range(3000):
            pipe.xadd(stream_key(partition), {"c": other, "t": "message.new", "s": i + 1, "d": "{}"})
        pipe.execute()
        resumer = await connect_user(broker.url, redis_url, alice)
        # Counted from here: the connect itself reads the top of each subscribed partition (one entry each).
        before = client.info("commandstats").get("cmdstat_xrevrange", {}).get("calls", 0)
        await resumer.send({"type": "resume", "conversations": dict.fromkeys(conversations, 0)})
        resumed: dict[str, int] = {}
        while len(resumed) < len(conversations):
            frame = await resumer.recv_type("resumed", "error")
            assert frame["type"] == "resumed", frame
            resumed[frame["conversation_id"]] = frame["last_seq"]
        got = {m["conversation_id"] for m in resumer.seen if m["type"] == "message.new"}
        await resumer.close()
        assert got == set(conversations)  # every missed event was found ...
        after = client.info("commandstats")["cmdstat_xrevrange"]["calls"]
        return {"resumed_at_1": sum(1 for seq in resumed.values() if seq == 1), "xrevrange": after - before}

    outcome = asyncio.run(scenario())
    client.close()
    assert outcome["resumed_at_1"] == len(conversations)
    # ... with the partition read backwards once (4 pages), where one scan per conversation read it 20 times.
    assert outcome["xrevrange"] <= 6, outcome
