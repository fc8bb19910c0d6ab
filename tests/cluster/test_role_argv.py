"""What a role's process is before it serves: the server ``manage.py role`` execs (the api's command line must and
must not say), and what its ASGI module froze for the cyclic GC."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from chatstream_site.localcluster import child_env
from chatstream_site.localservers import ROOT
from chatstream_site.management.commands.role import role_argv
from gateway.proxy import UPSTREAM_KEEPALIVE_S


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_api_runs_on_uvicorn_by_default_and_reads_x_forwarded_for_itself(settings: Any) -> None:
    assert settings.API_SERVER == "uvicorn"
    argv = role_argv("api", port=8111, instance=1, bindir="/venv/bin")
    assert argv[0] == "/venv/bin/uvicorn" and argv[-1] == "chatstream_site.asgi:application"
    assert (option(argv, "--loop"), option(argv, "--http"), option(argv, "--port")) == ("uvloop", "httptools", "8111")
    # uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 whatever CHATSTREAM_TRUSTED_PROXIES says.
    assert "--no-proxy-headers" in argv and "--proxy-headers" not in argv
    # The lifespan deregisters the instance at shutdown (chatstream_site/asgi.py api_application).
    assert option(argv, "--lifespan") == "on"
    # The gateway's pool must be the side that closes an idle connection, never the api under it.
    assert int(option(argv, "--timeout-keep-alive")) > UPSTREAM_KEEPALIVE_S


def test_only_the_gateways_share_their_port() -> None:
    """docs/adr/0056: the gateways of one machine bind the public port with SO_REUSEPORT; a broker's or the api's
    port is its own, so a second instance on it fails to start rather than splitting its traffic."""
    gateway = role_argv("gateway", port=8000, instance=2, bindir="/venv/bin")
    assert gateway[:4] == ["/venv/bin/python", "-m", "chatstream_site.uvicorn_main", "--reuse-port"]
    assert option(gateway, "--port") == "8000"
    for role in ("broker", "api"):
        assert "--reuse-port" not in role_argv(role, port=8101, instance=1, bindir="/venv/bin"), role


def test_the_api_stays_available_on_daphne(settings: Any) -> None:
    settings.API_SERVER = "daphne"
    argv = role_argv("api", port=8112, instance=2, bindir="/venv/bin")
    assert argv[0] == "/venv/bin/daphne" and option(argv, "-p") == "8112"
    assert "--proxy-headers" not in argv  # daphne would believe X-Forwarded-For from any peer


@pytest.mark.parametrize("role", ["api", "broker"])
def test_a_served_role_freezes_what_its_requests_will_use_before_serving(role: str) -> None:
    # The module dict of a view (imported through the URLconf, not by the ASGI module itself) is tracked by the
    # collector yet not among the objects a collection walks: frozen (chatstream_site/asgi.py long_lived_freeze).
    code = ("import gc, sys, chatstream_site.asgi; views = sys.modules['api.views'].__dict__; "
            "print(gc.get_freeze_count(), gc.is_tracked(views), any(o is views for o in gc.get_objects()))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(CHATSTREAM_ROLE=role),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    frozen, tracked, walked = result.stdout.split()
    assert int(frozen) > 50_000 and tracked == "True" and walked == "False", result.stdout



def test_the_gateway_collects_its_young_objects_less_often_than_cpythons_default() -> None:
    # CPython's 700 ran ~650 young and 5 full collections in a wave of 4,000 connects (settings.GATEWAY_GC_THRESHOLD).
    code = "import gc, chatstream_site.asgi; print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    for env, expected in (({}, "10000"), ({"CHATSTREAM_GATEWAY_GC_THRESHOLD": "2500"}, "2500")):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(CHATSTREAM_ROLE="gateway", **env),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [expected, "True"], result.stdout
