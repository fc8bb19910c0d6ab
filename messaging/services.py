"""The one write path of conversation events (Zulip style): WebSocket consumers and DRF views both call it.

Each function validates, authorizes (membership from a Redis cache filled from MongoDB on a miss, never a
blocking MongoDB call on the event loop), then appends one durable event to the conversation's partition
stream (``messaging/streams.py``). It returns only after Redis accepted the entry: that is what "accepted"
means to clients (docs/protocol.md, Delivery promises). Fan-out to connected clients and persistence happen
downstream, from the stream; nothing here talks to a socket. Who may write is ``messaging/membership.py``;
who is online is ``messaging/presence.py``.

All functions are coroutines taking an asyncio client of REDIS_URL (membership, pub/sub); those
that touch the partition streams also take ``bus``, a client of the message bus (``core/bus.py``; by
default ``bus_resolve(client, None)``: ``client`` itself unless the bus is another Redis or a cluster). Sync
callers (DRF views) use ``asgiref.sync.async_to_sync`` and pass both clients.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings

from core import keys
from core.bus import BusAsync
from core.documents import message_id_new
from core.entries import FORMAT_VERSION
from core.errors import Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from core.keys import message_meta_key, read_cursor_key
from core.values import iso_ms
from messaging import events, frames, mentions, replies
from messaging.membership import membership_require
from messaging.resp import RespClient
from messaging.streams import append_client_lean, bus_resolve

CLIENT_MSG_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
OBJECT_ID_RE = re.compile(r"^[0-9a-f]{24}$")
MESSAGE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# ------------------------------------------------------------------ validation


def _require_object_id(value: Any, *, field: str) -> str:
    if not isinstance(value, str) or not OBJECT_ID_RE.match(value):
        raise ValidationFailed(f"{field} must be a 24-character hex id", details={"field": field})
    return value


# What no store of a message can hold: a lone surrogate (U+D800-U+DFFF) is not a Unicode scalar value, so it has
# no UTF-8 encoding (BSON, and the drain's insert, refuse it; JSON carries it as "\ud800"). U+0000: MongoDB
# holds it, but FerretDB on PostgreSQL cannot (PostgreSQL text has no NUL) and DRF refused it on REST already.
# Every other control character is a scalar value every store holds (checked against FerretDB), so it passes.
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")


def text_storable_require(value: str, *, field: str) -> str:
    """Return ``value`` if every store can hold it; else raise ValidationFailed (code ``invalid``, details
    ``{field, reason: "surrogate" | "nul", index}``). The one rule for message content on the WebSocket and
    REST alike (``api.serializers.ContentField``); docs/protocol.md and docs/api.md document it."""
    # Fast paths first (measured per 4,000-character content: the regex alone took 10 us on ASCII and 10-30 us
    # on other scripts; NUL is a memchr and isascii O(1), 0.1 us; UTF-8 encoding finds a surrogate in 4-7 us).
    if "\x00" not in value and (value.isascii() or _utf8_encodes(value)):
        return value
    bad = _UNSTORABLE_RE.search(value)
    assert bad is not None  # a NUL, or a surrogate (the only thing without UTF-8)
    char = bad.group()
    reason = "nul" if char == "\x00" else "surrogate"
    what = "U+0000 (NUL)" if reason == "nul" else f"U+{ord(char):04X}, a lone surrogate (not a Unicode scalar value)"
    raise ValidationFailed(f"{field} holds {what} at index {bad.start()}; it cannot be stored",
                           details={"field": field, "reason": reason, "index": bad.start()})


def _utf8_encodes(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _require_content(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationFailed("content must be a string", details={"field": "content"})
    text_storable_require(value, field="content")
    if not value.strip():
        raise ValidationFailed("content must not be empty", details={"field": "content"})
    if len(value) > settings.MESSAGE_MAX_CHARS:
        raise PayloadTooLarge(
            f"content is {len(value)} characters; the limit is {settings.MESSAGE_MAX_CHARS}",
            details={"field": "content", "limit": settings.MESSAGE_MAX_CHARS},
        )
    return value


def _require_client_msg_id(value: Any) -> str:
    if not isinstance(value, str) or not CLIENT_MSG_ID_RE.match(value):
        raise ValidationFailed("client_msg_id must be 1-64 characters of A-Z a-z 0-9 _ . : -",
                               details={"field": "client_msg_id"})
    return value


# ------------------------------------------------------------------ the write path


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the sender is told once Redis accepted the event (the ``ack``)."""

    message_id: str
    conversation_id: str
    seq: int
    duplicate: bool
    event: dict[str, Any]  # the payload appended (for a duplicate, the retried request's view)


