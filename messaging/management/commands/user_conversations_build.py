"""``manage.py user_conversations_build``: write every user's ``user_conversations`` document (their
conversation ids, docs/adr/0043) from ``users`` and ``conversations``, for data from before the documents
existed, so no user's first conversation list or connect after their cached ids expired scans
``conversations``. Idempotent and safe while the system runs (a user whose membership changes meanwhile is
rebuilt alone); one read of each collection, then ``_id``-keyed writes in batches of 500."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from tqdm import tqdm

from core.clients import sync_redis
from messaging.conversation_index import user_conversations_build


class Command(BaseCommand):
    help = "Write every user's document of conversation ids (docs/adr/0043; idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        with tqdm(desc="users written", unit="user", disable=None) as bar:
            written = user_conversations_build(sync_redis(), progress=bar.update)
        self.stdout.write(f"wrote {written} users' conversation ids")
