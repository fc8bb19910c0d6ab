"""``manage.py buckets_build``: build ``message_buckets`` (docs/adr/0028) from the ``messages`` already stored,
the one-command move of existing local data to the bucketed reads. Idempotent and safe beside running storage
workers (every write is an ``_id``-keyed ``$set`` of a message's final state); one scan of ``messages``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from storage.buckets import buckets_build


class Command(BaseCommand):
    help = "Build message_buckets from the stored messages (existing data; idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"wrote {buckets_build()} messages into message_buckets")
