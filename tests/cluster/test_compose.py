"""docker-compose.yml cannot run here (no Docker engine); check it declares every role and dependency."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import yaml

from chatstream_site.localservers import ROOT


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


def test_the_image_takes_the_runtime_requirements_and_no_local_secrets() -> None:
    """The Dockerfile installs requirements.txt only (no test or lint tools in production images), and the
    build context leaves out a local .env (it holds SECRET_KEY), the venv and runtime data."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-r requirements.txt" in dockerfile and "requirements-dev" not in dockerfile
    runtime = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line and not line.startswith("#")}
    assert runtime.isdisjoint({"pytest", "pytest-django", "ruff", "mypy", "playwright", "schemathesis",
                               "hypothesis", "matplotlib"}), runtime
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev
    ignored = set((ROOT / ".dockerignore").read_text().splitlines())
    assert {".env", ".venv", "var", ".git"} <= ignored


def test_compose_refuses_to_start_without_a_user_set_secret_key() -> None:
    # Compose's ${VAR:?message} stops `docker compose up` with the message when VAR is unset or empty; a
    # ${VAR:-default} would start with a key that anyone who read the repo could sign tokens with.
    env = load()["x-role"]["environment"]
    assert re.fullmatch(r"\$\{SECRET_KEY:\?[^}]+\}", env["SECRET_KEY"]), env["SECRET_KEY"]
    text = (ROOT / "docker-compose.yml").read_text()
    assert "SECRET_KEY:-" not in text


def test_compose_never_sets_a_wildcard_host_list() -> None:
    for name, service in load()["services"].items():
        hosts = str(service.get("environment", {}).get("ALLOWED_HOSTS", ""))
        assert "*" not in hosts.split(","), (name, hosts)


def test_every_service_is_restarted_when_it_dies() -> None:
    """Docker's counterpart of `make run`'s supervisor (docs/adr/0024): no service stays down after a crash."""
    services = load()["services"]
    assert {name: s.get("restart") for name, s in services.items()} == dict.fromkeys(services, "unless-stopped")
