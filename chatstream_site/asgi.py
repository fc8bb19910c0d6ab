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

from channels.routing import ProtocolTypeRouter
from django.conf import settings
from django.core.asgi import get_asgi_application

django_application = get_asgi_application()  # sets Django up before anything imports models

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
    # As the broker's below: a wave of connects sets off full collections that walked the ~190k objects of
    # start-up again each time (bench/gateway_gc.py, docs/benchmarks.md).
    gc.collect()
    gc.freeze()
elif settings.ROLE == "broker":
    application = ProtocolTypeRouter({
        "http": broker_http(django_application),
        "websocket": websocket_application(),  # Origin checked against ALLOWED_HOSTS (messaging/routing.py)
        "lifespan": broker_lifespan,  # uvicorn only; daphne never sends a lifespan scope
    })
    # Everything allocated so far (Django, the libraries, settings: ~300k objects) lives as long as the
    # process, yet every full collection of the cyclic GC walked it again: during `manage.py bench --rate 500`
    # a broker's full collections paused its loop 132-161 ms (timed with a gc.callbacks hook); with these
    # objects frozen, 47-96 ms. Objects allocated later (connections) are collected as before.
    gc.collect()
    gc.freeze()
else:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    # daphne serves no files itself: the admin's and the API docs page's assets come from the apps.
    application = ASGIStaticFilesHandler(django_application)

heartbeat_start()
