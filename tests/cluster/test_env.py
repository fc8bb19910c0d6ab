"""Unit tests of the typed environment readers (pure logic, no servers)."""

from __future__ import annotations

import pytest

from chatstream_site.env import ConfigError, env_bool, env_int, env_list, env_str, env_url


def test_env_str_required_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CS_T_STR", raising=False)
    with pytest.raises(ConfigError, match="CS_T_STR is required"):
        env_str("CS_T_STR", required=True)
    monkeypatch.setenv("CS_T_STR", "  value ")
    assert env_str("CS_T_STR", required=True) == "value"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("yes", True), ("off", False), ("FALSE", False)])
def test_env_bool_accepts_usual_spellings(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("CS_T_BOOL", raw)
    assert env_bool("CS_T_BOOL", not expected) is expected


def test_env_bool_rejects_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_T_BOOL", "maybe")
    with pytest.raises(ConfigError, match="CS_T_BOOL='maybe' is not a boolean"):
        env_bool("CS_T_BOOL", False)


def test_env_int_bounds_and_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_T_INT", "12x")
    with pytest.raises(ConfigError, match="CS_T_INT='12x' is not an integer"):
        env_int("CS_T_INT", 1)
    monkeypatch.setenv("CS_T_INT", "0")
    with pytest.raises(ConfigError, match="below the minimum 1"):
        env_int("CS_T_INT", 5, minimum=1)
    monkeypatch.delenv("CS_T_INT")
    assert env_int("CS_T_INT", 5) == 5


def test_env_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_T_LIST", "a, b,,c ")
    assert env_list("CS_T_LIST", []) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("localhost:6379", "scheme must be one of redis"),
        ("redis://", "has no host"),
        ("redis://host:notaport/0", "malformed port"),
    ],
)
def test_env_url_rejects_malformed(monkeypatch: pytest.MonkeyPatch, raw: str, message: str) -> None:
    monkeypatch.setenv("CS_T_URL", raw)
    with pytest.raises(ConfigError, match=message):
        env_url("CS_T_URL", None, schemes=("redis",))


def test_env_url_accepts_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_T_URL", "redis://127.0.0.1:6380/2")
    assert env_url("CS_T_URL", None, schemes=("redis",)) == "redis://127.0.0.1:6380/2"


def test_every_setting_read_from_the_environment_is_in_env_example() -> None:
    """`.env.example` is where users find every variable (README, Configuration): a setting added without
    its line there fails here."""
    import re

    from chatstream_site.localservers import ROOT

    settings_source = (ROOT / "chatstream_site" / "settings" / "__init__.py").read_text()
    read = set(re.findall(r'env_[a-z]+\("([A-Z][A-Z0-9_]+)"', settings_source))
    example = (ROOT / ".env.example").read_text()
    assert read, "no env_* call found: the pattern no longer matches settings"
    assert sorted(v for v in read if v not in example) == []
