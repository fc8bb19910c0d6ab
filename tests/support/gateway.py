"""Helpers of the gateway tests: gateways in front of stand-in upstreams (``chatstream_site.localstandin``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatstream_site.localfleet import Fleet, Proc, settle
from chatstream_site.localservers import Servers


@contextlib.contextmanager
def stand_in_fleet(servers: Servers, workdir: Path, *, db: int, brokers: int,
                   gateways: tuple[str, ...] = ("gateway",), **env: str) -> Iterator[dict[str, Any]]:
    """Gateways (named ``gateways``) before a stand-in api and ``brokers`` stand-in brokers (``broker``, or
    ``broker1``.. when several), on Redis db ``db`` with ``env``; yields the processes by name and the fleet
    (``"fleet"``) once all are healthy, registered, and seen by the gateways' registry refresh (every
    second). Stops them all after the block."""
    fleet = Fleet(servers, workdir, db=db, **env)
    try:
        procs: dict[str, Proc] = {"api": fleet.stand_in("api", 1)}
        for i in range(1, brokers + 1):
            procs["broker" if brokers == 1 else f"broker{i}"] = fleet.stand_in("broker", i)
        for name in gateways:
            procs[name] = fleet.gateway(name)
        for name, proc in procs.items():
            proc.wait_healthy("/healthz" if name in gateways else "/__upstream/stats")
        fleet.wait_registered("api", 1)
        fleet.wait_registered("broker", brokers)
        settle(1.5)
        yield {**procs, "fleet": fleet}
    finally:
        fleet.stop()
