"""The gateway's route table: where each path goes and what it needs. THE one place that lists public routes.

A request matches the first route whose prefix (or exact path) fits. ``auth`` says what the edge checks:

* ``public``: nothing; any client-sent identity header is still stripped;
* ``jwt``: a valid access token in ``Authorization: Bearer``; the identity is passed upstream signed;
* ``ticket``: a single-use WebSocket ticket in ``?ticket=``, consumed here at the gateway;
* ``upstream``: the upstream authenticates by itself (Django admin's session login), and the route is
  restricted to ``GATEWAY_ADMIN_NETWORKS`` (the route authorization layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Auth = Literal["public", "jwt", "ticket", "upstream"]
Target = Literal["gateway", "api", "broker"]


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    target: Target
    auth: Auth
    exact: bool = False
    # A stricter per-IP limit for routes that guess passwords or mint tokens (the ratelimit layer).
    sensitive: bool = False
    # Health probes are never rate limited: a load balancer's probe refused with 429 would take the gateway
    # out of rotation for being probed.
    limited: bool = True

    def matches(self, path: str) -> bool:
        return path == self.path if self.exact else path.startswith(self.path)


# Order matters: the first match wins, so exact public auth routes come before the protected /api/ prefix.
# Answered by the gateway itself (docs/adr/0039); its ticket is stored in the authentication round trip.
WS_TICKET_PATH = "/api/v1/auth/ws-ticket"
ROUTES: tuple[Route, ...] = (
    Route("/healthz", "gateway", "public", exact=True, limited=False),
    Route("/readyz", "gateway", "public", exact=True, limited=False),
    Route("/", "gateway", "public", exact=True),  # the web client's page ...
    Route("/app/", "gateway", "public"),  # ... and its files (gateway/webclient.py)
    Route("/static/", "api", "public"),
    Route("/api/v1/auth/register", "api", "public", exact=True, sensitive=True),
    Route("/api/v1/auth/login", "api", "public", exact=True, sensitive=True),
    Route("/api/v1/auth/refresh", "api", "public", exact=True, sensitive=True),
    # Logout carries the refresh token it revokes; the access token may already have expired.
    Route("/api/v1/auth/logout", "api", "public", exact=True, sensitive=True),
    Route("/api/v1/schema", "api", "public"),  # OpenAPI schema and its docs pages
    Route("/api/v1/docs", "api", "public"),
    Route("/api/v1/redoc", "api", "public"),
    # Authenticated, but it checks a password: the stricter per-IP budget of the credential routes too.
    Route("/api/v1/auth/password", "api", "jwt", exact=True, sensitive=True),
    # The gateway issues WebSocket tickets itself: it has verified the access token (and its revocation) at
    # the edge already, and a ticket is one Redis SET; the api's hop cost more than the rest of a connect
    # (issue 16, docs/adr/0039). The api still serves the same route to direct callers.
    Route(WS_TICKET_PATH, "gateway", "jwt", exact=True),
    Route("/api/", "api", "jwt"),
    Route("/admin/", "api", "upstream"),
    Route("/ws/", "broker", "ticket"),
)


def route_match(path: str) -> Route | None:
    """The route for ``path``, or None (404). Pure."""
    return next((route for route in ROUTES if route.matches(path)), None)


def public_paths() -> list[str]:
    """The paths that need no authentication at the edge (for docs and tests)."""
    return [route.path for route in ROUTES if route.auth == "public"]


# Percent-encoded "/", "\\" and NUL in the raw path: a server decodes them into the path the routes match, while
# an upstream may read them as separators again ("/static/..%2fadmin/"): never routed.
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
# A backslash or a control character in the decoded path (one regex search: a per-character generator was
# ~2 % of the gateway's CPU per connect, two paths checked per connect).
_UNSAFE_CHARACTER = re.compile(r"[\x00-\x1f\x7f\\]")


def path_checked(*, raw_path: bytes | None, path: str) -> str | None:
    """``path`` (the server-decoded path the routes match) if it is canonical, else None (refuse it). Pure.

    Refused: dot segments (``.``/``..``, also percent-encoded: an upstream's URL library would resolve them
    and reach another route than the one matched, ``/static/%2e%2e/admin/``), empty segments (``//``),
    encoded separators (``%2F``, ``%5C``, ``%00``), backslashes and control characters (an encoded newline
    would forge log lines upstream). The gateway then forwards exactly this path (``gateway/proxy.py``).
    """
    raw = (raw_path or b"").decode("latin-1").split("?", 1)[0]
    if _ENCODED_SEPARATOR.search(raw) or not path.startswith("/"):
        return None
    if _UNSAFE_CHARACTER.search(path):
        return None
    inner = path[1:].split("/")
    if any(segment in (".", "..") for segment in inner) or "" in inner[:-1]:
        return None
    return path
