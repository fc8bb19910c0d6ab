from __future__ import annotations

from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"

    def ready(self) -> None:
        # Registers the OpenAPI description of the JWT authentication (drf-spectacular extension).
        import api.schema  # noqa: F401
