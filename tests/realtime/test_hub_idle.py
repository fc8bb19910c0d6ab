"""An idle broker keeps its background tasks alive: none of the hub's supervised loops dies while nothing
happens (the sessions loop's blocking channel-layer receive once raced redis-py's 5 s socket timeout and
restarted every ~5 s, an ERROR traceback each time, seen under `make run`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chatstream_site.localservers import Servers
from tests.support.realtime import brokers_running, connect_user, user_create

IDLE_S = 12  # two blocking receives of channels-redis (5 s each) and then some


def test_an_idle_broker_restarts_no_background_task(tmp_path: Path, servers: Servers) -> None:
    user, _ = user_create()

    async def idle(url: str) -> None:
        client = await connect_user(url, servers.redis_url, user)  # the hub's tasks run once a socket is open
        try:
            await asyncio.sleep(IDLE_S)
        finally:
            await client.close()

    with brokers_running(tmp_path, 1) as (broker,):
        asyncio.run(idle(broker.url))
        log = broker.log.read_text(errors="replace")
    assert "task failed" not in log, log[-4000:]
