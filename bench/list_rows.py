"""A full conversation list in process: what one list of ``--conversations`` (50) costs the api's selector
(``api.conversation_list.conversation_list_for_user``) and its renderer (``api.views.conversation_out`` then
DRF's JSON renderer), caches warm, on a private Redis and FerretDB (issue 13; docs/benchmarks.md "Issue 13: a
list of 50"):

    .venv/bin/python bench/list_rows.py [--conversations 50] [--rounds 300] [--quiet-lock /work/wt] [--profile]

One user gets ``--conversations`` 1:1 chats through the API's services, one message each through the real
write path (in the recent window, as a day's chats are); then ``--rounds`` lists one after another, the first
50 untimed. Prints one JSON line: p50 and p90 ms of each part. ``--profile`` adds a cProfile of 50 more lists.
Comparing two commits: run it in a checkout of each, one after the other, a few times in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quiet_lock import quiet_lock  # noqa: E402
from chatstream_site.localservers import servers_start  # noqa: E402

UNTIMED = 50  # the first lists: connections, scripts and caches of this process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--quiet-lock", default="", help="hold DIR/gate.lock and DIR/bench.lock while measuring")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    servers = servers_start(Path(tempfile.mkdtemp(prefix="chatstream-listrows-")))
    try:
        os.environ.update(servers.env())
        os.environ.update(CHATSTREAM_DOTENV="", DEBUG="0", DJANGO_SETTINGS_MODULE="chatstream_site.settings",
                          SECRET_KEY=os.environ.get("SECRET_KEY") or "bench-secret-key-that-is-long-enough-0123456789")
        import django

        django.setup()
        measure(args)
    finally:
        servers.stop()


def measure(args: argparse.Namespace) -> None:
    from rest_framework.renderers import JSONRenderer

    from api import accounts, conversation_list, services
    from api.views import conversation_out

    password = "Bench-" + uuid.uuid4().hex
    me = str(accounts.user_create(username="lister", email="lister@bench.test", password=password).id)
    for k in range(args.conversations):
        accounts.user_create(username=f"peer{k}", email=f"peer{k}@bench.test", password=password)
        conv, _ = services.chat_single_get_or_create(user_id=me, username=f"peer{k}")
        services.conversation_message_send(user_id=me, conversation_id=str(conv.id), client_msg_id=uuid.uuid4().hex,
                                           content=f"message number {k} of the bench")

    def one() -> tuple[float, float, int]:
        t = time.perf_counter()
        rows = conversation_list.conversation_list_for_user(user_id=me, limit=50)
        t1 = time.perf_counter()
        body = JSONRenderer().render({"results": [conversation_out(x) for x in rows]})
        return (t1 - t) * 1000, (time.perf_counter() - t1) * 1000, len(body)

    selector, render = [], []
    with quiet_lock(args.quiet_lock):
        for k in range(args.rounds):
            s, r, size = one()
            if k >= UNTIMED:
                selector.append(s)
                render.append(r)
    print(json.dumps({"code": conversation_list.__file__, "conversations": args.conversations, "answer_bytes": size,
                      "load_avg": os.getloadavg(),
                      "selector_p50_ms": round(statistics.median(selector), 2),
                      "selector_p90_ms": round(sorted(selector)[int(len(selector) * 0.9)], 2),
                      "render_p50_ms": round(statistics.median(render), 2),
                      "render_p90_ms": round(sorted(render)[int(len(render) * 0.9)], 2)}), flush=True)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(lambda: [one() for _ in range(50)])
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
