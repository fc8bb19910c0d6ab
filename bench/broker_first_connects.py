"""A broker's (or a gateway's) first WebSocket connects against its later ones (issue 13, connect): each start is
a fresh `manage.py role broker` (uvicorn, its lifespan included) on private Redis + FerretDB, then 8 connects one at
a time straight to it: each a ticket from the api (not timed), then the WebSocket until ``ready`` (timed), then
closed. The user (7 accounts, 6 1:1 chats with a message each) is seeded, and its connect state warmed, through an
api instance and a broker of their own first, so every start measures the broker, not the user's first connect.
``--fresh gateway``: the brokers stay (the seeding one), each start is a fresh `manage.py role gateway` instead, and
a connect is the issue's (bench/data_tier.py ``connect_once``): the ticket through the gateway, then the WebSocket
through it until ``ready``, both timed; ``--fresh both``: a fresh broker and a fresh gateway per start.

Bounded: ``--starts`` brokers per checkout x 8 connects. ``--checkout DIR`` (repeatable): the code the measured
brokers run (default this checkout); with two, e.g. main's worktree and a change's, their starts alternate, so a
before/after pair shares the machine's moments. The api and the seeding broker always run this checkout.

nice -n 5 .venv/bin/python bench/broker_first_connects.py --starts 5 [--checkout DIR ...] --quiet-lock /work/wt
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.api_first_requests import (
    alternating,
    call,
    instance_start,
    instance_stop,
    rows_print,
    seed,
    servers_env,
    starts_parser,
)
from bench.quiet_lock import quiet_lock
from chatstream_site.localservers import ROOT

CONNECTS = 8


def ticket(api_port: int, *, token: str) -> str:
    """A ticket from the api (or the gateway) on ``api_port``."""
    conn = http.client.HTTPConnection("127.0.0.1", api_port)
    _, status, answer = call(conn, "POST", "/api/v1/auth/ws-ticket", token=token, body={})
    conn.close()
    assert status == 200, status
    return str(answer["ticket"])


async def connect_ms(broker_port: int, *, ticket_value: str) -> float:
    """The WebSocket straight to the broker until ``ready``, then closed: ms to ``ready``."""
    import websockets

    started = time.perf_counter()
    async with websockets.connect(f"ws://127.0.0.1:{broker_port}/ws/?ticket={ticket_value}") as ws:
        while json.loads(await ws.recv())["type"] != "ready":
            pass
        return (time.perf_counter() - started) * 1000


def measure(ws_port: int, *, api_port: int, token: str, ticket_timed: bool = False) -> list[float]:
    """``CONNECTS`` connects to ``ws_port``, ms each (the ticket's request to ``api_port`` included if
    ``ticket_timed``)."""
    row = []
    for _ in range(CONNECTS):
        started = time.perf_counter()
        value = ticket(api_port, token=token)
        ticket_ms = (time.perf_counter() - started) * 1000 if ticket_timed else 0.0
        row.append(ticket_ms + asyncio.run(asyncio.wait_for(connect_ms(ws_port, ticket_value=value), 30)))
        time.sleep(0.1)  # the broker's background work of the connect and the close (presence) is done
    return row


def main() -> None:
    parser = starts_parser(__doc__, measured="brokers (and gateways)")
    parser.add_argument("--fresh", choices=("broker", "gateway", "both"), default="broker")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="broker-first-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        env = servers_env(stack, workdir=workdir)
        # One user connects 8 times per start through the gateways: over their WebSocket limits (20/m a user,
        # 60/m an address) after three starts; the limits are not what this measures.
        env.update(CHATSTREAM_GATEWAY_RATE_WS_USER="100000/m", CHATSTREAM_GATEWAY_RATE_WS_IP="100000/m")
        api, api_port = instance_start(checkout=ROOT, env=env, workdir=workdir, n=1)
        stack.callback(instance_stop, api)
        token, _ = seed(api_port)
        broker, broker_port = instance_start(checkout=ROOT, env=env, workdir=workdir, n=1, role="broker", health=None)
        measure(broker_port, api_port=api_port, token=token)  # the user's first connects, not measured
        if args.fresh == "gateway":
            stack.callback(instance_stop, broker)
        else:
            instance_stop(broker)
        rows: dict[Path, list[list[float]]] = {checkout: [] for checkout in args.checkout or [ROOT]}
        with quiet_lock(args.quiet_lock):
            for start, checkout, n in alternating(list(rows), starts=args.starts):
                with contextlib.ExitStack() as started:
                    if args.fresh != "gateway":
                        broker, broker_port = instance_start(checkout=checkout, env=env, workdir=workdir, n=n,
                                                             role="broker", health=None)
                        started.callback(instance_stop, broker)
                    if args.fresh == "broker":
                        row = measure(broker_port, api_port=api_port, token=token)
                    else:
                        gateway, gateway_port = instance_start(checkout=checkout, env=env, workdir=workdir, n=n,
                                                               role="gateway", health="/readyz")
                        started.callback(instance_stop, gateway)
                        row = measure(gateway_port, api_port=gateway_port, token=token, ticket_timed=True)
                    rows[checkout].append(row)
                print(f"{checkout} start {start}: " + " ".join(f"{ms:5.1f}" for ms in row), flush=True)
        rows_print(rows, columns=[f"connect{i + 1}" for i in range(CONNECTS)])


if __name__ == "__main__":
    main()
