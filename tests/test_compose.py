"""docker-compose.yml cannot run here (no Docker engine); check it declares every role and dependency."""

from __future__ import annotations

from collections import Counter
from typing import Any

import yaml

from tests.servers import ROOT


def load() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def role_of(service: dict[str, Any]) -> str | None:
    command = service.get("command") or []
    if command[:3] == ["python", "manage.py", "role"]:
        return str(command[3])
    return None


def test_every_role_is_declared_with_its_instance_count() -> None:
    services = load()["services"]
    roles = Counter(role_of(s) for s in services.values() if role_of(s))
    assert roles == {"gateway": 1, "broker": 2, "api": 2, "storage": 2, "storage-beat": 1}


def test_roles_share_one_image_and_wait_for_their_servers() -> None:
    services = load()["services"]
    assert {"redis", "mongo"} <= set(services)
    for name, service in services.items():
        if role_of(service) is None:
            continue
        assert service["build"] == ".", name
        assert set(service["depends_on"]) == {"redis", "mongo"}, name
        env = service["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:"), name
        assert env["MONGODB_URI"].startswith("mongodb://mongo:"), name
        assert env["CHATSTREAM_INSTANCE_HOST"] == name, name
    assert services["gateway"]["ports"] == ["8000:8000"]
    assert (ROOT / "Dockerfile").read_text().startswith("# One image")


def test_redis_keeps_an_append_only_file() -> None:
    command = load()["services"]["redis"]["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"


def test_every_service_is_restarted_when_it_dies() -> None:
    """Docker's counterpart of `make run`'s supervisor (docs/adr/0024): no service stays down after a crash."""
    services = load()["services"]
    assert {name: s.get("restart") for name, s in services.items()} == dict.fromkeys(services, "unless-stopped")
