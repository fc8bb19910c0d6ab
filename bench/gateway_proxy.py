"""Gateway benchmark: the same small GET straight to an api instance and through the gateway, in one run.

    .venv/bin/python bench/gateway_proxy.py [--seconds 5] [--concurrency 32] [--runs 3]

Starts private Redis and FerretDB (as the tests do), one real api instance (``manage.py role api``), a
stand-in broker (``chatstream_site/localstandin.py``) and one gateway (``manage.py role gateway``), then
alternates direct and proxied runs and prints the median of ``--runs`` of each:

* HTTP: ``GET /api/v1/bench-missing`` with a valid access token (Django answers its small JSON 404; through
  the gateway the request also passes rate limiting, JWT validation and identity signing). With 1
  connection (the added latency per proxied request: p50 through the gateway minus p50 direct) and with
  ``--concurrency`` keep-alive connections (requests/s).
* WebSocket: ``--ws-clients`` connections to the stand-in broker in echo mode, each sending a 64-byte frame
  and waiting for it to come back (one round trip at a time per connection), direct and through the gateway:
  round trips/s, p50, p99. Then open loop: the same connections send ``--ws-rate`` frames/s in total, each
  echoed once (deliveries/s), and the latency of every echo is measured (the issue's p99 at 5,000/s).

The load generator is a minimal asyncio HTTP/1.1 client (no load tool is installed on the machine) running
in this process, so it shares the machine's cores with the servers: compare the two columns, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Result:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int


def _summary(latencies: list[float], seconds: float, errors: int) -> Result:
    if not latencies:
        return Result(0.0, 0.0, 0.0, errors)
    latencies.sort()
    return Result(len(latencies) / seconds, latencies[len(latencies) // 2] * 1000,
                  latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, errors)


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def http_load(*, port: int, path: str, token: str, concurrency: int, seconds: float) -> Result:
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
               "Accept: application/json\r\n\r\n").encode()
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while loop.time() < deadline:
                started = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                if status >= 500 or status == 429:
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    began = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary(latencies, loop.time() - began, errors)


async def ws_load(*, urls: list[str], seconds: float) -> Result:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def client(url: str) -> None:
        async with connect(url, max_size=None, compression=None) as ws:
            await ws.recv()  # ready
            while loop.time() < deadline:
                started = time.perf_counter()
                await ws.send("x" * 64)
                await ws.recv()  # our frame, echoed (?echo=1)
                latencies.append(time.perf_counter() - started)

    began = loop.time()
    await asyncio.gather(*(client(url) for url in urls))
    return _summary(latencies, loop.time() - began, 0)


async def ws_paced(*, urls: list[str], rate: float, seconds: float) -> Result:
    """Open loop: the connections together send ``rate`` timestamped frames a second; each echo's latency is
    measured on arrival. Reports the deliveries/s achieved and the latency percentiles."""
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    interval = len(urls) / rate

    async def client(url: str, offset: float) -> None:
        async with connect(url, max_size=None, compression=None) as ws:
            await ws.recv()  # ready

            async def reader() -> None:
                async for frame in ws:
                    latencies.append(time.perf_counter() - float(str(frame).partition(":")[2]))

            reading = asyncio.ensure_future(reader())
            await asyncio.sleep(offset)  # spread the connections' sends over the interval
            due = loop.time()
            while loop.time() < deadline:
                await ws.send(f"t:{time.perf_counter()}")
                due += interval
                await asyncio.sleep(max(0.0, due - loop.time()))
            await asyncio.sleep(1.0)  # let the last echoes arrive
            reading.cancel()

    began = loop.time()
    await asyncio.gather(*(client(url, i * interval / len(urls)) for i, url in enumerate(urls)))
    return _summary(latencies, min(loop.time() - began, seconds), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--upstream", choices=("api", "standin"), default="api",
                        help="api: a real `manage.py role api` (Django); "
                             "standin: chatstream_site/localstandin.py (raw ASGI)")
    parser.add_argument("--ws-rate", type=float, default=5000.0,
                        help="frames/s of the open-loop WebSocket test (each echoed once: deliveries/s)")
    parser.add_argument("--ws-clients", type=int, default=32,
                        help="WebSocket connections, each doing one echo round trip at a time")
    args = parser.parse_args()

    from chatstream_site.localservers import servers_start

    workdir = Path(tempfile.mkdtemp(prefix="chatstream-bench-gw-"))
    servers = servers_start(workdir)
    os.environ.update(servers.env(), CHATSTREAM_DOTENV="", DEBUG="0", PYTHONUNBUFFERED="1",
                      SECRET_KEY=os.environ.get("SECRET_KEY", "bench-secret-key-long-enough-0123456789abcdef"),
                      CHATSTREAM_REGISTRY_HEARTBEAT="0.5", CHATSTREAM_REGISTRY_TTL="3",
                      CHATSTREAM_GATEWAY_RATE_IP="100000000/m", CHATSTREAM_GATEWAY_RATE_USER="100000000/m",
                      CHATSTREAM_GATEWAY_RATE_WS_IP="100000/m", CHATSTREAM_GATEWAY_RATE_WS_USER="100000/m",
                      CHATSTREAM_GATEWAY_WS_FRAME_RATE="1000000", CHATSTREAM_GATEWAY_WS_FRAME_BURST="1000000",
                      DJANGO_SETTINGS_MODULE="chatstream_site.settings")
    import django

    django.setup()
    import redis

    from chatstream_site.localfleet import Fleet
    from core.tokens import token_issue, ws_ticket_issue

    fleet = Fleet(servers, workdir, db=0)
    try:
        api = fleet.api(1) if args.upstream == "api" else fleet.stand_in("api", 1)
        broker = fleet.stand_in("broker", 1)
        gateway = fleet.gateway()
        for proc in (api, broker, gateway):
            own_health = proc is gateway or (proc is api and args.upstream == "api")
            proc.wait_healthy("/healthz" if own_health else "/__upstream/stats")
        fleet.wait_registered("api", 1)
        fleet.wait_registered("broker", 1)
        time.sleep(1.5)  # the gateway's registry cache
        token = token_issue(user_id="bench", username="bench", type="access")
        path = "/api/v1/bench-missing"
        client = redis.Redis.from_url(servers.redis_url)

        async def ws_urls(through_gateway: bool) -> list[str]:
            if through_gateway:
                return [f"ws://127.0.0.1:{gateway.port}/ws/?echo=1&ticket="
                        + ws_ticket_issue(client, user_id="bench", username="bench") for _ in range(args.ws_clients)]
            # Straight to the broker, without identity: the stand-in accepts it (a real broker would not).
            return [f"ws://127.0.0.1:{broker.port}/ws/?echo=1" for _ in range(args.ws_clients)]

        load_before = os.getloadavg()[0]
        rows: dict[str, list[Result]] = {"http c=1 direct": [], "http c=1 gateway": [],
                                         f"http c={args.concurrency} direct": [],
                                         f"http c={args.concurrency} gateway": [],
                                         "ws direct": [], "ws gateway": [],
                                         f"ws paced {args.ws_rate:.0f}/s direct": [],
                                         f"ws paced {args.ws_rate:.0f}/s gateway": []}
        # Warm up both paths (connection pools, imports, Django's first request).
        asyncio.run(http_load(port=api.port, path=path, token=token, concurrency=4, seconds=1))
        asyncio.run(http_load(port=gateway.port, path=path, token=token, concurrency=4, seconds=1))
        for _ in range(args.runs):
            for concurrency in (1, args.concurrency):
                for name, port in (("direct", api.port), ("gateway", gateway.port)):
                    rows[f"http c={concurrency} {name}"].append(asyncio.run(http_load(
                        port=port, path=path, token=token, concurrency=concurrency, seconds=args.seconds)))
            rows["ws direct"].append(asyncio.run(ws_load(urls=asyncio.run(ws_urls(False)), seconds=args.seconds)))
            rows["ws gateway"].append(asyncio.run(ws_load(urls=asyncio.run(ws_urls(True)), seconds=args.seconds)))
            for name, through in (("direct", False), ("gateway", True)):
                rows[f"ws paced {args.ws_rate:.0f}/s {name}"].append(asyncio.run(ws_paced(
                    urls=asyncio.run(ws_urls(through)), rate=args.ws_rate, seconds=args.seconds)))

        def median(results: list[Result], attr: str) -> float:
            return float(statistics.median(getattr(r, attr) for r in results))

        print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} "
              f"{platform.python_version()}, {platform.platform()}")
        print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        # The machine is shared: a load average well above the core count means other work competed.
        print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
        print(f"gateway server: {server_name(gateway.log())}; medians of {args.runs} runs of {args.seconds:.0f}s")
        print("| path | rate (/s) | p50 ms | p99 ms | errors |")
        print("| --- | --- | --- | --- | --- |")
        for name, results in rows.items():
            print(f"| {name} | {median(results, 'rate'):.0f} | {median(results, 'p50_ms'):.2f} | "
                  f"{median(results, 'p99_ms'):.2f} | {sum(r.errors for r in results)} |")
        c = args.concurrency
        http_ratio = median(rows[f"http c={c} gateway"], "rate") / max(median(rows[f"http c={c} direct"], "rate"), 1)
        ws_ratio = median(rows["ws gateway"], "rate") / max(median(rows["ws direct"], "rate"), 1)
        added = median(rows["http c=1 gateway"], "p50_ms") - median(rows["http c=1 direct"], "p50_ms")
        print(json.dumps({"http_gateway_over_direct": round(http_ratio, 2), "http_added_p50_ms": round(added, 2),
                          "ws_gateway_over_direct": round(ws_ratio, 2)}))
    finally:
        fleet.stop()
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def server_name(log: str) -> str:
    # The gateway's uvicorn logs at warning level (no "Uvicorn running" line); daphne names itself at start.
    return "daphne" if "daphne" in log.lower() else "uvicorn"


if __name__ == "__main__":
    main()
