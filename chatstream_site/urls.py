from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from chatstream_site.health import healthz_view, readyz_view
from core.errors import error_body

urlpatterns = [
    path("healthz", healthz_view),
    path("readyz", readyz_view),
    path("admin/storage/", include("storage.urls")),  # staff pages of the storage pipeline
    path("admin/", admin.site.urls),
    path("api/v1/", include("api.urls")),
]


def not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """JSON 404 everywhere (docs/interface.md error body), so API clients never have to parse HTML."""
    return JsonResponse(
        error_body(code="not_found", message=f"no route for {request.path}"), status=404
    )


def server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        error_body(code="internal", message="internal error; it has been logged"),
        status=500,
    )


handler404 = not_found
handler500 = server_error
