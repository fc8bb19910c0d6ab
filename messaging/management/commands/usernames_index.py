"""``manage.py usernames_index``: write every account's lower-cased username -> id into the Redis index the
write path resolves ``@username`` from (``messaging/mentions.py``, docs/adr/0038), for accounts made before
the index existed (registration and the chat services write it since). Idempotent; one scan of ``users``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from messaging.mentions import usernames_index_build


class Command(BaseCommand):
    help = "Write every username into the Redis index @mentions are resolved from (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"indexed {usernames_index_build()} usernames")
