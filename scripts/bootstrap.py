#!/usr/bin/env python3
"""Idempotent bootstrap for ChatStream (standard library only: it runs before the venv exists).

Subcommands
-----------
``install``   create ``.venv``, install ``requirements-dev.txt`` (skipped when unchanged), and make sure the
              binaries the local cluster and the tests need exist: ``redis-server`` (Debian package) and,
              unless ``MONGODB_URI`` is set, FerretDB v1 built from the Go module proxy into ``.tools/bin``.
``supervisor-conf``  write ``var/supervisord.conf``, the supervisord config of the local cluster
              (``make run``), and print its path. Redis and FerretDB get a program of their own only when
              nothing answers at their address yet, so a server the user already runs is reused and never
              stopped by us.
``centrifugo`` build Centrifugo v6 from the Go module proxy into ``.tools/bin`` (the second peer of
              ``manage.py bench --systems ...,centrifugo``, which runs this step when the binary is missing; not
              part of ``install``: the tests and the cluster never need it).

Every failure ends with a line saying what to install or set. Second runs reuse everything the first
one installed (a stamp file per step). Over 400 lines and one file on purpose: it runs with the system's
python3 before ``.venv`` exists, so it cannot import the project or a helper module beside it reliably.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TOOLS = ROOT / ".tools"
VAR = ROOT / "var"
FERRETDB_VERSION = os.environ.get("CHATSTREAM_FERRETDB_VERSION", "v1.24.2")
FERRETDB_BIN = TOOLS / "bin" / "ferretdb"
# Source patches applied before FerretDB is built (docs/adr/0035): (file, text, replacement). The stamp beside the
# binary names them, so a binary built without them (an older checkout) is rebuilt once.
FERRETDB_PATCHES = (
    # v1's SQLite backend creates the _id index on `_ferretdb_sjson->"_id"` but filters, updates and deletes by
    # `_ferretdb_sjson->'$._id'`: the same value, but SQLite matches an expression index only on the identical
    # expression, so every find, update and delete by _id scanned the table (EXPLAIN QUERY PLAN: SCAN; a
    # modifying update by _id 94 ms at 10k documents, 293 ms at 40k). Spelling it as the index does makes them
    # index searches (1 ms flat to 100k; bench/ferretdb_id_index.py).
    ("internal/backends/sqlite/metadata/metadata.go",
     "IDColumn = DefaultColumn + \"->'$._id'\"",
     "IDColumn = DefaultColumn + `->\"_id\"`"),
)
FERRETDB_STAMP = FERRETDB_BIN.with_name("ferretdb.build")
CENTRIFUGO_VERSION = os.environ.get("CHATSTREAM_CENTRIFUGO_VERSION", "v6.9.1")
CENTRIFUGO_BIN = TOOLS / "bin" / "centrifugo"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_FERRETDB_PORT = 27117


class BootstrapError(SystemExit):
    """Exit with a message that says what to do; never a traceback."""

    def __init__(self, what: str, todo: str) -> None:
        super().__init__(f"bootstrap: {what}\n  -> {todo}")


def log(msg: str) -> None:
    print(f"bootstrap: {msg}", file=sys.stderr, flush=True)


def read_dotenv() -> dict[str, str]:
    """The values of ``.env`` (if any), overridden by the real environment, as settings see them."""
    values: dict[str, str] = {}
    path = ROOT / ".env"
    if path.exists():
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    values.update(os.environ)
    return values


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_address(env: dict[str, str]) -> tuple[str, int]:
    url = urllib.parse.urlparse(env.get("REDIS_URL") or DEFAULT_REDIS_URL)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise BootstrapError(f"REDIS_URL={env.get('REDIS_URL')!r} is not a redis:// URL",
                             "set REDIS_URL like redis://127.0.0.1:6379/0 (see .env.example)")
    return url.hostname, url.port or 6379


def ferretdb_port(env: dict[str, str]) -> int:
    raw = env.get("CHATSTREAM_FERRETDB_PORT") or str(DEFAULT_FERRETDB_PORT)
    if not raw.isdigit():
        raise BootstrapError(f"CHATSTREAM_FERRETDB_PORT={raw!r} is not a port number", "set it to e.g. 27117")
    return int(raw)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------- install steps


def dotenv_write(text: str) -> None:
    """Replace ``.env`` with ``text``, readable by its owner only (it holds SECRET_KEY and the Redis password):
    created 0600 under a temporary name, then renamed over, so it is never readable by others, not even
    for a moment."""
    path = ROOT / ".env"
    tmp = path.with_name(".env.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_dotenv() -> None:
    """Create ``.env`` with a fresh SECRET_KEY on first run, so ``make run`` needs no manual step; an existing
    one that others may read is made 0600."""
    path = ROOT / ".env"
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(0o600)
            log(f"made .env readable by its owner only (it was {mode:o}; it holds secrets)")
        return
    import secrets

    dotenv_write(
        "# Written by scripts/bootstrap.py on first run; see .env.example for every variable.\n"
        f"SECRET_KEY={secrets.token_urlsafe(50)}\n"
    )
    log("wrote .env with a generated SECRET_KEY")


def redis_password_ensure(env: dict[str, str]) -> str | None:
    """The password of the Redis ``make run`` is about to start: the one in REDIS_URL, else a new one written
    into ``.env`` as REDIS_URL (same host, port and db). None when REDIS_URL comes from the real environment
    without one (we cannot change that environment: that Redis starts without a password, as it asked)."""
    import secrets

    url = urllib.parse.urlparse(env.get("REDIS_URL") or DEFAULT_REDIS_URL)
    if url.password:
        return urllib.parse.unquote(url.password)
    if "REDIS_URL" in os.environ:
        log("REDIS_URL is set in the environment without a password: its Redis starts without one")
        return None
    password = secrets.token_urlsafe(32)  # URL-safe: goes into the URL as is
    netloc = f":{password}@{url.hostname}:{url.port or 6379}"
    new_url = urllib.parse.urlunparse(url._replace(netloc=netloc))
    path = ROOT / ".env"
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if not line.strip().startswith("REDIS_URL=")]
    kept.append("# The password of the Redis `make run` starts (scripts/bootstrap.py generated it).")
    kept.append(f"REDIS_URL={new_url}")
    dotenv_write("\n".join(kept) + "\n")
    log("gave the local Redis a generated password (REDIS_URL in .env)")
    return password


def ensure_venv() -> None:
    python = VENV / "bin" / "python"
    if not python.exists():
        log("creating .venv")
        if sys.version_info[:2] != (3, 11):
            log(f"warning: ChatStream is tested on Python 3.11, this is {sys.version.split()[0]}")
        r = subprocess.run([sys.executable, "-m", "venv", str(VENV)])
        if r.returncode != 0:
            raise BootstrapError("could not create .venv", "install python3-venv (apt-get install python3-venv)")
    # requirements-dev.txt includes requirements.txt (the runtime, all the Docker image installs).
    req = ROOT / "requirements-dev.txt"
    digest = hashlib.sha256(req.read_bytes() + (ROOT / "requirements.txt").read_bytes()).hexdigest()
    stamp = VENV / ".requirements.sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return
    log("installing requirements-dev.txt into .venv (first run takes a minute)")
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(req)]
    if subprocess.run(cmd).returncode != 0:
        raise BootstrapError("pip install -r requirements-dev.txt failed (output above)",
                             "check network access to PyPI, then run the command again")
    stamp.write_text(digest)


def apt_install(package: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    log(f"installing Debian package {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    stamp = VAR / ".apt-updated"
    if not stamp.exists():
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        VAR.mkdir(exist_ok=True)
        stamp.touch()
    r = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env,
                       stdout=subprocess.DEVNULL)
    return r.returncode == 0


def ensure_redis_binary(env: dict[str, str], *, required: bool) -> None:
    """``redis-server`` on PATH; needed when no Redis answers, and always by the tests."""
    if shutil.which("redis-server"):
        return
    host, port = redis_address(env)
    if not required and reachable(host, port):
        return
    if not apt_install("redis-server") or not shutil.which("redis-server"):
        raise BootstrapError("redis-server is not installed and could not be installed",
                             "run `sudo apt-get install redis-server`, or set REDIS_URL to a running Redis")


def ensure_ferretdb_binary(env: dict[str, str], *, required: bool) -> None:
    """FerretDB v1 (SQLite backend) in ``.tools/bin``, built from the Go module proxy.

    ``go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2`` builds, but the binary panics at start
    ("Invalid build/version/version.txt"): the release's version.txt is generated by its own task runner and
    is not in the module. So we copy the module source, write version.txt, and ``go build`` it: same code,
    same toolchain, no other download.
    """
    stamp = ferretdb_build_stamp()
    if FERRETDB_BIN.exists() and FERRETDB_STAMP.exists() and FERRETDB_STAMP.read_text() == stamp:
        return
    if not required and env.get("MONGODB_URI"):
        return
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not go:
        raise BootstrapError("FerretDB is needed (no MONGODB_URI set) and Go is not installed",
                             "install Go >= 1.22 (apt-get install golang), or set MONGODB_URI to a MongoDB")
    module = f"github.com/FerretDB/FerretDB@{FERRETDB_VERSION}"
    log(f"building FerretDB {FERRETDB_VERSION} into .tools/bin (first run only, about 2 minutes)")
    r = subprocess.run([go, "mod", "download", "-json", module], capture_output=True, text=True)
    if r.returncode != 0:
        raise BootstrapError(f"go mod download {module} failed: {r.stderr.strip() or r.stdout.strip()}",
                             "check access to the Go module proxy, or set MONGODB_URI to a MongoDB")
    import json

    src_dir = Path(json.loads(r.stdout)["Dir"])
    work = TOOLS / "src" / "ferretdb"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src_dir, work)
    for path in work.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    (work / "build" / "version" / "version.txt").write_text(FERRETDB_VERSION + "\n")
    ferretdb_patch(work)
    # Built beside the binary and renamed over it: servers running the old one (a `make run`, a test session)
    # keep their file, and nobody starts a half-written binary.
    building = FERRETDB_BIN.with_name("ferretdb.building")
    r2 = subprocess.run([go, "build", "-trimpath", "-o", str(building), "./cmd/ferretdb"], cwd=work)
    if r2.returncode != 0 or not building.exists():
        raise BootstrapError("building FerretDB failed (output above)",
                             "set CHATSTREAM_FERRETDB_VERSION to another v1 release, or MONGODB_URI to a MongoDB")
    os.replace(building, FERRETDB_BIN)
    FERRETDB_STAMP.write_text(stamp)
    shutil.rmtree(work, ignore_errors=True)


def ferretdb_build_stamp() -> str:
    """What the binary in .tools/bin must have been built from: the version and the patches."""
    digest = hashlib.sha256(repr(FERRETDB_PATCHES).encode()).hexdigest()[:16]
    return f"{FERRETDB_VERSION} patches {digest}\n"


def ferretdb_patch(work: Path) -> None:
    """Apply ``FERRETDB_PATCHES`` to the copied source in ``work``; each text must occur exactly once (another
    release may have moved it: then say so rather than build something else)."""
    for rel, text, replacement in FERRETDB_PATCHES:
        path = work / rel
        source = path.read_text() if path.exists() else ""
        if source.count(text) != 1:
            raise BootstrapError(f"FerretDB {FERRETDB_VERSION}: cannot apply the patch to {rel} (text not found once)",
                                 "use CHATSTREAM_FERRETDB_VERSION=v1.24.2, or set MONGODB_URI to a MongoDB")
        path.write_text(source.replace(text, replacement))


def ensure_centrifugo_binary() -> None:
    """Centrifugo v6 in ``.tools/bin``: ``go install github.com/centrifugal/centrifugo/v6@<version>`` with
    ``GOBIN`` pointing there. Like FerretDB's version.txt, the release version is stamped by the project's own
    release pipeline (a linker flag), so we pass the same flag: otherwise the binary calls itself 0.0.0 and
    warns it is a development build. The compile runs at the lowest CPU priority: it takes minutes of both
    cores, and a machine that benchmarks is often running tests too.
    """
    if CENTRIFUGO_BIN.exists():
        return
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not go:
        raise BootstrapError("the Centrifugo peer of the benchmark is built with Go, which is not installed",
                             "install Go >= 1.26 (https://go.dev/dl/), or leave centrifugo out of --systems")
    module = f"github.com/centrifugal/centrifugo/v6@{CENTRIFUGO_VERSION}"
    log(f"building Centrifugo {CENTRIFUGO_VERSION} into .tools/bin (first run only, several minutes)")
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    CENTRIFUGO_BIN.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"-ldflags=-X github.com/centrifugal/centrifugo/v6/internal/build.Version={CENTRIFUGO_VERSION[1:]}"
    r = subprocess.run([*nice, go, "install", "-trimpath", stamp, module],
                       env=dict(os.environ, GOBIN=str(CENTRIFUGO_BIN.parent)))
    if r.returncode != 0 or not CENTRIFUGO_BIN.exists():
        raise BootstrapError(f"go install {module} failed (output above)",
                             "check access to the Go module proxy, or set CHATSTREAM_CENTRIFUGO_VERSION to "
                             "another v6 release")


def ensure_chromium() -> None:
    """Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser)."""
    if Path("/usr/bin/chromium").exists():
        return
    if not apt_install("chromium") or not Path("/usr/bin/chromium").exists():
        raise BootstrapError("the browser tests need Debian's chromium at /usr/bin/chromium",
                             "run `sudo apt-get install chromium`")


def cmd_install() -> None:
    env = read_dotenv()
    VAR.mkdir(exist_ok=True)
    ensure_dotenv()
    ensure_venv()
    testing = os.environ.get("CHATSTREAM_BOOTSTRAP_FOR_TESTS") == "1"
    ensure_redis_binary(env, required=testing)
    ensure_ferretdb_binary(env, required=testing)
    if testing:
        ensure_chromium()


# ---------------------------------------------------------------- supervisor config

# Roles in start order; (program name, `manage.py role` arguments). Two of every role but beat, so that one can
# die while its twin serves (docs/architecture.md); the two gateways share the public port (docs/adr/0056).
ROLE_PROGRAMS = (
    ("gateway1", "gateway --instance 1"),
    ("gateway2", "gateway --instance 2"),
    ("broker1", "broker --instance 1"),
    ("broker2", "broker --instance 2"),
    ("api1", "api --instance 1"),
    ("api2", "api --instance 2"),
    ("storage1", "storage --instance 1"),
    ("storage2", "storage --instance 2"),
    ("beat", "storage-beat"),
)
# A role that dies within ROLE_START_S of being spawned has failed to start (a bad setting, a port taken):
# supervisord retries it after 1, 2, 3, ... s (its linear back-off) and gives up after ROLE_START_RETRIES
# retries (state FATAL). 10 s: a role imports Django, checks its servers and execs its server in 2-4 s on the
# 2-core dev machine under load, so a crash in its first 10 s is a crash at start-up, not in service. Once up
# that long it is restarted at once whenever it dies.
ROLE_START_S = 10
ROLE_START_RETRIES = 4
# Ctrl-C waits this long for a role's graceful stop (uvicorn closes its WebSockets, Celery finishes a drain
# batch) before SIGKILL: a drain batch takes well under a second, and closing 10k sockets about 2 s.
ROLE_STOP_WAIT_S = 20


def supervisor_socket(var: Path) -> Path:
    """The control socket: in ``var`` unless that path is too long for a Unix socket (108 bytes)."""
    sock = var / "supervisor.sock"
    if len(str(sock)) < 100:
        return sock
    import tempfile

    return Path(tempfile.gettempdir()) / f"chatstream-{hashlib.sha256(str(var).encode()).hexdigest()[:12]}.sock"


def gateway_port_check(env: dict[str, str]) -> None:
    """Refuse to write a config whose gateways could not own their port. The gateways bind it with SO_REUSEPORT
    (docs/adr/0056), which Linux lets any process of the same user share, so a second `make run` would silently
    take half of the first one's connections: a bind without that option, as tried here, fails while anything
    listens there. Side effect: binds and closes one socket."""
    raw = env.get("CHATSTREAM_GATEWAY_PORT") or "8000"
    if not raw.isdigit():
        raise BootstrapError(f"CHATSTREAM_GATEWAY_PORT={raw!r} is not a port number", "set it to e.g. 8000")
    host = env.get("CHATSTREAM_BIND") or "127.0.0.1"
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateways: TIME_WAIT is no owner
        probe.bind((host, int(raw)))
    except OSError as exc:
        raise BootstrapError(
            f"the gateway's port {host}:{raw} is taken ({exc.strerror}): another `make run` or another program "
            "listens there",
            "stop it (Ctrl-C in its terminal, or `kill $(cat var/supervisord.pid)` for a `make run` of this "
            "checkout), or set CHATSTREAM_GATEWAY_PORT in .env to a free port") from None
    finally:
        probe.close()


def supervisor_conf(*, var: Path, python: str, log_color: bool) -> str:
    """The supervisord config of ``make run``: servers we must start (Redis and FerretDB only when nothing
    answers at their address yet, so a server the user already runs is reused and never stopped by us),
    every role, and the log listener that prints one prefixed stream on the terminal.
    A fresh ``CHATSTREAM_RUN_ID`` per config: roles count their restarts per run (``manage.py services``)."""
    import uuid

    env = read_dotenv()
    gateway_port_check(env)
    var.mkdir(parents=True, exist_ok=True)
    (var / "log").mkdir(exist_ok=True)
    servers: dict[str, str] = {}
    rhost, rport = redis_address(env)
    if not reachable(rhost, rport):
        if not is_loopback(rhost):
            raise BootstrapError(f"Redis at {rhost}:{rport} (REDIS_URL) is not reachable",
                                 "start it, or unset REDIS_URL to let ChatStream run one on 127.0.0.1")
        (VAR / "redis").mkdir(parents=True, exist_ok=True)
        # The password goes in a config file of the owner's only (a command line is readable by every user
        # in ps); redis-server reads it as its first argument.
        password = redis_password_ensure(env)
        conf = VAR / "redis" / "redis.conf"
        conf.unlink(missing_ok=True)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{password}"\n' if password else "")
        # AOF with fsync every second: accepted messages survive a Redis restart (docs/architecture.md).
        servers["redis"] = (
            f"redis-server {conf} --bind {rhost} --port {rport} --dir {VAR / 'redis'} "
            "--appendonly yes --appendfsync everysec --save '' --protected-mode yes"
        )
    if not env.get("MONGODB_URI"):
        port = ferretdb_port(env)
        if not reachable("127.0.0.1", port):
            (VAR / "ferretdb").mkdir(parents=True, exist_ok=True)
            (VAR / "ferretdb-state").mkdir(parents=True, exist_ok=True)
            servers["ferretdb"] = (
                f"{FERRETDB_BIN} --handler=sqlite --sqlite-url=file:{VAR / 'ferretdb'}/ "
                f"--listen-addr=127.0.0.1:{port} --state-dir={VAR / 'ferretdb-state'} "
                "--telemetry=disable --log-level=warn --debug-addr=-"
            )
    sock = supervisor_socket(var)

    def esc(value: object) -> str:  # supervisord expands %(name)s in values
        return str(value).replace("%", "%%")

    out = [
        "; Written by scripts/bootstrap.py for `make run` (every run anew); see docs/adr/0024.",
        "[supervisord]",
        "nodaemon=true",
        "silent=true",  # the terminal gets the log listener's prefixed stream; this log keeps the rest
        f"logfile={esc(var / 'supervisord.log')}",
        "logfile_maxbytes=5MB",
        "logfile_backups=1",
        f"pidfile={esc(var / 'supervisord.pid')}",
        f"childlogdir={esc(var / 'log')}",
        f"directory={esc(ROOT)}",
        f'environment=CHATSTREAM_RUN_ID="{uuid.uuid4().hex}"',
        "",
        "[unix_http_server]",
        f"file={esc(sock)}",
        "chmod=0700",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{esc(sock)}",
        "",
        # First to start, last to stop, so it prints every other process's last lines.
        "[eventlistener:logs]",
        f"command={esc(python)} {esc(ROOT / 'scripts' / 'supervisor_logs.py')}",
        "events=PROCESS_LOG,PROCESS_STATE",
        "buffer_size=10000",  # events queued while the listener writes; lines beyond it are dropped (logged)
        "priority=1",
        "autorestart=true",
        "stderr_logfile=/dev/stderr",
        "stderr_logfile_maxbytes=0",
        f'environment=CHATSTREAM_LOG_COLOR="{int(log_color)}",CHATSTREAM_START_RETRIES="{ROLE_START_RETRIES}",'
        f'CHATSTREAM_SUPERVISORCTL="{esc(Path(python).parent / "supervisorctl")} -c {esc(var / "supervisord.conf")}"',
        "",
    ]

    def program(name: str, command: str, *, start_s: int, retries: int, stop_wait_s: int) -> None:
        out.extend([
            f"[program:{name}]",
            f"command={esc(command)}",
            f"directory={esc(ROOT)}",
            "autorestart=true",
            f"startsecs={start_s}",
            f"startretries={retries}",
            "stopsignal=TERM",
            f"stopwaitsecs={stop_wait_s}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={esc(var / 'log' / (name + '.log'))}",
            "stdout_logfile_maxbytes=10MB",
            "stdout_logfile_backups=1",
            "stdout_events_enabled=true",
            "",
        ])

    for name, command in servers.items():
        program(name, command, start_s=1, retries=ROLE_START_RETRIES, stop_wait_s=10)
    for name, args in ROLE_PROGRAMS:
        program(name, f"{python} manage.py role {args}", start_s=ROLE_START_S, retries=ROLE_START_RETRIES,
                stop_wait_s=ROLE_STOP_WAIT_S)
    # Groups stop one after the other, highest priority first, every process of a group at once: the roles
    # stop together (and deregister), then the servers they were using.
    if servers:
        out += ["[group:servers]", f"programs={','.join(servers)}", "priority=10", ""]
    out += ["[group:roles]", f"programs={','.join(n for n, _ in ROLE_PROGRAMS)}", "priority=100", ""]
    return "\n".join(out)


def cmd_supervisor_conf(args: list[str]) -> None:
    """Write the supervisord config to ``VAR/supervisord.conf`` and print its path.

    ``--var DIR`` puts the config, logs, socket and pid file elsewhere (the tests' clusters); ``--python`` is
    the interpreter the roles run with; ``--color`` colours the terminal's prefixes."""
    import argparse

    parser = argparse.ArgumentParser(prog="bootstrap.py supervisor-conf")
    parser.add_argument("--var", type=Path, default=VAR)
    parser.add_argument("--python", default=str(VENV / "bin" / "python"))
    parser.add_argument("--color", action="store_true")
    opts = parser.parse_args(args)
    var = opts.var.resolve()
    path = var / "supervisord.conf"
    text = supervisor_conf(var=var, python=opts.python, log_color=opts.color)
    path.write_text(text + "\n")
    print(path)


def main(argv: list[str]) -> None:
    if argv == ["install"]:
        os.chdir(ROOT)
        cmd_install()
    elif argv == ["centrifugo"]:
        os.chdir(ROOT)
        ensure_centrifugo_binary()
    elif argv[:1] == ["supervisor-conf"]:
        os.chdir(ROOT)
        cmd_supervisor_conf(argv[1:])
    else:
        raise SystemExit("usage: bootstrap.py {install,centrifugo,"
                         "supervisor-conf [--var DIR] [--python PATH] [--color]}")


if __name__ == "__main__":
    main(sys.argv[1:])
