"""Small typed readers for settings from the environment (the Saleor way).

Every reader names the variable in its error, so a bad deployment stops at start-up with a message that
says which variable to fix, never later with a traceback from deep inside a library.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ImproperlyConfigured):
    """A setting is missing or malformed; the message names the variable and what it should look like."""


def load_dotenv(path: Path) -> None:
    """Read ``KEY=value`` lines of ``path`` into ``os.environ`` without overriding what is already set."""
    if not path.exists():
        return
    from dotenv import dotenv_values

    for key, value in dotenv_values(path).items():
        if value is not None:
            os.environ.setdefault(key, value)


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def env_str(name: str, default: str | None = None, *, required: bool = False) -> str:
    value = _raw(name)
    if value:
        return value
    if required or default is None:
        raise ConfigError(f"{name} is required but not set (see .env.example)")
    return default


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name}={number} is above the maximum {maximum}")
    return number


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    value = _raw(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} is below the minimum {minimum}")
    return number


def env_choice(name: str, default: str, *, choices: tuple[str, ...]) -> str:
    value = env_str(name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_url(name: str, default: str | None, *, schemes: tuple[str, ...]) -> str:
    """A URL whose scheme is one of ``schemes`` and that has a host (or a path, for sqlite)."""
    value = env_str(name, default)
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme not in schemes:
        raise ConfigError(
            f"{name}={value!r} is not a valid URL: the scheme must be one of {', '.join(schemes)}"
        )
    if parsed.scheme != "sqlite" and not parsed.hostname:
        raise ConfigError(f"{name}={value!r} is not a valid URL: it has no host")
    try:
        parsed.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a valid URL: malformed port") from None
    return value
