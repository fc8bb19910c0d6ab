"""WebSocket routes of the broker role (the consumers arrive with the real-time issue)."""

from __future__ import annotations

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []
