"""The conversation list of the REST API (no side effects but caching): a user's conversations with their
last message, unread count and the peer's or group's card, served from Redis (``cs:uconvs:{user}``, cached
cards, one script for the per-conversation state) and read from MongoDB only on a miss (docs/storage.md, "The
recent window").
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from django.conf import settings

from api.selectors import member_require, time_parse
from core.bus import bus_is_cluster, bus_sync
from core.clients import sync_redis
from core.documents import (
    BUCKET_SEQS,
    Conversation,
    GroupChat,
    Message,
    MessageBucket,
    User,
)
from core.errors import NotFound
from core.keys import (
    bucket_summary_key,
    conversation_card_key,
    group_card_key,
    partition_of,
    read_cursor_key,
    recent_docs_key,
    recent_key,
    recent_unread_key,
    seq_key,
    user_card_key,
)
from core.values import as_str, iso_ms
from messaging.mentions import mention_counts_sync
from messaging.presence import presence_shown, status_shown
from messaging.selectors import user_conversation_ids
from storage.buckets import BUCKET_SUMMARY_TTL_S, bucket_summary

# The list's rows are plain values, not mongoengine documents: building a ``Conversation``, its ``LastMessage`` and the
# peer's ``User`` per row cost ~58 % of a list of 50 in process: 7.1-7.6 ms against 3.0-3.5 now (bench/list_rows.py;
# docs/benchmarks.md "Issue 13: a list of 50, readers far behind"). Times are ISO-8601 UTC strings with milliseconds, as
# the cards and the recent window hold them and the API answers them (core.values.iso_ms).


@dataclass(frozen=True, slots=True)
class LastMessageView:
    id: str
    seq: int
    sender_id: str
    content: str | None
    timestamp: str | None
    deleted: bool


@dataclass(frozen=True, slots=True)
class PeerView:
    """The other member of a 1:1 chat, with the status every public read shows (``status_shown``)."""

    id: str
    username: str
    status: str
    last_seen: str | None


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    id: str
    type: str  # "single" or "group"
    room_id: str  # the single chat's or the group's id
    members: tuple[str, ...]
    created_at: str | None
    updated_at: str | None  # the last activity: the last message's time or the conversation's updated_at
    last_message: LastMessageView | None
    last_seq: int  # last accepted seq (Redis), at least the last persisted one
    read_seq: int  # the caller's read cursor
    unread: int  # persisted messages of others, not deleted, above the cursor
    unread_capped: bool  # ``unread`` is a lower bound (a reader further behind than a list counts on FerretDB)
    title: str  # the group's name, or the other member's username
    peer: PeerView | None  # the other member of a 1:1 chat
    mentions: int = 0  # messages mentioning the caller above their read cursor (messaging/mentions.py)


def _iso(value: Any) -> str | None:
    """A stored or cached time as the API answers it. The cards and the window already hold that form (24
    characters, ``Z``): passed through; anything else (an older writer's form) is parsed and written again."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) == 24 and value[-1] == "Z":
        return value
    return iso_ms(time_parse(value))


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


# The unread messages below a window are counted from each bucket's summary (its messages' seq, sender and
# deleted flag), cached in Redis like a card (``_cards``: a day, filled under a lease): written by the drain when it
# inserts a bucket whole, dropped by it after any later write to that stored bucket, a deletion included
# (``storage.buckets.summaries_remember`` / ``summaries_forget``). A miss (an older bucket, an expired summary) reads
# the bucket by ``_id``: 3-10 ms at 1M messages (a 50-message document of the 2 GB SQLite file).
# At most UNREAD_BUCKET_READS_MAX summaries per list (2,500 messages behind, over the page). Conversations with a
# bucket missing or partial are counted by ``unread_counts`` (a scan of ``messages`` on FerretDB: 2 s at 10k
# messages on the loaded box); so are those beyond the budget on MongoDB (its index serves the query), while on
# FerretDB they get the window's count alone, a lower bound shown as such (``unread_capped``): a list that
# scanned took longer than the gateway's 30 s at 1M messages (docs/adr/0058).
UNREAD_BUCKET_READS_MAX = 50


def _bucket_summary_load(bid: str) -> dict[str, Any] | None:
    """A stored bucket's summary (``storage.buckets.bucket_summary``) read by ``_id``; None when it is missing
    or partial (not cached: the list then queries ``messages``). Read-only."""
    doc = MessageBucket._get_collection().find_one({"_id": bid}, {"m": 1, "partial": 1})
    return None if doc is None else bucket_summary(doc)


def unread_from_buckets(*, user_id: str, behind: dict[str, tuple[int, int]],
                        bounded: bool = False) -> dict[str, tuple[int, bool]]:
    """Per conversation id of ``behind`` (``(after, upto)``: the read cursor and the highest stored seq to
    count), ``(n, exact)``: the messages of others with ``after < seq <= upto`` that are not deleted, from the
    summaries of the conversation's buckets (cached; a miss reads the bucket by ``_id``). Ranges are taken
    smallest first while they fit in UNREAD_BUCKET_READS_MAX buckets. A range that does not fit is left out of
    the answer (the store's query counts it), or with ``bounded`` answered ``(0, False)``: nothing counted below
    the window, so the caller's count is a lower bound. A range with a missing or partial bucket is left out
    either way. Side effect: fills the summaries' cache."""
    budget = UNREAD_BUCKET_READS_MAX
    plan: list[tuple[str, int, int, list[str], bool]] = []
    for cid, (after, upto) in sorted(behind.items(), key=lambda kv: kv[1][1] - kv[1][0]):
        first, last = after // BUCKET_SEQS, (upto - 1) // BUCKET_SEQS
        need = last - first + 1
        if need <= budget:
            budget -= need
            plan.append((cid, after, upto, [f"{cid}:{n}" for n in range(first, last + 1)], True))
        elif bounded:
            # Reading some of its buckets would not make the bound exact, and each is a store read on a miss.
            plan.append((cid, after, upto, [], False))
    bids = [b for *_, ids, _exact in plan for b in ids]
    summaries = _cards([bucket_summary_key(b) for b in bids], bids, _bucket_summary_load, BUCKET_SUMMARY_TTL_S)
    out: dict[str, tuple[int, bool]] = {}
    for cid, after, upto, ids, exact in plan:
        count = 0
        for bid in ids:
            summary = summaries.get(bid)
            if summary is None:
                break
            senders = summary["u"]
            count += sum(1 for seq, k, deleted in summary["m"]
                         if after < seq <= upto and senders[k] != user_id and not deleted)
        else:
            out[cid] = (count, exact)
    return out


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
    member_require(user_id=user_id, conversation_id=conversation_id)
    found = _summaries_cached([conversation_id], user_id=user_id, limit=1, offset=0)
    if not found:
        raise NotFound("no such conversation", details={"conversation_id": conversation_id})
    return found[0]


# Cards: the few fields of a conversation, user or group the list shows, cached in Redis (REDIS_URL) as JSON and
# filled by ``_id`` (the one lookup FerretDB serves without a scan; 1-2 ms+ each on a 2 GB store, so a list of
# expired cards cost more than the rest of it: docs/benchmarks.md). A card is kept until what it shows changes,
# not re-read on a short clock (docs/adr/0050): every writer of those fields drops it after its store write
# (conversation: membership changes, messaging.membership / messaging.selectors; group: its rename; user: a chosen
# status, an account removed, messaging.presence.user_cards_forget), or, for a user's offline write on their last
# disconnect, rewrites it where nothing else wrote it between (messaging.presence.user_cards_rewrite, docs/adr/0060),
# and a fill writes only under its own lease (``_cards``), so a fill that read the store before such a write cannot
# cache what it read. The TTL only lets cards of people nobody lists leave Redis: a day, so a user who opens the app
# daily finds their peers' cards.
# Budget (MEMORY USAGE on Redis 7.0, tests/api/test_cards.py): ~180 bytes per user card, ~550 per conversation
# card with a 60-character last message (up to ~2 KB more with a long one), ~100 per group card; for the
# people and conversations shown in some list in the last day.
USER_CARD_TTL_S = 86400
GROUP_CARD_TTL_S = 86400
CONVERSATION_CARD_TTL_S = 86400
# A conversation card's last message, last seq, read cursors and updated_at are what the store had when it was
# filled (the drain does not drop it): the list takes the recent window's instead while the conversation has
# one, which it has for RECENT_TTL_S after its last event, so the card must not outlive a window it was filled
# under by much (half the window's TTL); with the window off they are all the list has (an hour, as before).
CONVERSATION_CARD_TTL_WINDOW_OFF_S = 3600

# A fill's lease: long enough for a list's store reads on a loaded FerretDB, short enough that a fill that died
# holding one delays the next caching of that card by seconds only (meanwhile readers read the store).
CARD_LEASE_S = 10
_LEASE = b"~"  # a lease's value starts with it; a card is JSON (``{``)

# The fill's write: KEYS the cards' keys; ARGV[1] the fill's lease token, ARGV[2] the TTL, then each card's JSON
# ("": the store had none) -> each key still holding this fill's lease gets its card (or is freed). A key whose
# lease is gone was dropped by a writer after the fill took it (or the lease ran out): nothing is written.
_CARD_FILL_LUA = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    if ARGV[i + 2] == '' then redis.call('DEL', KEYS[i])
    else redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[2]) end
  end
end
return 0
"""


def _conversation_card_ttl_s() -> int:
    if not settings.RECENT_MESSAGES:
        return CONVERSATION_CARD_TTL_WINDOW_OFF_S
    return min(CONVERSATION_CARD_TTL_S, int(settings.RECENT_TTL_S) // 2)


def _conversation_card(conv: Conversation) -> dict[str, Any]:
    last = conv.last_message
    return {"type": conv.type, "room_id": str(conv.room_id), "members": [str(m) for m in conv.members],
            "created_at": iso_ms(conv.created_at), "updated_at": iso_ms(conv.updated_at),
            "last_seq": int(conv.last_seq or 0), "read_cursors": dict(conv.read_cursors or {}),
            "last_message": None if last is None else {
                "id": last.id, "seq": last.seq, "sender_id": last.sender_id, "content": last.content,
                "timestamp": iso_ms(last.timestamp), "deleted": bool(last.deleted)}}


def _cards(keys: list[str], ids: list[str], load: Any, ttl_s: int) -> dict[str, dict[str, Any] | None]:
    """Cards by id: one MGET; for the misses, a lease on each key (SET NX), ``load(id)`` (a store read by
    ``_id``, None if gone), then the cards written where this fill's lease still stands (one script). A key
    another fill holds is read from the store and left to that fill. Side effect: fills the cache."""
    if not ids:
        return {}
    client = sync_redis()
    out: dict[str, dict[str, Any] | None] = {}
    missing = []
    raws: Any = client.mget(keys)
    for cid, key, raw in zip(ids, keys, raws, strict=True):
        if raw is None or raw.startswith(_LEASE):
            missing.append((cid, key))
        else:
            out[cid] = json.loads(raw)
    if missing:
        token = _LEASE + uuid.uuid4().hex.encode()
        pipe = client.pipeline(transaction=False)
        for _cid, key in missing:
            pipe.set(key, token, nx=True, ex=CARD_LEASE_S)
        leased = [pair for pair, took in zip(missing, pipe.execute(), strict=True) if took]
        for cid, _key in missing:
            out[cid] = load(cid)
        if leased:
            client.eval(_CARD_FILL_LUA, len(leased), *(key for _cid, key in leased), token, ttl_s,
                        *("" if out[cid] is None else json.dumps(out[cid]) for cid, _key in leased))
    return out


# The cards of the rows just below a page (their peers and groups) are filled after the answer, on one background
# thread: a conversation that takes a message moves to the top of its members' lists, and its peer's card, never
# shown before, was then a store read by ``_id`` inside the list that most needed to be quick (1-3 ms apiece at 1M
# messages on the default store; ~2 per list of the bench's sampled users after each size's seeding, whose pages
# changed: docs/benchmarks.md, "Issue 13: a user's first list after their conversations reordered", session 13).
# PREFETCH_ROWS: one more page's worth. One prefetch at a time per process; a list that finds one running skips its
# own (the cards it wanted are the next list's to fill). The fills are ``_cards``' (leased, so never staler than a
# list's own); a failure is logged and changes nothing but the next list's misses.
PREFETCH_ROWS = 50
_prefetch_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cards-prefetch")
_prefetch_running = threading.Lock()
logger = logging.getLogger(__name__)


def _cards_prefetch(peer_ids: list[str], group_ids: list[str]) -> concurrent.futures.Future[None] | None:
    """Fill the missing cards of ``peer_ids`` and ``group_ids`` on the prefetch thread; None when one is already
    running (nothing is queued) or there is nothing to fill. Side effect (later): fills the cards' cache."""
    if not (peer_ids or group_ids) or not _prefetch_running.acquire(blocking=False):
        return None

    def fill() -> None:
        try:
            _cards([user_card_key(u) for u in peer_ids], peer_ids, _user_card_load, USER_CARD_TTL_S)
            _cards([group_card_key(g) for g in group_ids], group_ids, _group_card_load, GROUP_CARD_TTL_S)
        except Exception:
            logger.exception("prefetching %d user and %d group cards failed; the lists fill them on demand",
                             len(peer_ids), len(group_ids))
        finally:
            _prefetch_running.release()

    try:
        return _prefetch_pool.submit(fill)
    except RuntimeError:  # the pool is shut down (the process is exiting)
        _prefetch_running.release()
        return None


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


