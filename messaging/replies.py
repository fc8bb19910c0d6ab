"""Replies: the quote a message carries of the message it answers (docs/adr/0037).

A ``message.send`` may name ``reply_to``, the id of a message of the same conversation. The write path
(``messaging.services.message_send``) resolves it here into a short quote that the ``message.new`` payload
carries, so every live frame, resume and history page shows it without another lookup:

``{id, seq, sender_id, username, excerpt, deleted}``: the original's id and seq (a client jumps to it by seq),
its author, the first ``QUOTE_CHARS`` characters of its content, ``deleted`` (then ``excerpt`` is ``""``).

Quotes never nest: the excerpt is the original's own text, never the original's quote. History refreshes a
quote to the original's current state where it reads it anyway (``api.selectors``), so a deleted or edited
original shows as such; a live client applies ``message.edited``/``message.deleted`` of the original itself.

Resolution costs a send with ``reply_to`` two HGETs of the conversation's recent window (the original is there
for the last ``CHATSTREAM_RECENT_MESSAGES`` messages; its edits hash), pipelined with the other replies of the
same event-loop turn, else one MongoDB read by ``_id`` in a worker thread;
and the author's username, from a per-process cache or one MongoDB read by ``_id``. A send without
``reply_to`` pays nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
from collections import OrderedDict
from typing import Any

import redis.asyncio
from asgiref.sync import sync_to_async

from core.bus import BusAsync
from core.errors import ValidationFailed
from core.keys import partition_of, recent_docs_key, recent_edits_key

# The quote's length: enough to recognise a message in one line of a client (Slack and Telegram show about as
# much), and it bounds what a reply adds to its frame (~100 characters plus ~150 bytes of ids).
QUOTE_CHARS = 100
MESSAGE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# Usernames never change (docs/api.md: there is no rename), so a process may keep them; bounded LRU.
_USERNAMES_MAX = 10_000
_usernames: OrderedDict[str, str] = OrderedDict()


def quote_of(*, message_id: str, seq: int, sender_id: str, username: str, content: str,
             deleted: bool) -> dict[str, Any]:
    """The quote of a message in the shape every payload and answer carries. Pure."""
    return {"id": message_id, "seq": int(seq), "sender_id": sender_id, "username": username,
            "excerpt": "" if deleted else content[:QUOTE_CHARS], "deleted": bool(deleted)}


def quote_refreshed(quote: dict[str, Any], *, content: str, deleted: bool) -> dict[str, Any]:
    """``quote`` with the original's current content and deletion applied. Pure."""
    return {**quote, "excerpt": "" if deleted else content[:QUOTE_CHARS], "deleted": bool(deleted)}


