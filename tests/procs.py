"""Helpers to run ChatStream processes from tests: manage.py commands, and whole clusters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.servers import ROOT, free_port


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: the session's servers, no .env, plus ``overrides``."""
    env = dict(os.environ)
    env.update(CHATSTREAM_DOTENV="", PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def manage(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, interval_s: float = 0.2,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value {last!r}")


def tagged_pids(tag: str) -> list[int]:
    """Every live process whose environment carries CHATSTREAM_CLUSTER_TAG=tag (reads /proc)."""
    needle = f"CHATSTREAM_CLUSTER_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


class Cluster:
    """The local cluster exactly as `make run` starts it (honcho + the bootstrap Procfile), on free ports."""

    def __init__(self, workdir: Path, *, honcho: bool = True, **env: str) -> None:
        """``honcho=False`` starts each Procfile line as its own process group instead, so a test can kill
        one role without honcho stopping all the others (as it does in `make run`)."""
        self.honcho = honcho
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.lines: dict[str, str] = {}
        self.tag = uuid.uuid4().hex
        self.gateway_port = free_port()
        # Internal ports are PORT_BASE + 1..39: pick a base below Linux's ephemeral range (32768-60999), where
        # no outgoing connection's source port can take one between the choice and the bind (the old range
        # 20000-39999 overlapped it, and a broker once failed with "address already in use").
        self.port_base = 10000 + (os.getpid() * 97 + int(time.time())) % 20000
        self.env = child_env(
            CHATSTREAM_CLUSTER_TAG=self.tag,
            DEBUG="0",  # as `make run` runs it: JSON errors, no debug pages
            CHATSTREAM_GATEWAY_PORT=str(self.gateway_port),
            CHATSTREAM_PORT_BASE=str(self.port_base),
            **env,
        )
        self.workdir = workdir
        self.log_path = workdir / "cluster.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        procfile = subprocess.run([sys.executable, "scripts/bootstrap.py", "procfile"], cwd=ROOT,
                                  env=self.env, capture_output=True, text=True, check=True).stdout
        # The session's servers are reachable, so the Procfile must hold only the roles.
        assert "redis-server" not in procfile and "ferretdb" not in procfile, procfile
        procfile = procfile.replace(".venv/bin/python", sys.executable)
        (self.workdir / "Procfile").write_text(procfile)
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the cluster
        if not self.honcho:
            for line in procfile.splitlines():
                name, _, command = line.partition(":")
                self.lines[name.strip()] = command.strip()
            for name in self.lines:
                self.start_process(name)
            return
        honcho = str(Path(sys.executable).parent / "honcho")
        # honcho reads ROOT/.env by default and lets it override the environment (a developer's SECRET_KEY
        # would then differ from the one the test signs tokens with): give it an empty file instead.
        (self.workdir / "empty.env").write_text("")
        self.proc = subprocess.Popen([honcho, "-f", str(self.workdir / "Procfile"), "-d", str(ROOT),
                                      "start", "-e", str(self.workdir / "empty.env")],
                                     cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def start_process(self, name: str) -> None:
        """(Re)start one Procfile process (``honcho=False`` only), e.g. ``broker1``."""
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(["/bin/sh", "-c", self.lines[name]], cwd=ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_process(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 90) -> None:
        try:
            wait_until(self.ready, timeout_s=timeout_s, interval_s=0.5, what="the gateway's /readyz")
        except AssertionError:
            raise AssertionError(f"cluster not ready; log tail:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 60) -> str:
        paths = [self.log_path] if self.honcho else sorted(self.workdir.glob("*.log"))
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                         for p in paths if p.exists())

    def role_pids(self, role: str, instance: str | None = None) -> Iterator[int]:
        for pid in tagged_pids(self.tag):
            try:
                env = process_env(pid)
            except OSError:
                continue
            if env.get("CHATSTREAM_ROLE") == role and instance in (None, env.get("CHATSTREAM_INSTANCE")):
                yield pid

    def stop(self, timeout_s: float = 30) -> None:
        """Ctrl-C, as a person would press it in `make run` (or SIGTERM to each process group)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"honcho did not stop within {timeout_s}s:\n{self.log_tail()}") from None
