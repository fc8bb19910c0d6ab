"""Private Redis, FerretDB and Redis Cluster servers on free loopback ports, for the tests and the benchmarks.

No role imports this module: it is the harness that tests/ and bench/ share, so a
benchmark never imports the test suite. Each pytest session (and each benchmark run) gets its own servers with data
in a temporary folder, so runs never see each other's keys and a developer's `make run` keeps working beside `make
test`. Precondition: `scripts/bootstrap.py install` put `redis-server` on PATH and FerretDB in .tools/bin.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis.asyncio

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
FERRETDB_BIN = ROOT / ".tools" / "bin" / "ferretdb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


@dataclass
class Server:
    name: str
    port: int
    argv: list[str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, *, timeout_s: float = 20.0) -> None:
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        wait_port(self.port, timeout_s=timeout_s, proc=self.proc)

    def stop(self, *, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_server(workdir: Path, *, port: int | None = None) -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: run `python3 scripts/bootstrap.py install` "
                           "or `apt-get install redis-server`")
    port = port or free_port()
    data = workdir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec"]
    return Server("redis", port, argv, data)


def ferretdb_server(workdir: Path, *, port: int | None = None, binary: Path | None = None,
                    metrics_port: int | None = None) -> Server:
    """A FerretDB v1 (SQLite) server; ``binary``: another build than .tools/bin's (benchmarks compare builds);
    ``metrics_port``: also serve its Prometheus metrics (``/debug/metrics``, which count the commands it ran by
    name: bench/connects.py reads them to count document-store reads)."""
    binary = binary or FERRETDB_BIN
    if not binary.exists():
        raise RuntimeError(f"FerretDB not found at {binary}: run `python3 scripts/bootstrap.py install`")
    port = port or free_port()
    data = workdir / f"ferretdb-{port}"
    (data / "db").mkdir(parents=True, exist_ok=True)
    (data / "state").mkdir(parents=True, exist_ok=True)
    argv = [str(binary), "--handler=sqlite", f"--sqlite-url=file:{data / 'db'}/",
            f"--listen-addr=127.0.0.1:{port}", f"--state-dir={data / 'state'}", "--telemetry=disable",
            "--log-level=warn", f"--debug-addr=127.0.0.1:{metrics_port}" if metrics_port else "--debug-addr=-"]
    return Server("ferretdb", port, argv, data)


@dataclass
class Servers:
    """The servers of one session and the URLs the code under test should use."""

    workdir: Path
    redis: Server
    mongodb: Server | None
    redis_url: str
    mongodb_uri: str

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis_url, "MONGODB_URI": self.mongodb_uri}

    def stop(self) -> None:
        self.redis.stop()
        if self.mongodb is not None:
            self.mongodb.stop()


def run_with_redis(redis_url: str, body: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
    """Run ``body(client)`` on a fresh event loop with an asyncio Redis client it closes afterwards."""

    async def main() -> T:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def servers_start(workdir: Path, *, ferretdb_metrics_port: int | None = None, redis_port: int | None = None,
                  mongodb_port: int | None = None) -> Servers:
    """Start Redis and FerretDB (or use ``CHATSTREAM_TEST_MONGODB_URI`` for a real MongoDB). Each keeps its
    data in ``workdir`` under a folder named by its port: given the ports of an earlier start on the same
    ``workdir``, they start on that data (a benchmark resuming on a store it seeded)."""
    redis = redis_server(workdir, port=redis_port)
    redis.start()
    external = os.environ.get("CHATSTREAM_TEST_MONGODB_URI")
    if external:
        return Servers(workdir, redis, None, f"redis://127.0.0.1:{redis.port}/0", external)
    mongo = ferretdb_server(workdir, port=mongodb_port, metrics_port=ferretdb_metrics_port)
    mongo.start()
    return Servers(workdir, redis, mongo, f"redis://127.0.0.1:{redis.port}/0",
                   f"mongodb://127.0.0.1:{mongo.port}/chatstream_test")


@dataclass
class RedisCluster:
    """A real Redis Cluster on loopback ports (:func:`redis_cluster_start`); ``nodes[0]`` is a master."""

    nodes: list[Server]

    @property
    def url(self) -> str:
        """A seed URL: redis-py's cluster clients discover the other nodes from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def redis_cluster_start(workdir: Path, *, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 5000,
                        timeout_s: float = 30.0) -> RedisCluster:
    """Start ``masters`` x (1 + ``replicas``) cluster-enabled ``redis-server`` processes, join them with
    ``redis-cli --cluster create`` (slots split evenly over the masters, ``replicas`` replicas each) and wait
    until every node reports ``cluster_state:ok`` and every replica is in sync. ``node_timeout_ms`` is how long
    a silent master takes to be failed over. On failure, the nodes started so far are stopped. The caller
    stops the cluster (:meth:`RedisCluster.stop`)."""
    exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if exe is None or cli is None:
        raise RuntimeError("redis-server/redis-cli not found: `apt-get install redis-server`")
    nodes: list[Server] = []
    try:
        for _ in range(masters * (1 + replicas)):
            # The cluster bus defaults to port + 10000, which may be taken (or above 65535) for a random
            # port: each node gets its own free bus port instead.
            port, bus_port = free_port(), free_port()
            data = workdir / f"redis-cluster-{port}"
            data.mkdir(parents=True, exist_ok=True)
            # No persistence: a test cluster lives as long as its test module.
            argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data), "--save", "",
                    "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                    "--cluster-config-file", str(data / "nodes.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms)]
            node = Server("redis-cluster", port, argv, data)
            nodes.append(node)
            node.start()
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        for node in nodes:
            while True:
                info = subprocess.run([cli, "-p", str(node.port), "cluster", "info"], capture_output=True,
                                      text=True, timeout=timeout_s).stdout
                role = subprocess.run([cli, "-p", str(node.port), "role"], capture_output=True, text=True,
                                      timeout=timeout_s).stdout.split()
                in_sync = not role or role[0] != "slave" or "connected" in role
                if "cluster_state:ok" in info and in_sync:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {node.port} not ok after {timeout_s}s:\n{info}")
                time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisCluster(nodes)
