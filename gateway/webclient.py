"""The web chat client: static files served by the gateway at ``/`` and ``/app/<file>``.

Files are read once at import (a handful of small files) and served from memory with a strict CSP: the
page loads scripts and styles only from this origin and talks only to this origin (HTTP and WebSocket).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "webclient"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# connect-src names this origin's WebSocket URLs (some browsers do not let 'self' cover ws:/wss:), never
# "ws: wss:" (any host): a script injected into the page could not talk to another server.
CSP = ("default-src 'self'; connect-src 'self' {ws}; img-src 'self' data:; style-src 'self'; "
       "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# A Host header that can be put in a CSP source as is: host name or [IPv6] with an optional port.
HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")

_FILES: dict[str, tuple[str, bytes]] = {
    f"/app/{p.name}": (TYPES.get(p.suffix, "application/octet-stream"), p.read_bytes())
    for p in ROOT.iterdir() if p.is_file() and p.suffix in TYPES
}
_FILES["/"] = _FILES["/app/index.html"]


def webclient_file(path: str) -> tuple[str, bytes] | None:
    """``(content type, body)`` of the client file at ``path``, or None. Only files present at start."""
    return _FILES.get(path)


def webclient_csp(*, host: str | None, secure: bool) -> str:
    """The page's CSP for a request to ``host`` (its Host header): WebSockets to that origin only. Pure."""
    ws = ""
    if host and HOST_RE.fullmatch(host):
        ws = f"{'wss' if secure else 'ws'}://{host}"
    return CSP.format(ws=ws).replace("'self' ;", "'self';")


def webclient_headers(content_type: str, *, host: str | None = None,
                      secure: bool = False) -> list[tuple[bytes, bytes]]:
    # The page itself is never cached (a deploy takes effect at the next load); modules revalidate.
    csp = webclient_csp(host=host, secure=secure)
    return [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-cache")]
