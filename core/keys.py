"""Every Redis key, key prefix and channel ChatStream uses, and which Redis it lives on (docs/adr/0022).

There are two Redis roles:

* **BUS**: the message bus, ``settings.STREAMS_REDIS_URL`` (``REDIS_URL`` by default), which may be a Redis
  Cluster (``STREAMS_REDIS_CLUSTER``). Clients: ``core.bus`` (``bus_sync``, ``bus_async_new``). Every key of a
  partition carries the partition's hash tag ``{pNN}`` so on a cluster the append script and the drain's
  lease scripts touch one slot (docs/adr/0002). Keys without the tag (``cs:msgmeta:*``, the dead letters, the
  rate buckets) are only used in single-key commands or non-transactional pipelines, which a cluster client
  splits by node.
* **COORD**: coordination, ``settings.REDIS_URL``, always one Redis: tickets, revocation, membership cache,
  presence, cards, the registry, rate limits, pub/sub, Django's cache, Celery. Clients: ``core.clients``
  (``sync_redis``), or the caller's own asyncio client of ``REDIS_URL``.

A key belongs here, with its Redis, its type and who writes it; modules import it from here and never
spell a ``cs:`` string themselves. ``REDIS_OF`` maps each entry's name to its Redis;
tests/cluster/test_keys.py keeps this module and the code in step.
"""

from __future__ import annotations

import os
import socket
import zlib
from typing import Literal

from django.conf import settings

BUS: Literal["bus"] = "bus"
COORD: Literal["coord"] = "coord"

# ---------------------------------------------------------------------------------------------------- BUS
# Partition keys (docs/adr/0002): a conversation lives in partition crc32(id) % PARTITIONS for ever.


def partition_of(conversation_id: str) -> int:
    """Stable across processes, machines and Python versions (``hash()`` is salted; crc32 is not)."""
    return zlib.crc32(conversation_id.encode()) % int(settings.PARTITIONS)


def tag(partition: int) -> str:
    return f"{{p{partition:02d}}}"


def stream_key(partition: int) -> str:
    """BUS. Stream: the partition's events (``core.entries``), appended by ``messaging.streams.event_append``."""
    return f"cs:{tag(partition)}:events"


def seq_key(partition: int) -> str:
    """BUS. Hash: conversation id -> last accepted seq."""
    return f"cs:{tag(partition)}:seq"


def dedup_key(partition: int, *, conversation_id: str, sender_id: str, client_msg_id: str) -> str:
    """BUS. String ``message_id:seq`` of a ``message.new`` accepted in the conversation. The conversation is part
    of the key: a ``client_msg_id`` reused in another conversation of the same partition must not be answered
    with this message (it was, when the key was ``dedup:{sender}:{client_msg_id}``).

    ``v2`` keeps these keys apart from that old format's (``cs:{pNN}:dedup:<24-hex sender>:...``; "v2" is
    not a sender id), which this code never reads: in a rolling upgrade an old key cannot answer for another
    conversation; it only expires (DEDUP_TTL_S). The cost, for one day after the upgrade: a send accepted by an
    old broker and retried on a new one (or the reverse) is accepted twice. See docs/protocol.md."""
    return f"cs:{tag(partition)}:dedup:v2:{conversation_id}:{sender_id}:{client_msg_id}"


def no_dedup_key(partition: int) -> str:
    """BUS. Stands in for KEYS[3] of an event that is not deduplicated; never read or written. A real key in the
    partition's slot, because on a Redis Cluster every key of a script must be in one slot ("" is slot 0)."""
    return f"cs:{tag(partition)}:dedup:-"


def recent_key(partition: int, conversation_id: str) -> str:
    """BUS. Sorted set: message id -> seq of the conversation's recent window (docs/adr/0028)."""
    return f"cs:{tag(partition)}:recent:{conversation_id}"


def recent_docs_key(partition: int, conversation_id: str) -> str:
    """BUS. Hash: message id -> the message as JSON (edits and deletes applied), ``floor``: every message of
    the conversation with a seq above it is in the window (those at or below it are in the store); ``dseq``, the
    seq of the conversation's last deletion or one no deletion came after; ``born``, the seq that created the
    window; ``sent`` and ``sent:<sender>``, the messages appended since (docs/adr/0059)."""
    return f"cs:{tag(partition)}:recentdoc:{conversation_id}"


