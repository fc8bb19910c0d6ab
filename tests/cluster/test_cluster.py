"""The local cluster as `make run` starts it: every role up, discovery live, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from chatstream_site.localcluster import Cluster, manage, tagged_pids, wait_until
from core.registry import instances_list
from core.tokens import token_issue

pytestmark = pytest.mark.cluster


def registry(cluster: Cluster) -> list[dict[str, str]]:
    result = manage("services", "--json", env=cluster.env)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_make_run_cluster_registers_every_role_and_forgets_a_killed_broker(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        cluster.wait_ready()
        # Ready means one instance of every role; the second gateway/broker/api/storage may register a moment later.
        def all_registered() -> list[dict[str, str]] | None:
            found = registry(cluster)
            return found if len(found) == 9 else None

        live = wait_until(all_registered, timeout_s=30, what="all 9 instances to register")
        assert Counter(i["role"] for i in live) == {
            "gateway": 2, "broker": 2, "api": 2, "storage": 2, "storage-beat": 1
        }, live
        for entry in live:
            assert set(entry) >= {"role", "id", "url", "started_at", "last_seen"}
            # Every role answers its own health endpoints on the URL it registered.
            assert httpx.get(f"{entry['url']}/healthz", timeout=5).status_code == 200, entry
            # Each gateway's view of the registry is up to a second old (gateway/upstreams.py), and the two gateways
            # answer on one port (docs/adr/0056): the one just started may not list every role yet.
            def says_ready(url: str = entry["url"]) -> bool:
                return bool(httpx.get(f"{url}/readyz", timeout=10).json()["status"] == "ready")

            wait_until(says_ready, timeout_s=10, interval_s=0.2, what=f"{entry['id']} to say ready")

        # The gateway routes /admin/ to an api instance (Django answers with its login redirect).
        assert httpx.get(f"{cluster.url}/admin/", timeout=10).status_code == 302
        # /api/ needs an access token at the gateway; with one, the api answers its JSON 404.
        token = token_issue(user_id="u-cluster", username="cluster", type="access")
        missing = httpx.get(f"{cluster.url}/api/no-such-thing", headers={"Authorization": f"Bearer {token}"},
                            timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", missing.text

        ttl = int(os.environ["CHATSTREAM_REGISTRY_TTL"])
        broker = next(i for i in live if i["role"] == "broker" and i["id"].startswith("broker-1-"))
        (pid,) = cluster.role_pids("broker", "1")
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # Poll Redis in-process (a `manage.py services` per poll costs seconds of start-up on a busy machine).
        client = redis.Redis.from_url(cluster.env["REDIS_URL"])
        wait_until(lambda: broker["id"] not in {i.id for i in instances_list(client)},
                   timeout_s=ttl + 10, interval_s=0.1, what="the killed broker to leave the registry")
        # Gone because its TTL ran out, not because anyone deregistered it: at most one TTL after the kill
        # (plus the poll interval and a little scheduling slack).
        assert time.monotonic() - killed_at <= ttl + 2
    finally:
        cluster.stop()
    assert tagged_pids(cluster.tag) == [], f"processes left behind:\n{cluster.log_tail()}"


def test_ctrl_c_deregisters_every_instance(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        cluster.wait_ready()
        wait_until(lambda: len(registry(cluster)) == 9, timeout_s=30, what="all 9 instances to register")
    finally:
        cluster.stop()
    assert tagged_pids(cluster.tag) == []
    # A clean stop deregisters at once, well before any TTL could have run out.
    assert registry(cluster) == [], cluster.log_tail()


def test_a_restarted_instance_joins_again_and_the_others_never_notice(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, supervised=False)
    cluster.start()
    try:
        cluster.wait_ready()
        wait_until(lambda: len([i for i in registry(cluster) if i["role"] == "broker"]) == 2, timeout_s=30,
                   what="both brokers to register")
        before = {i["id"] for i in registry(cluster) if i["role"] == "broker"}
        cluster.kill_process("broker1")
        wait_until(lambda: len([i for i in registry(cluster) if i["role"] == "broker"]) == 1,
                   timeout_s=int(os.environ["CHATSTREAM_REGISTRY_TTL"]) + 3, what="one broker left")
        assert cluster.ready()  # one broker is enough for every role to be live
        cluster.start_process("broker1")
        wait_until(lambda: len({i["id"] for i in registry(cluster) if i["role"] == "broker"}) == 2,
                   timeout_s=60, what="two brokers again")
        after = {i["id"] for i in registry(cluster) if i["role"] == "broker"}
        assert len(after - before) == 1  # a new registration, not the dead one come back
    finally:
        cluster.stop()
    assert tagged_pids(cluster.tag) == []
