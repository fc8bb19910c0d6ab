"""``manage.py buckets_build``: build ``message_buckets`` (docs/adr/0028) and the search index (``search_blocks``
on FerretDB, the text index on MongoDB: docs/adr/0045) from the ``messages`` already stored, the one-command
move of existing local data to the bucketed reads and the indexed search. Idempotent and safe beside running
storage workers (every write is an ``_id``-keyed ``$set`` of a message's final state or a ``$bit or``); two
scans of ``messages``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from mongoengine.connection import get_db

from storage.buckets import buckets_build
from storage.search_index import search_index_build


class Command(BaseCommand):
    help = "Build message_buckets and the search index from the stored messages (existing data; idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"wrote {buckets_build()} messages into message_buckets")
        self.stdout.write(f"indexed the words of {search_index_build(get_db())} messages for search")
