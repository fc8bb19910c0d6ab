"""scripts/bootstrap.py's secrets on disk (issue 14): `.env` is its owner's only, and the Redis `make run` starts
gets a generated password in it. Pure unit tests on a temporary project root."""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path
from types import ModuleType

import pytest

from chatstream_site.localservers import ROOT
from core.roles import url_redacted


@pytest.fixture
def bootstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bootstrap_under_test", ROOT / "scripts" / "bootstrap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bootstrap_under_test", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "VAR", tmp_path / "var")
    monkeypatch.delenv("REDIS_URL", raising=False)
    return module


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dotenv_is_written_0600_and_an_existing_readable_one_is_tightened(bootstrap: ModuleType,
                                                                          tmp_path: Path) -> None:
    bootstrap.ensure_dotenv()
    assert mode(tmp_path / ".env") == 0o600
    assert "SECRET_KEY=" in (tmp_path / ".env").read_text()
    (tmp_path / ".env").chmod(0o644)
    bootstrap.ensure_dotenv()
    assert mode(tmp_path / ".env") == 0o600


def test_the_local_redis_gets_a_generated_password_kept_in_dotenv(bootstrap: ModuleType, tmp_path: Path) -> None:
    bootstrap.ensure_dotenv()
    (tmp_path / ".env").write_text((tmp_path / ".env").read_text() + "REDIS_URL=redis://127.0.0.1:6390/2\n")
    password = bootstrap.redis_password_ensure(bootstrap.read_dotenv())
    assert password and len(password) >= 32
    text = (tmp_path / ".env").read_text()
    assert f"REDIS_URL=redis://:{password}@127.0.0.1:6390/2\n" in text and text.count("REDIS_URL=") == 1
    assert "SECRET_KEY=" in text and mode(tmp_path / ".env") == 0o600
    # The next run reuses it.
    assert bootstrap.redis_password_ensure(bootstrap.read_dotenv()) == password


def test_a_redis_url_from_the_environment_is_left_as_it_is(bootstrap: ModuleType, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap.ensure_dotenv()
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    before = (tmp_path / ".env").read_text()
    assert bootstrap.redis_password_ensure(bootstrap.read_dotenv()) is None
    assert (tmp_path / ".env").read_text() == before


def test_messages_never_show_the_redis_password() -> None:
    assert url_redacted("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert url_redacted("redis://user:s3cret@127.0.0.1:6379/0") == "redis://user:***@127.0.0.1:6379/0"
    assert url_redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_ferretdb_patch_applies_to_the_release_source_and_refuses_a_source_without_its_line(
        bootstrap: ModuleType, tmp_path: Path) -> None:
    """docs/adr/0035: the one-line patch of FerretDB's _id filter; another source fails loudly, not silently."""
    rel, text, replacement = bootstrap.FERRETDB_PATCHES[0]
    target = tmp_path / "src" / rel
    target.parent.mkdir(parents=True)
    target.write_text(f"const (\n\t{text}\n)\n")
    bootstrap.ferretdb_patch(tmp_path / "src")
    assert target.read_text() == f"const (\n\t{replacement}\n)\n"
    with pytest.raises(SystemExit, match="cannot apply the patch"):
        bootstrap.ferretdb_patch(tmp_path / "src")  # the line is gone now: another release
    assert "patches" in bootstrap.ferretdb_build_stamp()


def test_make_run_refuses_a_gateway_port_that_something_listens_on(bootstrap: ModuleType) -> None:
    """The gateways share their port through SO_REUSEPORT (docs/adr/0056), which any process of the same user may
    join: supervisor-conf must refuse a taken port, even one held with that option (a second `make run`)."""
    from chatstream_site.uvicorn_main import listen_socket_shared

    held = listen_socket_shared(host="127.0.0.1", port=0)
    held.listen()
    port = held.getsockname()[1]
    try:
        with pytest.raises(SystemExit) as refused:
            bootstrap.gateway_port_check({"CHATSTREAM_GATEWAY_PORT": str(port)})
        message = str(refused.value.code)
        assert f"127.0.0.1:{port} is taken" in message and "CHATSTREAM_GATEWAY_PORT" in message, message
        # A second gateway of the same cluster still joins it (the point of the option).
        twin = listen_socket_shared(host="127.0.0.1", port=port)
        twin.listen()
        twin.close()
    finally:
        held.close()
    bootstrap.gateway_port_check({"CHATSTREAM_GATEWAY_PORT": str(port)})  # free again: no error
    with pytest.raises(SystemExit, match="not a port number"):
        bootstrap.gateway_port_check({"CHATSTREAM_GATEWAY_PORT": "80x"})
