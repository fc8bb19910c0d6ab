"""The ASGI application of every HTTP role; ``CHATSTREAM_ROLE`` picks what it serves.

gateway -> the gateway app (proxy in front of everything); broker -> Channels (WebSocket consumers, plus
the health views over HTTP and nothing else); api (and no role) -> Django (DRF, admin, health views).
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatstream_site.settings")

import django
from channels.routing import ProtocolTypeRouter
from django.conf import settings
from django.urls import get_resolver

from chatstream_site.handler import ApiHandler  # imports no model: safe before the setup

django.setup(set_prefix=False)  # what get_asgi_application does, before anything imports models
django_application = ApiHandler()  # Django's ASGI handler, the request's sync work in one thread hop

from core.errors import error_body  # noqa: E402
from core.roles import heartbeat_start  # noqa: E402
from messaging.routing import broker_lifespan, websocket_application  # noqa: E402

BROKER_HTTP_PATHS = frozenset({"/healthz", "/readyz"})


def broker_http(app: Any) -> Any:
    """The broker's HTTP: its health views only. Everything else (the admin, the API) is the api role's and
    is answered 404 here, so a broker's port exposes nothing of it (docs/security.md)."""
    body = json.dumps(error_body(code="not_found",
                                 message="a broker serves /ws/, /healthz and /readyz only")).encode()

    async def serve(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("path") in BROKER_HTTP_PATHS:
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return serve


application: object
if settings.ROLE == "gateway":
    from gateway.app import GatewayApp

    application = GatewayApp()
    # What long_lived_freeze() below does for the brokers and the api, without importing the URLconf (the
    # gateway serves none of it): a wave of connects sets off full collections that walked the ~190k objects
    # of start-up again each time (bench/gateway_gc.py, docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    # Fewer young collections in a wave of connects: each connect's objects were walked in several before
    # they died or were promoted (settings.GATEWAY_GC_THRESHOLD says how the number was chosen).
    gc.set_threshold(settings.GATEWAY_GC_THRESHOLD, *gc.get_threshold()[1:])
elif settings.ROLE == "broker":
    application = ProtocolTypeRouter({
        "http": broker_http(django_application),
        "websocket": websocket_application(),  # Origin checked against ALLOWED_HOSTS (messaging/routing.py)
        "lifespan": broker_lifespan,  # uvicorn only; daphne never sends a lifespan scope
    })
else:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    from api.warm import api_warm, api_warm_requests
    from core.roles import lifespan_serve

    # The server serves no files itself: the admin's and the API docs page's assets come from the apps.
    django_with_static = ASGIStaticFilesHandler(django_application)

    async def api_application(scope: Any, receive: Any, send: Any) -> None:
        """Django, plus the ASGI lifespan under uvicorn (daphne sends none): warm the instance at startup
        (api/warm.py); deregister at shutdown, since uvicorn re-raises SIGTERM and the registry's atexit hook
        never runs (as for the brokers)."""
        if scope["type"] == "lifespan":
            # The first requests' connections, imports and first-time work, paid before the instance serves
            # (api/warm.py): anonymous requests through this application once the connections are open.
            await lifespan_serve(receive, send, on_startup_blocking=api_warm,
                                 on_startup_async=lambda: api_warm_requests(app=django_with_static))
            return
        await django_with_static(scope, receive, send)

    application = api_application


def long_lived_freeze() -> None:
    """Move everything allocated so far out of the cyclic GC's reach (``gc.freeze``), after importing what the
    first requests would (every URL's view, serializer and document class).

    Why: Django, the libraries and the settings (~150k objects in an api process) live as long as the process,
    yet every full collection walked them again. Timed with a gc.callbacks hook: during `manage.py bench
    --rate 500` a broker's full collections paused its loop 132-161 ms, with these objects frozen 47-96 ms; an
    api instance's, during `bench/read_paths.py`, 56-405 ms, frozen (after this import) 2-13 ms
    (docs/adr/0047), each pause the latency of the requests behind it. Objects allocated later (connections,
    caches, requests) are collected as before."""
    get_resolver().url_patterns  # noqa: B018 - imports the URLconf's modules now, not at the first request
    gc.collect()
    gc.freeze()


if settings.ROLE in ("broker", "api"):
    long_lived_freeze()
heartbeat_start()

