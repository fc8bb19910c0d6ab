"""Reads of the REST API (no side effects): users, contacts, groups, conversations and message history.

Membership is checked against MongoDB's denormalised ``conversations.members`` (one indexed read); a
conversation the caller is not in looks exactly like one that does not exist (404, no existence leak).
The accepted truth of a conversation (its last seq, read cursors) is in Redis; MongoDB holds what the
storage pipeline has persisted so far, a few seconds behind at most.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId

from api.message_extras import extras_apply
from core.bus import bus_is_cluster, bus_sync
from core.clients import sync_redis
from core.documents import (
    BUCKET_SEQS,
    Conversation,
    GroupChat,
    LastMessage,
    Message,
    MessageBucket,
    MessageVersion,
    User,
)
from core.errors import NotFound
from core.keys import (
    conversation_card_key,
    group_card_key,
    membership_generation_key,
    membership_key,
    message_meta_key,
    partition_of,
    presence_key,
    read_cursor_key,
    recent_docs_key,
    recent_edits_key,
    recent_key,
    seq_key,
    user_card_key,
)
from core.values import as_str, iso_ms
from messaging.membership import _NO_MEMBERS as NO_MEMBERS
from messaging.membership import membership_refill_sync
from messaging.mentions import mention_counts_sync
from messaging.reactions import reactions_live_sync, reactions_ordered
from messaging.selectors import user_conversation_ids

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


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conversation: Conversation
    last_seq: int  # last accepted seq (Redis), at least the last persisted one
    read_seq: int  # the caller's read cursor
    unread: int  # persisted messages of others, not deleted, above the cursor
    title: str  # the group's name, or the other member's username
    peer: User | None  # the other member of a 1:1 chat
    group: GroupChat | None
    mentions: int = 0  # messages mentioning the caller above their read cursor (messaging/mentions.py)


@functools.cache
def _is_ferretdb() -> bool:
    """FerretDB names itself in buildInfo; it evaluates filters over whole collections (no index use)."""
    info = Message._get_db().command("buildInfo")
    return "ferretdbVersion" in info


def unread_counts(*, user_id: str, after: dict[ObjectId, int],
                  upto: dict[ObjectId, int] | None = None) -> dict[ObjectId, int]:
    """Per conversation, the messages of others above the given read cursor (and at or below ``upto``, where
    given: the recent window's floor) that are not deleted.

    MongoDB: one aggregation, ``$or`` of ``(conversation_id, seq > cursor)`` clauses, each served by the
    ``(conversation_id, seq)`` index. FerretDB v1 pushes none of that down and evaluates a 500-clause
    ``$or`` per document (minutes on 100k messages), so there one plain scan with ``$in`` returns
    ``(conversation_id, seq)`` pairs and the cursors are applied here.
    """
    if not after:
        return {}
    me = ObjectId(user_id)
    upto = upto or {}
    collection = Message._get_collection()
    if not _is_ferretdb():
        pipeline = [
            {"$match": {"$or": [{"conversation_id": cid, "seq": {"$gt": seq, **({"$lte": upto[cid]} if cid in upto
                                                                              else {})}}
                                for cid, seq in after.items()],
                        "sender_id": {"$ne": me}, "deleted": {"$ne": True}}},
            {"$group": {"_id": "$conversation_id", "n": {"$sum": 1}}},
        ]
        return {row["_id"]: int(row["n"]) for row in collection.aggregate(pipeline)}
    counts: dict[ObjectId, int] = {}
    rows = collection.find({"conversation_id": {"$in": list(after)}, "seq": {"$gt": min(after.values())},
                            "sender_id": {"$ne": me}, "deleted": {"$ne": True}},
                           projection={"_id": 0, "conversation_id": 1, "seq": 1})
    for row in rows:
        cid = row["conversation_id"]
        if after.get(cid, row["seq"]) < row["seq"] <= upto.get(cid, row["seq"]):
            counts[cid] = counts.get(cid, 0) + 1
    return counts


def conversation_list_for_user(*, user_id: str, limit: int = 100, offset: int = 0) -> list[ConversationSummary]:
    """The caller's conversations, most recently active first (last message or ``updated_at``, then newest
    created), each with its last message, last seq, the caller's read cursor and unread count; from Redis
    (docs/adr/0028): the user's conversation ids, each conversation's state from its recent window (one
    pipelined script per conversation), cached cards of the conversations, peers and groups. The store is read
    only for cache misses (by ``_id``) and for the unread count of a conversation whose reader is further
    behind than its window."""
    ids = user_conversation_ids(user_id=user_id)
    return _summaries_cached(ids, user_id=user_id, limit=limit, offset=offset) if ids else []


def conversation_summary_for_member(*, user_id: str, conversation_id: str) -> ConversationSummary:
    _member_require(user_id=user_id, conversation_id=conversation_id)
    found = _summaries_cached([conversation_id], user_id=user_id, limit=1, offset=0)
    if not found:
        raise NotFound("no such conversation", details={"conversation_id": conversation_id})
    return found[0]


# Cards: the few fields of a conversation, user or group the list shows, cached in Redis (REDIS_URL) as JSON and
# filled by ``_id`` (the one lookup FerretDB serves without a scan). Conversation cards are dropped by
# membership changes; a group's by its rename; a user's only expire (its status and last_seen change on every
# connect, and the list shows them within a minute; presence frames are the live view).
CONVERSATION_CARD_TTL_S = 3600
GROUP_CARD_TTL_S = 3600
USER_CARD_TTL_S = 60




def _conversation_card(conv: Conversation) -> dict[str, Any]:
    last = conv.last_message
    return {"type": conv.type, "room_id": str(conv.room_id), "members": [str(m) for m in conv.members],
            "created_at": iso_ms(conv.created_at), "updated_at": iso_ms(conv.updated_at),
            "last_seq": int(conv.last_seq or 0), "read_cursors": dict(conv.read_cursors or {}),
            "last_message": None if last is None else {
                "id": last.id, "seq": last.seq, "sender_id": last.sender_id, "content": last.content,
                "timestamp": iso_ms(last.timestamp), "deleted": bool(last.deleted)}}


def _cards(keys: list[str], ids: list[str], load: Any, ttl_s: int) -> dict[str, dict[str, Any] | None]:
    """Cards by id: one MGET, then ``load(id)`` (a store read by ``_id``, None if gone) for each miss, cached.
    Side effect: fills the cache."""
    if not ids:
        return {}
    client = sync_redis()
    out: dict[str, dict[str, Any] | None] = {}
    missing = []
    raws: Any = client.mget(keys)
    for cid, key, raw in zip(ids, keys, raws, strict=True):
        if raw is None:
            missing.append((cid, key))
        else:
            out[cid] = json.loads(raw)
    if missing:
        pipe = client.pipeline(transaction=False)
        for cid, key in missing:
            out[cid] = load(cid)
            if out[cid] is not None:
                pipe.set(key, json.dumps(out[cid]), ex=ttl_s)
        pipe.execute()
    return out


def _conversation_card_load(cid: str) -> dict[str, Any] | None:
    conv = Conversation.objects(id=ObjectId(cid)).first()
    return None if conv is None else _conversation_card(conv)


def _group_card_load(gid: str) -> dict[str, Any] | None:
    group = GroupChat.objects(id=ObjectId(gid)).only("id", "name").first()
    return None if group is None else {"name": group.name}


def _user_card_load(uid: str) -> dict[str, Any] | None:
    user = User.objects(id=ObjectId(uid)).only("id", "username", "status", "last_seen").first()
    return None if user is None else {"username": user.username, "status": user.status,
                                      "last_seen": iso_ms(user.last_seen)}


# Per conversation, for one user: KEYS seq hash, read-cursor hash, window zset, window docs; ARGV conversation
# id, user id -> {last seq, cursor, floor or false, last message JSON or false, unread in the window}. Unread
# counts the window's messages above the cursor that are others' and not deleted (a plain substring test on
# the JSON the append script wrote: ``"sender_id":"<id>"`` and ``"deleted":true``, no JSON decoding).
_CONVERSATION_STATE_LUA = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local cursor = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
local floor = redis.call('HGET', KEYS[4], 'floor')
if not floor then return {last, cursor, false, false, 0} end
local top = redis.call('ZREVRANGE', KEYS[3], 0, 0)
local lastdoc = false
if #top > 0 then lastdoc = redis.call('HGET', KEYS[4], top[1]) end
local unread = 0
if cursor < last then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. cursor, '+inf')
  if #ids > 0 then
    local mine = '"sender_id":"' .. ARGV[2] .. '"'
    for _, doc in ipairs(redis.call('HMGET', KEYS[4], unpack(ids))) do
      if doc and not string.find(doc, mine, 1, true) and not string.find(doc, '"deleted":true', 1, true) then
        unread = unread + 1
      end
    end
  end
end
return {last, cursor, floor, lastdoc, unread}
"""


