"""``manage.py services [--json]``: the live registry, with each instance's restarts in this run."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.registry import instances_list
from core.roles import url_redacted


class Command(BaseCommand):
    help = "Print the live service registry (a table, or JSON with --json)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", dest="as_json", action="store_true", help="print a JSON list for machines")
        parser.add_argument("--role", default=None, help="only this role")

    def handle(self, *args: Any, as_json: bool = False, role: str | None = None, **options: Any) -> None:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            found = instances_list(client, role=role)
        except redis.RedisError as exc:
            raise CommandError(f"cannot read the registry: Redis unreachable ({exc}); "
                               f"check REDIS_URL={url_redacted(settings.REDIS_URL)}") from None
        if as_json:
            self.stdout.write(json.dumps([asdict(i) for i in found], indent=2))
            return
        if not found:
            self.stdout.write("no live instances (is `make run` running? same REDIS_URL?)")
            return
        # RESTARTS: how often this slot (role and instance number) was started again in this run
        # (core/registry.py); a new column goes last, so scripts cutting the first ones keep working.
        rows = [("ROLE", "ID", "URL", "STARTED_AT", "LAST_SEEN", "RESTARTS")]
        rows += [(i.role, i.id, i.url, i.started_at, i.last_seen, str(i.restarts)) for i in found]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            self.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())

