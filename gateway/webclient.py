"""The web chat client: static files served by the gateway at ``/`` and ``/app/<file>``.

Files are read once at import (a handful of small files) and served from memory with a strict CSP: the
page loads scripts and styles only from this origin and talks only to this origin (HTTP and WebSocket).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent / "webclient"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; "
       "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

_FILES: dict[str, tuple[str, bytes]] = {
    f"/app/{p.name}": (TYPES.get(p.suffix, "application/octet-stream"), p.read_bytes())
    for p in ROOT.iterdir() if p.is_file() and p.suffix in TYPES
}
_FILES["/"] = _FILES["/app/index.html"]


def webclient_file(path: str) -> tuple[str, bytes] | None:
    """``(content type, body)`` of the client file at ``path``, or None. Only files present at start."""
    return _FILES.get(path)


def webclient_headers(content_type: str) -> list[tuple[bytes, bytes]]:
    # The page itself is never cached (a deploy takes effect at the next load); modules revalidate.
    return [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-cache")]