# For one user and conversations c1..cN: KEYS per conversation its seq hash, read-cursor hash, window zset, window docs
# and kept unread counts (5 each, in order); ARGV user id, the counts' TTL, then per conversation its id and the
# read cursor its card holds (the store's) -> per conversation {last seq, cursor (the higher of Redis's and the
# store's), floor or false, last message JSON or false, unread, kind}. One call for a whole list (on a Redis Cluster,
# where the conversations' keys live in other slots, one call per conversation): 50 calls in a pipeline cost more in
# redis-py's packing and the server's script calls (docs/benchmarks.md, "Issue 13: a list of 50, readers far behind").
#
# Unread is each reader's count of others' messages above their cursor that are not deleted, kept per reader as
# ``kind:last:cursor:count:born:sent:own`` (docs/adr/0058, 0059; the kind first, so a value of ADR 0058's form,
# ``last:cursor:floor:count``, never matches, nor the other way round). ``kind``: ``e`` exact, ``c`` a lower bound
# (``unread_capped``), ``w`` the part from the window up alone of a reader behind it (the caller adds the part below
# from the bucket summaries, up to the answer's third field, and keeps the total: ``_UNREAD_KEEP_LUA``; the script
# answers that value as its last field), ``n`` no window (the caller counts from the store). ``born``, ``sent`` and
# ``own`` are the window's counts at that moment (messages appended since the window was created at seq ``born``, and
# the reader's own of them: written by the append script, messaging/streams.py). A kept total is the answer while the
# last seq and cursor are unchanged; after new messages it is advanced by the counts alone, O(1) however many arrived
# (new messages less the reader's own), when the cursor is the same, the window is the same one and no deletion came
# since (``dseq``, written by the append script); a trim moves messages below the window, which changes neither the
# total nor this. A reader with no kept total who read nothing since the window was born, in a window with no deletion
# since, is counted from the counts too (every message since its birth but theirs; the part before its birth is the
# caller's). Otherwise (a read, a deletion) the window is walked (up to RECENT_MESSAGES documents: 7-10 ms for 50
# conversations at 1M messages, session 12), and a window written before ``dseq`` existed gets it (the count just made
# saw every deletion so far). Others' and not deleted is a plain substring test on the JSON the append script wrote
# (``"sender_id":"<id>"``, ``"deleted":true``), no JSON decoding.
_CONVERSATION_STATE_LUA = """
local user, ttl = ARGV[1], ARGV[2]
local mine = '"sender_id":"' .. user .. '"'
local out = {}
for i = 3, #ARGV, 2 do
  local k = (i - 3) / 2 * 5
  local seqs, cursors, zkey, dkey, ukey = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local last = tonumber(redis.call('HGET', seqs, ARGV[i]) or '0')
  local cursor = math.max(tonumber(redis.call('HGET', cursors, user) or '0'), tonumber(ARGV[i + 1]))
  local floor = tonumber(redis.call('HGET', dkey, 'floor') or '-1')
  if floor < 0 then
    out[#out + 1] = {last, cursor, false, false, 0, 'n', false}
  else
    local top = redis.call('ZREVRANGE', zkey, 0, 0)
    local lastdoc = false
    if #top > 0 then lastdoc = redis.call('HGET', dkey, top[1]) end
    local unread, kind, value = 0, 'e', false
    if cursor < last then
      local k0, l0, c0, n0, b0, s0, m0 = string.match(redis.call('HGET', ukey, user) or '',
                                                      '^(%a):(%d+):(%d+):(%d+):(%d+):(%d+):(%d+)$')
      l0, c0 = tonumber(l0), tonumber(c0)
      local kept = k0 ~= nil and k0 ~= 'w' and c0 == cursor
      if kept and l0 == last then
        unread, kind = tonumber(n0), k0
      else
        local c = redis.call('HMGET', dkey, 'born', 'sent', 'sent:' .. user, 'dseq')
        local born, sent, own = tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0
        local advanced = -1
        if kept and l0 < last and born == tonumber(b0) and tonumber(c[4] or last) <= l0 then
          advanced = tonumber(n0) + (sent - tonumber(s0)) - (own - tonumber(m0))
        end
        if advanced >= 0 then
          unread, kind = advanced, k0
        elseif born > 0 and cursor < born and tonumber(c[4]) == born - 1 then
          -- Nothing read nor deleted since the window was born: every message since is unread but the reader's
          -- own, counted by the window; a part below its birth is the caller's, as below a floor.
          unread = sent - own
          if cursor < born - 1 then kind, floor = 'w', born - 1 end
        else
          local ids = redis.call('ZRANGEBYSCORE', zkey, '(' .. math.max(cursor, floor), '+inf')
          if #ids > 0 then
            for _, doc in ipairs(redis.call('HMGET', dkey, unpack(ids))) do
              if doc and not string.find(doc, mine, 1, true) and not string.find(doc, '"deleted":true', 1, true) then
                unread = unread + 1
              end
            end
          end
          if cursor < floor then kind = 'w' end
          -- A window older than ``dseq`` (docs/adr/0059): this count saw every deletion so far.
          redis.call('HSETNX', dkey, 'dseq', last)
        end
        value = kind .. ':' .. last .. ':' .. cursor .. ':' .. unread .. ':' .. born .. ':' .. sent .. ':' .. own
        redis.call('HSET', ukey, user, value)
        redis.call('EXPIRE', ukey, ttl)
      end
    end
    if kind ~= 'w' then value = false end
    out[#out + 1] = {last, cursor, floor, lastdoc, unread, kind, value}
  end
end
return out
"""
# A total counted from the window and the summaries below it is kept where the window's part the state script kept
# (``w``) still stands: KEYS the kept-counts hashes; ARGV user id, TTL, then per key the ``w`` value and the total's.
# A change since (a send, a read, the drain dropping the conversation's counts after it wrote a deletion into a
# stored bucket: ``storage.buckets.unread_kept_forget``) replaced or removed it, and then nothing is written.
_UNREAD_KEEP_LUA = """
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], ARGV[1]) == ARGV[2 * i + 1] then
    redis.call('HSET', KEYS[i], ARGV[1], ARGV[2 * i + 2])
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
return 0
"""
# How long a conversation's kept counts live unused: a day, as the cards (a user who lists daily finds theirs).
# Budget: ~100 bytes per (conversation, user who listed it in the last day) by MEMORY USAGE on Redis 7.0
# (tests/api/test_cards.py).
RECENT_UNREAD_TTL_S = 86400


