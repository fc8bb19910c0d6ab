"""Bad configuration stops a process at once with a message that names the variable."""

from __future__ import annotations

import time

import pytest

from chatstream_site.localcluster import child_env, manage


def test_secret_key_is_required_outside_debug() -> None:
    env = child_env(DEBUG="0")
    env.pop("SECRET_KEY", None)
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "SECRET_KEY is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_short_secret_key_is_refused_outside_debug() -> None:
    result = manage("check", env=child_env(DEBUG="0", SECRET_KEY="short"))
    assert result.returncode != 0 and "SECRET_KEY is too short" in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [("REDIS_URL", "localhost:6379"), ("MONGODB_URI", "http://x"), ("DATABASE_URL", "mysql://x/db"),
     ("CHATSTREAM_PARTITIONS", "sixteen"), ("DEBUG", "perhaps")],
)
def test_malformed_values_name_the_variable(name: str, value: str) -> None:
    result = manage("check", env=child_env(**{name: value}))
    assert result.returncode != 0
    assert f"configuration error: {name}=" in result.stderr, result.stderr


def test_a_role_fails_fast_when_redis_is_unreachable() -> None:
    started = time.monotonic()
    result = manage("role", "api", "--port", "1",
                    env=child_env(REDIS_URL="redis://127.0.0.1:1/0", CHATSTREAM_STARTUP_WAIT="1"))
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "redis unreachable" in result.stderr and "REDIS_URL=redis://127.0.0.1:1/0" in result.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s to give up"


def test_a_role_fails_fast_when_mongodb_is_unreachable() -> None:
    result = manage("role", "storage", "--port", "1",
                    env=child_env(MONGODB_URI="mongodb://127.0.0.1:1/x", CHATSTREAM_STARTUP_WAIT="0"))
    assert result.returncode != 0
    assert "mongodb unreachable" in result.stderr and "MONGODB_URI=mongodb://127.0.0.1:1/x" in result.stderr


@pytest.mark.parametrize("cluster", ["0", "1"])
def test_a_role_fails_fast_when_the_message_bus_is_unreachable(cluster: str) -> None:
    result = manage("role", "broker", "--port", "1",
                    env=child_env(CHATSTREAM_STREAMS_REDIS_URL="redis://127.0.0.1:1/0",
                                  CHATSTREAM_STREAMS_REDIS_CLUSTER=cluster, CHATSTREAM_STARTUP_WAIT="0"))
    assert result.returncode != 0
    assert "unreachable" in result.stderr, result.stderr
    assert "CHATSTREAM_STREAMS_REDIS_URL=redis://127.0.0.1:1/0" in result.stderr, result.stderr


def test_a_good_configuration_passes_checks() -> None:
    result = manage("check")
    assert result.returncode == 0, result.stderr
