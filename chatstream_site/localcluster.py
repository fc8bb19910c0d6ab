"""The local cluster exactly as `make run` starts it, and the helpers that drive processes from outside
(manage.py commands, waits, process lookup by environment), for the tests and the benchmarks.

No role imports this module (an import-linter contract keeps it so); the tests and bench/ import it.
"""

from __future__ import annotations

import configparser
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from chatstream_site.localservers import ROOT, free_port


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
    """The local cluster exactly as `make run` starts it (supervisord with the config scripts/bootstrap.py writes
    for `make run`), on free ports."""

    def __init__(self, workdir: Path, *, supervised: bool = True, **env: str) -> None:
        """``supervised=False`` starts each role of the same config as its own process group instead, nothing
        restarting it, so a test decides when a killed role comes back (``start_process``)."""
        self.supervised = supervised
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.lines: dict[str, list[str]] = {}
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
        self.var = workdir / "var"
        self.log_path = workdir / "cluster.log"
        self.conf_path = self.var / "supervisord.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def write_conf(self) -> configparser.RawConfigParser:
        """Write the config `make run` would (bootstrap.py supervisor-conf) into this cluster's var dir."""
        subprocess.run([sys.executable, "scripts/bootstrap.py", "supervisor-conf", "--var", str(self.var),
                        "--python", sys.executable], cwd=ROOT, env=self.env, capture_output=True, text=True,
                       check=True)
        conf = configparser.RawConfigParser()
        conf.read(self.conf_path)
        # The session's servers are reachable, so the config must hold only the roles.
        assert not conf.has_section("program:redis") and not conf.has_section("program:ferretdb"), \
            self.conf_path.read_text()
        return conf

    def program_set(self, name: str, **values: str) -> None:
        """Change one program of the written config before ``start`` (e.g. a bad setting for one role)."""
        conf = configparser.RawConfigParser()
        conf.read(self.conf_path)
        for key, value in values.items():
            conf.set(f"program:{name}", key, value)
        with open(self.conf_path, "w") as f:
            conf.write(f)

    def start(self) -> None:
        if not self.conf_path.exists():
            self.write_conf()
        conf = configparser.RawConfigParser()
        conf.read(self.conf_path)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the cluster; O_APPEND: shared
        if not self.supervised:
            self.env["CHATSTREAM_RUN_ID"] = self.tag  # what supervisord's [supervisord] environment gives
            for section in conf.sections():
                if section.startswith("program:"):
                    command = conf.get(section, "command").replace("%%", "%")
                    self.lines[section.removeprefix("program:")] = shlex.split(command)
            for name in self.lines:
                self.start_process(name)
            return
        supervisord = str(Path(sys.executable).parent / "supervisord")
        self.proc = subprocess.Popen([supervisord, "-c", str(self.conf_path)], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def rpc(self) -> Any:
        """supervisord's XML-RPC interface on its Unix socket (what supervisorctl uses)."""
        import xmlrpc.client

        from supervisor.xmlrpc import SupervisorTransport

        conf = configparser.RawConfigParser()
        conf.read(self.conf_path)
        serverurl = conf.get("supervisorctl", "serverurl")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, serverurl))

    def program_info(self, name: str) -> dict[str, Any]:
        """supervisord's view of one role program (``statename``, ``pid``, ...), e.g. ``api1``."""
        return dict(self.rpc().supervisor.getProcessInfo(f"roles:{name}"))

    def start_process(self, name: str) -> None:
        """(Re)start one role program (``supervised=False`` only), e.g. ``broker1``."""
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(self.lines[name], cwd=ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_process(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one role program and reap it (``supervised=False``)."""
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
        """The terminal's stream (supervised) or each process's log (not), last ``lines`` of each."""
        paths = [self.var / "supervisord.log", self.log_path] if self.supervised else sorted(self.workdir.glob("*.log"))
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

    def stop(self, timeout_s: float = 60) -> None:
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
        # The terminal sends SIGINT to its foreground group: supervisord and `make`; every program runs in a
        # process group of its own, so supervisord alone stops them.
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            for pid in tagged_pids(self.tag):
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"supervisord did not stop within {timeout_s}s:\n{self.log_tail()}") from None
