"""What the gateway's revocation read costs (docs/adr/0032): one MGET of a token's ``cs:revoked:<jti>`` key and
its user's ``cs:revoked:user:<id>`` marker, next to the rate-limit MULTI (SET NX EX + INCR) the gateway already
does twice per authenticated request (per IP, per user). Same client as the gateway: redis-py asyncio.

Bounded: 2 x 5,000 sequential calls of each, then 50 concurrent callers x 200 calls of each.

.venv/bin/python bench/revocation_read.py --redis-url redis://127.0.0.1:6391/15
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import redis.asyncio

SEQUENTIAL = 5000
WORKERS, PER_WORKER = 50, 200


async def main(url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    await client.set("bench:revoked:user:u1", 3, ex=900)

    async def mget() -> None:
        await client.mget(["bench:revoked:deadbeef", "bench:revoked:user:u1"])

    async def multi() -> None:
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("bench:rl", 0, ex=61, nx=True)
            pipe.incr("bench:rl")
            await pipe.execute()

    calls: list[tuple[str, Callable[[], Awaitable[None]]]] = [("mget", mget), ("multi", multi)]
    for name, call in calls * 2:
        for _ in range(500):  # warm-up: connections made, code paths hot
            await call()
        samples = []
        for _ in range(SEQUENTIAL):
            started = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - started) * 1e6)
        samples.sort()
        print(f"{name:5s} sequential n={SEQUENTIAL}: median {statistics.median(samples):5.0f} us, "
              f"p99 {samples[int(SEQUENTIAL * 0.99)]:6.0f} us")
    for name, call in calls:
        async def worker(call: Callable[[], Awaitable[None]] = call) -> None:
            for _ in range(PER_WORKER):
                await call()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        print(f"{name:5s} {WORKERS} concurrent x {PER_WORKER}: "
              f"{WORKERS * PER_WORKER / (time.perf_counter() - started):6.0f} calls/s")
    await client.delete("bench:revoked:user:u1", "bench:rl")
    await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True)
    asyncio.run(main(parser.parse_args().redis_url))
