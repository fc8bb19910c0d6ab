"""WebSocket routes of the broker role: one endpoint, ``/ws/?ticket=...`` (docs/protocol.md)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import ParseResult

from channels.security.websocket import OriginValidator
from django.conf import settings

from messaging.consumers import ChatConsumer

logger = logging.getLogger(__name__)

WS_PATH = "/ws/"


class BrokerRoute:
    """The broker's one WebSocket route, ``/ws/``. Channels' ``URLRouter`` would copy the scope (twice, with
    the match's kwargs) for every connection and keep the copies for its life: ~1.3 KB of an idle
    connection (bench/ws_memory.py). Any other path is refused at the handshake (HTTP 403), with a log
    line saying which path was asked for."""

    def __init__(self) -> None:
        self.consumer = ChatConsumer.as_asgi()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if (path.removeprefix(root) if root else path) != WS_PATH:
            logger.warning("refusing a WebSocket on %r: the broker serves %s only", path, WS_PATH)
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.consumer(scope, receive, send)


class BrowserOriginValidator(OriginValidator):
    """Refuse a handshake whose ``Origin`` is foreign (HTTP 403); accept one without ``Origin``.

    Browsers always send ``Origin`` on a WebSocket handshake, so a missing one is not a page of another site
    (the cross-site hijacking this check exists for) but a non-browser client: the gateway's proxy, the
    benchmark, a mobile app. Channels' stock validator refuses those too; they authenticate with a ticket
    like everyone else.
    """

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if parsed_origin is None:
            return True
        return bool(super().valid_origin(parsed_origin))


def websocket_application() -> Any:
    """The broker's WebSocket app: the routes behind the Origin check against ``ALLOWED_HOSTS`` minus ``*``
    (``WS_ORIGIN_HOSTS``: a wildcard host list never switches the check off)."""
    allowed = settings.WS_ORIGIN_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    return BrowserOriginValidator(BrokerRoute(), allowed)


async def broker_lifespan(scope: Any, receive: Any, send: Any) -> None:
    """ASGI lifespan of a broker under uvicorn (daphne sends none): start the hub at once, so the presence
    sweep runs on a broker nobody has connected to yet (under daphne it starts with the first connection), and
    pay the first connect's one-time work before serving (messaging/warm.py); deregister on shutdown."""
    from core.roles import lifespan_serve
    from messaging.hub import hub_get
    from messaging.warm import broker_warm, broker_warm_blocking

    await lifespan_serve(receive, send, on_startup=lambda: hub_get().start(), on_startup_blocking=broker_warm_blocking,
                         on_startup_async=lambda: broker_warm(hub=hub_get(), app=websocket_application()))
