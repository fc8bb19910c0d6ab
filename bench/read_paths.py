"""The read paths of docs/adr/0028 against the store's size, in process (the whole Django/DRF stack through
DRF's test client, without the HTTP hop), on a private Redis and FerretDB (SQLite, ``make run``'s default):

    .venv/bin/python bench/read_paths.py --sizes 10000 100000 [--users 10000 --conversations 20000]

For each size the store is filled directly (``insert_many`` into ``messages``, spread over the conversations,
``--hot`` of them getting ``--hot-share`` of the messages), the buckets are built (``buckets_build``, as after
an upgrade), and each hot conversation then gets ``--recent`` more messages through the real write path
(``messaging.services.message_send``: the recent window, not yet drained). Then, one request at a time
(p50/p99 ms); after the first size only the other conversations grow. Measured: the **latest** page of 50 of
a hot conversation, a **deep** page (``before_seq`` a quarter in:
buckets), the **conversation list** (50) of a hot conversation's member (caches warm), and
**connect's read** (``user_conversation_ids``, warm). Prints one JSON line per size; ``--json`` writes them.

``--gateway`` measures the same reads through the gateway of a real local cluster instead (the gateway and
api processes as ``make run`` runs them: chatstream_site/localcluster.py ``Cluster``), each path alone
(``--samples`` requests of one path, one at a time, on one keep-alive connection, then the next path), after
a warm-up of every sampled user's caches. ``--profile DIR`` then records each path again under py-spy
(``--profile-seconds`` per path, the api and gateway processes, raw collapsed stacks) into DIR.
``--variant NAME:K=V,...`` (repeated) measures one cluster per variant, each with that environment (e.g.
``daphne:CHATSTREAM_API_SERVER=daphne``), on the same store, ``--rounds`` times in turn. ``--api-ab NAME:K=V,...``
(repeated) instead starts one api process per variant beside one cluster and asks them directly, request by
request in turn (A B, B A, ...): on a noisy machine the only comparison whose noise falls on both sides alike.
``--cold-users`` users' lists are then read with their cached conversation ids dropped, first without, then
with their ``user_conversations`` document (docs/adr/0043). ``--quiet-lock DIR`` takes ``DIR/gate.lock`` then
``DIR/bench.lock`` (exclusive) only around the measuring, so a shared machine's other benchmarks and tests
stay out of it (off by default).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data_tier import pct, seed_population, stats  # noqa: E402
from bench.quiet_lock import quiet_lock  # noqa: E402
from chatstream_site.localcluster import Cluster  # noqa: E402
from chatstream_site.localservers import servers_start  # noqa: E402


def fill(n: int, *, convs: list[tuple[str, list[str]]], hot: list[int], share: float, tops: dict[str, int],
         rnd: random.Random) -> None:
    from bson import ObjectId
    from mongoengine.connection import get_db

    db = get_db()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    batch: list[dict[str, Any]] = []
    cold = sorted(set(range(len(convs))) - set(hot))
    for k in range(n):
        cid, members = convs[rnd.choice(hot)] if rnd.random() < share else convs[rnd.choice(cold)]
        tops[cid] = tops.get(cid, 0) + 1
        batch.append({"_id": uuid.uuid4().hex, "conversation_id": ObjectId(cid), "seq": tops[cid],
                      "sender_id": ObjectId(members[k % 2]), "content": f"stored {k}", "client_msg_id": None,
                      "timestamp": base + timedelta(seconds=k), "deleted": False, "read_status": "sent"})
        if len(batch) == 1000:
            db.messages.insert_many(batch, ordered=False)
            batch = []
    if batch:
        db.messages.insert_many(batch, ordered=False)


async def recent(*, convs: list[tuple[str, list[str]]], hot: list[int], tops: dict[str, int], count: int) -> None:
    import redis.asyncio
    from django.conf import settings

    from core.keys import partition_of, seq_key
    from messaging.services import message_send

    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        for i in hot:
            cid, members = convs[i]
            await client.hset(seq_key(partition_of(cid)), cid, tops.get(cid, 0))  # the store's seqs were given
            for k in range(count):
                await message_send(client, user_id=members[k % 2], conversation_id=cid,
                                   client_msg_id=uuid.uuid4().hex, content=f"recent {k}")
            tops[cid] = tops.get(cid, 0) + count
    finally:
        await client.aclose()


def measure(args: argparse.Namespace, *, convs: list[tuple[str, list[str]]], hot: list[int],
            tops: dict[str, int]) -> dict[str, Any]:
    from rest_framework.test import APIClient

    from core.tokens import token_issue
    from messaging.selectors import user_conversation_ids

    def client(uid: str) -> APIClient:
        c = APIClient()
        c.credentials(HTTP_AUTHORIZATION=f"Bearer {token_issue(user_id=uid, username='bench', type='access')}")
        return c

    latest: list[float] = []
    deep: list[float] = []
    listing: list[float] = []
    connect: list[float] = []
    for k in range(args.samples):
        cid, members = convs[hot[k % len(hot)]]
        c = client(members[0])
        c.get("/api/v1/conversations", {"limit": 50})  # warm the user's caches
        for out, path, query in ((latest, f"/api/v1/conversations/{cid}/messages", {"limit": 50}),
                                 (deep, f"/api/v1/conversations/{cid}/messages",
                                  {"limit": 50, "before_seq": max(2, tops[cid] // 4)}),
                                 (listing, "/api/v1/conversations", {"limit": 50})):
            t = time.perf_counter()
            response = c.get(path, query)
            out.append((time.perf_counter() - t) * 1000)
            assert response.status_code == 200, response.content
        t = time.perf_counter()
        user_conversation_ids(user_id=members[0])
        connect.append((time.perf_counter() - t) * 1000)
    return {"latest_page": stats(latest), "deep_page": stats(deep), "conversation_list": stats(listing),
            "connect_read": stats(connect)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure_gateway(args: argparse.Namespace, cluster: Cluster, *, convs: list[tuple[str, list[str]]],
                    hot: list[int], tops: dict[str, int], profile: str) -> dict[str, Any]:
    """Each read path alone through the gateway: ``--samples`` requests, one at a time (p50/p99 ms), on one
    keep-alive connection; ``--profile`` then runs each path under py-spy. Every answer must be 200."""
    import httpx

    from core.tokens import token_issue

    sampled = [convs[hot[k % len(hot)]] for k in range(args.samples)]

    def auth(uid: str) -> dict[str, str]:  # issued per request: the run may wait longer than a token lives
        return {"Authorization": f"Bearer {token_issue(user_id=uid, username='bench', type='access')}"}

    paths: dict[str, Any] = {
        "latest_page": lambda cid, uid: (f"/api/v1/conversations/{cid}/messages", {"limit": 50}),
        "deep_page": lambda cid, uid: (f"/api/v1/conversations/{cid}/messages",
                                       {"limit": 50, "before_seq": max(2, tops[cid] // 4)}),
        "conversation_list": lambda cid, uid: ("/api/v1/conversations", {"limit": 50}),
    }
    out: dict[str, Any] = {}
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        def one(name: str, k: int) -> float:
            cid, members = sampled[k % len(sampled)]
            path, params = paths[name](cid, members[0])
            headers = auth(members[0])
            t = time.perf_counter()
            response = http.get(path, params=params, headers=headers)
            ms = (time.perf_counter() - t) * 1000
            assert response.status_code == 200, response.text
            return ms

        for name in paths:  # warm-up: caches, connections, the processes' first-call costs
            for k in range(min(len(sampled), 20)):
                one(name, k)
        with quiet_lock(args.quiet_lock):
            out["load_before"] = load_average()
            for name in paths:
                timed = [one(name, k) for k in range(args.samples)]
                out[name] = {**stats(timed), "p90_ms": pct(timed, 0.9), "max_ms": round(max(timed), 1)}
            out.update(cold_list(args, http=http, auth=auth, convs=convs))
            out["load_after"] = load_average()
            print(json.dumps(out), flush=True)
            if profile:  # under the lock too: py-spy and this load would disturb another run's figures
                directory = Path(profile)
                directory.mkdir(parents=True, exist_ok=True)
                pids = {f"api{i}": pid for i in ("1", "2") for pid in cluster.role_pids("api", i)}
                pids.update({f"gateway{j}": pid for j, pid in enumerate(cluster.role_pids("gateway"))})
                spy_bin = str(Path(sys.executable).parent / "py-spy")
                for name in paths:
                    spies = [subprocess.Popen([spy_bin, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                                               "--duration", str(args.profile_seconds), "--output",
                                               str(directory / f"{name}-{role}.txt")],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                             for role, pid in pids.items()]
                    time.sleep(1)  # py-spy attaches
                    deadline, k, n = time.monotonic() + args.profile_seconds - 1, 0, 0
                    while time.monotonic() < deadline:
                        one(name, k)
                        k, n = k + 1, n + 1
                    for spy in spies:
                        spy.wait(timeout=120)
                    out.setdefault("profiled_requests", {})[name] = n
    return out


def variant_parse(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:K=V,K=V`` -> the variant's name and the environment its cluster gets."""
    name, _, pairs = text.partition(":")
    env = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return name, env