def _conversation_states(ids: list[str], *, user_id: str) -> list[list[Any]]:
    bus = bus_sync()
    script = bus.register_script(_CONVERSATION_STATE_LUA)

    def keys(cid: str) -> list[str]:
        p = partition_of(cid)
        return [seq_key(p), read_cursor_key(cid), recent_key(p, cid), recent_docs_key(p, cid)]

    if bus_is_cluster(bus):  # a cluster pipeline refuses scripts: one call each
        return [script(keys=keys(cid), args=[cid, user_id]) for cid in ids]
    pipe = bus.pipeline(transaction=False)
    for cid in ids:
        script(keys=keys(cid), args=[cid, user_id], client=pipe)
    return list(pipe.execute())


def _summaries_cached(ids: list[str], *, user_id: str, limit: int, offset: int) -> list[ConversationSummary]:
    cards = _cards([conversation_card_key(c) for c in ids], ids, _conversation_card_load,
                   CONVERSATION_CARD_TTL_S)
    ids = [c for c in ids if cards.get(c) is not None]
    states = dict(zip(ids, _conversation_states(ids, user_id=user_id), strict=True))
    rows = []
    for cid in ids:
        card = cards[cid]
        assert card is not None
        last_seq, cursor, floor, lastdoc, unread = states[cid]
        last = json.loads(lastdoc) if lastdoc else None
        activity = max(x for x in (card["updated_at"], last and last["timestamp"]) if x)
        rows.append((activity, card["created_at"] or "", cid, card, int(last_seq), int(cursor),
                     None if floor is None else int(floor), last, int(unread)))
    # Newest activity first, then newest created, then id (stable paging).
    rows.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
    page = rows[offset:offset + limit]
    peer_ids = [m for r in page if r[3]["type"] == "single" for m in r[3]["members"] if m != user_id]
    group_ids = [r[3]["room_id"] for r in page if r[3]["type"] == "group"]
    peers = _cards([user_card_key(u) for u in peer_ids], peer_ids, _user_card_load, USER_CARD_TTL_S)
    groups = _cards([group_card_key(g) for g in group_ids], group_ids, _group_card_load, GROUP_CARD_TTL_S)
    # Unread beyond a window (a reader further behind than RECENT_MESSAGES, or a conversation with no window):
    # counted in the store, for those conversations only.
    behind: dict[ObjectId, int] = {}
    for _a, _c, cid, card, last_seq, cursor, floor, _last, _u in page:
        read_seq = max(cursor, int(card["read_cursors"].get(user_id, 0)))
        last_seq = max(last_seq, card["last_seq"])
        if last_seq > read_seq and (floor is None or read_seq < floor):
            behind[ObjectId(cid)] = read_seq
    floors = {cid: floor for _a, _c, cid, _card, _l, _cur, floor, _last, _u in page if floor is not None}
    stored_unread = unread_counts(user_id=user_id, after=behind, upto={
        ObjectId(cid): f for cid, f in floors.items() if ObjectId(cid) in behind}) if behind else {}
    mention_counts = mention_counts_sync(bus_sync(), user_id=user_id, read_seqs={
        cid: max(cursor, int(card["read_cursors"].get(user_id, 0)))
        for _a, _c, cid, card, _l, cursor, _f, _last, _u in page})
    out = []
    for activity, _c, cid, card, last_seq, cursor, floor, last, unread in page:
        read_seq = max(cursor, int(card["read_cursors"].get(user_id, 0)))
        if floor is not None and read_seq < floor:
            # Behind the window: the store counts (cursor, floor], the window (above the floor) the rest.
            unread = stored_unread.get(ObjectId(cid), 0) + unread
        elif floor is None:
            unread = stored_unread.get(ObjectId(cid), 0)
        last_message = last if last is not None else card["last_message"]
        conv = Conversation(id=ObjectId(cid), type=card["type"], room_id=ObjectId(card["room_id"]),
                            members=[ObjectId(m) for m in card["members"]],
                            created_at=_parse_time(card["created_at"]), updated_at=_parse_time(activity),
                            last_seq=max(last_seq, card["last_seq"]),
                            last_message=None if last_message is None else LastMessage(
                                id=last_message["id"], seq=int(last_message["seq"]),
                                sender_id=str(last_message["sender_id"]), content=last_message.get("content"),
                                timestamp=_parse_time(last_message.get("timestamp")),
                                deleted=bool(last_message.get("deleted"))))
        peer = group = None
        if card["type"] == "single":
            other = next((m for m in card["members"] if m != user_id), user_id)
            peer_card = peers.get(other)
            if peer_card is not None:
                peer = User(id=ObjectId(other), username=peer_card["username"], status=peer_card["status"],
                            last_seen=_parse_time(peer_card["last_seen"]))
            title = peer.username if peer is not None else ""
        else:
            group_card = groups.get(card["room_id"])
            if group_card is not None:
                group = GroupChat(id=ObjectId(card["room_id"]), name=group_card["name"])
            title = group.name if group is not None else ""
        out.append(ConversationSummary(conversation=conv, last_seq=conv.last_seq, read_seq=read_seq,
                                       unread=unread, title=title, peer=peer, group=group,
                                       mentions=mention_counts.get(cid, 0)))
    return out


