"""Rate limits of the credential endpoints (login, register): per client IP and per username, counted by
django-ratelimit in the shared Redis cache, so every api instance sees the same counters.

The client IP is ``REMOTE_ADDR``, or the last ``X-Forwarded-For`` entry when the peer is a trusted proxy
(``CHATSTREAM_TRUSTED_PROXIES``; the gateway replaces any client-sent X-Forwarded-For with the address it
saw, so the last entry is the one it vouches for).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django_ratelimit.core import get_usage

from chatstream_site.errors import RateLimited


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
