"""Each user's conversation ids as one document of ``user_conversations`` keyed by the user's id
(docs/adr/0043), so a user whose cached ids (``core.keys.user_conversations_key``, docs/adr/0039) expired or
predate the cache gets them back with one read by ``_id`` instead of a members query, which scans the whole
``conversations`` collection on FerretDB v1 (14 s at 20,000 conversations, loaded).

Writers: every membership change, from :func:`messaging.membership.membership_changed_sync` (the one place all
of them pass: 1:1 creation, group creation, add, remove, leave, delete) through :func:`user_conversations_record`;
registration (:func:`user_conversations_created`); a reader's rebuild (:func:`user_conversations_rebuild`) and
``manage.py user_conversations_build`` (:func:`user_conversations_build`) for users without a complete document.
Every write is by ``_id`` (an index search on the default store, docs/adr/0035).

Ordering, against the user's version key (``core.keys.user_conversations_version_key``, on REDIS_URL): a change
bumps it before its document write and again after it (in the script that updates the cached sets), and a
rebuild writes a whole list read from ``conversations`` only if the version did not move between its first read
and its write, so a rebuild never overwrites a change it did not see. Two changes racing on one user are
settled by each re-reading the conversation (by ``_id``) after its write and repairing what disagrees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from bson import ObjectId
from pymongo import UpdateOne

from core.keys import user_conversations_version_key

# A change re-reads the conversation after its writes and repairs users whose entry disagrees at most this
# many times: each round only repeats when yet another change of the same conversation and user landed in
# between (two rounds settle any pair of racing changes); past it the last writer's own round settles it.
RECORD_ROUNDS = 3
# A rebuild gives up writing the list after this many rounds in which a change of the user moved the version
# (it still answers what it read; the document stays incomplete and the next read rebuilds it).
REBUILD_ROUNDS = 3


def _collection() -> Any:
    from core.documents import UserConversations

    return UserConversations._get_collection()


def _bulk_write(ops: list[UpdateOne]) -> None:
    """``ops`` in commands of at most ``UPDATE_STATEMENTS_MAX`` statements: FerretDB v1 (SQLite) holds a pooled
    connection per statement until its command ends, and a command of more statements than its pool waits for
    ever, with every later command behind it (storage/writes.py). Blocking."""
    from storage.writes import UPDATE_STATEMENTS_MAX

    for start in range(0, len(ops), UPDATE_STATEMENTS_MAX):
        _collection().bulk_write(ops[start:start + UPDATE_STATEMENTS_MAX], ordered=False)


def user_conversations_stored(*, user_id: str) -> list[str] | None:
    """The user's conversation ids from their document (one read by ``_id``), or None when they have no
    complete document (never built, or created by a change before any build). Blocking."""
    doc = _collection().find_one({"_id": ObjectId(user_id)}, {"c": 1, "complete": 1})
    if doc is None or not doc.get("complete"):
        return None
    return sorted({str(c) for c in doc.get("c") or ()})


def user_conversations_record(*, user_ids: Iterable[str], conversation_id: str, members: list[str] | None,
                              members_read: Callable[[], list[str] | None]) -> None:
    """After a membership change is saved in ``conversations``: add ``conversation_id`` to the document of
    each of ``user_ids`` who is a member now, remove it from the others' (the conversation gone: from all).
    ``members``: the conversation's members read after the change (None: no such conversation);
    ``members_read`` reads them again by ``_id``, after each round's writes, and users whose entry disagrees
    with it are written again.
    Precondition: the caller bumped each user's version first (membership_changed_sync does, in its MULTI).
    Side effects: ``_id``-keyed updates in bounded commands, per round (an upsert creates an incomplete document
    for a user who had none). Blocking."""
    users = sorted(set(user_ids))
    cid = ObjectId(conversation_id)
    written: dict[str, bool] = {}
    now = set(members or ())
    for _round in range(RECORD_ROUNDS):
        todo = [u for u in users if written.get(u) != (u in now)]
        if not todo:
            return
        ops = [UpdateOne({"_id": ObjectId(u)}, {"$addToSet": {"c": cid}} if u in now else {"$pull": {"c": cid}},
                         upsert=u in now) for u in todo]
        _bulk_write(ops)
        written.update({u: u in now for u in todo})
        now = set(members_read() or ())


def user_conversations_created(*, user_id: str) -> None:
    """After registration: the new user's document, complete and empty (a membership change that created one
    first left it incomplete: left so, the next read rebuilds it). Side effect: one insert. Blocking."""
    from pymongo.errors import DuplicateKeyError

    with contextlib.suppress(DuplicateKeyError):
        _collection().insert_one({"_id": ObjectId(user_id), "c": [], "complete": True})


def _members_scan(user_id: str) -> list[str]:
    from core.documents import Conversation

    return [str(c["_id"]) for c in Conversation.objects(members=ObjectId(user_id)).only("id").as_pymongo()]


def user_conversations_rebuild(client: Any, *, user_id: str) -> list[str]:
    """The user's conversation ids from ``conversations`` (a members query: an index on MongoDB, a scan on
    FerretDB), written as their complete document unless a membership change of theirs moved the version
    meanwhile (then read again, at most REBUILD_ROUNDS times). ``client``: a sync REDIS_URL client. Side
    effects: the document; the scan. Blocking."""
    vkey = user_conversations_version_key(user_id)
    found: list[str] = []
    for _round in range(REBUILD_ROUNDS):
        version = client.get(vkey)
        found = _members_scan(user_id)
        _collection().update_one({"_id": ObjectId(user_id)},
                                 {"$set": {"c": [ObjectId(c) for c in found], "complete": True}}, upsert=True)
        if client.get(vkey) == version:
            return found
    # Still moving: a change's write may have been overwritten; leave the document for the next read.
    _collection().update_one({"_id": ObjectId(user_id)}, {"$set": {"complete": False}})
    return found


def user_conversations_build(client: Any, *, progress: Callable[[int], None] | None = None) -> int:
    """Every user's document from one read of ``users`` and one of ``conversations`` (for existing data:
    ``manage.py user_conversations_build``; idempotent). A user whose version moved while it ran (a
    membership change of theirs) is rebuilt alone afterwards. Returns the number of users written. Side
    effects: the documents. Blocking."""
    from core.documents import Conversation, User

    users = [str(u["_id"]) for u in User.objects.only("id").as_pymongo()]
    pipe = client.pipeline(transaction=False)
    for uid in users:
        pipe.get(user_conversations_version_key(uid))
    before = pipe.execute() if users else []
    mine: dict[str, list[ObjectId]] = {uid: [] for uid in users}
    for conv in Conversation.objects.only("id", "members").as_pymongo():
        for member in conv.get("members") or ():
            mine.setdefault(str(member), []).append(conv["_id"])
    known = set(users)
    ops = [UpdateOne({"_id": ObjectId(uid)}, {"$set": {"c": cids, "complete": True}}, upsert=True)
           for uid, cids in mine.items() if uid in known]
    for start in range(0, len(ops), 500):
        _bulk_write(ops[start:start + 500])
        if progress is not None:
            progress(len(ops[start:start + 500]))
    pipe = client.pipeline(transaction=False)
    for uid in users:
        pipe.get(user_conversations_version_key(uid))
    after = pipe.execute() if users else []
    for uid, old, new in zip(users, before, after, strict=True):
        if old != new:
            user_conversations_rebuild(client, user_id=uid)
    return len(ops)
