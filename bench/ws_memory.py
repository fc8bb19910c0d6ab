"""Where a broker's (or the gateway's) memory per idle WebSocket goes: tracemalloc inside a real server.

Starts a private Redis and FerretDB (chatstream_site/localservers.py), serves the broker's ASGI app under uvicorn
exactly as ``manage.py role broker`` configures it, but in THIS process with tracemalloc on, and opens connections
from a child process (so client objects never count): a warm-up batch first (the hub's tasks, lazy imports, caches),
then ``--connections`` more. It prints the Python allocations that appeared per idle connection, grouped by source
file, next to the RSS growth per connection (what ``manage.py bench`` reports as KB/idle conn).

With ``--gateway`` the process serves the gateway's app instead (as ``manage.py role gateway`` configures
uvicorn), in front of a stand-in broker process (chatstream_site/localstandin.py), each connection with its own
ticket: what a proxied socket costs the gateway.

.venv/bin/python bench/ws_memory.py --connections 1000 [--gateway]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARMUP = 50
CLIENT = r"""
import asyncio, json, sys
import websockets

async def main():
    url, tickets = sys.argv[1], json.load(open(sys.argv[2]))
    conns, at = [], 0
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        count = int(line)
        async def one(ticket):
            ws = await websockets.connect(f"{url}?ticket={ticket}", open_timeout=120, compression=None)
            assert json.loads(await ws.recv())["type"] == "ready"
            return ws
        sem = asyncio.Semaphore(50)
        async def limited(ticket):
            async with sem:
                return await one(ticket)
        conns += await asyncio.gather(*(limited(t) for t in tickets[at:at + count]))
        at += count
        print("ok", flush=True)

asyncio.run(main())
"""


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--lines", action="store_true", help="group by source line instead of by file")
    parser.add_argument("--gateway", action="store_true", help="the gateway in front of a stand-in broker")
    parser.add_argument("--stock-protocol", action="store_true",
                        help="uvicorn's own WebSocket protocol class, not the roles' slotted one (docs/adr/0054)")
    opts = parser.parse_args()

    from chatstream_site.localservers import free_port, servers_start

    workdir = Path(tempfile.mkdtemp(prefix="chatstream-wsmem-"))
    servers = servers_start(workdir)
    os.environ.update(REDIS_URL=servers.redis_url, MONGODB_URI=servers.mongodb_uri, CHATSTREAM_DOTENV="",
                      DEBUG="1", CHATSTREAM_ROLE="gateway" if opts.gateway else "broker",
                      DJANGO_SETTINGS_MODULE="chatstream_site.settings", LOG_LEVEL="WARNING",
                      CHATSTREAM_GATEWAY_RATE_WS_IP="1000000000/m", CHATSTREAM_GATEWAY_RATE_WS_USER="1000000000/m",
                      SECRET_KEY=os.environ.get("SECRET_KEY", "bench-secret-key-long-enough-0123456789abcdef"))
    fleet = None
    try:
        import uvloop  # the brokers' loop (manage.py role broker runs uvicorn with --loop uvloop)

        if opts.gateway:
            from chatstream_site.localfleet import Fleet

            fleet = Fleet(servers, workdir, db=0)
            fleet.stand_in("broker", 1).wait_healthy("/__upstream/stats")
            fleet.wait_registered("broker", 1)
        uvloop.run(_measure(opts, servers, free_port(), workdir))
    finally:
        if fleet is not None:
            fleet.stop()
        servers.stop()


async def _measure(opts: argparse.Namespace, servers: object, port: int, workdir: Path) -> None:
    import uvicorn

    from bench import fanout as benchmark
    from storage.mongo import mongo_connect

    total = WARMUP + opts.connections
    import django

    django.setup()
    mongo_connect(os.environ["MONGODB_URI"])
    if opts.gateway:
        import redis

        from core.tokens import ws_ticket_issue

        store = redis.Redis.from_url(os.environ["REDIS_URL"])
        tickets = [ws_ticket_issue(store, user_id=f"u{i}", username=f"u{i}") for i in range(total)]
        store.close()
    else:
        members = benchmark.population(connections=total, conversations=max(1, total // 10))
        _, tickets, _ = await asyncio.to_thread(benchmark.chatstream_setup, redis_url=os.environ["REDIS_URL"],
                                             members=members, connections=total)
    (workdir / "tickets.json").write_text(json.dumps(tickets))
    # As manage.py role configures uvicorn for the role (chatstream_site/management/commands/role.py), its
    # protocol in slots as chatstream_site/uvicorn_main.py runs it (--stock-protocol: uvicorn's own class).
    from django.conf import settings

    if not opts.stock_protocol:
        from chatstream_site.uvicorn_main import ws_protocol_install

        ws_protocol_install()

    ping = ({"ws_ping_interval": 0 if settings.GATEWAY_WS_PING_WHEEL else settings.GATEWAY_WS_PING_INTERVAL_S,
             "ws_ping_timeout": settings.GATEWAY_WS_PING_TIMEOUT_S} if opts.gateway else {})
    config = uvicorn.Config("chatstream_site.asgi:application", host="127.0.0.1", port=port, loop="none",
                            http="httptools", ws="websockets-sansio", ws_max_size=65536,
                            ws_per_message_deflate=False, lifespan="on", log_level="warning",
                            proxy_headers=not opts.gateway, **ping)  # the gateway trusts no proxy by default
    server = uvicorn.Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, f"ws://127.0.0.1:{port}/ws/",
                               str(workdir / "tickets.json")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert client.stdin is not None and client.stdout is not None

    async def open_more(count: int) -> None:
        client.stdin.write(f"{count}\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        line = await asyncio.to_thread(client.stdout.readline)  # type: ignore[union-attr]
        assert line.strip() == "ok", f"client: {line!r}"
        await asyncio.sleep(3)  # the connects' background presence writes finish

    tracemalloc.start()
    await open_more(WARMUP)
    gc.collect()
    before, rss_before = tracemalloc.take_snapshot(), rss_kb()
    print(f"opening {opts.connections} connections...", file=sys.stderr)
    await open_more(opts.connections)
    gc.collect()
    after, rss_after = tracemalloc.take_snapshot(), rss_kb()
    stats = after.compare_to(before, "lineno" if opts.lines else "filename")
    # Tracing makes every allocation several times slower: off before the 1,000 disconnects, whose presence
    # updates would otherwise time out on Redis connects (noise after the measurement, not a finding).
    tracemalloc.stop()
    n = opts.connections
    traced = sum(s.size_diff for s in stats)
    print(f"\n{n} idle connections: RSS +{(rss_after - rss_before) / n:.1f} KB each (with tracemalloc's own "
          f"overhead), Python allocations +{traced / n / 1024:.1f} KB each\n")
    print(f"{'bytes/conn':>10}  {'blocks/conn':>11}  file")
    for stat in stats[:opts.top]:
        name = stat.traceback[0].filename + (f":{stat.traceback[0].lineno}" if opts.lines else "")
        for prefix in (str(ROOT) + "/", "site-packages/"):
            if prefix in name:
                name = name.split(prefix, 1)[1]
        print(f"{stat.size_diff / n:10.0f}  {stat.count_diff / n:11.1f}  {name}")
    client.stdin.close()
    client.wait(timeout=60)
    server.should_exit = True
    await serving


if __name__ == "__main__":
    main()
