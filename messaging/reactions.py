"""Reactions: add or remove an emoji on a message, one per user per emoji (docs/adr/0037).

Each change that changes something is one ``reaction.added`` / ``reaction.removed`` event in the message's
conversation stream with its own seq (live on every broker, replayed by ``resume``, persisted by the drain's
rule in ``storage.rules.EVENT_RULES``). Adding a reaction the user already has, or removing one they do
not have, changes nothing and appends nothing: the answer says ``changed: false`` (idempotent).

State: a hash per reacted message on the bus, in the conversation's partition slot (``core.keys.reactions_key``):

``_``             ``"1"``: the hash is loaded (a message with no reaction still has it)
``l:<emoji>``     JSON list of the user ids with that emoji, in the order they reacted
``u:<user>``      how many emoji that user has on the message
``n``             how many emoji the message has

One script (``_REACT_LUA``) decides the change against it, checks the limits, takes the seq, appends the
event (with the emoji's ``user_ids`` after the change in its payload) and rewrites the message in the
recent window, atomically. The hash lives ``RESUME_WINDOW_S`` + 1 h after its last change (by then the drain
has persisted its events); when it is missing it is loaded first (``_FILL_LUA``, only if still missing) from
the recent window's copy of the message, else from MongoDB (``messages.reactions``, by ``_id``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings

from core.bus import BusAsync
from core.errors import Conflict, NotFound, ValidationFailed
from core.keys import partition_of, reactions_key, recent_docs_key, seq_key, stream_key
from messaging import events
from messaging.membership import membership_require
from messaging.services import drain_nudge, message_owner
from messaging.streams import bus_resolve

# The emoji set and the limits are settings (CHATSTREAM_REACTION_EMOJI, CHATSTREAM_REACTIONS_PER_MESSAGE,
# CHATSTREAM_REACTIONS_PER_USER in chatstream_site/settings; why these defaults: there), read at each call.


def reaction_emoji() -> tuple[str, ...]:
    """The emoji a message may carry, in display order (settings.REACTION_EMOJI)."""
    return tuple(settings.REACTION_EMOJI)


_OPS = {"add": "reaction.added", "remove": "reaction.removed"}


def _state_ttl_s() -> int:
    # As long as a resume may replay the events, plus an hour for the drain to have persisted them.
    return int(settings.RESUME_WINDOW_S) + 3600


def emoji_require(value: Any) -> str:
    """``value`` if it is one of ``reaction_emoji()``; else ValidationFailed (code ``invalid``, details
    ``{field: "emoji", allowed}``). Pure."""
    if not isinstance(value, str) or value not in reaction_emoji():
        raise ValidationFailed("emoji must be one of the reaction set", details={"field": "emoji",
                                                                                 "allowed": list(reaction_emoji())})
    return value


# A recent-window message's reactions, as every reader sees them: [{emoji, user_ids}] in first-use order.
# KEYS[1] recent_docs_key, ARGV mid, emoji, user_ids JSON ('[]': none left)
_WINDOW_LUA = """
local function window_react(dkey, mid, emoji, ids_json)
  local cur = redis.call('HGET', dkey, mid)
  if not cur then return end
  local ok, doc = pcall(cjson.decode, cur)
  if not ok or type(doc) ~= 'table' then return end
  local list = doc['reactions']
  if type(list) ~= 'table' then list = {} end
  local ids = cjson.decode(ids_json)
  local at = nil
  for i, r in ipairs(list) do
    if r['emoji'] == emoji then at = i end
  end
  if #ids == 0 then
    if at then table.remove(list, at) end
  elseif at then
    list[at]['user_ids'] = ids
  else
    table.insert(list, {emoji = emoji, user_ids = ids})
  end
  -- cjson writes an empty table as {}: an empty list is left out instead.
  if #list == 0 then doc['reactions'] = nil else doc['reactions'] = list end
  redis.call('HSET', dkey, mid, cjson.encode(doc))