def recent_unread_key(partition: int, conversation_id: str) -> str:
    """BUS. Hash: user id -> ``kind:last:cursor:count:born:sent:own``, that user's unread count as the list last
    counted or advanced it, at that last seq and cursor (api/conversation_list.py; docs/adr/0059; docs/storage.md
    "The recent window")."""
    return f"cs:{tag(partition)}:recentunread:{conversation_id}"


def recent_edits_key(partition: int, conversation_id: str) -> str:
    """BUS. Hash: message id -> the newest edit/delete (JSON with ``edit_seq``) of a message older than the
    window, for store-served pages until the drain has applied it; expires with the window."""
    return f"cs:{tag(partition)}:recentedit:{conversation_id}"


def persisted_key(partition: int) -> str:
    """BUS. Hash: conversation id -> seq up to which the drain has persisted the conversation's events (the
    window only drops messages at or below it)."""
    return f"cs:{tag(partition)}:persisted"


def bucket_tail_key(partition: int, conversation_id: str) -> str:
    """BUS. Hash: the conversation's message bucket in progress (docs/adr/0041), written by the drain only:
    ``n`` its bucket number, ``first`` "1" when it holds its range's first seq's event, and ``<seq>`` -> the
    bucket entry (BSON) of each persisted message of the range, edits applied. Inserted into
    ``message_buckets`` whole, then deleted, when the range is complete or the tail idle."""
    return f"cs:{tag(partition)}:btail:{conversation_id}"


def bucket_tails_key(partition: int) -> str:
    """BUS. Sorted set: conversation id -> when (ms) its bucket tail last changed, for the idle flush."""
    return f"cs:{tag(partition)}:btails"


def conversation_state_key(partition: int, conversation_id: str) -> str:
    """BUS. String (BSON): what the drain's guards read of the conversation's document (``type``, ``lastMessage``
    id, seq and edit_seq, ``read_cursors``) as the drain last wrote it (docs/adr/0048), written by the drain only,
    deleted while a batch of the conversation is being written; expires after ``RECENT_TTL_S`` unused."""
    return f"cs:{tag(partition)}:cstate:{conversation_id}"


def read_cursor_key(conversation_id: str) -> str:
    """BUS. Hash user id -> read seq, in the conversation's partition slot (``messaging.services.read_mark``)."""
    return f"cs:{tag(partition_of(conversation_id))}:read:{conversation_id}"


def mention_seqs_key(conversation_id: str, user_id: str) -> str:
    """BUS. Sorted set: message id -> seq of the messages of the conversation that mention the user (the newest
    ``core.mention_index.MENTION_SEQS_KEEP``). In the conversation's partition slot."""
    return f"cs:{tag(partition_of(conversation_id))}:mentions:{conversation_id}:{user_id}"


def mention_list_key(user_id: str) -> str:
    """BUS. Sorted set: ``<conversation>:<message id>:<seq>`` -> a score unique per entry
    (``core.mention_index.mention_score``) of the user's newest ``MENTION_LIST_KEEP`` mentions."""
    return f"cs:mentionlist:{user_id}"


def reactions_key(conversation_id: str, message_id: str) -> str:
    """BUS. Hash of a message's reactions (``messaging.reactions``), in its conversation's partition slot."""
    return f"cs:{tag(partition_of(conversation_id))}:rx:{message_id}"


def message_meta_key(message_id: str) -> str:
    """BUS. Hash ``{c: conversation id, u: sender id}`` (``x: "1"`` once deleted; ``e`` and ``v<seq>`` once
    edited, see ``messaging.events.edit_versions_meta``) of a message accepted recently (before it is in
    MongoDB). No hash tag: a message id alone must find it."""
    return f"cs:msgmeta:{message_id}"


# The storage pipeline (storage/): its consumer group, per-partition drain keys, dead letters, rate buckets.
GROUP = "storage"  # the one consumer group on every partition stream that persists the streams
DEADLETTERS = "cs:deadletters"  # BUS. Stream, one for every partition: staff read one place


def consumer_name() -> str:
    """This process's consumer in the ``storage`` group: host and pid, so a restarted worker is a new
    consumer and the entries its predecessor left pending are reclaimed, not silently owned."""
    return f"{socket.gethostname()}:{os.getpid()}"


def drain_lock_key(partition: int) -> str:
    """BUS. SET NX with a TTL: a drain of this partition is queued or running."""
    return f"cs:{tag(partition)}:drain:lock"


def drain_lease_key(partition: int) -> str:
    """BUS. SET NX PX with a token: a drain is reading or writing this partition right now (mutual exclusion)."""
    return f"cs:{tag(partition)}:drain:lease"


