"""The gateway: the only public entry, a plain ASGI app in front of every other role.

This first cut routes through the live registry: ``/api/``, ``/admin/`` and ``/static/`` go to api
instances, ``/ws/`` to brokers (WebSocket proxied both ways), ``/healthz`` and ``/readyz`` are its own.
Instances are picked round-robin among the live ones, a failed connect moves on to the next instance, and
when no instance of a role is left the answer is a fast 503 with ``Retry-After``. Auth, rate limits and
circuit breakers stack in front of this (issue: the API gateway).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import redis.asyncio
import websockets
import websockets.exceptions
from django.conf import settings

from chatstream_site.registry import ROLES, Instance, instances_list_async
from gateway.webclient import webclient_file, webclient_headers

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A registry read at most once a second: new instances get traffic within ~1 s of registering, and the
# gateway adds one SCAN+MGET per second to Redis, whatever its request rate.
REGISTRY_REFRESH_S = 1.0
RETRY_AFTER_S = 2
HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailers",
    b"transfer-encoding", b"upgrade", b"host", b"content-length",
}
ROUTES: tuple[tuple[str, str], ...] = (("/api/", "api"), ("/admin/", "api"), ("/static/", "api"))


class Registry:
    """A cached view of the live instances, refreshed lazily from Redis."""

    def __init__(self, redis_url: str) -> None:
        self._client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._instances: list[Instance] = []
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self._counters: dict[str, itertools.count[int]] = {}

    async def instances(self, role: str | None = None) -> list[Instance]:
        if time.monotonic() - self._fetched_at > REGISTRY_REFRESH_S:
            async with self._lock:
                if time.monotonic() - self._fetched_at > REGISTRY_REFRESH_S:
                    try:
                        self._instances = await instances_list_async(self._client)
                    except redis.RedisError as exc:
                        # Keep routing to the last known instances while Redis is away.
                        logger.warning("gateway: registry read failed: %s", exc)
                    self._fetched_at = time.monotonic()
        return [i for i in self._instances if role is None or i.role == role]

    async def candidates(self, role: str) -> list[Instance]:
        """Live instances of ``role``, rotated so successive calls start at the next one."""
        found = await self.instances(role)
        if not found:
            return []
        start = next(self._counters.setdefault(role, itertools.count())) % len(found)
        return found[start:] + found[:start]


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "details": details or {}}}).encode()


async def send_response(send: Send, status: int, body: bytes, *, content_type: bytes = b"application/json",
                        headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                    *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


class GatewayApp:
    def __init__(self) -> None:
        self.registry = Registry(settings.REDIS_URL)
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=1.0), follow_redirects=False)
        return self._http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle_http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # ------------------------------------------------------------------ HTTP

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path == "/healthz":
            await send_response(send, 200, b'{"status":"ok","role":"gateway"}')
            return
        if path == "/readyz":
            await self.readyz(send)
            return
        role = next((r for prefix, r in ROUTES if path.startswith(prefix)), None)
        if role is None:
            found = webclient_file(path) if scope["method"] in ("GET", "HEAD") else None
            if found is not None:
                ctype, body = found
                await send_response(send, 200, body, content_type=ctype.encode(), headers=webclient_headers(ctype))
            else:
                await send_response(send, 404, error_body("not_found", f"no route for {path}"))
            return
        await self.proxy_http(role, scope, receive, send)

    async def readyz(self, send: Send) -> None:
        live = await self.registry.instances()
        counts = {role: sum(1 for i in live if i.role == role) for role in ROLES}
        missing = [role for role, n in counts.items() if n == 0]
        status = 503 if missing else 200
        body = {"status": "unavailable" if missing else "ready", "instances": counts, "missing": missing}
        headers = [(b"retry-after", str(RETRY_AFTER_S).encode())] if missing else []
        await send_response(send, status, json.dumps(body).encode(), headers=headers)

    async def proxy_http(self, role: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        client = scope.get("client") or ("", 0)
        headers.append((b"x-forwarded-for", str(client[0]).encode()))
        query = scope.get("query_string", b"").decode()
        for instance in await self.registry.candidates(role):
            url = f"{instance.url}{scope['raw_path'].decode() if scope.get('raw_path') else scope['path']}"
            if query and "?" not in url:
                url += f"?{query}"
            try:
                upstream = await self.http.request(scope["method"], url, headers=headers, content=bytes(body))
            except httpx.ConnectError:
                logger.warning("gateway: %s %s refused the connection; trying the next one", role, instance.id)
                continue
            except httpx.TimeoutException:
                await send_response(send, 504, error_body("upstream_timeout", f"{role} did not answer in time"))
                return
            out = [(k.encode(), v.encode()) for k, v in upstream.headers.items()
                   if k.lower().encode() not in HOP_BY_HOP and k.lower() != "content-encoding"]
            await send({"type": "http.response.start", "status": upstream.status_code,
                        "headers": [*out, (b"content-length", str(len(upstream.content)).encode())]})
            await send({"type": "http.response.body", "body": upstream.content})
            return
        await send_response(
            send, 503, error_body("unavailable", f"no live {role} instance; try again shortly", {"role": role}),
            headers=[(b"retry-after", str(RETRY_AFTER_S).encode())],
        )

    # ------------------------------------------------------------------ WebSocket

    async def handle_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not scope["path"].startswith("/ws/"):
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 4004})
            return
        await receive()  # websocket.connect
        query = scope.get("query_string", b"").decode()
        upstream = None
        for instance in await self.registry.candidates("broker"):
            url = instance.url.replace("http://", "ws://", 1) + scope["path"] + (f"?{query}" if query else "")
            try:
                upstream = await websockets.connect(url, open_timeout=2, max_size=None)
                break
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                logger.warning("gateway: broker %s refused a WebSocket: %s", instance.id, exc)
        if upstream is None:
            # 1013 "try again later": no broker is live.
            await send({"type": "websocket.close", "code": 1013})
            return
        await send({"type": "websocket.accept"})
        await self._pump(upstream, receive, send)

    async def _pump(self, upstream: Any, receive: Receive, send: Send) -> None:
        async def client_to_upstream() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    await upstream.close()
                    return
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                await upstream.send(data)

        async def upstream_to_client() -> None:
            try:
                async for data in upstream:
                    key = "text" if isinstance(data, str) else "bytes"
                    await send({"type": "websocket.send", key: data})
            except websockets.exceptions.ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            await send({"type": "websocket.close", "code": 1011 if code == 1006 else code})

        tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()

