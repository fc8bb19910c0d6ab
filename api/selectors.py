"""Reads of the REST API (no side effects): users, contacts, groups, conversations' members, edit history and
the staff's reads; the conversation list is ``api/conversation_list.py``, message history ``api/history.py``.

Membership is checked against MongoDB's denormalised ``conversations.members`` (one indexed read); a
conversation the caller is not in looks exactly like one that does not exist (404, no existence leak).
The accepted truth of a conversation (its last seq, read cursors) is in Redis; MongoDB holds what the
storage pipeline has persisted so far, a few seconds behind at most.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId

from core.bus import bus_sync
from core.clients import sync_redis
from core.documents import (
    Conversation,
    GroupChat,
    Message,
    MessageVersion,
    User,
)
from core.errors import NotFound
from core.keys import (
    membership_generation_key,
    membership_key,
    message_meta_key,
    partition_of,
    read_cursor_key,
    recent_docs_key,
    seq_key,
)
from core.values import as_str
from messaging.membership import _NO_MEMBERS as NO_MEMBERS
from messaging.membership import membership_refill_sync
from messaging.presence import presence_shown, status_shown
from messaging.reactions import reactions_live_sync, reactions_ordered

OBJECT_ID_RE = re.compile(r"^[0-9a-f]{24}$")
MESSAGE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
HISTORY_MAX_LIMIT = 200
USER_SEARCH_LIMIT = 20


def object_id_or_404(value: str, *, what: str) -> ObjectId:
    """An id from a URL or body: a malformed one is simply unknown (404), never a query error."""
    if not isinstance(value, str) or not OBJECT_ID_RE.match(value):
        raise NotFound(f"no such {what}", details={"id": str(value)[:64]})
    return ObjectId(value)


# ------------------------------------------------------------------ users


def users_presence_applied(users: list[User]) -> list[User]:
    """``users`` with ``status`` and ``last_seen`` as Redis presence says now (messaging.presence.status_shown,
    docs/adr/0051: a connect writes no store, so the store's values are the last offline or chosen status).
    Every public read of a user's status goes through this. Cost: one Redis script call for all of them. Side
    effect: sets the two fields on the (never saved) documents."""
    users_presence_overlay(users)
    return users


def users_presence_overlay(users: list[User]) -> dict[str, bool]:
    """What :func:`users_presence_applied` does to ``users``; returns whether each (by id) has a live session
    now, for the reads that show ``online`` beside the status."""
    said = presence_shown(sync_redis(), user_ids=[str(u.id) for u in users])
    for user in users:
        live, since, gone = said[str(user.id)]
        user.status, user.last_seen = status_shown(status=user.status or "offline", last_seen=user.last_seen,
                                                   live=live, since=since, gone=gone)
    return {user_id: entry[0] for user_id, entry in said.items()}


def user_get(*, user_id: str) -> User:
    user = User.objects(id=object_id_or_404(user_id, what="user")).first()
    if user is None:
        raise NotFound("no such user", details={"id": user_id})
    return user


def user_by_username(*, username: str) -> User:
    """The user with this username (case-insensitive). Raises NotFound, also for a removed account (its
    username stays reserved, but nobody can add it to a chat any more)."""
    user = User.objects(username_key=username.lower(), deactivated_at=None).first()
    if user is None:
        raise NotFound("no such user", details={"username": username})
    return user


def user_search(*, username: str, limit: int = USER_SEARCH_LIMIT) -> list[User]:
    """Users whose username starts with ``username`` (case-insensitive), the exact match first; removed
    accounts are not listed.
    The prefix is escaped: a regex from the request never reaches the database as a pattern."""
    key = username.lower()
    pattern = "^" + re.escape(key)
    # A plain $regex string: mongoengine's __regex adds flags FerretDB v1 refuses ("invalid flag: u").
    query = User.objects(__raw__={"username_key": {"$regex": pattern}, "deactivated_at": None})
    found = list(query.only("id", "username", "username_key", "status", "last_seen")
                 .order_by("username_key").limit(limit))
    return sorted(found, key=lambda u: (u.username_key != key, u.username_key))


def contact_list(*, user_id: str) -> list[User]:
    me = user_get(user_id=user_id)
    if not me.contacts:
        return []
    by_id = {u.id: u for u in User.objects(id__in=list(me.contacts)).only("id", "username", "status", "last_seen")}
    return [by_id[c] for c in me.contacts if c in by_id]


def users_by_id(*, ids: list[ObjectId]) -> dict[str, User]:
    if not ids:
        return {}
    return {str(u.id): u for u in User.objects(id__in=list(set(ids))).only("id", "username", "status")}


# ------------------------------------------------------------------ groups and conversations


def group_get_for_member(*, user_id: str, group_id: str) -> GroupChat:
    """The group, if the caller is a member. Raises NotFound otherwise (or if it does not exist)."""
    oid = object_id_or_404(group_id, what="group")
    group = GroupChat.objects(id=oid, members=ObjectId(user_id)).first()
    if group is None:
        raise NotFound("no such group", details={"group_id": group_id})
    return group


def conversation_get_for_member(*, user_id: str, conversation_id: str) -> Conversation:
    oid = object_id_or_404(conversation_id, what="conversation")
    conversation = Conversation.objects(id=oid, members=ObjectId(user_id)).first()
    if conversation is None:
        raise NotFound("no such conversation", details={"conversation_id": conversation_id})
    return conversation


def conversation_members_cached(*, conversation_id: str) -> set[str] | None:
    """Member ids of a conversation (None: no such conversation) from the write path's Redis membership cache
    (``core.keys.membership_key``), so a hot read does not touch the document store. Side effect, on
    a miss: reads MongoDB once and fills the cache exactly as the write path does (same key, format, TTLs);
    the API's membership changes invalidate it."""
    client = sync_redis()
    key = membership_key(conversation_id)
    cached = client.smembers(key)
    if cached:
        members = {m.decode() if isinstance(m, bytes) else str(m) for m in cached}
        return None if members == {NO_MEMBERS} else members - {NO_MEMBERS}
    # The write path's guarded refill: with the generation read first, a removal racing this read cannot be
    # undone by it (the set lives MEMBERSHIP_TTL_S, a month).
    generation = client.get(membership_generation_key(conversation_id))
    found = membership_refill_sync(client, conversation_id=conversation_id, generation=generation)
    return set(found) if found is not None else None


def member_require(*, user_id: str, conversation_id: str) -> set[str]:
    object_id_or_404(conversation_id, what="conversation")
    members = conversation_members_cached(conversation_id=conversation_id)
    if members is None or user_id not in members:
        raise NotFound("no such conversation", details={"conversation_id": conversation_id})
    return members


def time_parse(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ------------------------------------------------------------------ edit history

# At most this many versions are answered (oldest first): bounds one answer's size (4,000 characters each).
MESSAGE_VERSIONS_MAX = 100


@dataclass(frozen=True, slots=True)
class MessageVersionView:
    seq: int  # the event that made this content: the send (the original), or an edit
    content: str
    at: datetime | str | None  # when: the send's timestamp or the edit's edited_at


@dataclass(frozen=True, slots=True)
class MessageVersions:
    message_id: str
    conversation_id: str
    versions: list[MessageVersionView]  # oldest first; the last is the current content
    has_more: bool  # older versions than these were left out (MESSAGE_VERSIONS_MAX)


def message_versions_get(*, user_id: str, message_id: str) -> MessageVersions:
    """The versions of a message, oldest first: the original, then the content each edit made (the last is the
    current one); none for a message never edited. Raises NotFound for an unknown or deleted message and for one
    of a conversation the caller is not in (no existence leak).

    Two sources, merged by seq: the message's meta hash on the bus (``v<seq>`` fields, written by the edit right
    after its ack, kept ~a day) and ``message_versions`` in MongoDB (written by the drain). Cost: one HGETALL;
    one ``message_versions`` query by ``message_id``, newest first, at most MESSAGE_VERSIONS_MAX + 2 rows (an
    index on MongoDB; FerretDB v1 scans that collection,
    which holds only edited messages' versions, not every message); and, only for a message with neither (never
    edited, or unknown), one read of ``messages`` by ``_id`` to tell the two apart (FerretDB v1 scans it)."""
    if not MESSAGE_ID_RE.match(message_id):
        raise NotFound("no such message", details={"message_id": message_id[:64]})
    raw = bus_sync().hgetall(message_meta_key(message_id)) or {}
    meta = {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in raw.items()}
    # Newest first: a delete marker is always the newest (edits after a delete are refused), and beyond the
    # limit the newest versions (the current one among them) are the ones worth answering.
    rows = list(MessageVersion.objects(message_id=message_id).order_by("-seq").limit(MESSAGE_VERSIONS_MAX + 2)
                .as_pymongo())
    conversation_id = meta.get("c") or (str(rows[0]["conversation_id"]) if rows else "")
    deleted = meta.get("x") == "1" or any(r.get("deleted") for r in rows)
    if not conversation_id:
        message = Message.objects(id=message_id).only("conversation_id", "deleted").first()
        if message is not None:
            conversation_id, deleted = str(message.conversation_id), bool(message.deleted)
    if not conversation_id or deleted:
        raise NotFound("no such message", details={"message_id": message_id})
    try:
        conversation_get_for_member(user_id=user_id, conversation_id=conversation_id)
    except NotFound:
        raise NotFound("no such message", details={"message_id": message_id}) from None
    found: dict[int, MessageVersionView] = {
        int(r["seq"]): MessageVersionView(seq=int(r["seq"]), content=r.get("content", ""), at=r.get("at"))
        for r in rows if not r.get("deleted")}
    for name, value in meta.items():
        if name.startswith("v") and name[1:].isdigit():
            version = json.loads(value)
            found.setdefault(int(version["seq"]), MessageVersionView(seq=int(version["seq"]),
                                                                      content=version["content"], at=version["at"]))
    ordered = [found[seq] for seq in sorted(found)]
    return MessageVersions(message_id=message_id, conversation_id=conversation_id,
                           versions=ordered[-MESSAGE_VERSIONS_MAX:], has_more=len(ordered) > MESSAGE_VERSIONS_MAX)


# ------------------------------------------------------------------ reactions (docs/adr/0037)


def message_reactions_get(*, user_id: str, message_id: str) -> tuple[str, list[dict[str, Any]]]:
    """``(conversation id, [{emoji, count, user_ids}])`` of a message, emoji in the reaction set's order.
    Raises NotFound for an unknown or deleted message and for one of a conversation the caller is not in (no
    existence leak). Sources, newest first: the reaction state hash (a day after a change), the recent
    window's copy, the stored message (by ``_id``). Cost: one HGETALL of the meta hash (else one ``messages``
    read by ``_id``), the membership cache, one HGETALL, at most one HGET and one read by ``_id``."""
    if not MESSAGE_ID_RE.match(message_id):
        raise NotFound("no such message", details={"message_id": message_id[:64]})
    bus = bus_sync()
    meta = {as_str(k): as_str(v) for k, v in (bus.hgetall(message_meta_key(message_id)) or {}).items()}
    stored = None
    if meta.get("c"):
        conversation_id, deleted = meta["c"], meta.get("x") == "1"
    else:
        stored = Message.objects(id=message_id).only("conversation_id", "deleted", "reactions").as_pymongo().first()
        conversation_id = str(stored["conversation_id"]) if stored else ""
        deleted = bool(stored.get("deleted")) if stored else True
    members = conversation_members_cached(conversation_id=conversation_id) if conversation_id else None
    if deleted or members is None or user_id not in members:
        raise NotFound("no such message", details={"message_id": message_id})
    live = reactions_live_sync(bus, conversation_id=conversation_id, message_ids=[message_id])
    if message_id in live:
        return conversation_id, reactions_ordered(live[message_id])
    raw = bus.hget(recent_docs_key(partition_of(conversation_id), conversation_id), message_id)
    if raw is not None:
        return conversation_id, reactions_ordered(json.loads(raw).get("reactions"))
    if stored is None:
        stored = Message.objects(id=message_id).only("reactions").as_pymongo().first()
    return conversation_id, reactions_ordered((stored or {}).get("reactions"))


# ------------------------------------------------------------------ staff (Django admin) reads


@dataclass(frozen=True, slots=True)
class AdminPage:
    rows: list[Any]
    page: int
    has_next: bool


def admin_messages(*, conversation_id: str = "", sender: str = "", date_from: datetime | None = None,
                   date_to: datetime | None = None, search: str = "", page: int = 1,
                   per_page: int = 50) -> AdminPage:
    """Messages for staff, newest first, filtered by conversation, sender (username or id), time range and a
    case-insensitive substring of the content (``$regex`` of the escaped text: FerretDB v1 has no ``$text``).
    Unknown filter values simply match nothing."""
    raw: dict[str, Any] = {}
    if conversation_id:
        raw["conversation_id"] = ObjectId(conversation_id) if OBJECT_ID_RE.match(conversation_id) else None
    if sender:
        if OBJECT_ID_RE.match(sender):
            raw["sender_id"] = ObjectId(sender)
        else:
            user = User.objects(username_key=sender.lower()).only("id").first()
            raw["sender_id"] = user.id if user is not None else None
    if date_from or date_to:
        raw["timestamp"] = {**({"$gte": date_from} if date_from else {}), **({"$lt": date_to} if date_to else {})}
    if search:
        raw["content"] = {"$regex": re.escape(search), "$options": "i"}
    page = max(1, page)
    rows = list(Message.objects(__raw__=raw).order_by("-timestamp", "-seq").skip((page - 1) * per_page)
                .limit(per_page + 1))
    return AdminPage(rows=rows[:per_page], page=page, has_next=len(rows) > per_page)


def admin_users(*, search: str = "", page: int = 1, per_page: int = 50) -> AdminPage:
    raw: dict[str, Any] = {"username_key": {"$regex": "^" + re.escape(search.lower())}} if search else {}
    page = max(1, page)
    rows = list(User.objects(__raw__=raw).order_by("username_key").skip((page - 1) * per_page).limit(per_page + 1))
    return AdminPage(rows=rows[:per_page], page=page, has_next=len(rows) > per_page)


@dataclass(frozen=True, slots=True)
class AdminConversation:
    conversation: Conversation
    title: str
    last_accepted_seq: int  # Redis: the seq the write path last gave out
    last_persisted_seq: int  # MongoDB: the last event the storage pipeline applied
    # A group's members as (member, who added them): usernames; "" for the creator (added by nobody).
    added_by: tuple[tuple[str, str], ...] = ()

    @property
    def behind(self) -> int:
        return max(0, self.last_accepted_seq - self.last_persisted_seq)


def admin_conversations(*, conversation_id: str = "", page: int = 1, per_page: int = 50) -> tuple[
        list[AdminConversation], bool]:
    """Conversations for staff, newest activity first, each with its accepted and persisted seq."""
    raw: dict[str, Any] = {}
    if conversation_id:
        raw["_id"] = ObjectId(conversation_id) if OBJECT_ID_RE.match(conversation_id) else None
    page = max(1, page)
    rows = list(Conversation.objects(__raw__=raw).order_by("-updated_at", "-id").skip((page - 1) * per_page)
                .limit(per_page + 1))
    has_next = len(rows) > per_page
    rows = rows[:per_page]
    pipe = bus_sync().pipeline(transaction=False)
    for conv in rows:
        pipe.hget(seq_key(partition_of(str(conv.id))), str(conv.id))
    accepted = [int(x or 0) for x in pipe.execute()] if rows else []
    groups = {g.id: g for g in GroupChat.objects(id__in=[c.room_id for c in rows if c.type == "group"])
              .only("id", "name", "members", "added_by")}
    names = users_by_id(ids=[m for c in rows if c.type == "single" for m in c.members])
    adders = users_by_id(ids=list({ObjectId(u) for g in groups.values()
                                   for u in [*(str(m) for m in g.members), *map(str, (g.added_by or {}).values())]}))

    def name(user_id: str) -> str:
        return adders[user_id].username if user_id in adders else user_id

    def added_by(group: GroupChat | None) -> tuple[tuple[str, str], ...]:
        if group is None:
            return ()
        by = {k: str(v) for k, v in (group.added_by or {}).items()}
        return tuple((name(str(m)), name(by[str(m)]) if str(m) in by else "") for m in group.members)

    out = []
    for conv, seq in zip(rows, accepted, strict=True):
        group = groups.get(conv.room_id) if conv.type == "group" else None
        if conv.type == "group":
            title = group.name if group is not None else "(group gone)"
        else:
            title = " & ".join(names[str(m)].username for m in conv.members if str(m) in names)
        out.append(AdminConversation(conversation=conv, title=title, last_accepted_seq=seq,
                                     last_persisted_seq=int(conv.last_seq or 0), added_by=added_by(group)))
    return out, has_next


# ------------------------------------------------------------------ members of a conversation


@dataclass(frozen=True, slots=True)
class MemberState:
    user: User
    online: bool  # a live WebSocket session on some broker now (the presence zset), whatever ``status`` says
    read_seq: int  # the member's read cursor: everything up to this seq has been read


def conversation_members_get(*, user_id: str, conversation_id: str) -> list[MemberState]:
    """The members of a conversation the caller belongs to, each with presence and read cursor, in the
    conversation's member order. Raises NotFound if the caller is not a member.

    What a client needs after a reload to show the peer's presence, "seen" and "read by N of M" before any
    live frame arrives. Cost: the membership read, one ``$in`` read of at most GROUP_MAX_MEMBERS users and
    one pipeline on each Redis (read cursors live on the bus, presence on REDIS_URL: docs/adr/0022)."""
    conversation = conversation_get_for_member(user_id=user_id, conversation_id=conversation_id)
    cid = str(conversation.id)
    members = [str(m) for m in conversation.members]
    users = {str(u.id): u for u in User.objects(id__in=[ObjectId(m) for m in members])
             .only("id", "username", "status", "last_seen")}
    cursors = {as_str(k): int(v)
               for k, v in (bus_sync().hgetall(read_cursor_key(cid)) or {}).items()}
    persisted = {str(k): int(v) for k, v in (conversation.read_cursors or {}).items()}
    present = [m for m in members if m in users]
    online = users_presence_overlay([users[m] for m in present])
    return [MemberState(user=users[m], online=online[m], read_seq=max(cursors.get(m, 0), persisted.get(m, 0)))
            for m in present]

