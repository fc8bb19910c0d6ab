"""Small conversions every package needs, written once.

Redis replies come back as ``bytes`` (or ``str`` with ``decode_responses``), and every time the API and the
events carry is ISO-8601 UTC with milliseconds and a ``Z`` (docs/protocol.md, "Frames").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def as_str(value: Any) -> str:
    """A Redis reply (``bytes`` or ``str``, or a number) as ``str``. Pure."""
    return value.decode() if isinstance(value, bytes) else str(value)


def iso_ms(value: datetime | None) -> str | None:
    """``2026-11-28T17:40:56.373Z`` (None stays None). MongoDB returns UTC datetimes without their zone: a naive
    value is taken as UTC. Pure."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