end
"""

# KEYS[1] state hash, KEYS[2] stream, KEYS[3] seq hash, KEYS[4] recent_docs_key
# ARGV[1] "add"|"remove", ARGV[2] emoji, ARGV[3] user, ARGV[4] conversation, ARGV[5] event type,
# ARGV[6], ARGV[7] the payload's JSON before and after its user_ids (events.BuiltEvent.json_around),
# ARGV[8] per-message limit, ARGV[9] per-user limit, ARGV[10] state TTL, ARGV[11] message id
# -> {status, seq, user_ids JSON}: status 1 appended, 0 nothing to change, -1 state not loaded,
#    -2 the message has CHATSTREAM_REACTIONS_PER_MESSAGE emoji, -3 the user has CHATSTREAM_REACTIONS_PER_USER on it
_REACT_LUA = _WINDOW_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, ''} end
local lkey, ukey = 'l:' .. ARGV[2], 'u:' .. ARGV[3]
local raw = redis.call('HGET', KEYS[1], lkey)
local ids = {}
if raw then ids = cjson.decode(raw) end
local at = nil
for i, u in ipairs(ids) do
  if u == ARGV[3] then at = i end
end
if ARGV[1] == 'add' then
  if at then return {0, 0, raw} end
  if not raw and tonumber(redis.call('HGET', KEYS[1], 'n') or '0') >= tonumber(ARGV[8]) then return {-2, 0, ''} end
  if tonumber(redis.call('HGET', KEYS[1], ukey) or '0') >= tonumber(ARGV[9]) then return {-3, 0, ''} end
  table.insert(ids, ARGV[3])
  redis.call('HINCRBY', KEYS[1], ukey, 1)
  if not raw then redis.call('HINCRBY', KEYS[1], 'n', 1) end
else
  if not at then return {0, 0, raw or '[]'} end
  table.remove(ids, at)
  if redis.call('HINCRBY', KEYS[1], ukey, -1) <= 0 then redis.call('HDEL', KEYS[1], ukey) end
end
local enc = '[]'
if #ids > 0 then
  enc = cjson.encode(ids)
  redis.call('HSET', KEYS[1], lkey, enc)
else
  redis.call('HDEL', KEYS[1], lkey)
  redis.call('HINCRBY', KEYS[1], 'n', -1)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[10]))
local seq = redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('XADD', KEYS[2], '*', 't', ARGV[5], 'c', ARGV[4], 's', tostring(seq), 'd', ARGV[6] .. enc .. ARGV[7],
           'v', '1')
window_react(KEYS[4], ARGV[11], ARGV[2], enc)
return {1, seq, enc}
"""

# Load a message's state if it is still missing (two loads racing: the first wins, the second is a no-op).
# KEYS[1] state hash, KEYS[2] recent_docs_key; ARGV[1] message id, ARGV[2] TTL, ARGV[3] the stored
# reactions as JSON [{emoji, user_ids}], or "" to take them from the recent window only
# -> 1 loaded (or loaded already), 0 the window does not hold the message and ARGV[3] was ""
_FILL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
local src = ARGV[3]
local doc = redis.call('HGET', KEYS[2], ARGV[1])
if doc then
  local ok, d = pcall(cjson.decode, doc)
  if ok and type(d) == 'table' and type(d['reactions']) == 'table' then src = cjson.encode(d['reactions'])
  elseif ok then src = '[]' end
end
if src == '' then return 0 end
local list = cjson.decode(src)
local users = {}
local n = 0
redis.call('HSET', KEYS[1], '_', '1')
for _, r in ipairs(list) do
  if type(r) == 'table' and type(r['user_ids']) == 'table' and #r['user_ids'] > 0 then
    n = n + 1
    redis.call('HSET', KEYS[1], 'l:' .. r['emoji'], cjson.encode(r['user_ids']))
    for _, u in ipairs(r['user_ids']) do users[u] = (users[u] or 0) + 1 end
  end
end
for u, c in pairs(users) do redis.call('HSET', KEYS[1], 'u:' .. u, c) end
redis.call('HSET', KEYS[1], 'n', n)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


@dataclass(frozen=True, slots=True)
class ReactionChange:
    """The answer to a reaction change (the ``ack``)."""

    message_id: str
    conversation_id: str
    emoji: str
    changed: bool  # False: the user had (add) / had not (remove) that reaction already; nothing appended
    seq: int | None  # the event's seq when changed
    user_ids: list[str]  # who has that emoji on the message now


def _stored_reactions(message_id: str) -> list[dict[str, Any]]:
    """The persisted ``reactions`` of a message ([] if none, or not persisted yet). Blocking; by ``_id``."""
    from core.documents import Message

    row = Message.objects(id=message_id).only("reactions").as_pymongo().first()
    return list((row or {}).get("reactions") or [])


async def _state_load(bus: BusAsync, *, conversation_id: str, message_id: str) -> None:
    keys = [reactions_key(conversation_id, message_id),
            recent_docs_key(partition_of(conversation_id), conversation_id)]
    fill = bus.register_script(_FILL_LUA)
    if int(await fill(keys=keys, args=[message_id, _state_ttl_s(), ""])):
        return
    stored = await sync_to_async(_stored_reactions, thread_sensitive=False)(message_id)
    await fill(keys=keys, args=[message_id, _state_ttl_s(), json.dumps(stored, separators=(",", ":"))])