def failures_key(partition: int) -> str:
    """BUS. Hash entry id -> failed attempts, and ``<entry id>:why`` -> the last reason."""
    return f"cs:{tag(partition)}:drain:failures"


def stats_key(partition: int) -> str:
    """BUS. Hash: ``persisted`` (events written and acked, total), ``batches``, ``dead``, ``outages``,
    ``last_batch_ms`` (wall clock of the last batch)."""
    return f"cs:{tag(partition)}:drain:stats"


def maintenance_key(partition: int) -> str:
    """BUS. SET NX with a TTL: the partition's trim/forget maintenance ran recently (``storage.trigger``)."""
    return f"cs:{tag(partition)}:drain:maint"


# Persisted msgs/s is averaged over RATE_WINDOW_S in RATE_BUCKET_S buckets: a minute, like Prometheus'
# usual rate() window, in 10 s buckets so a reading is never more than 10 s stale.
RATE_BUCKET_S = 10
RATE_WINDOW_S = 60


def rate_key(bucket: int) -> str:
    """BUS. Hash partition -> events persisted in one ``RATE_BUCKET_S`` bucket (expires after the window)."""
    return f"cs:storage:rate:{bucket}"


# -------------------------------------------------------------------------------------------------- COORD
# Identity (core.tokens, core.revocation).
TICKET_PREFIX = "cs:ticket:"  # COORD. String ``<ticket>`` -> its owner (JSON), consumed with GETDEL
REVOKED_PREFIX = "cs:revoked:"  # COORD. String ``<jti>``: a revoked token, until it would have expired
REVOKED_USER_PREFIX = "cs:revoked:user:"  # COORD. String ``<user id>`` -> the user's current token generation
LOGIN_FAIL_PREFIX = "cs:login:fail:"  # COORD. Hash ``<hash of username, client>``: failed logins (api.ratelimit)

# Membership (messaging.membership): written by the write path, refilled from MongoDB on a miss.


def membership_key(conversation_id: str) -> str:
    """COORD. Set: the conversation's member ids (``-``: no such conversation)."""
    return f"cs:members:{conversation_id}"


def membership_generation_key(conversation_id: str) -> str:
    """COORD. Counter bumped by every invalidation of the conversation's cached members: a refill writes only if
    it is unchanged since before its MongoDB read (``messaging.membership``)."""
    return f"cs:membersgen:{conversation_id}"


# Conversation lists (messaging.selectors, api.conversation_list).


def user_conversations_key(user_id: str) -> str:
    """COORD. Set: ids of the conversations the user is a member of."""
    return f"cs:uconvs:{user_id}"


def user_conversations_version_key(user_id: str) -> str:
    """COORD. Counter: bumped when the user's conversation set changes (a refill writes only if unchanged)."""
    return f"cs:uconvs:v:{user_id}"


def conversation_card_key(conversation_id: str) -> str:
    """COORD. String: the conversation's card (JSON) the conversation list shows (``api.conversation_list``)."""
    return f"cs:card:conv:{conversation_id}"


def group_card_key(group_id: str) -> str:
    """COORD. String: a group's card (JSON) for the conversation list (``api.conversation_list``)."""
    return f"cs:card:group:{group_id}"


def user_card_key(user_id: str) -> str:
    """COORD. String: a user's card (JSON) for the conversation list (``api.conversation_list``)."""
    return f"cs:card:user:{user_id}"


def bucket_summary_key(bucket: str) -> str:
    """COORD. String: a stored message bucket's summary (JSON: each message's seq, sender and deleted flag) for
    the conversation list's unread counts below a window (``api.conversation_list``); dropped by the drain after
    any write to that bucket (``storage.buckets``)."""
    return f"cs:card:bucket:{bucket}"


USERNAMES_KEY = "cs:usernames"  # COORD. Hash: lower-cased username -> user id (messaging.mentions)


def search_cursor_key(user_id: str, token: str) -> str:
    """COORD. String: JSON ``{"q": [terms], "s": {conversation id: [below, bound]}}`` of an unfinished search
    (``api.finders``)."""
    return f"cs:search:{user_id}:{token}"


# Presence (messaging.presence).


def presence_key(user_id: str) -> str:
    """COORD. Sorted set: session id -> expiry (unix seconds) of the user's open connections on every broker."""
    return f"cs:presence:{user_id}"


