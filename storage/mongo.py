"""The one MongoDB connection of a process (mongoengine alias ``default``)."""

from __future__ import annotations

import mongoengine
from django.conf import settings


def mongo_connect(uri: str | None = None) -> None:
    """(Re)connect mongoengine's default alias to ``uri`` (default ``settings.MONGODB_URI``).

    Side effect: replaces the process-wide connection; pymongo connects lazily, so this does no I/O.
    """
    mongoengine.disconnect(alias="default")
    mongoengine.connect(
        host=uri or settings.MONGODB_URI,
        alias="default",
        serverSelectionTimeoutMS=settings.MONGODB_TIMEOUT_MS,
        uuidRepresentation="standard",
        tz_aware=True,
    )
