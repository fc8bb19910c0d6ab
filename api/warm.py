"""An api instance's first-request costs, paid at its start instead of by the first users it serves (issue 13).

Measured on the 1M store of bench/data_tier.py (docs/benchmarks.md, issue 13 session 10), one request at a time
straight to each api instance of a freshly started cluster: the first conversation list cost 15.6-18.0 ms, the
next ones 3.9-9.1. In process (cProfile of the first requests after the URLconf's import), that extra is this
process's first connections (each new Redis connection resolves redis-py's version through importlib.metadata,
~1.3 ms; the store's first connection), mongoengine's index check on each document class's first use (a
``createIndexes`` per class, 1-2 ms each on FerretDB), and DRF's classes imported on its first request. Behind
the gateway with two instances, their two first requests were two of the benchmark's 100 samples, so the list's
p99 (the 99th) was one of them; a user who comes first after a restart or a deploy paid the same.
"""

from __future__ import annotations

import logging

from mongoengine.connection import get_db
from rest_framework.settings import api_settings

from core.bus import bus_sync
from core.clients import sync_redis
from core.documents import Conversation, GroupChat, Message, MessageBucket, User

# The DRF settings whose classes DRF imports on first use (rest_framework.settings.APISettings is lazy).
log = logging.getLogger(__name__)

_DRF_CLASSES = ("DEFAULT_AUTHENTICATION_CLASSES", "DEFAULT_PERMISSION_CLASSES", "DEFAULT_RENDERER_CLASSES",
                "DEFAULT_PARSER_CLASSES", "DEFAULT_CONTENT_NEGOTIATION_CLASS", "DEFAULT_THROTTLE_CLASSES",
                "DEFAULT_VERSIONING_CLASS", "DEFAULT_PAGINATION_CLASS", "EXCEPTION_HANDLER")


def api_warm() -> None:
    """Open this process's Redis (REDIS_URL and the bus) and store connections, run mongoengine's index check
    for the document classes the hot reads use, and import DRF's configured classes. Blocking (Redis, MongoDB):
    called off the event loop before the instance serves (chatstream_site/asgi.py, the api's lifespan
    startup). Side effects: one pooled connection to each server; ``createIndexes`` per class (idempotent: the
    indexes exist); nothing written. A server that does not answer is logged, not raised: the warm-up only
    moves costs, and the instance serves (and reports its readiness) as it would have without it."""
    for name in _DRF_CLASSES:
        getattr(api_settings, name)
    try:
        sync_redis().ping()
        bus_sync().ping()
        get_db().command("ping")
        for document in (User, Conversation, GroupChat, Message, MessageBucket):
            document._get_collection()  # the first use runs the class's index check
    except Exception:  # any server error: the first requests pay as before
        log.warning("api warm-up incomplete: the first requests open the connections", exc_info=True)
