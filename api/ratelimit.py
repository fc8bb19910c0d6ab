"""Rate limits of the credential endpoints (login, register): per client IP and per username, counted by
django-ratelimit in the shared Redis cache, so every api instance sees the same counters; and the login
back-off per (username, client), which counts failed passwords only (docs/security.md).

The client IP is ``REMOTE_ADDR``, or the last ``X-Forwarded-For`` entry when the peer is a trusted proxy
(``CHATSTREAM_TRUSTED_PROXIES``; the gateway replaces any client-sent X-Forwarded-For with the address it
saw, so the last entry is the one it vouches for).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from typing import Any

from django.conf import settings
from django_ratelimit.core import get_usage

from core.clients import sync_redis
from core.errors import RateLimited
from core.keys import LOGIN_FAIL_PREFIX

# A failed login of (username, client): count it; from the last free failure on, the pair must wait
# base * 2^k seconds (k: failures past the free ones, 0 for the last free one), at most the cap, before its
# next attempt. The key lives a day
# after the last failure; a successful login deletes it.
_LOGIN_FAIL = """
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
local over = n - tonumber(ARGV[2])
local wait = 0
if over >= 0 then
  wait = math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) * 2 ^ math.min(over, 30))
  redis.call('HSET', KEYS[1], 'until', tonumber(ARGV[1]) + wait)
end
redis.call('EXPIRE', KEYS[1], 86400)
return tostring(wait)
"""


def client_ip(request: Any) -> str:
    remote = str(request.META.get("REMOTE_ADDR", "") or "")
    if remote in settings.TRUSTED_PROXIES:
        forwarded = str(request.META.get("HTTP_X_FORWARDED_FOR", "") or "")
        last = forwarded.split(",")[-1].strip()
        if last:
            return last[:64]
    return remote


def rate_limit(request: Any, *, group: str, value: str, rate: str) -> None:
    """Count one attempt for ``value`` in ``group``; raise RateLimited (429 + Retry-After) past ``rate``.

    Side effect: increments a counter in the cache (Redis) that expires with the rate's window.
    """
    usage = get_usage(request, group=group, key=lambda _group, _request: value, rate=rate, increment=True)
    if usage is not None and usage["should_limit"]:
        retry_after = max(1, int(usage.get("time_left", 60)))
        raise RateLimited(f"too many attempts; retry in {retry_after} s", retry_after_s=retry_after,
                          details={"limit": group})


def client_key(ip: str) -> str:
    """The client of a login back-off: IPv4 as is, IPv6 by its /64 (one host usually owns a whole /64)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:64]
    if address.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False).network_address)
    return str(address)


def _login_key(*, username: str, client: str) -> str:
    # Hashed: usernames and addresses are not stored in clear in Redis, and the key length is bounded.
    digest = hashlib.sha256(f"{username.lower()}\0{client_key(client)}".encode()).hexdigest()[:32]
    return LOGIN_FAIL_PREFIX + digest


def login_backoff_check(*, username: str, client: str) -> None:
    """Raise RateLimited (429 + Retry-After) while (username, client) is backing off after failed passwords.
    Other clients of the same username are not affected: an attacker cannot lock the owner out (OWASP
    authentication cheat sheet). Reads one Redis hash."""
    until = sync_redis().hget(_login_key(username=username, client=client), "until")
    wait = float(until) - time.time() if until else 0.0
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        raise RateLimited(f"too many failed logins from this client; retry in {retry_after} s",
                          retry_after_s=retry_after, details={"limit": "login.backoff"})


def login_failure_record(*, username: str, client: str) -> float:
    """Count a failed password of (username, client); returns the back-off (seconds) it starts, 0 while the
    failures are free. Side effect: one Lua call on Redis (``cs:login:fail:<hash>``, expires after a day)."""
    wait = sync_redis().eval(_LOGIN_FAIL, 1, _login_key(username=username, client=client), time.time(),
                             settings.LOGIN_FREE_FAILURES, settings.LOGIN_BACKOFF_BASE_S,
                             settings.LOGIN_BACKOFF_MAX_S)
    return float(wait)


def login_success_record(*, username: str, client: str) -> None:
    """Forget the failures of (username, client). Side effect: one DEL in Redis."""
    sync_redis().delete(_login_key(username=username, client=client))
