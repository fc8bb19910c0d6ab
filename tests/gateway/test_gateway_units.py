"""The gateway's pure parts and its in-process behaviour: identity signing, routes, rate-limit keys shared with
django-ratelimit, breakers and the least-outstanding choice, and the fast 503 that attempts no connect."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio
from django.test import RequestFactory
from django_ratelimit.core import get_usage

from chatstream_site.localservers import Servers, free_port
from core.identity import identity_headers, identity_strip, identity_verify
from core.registry import Instance
from core.tokens import TicketOwner
from gateway.asgi import STATE_KEY, RequestState
from gateway.auth import bearer_token
from gateway.middleware import REQUEST_ID_RE, ip_key, origin_allowed
from gateway.proxy import HttpProxy
from gateway.ratelimit import RateLimiter, rate_validate
from gateway.routes import path_checked, public_paths, route_match
from gateway.upstreams import OpenedState, Unavailable, UpstreamFailed, Upstreams

OWNER = TicketOwner(user_id="u-42", username="alice")

# ------------------------------------------------------------------ identity


def test_identity_round_trip_from_asgi_headers_and_from_a_mapping() -> None:
    signed = identity_headers(owner=OWNER, request_id="req-12345678")
    headers = [*signed, (b"x-request-id", b"req-12345678")]
    assert identity_verify(headers) == OWNER
    # Django's request.headers (a case-insensitive mapping of str) works the same.
    as_mapping = {k.decode().title(): v.decode() for k, v in headers}
    assert identity_verify(as_mapping) == OWNER


@pytest.mark.parametrize("tamper", ["user", "username", "request_id", "timestamp", "signature", "duplicate",
                                    "missing", "secret"])
def test_a_tampered_or_stale_identity_is_refused(tamper: str) -> None:
    now = time.time()
    signed = dict(identity_headers(owner=OWNER, request_id="req-12345678", now=now))
    signed[b"x-request-id"] = b"req-12345678"
    extra: list[tuple[bytes, bytes]] = []
    secret = None
    if tamper == "user":
        signed[b"x-chatstream-user-id"] = b"u-1"
    elif tamper == "username":
        signed[b"x-chatstream-username"] = b"mallory"
    elif tamper == "request_id":
        signed[b"x-request-id"] = b"req-other-id"
    elif tamper == "timestamp":
        signed[b"x-chatstream-identity-ts"] = str(int(now) - 3600).encode()
    elif tamper == "signature":
        signed[b"x-chatstream-identity-sig"] = b"0" * 64
    elif tamper == "duplicate":
        extra = [(b"x-chatstream-user-id", b"u-1")]
    elif tamper == "missing":
        del signed[b"x-chatstream-identity-sig"]
    elif tamper == "secret":
        secret = "another-secret-key-of-another-deployment-0123456789"
    assert identity_verify([*signed.items(), *extra], now=now, secret=secret) is None


def test_a_stale_signature_is_refused_even_when_genuine() -> None:
    signed = [*identity_headers(owner=OWNER, request_id="r" * 8, now=time.time() - 120), (b"x-request-id", b"r" * 8)]
    assert identity_verify(signed) is None
    assert identity_verify(signed, max_age_s=300) == OWNER


def test_client_identity_headers_are_stripped() -> None:
    headers = [(b"X-ChatStream-User-Id", b"evil"), (b"x-chatstream-identity-sig", b"x"), (b"accept", b"*/*")]
    assert identity_strip(headers) == [(b"accept", b"*/*")]


# ------------------------------------------------------------------ routes and small rules


def test_public_routes_are_listed_in_one_place_and_everything_else_is_protected() -> None:
    assert set(public_paths()) >= {"/healthz", "/readyz", "/", "/static/", "/api/v1/auth/register",
                                   "/api/v1/auth/login", "/api/v1/auth/refresh"}
    assert route_match("/api/v1/auth/login").auth == "public"
    assert route_match("/api/v1/auth/login/extra").auth == "jwt"
    assert route_match("/api/v1/auth/ws-ticket").auth == "jwt"
    assert route_match("/api/v1/conversations").auth == "jwt"
    assert route_match("/ws/").auth == "ticket"
    assert route_match("/admin/login/").target == "api"
    assert route_match("/etc/passwd") is None


def test_request_ids_bearer_tokens_origins_and_ip_keys() -> None:
    assert REQUEST_ID_RE.fullmatch(b"0b5e2c1a-9f7d-4a53-8f61-1d2e3f4a5b6c")
    for bad in (b"short", b"has space inside", b"line\nbreak-forged-log", b"x" * 200):
        assert not REQUEST_ID_RE.fullmatch(bad)
    assert bearer_token({"headers": [(b"authorization", b"Bearer abc.def")]}) == "abc.def"
    assert bearer_token({"headers": [(b"authorization", b"Basic Zm9v")]}) is None
    hosts = ["127.0.0.1", "localhost"]
    assert origin_allowed(None, allowed_hosts=hosts, allowed_origins=[])
    assert origin_allowed(b"http://localhost:8000", allowed_hosts=hosts, allowed_origins=[])
    assert not origin_allowed(b"http://evil.example", allowed_hosts=hosts, allowed_origins=[])
    assert not origin_allowed(b"null", allowed_hosts=hosts, allowed_origins=[])
    assert origin_allowed(b"https://app.example", allowed_hosts=hosts, allowed_origins=["https://app.example"])
    # A wildcard host list never switches the check off (docs/security.md): only named hosts and origins pass.
    assert not origin_allowed(b"http://evil.example", allowed_hosts=["*"], allowed_origins=[])
    assert origin_allowed(b"http://localhost", allowed_hosts=["*", "localhost"], allowed_origins=[])
    assert ip_key("2001:db8::1") == ip_key("2001:db8::ffff") == "2001:db8::"
    assert ip_key("10.1.2.3") == "10.1.2.3"
    with pytest.raises(ValueError):
        rate_validate("lots")


# ------------------------------------------------------------------ rate limits


def test_limiter_counts_where_django_ratelimit_reads_them(servers: Servers) -> None:
    """The same cache keys as django_ratelimit.core.get_usage on CACHES['default']: one shared counter."""
    group, value, rate = f"gw:test-{uuid.uuid4().hex}", "203.0.113.7", "3/h"

    async def hits(n: int) -> list[Any]:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        limiter = RateLimiter(client=client)
        try:
            return [await limiter.hit(group=group, rate=rate, value=value) for _ in range(n)]
        finally:
            await client.aclose()

    first = asyncio.run(hits(2))
    assert [u.count for u in first] == [1, 2] and all(u.shared and not u.should_limit for u in first)
    usage = get_usage(RequestFactory().get("/"), group=group, key=lambda g, r: value, rate=rate)
    assert usage is not None and usage["count"] == 2 and usage["limit"] == 3
    # The library's own increment lands on the same counter the gateway reads next.
    get_usage(RequestFactory().get("/"), group=group, key=lambda g, r: value, rate=rate, increment=True)
    (fourth,) = asyncio.run(hits(1))
    assert fourth.count == 4 and fourth.should_limit and 1 <= fourth.retry_after_s <= 3600


def test_limiter_fails_open_to_per_process_counts_when_redis_is_down() -> None:
    async def scenario() -> list[Any]:
        dead = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.25,
                                            socket_timeout=0.25)
        limiter = RateLimiter(client=dead)
        try:
            return [await limiter.hit(group="gw:test-down", rate="2/h", value="198.51.100.1") for _ in range(3)]
        finally:
            await dead.aclose()

    usages = asyncio.run(scenario())
    assert [u.shared for u in usages] == [False, False, False]
    assert [u.should_limit for u in usages] == [False, False, True]


# ------------------------------------------------------------------ load balancer and breakers


def _instance(n: int) -> Instance:
    return Instance(role="api", id=f"api-{n}-test", url=f"http://127.0.0.1:{free_port()}", started_at="", last_seen="")


def _upstreams(instances: list[Instance], *, open_s: float = 0.3) -> Upstreams:
    upstreams = Upstreams(client=redis.asyncio.Redis(), breaker_threshold=3, breaker_open_s=open_s)

    async def fixed(role: str | None = None, *, fresh: bool = False) -> list[Instance]:
        return [i for i in instances if role in (None, i.role)]

    upstreams.instances = fixed  # type: ignore[method-assign]
    return upstreams


async def _fail(upstreams: Upstreams, instance: Instance) -> None:
    with pytest.raises(UpstreamFailed):
        async with upstreams.attempt(instance, kind="http"):
            raise UpstreamFailed("connect")


def test_breaker_opens_after_threshold_probes_once_half_open_then_closes() -> None:
    a, b = _instance(1), _instance(2)

    async def scenario() -> None:
        upstreams = _upstreams([a, b])
        for _ in range(2):
            await _fail(upstreams, a)
        assert await upstreams.breaker_state(a.id) == "closed"  # two failures are not yet a dead instance
        await _fail(upstreams, a)
        assert await upstreams.breaker_state(a.id) == "opened"
        for _ in range(5):  # while open, only b is chosen, and a refuses attempts outright
            assert await upstreams.pick(role="api", kind="http") == b
        with pytest.raises(OpenedState):
            async with upstreams.attempt(a, kind="http"):
                pass
        await asyncio.sleep(0.35)  # past the open period: a may take one probe
        picks = set()
        # The probe is in flight, and b is busier than a: only the single-probe rule keeps requests off a.
        async with upstreams.attempt(a, kind="http"), upstreams.holding(b, kind="http"), \
                upstreams.holding(b, kind="http"):
            assert await upstreams.breaker_state(a.id) == "half-opened"
            for _ in range(4):
                picked = await upstreams.pick(role="api", kind="http")
                assert isinstance(picked, Instance)
                picks.add(picked.id)
        assert picks == {b.id}
        assert await upstreams.breaker_state(a.id) == "closed"  # the probe succeeded
        # A failed probe opens it again at once.
        for _ in range(3):
            await _fail(upstreams, a)
        await asyncio.sleep(0.35)
        await _fail(upstreams, a)
        assert await upstreams.breaker_state(a.id) == "opened"

    asyncio.run(scenario())


def test_least_outstanding_requests_and_open_connections_are_counted_separately() -> None:
    a, b = _instance(1), _instance(2)

    async def scenario() -> None:
        upstreams = _upstreams([a, b])
        async with upstreams.holding(a, kind="http"), upstreams.holding(a, kind="http"):
            assert {await upstreams.pick(role="api", kind="http") for _ in range(6)} == {b}
            # WebSockets are balanced by open connections only: a has none, so both are candidates.
            assert {(await upstreams.pick(role="api", kind="ws")).id for _ in range(6)} == {a.id, b.id}
        assert {(await upstreams.pick(role="api", kind="http")).id for _ in range(6)} == {a.id, b.id}

    asyncio.run(scenario())


def _http_scope(path: str) -> dict[str, Any]:
    state = RequestState(request_id="test-request-1")
    state.route = route_match(path)
    return {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [], "client": ("127.0.0.1", 5000), STATE_KEY: state}


def test_every_instance_open_or_gone_is_a_503_at_once_without_any_connect() -> None:
    a, b = _instance(1), _instance(2)

    async def scenario() -> tuple[list[dict[str, Any]], float, list[dict[str, Any]]]:
        upstreams = _upstreams([a, b], open_s=30)
        for instance in (a, b):
            for _ in range(3):
                await _fail(upstreams, instance)
        proxy = HttpProxy(upstreams=upstreams)

        async def no_connect(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the proxy tried to reach an upstream")

        proxy._send = no_connect  # type: ignore[method-assign]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            sent.append(message)

        started = time.perf_counter()
        await proxy(_http_scope("/api/v1/conversations"), receive, send)
        elapsed = time.perf_counter() - started
        gone: list[dict[str, Any]] = []

        async def send_gone(message: Any) -> None:
            gone.append(message)

        empty = HttpProxy(upstreams=_upstreams([]))
        empty._send = no_connect  # type: ignore[method-assign]
        await empty(_http_scope("/api/v1/conversations"), receive, send_gone)
        return sent, elapsed, gone

    sent, elapsed, gone = asyncio.run(scenario())
    for messages in (sent, gone):
        start = messages[0]
        assert start["status"] == 503
        retry_after = dict(start["headers"])[b"retry-after"]
        assert 1 <= int(retry_after) <= 30
    assert elapsed < 0.1  # the claim; no connect is attempted, so it is microseconds in practice
    assert isinstance(Unavailable(role="api", retry_after_s=1, instances=0), Unavailable)


def test_a_hanging_registry_read_never_holds_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.upstreams as module

    a = _instance(1)
    reads = 0

    async def registry_read(client: Any, *, role: str | None = None) -> list[Instance]:
        nonlocal reads
        reads += 1
        if reads > 1:  # Redis hangs from the second read on
            await asyncio.sleep(30)
        return [a]

    monkeypatch.setattr(module, "instances_list_async", registry_read)
    monkeypatch.setattr(module, "REGISTRY_REFRESH_S", 0.05)

    async def scenario() -> float:
        upstreams = Upstreams(client=redis.asyncio.Redis(), breaker_threshold=3, breaker_open_s=1)
        assert await upstreams.pick(role="api", kind="http") == a  # the first read is awaited
        await asyncio.sleep(0.1)  # now stale: the next call starts a background read that hangs
        started = time.perf_counter()
        for _ in range(3):
            assert await upstreams.pick(role="api", kind="http") == a  # the last known list
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.01)  # let the background read start (and hang)
        assert await upstreams.pick(role="api", kind="http") == a
        assert reads == 2  # one background read at a time
        return elapsed

    assert asyncio.run(scenario()) < 1.0


def test_websocket_pump_applies_back_pressure_and_passes_close_codes() -> None:
    """Through a real broker-side WebSocket server: the client's frames reach it framed and masked, its frames
    (a fragmented one too) and pings are handled by the link, a broker that does not take what is sent makes
    the gateway stop reading the client (no unbounded buffer), and the broker's close code reaches the client.
    Here the client's server is not uvicorn, so the broker's frames go out as ASGI messages (AsgiFrames)."""
    from websockets.asyncio.server import serve

    from gateway.wslink import link_open
    from gateway.wsproxy import _Session

    async def no_slot(slot: str | None) -> None:
        return None

    async def scenario() -> tuple[int, list[dict[str, Any]], list[str], list[str]]:
        got_by_broker: list[str] = []
        headers_seen: list[str] = []
        go_on = asyncio.Event()

        async def broker(ws: Any) -> None:
            headers_seen.append(ws.request.headers.get("X-Test", ""))
            await ws.ping()
            await ws.send(["to the ", "client"])  # a fragmented message
            got_by_broker.append(await ws.recv())
            await go_on.wait()
            await ws.close(4321, "bye")

        async with serve(broker, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            link = await link_open(host="127.0.0.1", port=port, target="/ws/?a=1", headers=[("X-Test", "yes")],
                                   subprotocols=[], origin=None, connect_timeout_s=2, answer_timeout_s=5)
            received_calls = 0
            sent_to_client: list[dict[str, Any]] = []
            closed = asyncio.Event()

            async def receive() -> dict[str, Any]:
                nonlocal received_calls
                received_calls += 1
                if received_calls > 1:
                    await closed.wait()  # the client sends one frame, then waits
                    return {"type": "websocket.disconnect", "code": 4321}
                return {"type": "websocket.receive", "text": "frame"}

            async def send(message: dict[str, Any]) -> None:
                sent_to_client.append(message)
                if message["type"] == "websocket.close":
                    closed.set()  # as uvicorn queues the disconnect when it sends a close

            link.pause_writing()  # the broker's socket is full: the client's first frame is written, then waits
            proxy = SimpleNamespace(pings=None, limiter=None, _slot_release=no_slot)  # no wheel, limiter, slots
            session = _Session(proxy, link, SimpleNamespace(ws=0), receive, send,
                               state=RequestState(request_id="r" * 8), slot=None)
            pump = asyncio.ensure_future(session.run())
            await asyncio.sleep(0.3)
            calls_while_blocked = received_calls
            link.resume_writing()
            await asyncio.sleep(0.2)
            go_on.set()
            await asyncio.wait_for(pump, 5)
            return calls_while_blocked, sent_to_client, got_by_broker, headers_seen

    calls_while_blocked, sent, got_by_broker, headers_seen = asyncio.run(scenario())
    assert calls_while_blocked == 1  # one frame read, then the gateway waits for the broker to take it
    assert got_by_broker == ["frame"] and headers_seen == ["yes"]
    assert sent[0] == {"type": "websocket.send", "text": "to the client"}
    assert sent[-1] == {"type": "websocket.close", "code": 4321, "reason": "bye"}


def test_the_broker_link_refuses_a_wrong_handshake_and_reports_a_refusal() -> None:
    from websockets.asyncio.server import serve
    from websockets.http11 import Response

    from gateway.wslink import HandshakeRefused, link_open

    async def scenario() -> int:
        def refuse(connection: Any, request: Any) -> Response:
            return connection.respond(403, "no\n")

        async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=refuse) as server:
            port = server.sockets[0].getsockname()[1]
            try:
                await link_open(host="127.0.0.1", port=port, target="/ws/", headers=[], subprotocols=[],
                                origin=None, connect_timeout_s=2, answer_timeout_s=5)
            except HandshakeRefused as exc:
                return exc.status
        return 0

    assert asyncio.run(scenario()) == 403


def test_a_connect_a_busy_loop_saw_late_is_not_a_broker_timeout_but_a_silent_broker_is() -> None:
    """uvloop runs due timers before it polls for I/O: a loop blocked past the connect timeout must not turn a
    connect the kernel finished into a timeout (which opened the broker's breaker in a wave, docs/adr/0044),
    while a connect that stays unanswered with the loop responsive still times out."""
    import uvloop
    from websockets.asyncio.server import serve

    from gateway.wslink import connected_within, link_open

    async def lagging() -> bool:
        async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            opening = asyncio.ensure_future(link_open(host="127.0.0.1", port=port, target="/ws/", headers=[],
                                                      subprotocols=[], origin=None, connect_timeout_s=0.2,
                                                      answer_timeout_s=5))
            await asyncio.sleep(0)  # the connect is under way ...
            time.sleep(0.6)  # ... and the loop is busy elsewhere, past the timeout
            link = await opening
            opened = link.opened is None and not link.handshaking()  # link_open returns only once open
            link.close()
            return opened

    async def silent() -> float:
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await connected_within(never, timeout_s=0.2, limit_s=5)
        assert never.cancelled()
        return time.monotonic() - started

    assert uvloop.run(lagging())
    assert 0.15 < uvloop.run(silent()) < 3


def test_only_canonical_paths_are_routed() -> None:
    for ok in ("/", "/api/v1/users/me", "/app/main.js", "/static/a b/c%d.css", "/api/v1/users/"):
        assert path_checked(raw_path=ok.encode(), path=ok) == ok
    for raw, decoded in ((b"/static/%2e%2e/admin/", "/static/../admin/"), (b"/static/..%2Fadmin/", "/static/../admin/"),
                         (b"/static/./x", "/static/./x"), (b"/a//b", "/a//b"), (b"/a%5cb", "/a\\b"),
                         (b"/a%0ab", "/a\nb"), (b"/a%00", "/a\x00"), (b"/a/..", "/a/..")):
        assert path_checked(raw_path=raw, path=decoded) is None, raw


def test_socket_slots_are_renewed_while_held_and_a_released_one_stays_released(servers: Servers) -> None:
    from core.keys import GATEWAY_SOCKETS_PREFIX as KEY_PREFIX
    from gateway.userlimits import SocketSlots

    async def scenario() -> tuple[int, int, float]:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        try:
            user = f"u-renew-{uuid.uuid4().hex[:8]}"
            slots = SocketSlots(client=client, cap=5, ttl_s=1.5)
            kept, released = await slots.acquire(user_id=user), await slots.acquire(user_id=user)
            assert kept is not None and released is not None
            await slots.release(released)
            await asyncio.sleep(2.5)  # past the TTL: only the renewal keeps the slot
            members = await client.zrange(KEY_PREFIX + user, 0, -1, withscores=True)
            await slots.release(kept)
            left = await client.zcard(KEY_PREFIX + user)
            return len(members), left, float(members[0][1]) - time.time() if members else 0.0
        finally:
            await client.aclose()

    held, left, ahead = asyncio.run(scenario())
    assert held == 1 and left == 0  # the released slot was not renewed back
    assert ahead > 0  # the kept slot's expiry was moved past the original TTL


def test_socket_slots_hold_the_cap_over_the_pipelined_connection_and_fail_open_without_redis(
        servers: Servers) -> None:
    from gateway.userlimits import SocketSlots

    async def scenario() -> tuple[list[bool], list[bool], bool]:
        client = redis.asyncio.Redis.from_url(servers.redis_url)
        await client.script_flush()  # the first acquire meets NOSCRIPT and loads the script
        gone = redis.asyncio.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.25,
                                   socket_connect_timeout=0.25)
        slots, unreachable = SocketSlots(client=client, cap=2, ttl_s=30), SocketSlots(client=gone, cap=2, ttl_s=30)
        try:
            user = f"u-cap-{uuid.uuid4().hex[:8]}"
            taken = [await slots.acquire(user_id=user) for _ in range(3)]
            assert taken[0] is not None
            await slots.release(taken[0])
            again = await slots.acquire(user_id=user)
            admitted = await unreachable.acquire(user_id=user)
            if admitted is not None:
                await unreachable.release(admitted)
            return [t is not None for t in taken], [again is not None], admitted is not None
        finally:
            slots.close()
            unreachable.close()
            await client.aclose()
            await gone.aclose()

    taken, again, admitted = asyncio.run(scenario())
    assert taken == [True, True, False]  # the cap, counted in Redis
    assert again == [True]  # a released slot is free again
    assert admitted  # Redis unreachable: the socket is admitted (fail open, docs/adr/0005)


class FakeClient:
    """What the ping wheel uses of a client's uvicorn socket (messaging/transports.py UvicornOutput)."""

    def __init__(self) -> None:
        self.pending: bytes | None = None
        self.timed_out = False

    def is_open(self) -> bool:
        return not self.timed_out

    def pong_awaited(self) -> bool:
        return self.pending is not None

    def ping_written(self, payload: bytes) -> None:
        self.pending = payload

    def pong_missing(self, payload: bytes) -> bool:
        return self.pending is payload and self.is_open()

    def ping_timed_out(self) -> None:
        self.timed_out = True


class FakeLink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def control_to_client(self, frame: bytes) -> None:
        self.frames.append(frame)


def test_the_ping_wheel_pings_each_socket_once_per_turn_and_closes_those_whose_pong_is_late() -> None:
    from gateway.pingwheel import PingWheel

    async def scenario() -> None:
        wheel = PingWheel(interval_s=3, timeout_s=2)  # 3 spokes of 1 s, a pong due within 2 ticks
        socks = [(FakeLink(), FakeClient()) for _ in range(6)]
        for link, client in socks:
            wheel.add(link, client)
        for _ in range(3):  # one turn: every socket pinged once, with a valid ping frame
            wheel.step()
        assert [len(link.frames) for link, _ in socks] == [1] * 6
        frame = socks[0][0].frames[0]
        assert frame[0] == 0x89 and frame[1] == len(frame) - 2
        for _, client in socks[1:]:
            client.pending = None  # the pong came (uvicorn's handler clears the payload)
        wheel.discard(socks[5][0])  # a socket that ended is pinged no more
        for _ in range(3):
            wheel.step()
        assert socks[0][1].timed_out and not any(client.timed_out for _, client in socks[1:])
        assert [len(link.frames) for link, _ in socks] == [1, 2, 2, 2, 2, 1]
        await wheel.aclose()

    asyncio.run(scenario())


def test_a_ping_for_the_client_waits_for_the_broker_frame_being_passed() -> None:
    """A frame of the gateway's own written inside a broker frame that is still arriving would corrupt the
    client's stream: it goes out right after that frame."""
    from gateway.wslink import UpstreamLink

    async def scenario() -> list[bytes]:
        link = UpstreamLink(b"", b"key")
        written: list[bytes] = []
        link.attach(written.append, lambda: 0)
        payload = b"x" * 300
        data_frame = bytes((0x81, 126)) + len(payload).to_bytes(2, "big") + payload
        ping = bytes((0x89, 0))
        link._frames(data_frame[:100])  # the broker's frame, first part
        link.control_to_client(ping)
        link._frames(data_frame[100:250])
        link._frames(data_frame[250:])
        link.control_to_client(ping)  # between frames: at once
        return written

    written = asyncio.run(scenario())
    assert b"".join(written) == bytes((0x81, 126)) + (300).to_bytes(2, "big") + b"x" * 300 + bytes((0x89, 0)) * 2
    assert written[-1] == bytes((0x89, 0)) and written[-2].endswith(b"x" + bytes((0x89, 0)))


def test_a_close_of_the_gateways_own_waits_for_the_broker_frame_or_aborts_when_it_cannot_end() -> None:
    """A close frame of the gateway's own (through the gate uvicorn writes to) waits for the end of the broker
    frame being passed, closes the client's transport only after it, and nothing of the broker's follows it;
    when the broker link is lost mid-frame the client's connection is aborted, nothing written into the frame."""
    from gateway.wslink import ClientGate, UpstreamLink

    class Client:
        def __init__(self) -> None:
            self.written: list[bytes] = []
            self.ended = ""

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def close(self) -> None:
            self.ended = self.ended or "closed"

        def abort(self) -> None:
            self.ended = self.ended or "aborted"

    class BrokerTransport:
        def __init__(self) -> None:
            self.closing = False

        def is_closing(self) -> bool:
            return self.closing

        def write(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            self.closing = True

    payload = b"x" * 300
    data_frame = bytes((0x81, 126)) + len(payload).to_bytes(2, "big") + payload
    close = bytes((0x88, 2)) + (4008).to_bytes(2, "big")

    async def scenario(*, broker_lost: bool) -> tuple[Client, bool]:
        link = UpstreamLink(b"", b"key")
        broker = BrokerTransport()
        link.transport = broker  # type: ignore[assignment]
        client = Client()
        link.attach(client.write, lambda: 0)
        gate = ClientGate(client, link)
        link._frames(data_frame[:100])
        gate.write(close)  # uvicorn's websocket.close ...
        gate.close()  # ... and its close of the transport
        link.close(4008)  # the proxy's close of the link waits too: it would stop the frame's rest
        assert client.ended == "" and not broker.closing
        if broker_lost:
            link.connection_lost(None)
        else:
            link._frames(data_frame[100:] + data_frame)  # the rest, then a frame that must not follow the close
        return client, broker.closing

    client, broker_closed = asyncio.run(scenario(broker_lost=False))
    assert b"".join(client.written) == data_frame + close and client.ended == "closed" and broker_closed
    client, _ = asyncio.run(scenario(broker_lost=True))
    assert b"".join(client.written) == data_frame[:100] and client.ended == "aborted"


def test_an_accepted_websockets_access_line_is_written_once_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    """The connection's life runs after the layers returned (GatewayApp, ``state.after``): its access line
    is written when it ends, with its close code, not at the accept."""
    import json
    import logging

    from gateway.app import GatewayApp
    from gateway.asgi import state_of
    from gateway.middleware import AccessLogLayer, RequestIdLayer

    lines_during_life: list[int] = []

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})

        async def life() -> None:
            lines_during_life.append(len(caplog.records))
            await send({"type": "websocket.close", "code": 4321})

        state_of(scope).after = life

    async def scenario() -> list[dict[str, Any]]:
        app = GatewayApp()
        app.stack = RequestIdLayer(AccessLogLayer(proxy))
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: Any) -> None:
            sent.append(message)

        await app({"type": "websocket", "path": "/ws/", "headers": [], "client": ("127.0.0.1", 1)}, receive, send)
        await app.redis.aclose()
        await app.limits_redis.aclose()
        return sent

    caplog.set_level(logging.INFO, logger="chatstream.gateway.access")
    sent = asyncio.run(scenario())
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert lines_during_life == [0]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "chatstream.gateway.access"]
    assert len(lines) == 1 and lines[0]["status"] == 101 and lines[0]["close_code"] == 4321


