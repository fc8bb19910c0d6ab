"""The Redis commands of the mention indexes (docs/adr/0038, 0046): each mentioned user's per-conversation
mention seqs (the count beside unread) and own newest-first list (``GET /mentions``). Pure: the write path
(``messaging.mentions``) and the drain (``storage.services``, which replays them so a process that died between
an append and these writes loses nothing) both send what this module builds.
"""

from __future__ import annotations

import zlib
from datetime import datetime

from core.keys import mention_list_key, mention_seqs_key

# Unread-mention seqs kept per (conversation, user): the count shown caps here ("99+" in clients), so one
# noisy group cannot grow the key without bound.
MENTION_SEQS_KEEP = 100
# Entries of a user's mention list (GET /mentions) kept, newest first: older ones are dropped on the next
# mention. 1,000 x ~90 bytes per entry ≈ 100 KB per user at most.
MENTION_LIST_KEEP = 1000
# Both indexes live as long as the membership cache does (30 days without a new mention).
MENTION_TTL_S = 30 * 24 * 3600

Command = tuple[str | int, ...]


def mention_score(*, timestamp: str, message_id: str) -> int:
    """Newest-first order of a user's mention list: the message's time in ms times 1000, plus 0-999 from its
    id so that two mentions in one millisecond differ (below 2^53: exact as a Redis score). Pure."""
    ms = int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)
    return ms * 1000 + zlib.crc32(message_id.encode()) % 1000


def mention_record_commands(*, conversation_id: str, message_id: str, seq: int, timestamp: str,
                            user_ids: list[str]) -> list[Command]:
    """ZADD (idempotent: same member, same score), trim and EXPIRE of both indexes of each named user."""
    score = mention_score(timestamp=timestamp, message_id=message_id)
    commands: list[Command] = []
    for uid in user_ids:
        seqs, listed = mention_seqs_key(conversation_id, uid), mention_list_key(uid)
        commands += [("ZADD", seqs, seq, message_id), ("ZREMRANGEBYRANK", seqs, 0, -MENTION_SEQS_KEEP - 1),
                     ("EXPIRE", seqs, MENTION_TTL_S),
                     ("ZADD", listed, score, f"{conversation_id}:{message_id}:{seq}"),
                     ("ZREMRANGEBYRANK", listed, 0, -MENTION_LIST_KEEP - 1), ("EXPIRE", listed, MENTION_TTL_S)]
    return commands


def mention_remove_commands(*, conversation_id: str, message_id: str, seq: int, user_ids: list[str]) -> list[Command]:
    """ZREM of the message from both indexes of each user an edit stopped naming (idempotent)."""
    commands: list[Command] = []
    for uid in user_ids:
        commands += [("ZREM", mention_seqs_key(conversation_id, uid), message_id),
                     ("ZREM", mention_list_key(uid), f"{conversation_id}:{message_id}:{seq}")]
    return commands
