"""Processes for the gateway tests and benchmark: real gateways (``manage.py role gateway``), real api instances
(``manage.py role api``) and stand-in upstreams (``chatstream_site/localstandin.py`` under daphne), each on a
free port, all sharing one Redis *database* of the session's server so that tests in other modules (which
use other databases) never see these registrations or rate-limit counters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chatstream_site.localcluster import child_env, wait_until
from chatstream_site.localservers import ROOT, Servers, free_port


def redis_db_url(servers: Servers, db: int) -> str:
    return servers.redis_url.rsplit("/", 1)[0] + f"/{db}"


@dataclass
class Proc:
    """One child process with its own log file; killed (whole session) at :meth:`stop`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, path: str = "/healthz", timeout_s: float = 60) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url + path, timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, timeout_s=timeout_s, interval_s=0.2, what=f"{self.name} to answer {path}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_log(self) -> list[dict[str, Any]]:
        """The gateway's access-log entries so far (JSON lines written by chatstream.gateway.access)."""
        entries = []
        for line in self.log().splitlines():
            start = line.find('{"event":"access"')
            if start >= 0:
                entries.append(json.loads(line[start:]))
        return entries


class Fleet:
    """The processes of one test module; everything registers in Redis database ``db``."""

    def __init__(self, servers: Servers, workdir: Path, *, db: int, **env: str) -> None:
        self.workdir = workdir
        self.redis_url = redis_db_url(servers, db)
        self.env = child_env(REDIS_URL=self.redis_url, DEBUG="0", **env)
        self.procs: list[Proc] = []

    def _proc(self, name: str, argv: list[str], port: int, **env: str) -> Proc:
        proc = Proc(name, argv, {**self.env, **env}, port, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc.start()

    def gateway(self, name: str = "gateway", **env: str) -> Proc:
        port = free_port()
        return self._proc(name, [sys.executable, "manage.py", "role", "gateway", "--port", str(port)], port,
                          CHATSTREAM_GATEWAY_PORT=str(port), **env)

    def broker(self, instance: int, *, port: int | None = None, **env: str) -> Proc:
        """A real broker (``manage.py role broker``: uvicorn unless CHATSTREAM_BROKER_SERVER says daphne)."""
        port = port or free_port()
        return self._proc(f"broker{instance}", [sys.executable, "manage.py", "role", "broker", "--instance",
                                                str(instance), "--port", str(port)], port, **env)

    def api(self, instance: int, *, port: int | None = None) -> Proc:
        port = port or free_port()
        return self._proc(f"api{instance}", [sys.executable, "manage.py", "role", "api", "--instance", str(instance),
                                             "--port", str(port)], port)

    def stand_in(self, role: str, instance: int, *, port: int | None = None) -> Proc:
        """A chatstream_site/localstandin.py process registered as ``role``."""
        port = port or free_port()
        daphne = str(Path(sys.executable).parent / "daphne")
        return self._proc(f"{role}{instance}-standin", [daphne, "-b", "127.0.0.1", "-p", str(port),
                                                        "chatstream_site.localstandin:app"], port,
                          CHATSTREAM_ROLE=role, CHATSTREAM_INSTANCE=str(instance), CHATSTREAM_INSTANCE_PORT=str(port))

    def registered(self, role: str) -> list[dict[str, str]]:
        import redis

        from core.registry import instances_list

        client = redis.Redis.from_url(self.redis_url)
        try:
            return [{"id": i.id, "url": i.url} for i in instances_list(client, role=role)]
        finally:
            client.close()

    def wait_registered(self, role: str, count: int, timeout_s: float = 30) -> list[dict[str, str]]:
        return list(wait_until(lambda: len(self.registered(role)) == count and self.registered(role),
                               timeout_s=timeout_s, what=f"{count} {role} instance(s) in the registry"))

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def settle(seconds: float) -> None:
    """Let the gateway's registry cache (refreshed each second) catch up; named so tests say why they wait."""
    time.sleep(seconds)