async def message_send(
    client: redis.asyncio.Redis, *, user_id: str, conversation_id: Any, client_msg_id: Any, content: Any,
    bus: BusAsync | None = None, reply_to: Any = None,
) -> Accepted:
    """Accept a new message. Retrying with the same ``client_msg_id`` in the same conversation returns the
    first ``(id, seq)``; in another conversation it is another message. ``reply_to`` (optional) names a
    message of the same conversation this one answers: the event carries its quote (``messaging.replies``).

    Raises ValidationFailed (also for a ``reply_to`` that is not a message of this conversation, or a deleted
    one), PayloadTooLarge, NotFound. Side effects: appends ``message.new`` (with the
    members its ``@username``s name: ``messaging/mentions.py``) to the partition stream, remembers the
    message's sender for edits made before it reaches MongoDB, and records the mentions for the named users.
    """
    conversation_id = _require_object_id(conversation_id, field="conversation_id")
    client_msg_id = _require_client_msg_id(client_msg_id)
    content = _require_content(content)
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    bus = bus_resolve(client, bus)
    named = await mentions.mentions_resolve(client, conversation_id=conversation_id, sender_id=user_id,
                                            content=content)
    quote = None if reply_to is None else await replies.reply_quote(bus, conversation_id=conversation_id,
                                                                     reply_to=reply_to)
    built = events.event_build(type="message.new", conversation_id=conversation_id, actor_id=user_id,
                               message_id=message_id_new(), content=content, client_msg_id=client_msg_id,
                               mentions=named, reply_to=quote)
    # The sender is remembered (meta hash) for edits made before the message reaches MongoDB, in the append's
    # round trip. A retry writes it for its own fresh (never used) id: harmless, and it expires.
    appended = await events.event_emit(bus, event=built)
    if not appended.duplicate:
        if named:
            await mentions.mentions_record(bus, conversation_id=conversation_id, message_id=appended.message_id,
                                           seq=appended.seq, timestamp=built.payload["timestamp"], user_ids=named)
        drain_nudge(bus, partition=appended.partition)
    return Accepted(message_id=appended.message_id, conversation_id=conversation_id, seq=appended.seq,
                    duplicate=appended.duplicate,
                    event={**built.payload, "id": appended.message_id, "seq": appended.seq})


def _message_owner_from_db(message_id: str) -> tuple[str, str, bool] | None:
    from core.documents import Message

    message = Message.objects(id=message_id).only("conversation_id", "sender_id", "deleted").first()
    if message is None:
        return None
    return str(message.conversation_id), str(message.sender_id), bool(message.deleted)


async def message_owner(bus: BusAsync, *, message_id: Any) -> tuple[str, str]:
    """``(conversation id, sender id)`` of a message that is not deleted: from its meta hash (recent
    messages), else MongoDB by ``_id`` in a worker thread. Raises ValidationFailed (not a message id),
    NotFound (unknown or deleted). Read-only."""
    if not isinstance(message_id, str) or not MESSAGE_ID_RE.match(message_id):
        raise ValidationFailed("message_id must be a 32-character hex id", details={"field": "message_id"})
    meta = await bus.hgetall(message_meta_key(message_id))
    if meta:
        decoded = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                   for k, v in meta.items()}
        if decoded.get("x") == "1":
            raise NotFound("message was deleted", details={"message_id": message_id})
        return decoded["c"], decoded["u"]
    found = await sync_to_async(_message_owner_from_db, thread_sensitive=False)(message_id)
    if found is None or found[2]:
        raise NotFound("no such message", details={"message_id": message_id})
    return found[0], found[1]


async def _sender_only(client: redis.asyncio.Redis, bus: BusAsync, *, user_id: str, message_id: Any) -> str:
    conversation_id, sender_id = await message_owner(bus, message_id=message_id)
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    if sender_id != user_id:
        raise Forbidden("only the sender may change a message", details={"message_id": message_id})
    return conversation_id


