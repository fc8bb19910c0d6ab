"""Process roles: which port an instance listens on and how it joins the registry.

``python manage.py role <role> --instance N`` (see ``chatstream_site/management/commands/role.py``) exports
``CHATSTREAM_ROLE``, ``CHATSTREAM_INSTANCE`` and ``CHATSTREAM_INSTANCE_PORT`` before it execs the real server
(daphne or Celery); the server process then calls :func:`heartbeat_start` once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from core.registry import ROLES, Heartbeat

# Offsets from CHATSTREAM_PORT_BASE: instance N of a role listens on base + offset + N
# (brokers 8101.., api 8111.., storage health 8121.., beat health 8131.. with the default base).
PORT_OFFSETS = {"broker": 0, "api": 10, "storage": 20, "storage-beat": 30}

_heartbeat: Heartbeat | None = None


def role_port(role: str, instance: int) -> int:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if role == "gateway":
        return int(settings.GATEWAY_PORT)
    return int(settings.PORT_BASE) + PORT_OFFSETS[role] + instance


def instance_number() -> int:
    """This process' instance number within its role (``CHATSTREAM_INSTANCE``, set by the ``role`` command);
    1 when unset or not a positive number (tests, shells)."""
    raw = os.environ.get("CHATSTREAM_INSTANCE", "1")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def heartbeat_start() -> Heartbeat | None:
    """Register this process in the registry if it was started as a role; idempotent.

    Precondition: ``CHATSTREAM_ROLE`` and ``CHATSTREAM_INSTANCE_PORT`` are set (by the ``role`` command);
    otherwise (tests, shells, ``manage.py`` commands) nothing happens. Side effect: one Redis write now,
    then a daemon thread refreshing it.
    """
    global _heartbeat
    role = os.environ.get("CHATSTREAM_ROLE", "")
    port = os.environ.get("CHATSTREAM_INSTANCE_PORT", "")
    if _heartbeat is not None or not role or not port:
        return _heartbeat
    instance = str(instance_number())
    # A random suffix makes a restarted instance a new registration, so nobody mistakes it for the old one.
    instance_id = f"{role}-{instance}-{socket.gethostname()}-{secrets.token_hex(3)}"
    host = os.environ.get("CHATSTREAM_INSTANCE_HOST", "127.0.0.1")
    # Counted by `manage.py role` before the exec (core/registry.py: start_count_incr).
    restarts = os.environ.get("CHATSTREAM_RESTARTS", "0")
    _heartbeat = Heartbeat(
        redis_url=settings.REDIS_URL,
        role=role,
        instance_id=instance_id,
        url=f"http://{host}:{port}",
        interval_s=settings.REGISTRY_HEARTBEAT_S,
        ttl_s=settings.REGISTRY_TTL_S,
        restarts=int(restarts) if restarts.isdigit() else 0,
        run_id=run_id(),
        slot=instance,
    )
    _heartbeat.start()
    return _heartbeat


def run_id() -> str:
    """The run that restarts are counted in: ``CHATSTREAM_RUN_ID`` (``make run`` sets a fresh one per run), else
    the host (a container keeps its hostname across restarts; a new container is a new run)."""
    return os.environ.get("CHATSTREAM_RUN_ID") or f"host-{socket.gethostname()}"


def url_redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages (``make run`` gives its Redis one)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def heartbeat_stop() -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


async def lifespan_serve(receive: Any, send: Any, *, on_startup: Callable[[], None] | None = None,
                         on_startup_blocking: Callable[[], None] | None = None,
                         on_startup_async: Callable[[], Awaitable[object]] | None = None,
                         on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
    """Answer an ASGI lifespan scope (the uvicorn roles: gateway, broker, api): run ``on_startup`` (on the
    server's loop), ``on_startup_blocking`` (in a thread), then ``on_startup_async`` (awaited on the loop) at startup,
    in that order, before the server accepts a connection;
    deregister on shutdown, then run ``on_shutdown``. uvicorn re-raises SIGTERM after its
    graceful shutdown (which first closes every WebSocket, so each broker session has said offline), so the
    registry's atexit hook never runs.
    Side effect: deletes this instance's registry key."""
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            if on_startup is not None:
                on_startup()
            if on_startup_blocking is not None:
                await asyncio.to_thread(on_startup_blocking)
            if on_startup_async is not None:
                await on_startup_async()
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await asyncio.to_thread(heartbeat_stop)
            if on_shutdown is not None:
                await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