# ------------------------------------------------------------------ history


@dataclass(frozen=True, slots=True)
class HistoryPage:
    messages: list[Message]  # ascending seq
    has_more: bool  # more messages exist beyond the page in the direction of travel


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


def _member_require(*, user_id: str, conversation_id: str) -> set[str]:
    object_id_or_404(conversation_id, what="conversation")
    members = conversation_members_cached(conversation_id=conversation_id)
    if members is None or user_id not in members:
        raise NotFound("no such conversation", details={"conversation_id": conversation_id})
    return members


def _window_message(raw: bytes | str, *, cursors: dict[str, int], members: set[str]) -> Message:
    """A message of the recent window (JSON written by the append script) as an unsaved ``Message``. Its
    ``read_status`` is derived from the read cursors of a two-member conversation (1:1), as the drain mirrors
    it into the store."""
    doc = json.loads(raw)
    seq = int(doc["seq"])
    sender = str(doc["sender_id"])
    read = len(members) == 2 and any(cursors.get(m, 0) >= seq for m in members if m != sender)
    return Message(id=doc["id"], conversation_id=ObjectId(doc["conversation_id"]), seq=seq,
                   sender_id=ObjectId(sender), client_msg_id=doc.get("client_msg_id"),
                   content=doc.get("content") or "", timestamp=_parse_time(doc["timestamp"]),
                   edited_at=_parse_time(doc.get("edited_at")), deleted=bool(doc.get("deleted")),
                   deleted_at=_parse_time(doc.get("deleted_at")), edit_seq=doc.get("edit_seq"),
                   read_status="read" if read else "sent", mentions=list(doc.get("mentions") or ()),
                   reply_to=doc.get("reply_to"), reactions=doc.get("reactions") or [])


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _edits_apply(rows: list[Message], edits: dict[str, dict[str, Any]]) -> None:
    """Apply to store-read messages the edits/deletes the append script recorded for messages older than the
    window and the drain may not have written yet (the newer edit seq wins)."""
    for m in rows:
        edit = edits.get(m.id)
        if edit is None or int(edit.get("edit_seq") or 0) <= int(m.edit_seq or 0):
            continue
        if edit.get("deleted"):
            m.deleted, m.content, m.deleted_at = True, "", _parse_time(edit.get("deleted_at"))
        elif not m.deleted:
            m.content, m.edited_at = edit.get("content") or "", _parse_time(edit.get("edited_at"))
        m.edit_seq = int(edit["edit_seq"])


