"""Mentions: ``@username`` of a member, resolved when a message is sent (docs/protocol.md, "Mentions";
docs/adr/0038).

The write path (``messaging.services.message_send``) calls :func:`mentions_resolve` before building the
``message.new`` event, which then carries ``mentions``: the ids of the members named, so every reader of the
event (live frames, ``resume``, the recent window, the drain into ``messages`` and ``message_buckets``) has them
without resolving again. After the append, :func:`mentions_record` writes the two Redis indexes a mentioned
user reads: the per-conversation mention seqs (their unread-mention count beside ``unread``) and their own
newest-first list (``GET /mentions``).

Cheap on the hot path: a message without ``@`` costs one substring test; one with ``@`` costs one HMGET of
the username index (REDIS_URL) and, when someone was named, one pipelined write after the append. No
document-store read: the username index ``cs:usernames`` (lower-cased username -> user id) is written at
registration (``api.services.user_create``) and by ``manage.py usernames_index`` for accounts made before it;
a name it does not hold is not a mention (it stays plain text).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import weakref
from typing import Any

import redis.asyncio
import redis.exceptions
from asgiref.sync import sync_to_async

from core.bus import BusAsync
from core.keys import USERNAMES_KEY, mention_seqs_key, partition_of, recent_docs_key, recent_edits_key
from core.mention_index import Command, mention_record_commands, mention_remove_commands
from messaging.membership import conversation_members

# Distinct @names resolved per message: bounds the HMGET and the writes one message may cause (a message
# naming 200 people is an announcement, not a mention; 20 covers every real message we have seen in group
# chats of other products, whose own limits are 10-50). Names past it stay plain text; nothing is refused.
MENTIONS_MAX = 20
logger = logging.getLogger(__name__)
# Names kept in-process (mentions_resolve): ~150 bytes each, so at most ~15 MB per process; cleared when full.
KNOWN_IDS_MAX = 100_000
_known_ids: dict[str, str] = {}
# A username (api.services.USERNAME_RE: 3-32 of A-Z a-z 0-9 _ . -) after an @ that does not follow a word
# character (so e-mail addresses are not mentions).
_MENTION_RE = re.compile(r"(?<![\w@])@([A-Za-z0-9_.\-]{3,32})")


def mention_names(content: str) -> list[str]:
    """The distinct lower-cased names after an ``@`` in ``content``, in order, at most MENTIONS_MAX; a name
    ending in ``.`` or ``-`` (end of a sentence) is also tried without them. Pure."""
    if "@" not in content:
        return []
    out: list[str] = []
    for match in _MENTION_RE.finditer(content):
        name = match.group(1).lower()
        for candidate in (name, name.rstrip(".-")):
            if len(candidate) >= 3 and candidate not in out:
                out.append(candidate)
        if len(out) >= MENTIONS_MAX:
            break
    return out[:MENTIONS_MAX]


async def mentions_resolve(client: redis.asyncio.Redis, *, conversation_id: str, sender_id: str,
                           content: str) -> list[str]:
    """Ids of the conversation's members named ``@username`` in ``content`` (not the sender), in the order
    named. Precondition: the sender is a member (checked by the caller). Read-only: at most one HMGET of
    ``cs:usernames`` and the members from the membership cache (in-process on brokers)."""
    names = mention_names(content)
    if not names:
        return []
    # Usernames never change and are never reused, so a name found once is kept in-process: a conversation's
    # usual names cost no round trip after their first mention. Names not found are asked again each time
    # (the account may be registered since).
    unknown = [n for n in names if n not in _known_ids]
    if unknown:
        for name, uid in zip(unknown, await client.hmget(USERNAMES_KEY, unknown), strict=True):
            if uid is not None:
                if len(_known_ids) >= KNOWN_IDS_MAX:
                    _known_ids.clear()
                _known_ids[name] = uid.decode() if isinstance(uid, bytes) else str(uid)
    found = [_known_ids[n] for n in names if n in _known_ids]
    if not found:
        return []
    members = await conversation_members(client, conversation_id=conversation_id) or set()
    out: list[str] = []
    for uid in found:
        if uid in members and uid != sender_id and uid not in out:
            out.append(uid)
    return out


async def mentions_record(bus: BusAsync, *, conversation_id: str, message_id: str, seq: int, timestamp: str,
                          user_ids: list[str]) -> None:
    """Write an accepted message's mentions into each named user's per-conversation seqs and own list, trimmed
    to their bounds: in one pipeline on the bus shared with the other mentions recorded in the same event-loop
    turn (on a broker many senders mention at once; one round trip for all of them). Idempotent (ZADD of the
    same member and score). Never raises: the message is accepted already, and these are derived indexes, so a
    Redis failure here is logged and costs only this mention's count and list entry (docs/storage.md)."""
    commands = mention_record_commands(conversation_id=conversation_id, message_id=message_id, seq=seq,
                                       timestamp=timestamp, user_ids=user_ids)
    try:
        await _submit(bus, commands)
    except redis.exceptions.RedisError:
        logger.exception("mentions of message %s (seq %s of %s) not recorded", message_id, seq, conversation_id)


async def _submit(bus: BusAsync, commands: list[Command]) -> None:
    if isinstance(bus, redis.asyncio.Redis):
        batcher = _batchers.get(bus)
        if batcher is None:
            batcher = _batchers[bus] = _RecordBatcher(bus)
        await batcher.submit(commands)
    else:  # a cluster client: its pipeline spreads the commands over the slots' nodes
        async with bus.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()


