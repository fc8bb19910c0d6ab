"""Liveness and readiness checks shared by every role.

``/healthz`` means the process answers. ``/readyz`` means its Redis, the message bus (when that is another
Redis or a cluster) and MongoDB answer too. The checks are
synchronous and bounded by short timeouts; ASGI roles call them from Django's sync views (run in a thread
pool, never on the event loop), Celery roles from their small health server thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from django.conf import settings
from django.http import HttpRequest, JsonResponse

from core.errors import error_body

logger = logging.getLogger(__name__)


def redis_check(url: str | None = None, *, timeout_s: float = 1.0) -> str | None:
    """None when Redis answers PING, else the reason."""
    client = redis.Redis.from_url(url or settings.REDIS_URL, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        client.ping()
        return None
    except redis.RedisError as exc:
        return f"redis unreachable ({exc})"
    finally:
        client.close()


def bus_check(*, timeout_s: float = 1.0) -> str | None:
    """None when the message bus answers PING (docs/adr/0022), or when the bus is REDIS_URL itself (checked by
    :func:`redis_check`); else the reason. On a Redis Cluster every master must answer."""
    if not settings.STREAMS_REDIS_CLUSTER:
        if settings.STREAMS_REDIS_URL == settings.REDIS_URL:
            return None
        return redis_check(settings.STREAMS_REDIS_URL, timeout_s=timeout_s)
    import redis.cluster

    try:
        client = redis.cluster.RedisCluster.from_url(settings.STREAMS_REDIS_URL, socket_timeout=timeout_s,
                                                     socket_connect_timeout=timeout_s)
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        return f"redis cluster unreachable ({exc})"
    try:
        client.ping(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        return None
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        return f"redis cluster unreachable ({exc})"
    finally:
        client.close()


def mongodb_check(uri: str | None = None, *, timeout_ms: int | None = None) -> str | None:
    """None when the MongoDB-protocol server answers ``ping``, else the reason."""
    import pymongo
    import pymongo.errors

    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        uri or settings.MONGODB_URI,
        serverSelectionTimeoutMS=timeout_ms or settings.MONGODB_TIMEOUT_MS,
        connectTimeoutMS=timeout_ms or settings.MONGODB_TIMEOUT_MS,
    )
    try:
        client.admin.command("ping")
        return None
    except pymongo.errors.PyMongoError as exc:
        return f"mongodb unreachable ({str(exc).split(',')[0]})"
    finally:
        client.close()


def readiness() -> dict[str, str]:
    """Check every dependency; an empty dict means ready."""
    problems: dict[str, str] = {}
    if (reason := redis_check()) is not None:
        problems["redis"] = reason
    if settings.ROLE != "gateway" and (reason := bus_check()) is not None:
        problems["bus"] = reason
    if (reason := mongodb_check()) is not None:
        problems["mongodb"] = reason
    return problems


def healthz_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok", "role": settings.ROLE or "standalone"})


def readyz_view(request: HttpRequest) -> JsonResponse:
    problems = readiness()
    if problems:
        return JsonResponse({"status": "unavailable", "role": settings.ROLE, "problems": problems}, status=503)
    return JsonResponse({"status": "ready", "role": settings.ROLE})


Route = Callable[[], tuple[int, str, bytes]]


def _json(status: int, body: dict[str, object]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


def health_server_start(*, port: int, extra_routes: dict[str, Route] | None = None) -> ThreadingHTTPServer:
    """Serve ``/healthz`` and ``/readyz`` (and ``extra_routes``) on 127.0.0.1:``port`` from a daemon thread.

    For roles that are not HTTP servers themselves (Celery worker and beat). Side effect: binds the port.
    """
    role = settings.ROLE

    def healthz() -> tuple[int, str, bytes]:
        return _json(200, {"status": "ok", "role": role})

    def readyz() -> tuple[int, str, bytes]:
        problems = readiness()
        if problems:
            return _json(503, {"status": "unavailable", "role": role, "problems": problems})
        return _json(200, {"status": "ready", "role": role})

    routes: dict[str, Route] = {"/healthz": healthz, "/readyz": readyz, **(extra_routes or {})}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            status, ctype, body = route() if route else _json(404, error_body(
                code="not_found", message=f"no route {self.path}"))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("health %s", format % args)

    server = ThreadingHTTPServer((settings.BIND_HOST, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-server", daemon=True).start()
    return server
