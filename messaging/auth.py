"""Who is on the other end of a WebSocket: the one place that turns a handshake into an identity.

Today a connection proves itself with a single-use ticket (``?ticket=`` in the query string, DESIGN.md §9),
consumed here with GETDEL so it works exactly once on any broker. The gateway may later consume tickets at
the edge and forward a signed identity header instead; that check belongs in :func:`connection_identify`
too, so the consumers never learn how identity was established.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from api.tokens import TicketOwner, ws_ticket_consume
from messaging.hub import hub_get


def _query_ticket(scope: Mapping[str, Any]) -> str:
    raw = scope.get("query_string", b"")
    query = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    values = urllib.parse.parse_qs(query).get("ticket", [])
    return values[0] if len(values) == 1 else ""


async def connection_identify(scope: Mapping[str, Any]) -> TicketOwner | None:
    """The user of a WebSocket handshake, or None (the caller closes with 4001).

    Side effect: consumes the ticket (a second use of the same ticket answers None).
    """
    ticket = _query_ticket(scope)
    if not ticket:
        return None
    return await ws_ticket_consume(hub_get().redis, ticket=ticket)
