"""The WebSocket roles' uvicorn protocol keeps every attribute in slots (chatstream_site/uvicorn_main.py,
docs/adr/0054): a connection served by a real uvicorn through a whole life (handshake, frames both ways, a ping,
a close by either side) never allocates the instance dict the stock class carries, and the roles run it."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn
import websockets

from chatstream_site.management.commands.role import role_argv
from chatstream_site.uvicorn_main import SlottedWebSocketsSansIOProtocol, ws_protocol_install
from messaging.transports import internals_known


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve_and_talk(*, server_closes: bool) -> list[dict[str, Any]]:
    """Serve an echo app on the slotted protocol, talk to it once; the protocol's instance dict as seen by the
    app after each step."""
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        protocol = send.__self__
        assert type(protocol) is SlottedWebSocketsSansIOProtocol
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        seen.append(dict(vars(protocol)))
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message["text"].upper()})
            seen.append(dict(vars(protocol)))
            if server_closes:
                await send({"type": "websocket.close", "code": 4000})
                seen.append(dict(vars(protocol)))
        seen.append(dict(vars(protocol)))

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", http="h11",
                            ws=SlottedWebSocketsSansIOProtocol, lifespan="on", log_level="warning",
                            ws_ping_interval=0.05, ws_ping_timeout=5)
    server = uvicorn.Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/", compression=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "HELLO"
            await asyncio.sleep(0.2)  # uvicorn's keepalive pings and the client's pongs pass meanwhile
            if server_closes:
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 4000
        await asyncio.sleep(0.1)
    finally:
        server.should_exit = True
        await serving
    return seen


@pytest.mark.parametrize("server_closes", [False, True])
def test_a_connections_whole_life_keeps_the_protocols_attributes_in_slots(server_closes: bool) -> None:
    seen = asyncio.run(serve_and_talk(server_closes=server_closes))
    assert len(seen) >= 3
    assert all(attributes == {} for attributes in seen), seen


def test_the_websocket_roles_run_uvicorn_through_the_slotted_launcher(settings: Any) -> None:
    settings.BROKER_SERVER = "uvicorn"
    for role in ("gateway", "broker"):
        argv = role_argv(role, port=8123, instance=1, bindir="/venv/bin")
        assert argv[:3] == ["/venv/bin/python", "-m", "chatstream_site.uvicorn_main"], argv
        assert argv[argv.index("--ws") + 1] == "websockets-sansio"
    assert role_argv("api", port=8124, instance=1, bindir="/venv/bin")[0] == "/venv/bin/uvicorn"


def test_the_launcher_installs_the_slotted_class_for_the_tested_uvicorn_only(monkeypatch: Any) -> None:
    from uvicorn import config

    monkeypatch.setitem(config.WS_PROTOCOLS, "websockets-sansio", config.WS_PROTOCOLS["websockets-sansio"])
    assert internals_known("uvicorn")
    assert ws_protocol_install()
    loaded = uvicorn.Config("tests.realtime.test_uvicorn_slots:free_port", ws="websockets-sansio")
    loaded.load()
    assert loaded.ws_protocol_class is SlottedWebSocketsSansIOProtocol
    monkeypatch.setitem(config.WS_PROTOCOLS, "websockets-sansio", "uvicorn.protocols.websockets."
                        "websockets_sansio_impl:WebSocketsSansIOProtocol")
    monkeypatch.setenv("CHATSTREAM_UVICORN_SLOTS", "false")
    assert not ws_protocol_install()
    assert config.WS_PROTOCOLS["websockets-sansio"].endswith(":WebSocketsSansIOProtocol")