# KEYS[1] recent_key, KEYS[2] recent_docs_key, KEYS[3] recent_edits_key, KEYS[4] read-cursor hash (one slot);
# ARGV[1] "1" newest first, ARGV[2] min, ARGV[3] max (ZRANGEBYSCORE syntax), ARGV[4] count
# -> {floor or false, [message JSON...], [edits field, value...], [cursor field, value...]}: one atomic read,
# so a concurrent append's eviction can never show a floor that does not match the messages read.
_WINDOW_READ_LUA = """
local floor = redis.call('HGET', KEYS[2], 'floor')
local edits = redis.call('HGETALL', KEYS[3])
local cursors = redis.call('HGETALL', KEYS[4])
if not floor then return {false, {}, edits, cursors} end
local ids
if ARGV[1] == '1' then
  ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
end
if #ids == 0 then return {floor, {}, edits, cursors} end
return {floor, redis.call('HMGET', KEYS[2], unpack(ids)), edits, cursors}
"""


# Buckets a page may read before it falls back to a ``messages`` query (a long run of seqs taken by edits and
# deletes has few messages per bucket); each read is ~1 ms by ``_id`` on FerretDB.
BUCKET_READS_MAX = 20


def _bucket_page(*, conversation_id: str, lowest: int, highest: int, limit: int, backwards: bool,
                 cursors: dict[str, int], members: set[str]) -> list[Message] | None:
    """Up to ``limit`` messages with ``lowest <= seq <= highest`` from ``message_buckets``, each bucket read by
    ``_id`` equality; None when a bucket of the range is missing (data from before the buckets, or not yet
    persisted) or the page needs too many buckets: the caller then queries ``messages``."""
    if highest < lowest:
        return []
    first, last = (lowest - 1) // BUCKET_SEQS, (highest - 1) // BUCKET_SEQS
    order = range(last, first - 1, -1) if backwards else range(first, last + 1)
    out: list[dict[str, Any]] = []
    collection = MessageBucket._get_collection()
    for reads, n in enumerate(order):
        if reads >= BUCKET_READS_MAX:
            return None
        doc = collection.find_one({"_id": f"{conversation_id}:{n}"})
        if doc is None or doc.get("partial"):
            return None
        got = sorted((m for k, m in (doc.get("m") or {}).items() if lowest <= int(k) <= highest),
                     key=lambda m: int(m["seq"]), reverse=backwards)
        out.extend(got)
        if len(out) >= limit:
            break
    return [_bucket_message(m, conversation_id=conversation_id, cursors=cursors, members=members)
            for m in out[:limit]]