# COORD. Sorted set: user id -> the latest expiry among the user's sessions, for every user announced online
# whose offline has not been announced yet. Its members with a score in the past are users whose last
# session expired without a disconnect (their broker was killed): the sweep announces them offline.
PRESENCE_EXPIRING_KEY = "cs:presence:expiring"
# COORD. Hash: user id -> the moment their last session expired, for users a sweep has claimed and not yet
# released (their offline is being announced); see messaging.presence.
PRESENCE_CLAIMS_KEY = "cs:presence:claims"
# COORD. Hash: user id -> "+<ms>" (online since that moment, unix milliseconds) for every user whose online the
# store does not record (a connect writes no users.status, docs/adr/0051), or "-<ms>" (offline since) for a
# user whose offline is not yet in the store; REST reads lay it over users.status/last_seen (messaging.presence).
PRESENCE_SINCE_KEY = "cs:presence:since"

# COORD. The one pub/sub channel every broker listens on for ephemeral events (typing, presence) and for
# membership changes. One channel, not one per conversation: a broker has to look at every message anyway
# to find its local receivers, and one SUBSCRIBE per process keeps Redis' pub/sub table tiny.
CONTROL_CHANNEL = "cs:rt:control"

# The gateway (gateway.userlimits): COORD. Sorted set ``<user>``: one member per open socket, scored by expiry.
GATEWAY_SOCKETS_PREFIX = "cs:gw:socks:"

# The registry (core.registry).
REGISTRY_PREFIX = "cs:registry:"  # COORD. String ``{role}:{id}`` -> the instance (JSON), with a TTL
# COORD. Sorted set ``{role}:{id}`` -> its registration's expiry (unix seconds): the readers' list of candidates
# (core.registry), so they never SCAN the keyspace. Outside REGISTRY_PREFIX: it is no instance.
REGISTRY_INDEX_KEY = "cs:registryindex"
STARTS_PREFIX = "cs:starts:"  # COORD. Counter ``{run_id}:{role}:{instance}``: starts of a slot in a run


def registry_key(role: str, instance_id: str) -> str:
    return f"{REGISTRY_PREFIX}{role}:{instance_id}"


def starts_key(run_id: str, role: str, instance: str) -> str:
    return f"{STARTS_PREFIX}{run_id}:{role}:{instance}"


# Prefixes the libraries put in front of their own keys (chatstream_site/settings), all COORD.
CACHE_PREFIX = "cs:cache"  # Django's cache (django_ratelimit's counters, the gateway's rate limiter)
CHANNELS_PREFIX = "cs:chl"  # channels-redis
CELERY_PREFIX = "cs:celery:"  # Celery's broker and result keys

# Which Redis each name above lives on. Keep it complete: a test walks this module.
REDIS_OF: dict[str, Literal["bus", "coord"]] = {
    "stream_key": BUS, "seq_key": BUS, "dedup_key": BUS, "no_dedup_key": BUS, "recent_key": BUS,
    "recent_docs_key": BUS, "recent_edits_key": BUS, "recent_unread_key": BUS, "persisted_key": BUS,
    "bucket_tail_key": BUS,
    "bucket_tails_key": BUS, "read_cursor_key": BUS, "conversation_state_key": BUS,
    "message_meta_key": BUS, "mention_seqs_key": BUS, "reactions_key": BUS, "mention_list_key": BUS, "DEADLETTERS": BUS,
    "drain_lock_key": BUS, "drain_lease_key": BUS, "failures_key": BUS, "stats_key": BUS, "maintenance_key": BUS,
    "rate_key": BUS, "TICKET_PREFIX": COORD, "REVOKED_PREFIX": COORD, "REVOKED_USER_PREFIX": COORD,
    "LOGIN_FAIL_PREFIX": COORD, "membership_key": COORD, "membership_generation_key": COORD,
    "user_conversations_key": COORD, "user_conversations_version_key": COORD, "conversation_card_key": COORD,
    "group_card_key": COORD, "user_card_key": COORD, "bucket_summary_key": COORD, "USERNAMES_KEY": COORD,
    "search_cursor_key": COORD,
    "presence_key": COORD, "PRESENCE_EXPIRING_KEY": COORD, "PRESENCE_CLAIMS_KEY": COORD, "PRESENCE_SINCE_KEY": COORD,
    "CONTROL_CHANNEL": COORD,
    "GATEWAY_SOCKETS_PREFIX": COORD, "REGISTRY_PREFIX": COORD, "REGISTRY_INDEX_KEY": COORD, "STARTS_PREFIX": COORD,
    "registry_key": COORD,
    "starts_key": COORD, "CACHE_PREFIX": COORD, "CHANNELS_PREFIX": COORD, "CELERY_PREFIX": COORD,
}
