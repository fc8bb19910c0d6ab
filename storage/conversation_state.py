"""What the drain's guards read of each conversation's document, kept in Redis by the drain (docs/adr/0048).

The drain decides every conversation statement on the document as read by ``_id`` (``storage.rules.Seen``):
whether it exists, its ``type`` (the 1:1 read mirror), its ``lastMessage`` (moved only forward; an edit or
delete mirrored into it only if it shows that message) and its ``read_cursors``. In the worst case (each message
of a batch in another conversation) that read was a third of a message's cost on FerretDB v1, and only the drain
writes those fields: so the drain keeps them in Redis, one small key per conversation
(``core.keys.conversation_state_key``), as it last wrote them, and reads the document only when the key is not
there (the conversation's first batch, a batch after ``RECENT_TTL_S`` unused, after Redis lost it).

Never ahead of the store, never stale behind it: a batch *takes* its conversations' keys (GETDEL) before it
writes anything, and puts them back only after its conversation statements succeeded and before it acknowledges
its entries. A drain that dies, or a statement that fails, in between leaves the key absent, and the next batch
reads the document again. Other writers of ``conversations`` (creation, membership changes) touch none of
these fields, and a partition's batches run one at a time (its lease).
"""

from __future__ import annotations

from typing import Any

import bson
import bson.errors
from bson import ObjectId
from django.conf import settings

from core.bus import BusSync
from core.keys import conversation_state_key

# The document's fields the guards read (``Seen.conversation``'s projection), and of ``lastMessage`` the parts
# they compare (its content and time are written, never read back).
FIELDS = ("type", "lastMessage", "read_cursors")
LAST_MESSAGE_FIELDS = ("id", "seq", "edit_seq")


def state_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a ``conversations`` document (as read, or as the batch left it in ``Seen``) that is kept. Pure."""
    out = {k: doc[k] for k in FIELDS if k in doc and k != "lastMessage"}
    last = doc.get("lastMessage")
    if isinstance(last, dict):
        out["lastMessage"] = {k: last[k] for k in LAST_MESSAGE_FIELDS if k in last}
    elif last is not None:
        out["lastMessage"] = last  # not a document: kept as is, so the guards decide on it as they did
    return out


def conversation_states_take(r: BusSync, *, partition: int,
                             conversation_ids: list[str]) -> dict[ObjectId, dict[str, Any]]:
    """The kept state of each of ``conversation_ids`` that has one, removed from Redis (one pipelined GETDEL
    each): until :func:`conversation_states_put` puts it back, a drain that reads it again finds nothing and
    reads the store. Raises what redis-py raises."""
    if not conversation_ids:
        return {}
    pipe = r.pipeline(transaction=False)
    for cid in conversation_ids:
        pipe.getdel(conversation_state_key(partition, cid))
    out: dict[ObjectId, dict[str, Any]] = {}
    for cid, raw in zip(conversation_ids, pipe.execute(), strict=True):
        if raw:
            try:
                out[ObjectId(cid)] = bson.decode(raw)
            except bson.errors.BSONError:
                continue  # unreadable: read from the store instead
    return out


def conversation_states_put(r: BusSync, *, partition: int, docs: dict[ObjectId, dict[str, Any]]) -> None:
    """Keep ``docs`` (conversation -> its document as written, at least ``FIELDS``) for ``RECENT_TTL_S``, in one
    pipeline. Precondition: each one's statements of the batch succeeded. Raises what redis-py raises."""
    if not docs:
        return
    ttl = int(settings.RECENT_TTL_S)
    pipe = r.pipeline(transaction=False)
    for cid, doc in docs.items():
        pipe.set(conversation_state_key(partition, str(cid)), bson.encode(state_of(doc)), ex=ttl)
    pipe.execute()