async def mentions_edited(bus: BusAsync, *, conversation_id: str, message_id: str, seq: int, timestamp: str,
                          before: list[str], after: list[str]) -> None:
    """An edit's change of a message's mentions (``before`` -> ``after``, member ids) applied to the indexes:
    the users it names are recorded (idempotent for those named before), those it stopped naming removed.
    Never raises (as :func:`mentions_record`): the edit is accepted already; a lost write is repaired by the
    drain's replay for the users named, and hidden from ``GET /mentions`` for those removed (docs/adr/0046)."""
    removed = [u for u in before if u not in after]
    commands = mention_record_commands(conversation_id=conversation_id, message_id=message_id, seq=seq,
                                       timestamp=timestamp, user_ids=after) \
        + mention_remove_commands(conversation_id=conversation_id, message_id=message_id, seq=seq, user_ids=removed)
    if not commands:
        return
    try:
        await _submit(bus, commands)
    except redis.exceptions.RedisError:
        logger.exception("mentions of edited message %s (of %s) not updated", message_id, conversation_id)


def _stored_mention_state(message_id: str) -> tuple[int, str, list[str]] | None:
    from core.documents import Message
    from core.values import iso_ms

    row = Message._get_collection().find_one({"_id": message_id}, {"seq": 1, "timestamp": 1, "mentions": 1})
    if row is None:
        return None
    return int(row["seq"]), str(iso_ms(row["timestamp"])), [str(u) for u in row.get("mentions") or ()]


async def message_mention_state(bus: BusAsync, *, conversation_id: str,
                                message_id: str) -> tuple[int, str, list[str]] | None:
    """``(seq, timestamp, mentions)`` of a message as it stands (edits applied): from its conversation's recent
    window (one HGET; the window holds every message the drain has not persisted), else ``messages`` by
    ``_id`` with the mentions of an edit the drain has not applied yet (the window's edits hash). None: not
    found. Read-only; a store read in a worker thread."""
    p = partition_of(conversation_id)
    raw, edit = await bus.hget(recent_docs_key(p, conversation_id), message_id), \
        await bus.hget(recent_edits_key(p, conversation_id), message_id)
    if raw is not None:
        doc = json.loads(raw)
        return int(doc["seq"]), str(doc["timestamp"]), [str(u) for u in doc.get("mentions") or ()]
    stored = await sync_to_async(_stored_mention_state, thread_sensitive=False)(message_id)
    if stored is None:
        return None
    pending = json.loads(edit) if edit is not None else {}
    if isinstance(pending.get("mentions"), list):
        return stored[0], stored[1], [str(u) for u in pending["mentions"]]
    return stored


class _RecordBatcher:
    """The mention writes of one event-loop turn in one non-transactional pipeline (as
    ``streams.AppendBatcher`` does for appends; each caller gets the pipeline's outcome)."""

    def __init__(self, bus: redis.asyncio.Redis) -> None:
        self.bus = bus
        self.pending: list[tuple[list[Command], asyncio.Future[None]]] = []
        self.scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, commands: list[Command]) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.pending.append((commands, future))
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self.scheduled = False
        batch, self.pending = self.pending, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[tuple[list[Command], asyncio.Future[None]]]) -> None:
        try:
            async with self.bus.pipeline(transaction=False) as pipe:
                for commands, _ in batch:
                    for command in commands:
                        pipe.execute_command(*command)
                await pipe.execute()
        except BaseException as exc:  # every waiter gets the failure, cancellation included
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, redis.exceptions.RedisError)
                                         else redis.exceptions.ConnectionError(f"mention batch failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)


_batchers: weakref.WeakKeyDictionary[redis.asyncio.Redis, _RecordBatcher] = weakref.WeakKeyDictionary()


def mention_counts_sync(bus: Any, *, user_id: str, read_seqs: dict[str, int]) -> dict[str, int]:
    """Per conversation id, the user's mentions above their read cursor (``read_seqs``: conversation id ->
    cursor): one pipelined ZCOUNT each on a sync bus client. Read-only. A conversation read past its last
    mention counts 0, which is how the count resets."""
    if not read_seqs:
        return {}
    pipe = bus.pipeline(transaction=False)
    ids = list(read_seqs)
    for cid in ids:
        pipe.zcount(mention_seqs_key(cid, user_id), f"({int(read_seqs[cid])}", "+inf")
    return {cid: int(n) for cid, n in zip(ids, pipe.execute(), strict=True)}


def usernames_remember_sync(client: Any, *, names: dict[str, str]) -> None:
    """Put ``names`` (lower-cased username -> user id) into the username index (sync REDIS_URL client).
    Usernames never change and stay reserved after an account's removal, so entries are never rewritten."""
    if names:
        client.hset(USERNAMES_KEY, mapping=names)


def usernames_index_build(*, batch: int = 1000) -> int:
    """Write every account into the username index (``manage.py usernames_index``); returns how many. Blocking:
    one scan of ``users`` and one HSET per ``batch`` accounts on REDIS_URL."""
    import redis
    from django.conf import settings

    from core.documents import User

    client = redis.Redis.from_url(settings.REDIS_URL)
    names: dict[str, str] = {}
    count = 0
    for row in User.objects.only("id", "username_key").as_pymongo():
        names[str(row["username_key"])] = str(row["_id"])
        if len(names) >= batch:
            usernames_remember_sync(client, names=names)
            count, names = count + len(names), {}
    usernames_remember_sync(client, names=names)
    return count + len(names)