def _conversation_states(ids: list[str], *, user_id: str, card_cursors: list[int]) -> list[list[Any]]:
    bus = bus_sync()
    script = bus.register_script(_CONVERSATION_STATE_LUA)

    def keys(cid: str) -> list[str]:
        p = partition_of(cid)
        return [seq_key(p), read_cursor_key(cid), recent_key(p, cid), recent_docs_key(p, cid),
                recent_unread_key(p, cid)]

    if bus_is_cluster(bus):  # the conversations' keys live in other slots: one call each
        return [script(keys=keys(cid), args=[user_id, RECENT_UNREAD_TTL_S, cid, c])[0]
                for cid, c in zip(ids, card_cursors, strict=True)]
    if not ids:
        return []
    return list(script(keys=[k for cid in ids for k in keys(cid)],
                       args=[user_id, RECENT_UNREAD_TTL_S, *(x for pair in zip(ids, card_cursors, strict=True)
                                                              for x in pair)]))


def _unread_keep(kept: dict[str, tuple[str, str]], *, user_id: str) -> None:
    """Keep each conversation's total (``kept``: id -> (the state script's ``w`` value, the total's value)) where
    that ``w`` value still stands. One script call (one per conversation on a Redis Cluster)."""
    if not kept:
        return
    bus = bus_sync()
    script = bus.register_script(_UNREAD_KEEP_LUA)
    keys = {cid: recent_unread_key(partition_of(cid), cid) for cid in kept}
    if bus_is_cluster(bus):
        for cid, (was, now) in kept.items():
            script(keys=[keys[cid]], args=[user_id, RECENT_UNREAD_TTL_S, was, now])
        return
    script(keys=list(keys.values()), args=[user_id, RECENT_UNREAD_TTL_S, *(x for pair in kept.values() for x in pair)])