async def reaction_change(client: redis.asyncio.Redis, *, user_id: str, message_id: Any, emoji: Any, op: str,
                          bus: BusAsync | None = None) -> ReactionChange:
    """Add (``op`` "add") or remove (``op`` "remove") the user's ``emoji`` on a message of a conversation they
    are in. Raises ValidationFailed (not a message id; an emoji outside ``reaction_emoji()``), NotFound (no such
    message, a deleted one, or one of a conversation the user is not in), Conflict with code
    ``reaction_limit`` (details ``{scope: "message"|"user", limit}``). Side effects, when something changes:
    the state hash, the seq, one ``reaction.added``/``reaction.removed`` entry, the recent window's copy of the
    message (one script); on a first change of an old message, a MongoDB read by ``_id`` to load its state."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}")
    emoji = emoji_require(emoji)
    bus = bus_resolve(client, bus)
    conversation_id, _sender = await message_owner(bus, message_id=message_id)
    try:
        await membership_require(client, user_id=user_id, conversation_id=conversation_id)
    except NotFound:  # a stranger learns nothing, not even the message's conversation
        raise NotFound("no such message", details={"message_id": message_id}) from None
    built = events.event_build(type=_OPS[op], conversation_id=conversation_id, actor_id=user_id,  # type: ignore[arg-type]
                               message_id=message_id, emoji=emoji)
    head, tail = built.json_around("user_ids")
    partition = partition_of(conversation_id)
    keys = [reactions_key(conversation_id, message_id), stream_key(partition), seq_key(partition),
            recent_docs_key(partition, conversation_id)]
    per_message, per_user = int(settings.REACTIONS_PER_MESSAGE), int(settings.REACTIONS_PER_USER)
    args = [op, emoji, user_id, conversation_id, built.type, head, tail, per_message, per_user, _state_ttl_s(),
            message_id]
    script = bus.register_script(_REACT_LUA)
    for _ in range(3):  # a load and a retry; a state expiring in between (a day of silence) takes one more
        status, seq, ids = await script(keys=keys, args=args)
        if int(status) != -1:
            break
        await _state_load(bus, conversation_id=conversation_id, message_id=message_id)
    status = int(status)
    if status == -2:
        raise Conflict(f"a message carries at most {per_message} different emoji",
                       code="reaction_limit", details={"scope": "message", "limit": per_message})
    if status == -3:
        raise Conflict(f"one user puts at most {per_user} emoji on a message",
                       code="reaction_limit", details={"scope": "user", "limit": per_user})
    if status == -1:
        raise RuntimeError(f"reaction state of message {message_id} would not load")
    user_ids = json.loads(ids) if ids else []
    if status == 1:
        drain_nudge(bus, partition=partition)
    return ReactionChange(message_id=message_id, conversation_id=conversation_id, emoji=emoji, changed=status == 1,
                          seq=int(seq) if status == 1 else None,
                          user_ids=[str(u) for u in user_ids] if isinstance(user_ids, list) else [])


def reactions_live_sync(bus: Any, *, conversation_id: str, message_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The reactions of those of ``message_ids`` whose state hash is in Redis (changed within about a day),
    message id -> :func:`state_reactions`; messages without a hash are left out (their stored copy is
    current). ``bus`` is a sync bus client (``messaging.bus.bus_sync``). One pipelined round trip. Read-only."""
    if not message_ids:
        return {}
    pipe = bus.pipeline(transaction=False)
    for mid in message_ids:
        pipe.hgetall(reactions_key(conversation_id, mid))
    replies = pipe.execute()
    return {mid: state_reactions(raw) for mid, raw in zip(message_ids, replies, strict=True) if raw}


def reactions_ordered(reactions: Any) -> list[dict[str, Any]]:
    """Stored or window reactions ([{emoji, user_ids}], any order) as every answer shows them: emoji in
    ``reaction_emoji()`` order, each with ``count``, empty ones left out. Pure."""
    by_emoji: dict[str, list[Any]] = {}
    for r in reactions or []:
        if isinstance(r, dict) and isinstance(r.get("user_ids"), list) and r["user_ids"]:
            by_emoji[str(r.get("emoji"))] = r["user_ids"]
    return [{"emoji": e, "count": len(by_emoji[e]), "user_ids": [str(u) for u in by_emoji[e]]}
            for e in reaction_emoji() if e in by_emoji]


def state_reactions(raw: dict[Any, Any]) -> list[dict[str, Any]]:
    """[{emoji, user_ids}] of a state hash as HGETALL answers it, emoji in ``reaction_emoji()`` order. Pure."""
    lists = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        if name.startswith("l:"):
            lists[name[2:]] = json.loads(v)
    return [{"emoji": e, "user_ids": [str(u) for u in lists[e]]} for e in reaction_emoji() if lists.get(e)]
