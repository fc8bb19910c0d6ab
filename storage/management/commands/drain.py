"""``manage.py drain [--partition N ...] [--batch-size N]``: drain partitions now, in this process, until
they are empty. For operators (beat is down, or a backlog should go before a maintenance) and scripts; the
drain is the same as the workers' and safe beside them (one drain per partition at a time, idempotent)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.errors import Retryable
from core.keys import consumer_name
from storage.services import drain_all


class Command(BaseCommand):
    help = "Drain partition streams into MongoDB now, until empty (all partitions by default)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--partition", type=int, nargs="+", default=None)
        parser.add_argument("--batch-size", type=int, default=None)

    def handle(self, *args: Any, partition: list[int] | None, batch_size: int | None, **options: Any) -> None:
        partitions = partition if partition is not None else list(range(int(settings.PARTITIONS)))
        if any(not 0 <= p < int(settings.PARTITIONS) for p in partitions):
            raise CommandError(f"partitions are 0..{int(settings.PARTITIONS) - 1}")
        try:
            total = drain_all(batch_size=batch_size or int(settings.BATCH_SIZE), consumer=consumer_name(),
                              partitions=partitions)
        except Retryable as exc:
            raise CommandError(f"cannot drain now: {exc.message}") from None
        self.stdout.write(f"persisted {total} events from {len(partitions)} partition(s)")