def _summaries_cached(ids: list[str], *, user_id: str, limit: int, offset: int) -> list[ConversationSummary]:
    cards = _cards([conversation_card_key(c) for c in ids], ids, _conversation_card_load,
                   _conversation_card_ttl_s())
    # A card that does not name the caller (a change that died before updating their cached ids, docs/adr/0043)
    # is not listed: every read by a stranger is a 404, and this is one.
    ids = [c for c in ids if (card := cards.get(c)) is not None and user_id in card["members"]]
    states = dict(zip(ids, _conversation_states(ids, user_id=user_id, card_cursors=[
        int(cards[c]["read_cursors"].get(user_id, 0)) for c in ids]), strict=True))  # type: ignore[index]
    rows = []
    for cid in ids:
        card = cards[cid]
        assert card is not None
        last_seq, cursor, floor, lastdoc, unread, kind, was = states[cid]
        last = json.loads(lastdoc) if lastdoc else None
        activity = max(x for x in (card["updated_at"], last and last["timestamp"]) if x)
        rows.append((activity, card["created_at"] or "", cid, card, int(last_seq), int(cursor),
                     None if floor is None else int(floor), last, int(unread), as_str(kind), was))
    # Newest activity first, then newest created, then id (stable paging).
    rows.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
    page = rows[offset:offset + limit]
    peer_ids = [m for r in page if r[3]["type"] == "single" for m in r[3]["members"] if m != user_id]
    group_ids = [r[3]["room_id"] for r in page if r[3]["type"] == "group"]
    peers = _cards([user_card_key(u) for u in peer_ids], peer_ids, _user_card_load, USER_CARD_TTL_S)
    # A card is the store's status (the last offline or chosen one); Redis presence is laid over it (ADR 0051).
    said = presence_shown(sync_redis(), user_ids=peer_ids)
    groups = _cards([group_card_key(g) for g in group_ids], group_ids, _group_card_load, GROUP_CARD_TTL_S)
    below = rows[offset + limit:offset + limit + PREFETCH_ROWS]
    _cards_prefetch([m for r in below if r[3]["type"] == "single" for m in r[3]["members"] if m != user_id],
                    [r[3]["room_id"] for r in below if r[3]["type"] == "group"])
    # Unread below a window (a reader further behind than RECENT_MESSAGES whose total is not kept: ``w``) or of a
    # conversation with no window (``n``): counted in the store, for those conversations only: from the bucket
    # summaries, else the store's query.
    behind: dict[str, tuple[int, int]] = {}
    for _a, _c, cid, card, last_seq, cursor, floor, _last, _u, kind, _was in page:
        if kind == "w":
            assert floor is not None
            behind[cid] = (cursor, floor)
        elif kind == "n" and max(last_seq, card["last_seq"]) > cursor:
            behind[cid] = (cursor, max(last_seq, card["last_seq"]))
    # On FerretDB the store's query scans ``messages`` (seconds at 1M): a reader further behind than the
    # summaries a list may read gets a lower bound instead (``unread_capped``); MongoDB counts it from its index.
    from_buckets = unread_from_buckets(user_id=user_id, behind=behind, bounded=_is_ferretdb())
    stored_unread = {cid: n for cid, (n, _exact) in from_buckets.items()}
    capped = {cid for cid, (_n, exact) in from_buckets.items() if not exact}
    rest = {cid: bounds for cid, bounds in behind.items() if cid not in stored_unread}
    stored_unread.update({str(cid): n for cid, n in unread_counts(
        user_id=user_id, after={ObjectId(cid): after for cid, (after, _upto) in rest.items()},
        upto={ObjectId(cid): upto for cid, (_after, upto) in rest.items() if states[cid][2] is not None}).items()}
        if rest else {})
    mention_counts = mention_counts_sync(bus_sync(), user_id=user_id, read_seqs={
        cid: cursor for _a, _c, cid, _card, _l, cursor, _f, _last, _u, _k, _was in page})
    out = []
    keep: dict[str, tuple[str, str]] = {}
    for activity, _c, cid, card, last_seq, read_seq, _floor, last, unread, kind, was in page:
        if kind == "w":
            # Behind the window: the store counts (cursor, floor], the window (above the floor) the rest; the
            # total is kept for the next lists (advanced by new messages alone), with the window's counts.
            total = stored_unread.get(cid, 0) + unread
            counts = as_str(was).split(":")[4:]
            keep[cid] = (as_str(was), ":".join(["c" if cid in capped else "e", str(last_seq), str(read_seq), str(total),
                                                *counts]))
            unread = total
        elif kind == "n":
            unread = stored_unread.get(cid, 0)
        elif kind == "c":
            capped.add(cid)
        shown = last if last is not None else card["last_message"]
        last_message = None if shown is None else LastMessageView(
            id=shown["id"], seq=int(shown["seq"]), sender_id=str(shown["sender_id"]), content=shown.get("content"),
            timestamp=_iso(shown.get("timestamp")), deleted=bool(shown.get("deleted")))
        peer = None
        if card["type"] == "single":
            other = next((m for m in card["members"] if m != user_id), user_id)
            peer_card = peers.get(other)
            if peer_card is not None:
                live, since, gone = said[other]
                status, last_seen = status_shown(status=peer_card["status"] or "offline",
                                                 last_seen=time_parse(peer_card["last_seen"]), live=live,
                                                 since=since, gone=gone)
                peer = PeerView(id=other, username=peer_card["username"], status=status, last_seen=iso_ms(last_seen))
            title = peer.username if peer is not None else ""
        else:
            group_card = groups.get(card["room_id"])
            title = group_card["name"] if group_card is not None else ""
        top_seq = max(last_seq, card["last_seq"])
        out.append(ConversationSummary(
            id=cid, type=card["type"], room_id=card["room_id"], members=tuple(card["members"]),
            created_at=_iso(card["created_at"]), updated_at=_iso(activity), last_message=last_message,
            last_seq=top_seq, read_seq=read_seq, unread=unread, unread_capped=cid in capped, title=title,
            peer=peer, mentions=mention_counts.get(cid, 0)))
    _unread_keep(keep, user_id=user_id)
    return out
