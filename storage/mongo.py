"""The one MongoDB connection of a process (mongoengine alias ``default``), and the indexes that differ between
MongoDB and FerretDB."""

from __future__ import annotations

import functools
from typing import Any

import mongoengine
import pymongo
from django.conf import settings

from storage.search_index import store_is_ferretdb

# The staff admin's messages by sender, newest first (``api.selectors.admin_messages``) on MongoDB. Not in
# ``core.documents.Message``'s meta, so that mongoengine does not create it everywhere: FerretDB v1 answers every
# query but ``_id`` equality with a scan whatever the indexes, so there it only cost each insert a write into one
# more random place of its SQLite file (docs/adr/0048).
SENDER_INDEX = [("sender_id", pymongo.ASCENDING), ("timestamp", pymongo.ASCENDING)]


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


@functools.cache
def messages_indexes_settle(db: Any) -> None:
    """Once per process: on MongoDB create ``messages``' sender index if missing (idempotent); on FerretDB drop
    it if a store made before docs/adr/0048 has it. Called by the drain before its first batch's writes. Raises
    what pymongo raises (the drain hands its batch back when MongoDB is away, and tries again next batch)."""
    if not store_is_ferretdb(db):
        db.messages.create_index(SENDER_INDEX)
        return
    for name, spec in db.messages.index_information().items():
        if [tuple(k) for k in spec["key"]] == [(k, int(d)) for k, d in SENDER_INDEX]:
            db.messages.drop_index(name)
