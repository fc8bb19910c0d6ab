"""The read of ``GET /mentions`` (no side effects): the caller's mentions, newest first, from their list in
Redis (messaging/mentions.py), each message in its current state (docs/api.md, docs/adr/0038, 0046).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from api.selectors import conversation_members_cached
from core.bus import bus_sync
from core.documents import Message
from core.errors import ValidationFailed
from core.keys import mention_list_key, partition_of, recent_docs_key, recent_edits_key
from core.values import as_str, iso_ms

MENTIONS_PAGE_MAX = 100


@dataclass(frozen=True, slots=True)
class MentionView:
    conversation_id: str
    message_id: str
    seq: int
    sender_id: str
    content: str
    timestamp: str | None
    deleted: bool
    cursor: str  # pass as ``before`` to get the mentions older than this one


def _message_current(*, conversation_id: str, message_id: str) -> dict[str, Any] | None:
    """A message's current state: from its conversation's recent window (Redis) if it is there, else from
    ``messages`` by ``_id``, with an edit the drain has not applied yet taken from the window's edits hash."""
    p = partition_of(conversation_id)
    bus = bus_sync()
    raw, edit = bus.hget(recent_docs_key(p, conversation_id), message_id), \
        bus.hget(recent_edits_key(p, conversation_id), message_id)
    if raw is not None:
        return dict(json.loads(raw))
    row = Message.objects(id=message_id).as_pymongo().first()
    if row is None:
        return None
    doc = {"id": row["_id"], "sender_id": str(row["sender_id"]), "content": row.get("content") or "",
           "timestamp": iso_ms(row.get("timestamp")), "deleted": bool(row.get("deleted")), "seq": row["seq"],
           "edit_seq": row.get("edit_seq"), "mentions": [str(u) for u in row.get("mentions") or ()]}
    if edit is not None:
        change = json.loads(edit)
        if int(change.get("edit_seq") or 0) > int(doc["edit_seq"] or 0):
            doc["deleted"] = doc["deleted"] or bool(change.get("deleted"))
            doc["content"] = "" if doc["deleted"] else change.get("content") or ""
            if isinstance(change.get("mentions"), list):
                doc["mentions"] = change["mentions"]
    return doc


def mentions_list(*, user_id: str, before: str | None, limit: int) -> tuple[list[MentionView], bool]:
    """The caller's mentions, newest first, older than ``before`` (a previous item's ``cursor``), at most
    ``limit``; and whether there are more. From the caller's own list in Redis (messaging/mentions.py, the
    newest 1,000); a conversation the caller has left since is skipped. Raises ValidationFailed (bad cursor)."""
    limit = max(1, min(limit, MENTIONS_PAGE_MAX))
    top: str = "+inf"
    if before is not None:
        if not re.fullmatch(r"[0-9]{1,17}", before):
            raise ValidationFailed("before must be a cursor from an earlier page", details={"field": "before"})
        top = f"({before}"
    bus = bus_sync()
    out: list[MentionView] = []
    offset = 0
    member_of: dict[str, bool] = {}
    while len(out) <= limit:
        rows: list[tuple[Any, float]] = list(bus.zrevrangebyscore(  # type: ignore[arg-type]
            mention_list_key(user_id), top, "-inf", start=offset, num=limit + 1, withscores=True))
        if not rows:
            break
        offset += len(rows)
        for member, score in rows:
            parts = as_str(member).split(":")
            cid, mid, seq = parts[0], parts[1], parts[2]
            if cid not in member_of:
                members = conversation_members_cached(conversation_id=cid)
                member_of[cid] = members is not None and user_id in members
            if not member_of[cid]:
                continue
            doc = _message_current(conversation_id=cid, message_id=mid)
            if doc is None:
                continue
            deleted = bool(doc.get("deleted"))
            if not deleted and user_id not in [str(u) for u in doc.get("mentions") or ()]:
                continue  # an edit stopped naming the caller (its index entry is removed too; this covers a lost
                # removal, docs/adr/0046)
            out.append(MentionView(conversation_id=cid, message_id=mid, seq=int(seq),
                                   sender_id=str(doc["sender_id"]), content="" if deleted else doc.get("content") or "",
                                   timestamp=doc.get("timestamp"), deleted=deleted, cursor=str(int(score))))
            if len(out) > limit:
                break
    return out[:limit], len(out) > limit
