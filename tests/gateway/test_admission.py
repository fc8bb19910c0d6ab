"""The gateway's combined admission round trips (gateway/admission.py, docs/adr/0044) against a real Redis:
they count, refuse and store exactly what the layers did one round trip at a time."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
from django.test import RequestFactory
from django_ratelimit.core import get_usage

from chatstream_site.localservers import Servers, free_port
from core.keys import REVOKED_PREFIX, REVOKED_USER_PREFIX, TICKET_PREFIX
from core.tokens import TicketOwner, ws_ticket_issue
from gateway.admission import ADMITTED, LIMITED, REVOKED, Admission
from gateway.ratelimit import Counter, RateLimiter

T = TypeVar("T")


def run(url: str, body: Callable[[Admission], Awaitable[T]]) -> T:
    async def scenario() -> T:
        client = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return await body(Admission(client=client, limiter=RateLimiter(client=client)))
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def counter(admission: Admission, group: str, value: str, rate: str = "3/h") -> Counter:
    return admission.limiter.counter(group=group, rate=rate, value=value)


def test_a_ticket_request_counts_checks_and_stores_in_one_script_and_stops_at_the_first_refusal(
        servers: Servers) -> None:
    sync = redis.Redis.from_url(servers.redis_url)
    run_id = uuid.uuid4().hex
    ip_group, user_group, user = f"gw:t-ip-{run_id}", f"gw:t-user-{run_id}", f"u-{run_id}"

    async def body(admission: Admission) -> list[Any]:
        verdicts = []
        for n in range(4):  # the user's budget is 3: the 4th is limited and stores nothing
            ticket = (f"{TICKET_PREFIX}t{n}-{run_id}", json.dumps({"user_id": user, "username": "u", "gen": 0}), 30)
            verdicts.append(await admission.jwt(
                ip=[counter(admission, ip_group, "203.0.113.9", "10/h")], user=[counter(admission, user_group, user)],
                jti=f"j-{run_id}", user_id=user, gen=0, ticket=ticket))
        return verdicts

    verdicts = run(servers.redis_url, body)
    assert [v.outcome for v in verdicts] == [ADMITTED, ADMITTED, ADMITTED, LIMITED]
    limited = verdicts[3].limited()
    assert limited is not None and limited[0].group == user_group and limited[1].count == 4
    assert [bool(sync.exists(f"{TICKET_PREFIX}t{n}-{run_id}")) for n in range(4)] == [True, True, True, False]
    assert verdicts[0].usage_of(ip_group) is not None and not verdicts[0].failed
    # The counters are django-ratelimit's own: the library reads the same numbers.
    usage = get_usage(RequestFactory().get("/"), group=user_group, key=lambda g, r: user, rate="3/h")
    assert usage is not None and usage["count"] == 4

    # A revoked token (its jti, or a generation below the user's marker): IP counted, user not, no ticket.
    sync.set(REVOKED_PREFIX + f"j2-{run_id}", "1", ex=60)
    sync.set(REVOKED_USER_PREFIX + f"v-{run_id}", 3, ex=60)

    async def revoked(admission: Admission) -> list[Any]:
        out = []
        for jti, uid, gen in ((f"j2-{run_id}", f"w-{run_id}", 0), (f"j3-{run_id}", f"v-{run_id}", 2)):
            out.append(await admission.jwt(
                ip=[counter(admission, ip_group, "203.0.113.9", "10/h")], user=[counter(admission, user_group, uid)],
                jti=jti, user_id=uid, gen=gen, ticket=(f"{TICKET_PREFIX}r-{jti}", "{}", 30)))
        # The current generation passes.
        out.append(await admission.jwt(ip=[], user=[counter(admission, user_group, f"v-{run_id}")],
                                       jti=f"j4-{run_id}", user_id=f"v-{run_id}", gen=3))
        return out

    r1, r2, ok = run(servers.redis_url, revoked)
    assert (r1.outcome, r2.outcome, ok.outcome) == (REVOKED, REVOKED, ADMITTED)
    assert [u.count for _, u in r1.usages] == [5] and [u.count for _, u in r2.usages] == [6]  # IP only
    assert not sync.exists(f"{TICKET_PREFIX}r-j2-{run_id}") and not sync.exists(f"{TICKET_PREFIX}r-j3-{run_id}")
    assert ok.usage_of(user_group) is not None and ok.usage_of(user_group).count == 1

    # The per-IP limit refuses first: nothing else is read, counted or stored.
    async def ip_limited(admission: Admission) -> Any:
        for _ in range(2):  # 1 per hour: the second is refused
            verdict = await admission.jwt(
                ip=[counter(admission, ip_group + "-1", "203.0.113.9", "1/h")],
                user=[counter(admission, user_group, f"x-{run_id}")], jti=f"j5-{run_id}", user_id=f"x-{run_id}",
                gen=0, ticket=(f"{TICKET_PREFIX}ip-{run_id}", "{}", 30))
            sync.delete(f"{TICKET_PREFIX}ip-{run_id}")
        return verdict

    verdict = run(servers.redis_url, ip_limited)
    assert verdict.outcome == LIMITED and verdict.limited()[0].group == ip_group + "-1"
    assert len(verdict.usages) == 1  # the user's counter was not counted
    user_usage = get_usage(RequestFactory().get("/"), group=user_group, key=lambda g, r: f"x-{run_id}", rate="3/h")
    assert user_usage is not None and user_usage["count"] == 1  # the first, admitted request only


def test_a_handshake_consumes_its_ticket_once_and_an_ip_limited_one_leaves_it(servers: Servers) -> None:
    sync = redis.Redis.from_url(servers.redis_url)
    run_id = uuid.uuid4().hex
    ticket = ws_ticket_issue(sync, user_id=f"u-{run_id}", username="h", gen=1)
    ip_group = f"gw:t-wsip-{run_id}"

    async def body(admission: Admission) -> list[Any]:
        ip = "198.51.100.4"
        limited = await admission.ticket_consume(ip=[counter(admission, ip_group, ip, "1/h")], ticket=ticket)
        over = await admission.ticket_consume(ip=[counter(admission, ip_group, ip, "1/h")], ticket=ticket)
        fresh = [counter(admission, ip_group + "b", ip)]
        return [limited, over, await admission.ticket_consume(ip=fresh, ticket=ticket),
                await admission.ticket_consume(ip=fresh, ticket=ticket),
                await admission.ticket_consume(ip=[], ticket="x" * 200)]

    first, over, consumed, again, oversized = run(servers.redis_url, body)
    # The first handshake from the address (limit 1) consumed the ticket already: single use.
    assert first.outcome == ADMITTED and first.owner == TicketOwner(user_id=f"u-{run_id}", username="h", gen=1)
    assert over.outcome == LIMITED and over.owner is None
    assert consumed.owner is None and again.owner is None and oversized.owner is None
    # An IP over its limit never reaches the ticket: it stays for a later, admitted handshake.
    kept = ws_ticket_issue(sync, user_id=f"k-{run_id}", username="k")

    async def limited_then_admitted(admission: Admission) -> list[Any]:
        refused = await admission.ticket_consume(ip=[counter(admission, ip_group, "198.51.100.4", "1/h")],
                                                 ticket=kept)
        present = sync.exists(TICKET_PREFIX + kept)
        sync.script_flush()  # a restarted or flushed Redis answers NOSCRIPT: the script is sent again
        return [refused, present, await admission.ticket_consume(ip=[], ticket=kept)]

    refused, still_there, admitted = run(servers.redis_url, limited_then_admitted)
    assert refused.outcome == LIMITED and still_there and admitted.owner is not None


def test_a_tickets_owner_is_refused_after_a_password_change_and_counted_otherwise(servers: Servers) -> None:
    sync = redis.Redis.from_url(servers.redis_url)
    run_id = uuid.uuid4().hex
    group = f"gw:t-wsuser-{run_id}"
    sync.set(REVOKED_USER_PREFIX + f"u-{run_id}", 2, ex=60)

    async def body(admission: Admission) -> list[Any]:
        old = TicketOwner(user_id=f"u-{run_id}", username="o", gen=1)
        new = TicketOwner(user_id=f"u-{run_id}", username="o", gen=2)
        user = [counter(admission, group, f"u-{run_id}", "1/h")]
        return [await admission.owner_admit(owner=old, user=user), await admission.owner_admit(owner=new, user=user),
                await admission.owner_admit(owner=new, user=user)]

    old, new, over = run(servers.redis_url, body)
    assert old.outcome == REVOKED and old.usages == ()  # nothing counted for a revoked ticket
    assert new.outcome == ADMITTED and [u.count for _, u in new.usages] == [1]
    assert over.outcome == LIMITED and over.limited()[1].retry_after_s >= 1


def test_without_redis_the_counters_fail_open_to_this_process_and_tickets_refuse() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def body(admission: Admission) -> list[Any]:
        ip = [admission.limiter.counter(group="gw:t-down", rate="1/h", value="192.0.2.1")]
        first = await admission.jwt(ip=ip, user=[], jti="j", user_id="u", gen=0, ticket=("k", "{}", 30))
        second = await admission.jwt(ip=ip, user=[], jti="j", user_id="u", gen=0)
        try:
            await admission.ticket_consume(ip=[], ticket="t")
            raised = False
        except (redis.RedisError, OSError):
            raised = True
        return [first, second, raised, admission.limiter.shared()]

    first, second, raised, shared = run(url, body)
    assert first.failed and first.outcome == ADMITTED and not first.usages[0][1].shared
    assert second.outcome == LIMITED  # counted in this process
    assert raised and not shared  # no ticket without Redis (the layer refuses with 1013); limits count locally
