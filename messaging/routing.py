"""WebSocket routes of the broker role: one endpoint, ``/ws/?ticket=...`` (docs/protocol.md)."""

from __future__ import annotations

from typing import Any
from urllib.parse import ParseResult

from channels.routing import URLRouter
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.urls import URLPattern, re_path

from messaging.consumers import ChatConsumer

websocket_urlpatterns: list[URLPattern] = [
    re_path(r"^ws/$", ChatConsumer.as_asgi()),
]


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
    """The broker's WebSocket app: the routes behind the Origin check against ``ALLOWED_HOSTS``."""
    allowed = settings.ALLOWED_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    return BrowserOriginValidator(URLRouter(websocket_urlpatterns), allowed)


async def broker_lifespan(scope: Any, receive: Any, send: Any) -> None:
    """ASGI lifespan of a broker under uvicorn (daphne sends none): deregister on shutdown."""
    from chatstream_site.roles import lifespan_serve

    await lifespan_serve(receive, send)