def _bucket_message(m: dict[str, Any], *, conversation_id: str, cursors: dict[str, int],
                    members: set[str]) -> Message:
    seq, sender = int(m["seq"]), str(m["sender_id"])
    read = len(members) == 2 and any(cursors.get(u, 0) >= seq for u in members if u != sender)
    return Message(id=m["id"], conversation_id=ObjectId(conversation_id), seq=seq, sender_id=ObjectId(sender),
                   client_msg_id=m.get("client_msg_id"), content=m.get("content") or "",
                   timestamp=m.get("timestamp"), edited_at=m.get("edited_at"), deleted=bool(m.get("deleted")),
                   deleted_at=m.get("deleted_at"), edit_seq=m.get("edit_seq"),
                   read_status="read" if read else "sent", mentions=list(m.get("mentions") or ()),
                   reply_to=m.get("reply_to"), reactions=m.get("reactions") or [])


def _store_page(*, conversation_id: str, after: int | None, below: int | None, limit: int,
                backwards: bool, cursors: dict[str, int], members: set[str]) -> list[Message]:
    """Up to ``limit`` stored messages with ``after < seq < below`` (either bound optional), newest first
    when ``backwards``, else oldest first: from the buckets when they cover the range, else ``messages``."""
    highest = below - 1 if below is not None else int(
        bus_sync().hget(seq_key(partition_of(conversation_id)), conversation_id) or 0)
    if highest <= 0 and below is None:
        # Redis knows no seq (a conversation with no message yet, or a Redis that lost its data): the stored
        # conversation's last_seq, read by _id, bounds the buckets; 0 is an empty history, answered without
        # a ``messages`` query (a scan on FerretDB: seconds at 1M messages; docs/adr/0036).
        stored = Conversation._get_collection().find_one({"_id": ObjectId(conversation_id)}, {"last_seq": 1})
        if stored is not None and isinstance(stored.get("last_seq"), int):
            if stored["last_seq"] <= (after or 0):
                return []
            highest = stored["last_seq"]
    # highest 0 with no bound: nothing says how far the conversation goes (data stored by other means).
    from_buckets = None if highest <= 0 and below is None else _bucket_page(
        conversation_id=conversation_id, lowest=(after or 0) + 1, highest=highest, limit=limit,
        backwards=backwards, cursors=cursors, members=members)
    if from_buckets is not None:
        return from_buckets
    query: dict[str, Any] = {}
    if below is not None:
        query["seq__lt"] = below
    if after is not None:
        query["seq__gt"] = after
    base = Message.objects(conversation_id=ObjectId(conversation_id), **query)
    return list(base.order_by("-seq" if backwards else "seq").limit(limit))


