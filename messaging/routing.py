"""WebSocket routes of the broker role: one endpoint, ``/ws/?ticket=...`` (docs/protocol.md)."""

from __future__ import annotations

from django.urls import URLPattern, re_path

from messaging.consumers import ChatConsumer

websocket_urlpatterns: list[URLPattern] = [
    re_path(r"^ws/$", ChatConsumer.as_asgi()),
]
