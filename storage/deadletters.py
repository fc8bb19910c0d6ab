"""Dead letters: entries the drain could not apply, kept (bounded) for staff to retry or discard.

The drain writes them with :func:`deadletter_add` in the same pipeline that acknowledges the batch; staff act
on them through the admin's storage page or ``manage.py deadletters``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings

from core.bus import BusSync, bus_sync
from core.errors import NotFound
from core.keys import DEADLETTERS, stream_key
from core.values import as_str
from storage.selectors import deadletter_get

logger = logging.getLogger("chatstream.storage")


def storable(text: str) -> str:
    """``text`` with anything that is not valid UTF-8 (a lone surrogate quoted from a bad entry) escaped, so
    Redis can take it: a reason that cannot be written must not fail the batch it explains."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def deadletter_add(pipe: Any, *, partition: int, entry_id: str, fields: dict[Any, Any], reason: str,
                    now_ms: int) -> None:
    original = {as_str(k): (v.decode(errors="replace") if isinstance(v, bytes) else str(v)) for k, v in fields.items()}
    pipe.xadd(DEADLETTERS, {"partition": partition, "entry_id": entry_id, "reason": storable(reason[:1000]),
                            "failed_at_ms": now_ms, "fields": json.dumps(original)},
              maxlen=settings.DEADLETTER_MAXLEN, approximate=True)


def deadletter_retry(*, id: str, client: BusSync | None = None) -> str:
    """Put a dead letter back at the end of its partition stream (fields unchanged, seq kept) and remove it
    from the dead letters; return the new entry id. The drain's writes are keyed and guarded, so the late
    copy cannot undo newer events. Raises NotFound."""
    r = client or bus_sync()
    letter = deadletter_get(id=id, client=r)
    if letter is None or letter.partition < 0:
        raise NotFound("no such dead letter", details={"id": id})
    fields: dict[Any, Any] = letter.fields or {"v": "?"}
    new_id = as_str(r.xadd(stream_key(letter.partition), fields))
    r.xdel(DEADLETTERS, id)
    logger.info("storage.deadletter retried id=%s partition=%d as %s", id, letter.partition, new_id)
    return new_id


def deadletter_discard(*, id: str, client: BusSync | None = None) -> bool:
    """Forget a dead letter for good; return whether it existed."""
    return bool((client or bus_sync()).xdel(DEADLETTERS, id))
