"""pytest plugin (loaded with ``-p tests.support.plugin``): private servers before Django reads its settings.

pytest-django imports the settings in its own ``pytest_load_initial_conftests``, before any conftest runs,
and settings read REDIS_URL and MONGODB_URI once. So the servers are started in a hook *wrapper* of that
same hook, which runs before every plain implementation, and their URLs are put in the environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chatstream_site.localservers import Servers, servers_start

_servers: Servers | None = None


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: Any, args: list[str]) -> Generator[None]:
    global _servers
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-test-"))
    _servers = servers_start(workdir)
    os.environ.update(_servers.env())
    os.environ["CHATSTREAM_DOTENV"] = ""  # a developer's .env must not leak into the tests
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("SECRET_KEY", "test-secret-key-that-is-long-enough-for-checks-0123456789")
    # Keep the session's registry and start-up waits short so fault tests finish quickly.
    os.environ.setdefault("CHATSTREAM_REGISTRY_HEARTBEAT", "0.5")
    os.environ.setdefault("CHATSTREAM_REGISTRY_TTL", "3")
    return (yield)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _servers is not None:
        _servers.stop()
        shutil.rmtree(_servers.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def servers() -> Servers:
    """The session's private Redis and MongoDB-protocol servers."""
    assert _servers is not None, ("tests.support.plugin did not start the servers "
                                  "(run pytest with -p tests.support.plugin)")
    return _servers


@pytest.fixture
def r(servers: Servers) -> Iterator[redis.Redis]:
    """A sync client of the session's Redis (the bus and coordination both, as in the default configuration)."""
    client = redis.Redis.from_url(servers.redis_url)
    yield client
    client.close()