def message_history_get(*, user_id: str, conversation_id: str, before_seq: int | None = None,
                        after_seq: int | None = None, limit: int = 50) -> HistoryPage:
    """A page of messages ordered by ``seq`` (ascending in the page): every acknowledged one, from the
    conversation's recent window in Redis (docs/adr/0028) above its ``floor`` and from the store at or below
    it, so the newest pages cost no document-store read and the seam has no gap and no duplicate.

    * neither bound: the newest ``limit`` messages;
    * ``before_seq``: the ``limit`` messages just below it (paging back in time);
    * ``after_seq``: the ``limit`` messages just above it (catching up, paging forward);
    * both: those strictly between, oldest first.

    Deleted messages are included as tombstones (their seq keeps the order gap-free to the client). Replies'
    quotes and reactions are brought up to date by ``api.message_extras.extras_apply`` (docs/adr/0037).
    Raises NotFound if the caller is not a member (membership from the Redis cache).
    """
    members = _member_require(user_id=user_id, conversation_id=conversation_id)
    limit = max(1, min(limit, HISTORY_MAX_LIMIT))
    backwards = after_seq is None  # newest-first read, then reversed
    partition = partition_of(conversation_id)
    raw_floor, docs, raw_edits, raw_cursors = bus_sync().register_script(_WINDOW_READ_LUA)(
        keys=[recent_key(partition, conversation_id), recent_docs_key(partition, conversation_id),
              recent_edits_key(partition, conversation_id), read_cursor_key(conversation_id)],
        args=["1" if backwards else "0", f"({after_seq}" if after_seq is not None else "-inf",
              f"({before_seq}" if before_seq is not None else "+inf", limit + 1])
    cursors = {as_str(k): int(v) for k, v in zip(raw_cursors[::2], raw_cursors[1::2], strict=True)}
    # No window (never written, or expired with the conversation idle): everything is in the store.
    floor = int(raw_floor) if raw_floor else None
    rows = [_window_message(d, cursors=cursors, members=members) for d in docs] if floor is not None else []
    window_ids = {m.id for m in rows}
    edits = {as_str(k): json.loads(v) for k, v in zip(raw_edits[::2], raw_edits[1::2], strict=True)}
    # The store serves exactly the messages at or below the floor (all of them when there is no window).
    below = before_seq if floor is None else min(floor + 1, before_seq if before_seq is not None else floor + 1)
    lowest = after_seq or 0
    if (not backwards or len(rows) <= limit) and (below is None or below > lowest + 1):
        stored = _store_page(conversation_id=conversation_id, after=after_seq, below=below,
                             limit=limit + 1 - (len(rows) if backwards else 0), backwards=backwards,
                             cursors=cursors, members=members)
        _edits_apply(stored, edits)
        # Newest first, the window's part is above the store's; oldest first, below it.
        rows = rows + stored if backwards else (stored + rows)[:limit + 1]
    has_more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
    extras_apply(rows, conversation_id=conversation_id, window_ids=window_ids, edits=edits)
    return HistoryPage(messages=rows, has_more=has_more)


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
    now = int(time.time())
    pipe = sync_redis().pipeline(transaction=False)
    present = [m for m in members if m in users]
    for member in present:
        pipe.zcount(presence_key(member), now, "+inf")
    online = [bool(n) for n in pipe.execute()] if present else []
    return [MemberState(user=users[m], online=is_online,
                        read_seq=max(cursors.get(m, 0), persisted.get(m, 0)))
            for m, is_online in zip(present, online, strict=True)]
