"""The Celery app of the storage roles (worker on queue ``storage``, and beat).

Workers and beat join the service registry and serve ``/healthz`` and ``/readyz`` on their instance port
(set by ``manage.py role``); run by hand with ``celery -A chatstream_site worker -Q storage`` they simply
skip both.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_ready, worker_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatstream_site.settings")

app = Celery("chatstream_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _join_cluster(*, metrics: bool = False) -> None:
    from chatstream_site.health import Route, health_server_start
    from core.roles import heartbeat_start

    port = os.environ.get("CHATSTREAM_INSTANCE_PORT")
    if port:
        routes: dict[str, Route] = {}
        if metrics:  # storage workers serve the pipeline's Prometheus metrics beside their health checks
            from storage.metrics import metrics_route

            routes["/metrics"] = metrics_route
        health_server_start(port=int(port), extra_routes=routes)
    heartbeat_start()


@worker_ready.connect
def _worker_ready(**kwargs: Any) -> None:
    _join_cluster(metrics=True)


@beat_init.connect
def _beat_init(**kwargs: Any) -> None:
    _join_cluster()


@worker_shutdown.connect
def _worker_shutdown(**kwargs: Any) -> None:
    from core.roles import heartbeat_stop

    heartbeat_stop()
