"""A broker's connect reads the user's conversation ids and joins the user's session group (docs/adr/0027) in one
script (``Hub.connection_read``), against the session's real Redis and FerretDB: the join is channels-redis' own
group membership (a logout's ``group_send`` finds it), and a discard of the same user that raced the join is
undone before the connection is registered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatstream_site.localservers import Servers
from messaging import frames, hub
from tests.support.realtime import group_create, user_create

pytestmark = pytest.mark.cluster


class Conn:
    """A connection as the hub sees one (``messaging.hub.Subscriber``)."""

    def __init__(self, user_id: str, session_id: str) -> None:
        self.user_id, self.session_id = user_id, session_id
        self.ended: list[int] = []

    def deliver(self, *, conversation_id: str, seq: int, text: bytes, wire: bytes) -> None:
        pass

    def membership_recheck(self, *, conversation_id: str | None) -> None:
        pass

    def session_end(self, *, code: int) -> None:
        self.ended.append(code)


async def _member(h: hub.Hub, user_id: str) -> bool:
    layer, channel = await h.sessions._session_layer()
    return await h.redis.zscore(layer._group_key(frames.user_group(user_id)), channel) is not None


def test_a_connect_joins_the_users_group_with_its_read_and_a_logout_reaches_it(servers: Servers,
                                                                              fresh_hub: None) -> None:
    alice, _ = user_create()
    bob, _ = user_create()
    conv = group_create([alice, bob])

    async def body() -> None:
        h = hub.hub_get()
        conn = Conn(alice, "s-join-1")
        found, joined = await h.connection_read(conn)
        assert conv in found and joined and await _member(h, alice)
        await h.connection_add(conn, conversation_ids=found, joined=joined)
        # A second socket of the same user here reads only: the broker is in the group already.
        again = Conn(alice, "s-join-2")
        found_again, joined_again = await h.connection_read(again)
        assert found_again == found and not joined_again
        # What api.accounts.user_sessions_close sends reaches this broker through the group the script joined.
        layer, _ = await h.sessions._session_layer()
        await layer.group_send(frames.user_group(alice), {"type": frames.SESSIONS_CLOSE, "user_id": alice,
                                                          "code": 4010})
        for _ in range(200):  # bounded: the sessions loop receives it in the background
            if conn.ended:
                break
            await asyncio.sleep(0.05)
        assert conn.ended == [4010]
        h.connection_remove(conn, conversation_ids=found)

    asyncio.run(body())


def test_a_discard_that_raced_the_join_is_undone_before_the_connection_counts(servers: Servers, fresh_hub: None,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _ = user_create()
    conv = group_create([alice])

    async def body() -> None:
        h = hub.hub_get()
        reading = h.sessions.add_reading

        async def add_reading_then_a_discard(user_id: str | None, *, key: str) -> tuple[list[Any], bool]:
            answer = await reading(user_id, key=key)
            # Meanwhile another socket of alice's on this broker registered and closed: its group_discard
            # (ZREM) reaches Redis after the script's ZADD.
            other = Conn(alice, "s-race-0")
            await h.connection_add(other, conversation_ids=[], joined=True)
            h.connection_remove(other, conversation_ids=[])
            await asyncio.gather(*h.sessions._background)
            assert not await _member(h, alice)
            return answer

        monkeypatch.setattr(h.sessions, "add_reading", add_reading_then_a_discard)
        conn = Conn(alice, "s-race-1")
        found, joined = await h.connection_read(conn)
        assert conv in found and not joined  # the join does not stand: connection_add makes it again
        await h.connection_add(conn, conversation_ids=found, joined=joined)
        assert await _member(h, alice)
        h.connection_remove(conn, conversation_ids=found)

    asyncio.run(body())
