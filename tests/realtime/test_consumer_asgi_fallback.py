"""The consumer under an ASGI server that is neither uvicorn nor daphne (here Channels' own test communicator,
whose ``send`` is a plain coroutine): its output falls back to ``_AsgiOutput`` (a byte-counted queue and one
writer task, docs/adr/0023) and must still deliver ready, acks, live events and error frames, against the
session's real Redis and FerretDB."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

from chatstream_site.localservers import Servers
from messaging import consumers, hub, transports
from messaging.routing import websocket_application
from tests.support.realtime import group_create, presence_live, send_frame, ticket_for, user_create

pytestmark = pytest.mark.cluster


async def frames_until(comm: WebsocketCommunicator, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The first frame of each wanted type, skipping others (presence frames of the other user); at most 20."""
    got: dict[str, dict[str, Any]] = {}
    for _ in range(20):
        frame = await comm.receive_json_from(timeout=20)
        if frame["type"] in wanted:
            got.setdefault(frame["type"], frame)
        if set(got) == wanted:
            return got
    raise AssertionError(f"no {sorted(wanted - set(got))} frame among 20")


def test_the_plain_asgi_output_delivers_everything(servers: Servers, fresh_hub: None) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        app = websocket_application()
        sender = WebsocketCommunicator(app, f"/ws/?ticket={ticket_for(servers.redis_url, alice)}")
        reader = WebsocketCommunicator(app, f"/ws/?ticket={ticket_for(servers.redis_url, bob)}")
        for comm in (sender, reader):
            connected, _ = await comm.connect(timeout=20)
            assert connected
            ready = await comm.receive_json_from(timeout=20)
            assert ready["type"] == "ready" and conv in ready["conversations"]
        conn = next(iter(hub.hub_get().by_user[bob]))
        assert isinstance(conn, consumers.ChatConsumer) and type(conn.out) is transports.AsgiOutput

        await sender.send_json_to(send_frame(conv, "over plain ASGI", client_msg_id="fallback-1"))
        got = await frames_until(sender, {"ack", "message.new"})  # the ack and the sender's own copy
        assert got["ack"]["seq"] == got["message.new"]["seq"] == 1
        delivered = (await frames_until(reader, {"message.new"}))["message.new"]
        assert delivered["message"]["content"] == "over plain ASGI" and delivered["seq"] == 1

        await reader.send_to(text_data="{not json")
        assert (await frames_until(reader, {"error"}))["error"]["code"] == "invalid_json"
        await reader.send_json_to({"type": "ping", "ref": 7})
        assert (await frames_until(reader, {"pong"}))["pong"] == {"type": "pong", "ref": 7}
        for comm in (sender, reader):
            await comm.disconnect(timeout=20)

    asyncio.run(body())


def test_the_plain_asgi_output_sends_the_error_before_the_close(servers: Servers, fresh_hub: None) -> None:
    async def body() -> None:
        comm = WebsocketCommunicator(websocket_application(), "/ws/?ticket=" + "0" * 40)
        connected, _ = await comm.connect(timeout=20)
        assert connected  # accepted first: close codes exist only on an accepted WebSocket
        error = await comm.receive_json_from(timeout=20)
        assert error["type"] == "error" and error["code"] == "unauthenticated"
        assert await comm.receive_output(timeout=20) == {"type": "websocket.close", "code": 4001}

    asyncio.run(body())


def test_an_exception_anywhere_in_a_connection_runs_the_cleanup(servers: Servers, fresh_hub: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever escapes a handler (here a stand-in bug in the frame path, outside the handler's own error
    frames) ends the connection with 1011 and runs websocket_disconnect: the hub forgets the socket and
    presence is released. Before, the exception left the consumer without it: the hub kept the socket and
    refreshed its presence for ever."""
    alice, _ = user_create()
    conv = group_create([alice, user_create()[0]])

    def a_bug(data: Any) -> Any:
        raise RuntimeError("a bug in the frame path")

    async def body() -> None:
        comm = WebsocketCommunicator(websocket_application(), f"/ws/?ticket={ticket_for(servers.redis_url, alice)}")
        connected, _ = await comm.connect(timeout=20)
        assert connected
        assert (await comm.receive_json_from(timeout=20))["type"] == "ready"
        the_hub = hub.hub_get()
        assert alice in the_hub.by_user and conv in the_hub.by_conversation
        for _ in range(2000):  # presence_connect runs in the background; bounded wait for it
            if await presence_live(the_hub.redis, alice):
                break
            await asyncio.sleep(0.01)
        assert await presence_live(the_hub.redis, alice)
        monkeypatch.setattr(consumers, "_ref_of", a_bug)
        await comm.send_json_to({"type": "ping"})
        assert await comm.receive_output(timeout=20) == {"type": "websocket.close", "code": 1011}
        await comm.wait(timeout=20)
        assert alice not in the_hub.by_user and conv not in the_hub.by_conversation
        assert not await presence_live(the_hub.redis, alice)

    asyncio.run(body())


def test_events_the_hub_delivers_while_a_connection_registers_come_after_ready(
        servers: Servers, fresh_hub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a connection awaits its partitions' stream positions, and the hub delivers meanwhile (another
    member's presence, a message): docs/protocol.md promises ``ready`` first, so those are held and sent right
    after it, in order, none lost."""
    from messaging import frames

    alice, _ = user_create()
    conv = group_create([alice, user_create()[0]])
    original = hub.Hub._partitions_acquire

    async def acquire_while_events_arrive(self: hub.Hub, partitions: list[int]) -> None:
        for n, conn in enumerate(sorted(self.by_conversation.get(conv, ()), key=id)):
            for seq in (1, 2):
                text = frames.frame("presence", user_id=f"peer-{n}-{seq}", status="online").encode()
                conn.deliver(conversation_id=conv, seq=0, text=text, wire=frames.ws_wire(text))
        await original(self, partitions)

    monkeypatch.setattr(hub.Hub, "_partitions_acquire", acquire_while_events_arrive)

    async def body() -> list[dict[str, Any]]:
        comm = WebsocketCommunicator(websocket_application(), f"/ws/?ticket={ticket_for(servers.redis_url, alice)}")
        connected, _ = await comm.connect(timeout=20)
        assert connected
        got = [await comm.receive_json_from(timeout=20) for _ in range(3)]
        await comm.disconnect(timeout=20)
        return got

    got = asyncio.run(body())
    assert [f["type"] for f in got] == ["ready", "presence", "presence"], got
    assert [f["user_id"] for f in got[1:]] == ["peer-0-1", "peer-0-2"]
