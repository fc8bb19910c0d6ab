"""``manage.py role <role> [--instance N]``: check the servers, then exec the role's real server process."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatstream_site.health import bus_check, mongodb_check, redis_check
from chatstream_site.uvicorn_main import REUSE_PORT_OPTION
from core.registry import ROLES, start_count_incr
from core.roles import role_port, run_id, url_redacted
from gateway.proxy import UPSTREAM_KEEPALIVE_S
from messaging.transports import internals_known


def wait_for_servers(*, need_mongodb: bool, wait_s: float) -> None:
    """Block until Redis (and the message bus and MongoDB) answer, or raise CommandError naming the variable
    to fix."""
    deadline = time.monotonic() + wait_s
    while True:
        problems = []
        if (reason := redis_check()) is not None:
            problems.append(f"{reason}; check REDIS_URL={url_redacted(settings.REDIS_URL)}")
        if need_mongodb and (reason := bus_check()) is not None:  # every role but the gateway uses the bus
            problems.append(f"{reason}; check CHATSTREAM_STREAMS_REDIS_URL={url_redacted(settings.STREAMS_REDIS_URL)}"
                            + (" (a Redis Cluster)" if settings.STREAMS_REDIS_CLUSTER else ""))
        if need_mongodb and (reason := mongodb_check(timeout_ms=1000)) is not None:
            problems.append(f"{reason}; check MONGODB_URI={settings.MONGODB_URI}")
        if not problems:
            return
        if time.monotonic() >= deadline:
            raise CommandError(
                "cannot start: " + " | ".join(problems)
                + f" (waited {wait_s:.0f}s; `make run` starts local servers, or set the URL in .env)"
            )
        time.sleep(0.5)


# Seconds the api keeps an idle keep-alive connection: twice the gateway's, so the gateway's pool closes it first.
API_KEEPALIVE_S = 2 * UPSTREAM_KEEPALIVE_S


def uvicorn_argv(*, bindir: str, port: int, ws: str, trusted: list[str], reuse_port: bool = False) -> list[str]:
    """uvicorn + uvloop + httptools, what every role on it shares: the ASGI lifespan (where a role deregisters:
    uvicorn re-raises SIGTERM, so atexit never runs), no access log (the gateway writes its own), no Server
    header, and proxy headers from ``trusted`` only (none if empty). The caller appends its options and the app.
    A role serving WebSockets runs uvicorn's command line through chatstream_site/uvicorn_main.py, whose protocol
    keeps a connection's attributes in slots (docs/adr/0054); the api (``ws="none"``) runs the script itself.
    ``reuse_port``: the port is shared with the role's other instances on this machine (SO_REUSEPORT,
    docs/adr/0056); only through uvicorn_main."""
    server = ([os.path.join(bindir, "python"), "-m", "chatstream_site.uvicorn_main"] if ws != "none"
              else [os.path.join(bindir, "uvicorn")])
    if reuse_port:
        if ws == "none":
            raise ValueError("reuse_port needs chatstream_site.uvicorn_main (a WebSocket role)")
        server.append(REUSE_PORT_OPTION)
    argv = [*server, "--host", settings.BIND_HOST, "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--ws", ws, "--lifespan", "on",
            "--no-access-log", "--no-server-header"]
    allowed = ",".join(trusted)
    return argv + (["--proxy-headers", "--forwarded-allow-ips", allowed] if allowed else ["--no-proxy-headers"])


def role_argv(role: str, *, port: int, instance: int, bindir: str) -> list[str]:
    """The command line of one instance of ``role``: the server ``manage.py role`` execs. Pure but for settings
    (and creating var/ for beat's schedule)."""
    if role == "gateway":
        # The clients' pings come from the gateway's own ping wheel (docs/adr/0049) where it can reach
        # uvicorn's sockets; else uvicorn's timer per socket sends them.
        ping_interval = settings.GATEWAY_WS_PING_INTERVAL_S
        if settings.GATEWAY_WS_PING_WHEEL and internals_known("uvicorn"):
            ping_interval = 0
        # WebSockets by websockets-sansio (2.4x the legacy implementation's round trips through the gateway;
        # daphne drops close reasons): docs/adr/0004. Frames above 64 KiB are closed with 1009 at the edge
        # (docs/interface.md). Proxy headers (the client address from X-Forwarded-For) only from
        # CHATSTREAM_GATEWAY_TRUSTED_PROXIES: the gateway is the public edge, and a client-chosen address would
        # dodge the per-IP limits.
        # Every gateway of the machine listens on the one public port, shared through SO_REUSEPORT: the kernel
        # spreads new connections over the live ones, so a killed gateway never leaves the port unanswered
        # while supervisord restarts it (docs/adr/0056).
        argv = uvicorn_argv(bindir=bindir, port=port, ws="websockets-sansio",
                            trusted=settings.GATEWAY_TRUSTED_PROXIES, reuse_port=True)
        # Broker frames pass through as they are (docs/adr/0039), never compressed, and a client's
        # compressed frames would cost an inflate context per socket (docs/adr/0044).
        # Warning level as on the brokers: at info uvicorn logs three lines per WebSocket (websockets' "connection
        # open" and "closed", and its own "[accepted]" line with the query string, i.e. the ticket, which the
        # access log never writes); ~3 % of the gateway's CPU per connect (docs/benchmarks.md, session 8).
        argv += ["--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--log-level", "warning",
                 "--ws-ping-interval", str(ping_interval),
                 "--ws-ping-timeout", str(settings.GATEWAY_WS_PING_TIMEOUT_S), "chatstream_site.asgi:application"]
    elif role == "broker" and settings.BROKER_SERVER == "uvicorn":
        # The consumer writes pre-framed bytes to the transport (docs/adr/0023), so no permessage-deflate:
        # compressing would cost a deflate per receiver and defeat framing each fan-out once. 64 KiB
        # frames at most (docs/interface.md): websockets closes bigger ones with 1009 while reading them.
        # The gateway's X-Forwarded-For names the client (as daphne's --proxy-headers did), from the
        # trusted proxies only.
        argv = uvicorn_argv(bindir=bindir, port=port, ws="websockets-sansio", trusted=settings.TRUSTED_PROXIES)
        argv += ["--ws-max-size", "65536", "--ws-per-message-deflate", "false",
                 "--log-level", "warning",  # not a log line per WebSocket accepted
                 "--ws-ping-interval", str(settings.WS_PING_INTERVAL_S),
                 "--ws-ping-timeout", str(settings.WS_PING_TIMEOUT_S), "chatstream_site.asgi:application"]
    elif role == "api" and settings.API_SERVER == "uvicorn":
        # Plain HTTP (the api serves no WebSocket: the gateway sends /ws/ to brokers only). No proxy headers:
        # uvicorn would rewrite the client address from X-Forwarded-For itself; the api reads it, from
        # CHATSTREAM_TRUSTED_PROXIES only (api/ratelimit.py client_ip), as under daphne. Idle keep-alive
        # connections are kept longer than the gateway keeps them (gateway/proxy.py UPSTREAM_KEEPALIVE_S), so
        # the gateway always closes one first: a request it sent on a connection the api was closing at that
        # moment would fail (a POST with 502).
        argv = uvicorn_argv(bindir=bindir, port=port, ws="none", trusted=[])
        argv += ["--timeout-keep-alive", str(API_KEEPALIVE_S), "chatstream_site.asgi:application"]
    elif role in ("broker", "api"):
        # No --proxy-headers: daphne would believe X-Forwarded-For from any peer. The api reads it itself,
        # from CHATSTREAM_TRUSTED_PROXIES (the gateway) only (api/ratelimit.py client_ip).
        argv = [os.path.join(bindir, "daphne"), "-b", settings.BIND_HOST, "-p", str(port),
                "--ping-interval", str(round(settings.WS_PING_INTERVAL_S)),  # daphne takes whole seconds
                "--ping-timeout", str(round(settings.WS_PING_TIMEOUT_S)), "chatstream_site.asgi:application"]
    elif role == "storage":
        # solo pool: one drain at a time per process, and SIGKILL of the worker kills the work itself,
        # which is what the fault tests exercise; scale out by adding worker processes.
        # No mingle, gossip or event heartbeats: nothing here uses worker-to-worker state (no revokes, no
        # remote control, no event monitor), and mingle alone waits 1 s for neighbours at every start, which a
        # restart after a crash should not (docs/adr/0024).
        argv = [os.path.join(bindir, "celery"), "-A", "chatstream_site", "worker", "-Q", "storage",
                "--pool", "solo", "-n", f"storage{instance}@%h", "--loglevel", "INFO",
                "--without-mingle", "--without-gossip", "--without-heartbeat"]
    else:
        schedule = settings.BASE_DIR / "var" / "celerybeat-schedule"
        schedule.parent.mkdir(exist_ok=True)
        argv = [os.path.join(bindir, "celery"), "-A", "chatstream_site", "beat",
                "--schedule", str(schedule), "--loglevel", "INFO"]
    return argv


class Command(BaseCommand):
    help = "Start one instance of a ChatStream role (gateway, broker, api, storage, storage-beat)."
    # manage.py runs this command without django.setup() (apps are not loaded): the checks need them, and the
    # server it execs never ran them either.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("role", choices=ROLES)
        parser.add_argument("--instance", type=int, default=1, help="instance number, picks the port")
        parser.add_argument("--port", type=int, default=None, help="override the derived port")

    def handle(self, *args: Any, role: str, instance: int, port: int | None, **options: Any) -> None:
        port = port or role_port(role, instance)
        wait_for_servers(need_mongodb=role != "gateway", wait_s=settings.STARTUP_WAIT_S)
        # One more start of this slot in this run; the registration shows it as `restarts` (manage.py services).
        # Counted here, once per process start, because a supervisor (or docker) restarts exactly this command.
        run = run_id()
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            starts = start_count_incr(client, run_id=run, role=role, instance=str(instance))
        except redis.RedisError as exc:
            raise CommandError(f"cannot count this start: Redis unreachable ({exc}); "
                               f"check REDIS_URL={url_redacted(settings.REDIS_URL)}") from None
        finally:
            client.close()
        os.environ.update(
            CHATSTREAM_ROLE=role, CHATSTREAM_INSTANCE=str(instance), CHATSTREAM_INSTANCE_PORT=str(port),
            CHATSTREAM_RESTARTS=str(starts - 1),
        )
        argv = role_argv(role, port=port, instance=instance, bindir=os.path.dirname(sys.executable))
        if not os.path.exists(argv[0]) and shutil.which(os.path.basename(argv[0])) is None:
            raise CommandError(f"{argv[0]} not found: run `make bootstrap` (installs requirements-dev.txt)")
        sys.stdout.flush()
        os.execv(argv[0], argv)  # noqa: S606 - replace ourselves with the server: one process per role
