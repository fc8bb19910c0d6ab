"""The Redis key catalogue (core/keys.py) is the one place keys are spelled, each with its Redis (docs/adr/0022)."""

from __future__ import annotations

import inspect
import io
import tokenize
from pathlib import Path

from chatstream_site.localservers import ROOT
from core import keys

PRODUCT = ("core", "chatstream_site", "messaging", "storage", "api", "gateway")


def _call(function):
    """Call a key builder with made-up arguments: ints for partitions and buckets, strings for the rest."""
    args, kwargs = [], {}
    for parameter in inspect.signature(function).parameters.values():
        value = 3 if parameter.name in ("partition", "bucket") else "x" * 24
        if parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[parameter.name] = value
        else:
            args.append(value)
    return function(*args, **kwargs)


def _key_names() -> set[str]:
    """Every constant of core.keys spelling a ``cs:`` key, and every function that builds one."""
    def spells_a_key(name: str, value: object) -> bool:
        if isinstance(value, str):
            return value.startswith("cs:")
        builder = inspect.isfunction(value) and value.__module__ == keys.__name__ and name != "partition_of"
        return builder and str(_call(value)).startswith("cs:")

    return {name for name, value in vars(keys).items() if spells_a_key(name, value)}


def test_every_key_states_its_redis() -> None:
    assert _key_names() == set(keys.REDIS_OF)
    assert set(keys.REDIS_OF.values()) <= {keys.BUS, keys.COORD}


def test_partition_keys_are_on_the_bus_and_share_the_partition_slot() -> None:
    for name, redis_of in keys.REDIS_OF.items():
        value = getattr(keys, name)
        if not callable(value) or "partition" not in inspect.signature(value).parameters:
            continue
        assert redis_of == keys.BUS, name
        assert _call(value).startswith("cs:{p03}:"), name


def test_no_module_spells_a_key_outside_the_catalogue() -> None:
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == Path(keys.__file__) or "migrations" in path.parts:
                continue
            for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
                if token.type == tokenize.STRING:
                    body = token.string.lstrip("rbfRBF")
                    docstring = body.startswith(('"""', "'''"))
                    if not docstring and body.strip("\"'").startswith("cs:"):
                        found.append(f"{path.relative_to(ROOT)}:{token.start[0]}")
    assert found == []
