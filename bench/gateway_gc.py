"""What the cyclic GC costs the gateway during a wave of connects and while its sockets idle.

Serves the gateway's app under uvicorn in THIS process (as ``manage.py role gateway`` configures it) in front
of a stand-in broker (chatstream_site/localstandin.py), opens ``--connections`` sockets from a child process
in batches of 1,000 (each with its own ticket), and reports this process' CPU time and the time spent in
each generation's collections (a ``gc.callbacks`` hook) over the wave and over ``--idle-seconds`` after it.
``--unfrozen`` undoes the ``gc.freeze()`` the gateway's ASGI module does at start-up (the code before it).

.venv/bin/python -m bench.gateway_gc --connections 4000 [--unfrozen] [--gc-threshold 700]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ws_memory import CLIENT  # noqa: E402

BATCH = 1000  # connects per batch: their tickets are issued just before (a ticket lives 30 s at most)


class GcClock:
    """Count and time each generation's collections while installed."""

    def __init__(self) -> None:
        self.by_generation: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            entry = self.by_generation[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - self.started

    def seconds(self) -> float:
        return sum(s for _, s in self.by_generation.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--unfrozen", action="store_true", help="undo the start-up gc.freeze() (before)")
    parser.add_argument("--gc-threshold", type=int, default=0,
                        help="the gateway's young-collection threshold (CHATSTREAM_GATEWAY_GC_THRESHOLD; 700: "
                             "CPython's default, before session 8)")
    opts = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    from chatstream_site.localfleet import Fleet
    from chatstream_site.localservers import free_port, servers_start

    workdir = Path(tempfile.mkdtemp(prefix="chatstream-gateway-gc-"))
    servers = servers_start(workdir)
    os.environ.update(REDIS_URL=servers.redis_url, MONGODB_URI=servers.mongodb_uri, CHATSTREAM_DOTENV="",
                      DEBUG="0", CHATSTREAM_ROLE="gateway", DJANGO_SETTINGS_MODULE="chatstream_site.settings",
                      LOG_LEVEL="WARNING", CHATSTREAM_GATEWAY_RATE_WS_IP="1000000000/m",
                      CHATSTREAM_GATEWAY_RATE_WS_USER="1000000000/m",
                      **({"CHATSTREAM_GATEWAY_GC_THRESHOLD": str(opts.gc_threshold)} if opts.gc_threshold else {}),
                      SECRET_KEY=os.environ.get("SECRET_KEY", "bench-secret-key-long-enough-0123456789abcdef"))
    fleet = Fleet(servers, workdir, db=0)
    try:
        fleet.stand_in("broker", 1).wait_healthy("/__upstream/stats")
        fleet.wait_registered("broker", 1)
        import uvloop

        uvloop.run(_measure(opts, free_port(), workdir))
    finally:
        fleet.stop()
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _measure(opts: argparse.Namespace, port: int, workdir: Path) -> None:
    import redis
    import uvicorn
    from django.conf import settings

    from core.tokens import ws_ticket_issue

    ping_s = 0 if settings.GATEWAY_WS_PING_WHEEL else settings.GATEWAY_WS_PING_INTERVAL_S  # as manage.py role
    config = uvicorn.Config("chatstream_site.asgi:application", host="127.0.0.1", port=port, loop="none",
                            http="httptools", ws="websockets-sansio", ws_max_size=65536,
                            ws_per_message_deflate=False, lifespan="on", log_level="warning", proxy_headers=False,
                            ws_ping_interval=ping_s, ws_ping_timeout=settings.GATEWAY_WS_PING_TIMEOUT_S)
    server = uvicorn.Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    if opts.unfrozen:
        gc.unfreeze()
    store = redis.Redis.from_url(os.environ["REDIS_URL"])
    tickets = workdir / "tickets.json"
    # The ticket list is read anew for each batch (the broker-side bench's client reads it once).
    client_code = CLIENT.replace("url, tickets = sys.argv[1], json.load(open(sys.argv[2]))", "url = sys.argv[1]")
    client_code = client_code.replace("count = int(line)",
                                      "count = int(line); tickets = json.load(open(sys.argv[2])); at = 0")
    client = subprocess.Popen([sys.executable, "-c", client_code, f"ws://127.0.0.1:{port}/ws/", str(tickets)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None

    async def open_more(count: int, first: int) -> None:
        tickets.write_text(json.dumps([ws_ticket_issue(store, user_id=f"u{i}", username=f"u{i}")
                                       for i in range(first, first + count)]))
        client.stdin.write(f"{count}\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        line = await asyncio.to_thread(client.stdout.readline)  # type: ignore[union-attr]
        assert line.strip() == "ok", f"client: {line!r}"

    await open_more(50, 0)  # warm-up: lazy imports, pools
    for phase in ("wave", "idle"):
        clock = GcClock()
        gc.callbacks.append(clock)
        cpu0, wall0 = time.process_time(), time.monotonic()
        if phase == "wave":
            for first in range(50, 50 + opts.connections, BATCH):
                await open_more(min(BATCH, 50 + opts.connections - first), first)
        else:
            await asyncio.sleep(opts.idle_seconds)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        gc.callbacks.remove(clock)
        counts = {g: f"{int(n)} in {s:.3f} s" for g, (n, s) in clock.by_generation.items()}
        print(json.dumps({"phase": phase, "frozen": not opts.unfrozen, "gc_threshold": gc.get_threshold()[0],
                          "connections": opts.connections,
                          "cpu_s": round(cpu, 2), "cpu_pct": round(100 * cpu / wall, 2),
                          "gc_s": round(clock.seconds(), 3), "gc_share_pct": round(100 * clock.seconds() / cpu, 1),
                          "collections": counts, "load_average_1m": round(os.getloadavg()[0], 1)}))
    client.stdin.close()
    client.kill()
    store.close()
    server.should_exit = True
    await serving


if __name__ == "__main__":
    main()