async def message_edit(client: redis.asyncio.Redis, *, user_id: str, message_id: Any, content: Any,
                       bus: BusAsync | None = None) -> Accepted:
    """Replace a message's content (sender only). Appends ``message.edited`` after the message it edits; on
    the message's first edit the event carries the original (``_message_original``: a MongoDB read, or a
    bounded scan of the stream). Then writes this edit's versions into the message's meta hash
    (``events.edit_versions_meta``), so ``GET /messages/{id}/versions`` has them before the drain. The new
    content's mentions are resolved again: the event carries them, and the mentioned users' indexes gain the
    users it names and lose those it no longer names (``mentions.mentions_edited``)."""
    content = _require_content(content)
    bus = bus_resolve(client, bus)
    conversation_id = await _sender_only(client, bus, user_id=user_id, message_id=message_id)
    original = await _message_original(bus, conversation_id=conversation_id, message_id=message_id)
    # Mentions are re-resolved (docs/adr/0046): the event carries the new list; the indexes follow below.
    named = await mentions.mentions_resolve(client, conversation_id=conversation_id, sender_id=user_id,
                                            content=content)
    before = await mentions.message_mention_state(bus, conversation_id=conversation_id, message_id=message_id)
    built = events.event_build(type="message.edited", conversation_id=conversation_id, actor_id=user_id,
                               message_id=message_id, content=content, original=original, mentions=named)
    accepted = await _message_event_append(bus, event=built)
    if before is not None and (named or before[2]):
        await mentions.mentions_edited(bus, conversation_id=conversation_id, message_id=message_id, seq=before[0],
                                       timestamp=before[1], before=before[2], after=named)
    # One more round trip, for edits only (the field names need the seq just given out). The edit is accepted
    # already: a failure here (or a crash before it) costs only the early read of these versions, since the
    # drain keeps them anyway (the event carries them), so it is logged, never reported as a failed edit.
    key, fields, ttl = events.edit_versions_meta(built, seq=accepted.seq, sender_id=user_id)
    try:
        async with bus.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, ttl)
            await pipe.execute()
    except redis.exceptions.RedisError:
        logger.exception("edit %s of message %s: its versions are readable only once persisted", accepted.seq,
                         message_id)
    return accepted


def _message_original_from_db(message_id: str) -> tuple[dict[str, Any] | None, bool] | None:
    """``(original, edited)`` of a persisted message (``original``: ``{content, at, seq}`` while it has never
    been edited), or None if it is not in MongoDB yet. Blocking."""
    from core.documents import Message

    row = Message.objects(id=message_id).only("content", "timestamp", "seq", "edit_seq").as_pymongo().first()
    if row is None:
        return None
    if row.get("edit_seq") is not None:
        return None, True
    return {"content": row["content"], "at": iso_ms(row["timestamp"]), "seq": int(row["seq"])}, False


async def _message_original(bus: BusAsync, *, conversation_id: str, message_id: str) -> dict[str, Any] | None:
    """The message as sent (``{content, at, seq}``) if this is its first edit, else None. Edited before: the
    meta hash says so (``e``; for ~a day after an edit), or MongoDB does (``edit_seq``). Never edited: the
    content in MongoDB, or, not persisted yet, its ``message.new`` in the stream's undrained tail (bounded
    scan; not found, e.g. dead-lettered: None, and the versions start at this edit)."""
    if await bus.hget(message_meta_key(message_id), "e"):
        return None
    persisted = await sync_to_async(_message_original_from_db, thread_sensitive=False)(message_id)
    if persisted is not None:
        return persisted[0]
    from messaging import selectors  # lazy, as in _user_expired

    found = await selectors.stream_message_new_find(bus, conversation_id=conversation_id, message_id=message_id)
    if found is None:
        logger.warning("edit of message %s: its message.new is neither in MongoDB nor in the stream's last %d "
                       "entries; its original version is not kept", message_id, selectors.ORIGINAL_SCAN_MAX)
    return found


