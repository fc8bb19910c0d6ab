"""Property-based fuzzing (hypothesis) of what one user can send, against real processes: two brokers (one on
uvicorn, one on daphne), one ``api`` instance, the session's Redis and FerretDB; at the end the storage drain
(``storage.services.partition_drain``, run in the test process) persists what was accepted.

mallory sends arbitrary JSON (deep, wide, odd Unicode: lone surrogates, NUL, controls, U+2028; wrong types;
frame-shaped objects naming real conversations and messages) as WebSocket frames to both brokers and as
REST bodies to the endpoints that take one. alice writes beside her in a conversation they share, and bob
reads. The properties (issue 11):

* no REST answer is a 500, and every error has the JSON error body;
* mallory's own socket answers every frame (a ``ping`` after each one gets its ``pong``; no ``internal``
  error), or is closed with a documented close code for bad input (then she reconnects);
* alice's and bob's sockets are never closed, every message alice sends is acknowledged and delivered to
  bob, and, after the drain, persisted in MongoDB exactly once, none of them dead-lettered.

Bounded: MAX_EXAMPLES examples (each one frame, one REST request and one message of alice's): 15 s of
examples, 22 s with the processes' start (measured here: `pytest tests/realtime/test_fuzz_isolation.py
--hypothesis-show-statistics`). Fails on 5fb6b10: a ``ref`` of ``"\\ud800"`` killed mallory's socket.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream_site.localcluster import child_env
from chatstream_site.localfleet import Proc
from chatstream_site.localservers import Servers, free_port
from core.documents import Message
from core.keys import partition_of
from core.tokens import token_issue
from messaging.consumers import ChatConsumer
from storage.selectors import deadletters_list
from storage.services import partition_drain
from tests.support.realtime import (
    Broker,
    Client,
    brokers_running,
    connect_user,
    group_create,
    send_frame,
    user_create,
)

pytestmark = pytest.mark.cluster

# Enough to hit every frame type and endpoint with many shapes each; small enough for well under a minute.
MAX_EXAMPLES = 300
# Close codes docs/protocol.md gives for a client's own bad input (1011 is a broker bug: never allowed).
INPUT_CLOSE_CODES = {1009, 4008}
WAIT_S = 20.0

# ------------------------------------------------------------------ strategies

ODD = ["\ud800", "\udfff", "\udbff\udc00", "\x00", "\x1b[2J", "\u2028", "\ufeff", "\ufffe", "\U0001f600", "é", '"',
       "\\", "{", "$gt", ".", "a", " ", "\t"]
odd_text = st.one_of(st.text(max_size=20), st.lists(st.sampled_from(ODD), max_size=8).map("".join))
# Placeholders swapped for real ids at send time: frames that reach the write path, not only its validation.
PLACEHOLDERS = ["@shared", "@private", "@mallory_msg", "@alice_msg", "@unknown_conv"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), odd_text, st.sampled_from(PLACEHOLDERS))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=6), st.dictionaries(odd_text, children, max_size=6)), max_leaves=25)
FRAME_TYPES = [*sorted(ChatConsumer.HANDLERS), "no.such", ""]
CONVERSATIONS = st.sampled_from(["@shared", "@private", "@unknown_conv"])
# Per field: a value that passes the field's own check (so the frame reaches the next check, or the stream),
# or anything at all.
PLAUSIBLE = {
    "conversation_id": CONVERSATIONS,
    "client_msg_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
    "content": odd_text,
    "message_id": st.sampled_from(["@mallory_msg", "@alice_msg", "f" * 32]),
    "seq": st.integers(min_value=-1, max_value=2**63),
    "conversations": st.dictionaries(CONVERSATIONS, st.integers(min_value=-1, max_value=100), max_size=3),
    "ref": st.one_of(odd_text, st.integers()),
}
frame_shaped = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(FRAME_TYPES), json_values)},
    optional={k: st.one_of(v, v, json_values) for k, v in PLAUSIBLE.items()})
# Frames (and REST bodies) that pass every check but the content's: what reaches the stream if the content
# rule lets it through.
well_formed = st.one_of(
    st.fixed_dictionaries({"type": st.just("message.send"), "conversation_id": st.just("@shared"),
                           "client_msg_id": PLAUSIBLE["client_msg_id"], "content": odd_text}),
    st.fixed_dictionaries({"type": st.just("message.edit"), "message_id": st.just("@mallory_msg"),
                           "content": odd_text}))
# Nesting around the recursion limit (~1,000) and far past it, each under the 64 KiB frame limit (a bigger
# frame is closed with 1009, which tests/realtime/test_realtime.py covers; here nesting is the point).
deep = st.integers(min_value=500, max_value=9_000).flatmap(lambda n: st.sampled_from([
    "[" * n + "]" * n, '{"type": "message.send", "content": ' + "[" * n + "]" * n + "}",
    '{"a": ' * n + "1" + "}" * n]))
bodies = st.one_of(json_values, frame_shaped, well_formed, deep)
REST_CALLS = [("POST", "/api/v1/conversations/@shared/messages"), ("PATCH", "/api/v1/messages/@mallory_msg"),
              ("POST", "/api/v1/conversations/@shared/read"), ("POST", "/api/v1/chats/group"),
              ("PATCH", "/api/v1/users/me"), ("POST", "/api/v1/users/me/contacts"), ("POST", "/api/v1/chats/single")]


# ------------------------------------------------------------------ the world the examples share


@dataclass
class World:
    loop: asyncio.AbstractEventLoop
    brokers: list[Broker]
    api: str
    redis_url: str
    ids: dict[str, str]
    mallory: str
    alice: str
    bob: str
    mallory_ws: list[Client] = field(default_factory=list)
    alice_ws: list[Client] = field(default_factory=list)
    bob_ws: Client | None = None
    alice_sent: list[str] = field(default_factory=list)  # message ids acknowledged to alice
    http: httpx.Client | None = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, WAIT_S * 3))

    def substitute(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.ids.get(value, value)
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {self.substitute(k): self.substitute(v) for k, v in value.items()}
        return value


def encoded(value: Any) -> str:
    """JSON text of ``value`` as a client would send it: raw UTF-8 where it can be, escapes (``\\ud800``)
    for what has no UTF-8."""
    if isinstance(value, str) and value.startswith(("[[", '{"type": "message.send", "content": [', '{"a": {')):
        return value  # a deep body is sent as is
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text


@pytest.fixture(scope="module")
def world(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("fuzz")
    mallory, _ = user_create()
    alice, _ = user_create()
    bob, _ = user_create()
    shared = group_create([mallory, alice, bob])
    private = group_create([alice, bob])
    api_port = free_port()
    api = Proc("api", [sys.executable, "manage.py", "role", "api", "--port", str(api_port)],
               child_env(DEBUG="0"), api_port, workdir / "api.log").start()
    loop = asyncio.new_event_loop()
    # No frame rate limit in the way: the fuzzer sends two frames per example as fast as it can.
    unlimited = {"CHATSTREAM_WS_RATE": "100000", "CHATSTREAM_WS_BURST": "100000"}
    (workdir / "uvicorn").mkdir()
    (workdir / "daphne").mkdir()
    with brokers_running(workdir / "uvicorn", 1, CHATSTREAM_BROKER_SERVER="uvicorn", **unlimited) as on_uvicorn, \
         brokers_running(workdir / "daphne", 1, CHATSTREAM_BROKER_SERVER="daphne", **unlimited) as on_daphne:
        try:
            api.wait_healthy()
            w = World(loop=loop, brokers=on_uvicorn + on_daphne, api=api.url, redis_url=servers.redis_url,
                      ids={"@shared": shared, "@private": private, "@unknown_conv": "0" * 24},
                      mallory=mallory, alice=alice, bob=bob)
            w.http = httpx.Client(base_url=api.url, timeout=WAIT_S, headers={
                "Authorization": f"Bearer {token_issue(user_id=mallory, username='mallory', type='access')}"})

            async def setup() -> None:
                w.bob_ws = await connect_user(w.brokers[1].url, w.redis_url, bob)
                for broker in w.brokers:
                    w.mallory_ws.append(await connect_user(broker.url, w.redis_url, mallory))
                    w.alice_ws.append(await connect_user(broker.url, w.redis_url, alice))
                for who, client, key in ((mallory, w.mallory_ws[0], "@mallory_msg"),
                                         (alice, w.alice_ws[0], "@alice_msg")):
                    await client.send(send_frame(shared, f"first of {who}"))
                    ack = await client.recv_type("ack")
                    w.ids[key] = ack["message_id"]
                    if who == alice:
                        w.alice_sent.append(ack["message_id"])

            w.run(setup())
            yield w
        finally:
            if w.http is not None:
                w.http.close()
            for client in [*w.mallory_ws, *w.alice_ws, *([w.bob_ws] if w.bob_ws else [])]:
                loop.run_until_complete(client.close())
            loop.close()
            api.stop()


# ------------------------------------------------------------------ one example


async def mallory_frame(w: World, which: int, text: str) -> None:
    """Send one frame and a ping after it: the pong must come (frames are answered in order), or the socket
    must have been closed with a documented close code, after which mallory reconnects."""
    client = w.mallory_ws[which]
    ref = uuid.uuid4().hex
    try:
        await client.send(text)
        await client.send({"type": "ping", "ref": ref})
        while True:
            frame = await client.recv_type("pong", "error")
            if frame["type"] == "pong" and frame.get("ref") == ref:
                client.skipped.clear()
                client.seen.clear()
                return
            if frame["type"] == "error":
                assert isinstance(frame.get("code"), str) and isinstance(frame.get("message"), str), frame
                assert frame["code"] != "internal", (text[:200], frame)  # a broker bug, logged there
    except websockets.exceptions.ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else None
        # Reconnected first, so that hypothesis' replays and shrinking start from an open socket again.
        w.mallory_ws[which] = await connect_user(w.brokers[which].url, w.redis_url, w.mallory)
        assert code in INPUT_CLOSE_CODES, f"mallory's socket closed with {code} after {text[:200]!r}"


async def alice_writes(w: World, which: int) -> None:
    client = w.alice_ws[which]
    await client.send(send_frame(w.ids["@shared"], f"alice {len(w.alice_sent)}"))
    ack = await client.recv_type("ack")
    assert ack["duplicate"] is False and ack["conversation_id"] == w.ids["@shared"]
    w.alice_sent.append(ack["message_id"])
    client.skipped.clear()
    client.seen.clear()


def rest_call(w: World, method: str, path: str, body: str) -> None:
    assert w.http is not None
    for placeholder, real in w.ids.items():
        path = path.replace(placeholder, real)
    response = w.http.request(method, path, content=body.encode("utf-8", "backslashreplace"),
                              headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (method, path, body[:200], response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "details"} and isinstance(error["code"], str), error


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(frame=bodies, rest=bodies, call=st.sampled_from(REST_CALLS), which=st.integers(min_value=0, max_value=1))
def test_nothing_mallory_sends_reaches_anyone_else(world: World, frame: Any, rest: Any, call: tuple[str, str],
                                                   which: int) -> None:
    w = world
    w.run(mallory_frame(w, which, encoded(w.substitute(frame))))
    rest_call(w, call[0], call[1], encoded(w.substitute(rest)))
    w.run(alice_writes(w, which))


def test_after_the_fuzzing_alices_messages_are_delivered_and_persisted_once(world: World) -> None:
    """Runs after the fuzzer (file order): alice's and bob's sockets are open, bob got every message alice
    sent, and the real drain persisted each of them once, none dead-lettered."""
    w = world
    assert len(w.alice_sent) > 1

    async def check() -> set[str]:
        for client in [*w.alice_ws, w.bob_ws]:
            assert client is not None
            await client.send({"type": "ping", "ref": "still-open"})
            assert (await client.recv_type("pong"))["ref"] == "still-open"
        assert w.bob_ws is not None
        got: set[str] = set()
        while not set(w.alice_sent) <= got:
            frame = await w.bob_ws.recv_type("message.new")
            if frame["message"]["sender_id"] == w.alice:
                got.add(frame["message"]["id"])
        return got

    w.run(check())
    partition = partition_of(w.ids["@shared"])
    for _ in range(200):  # batches of 500: far more rounds than the entries the fuzzer can have appended
        result = partition_drain(partition=partition, batch_size=500, consumer="fuzz")
        if not result.busy and not result.more and result.read == 0:
            break
        if result.busy:
            time.sleep(0.1)  # a storage drain of another test holds the lease; bounded by the loop
    stored = [str(m.id) for m in Message.objects(id__in=w.alice_sent).only("id")]
    assert sorted(stored) == sorted(w.alice_sent)
    dead = {json.loads(d.fields.get("d", "{}")).get("id") for d in deadletters_list(limit=10_000)
            if d.partition == partition}
    assert not dead & set(w.alice_sent)
