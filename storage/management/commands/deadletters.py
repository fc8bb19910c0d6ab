"""``manage.py deadletters [--json] [--limit N] [--retry ID ...] [--discard ID ...]``: staff's view of the
entries the drain could not persist, and the way to send them through again."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.errors import NotFound
from storage.deadletters import deadletter_discard, deadletter_retry
from storage.selectors import deadletters_count, deadletters_list


class Command(BaseCommand):
    help = "List dead letters of the storage drain (newest first), or retry or discard some by id."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", dest="as_json", help="print a JSON list")
        parser.add_argument("--limit", type=int, default=50)
        parser.add_argument("--retry", nargs="+", metavar="ID", default=[],
                            help="put these back at the end of their partition stream")
        parser.add_argument("--discard", nargs="+", metavar="ID", default=[], help="forget these for good")

    def handle(self, *args: Any, as_json: bool, limit: int, retry: list[str], discard: list[str],
               **options: Any) -> None:
        for letter_id in retry:
            try:
                new_id = deadletter_retry(id=letter_id)
            except NotFound as exc:
                raise CommandError(f"{exc.message}: {letter_id}") from None
            self.stdout.write(f"retried {letter_id} as stream entry {new_id}")
        for letter_id in discard:
            if not deadletter_discard(id=letter_id):
                raise CommandError(f"no such dead letter: {letter_id}")
            self.stdout.write(f"discarded {letter_id}")
        if retry or discard:
            return
        letters = deadletters_list(limit=limit)
        if as_json:
            self.stdout.write(json.dumps([asdict(d) for d in letters], indent=2))
            return
        self.stdout.write(f"{deadletters_count()} dead letters; newest {len(letters)}:")
        for d in letters:
            at = datetime.fromtimestamp(d.failed_at_ms / 1000, UTC).isoformat(timespec="seconds")
            self.stdout.write(f"{d.id}  {at}  p{d.partition:02d} entry {d.entry_id}  "
                              f"type={d.fields.get('t', '?')}  {d.reason}")