async def _message_event_append(bus: BusAsync, *, event: events.BuiltEvent) -> Accepted:
    """Append an edit or delete (never deduplicated) and answer as the ack does."""
    appended = await events.event_emit(bus, event=event)
    drain_nudge(bus, partition=appended.partition)
    return Accepted(message_id=event.message_id, conversation_id=event.conversation_id, seq=appended.seq,
                    duplicate=False, event={**event.payload, "seq": appended.seq})


async def message_delete(client: redis.asyncio.Redis, *, user_id: str, message_id: Any,
                         bus: BusAsync | None = None) -> Accepted:
    """Tombstone a message (sender only). Appends ``message.deleted``; later edits are refused."""
    bus = bus_resolve(client, bus)
    conversation_id = await _sender_only(client, bus, user_id=user_id, message_id=message_id)
    built = events.event_build(type="message.deleted", conversation_id=conversation_id, actor_id=user_id,
                               message_id=message_id, sender_id=user_id)
    return await _message_event_append(bus, event=built)


async def message_delete_by_staff(client: redis.asyncio.Redis, *, staff_username: str, message_id: Any,
                                  bus: BusAsync | None = None) -> Accepted:
    """Tombstone any message on behalf of a staff account (the caller checked the account's permission;
    no membership or sender check). The same ``message.deleted`` event as a sender's delete, with
    ``deleter_id`` ``staff:<username>``: live clients see it, the drain applies it, later edits and deletes
    by the sender are refused. Raises ValidationFailed (not a message id), NotFound (no such message, or
    already deleted). Side effects: those of :func:`message_delete`."""
    bus = bus_resolve(client, bus)
    conversation_id, sender_id = await message_owner(bus, message_id=message_id)
    built = events.event_build(type="message.deleted", conversation_id=conversation_id,
                               actor_id=f"{events.STAFF_DELETER_PREFIX}{staff_username}", message_id=message_id,
                               sender_id=sender_id)
    return await _message_event_append(bus, event=built)



# KEYS[1] read-cursor hash, KEYS[2] stream, KEYS[3] seq hash; ARGV[1] user, ARGV[2] seq, ARGV[3] conversation,
# ARGV[4], ARGV[5] the payload's JSON before and after its seq (events.BuiltEvent.json_around_seq), ARGV[6] the
# entry format version -> the cursor after the call (moved only forward, and never past the last accepted seq).
# The cursor is decided here, atomically with the seq it is clamped to; everything else in the entry comes
# from the event builder.
_READ_LUA = """
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
local want = tonumber(ARGV[2])
if want > last then want = last end
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if want <= current then return current end
redis.call('HSET', KEYS[1], ARGV[1], want)
redis.call('XADD', KEYS[2], '*', 't', 'read.updated', 'c', ARGV[3], 's', '0', 'd', ARGV[4] .. want .. ARGV[5],
           'v', ARGV[6])
return want
"""


async def read_mark(client: redis.asyncio.Redis, *, user_id: str, conversation_id: Any, seq: Any,
                    bus: BusAsync | None = None) -> int:
    """Move the user's read cursor forward to ``seq`` (clamped to the last accepted seq); return the cursor.

    A cursor never moves back: a smaller ``seq`` changes nothing and appends nothing. Side effect, when it
    moves: appends ``read.updated`` to the partition stream.
    """
    conversation_id = _require_object_id(conversation_id, field="conversation_id")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValidationFailed("seq must be a non-negative integer", details={"field": "seq"})
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    bus = bus_resolve(client, bus)
    partition = keys.partition_of(conversation_id)
    head, tail = events.event_build(type="read.updated", conversation_id=conversation_id, actor_id=user_id,
                                    seq=0).json_around_seq()
    script = bus.register_script(_READ_LUA)
    cursor = await script(
        keys=[read_cursor_key(conversation_id), keys.stream_key(partition), keys.seq_key(partition)],
        args=[user_id, seq, conversation_id, head, tail, FORMAT_VERSION],
    )
    drain_nudge(bus, partition=partition)
    return int(cursor)


# ------------------------------------------------------------------ size trigger of the storage drain

logger = logging.getLogger(__name__)
# Local appends per partition between two backlog checks: a tenth of a batch, so the drain starts at most
# ~10 % (per broker) past BATCH_SIZE, for one XINFO GROUPS per 50 appends with the default batch of 500.
_appends_since_check: dict[int, int] = {}
_background: set[asyncio.Task[None]] = set()


