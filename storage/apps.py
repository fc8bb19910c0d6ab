from __future__ import annotations

from django.apps import AppConfig


class StorageConfig(AppConfig):
    """Owns the MongoDB data (mongoengine documents) and the drain of the streams into it."""

    name = "storage"

    def ready(self) -> None:
        from storage.mongo import mongo_connect

        # Lazy: pymongo connects in the background on first use, so this never blocks start-up.
        mongo_connect()
