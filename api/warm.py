"""An api instance's first-request costs, paid at its start instead of by the first users it serves (issue 13).

Measured on the 1M store of bench/data_tier.py (docs/benchmarks.md, issue 13 session 10), one request at a time
straight to each api instance of a freshly started cluster: the first conversation list cost 15.6-18.0 ms, the
next ones 3.9-9.1. In process (cProfile of the first requests after the URLconf's import), that extra is this
process's first connections (each new Redis connection resolves redis-py's version through importlib.metadata,
~1.3 ms; the store's first connection), mongoengine's index check on each document class's first use (a
``createIndexes`` per class, 1-2 ms each on FerretDB), and DRF's classes imported on its first request. Behind
the gateway with two instances, their two first requests were two of the benchmark's 100 samples, so the list's
p99 (the 99th) was one of them; a user who comes first after a restart or a deploy paid the same.

Session 11 found the rest (docs/benchmarks.md, "Issue 13: an api instance's first request"): after the warm-up
above, the first list still compiled the regex of every URL pattern it was matched against (Django compiles a
pattern's on its first match, ~25 for the list, ~0.1 ms each), imported what Django's middleware and DRF load
on a first request (the messages framework's storages, mongoengine's dereference module), compiled Django's
lazily built regexes (the Host check, the response's charset) and opened a second Redis connection, from a pool
of its own in messaging/selectors.py (now the process's one client). :func:`url_patterns_compile` and
:func:`api_warm_requests` (anonymous requests through the instance's own ASGI application, answered 401 before
any view reads or writes) do that at the start.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.urls import URLResolver, get_resolver
from rest_framework.settings import api_settings

from core.bus import bus_sync
from core.clients import connections_open
from core.documents import Conversation, GroupChat, Message, MessageBucket, User

log = logging.getLogger(__name__)

# The DRF settings whose classes DRF imports on first use (rest_framework.settings.APISettings is lazy).
_DRF_CLASSES = ("DEFAULT_AUTHENTICATION_CLASSES", "DEFAULT_PERMISSION_CLASSES", "DEFAULT_RENDERER_CLASSES",
                "DEFAULT_PARSER_CLASSES", "DEFAULT_CONTENT_NEGOTIATION_CLASS", "DEFAULT_THROTTLE_CLASSES",
                "DEFAULT_VERSIONING_CLASS", "DEFAULT_PAGINATION_CLASS", "EXCEPTION_HANDLER")


# A token of the right shape whose signature is zeros: nothing signed it, so it never authenticates; decoding it
# runs the JWT check as far as the signature's verification (its header, claims and key), where it fails.
def _unsigned_token() -> bytes:
    return b".".join(base64.urlsafe_b64encode(part).rstrip(b"=") for part in (
        json.dumps({"alg": settings.JWT_ALGORITHM, "typ": "JWT"}).encode(), b'{"sub": "warm-up"}', bytes(64)))


# Requests through the ASGI application, each answered 401 before its view runs: the list (the request) and
# a page of messages (the patterns after the list's) anonymous (DRF's permission check), a WebSocket ticket with the
# unsigned token (the authentication's JWT check).
_WARM_REQUESTS = (
    ("GET", "/api/v1/conversations", b"limit=50", False),
    ("GET", "/api/v1/conversations/000000000000000000000000/messages", b"limit=50", False),
    ("POST", "/api/v1/auth/ws-ticket", b"", True),
)
Asgi = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
                Awaitable[None]]


def url_patterns_compile() -> int:
    """Compile the regex of every URL pattern of the URLconf now (Django compiles each on its first match, so the
    first request to a route paid for every pattern tried before it); returns how many. No I/O."""
    count = 0
    resolvers = [get_resolver()]
    while resolvers:
        resolver = resolvers.pop()
        resolver.pattern.regex  # noqa: B018 - compiled and cached on the pattern on first access
        for entry in resolver.url_patterns:
            entry.pattern.regex  # noqa: B018
            count += 1
            if isinstance(entry, URLResolver):
                resolvers.append(entry)
    return count


def _warm_host() -> str:
    """A Host header the instance accepts (Django answers 400 to one not in ALLOWED_HOSTS)."""
    for host in settings.ALLOWED_HOSTS:
        if host and host != "*":
            return str(host).lstrip(".")
    return "localhost"


def _not_a_401(record: logging.LogRecord) -> bool:
    """A logging filter: keep every record but a 401's."""
    return getattr(record, "status_code", None) != 401


async def api_warm_requests(*, app: Asgi) -> list[int]:
    """Send :data:`_WARM_REQUESTS` through ``app`` (the instance's own ASGI application, in process: no socket) and
    return their statuses (401 each when the warm-up did its work). Runs on the server's loop before the instance
    serves (the api's lifespan startup); the sync part runs in the request's thread as any request's does.
    Side effects: none (anonymous: no store or Redis access before the 401). An error is logged, not raised."""
    statuses: list[int] = []
    host = _warm_host().encode()
    # Django logs every 4xx as a warning; these 401s are expected. Nothing else is served meanwhile (the server
    # accepts connections after the startup), so the filter drops no user request's record.
    request_log = logging.getLogger("django.request")
    request_log.addFilter(_not_a_401)
    try:
        for method, path, query, with_token in _WARM_REQUESTS:
            headers = [(b"host", host)]
            if with_token:
                headers.append((b"authorization", b"Bearer " + _unsigned_token()))
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
                     "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
            answered: list[int] = []
            body = [{"type": "http.request", "body": b"", "more_body": False}]

            async def receive(body: list[dict[str, Any]] = body) -> dict[str, Any]:
                if body:
                    return body.pop()
                await asyncio.Event().wait()  # the client stays: Django cancels its disconnect listener at the end
                raise AssertionError("unreachable")

            async def send(message: dict[str, Any], answered: list[int] = answered) -> None:
                if message["type"] == "http.response.start":
                    answered.append(int(message["status"]))

            try:
                await app(scope, receive, send)
            except Exception:  # a bug met here would meet the first user anyway: log it, serve
                log.warning("api warm-up request %s %s failed", method, path, exc_info=True)
            statuses.extend(answered or [0])
    finally:
        request_log.removeFilter(_not_a_401)
    if any(status != 401 for status in statuses):
        log.warning("api warm-up requests answered %s, not 401 each: the first requests may pay more", statuses)
    return statuses


def api_warm() -> None:
    """Open this process's Redis (REDIS_URL and the bus) and store connections, run mongoengine's index check
    for the document classes the hot reads use, import DRF's configured classes and mongoengine's dereference
    module, and compile the URL patterns' regexes. Blocking (Redis, MongoDB):
    called off the event loop before the instance serves (chatstream_site/asgi.py, the api's lifespan
    startup). Side effects: one pooled connection to each server; ``createIndexes`` per class (idempotent: the
    indexes exist); nothing written. A server that does not answer is logged, not raised: the warm-up only
    moves costs, and the instance serves (and reports its readiness) as it would have without it."""
    for name in _DRF_CLASSES:
        getattr(api_settings, name)
    url_patterns_compile()
    import mongoengine.dereference  # noqa: F401 - mongoengine imports it on a list field's first read
    try:
        connections_open(documents=(User, Conversation, GroupChat, Message, MessageBucket))
        bus_sync().ping()
    except Exception:  # any server error: the first requests pay as before
        log.warning("api warm-up incomplete: the first requests open the connections", exc_info=True)