def _backlog_of(lags: list[Any], *, length: int) -> int:
    """The lag rule both backlog reads share: the worst consumer group's lag; a group whose lag Redis cannot
    tell (nil) counts the whole stream, and so does a stream without groups (nothing has drained it yet)."""
    return max((length if lag is None else int(lag) for lag in lags), default=length)


async def partition_backlog(client: BusAsync, *, partition: int) -> int:
    """Entries of a partition not yet delivered to its drain's consumer group (XINFO GROUPS ``lag``);
    the whole stream length when no group exists yet or Redis cannot tell the lag. Read-only."""
    key = keys.stream_key(partition)
    if not await client.exists(key):
        return 0
    groups = await client.xinfo_groups(key)
    lags = [group.get("lag") if isinstance(group, dict) else None for group in groups]
    return _backlog_of(lags, length=int(await client.xlen(key)))


async def _drain_enqueue(*, partition: int) -> None:
    from storage.trigger import drain_enqueue_async  # lazy: storage imports messaging

    await drain_enqueue_async(partition=partition)


async def _backlog_lean(resp: RespClient, *, partition: int) -> tuple[int, bool]:
    """:func:`partition_backlog` in one round trip of the lean client (docs/adr/0040), and whether the
    partition's drain lock is held (a drain is queued or running). Through redis-py the check's three commands
    and its XINFO reply's dicts were ~9 % of a broker's CPU at 5,000 deliveries/s, where it runs ten times a
    second (docs/benchmarks.md, issue 16, session 9). Read-only."""
    key = keys.stream_key(partition)
    groups, length, locked = await resp.execute([["XINFO", "GROUPS", key], ["XLEN", key],
                                                 ["EXISTS", keys.drain_lock_key(partition)]])
    for reply in (length, locked):
        if isinstance(reply, Exception):
            raise reply
    if isinstance(groups, Exception):
        if "no such key" not in str(groups).lower():
            raise groups
        groups = []  # no stream yet: no group either
    # RESP2: each group is a flat list of names and values; ``lag`` is nil when Redis cannot tell it.
    lags = [dict(zip(group[::2], group[1::2], strict=True)).get(b"lag") for group in groups]
    return _backlog_of(lags, length=int(length)), bool(locked)


async def _drain_check(client: BusAsync, *, partition: int) -> None:
    try:
        resp = append_client_lean(client)
        if resp is not None:
            backlog, locked = await _backlog_lean(resp, partition=partition)
            if locked:
                return  # a drain is queued or running: drain_enqueue's SET NX would refuse, after a thread hop
        else:
            backlog = await partition_backlog(client, partition=partition)
        if backlog >= settings.BATCH_SIZE:
            # drain_enqueue itself keeps it to one drain in flight per partition (SET NX lock).
            await _drain_enqueue(partition=partition)
    except Exception:
        logger.exception("size trigger: backlog check of partition %s failed", partition)


def drain_nudge(client: BusAsync, *, partition: int) -> None:
    """Count one local append to ``partition``; every tenth of a batch, check the partition's backlog in the
    background (with the bus client ``client``) and enqueue a drain when it reached ``BATCH_SIZE``. Never
    delays the caller's ack. Precondition: called on a running event loop."""
    count = _appends_since_check.get(partition, 0) + 1
    if count < max(1, settings.BATCH_SIZE // 10):
        _appends_since_check[partition] = count
        return
    _appends_since_check[partition] = 0
    task = asyncio.get_running_loop().create_task(_drain_check(client, partition=partition))
    _background.add(task)
    task.add_done_callback(_background.discard)


# ------------------------------------------------------------------ typing


async def typing_signal(client: redis.asyncio.Redis, *, user_id: str, conversation_id: Any) -> None:
    """Tell the conversation's online members that the user is typing. Ephemeral: PUBLISH only, nothing
    stored. Raises ValidationFailed, NotFound."""
    conversation_id = _require_object_id(conversation_id, field="conversation_id")
    await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    await client.publish(frames.CONTROL_CHANNEL,
                         frames.control_typing(conversation_id=conversation_id, user_id=user_id))