def measure_variants(args: argparse.Namespace, workdir: Path, *, convs: list[tuple[str, list[str]]],
                     hot: list[int], tops: dict[str, int]) -> dict[str, Any]:
    """:func:`measure_gateway` on one cluster per ``--variant`` (its environment on top of ``make run``'s), on the
    same store, alternating ``--rounds`` times (A B A B: the box's drift hits each alike); no variant: one
    cluster as ``make run`` starts it."""
    variants = [variant_parse(v) for v in args.variant] or [("default", {})]
    out: dict[str, Any] = {}
    for round_ in range(args.rounds):
        for name, env in variants:
            (workdir / f"cluster-{name}-{round_}").mkdir()
            cluster = Cluster(workdir / f"cluster-{name}-{round_}", supervised=False, **env)
            try:
                cluster.start()
                cluster.wait_ready(timeout_s=180)
                profile = args.profile and round_ == 0
                measured = measure_gateway(args, cluster, convs=convs, hot=hot, tops=tops,
                                           profile=str(Path(args.profile) / name) if profile else "")
            finally:
                cluster.stop()
            out.setdefault(name, []).append(measured)
            print(json.dumps({"variant": name, "round": round_, **measured}), flush=True)
    return out if args.variant else out["default"][0]


def measure_api_ab(args: argparse.Namespace, workdir: Path, *, convs: list[tuple[str, list[str]]],
                   hot: list[int], tops: dict[str, int]) -> dict[str, Any]:
    """Each ``--api-ab`` variant as one more api process (``manage.py role api`` with the variant's environment)
    beside a cluster as ``make run`` starts it, asked directly (no gateway) and **interleaved**: request k of a
    path goes to every variant in turn (the order reversed every other k), so the box's noise falls on each
    alike. ``--samples`` per path and variant, one at a time, each on its own keep-alive connection."""
    import httpx

    from chatstream_site.localcluster import wait_until
    from chatstream_site.localservers import ROOT, free_port
    from core.tokens import token_issue

    variants = [variant_parse(v) for v in args.api_ab]
    (workdir / "cluster-ab").mkdir()
    cluster = Cluster(workdir / "cluster-ab", supervised=False)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    clients: dict[str, httpx.Client] = {}
    sampled = [convs[hot[k % len(hot)]] for k in range(args.samples)]
    paths: dict[str, Any] = {
        "latest_page": lambda cid: (f"/api/v1/conversations/{cid}/messages", {"limit": 50}),
        "deep_page": lambda cid: (f"/api/v1/conversations/{cid}/messages",
                                  {"limit": 50, "before_seq": max(2, tops[cid] // 4)}),
        "conversation_list": lambda cid: ("/api/v1/conversations", {"limit": 50}),
    }
    timed: dict[str, dict[str, list[float]]] = {name: {path: [] for path in paths} for name, _env in variants}

    def one(name: str, path: str, k: int) -> float:
        cid, members = sampled[k % len(sampled)]
        url, params = paths[path](cid)
        headers = {"Authorization": f"Bearer {token_issue(user_id=members[0], username='bench', type='access')}"}
        t = time.perf_counter()
        response = clients[name].get(url, params=params, headers=headers)
        ms = (time.perf_counter() - t) * 1000
        assert response.status_code == 200, response.text
        return ms

    try:
        cluster.start()
        cluster.wait_ready(timeout_s=180)
        for i, (name, env) in enumerate(variants):
            port = free_port()
            log = open(workdir / f"api-ab-{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
            procs[name] = subprocess.Popen([sys.executable, "manage.py", "role", "api", "--instance", str(10 + i),
                                            "--port", str(port)], cwd=ROOT, env={**cluster.env, **env},
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            clients[name] = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        for name, client in clients.items():
            wait_until(functools.partial(_healthy, client), timeout_s=180, what=f"api variant {name}")
            for path in paths:  # warm-up: caches, connections, the processes' first-call costs
                for k in range(min(len(sampled), 20)):
                    one(name, path, k)
        out: dict[str, Any] = {}
        with quiet_lock(args.quiet_lock):
            out["load_before"] = load_average()
            for path in paths:
                for k in range(args.samples):
                    for name, _env in (variants if k % 2 == 0 else variants[::-1]):
                        timed[name][path].append(one(name, path, k))
            out["load_after"] = load_average()
        for name, by_path in timed.items():
            out[name] = {path: {**stats(values), "p90_ms": pct(values, 0.9), "max_ms": round(max(values), 1)}
                         for path, values in by_path.items()}
        print(json.dumps(out), flush=True)
        return out
    finally:
        for client in clients.values():
            client.close()
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=60)
        cluster.stop()


def _healthy(client: Any) -> bool:
    import httpx

    try:
        return bool(client.get("/healthz").status_code == 200)
    except httpx.HTTPError:
        return False


def cold_list(args: argparse.Namespace, *, http: Any, auth: Any, convs: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """The conversation list of ``--cold-users`` users whose cached conversation ids are gone (their TTL, or a
    Redis without its data): first as users from before docs/adr/0043 (no ``user_conversations`` document:
    the members query, a scan of ``conversations`` on FerretDB, which writes it), then, their cache dropped
    again, as every user after it (the document, read by ``_id``)."""
    import redis
    from bson import ObjectId
    from django.conf import settings
    from mongoengine.connection import get_db

    from core.keys import user_conversations_key

    client = redis.Redis.from_url(settings.REDIS_URL)
    users = [members[1] for _cid, members in convs[-args.cold_users:]] if args.cold_users else []
    timed: dict[str, list[float]] = {"cold_list_scan": [], "cold_list_document": []}
    for name in timed:
        for uid in users:
            if name == "cold_list_scan":  # the population has each user's document, as the API writes it
                get_db().user_conversations.delete_one({"_id": ObjectId(uid)})
            client.delete(user_conversations_key(uid))
            headers = auth(uid)
            t = time.perf_counter()
            response = http.get("/api/v1/conversations", params={"limit": 50}, headers=headers)
            timed[name].append((time.perf_counter() - t) * 1000)
            assert response.status_code == 200, response.text
    client.close()
    return {name: stats(values) for name, values in timed.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--hot", type=int, default=10)
    parser.add_argument("--hot-share", type=float, default=0.1)
    parser.add_argument("--recent", type=int, default=60, help="messages sent to each hot conversation")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--json", default="")
    parser.add_argument("--gateway", action="store_true", help="measure through a local cluster's gateway")
    parser.add_argument("--profile", default="", help="with --gateway: py-spy each path into this directory")
    parser.add_argument("--profile-seconds", type=int, default=20)
    parser.add_argument("--cold-users", type=int, default=5, help="with --gateway: users of the cold list")
    parser.add_argument("--variant", action="append", default=[],
                        help="with --gateway: NAME:K=V,K=V, a cluster with this environment (repeat to compare)")
    parser.add_argument("--api-ab", action="append", default=[],
                        help="NAME:K=V,K=V, an api process with this environment, asked directly and interleaved "
                             "with the other --api-ab variants (repeat)")
    parser.add_argument("--rounds", type=int, default=1, help="with --variant: measure each this many times")
    parser.add_argument("--quiet-lock", default="",
                        help="directory of gate.lock and bench.lock to hold while measuring")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-readpaths-"))
    servers = servers_start(workdir)
    os.environ.update(servers.env())
    os.environ.update(CHATSTREAM_DOTENV="", DEBUG="0", DJANGO_SETTINGS_MODULE="chatstream_site.settings",
                      SECRET_KEY="bench-secret-key-that-is-long-enough-0123456789abcdef",  # noqa: S106 - bench only
                      # One client reading as fast as it can: the per-IP and per-user budgets are for people.
                      CHATSTREAM_GATEWAY_RATE_IP="1000000/m", CHATSTREAM_GATEWAY_RATE_USER="1000000/m")
    import django

    django.setup()
    from mongoengine.connection import get_db

    from storage.buckets import buckets_build

    rnd = random.Random(5)  # noqa: S311 - a reproducible workload, not a secret
    rows = []
    try:
        _uids, convs = seed_population(users=args.users, conversations=args.conversations)
        hot = rnd.sample(range(len(convs)), args.hot)
        tops: dict[str, int] = {}
        have = 0
        for size in sorted(args.sizes):
            t = time.perf_counter()
            # After the first size the hot conversations keep their history (and their windows' invariant):
            # only the rest of the store grows.
            fill(size - have - args.hot * args.recent * (0 if have else 1), convs=convs, hot=hot,
                 share=0.0 if have else args.hot_share, tops=tops, rnd=rnd)
            built = buckets_build()
            asyncio.run(recent(convs=convs, hot=hot, tops=tops, count=args.recent if not have else 0))
            have = size
            row: dict[str, Any] = {"messages": get_db().messages.estimated_document_count() + args.hot * args.recent,
                                   "seed_s": round(time.perf_counter() - t, 1), "bucketed": built}
            if args.api_ab:
                row.update(measure_api_ab(args, workdir, convs=convs, hot=hot, tops=tops))
            elif args.gateway:
                row.update(measure_variants(args, workdir, convs=convs, hot=hot, tops=tops))
            else:
                row.update(measure(args, convs=convs, hot=hot, tops=tops))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"command": "bench/read_paths.py " + " ".join(sys.argv[1:]),
                                                   "results": rows}, indent=2))
    finally:
        servers.stop()


if __name__ == "__main__":
    main()
