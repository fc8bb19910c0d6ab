"""The gateway tests' process fleet: it lives in ``chatstream_site.localfleet`` (shared with bench/)."""

from chatstream_site.localfleet import (
    Fleet,
    Proc,
    redis_db_url,
    settle,
)

__all__ = [
    "Fleet",
    "Proc",
    "redis_db_url",
    "settle",
]
