"""The stream entry format: what one event on a partition stream looks like, and its decoder.

Shared by the writer (``messaging.streams``, ``messaging.events``), the readers (the brokers' hub) and the
drain (``storage.drain``), which is why it sits in the bottom package; the keys the entries live under are
in ``core.keys`` (on the message bus Redis).

An entry is one durable conversation event with the fields

``t``  event type: ``message.new``, ``message.edited``, ``message.deleted``, ``reaction.added``,
       ``reaction.removed`` (these take a seq) or
       ``read.updated`` (seq ``0``: it moves a cursor, it is not a conversation event),
``c``  conversation id, ``s`` its per-conversation seq (decimal), ``d`` the event's JSON payload,
``v``  format version (``1``).

Payloads: see ``messaging/streams.py`` (and ``messaging.events.PAYLOAD_FIELDS``, the one builder's list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from core.values import as_str

EventType = Literal["message.new", "message.edited", "message.deleted", "read.updated", "reaction.added",
                    "reaction.removed"]
SEQUENCED: frozenset[str] = frozenset({"message.new", "message.edited", "message.deleted", "reaction.added",
                                       "reaction.removed"})
FORMAT_VERSION = "1"


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded stream entry."""

    entry_id: str
    type: str
    conversation_id: str
    seq: int
    data: dict[str, Any]


class MalformedEntry(ValueError):
    """An entry that cannot be decoded (a poison entry for the drain)."""


def event_decode(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    """Decode one XREAD/XREADGROUP entry; raise :class:`MalformedEntry` if it is not a v1 event."""
    try:
        f = {as_str(k): as_str(v) for k, v in fields.items()}
        if f.get("v") != FORMAT_VERSION:
            raise MalformedEntry(f"unknown entry format version {f.get('v')!r}")
        data = json.loads(f["d"])
        if not isinstance(data, dict):
            raise MalformedEntry("payload is not a JSON object")
        return Event(entry_id=as_str(entry_id), type=f["t"], conversation_id=f["c"], seq=int(f["s"]), data=data)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, MalformedEntry):
            raise
        raise MalformedEntry(f"undecodable entry {as_str(entry_id)}: {exc}") from None
