"""The api's ASGI handler (chatstream_site/handler.py): Django's answers, with the request's sync work (middleware,
view) in one hop to a thread and nothing hopping back to the event loop in between."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from asgiref.sync import AsyncToSync

from chatstream_site.handler import ApiHandler
from tests.support.api import account

pytestmark = pytest.mark.usefixtures("servers", "generous_rates")


def asgi_get(app: Any, path: str, *, headers: list[tuple[bytes, bytes]], body: bytes = b"",
             method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through ``app`` as an ASGI server would make it: (status, headers, body)."""
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), *headers], "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8111)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.lower(): v for k, v in start["headers"]}, body_out


def test_a_request_runs_its_middleware_and_view_in_one_thread_without_hopping_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    me = account("asgi")
    app = ApiHandler()
    back_to_the_loop: list[str] = []
    original = AsyncToSync.__call__

    def counted(self: AsyncToSync, *args: Any, **kwargs: Any) -> Any:
        back_to_the_loop.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncToSync, "__call__", counted)
    status, headers, body = asgi_get(app, "/api/v1/users/me",
                                     headers=[(b"authorization", f"Bearer {me.access}".encode())])
    assert status == 200 and json.loads(body)["id"] == me.id, body
    assert headers[b"content-type"] == b"application/json"
    # Django's own handler, with these sync middlewares, hops back to the loop once per request (async_to_sync
    # of its async core) and into the thread again for the view.
    assert back_to_the_loop == []


def test_errors_and_request_bodies_pass_as_under_djangos_handler() -> None:
    app = ApiHandler()
    status, _headers, body = asgi_get(app, "/api/v1/users/me", headers=[])
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthenticated", body
    status, _headers, body = asgi_get(app, "/api/v1/auth/login", method="POST", body=b"{not json",
                                      headers=[(b"content-type", b"application/json")])
    assert status == 400 and "error" in json.loads(body), body
