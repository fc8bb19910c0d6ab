"""An api instance's first requests against its later ones (issue 13): each start is a fresh `manage.py role api`
(uvicorn, its lifespan warm-up included) on private Redis + FerretDB, then one keep-alive connection straight to it
sends, one at a time: 3 conversation lists, 2 pages of messages, 2 WebSocket tickets, 5 more lists; then a new
connection 2 lists (a new connection to a warm instance, as a gateway's first). The user (7 accounts, 6 1:1 chats
with a message each) is seeded, and its caches filled, by an instance of its own first, so every start measures
the instance, not the user's first read.

Bounded: ``--starts`` instances per checkout x 14 requests. ``--checkout DIR`` (repeatable): the code the measured
instances run (default this checkout); with two, e.g. main's worktree and a change's, their starts alternate, so a
before/after pair shares the machine's moments. The seeding instance always runs this checkout.

nice -n 5 .venv/bin/python bench/api_first_requests.py --starts 5 [--checkout DIR ...] --quiet-lock /work/wt
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.quiet_lock import quiet_lock
from chatstream_site.localservers import ROOT, free_port, servers_start, wait_port

PASSWORD = "correct-horse-battery-9"  # noqa: S105 - the seeded accounts' password, local servers only
LIST = "/api/v1/conversations?limit=50"
COLUMNS = ("list1", "list2", "list3", "msgs1", "msgs2", "ticket1", "ticket2", "list4", "list5", "list6", "list7",
           "list8", "new conn list1", "new conn list2")


def instance_start(*, checkout: Path, env: dict[str, str], workdir: Path, n: int,
                   role: str = "api", health: str | None = "/healthz") -> tuple[subprocess.Popen[bytes], int]:
    """One ``role`` instance of ``checkout``, as the cluster starts it; returns once its ``health`` answers 200
    (``None``: once it accepts connections, after its lifespan's startup; no request sent)."""
    port = free_port()
    with open(workdir / f"{role}{n}.log", "ab") as log:
        proc = subprocess.Popen([str(checkout / ".venv" / "bin" / "python"), "manage.py", "role", role,
                                 "--instance", str(n), "--port", str(port)],
                                cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port, timeout_s=60, proc=proc)
    for _ in range(200 if health else 0):  # bounded: 10 s
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", str(health))
        status = conn.getresponse().status
        conn.close()
        if status == 200:
            break
        time.sleep(0.05)
    return proc, port


def servers_env(stack: contextlib.ExitStack, *, workdir: Path) -> dict[str, str]:
    """Private Redis + FerretDB in ``workdir`` (stopped by ``stack``); the environment of the roles run on them."""
    servers = servers_start(workdir)
    stack.callback(servers.stop)
    return dict(os.environ, CHATSTREAM_DOTENV="", DEBUG="0", PYTHONUNBUFFERED="1", CHATSTREAM_RUN_ID=uuid.uuid4().hex,
                SECRET_KEY=uuid.uuid4().hex * 2, CHATSTREAM_PORT_BASE=str(10000 + os.getpid() % 20000), **servers.env())


def starts_parser(doc: str | None, *, measured: str) -> argparse.ArgumentParser:
    """The options of a first-requests bench: ``--starts``, ``--checkout`` (repeatable), ``--quiet-lock``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--checkout", type=Path, action="append", help=f"the code the measured {measured} run")
    parser.add_argument("--quiet-lock", default="", help="hold DIR/gate.lock and DIR/bench.lock while measuring")
    return parser


def alternating(checkouts: list[Path], *, starts: int) -> Iterator[tuple[int, Path, int]]:
    """(start, checkout, instance number) of each measured instance: the checkouts alternate within each start, so
    a before/after pair shares the machine's moments; numbers from 2 (1 is the seeding instance's)."""
    for start in range(starts):
        for k, checkout in enumerate(checkouts):
            yield start, checkout, 2 + start * len(checkouts) + k


def rows_print(rows: dict[Path, list[list[float]]], *, columns: Sequence[str]) -> None:
    """The load, then per checkout each column's median (min-max) over its starts."""
    print(f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for checkout, measured in rows.items():
        print(f"checkout {checkout}: median (min-max) of {len(measured)} starts")
        for i, name in enumerate(columns):
            column = [row[i] for row in measured]
            print(f"  {name:15s} {statistics.median(column):5.1f} ms  ({min(column):.1f}-{max(column):.1f})")


def instance_stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def call(conn: http.client.HTTPConnection, method: str, path: str, *, token: str | None = None,
         body: dict[str, Any] | None = None) -> tuple[float, int, Any]:
    """One request; (ms, status, decoded JSON body)."""
    headers = {"Content-Type": "application/json", "Host": "127.0.0.1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    started = time.perf_counter()
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    ms = (time.perf_counter() - started) * 1000
    return ms, response.status, json.loads(data) if data[:1] in (b"{", b"[") else None


def seed(port: int) -> tuple[str, str]:
    """A user with 6 1:1 chats and a message in each, its caches filled; returns (access token, a chat's id)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    tokens = []
    for i in range(7):
        name = f"first{i}{uuid.uuid4().hex[:6]}"
        _, status, _ = call(conn, "POST", "/api/v1/auth/register",
                            body={"username": name, "email": f"{name}@example.test", "password": PASSWORD})
        assert status == 201, status
        _, status, answer = call(conn, "POST", "/api/v1/auth/login", body={"username": name, "password": PASSWORD})
        assert status == 200, status
        tokens.append((name, answer["access"]))
    token, conversation = tokens[0][1], ""
    for name, _ in tokens[1:]:
        _, status, answer = call(conn, "POST", "/api/v1/chats/single", token=token, body={"username": name})
        assert status == 201, status
        conversation = answer["conversation_id"]
        _, status, _ = call(conn, "POST", f"/api/v1/conversations/{conversation}/messages", token=token,
                            body={"content": "hello", "client_msg_id": uuid.uuid4().hex})
        assert status == 201, status
    for _ in range(3):  # the user's cards and windows cached by this instance, not by a measured one
        call(conn, "GET", LIST, token=token)
        call(conn, "GET", f"/api/v1/conversations/{conversation}/messages?limit=50", token=token)
    conn.close()
    return token, conversation


def measure(port: int, *, token: str, conversation: str) -> list[float]:
    messages = f"/api/v1/conversations/{conversation}/messages?limit=50"
    sequence = [("GET", LIST)] * 3 + [("GET", messages)] * 2 + [("POST", "/api/v1/auth/ws-ticket")] * 2 \
        + [("GET", LIST)] * 5
    row = []
    for fresh_connection in (sequence, [("GET", LIST)] * 2):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.connect()  # the TCP connect is not in the first request's time
        for method, path in fresh_connection:
            ms, status, _ = call(conn, method, path, token=token, body={} if method == "POST" else None)
            assert status == 200, (status, path)
            row.append(ms)
        conn.close()
    return row


def main() -> None:
    args = starts_parser(__doc__, measured="instances").parse_args()
    with tempfile.TemporaryDirectory(prefix="api-first-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        env = servers_env(stack, workdir=workdir)
        proc, port = instance_start(checkout=ROOT, env=env, workdir=workdir, n=1)
        try:
            token, conversation = seed(port)
        finally:
            instance_stop(proc)
        rows: dict[Path, list[list[float]]] = {checkout: [] for checkout in args.checkout or [ROOT]}
        with quiet_lock(args.quiet_lock):
            for start, checkout, n in alternating(list(rows), starts=args.starts):
                proc, port = instance_start(checkout=checkout, env=env, workdir=workdir, n=n)
                try:
                    rows[checkout].append(measure(port, token=token, conversation=conversation))
                finally:
                    instance_stop(proc)
                print(f"{checkout} start {start}: " + " ".join(f"{ms:5.1f}" for ms in rows[checkout][-1]), flush=True)
        rows_print(rows, columns=COLUMNS)


if __name__ == "__main__":
    main()