class _WindowReads:
    """Coalesces the quote reads of one event-loop turn into one pipeline, as ``streams.AppendBatcher`` does for
    appends: an unbatched command costs a broker more CPU than the rest of a send (measured: a reply's own HGET
    put ~50 % on the CPU per delivery of ``manage.py bench``; docs/benchmarks.md, "Features")."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.pending: list[tuple[str, str, str, asyncio.Future[tuple[Any, Any]]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def read(self, doc_key: str, edit_key: str, message_id: str) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, Any]] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((doc_key, edit_key, message_id, future))
        return await future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[tuple[str, str, str, asyncio.Future[tuple[Any, Any]]]]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for doc_key, edit_key, message_id, _ in batch:
                    pipe.hget(doc_key, message_id)
                    pipe.hget(edit_key, message_id)
                replies = await pipe.execute()
        except BaseException as exc:  # every waiter gets the failure, cancellation included
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else redis.exceptions.ConnectionError(
                        "quote read cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for n, (*_, future) in enumerate(batch):
            if not future.done():
                future.set_result((replies[2 * n], replies[2 * n + 1]))


_readers: weakref.WeakKeyDictionary[Any, _WindowReads] = weakref.WeakKeyDictionary()


async def _window_read(bus: BusAsync, *, partition: int, conversation_id: str, message_id: str) -> tuple[Any, Any]:
    """``(window JSON, edits-hash JSON)`` of ``message_id`` in its conversation's recent window (None: not
    there), batched with the other quote reads of this loop turn on a single Redis (a cluster: one pipeline
    each, since the keys share their partition's slot)."""
    doc_key = recent_docs_key(partition, conversation_id)
    edit_key = recent_edits_key(partition, conversation_id)
    if isinstance(bus, redis.asyncio.Redis):
        reader = _readers.get(bus)
        if reader is None:
            reader = _readers[bus] = _WindowReads(bus)
        return await reader.read(doc_key, edit_key, message_id)
    async with bus.pipeline(transaction=False) as pipe:
        pipe.hget(doc_key, message_id)
        pipe.hget(edit_key, message_id)
        doc, edit = await pipe.execute()
    return doc, edit


def _refused(reply_to: str, reason: str) -> ValidationFailed:
    what = {"not_found": "no message of this conversation has that id", "deleted": "that message was deleted"}
    return ValidationFailed(f"reply_to: {what[reason]}",
                            details={"field": "reply_to", "reason": reason, "message_id": reply_to})


def _original_from_db(message_id: str) -> dict[str, Any] | None:
    """The persisted message (conversation, seq, sender, content, deleted) or None. Blocking; by ``_id``."""
    from core.documents import Message

    row = Message.objects(id=message_id).only("conversation_id", "seq", "sender_id", "content", "deleted") \
        .as_pymongo().first()
    if row is None:
        return None
    return {"conversation_id": str(row["conversation_id"]), "seq": int(row["seq"]),
            "sender_id": str(row["sender_id"]), "content": row.get("content") or "",
            "deleted": bool(row.get("deleted"))}


def _username_from_db(user_id: str) -> str:
    from bson import ObjectId

    from core.documents import User

    row = User.objects(id=ObjectId(user_id)).only("username").as_pymongo().first()
    return str(row["username"]) if row is not None else ""


async def username_of(user_id: str) -> str:
    """The username of ``user_id`` ("" for an unknown id): from this process' cache, else one MongoDB read by
    ``_id`` in a worker thread (never on the event loop)."""
    found = _usernames.get(user_id)
    if found is not None:
        _usernames.move_to_end(user_id)
        return found
    name = await sync_to_async(_username_from_db, thread_sensitive=False)(user_id)
    if name:
        _usernames[user_id] = name
        while len(_usernames) > _USERNAMES_MAX:
            _usernames.popitem(last=False)
    return name


async def reply_quote(bus: BusAsync, *, conversation_id: str, reply_to: Any) -> dict[str, Any]:
    """The quote of message ``reply_to`` for a reply sent in ``conversation_id``. Precondition: the sender is a
    member of ``conversation_id``. Raises ValidationFailed (code ``invalid``, details ``{field: "reply_to",
    reason}``): ``reason`` absent for a value that is not a 32-hex id, ``not_found`` when no message of this
    conversation has that id (another conversation's message is answered the same: no existence leak),
    ``deleted`` when it was deleted. Read-only."""
    if not isinstance(reply_to, str) or not MESSAGE_ID_RE.match(reply_to):
        raise ValidationFailed("reply_to must be a 32-character hex message id", details={"field": "reply_to"})
    partition = partition_of(conversation_id)
    raw, edit = await _window_read(bus, partition=partition, conversation_id=conversation_id, message_id=reply_to)
    if raw is not None:
        doc = json.loads(raw)
        original: dict[str, Any] = {"seq": int(doc["seq"]), "sender_id": str(doc["sender_id"]),
                                    "content": doc.get("content") or "", "deleted": bool(doc.get("deleted"))}
    else:
        found = await sync_to_async(_original_from_db, thread_sensitive=False)(reply_to)
        if found is None or found["conversation_id"] != conversation_id:
            raise _refused(reply_to, "not_found")
        original = found
        # An edit or delete of an old message the drain has not written yet is in the window's edits hash.
        if edit is not None:
            change = json.loads(edit)
            original["deleted"] = original["deleted"] or bool(change.get("deleted"))
            original["content"] = change.get("content") or original["content"]
    if original["deleted"]:
        raise _refused(reply_to, "deleted")
    return quote_of(message_id=reply_to, seq=original["seq"], sender_id=original["sender_id"],
                    username=await username_of(original["sender_id"]), content=original["content"],
                    deleted=False)