def test_gateways_sharing_a_port_send_their_first_websockets_to_different_brokers() -> None:
    """docs/adr/0056: each gateway counts only its own sockets, so with nothing open two gateways would both pick
    the first broker; each starts its tie-break rotation at its instance number instead, and a gateway's HTTP
    requests do not move where its next WebSocket's tie lands."""
    brokers = [Instance(role="broker", id=f"broker-{n}-test", url=f"http://127.0.0.1:{free_port()}", started_at="",
                        last_seen="") for n in (1, 2)]
    apis = [_instance(1), _instance(2), _instance(3)]

    async def first_ws(rotation_start: int, http_before: int) -> Instance:
        upstreams = _upstreams([*brokers, *apis])
        upstreams._rotation_start = rotation_start
        for _ in range(http_before):
            await upstreams.pick(role="api", kind="http")
        picked = await upstreams.pick(role="broker", kind="ws")
        assert isinstance(picked, Instance)
        return picked

    async def scenario() -> None:
        for http_before in (0, 1, 2):
            assert await first_ws(0, http_before) == brokers[0]
            assert await first_ws(1, http_before) == brokers[1]

    asyncio.run(scenario())


def test_readyz_reads_a_stale_registry_view_afresh_and_requests_do_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway with no request for a while holds its last registry view. Requests keep using it while it is
    re-read in the background; /readyz (``fresh=True``) waits for the read, so two gateways on one port
    (docs/adr/0056) do not answer from views of different ages."""
    import gateway.upstreams as upstreams_module

    registry: list[Instance] = [_instance(1)]

    async def listed(_client: object) -> list[Instance]:
        return list(registry)

    monkeypatch.setattr(upstreams_module, "instances_list_async", listed)
    monkeypatch.setattr(upstreams_module, "REGISTRY_REFRESH_S", 0.05)

    async def scenario() -> None:
        upstreams = Upstreams(client=redis.asyncio.Redis(), breaker_threshold=3, breaker_open_s=1)
        assert len(await upstreams.instances()) == 1  # the first call waits for the first read
        registry.append(_instance(2))
        await asyncio.sleep(0.1)
        assert len(await upstreams.instances()) == 1  # stale: answered at once, re-read in the background
        registry.append(_instance(3))
        await asyncio.sleep(0.1)
        assert len(await upstreams.instances(fresh=True)) == 3  # stale: waits for the read

    asyncio.run(scenario())
