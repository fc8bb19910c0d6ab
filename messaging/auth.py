"""Who is on the other end of a WebSocket: the one place that turns a handshake into an identity.

Two ways in, in this order:

* **Through the gateway** (docs/adr/0006): the gateway consumed the single-use ticket at the edge and passes
  a signed identity (``X-ChatStream-*`` headers, :func:`core.identity.identity_verify`). When those
  headers are present they decide: a forged, stale or partial set is refused (4001), never "fall back".
* **Directly** (tests, the benchmark, internal tools on the private network): a single-use ticket
  (``?ticket=``, docs/interface.md), consumed here with GETDEL, so it works exactly once on any broker. It is as
  strong as the gateway's check: tickets are issued only to holders of a valid access token.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from core.identity import PREFIX as IDENTITY_PREFIX
from core.identity import identity_verify
from core.revocation import access_refused_async
from core.tokens import TicketOwner, ws_ticket_consume
from messaging.hub import hub_get


def _query_ticket(scope: Mapping[str, Any]) -> str:
    raw = scope.get("query_string", b"")
    query = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    values = urllib.parse.parse_qs(query).get("ticket", [])
    return values[0] if len(values) == 1 else ""


def connection_proxied(scope: Mapping[str, Any]) -> bool:
    """Whether the handshake came through a gateway (it carries the gateway's identity headers). Pure."""
    return any(bytes(name).lower().startswith(IDENTITY_PREFIX) for name, _ in scope.get("headers", []))


async def connection_identify(scope: Mapping[str, Any]) -> TicketOwner | None:
    """The user of a WebSocket handshake, or None (the caller closes with 4001).

    Side effect (direct connections): consumes the ticket, so a second use of the same ticket answers None.
    """
    headers = list(scope.get("headers", []))
    if any(bytes(name).lower().startswith(IDENTITY_PREFIX) for name, _ in headers):
        return identity_verify(headers)
    ticket = _query_ticket(scope)
    if not ticket:
        return None
    owner = await ws_ticket_consume(hub_get().redis, ticket=ticket)
    # A ticket issued before its user's password change or account removal is refused, as at the gateway.
    if owner is not None and await access_refused_async(hub_get().redis, jti=None, user_id=owner.user_id,
                                                        gen=owner.gen):
        return None
    return owner
