"""``manage.py bench``: the real-time fan-out benchmark, ChatStream and its peers (Socket.IO, Centrifugo) in one
run.

See bench/fanout.py for what is measured and docs/benchmarks.md for results and how to read them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from bench import fanout as benchmark


class Command(BaseCommand):
    help = ("Benchmark real-time fan-out: N connections over R conversations, ChatStream vs Socket.IO and "
            "Centrifugo.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--connections", type=int, default=1000)
        parser.add_argument("--conversations", type=int, default=100)
        parser.add_argument("--duration", type=float, default=20.0, help="seconds of traffic per system")
        parser.add_argument("--rate", type=float, default=0.0,
                            help="messages/s over all conversations; 0 = as fast as acked (one in flight each)")
        parser.add_argument("--brokers", type=int, default=1, help="server processes per system")
        parser.add_argument("--idle-seconds", type=float, default=3.0,
                            help="how long idle memory and CPU are measured (40 covers every periodic task)")
        parser.add_argument("--systems", default="chatstream,socketio",
                            help="comma list of chatstream (brokers on CHATSTREAM_BROKER_SERVER, uvicorn by "
                                 "default), chatstream-daphne (brokers on daphne), chatstream-reply (every message "
                                 "a reply), chatstream-react (reaction toggles instead of messages; needs --rate 0), "
                                 "chatstream-alt (brokers with --alt-env), socketio, centrifugo (built into "
                                 ".tools/bin on first use)")
        parser.add_argument("--alt-env", action="append", default=[], metavar="NAME=VALUE",
                            help="a setting of the chatstream-alt system's brokers (repeatable): two settings of the "
                                 "brokers compared in one run, e.g. CHATSTREAM_BROKER_GC_FREEZE=0")
        parser.add_argument("--url", default=None,
                            help="use a running ChatStream at this ws:// URL (e.g. the gateway's /ws/) with the "
                                 "configured REDIS_URL/MONGODB_URI instead of private servers and brokers")
        parser.add_argument("--server-pids", default="",
                            help="with --url: comma list of pids whose CPU and memory to measure")
        parser.add_argument("--mention", action="store_true",
                            help="ChatStream: every message names a member (@username): the cost of mentions")
        parser.add_argument("--out", default="var/bench", help="folder for the PNG and JSON results")
        parser.add_argument("--profile", default="",
                            help="folder: py-spy (raw folded stacks) of the Python servers and the load client "
                                 "over each traffic window")
        parser.add_argument("--quiet-lock", default="",
                            help="folder of a shared machine's benchmark locks (gate.lock, bench.lock): each system "
                                 "holds them exclusively only while it measures, not while it sets up and connects")

    def handle(self, *args: Any, **opts: Any) -> None:
        systems = [s.strip() for s in opts["systems"].split(",") if s.strip()]
        if not systems or set(systems) - {*benchmark.CHATSTREAM_MODES, "socketio", "centrifugo"}:
            raise CommandError(f"--systems takes {', '.join(benchmark.CHATSTREAM_MODES)}, socketio and/or centrifugo")
        if "chatstream-react" in systems and opts["rate"]:
            raise CommandError("chatstream-react keys each reaction by its seq: it needs one send in flight (--rate 0)")
        if opts["url"] and {"chatstream-daphne", "chatstream-alt"} & set(systems):
            raise CommandError("--url measures a running cluster as it is: use --systems chatstream")
        if any("=" not in pair or not pair.startswith("CHATSTREAM_") for pair in opts["alt_env"]):
            raise CommandError("--alt-env takes CHATSTREAM_NAME=VALUE")
        if opts["connections"] < opts["conversations"] or opts["conversations"] < 1:
            raise CommandError("need at least one connection per conversation")
        workload = benchmark.Workload(connections=opts["connections"], conversations=opts["conversations"],
                                      duration_s=opts["duration"], rate=opts["rate"],
                                      idle_s=opts["idle_seconds"], mention=opts["mention"],
                                      profile_dir=opts["profile"], quiet_lock_dir=opts["quiet_lock"])
        out_dir = Path(opts["out"])
        out_dir.mkdir(parents=True, exist_ok=True)
        # A SIGTERM (``timeout``, a supervisor) unwinds like Ctrl-C, through the ``finally`` blocks that stop the
        # servers this run started in their own sessions; the default action left them running, orphaned.
        signal.signal(signal.SIGTERM, _terminate)
        # The load client runs on uvloop, as the brokers do: it drives every connection of every system from one
        # thread, and on a 2-core machine it must not be what sets the pace (its CPU % is in the table).
        results: list[benchmark.Result] = []
        # Each system's figures are saved as soon as it is measured (fanout-<start>-partial.json): a run stopped
        # later (a timeout while it waits for a shared machine's benchmark lock) keeps what it measured.
        partial = out_dir / f"fanout-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-partial.json"

        def checkpoint(result: benchmark.Result) -> None:
            results.append(result)
            saved = benchmark.summary_stats(results)
            saved.update(workload=vars(workload), brokers=opts["brokers"], command=" ".join(sys.argv))
            partial.write_text(json.dumps(saved, indent=2))

        uvloop.run(self._run(workload=workload, systems=systems, opts=opts, out_dir=out_dir, checkpoint=checkpoint))
        partial.unlink(missing_ok=True)
        self.stdout.write("\n" + benchmark.table(results))
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        rate = f"{workload.rate:g} msg/s" if workload.rate else "as fast as acked"
        title = (f"{workload.connections} connections in {workload.conversations} conversations, {rate}, "
                 f"{opts['brokers']} server process(es) each")
        png = out_dir / f"fanout-{stamp}.png"
        benchmark.plot(results, png, title=title)
        summary = benchmark.summary_stats(results)
        summary.update(workload=vars(workload), brokers=opts["brokers"], command=" ".join(sys.argv), at=stamp)
        (out_dir / f"fanout-{stamp}.json").write_text(json.dumps(summary, indent=2))
        if summary.get("ratio_deliveries_per_core") is not None:
            self.stdout.write(f"\nChatStream / Socket.IO, deliveries per server core-second: "
                              f"{summary['ratio_deliveries_per_core']:.2f}x; deliveries/s: "
                              f"{summary['ratio_deliveries_per_s']:.2f}x; drained (the window's backlog "
                              f"delivered and counted): {summary['ratio_deliveries_per_core_drained']:.2f}x")
        if summary.get("ratio_centrifugo_deliveries_per_core") is not None:
            self.stdout.write(f"\nChatStream / Centrifugo, deliveries per server core-second: "
                              f"{summary['ratio_centrifugo_deliveries_per_core']:.2f}x; deliveries/s: "
                              f"{summary['ratio_centrifugo_deliveries_per_s']:.2f}x; drained: "
                              f"{summary['ratio_centrifugo_deliveries_per_core_drained']:.2f}x")
        if summary.get("ratio_daphne_deliveries_per_core") is not None:
            self.stdout.write(f"\nChatStream on daphne / Socket.IO, deliveries per server core-second: "
                              f"{summary['ratio_daphne_deliveries_per_core']:.2f}x")
        for system, first in summary["p99_sent_first_second_ms"].items():
            self.stdout.write(f"\n{system}: p99 of messages sent in the first second {first:.1f} ms, after it "
                              f"{summary['p99_sent_after_first_second_ms'][system]:.1f} ms")
        self.stdout.write(f"\nplot: {png}\nresults: {out_dir / f'fanout-{stamp}.json'}")

    async def _run(self, *, workload: benchmark.Workload, systems: list[str], opts: dict[str, Any],
                   out_dir: Path, checkpoint: Callable[[benchmark.Result], None]) -> None:
        from storage.mongo import mongo_connect

        members = benchmark.population(connections=workload.connections, conversations=workload.conversations)
        servers = None
        workdir = out_dir
        if opts["url"]:
            redis_url, mongodb_uri = settings.REDIS_URL, settings.MONGODB_URI
        else:
            servers, workdir = await asyncio.to_thread(benchmark.private_servers)
            redis_url, mongodb_uri = servers.redis_url, servers.mongodb_uri
            mongo_connect(mongodb_uri)
            self.stderr.write(f"private Redis {redis_url} and MongoDB {mongodb_uri} (logs in {workdir})")
        try:
            for system in [s for s in systems if s.startswith("chatstream")]:
                conversation_ids, tickets, user_ids = await asyncio.to_thread(
                    benchmark.chatstream_setup, redis_url=redis_url, members=members,
                    connections=workload.connections)
                spawned: list[Any] = []
                if opts["url"]:
                    urls = [opts["url"]]
                    pids = [int(p) for p in opts["server_pids"].split(",") if p.strip()]
                else:
                    env = benchmark_env(redis_url=redis_url, mongodb_uri=mongodb_uri)
                    if system == "chatstream-daphne":
                        env["CHATSTREAM_BROKER_SERVER"] = "daphne"
                    if system == "chatstream-alt":
                        for pair in opts["alt_env"]:
                            name, value = pair.split("=", 1)
                            env[name] = value
                    spawned = await asyncio.to_thread(benchmark.brokers_spawn, count=opts["brokers"], env=env,
                                                      log_dir=workdir)
                    urls = [f"ws://127.0.0.1:{port}/ws/" for _, port in spawned]
                    pids = [proc.pid for proc, _ in spawned]
                try:
                    checkpoint(await benchmark.measure(
                        system=system, urls=urls, workload=workload, members=members,
                        conversation_ids=conversation_ids, tickets=tickets, server_pids=pids, out=self.stderr,
                        settled=functools.partial(benchmark.chatstream_online_all, user_ids, redis_url=redis_url)))
                finally:
                    await asyncio.to_thread(benchmark.processes_stop, spawned)
            if "socketio" in systems:
                peers = await asyncio.to_thread(benchmark.peers_spawn, count=opts["brokers"], redis_url=redis_url,
                                                log_dir=workdir)
                try:
                    rooms = [f"room-{i}" for i in range(workload.conversations)]
                    checkpoint(await benchmark.measure(
                        system="socketio", urls=[f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
                                                 for _, port in peers],
                        workload=workload, members=members, conversation_ids=rooms, tickets=None,
                        server_pids=[proc.pid for proc, _ in peers], out=self.stderr))
                finally:
                    await asyncio.to_thread(benchmark.processes_stop, peers)
            if "centrifugo" in systems:
                checkpoint(await self._run_centrifugo(workload=workload, members=members, brokers=opts["brokers"],
                                                          redis_url=redis_url, workdir=workdir))
        finally:
            if servers is not None:
                servers.stop()

    async def _run_centrifugo(self, *, workload: benchmark.Workload, members: list[list[int]], brokers: int,
                              redis_url: str, workdir: Path) -> benchmark.Result:
        """The Centrifugo peer: ``brokers`` nodes on the run's Redis, one channel per conversation, one user and
        token per connection, connections spread round robin over the nodes like the other systems'."""
        import secrets

        secret = secrets.token_hex(32)
        nodes = await asyncio.to_thread(benchmark.centrifugo_spawn, count=brokers, redis_url=redis_url,
                                        secret=secret, log_dir=workdir)
        self.stderr.write(f"centrifugo: {benchmark.centrifugo_version()}")
        try:
            channels = [f"conversation-{i}" for i in range(workload.conversations)]
            channel_of = {i: channels[c] for c, group in enumerate(members) for i in group}
            urls = [f"ws://127.0.0.1:{port}/connection/websocket" for _, port in nodes]
            tokens = [benchmark.connect_token(user=f"u{i}", secret=secret) for i in range(workload.connections)]

            def conn_factory(i: int, counters: benchmark.Counters,
                             on_ack: Callable[[str], None]) -> benchmark.Conn:
                return benchmark.CentrifugoConn(i, urls[i % len(urls)], counters, on_ack, token=tokens[i],
                                                channel=channel_of[i])

            return await benchmark.measure(
                system="centrifugo", urls=urls, workload=workload, members=members, conversation_ids=channels,
                tickets=None, server_pids=[proc.pid for proc, _ in nodes], out=self.stderr,
                conn_factory=conn_factory)
        finally:
            await asyncio.to_thread(benchmark.processes_stop, nodes)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def benchmark_env(*, redis_url: str, mongodb_uri: str) -> dict[str, str]:
    """The brokers' environment: this run's servers, quiet logs, the per-connection rate limit lifted (the
    senders of an "as fast as acked" run exceed a person's 20 frames/s by design), and the clients pinged every
    25 s as both peers ping theirs (Socket.IO's and Centrifugo's default): the load client reaches the brokers
    directly, where uvicorn pings each socket every CHATSTREAM_WS_PING_INTERVAL (20 s), a keepalive real clients
    get from the gateway instead (docs/adr/0049)."""
    import os

    env = dict(os.environ)
    env.update(REDIS_URL=redis_url, MONGODB_URI=mongodb_uri, CHATSTREAM_DOTENV="", LOG_LEVEL="WARNING",
               DEBUG="0", SECRET_KEY=settings.SECRET_KEY, CHATSTREAM_WS_RATE="1000000",
               CHATSTREAM_WS_BURST="1000000", PYTHONUNBUFFERED="1", CHATSTREAM_WS_PING_INTERVAL="25")
    return env
