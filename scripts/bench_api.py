"""Benchmark of the REST API's two hot reads (docs/benchmarks.md, "REST API"):

* a history page of 50 from a conversation of 100,000 messages (newest page and random ``before_seq`` pages);
* ``GET /api/v1/conversations`` for a user in 500 conversations, each with unread messages (so every row
  pays its unread count; the default page is 100, so 5 pages cover all 500).

It starts its own Redis and FerretDB (or uses ``CHATSTREAM_TEST_MONGODB_URI``), seeds them, and calls the
views in process through the whole Django/DRF stack (authentication, validation, MongoDB, Redis, JSON), so
the figures exclude only the HTTP hop. Usage::

    .venv/bin/python scripts/bench_api.py [--messages 100000] [--conversations 500] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    from chatstream_site.localservers import servers_start

    # SIGTERM (e.g. from `timeout`) unwinds through `finally`, so the private servers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-bench-api-"))
    servers = servers_start(workdir)
    try:
        os.environ.update(servers.env(), CHATSTREAM_DOTENV="", DEBUG="1",
                          DJANGO_SETTINGS_MODULE="chatstream_site.settings")
        os.environ.setdefault("SECRET_KEY", "bench-secret-key-that-is-long-enough-0123456789")
        import django

        django.setup()
        run(args)
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    from django.test.utils import setup_test_environment

    from api.tokens import token_issue
    from storage.documents import Conversation, Message
    from tests.api_support import account, bulk_messages

    setup_test_environment()  # ALLOWED_HOSTS accepts the test client's "testserver"
    reader, writer = account("reader"), account("writer")
    big = reader.client.post("/api/v1/chats/single", {"username": writer.username}, format="json").json()
    cid = big["conversation_id"]
    started = time.perf_counter()
    bulk_messages(conversation_id=cid, sender_id=writer.id, count=args.messages)
    Message.ensure_indexes()
    print(f"seeded {args.messages} messages in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    lister = account("lister")
    client = lister.client
    for i in range(args.conversations):
        peer = account(f"peer{i}-")
        conv = peer.client.post("/api/v1/chats/group", {"name": f"group {i}", "members": [lister.username]},
                                format="json").json()
        bulk_messages(conversation_id=conv["conversation_id"], sender_id=peer.id, count=3)
        Conversation.objects(id=conv["conversation_id"]).update_one(set__last_seq=3)
    print(f"seeded {args.conversations} conversations in {time.perf_counter() - started:.1f} s")

    def fresh(who: Any) -> None:
        # A slow run outlives the 10-minute access token: sign a new one before each call (not timed).
        who.client.credentials(HTTP_AUTHORIZATION="Bearer " + token_issue(user_id=who.id, username=who.username,
                                                                           type="access"))

    def timed(call: object, runs: int) -> list[float]:
        out = []
        for _ in range(runs):
            fresh(reader)
            fresh(lister)
            t0 = time.perf_counter()
            response = call()  # type: ignore[operator]
            out.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200, response.content
            print(f"  {out[-1]:.0f} ms", flush=True)
        return out

    url = f"/api/v1/conversations/{cid}/messages"
    timed(lambda: reader.client.get(url, {"limit": 50}), 2)  # warm up
    print("history, newest page:", flush=True)
    newest = timed(lambda: reader.client.get(url, {"limit": 50}), args.runs)
    print("history, random before_seq:", flush=True)
    rng = random.Random(7)  # noqa: S311 - reproducible page choice, not a secret
    older = timed(lambda: reader.client.get(url, {"limit": 50, "before_seq": rng.randint(51, args.messages)}),
                  args.runs)
    print("conversations:", flush=True)
    fresh(lister)
    page = client.get("/api/v1/conversations", {"limit": 500}).json()["results"]
    assert len(page) == args.conversations and all(c["unread"] == 3 for c in page)
    conv_runs = max(5, args.runs // 4)
    first_page = timed(lambda: client.get("/api/v1/conversations"), conv_runs)
    all_500 = timed(lambda: client.get("/api/v1/conversations", {"limit": 500}), conv_runs)

    print("\n| read | runs | p50 ms | p99 ms | mean ms |\n| --- | --- | --- | --- | --- |")
    for name, values in (
        (f"history page of 50, newest, {args.messages:,} messages", newest),
        (f"history page of 50, random before_seq, {args.messages:,} messages", older),
        (f"GET /conversations (first 100 of {args.conversations})", first_page),
        (f"GET /conversations?limit=500 (all {args.conversations})", all_500),
    ):
        print(f"| {name} | {len(values)} | {percentile(values, 50):.1f} | {percentile(values, 99):.1f} | "
              f"{statistics.fmean(values):.1f} |")


if __name__ == "__main__":
    main()
