"""The MongoDB data model (docs/storage.md): the seed's five collections, plus what the behaviour needs.

Ids are strings everywhere outside this module (``str(ObjectId)`` for users, chats and conversations; a
32-hex uuid for messages, chosen by the write path before the message reaches Redis, so the drain can
upsert by it and a redelivered stream entry changes nothing).

Only queries both MongoDB and FerretDB v1 support: no transactions, no ``$text``, simple aggregations.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

import mongoengine as me


def utcnow() -> datetime:
    return datetime.now(UTC)


class User(me.Document):
    username = me.StringField(required=True, min_length=3, max_length=32)
    # Lower-cased copy: uniqueness and lookups ignore case ("Alice" and "alice" are one user).
    username_key = me.StringField(required=True, unique=True)
    email = me.EmailField(required=True, unique=True)
    password = me.StringField(required=True)  # a Django hasher string, never the password
    contacts = me.ListField(me.ObjectIdField())
    status = me.StringField(default="offline", max_length=64)
    last_seen = me.DateTimeField()
    created_at = me.DateTimeField(default=utcnow)
    # Raised by a password change or an account removal: tokens carry the generation they were issued in,
    # and older ones are refused (docs/security.md, docs/adr/0027).
    token_gen = me.IntField(default=0)
    # Set when the account is removed (DELETE /users/me): the document stays, so messages keep a sender.
    deactivated_at = me.DateTimeField()

    meta = {"collection": "users", "indexes": ["username_key", "email"]}


class SingleChat(me.Document):
    # member1 < member2 (as strings), so one unordered pair has exactly one document.
    member1 = me.ObjectIdField(required=True)
    member2 = me.ObjectIdField(required=True)
    created_at = me.DateTimeField(default=utcnow)
    updated_at = me.DateTimeField(default=utcnow)

    meta = {
        "collection": "single_chats",
        "indexes": [{"fields": ["member1", "member2"], "unique": True}, "member2"],
    }


class GroupChat(me.Document):
    name = me.StringField(required=True, min_length=1, max_length=100)
    admins = me.ListField(me.ObjectIdField())
    members = me.ListField(me.ObjectIdField())
    # member id -> id of the admin who added them (the creator added everyone named at creation; the creator
    # has no entry). Set in the same update as the member is pushed, unset when they leave.
    added_by = me.MapField(me.ObjectIdField(), default=dict)
    created_at = me.DateTimeField(default=utcnow)
    updated_at = me.DateTimeField(default=utcnow)

    meta = {"collection": "group_chats", "indexes": ["members"]}


class LastMessage(me.EmbeddedDocument):
    id = me.StringField(required=True)
    seq = me.IntField(required=True)
    sender_id = me.StringField(required=True)
    content = me.StringField()
    timestamp = me.DateTimeField()
    deleted = me.BooleanField(default=False)
    # Seq of the last edit/delete applied to this copy (guards against an older edit landing late).
    edit_seq = me.IntField()


class Conversation(me.Document):
    type = me.StringField(required=True, choices=("single", "group"))
    room_id = me.ObjectIdField(required=True)  # -> single_chats._id or group_chats._id
    # Denormalised from the room: "my conversations" and membership checks read one index.
    members = me.ListField(me.ObjectIdField())
    last_message = me.EmbeddedDocumentField(LastMessage, db_field="lastMessage")
    last_seq = me.IntField(default=0)  # highest persisted event seq of this conversation
    # user id -> highest seq that user has read; 1:1 chats also mirror it into messages.read_status.
    read_cursors = me.MapField(me.IntField(), default=dict)
    created_at = me.DateTimeField(default=utcnow)
    updated_at = me.DateTimeField(default=utcnow)

    meta = {
        "collection": "conversations",
        "indexes": [{"fields": ["room_id"], "unique": True}, ("members", "-updated_at")],
    }


class UserConversations(me.Document):
    """Derived from ``conversations.members`` for reads (docs/adr/0043): one user's conversation ids, keyed by
    the user's id, so rebuilding their cached conversation list is one read by ``_id`` (a members query scans
    ``conversations`` on FerretDB v1). Written by every membership change (``messaging.conversation_index``);
    ``complete`` is False on a document a change created for a user who had none (its ids are only that
    change's): readers then rebuild it from ``conversations`` once. ``manage.py user_conversations_build``
    builds it for existing data."""

    id = me.ObjectIdField(primary_key=True)  # the user's id
    c = me.ListField(me.ObjectIdField())  # conversation ids, unordered
    complete = me.BooleanField(default=False)

    meta = {"collection": "user_conversations", "indexes": []}


class Message(me.Document):
    id = me.StringField(primary_key=True)  # uuid4 hex from the write path
    conversation_id = me.ObjectIdField(required=True)
    seq = me.IntField(required=True, min_value=1)
    sender_id = me.ObjectIdField(required=True)
    client_msg_id = me.StringField(max_length=64)
    content = me.StringField(required=True)
    timestamp = me.DateTimeField(required=True)
    edited_at = me.DateTimeField()
    deleted = me.BooleanField(default=False)  # tombstone: content is emptied, the seq stays
    read_status = me.StringField(default="sent", choices=("sent", "read"))  # meaningful for 1:1
    deleted_at = me.DateTimeField()
    # Seq of the last edit/delete event applied (set by the drain): a redelivered or reordered older edit
    # matches nothing, so the newest edit always wins whatever order the entries are written in.
    edit_seq = me.IntField()
    # Ids of the members the message's @usernames named when it was sent (messaging/mentions.py); absent: none.
    mentions = me.ListField(me.StringField(), default=list)
    # The quote of the message this one answers, as the send made it (messaging/replies.py, docs/adr/0037):
    # {id, seq, sender_id, username, excerpt, deleted}.
    reply_to = me.DictField(default=None)
    # [{emoji, user_ids}] (docs/adr/0037), and the seq of the last reaction event applied (the drain's guard,
    # as edit_seq is for edits).
    reactions = me.ListField(me.DictField())
    rx_seq = me.IntField()

    meta = {
        "collection": "messages",
        # (sender_id, timestamp) on MongoDB only: storage.mongo.messages_indexes_settle (docs/adr/0048).
        "indexes": [
            {"fields": ["conversation_id", "seq"], "unique": True},
        ],
    }


def message_id_new() -> str:
    """A new message's id: 32 hex digits, the milliseconds since the epoch (12 digits) then 80 random bits, so ids
    sort by creation time as UUIDv7 does. Why time-ordered (docs/adr/0048): each ``messages`` insert then lands
    at the end of the ``_id`` index instead of a random page of it; at 1M stored messages on FerretDB v1 a random
    id made every statement of the drain slower (more pages of its one SQLite file written per batch), 611
    against 796 msg/s in the drain's worst case. 80 random bits per millisecond keep ids unique without
    coordination, as uuid4's 122 did."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


class MessageVersion(me.Document):
    """One version of an edited message, insert-only (written by the drain's ``message.edited`` rule; a
    ``message.deleted`` adds a ``deleted`` marker). ``_id`` is ``"<message_id>:<seq>"``, ``seq`` the event
    that produced the content: the ``message.new`` for the original (kept by the message's first edit), the
    ``message.edited`` for each edit. So a redelivered entry inserts a duplicate ``_id`` and changes nothing."""

    id = me.StringField(primary_key=True)
    message_id = me.StringField(required=True)
    conversation_id = me.ObjectIdField(required=True)
    seq = me.IntField(required=True)
    content = me.StringField(default="")
    at = me.DateTimeField()  # when this version was written: the send's timestamp, an edit's edited_at
    deleted = me.BooleanField(default=False)  # the marker of the message's deletion: no version is served

    meta = {"collection": "message_versions", "indexes": [("message_id", "seq"), "conversation_id"]}


# Messages per bucket of ``message_buckets``, in seq space (edits and deletes take seqs too, so a bucket holds
# at most this many messages). 50 = the default history page: a page is one or two buckets, each read by
# ``_id`` equality, the one lookup FerretDB v1 serves without scanning (0.7 ms at 10k, docs/adr/0028).
BUCKET_SEQS = 50


def bucket_id(conversation_id: str, seq: int) -> str:
    """``_id`` of the bucket holding ``seq``: ``"<conversation>:<n>"`` with n = (seq - 1) // BUCKET_SEQS."""
    return f"{conversation_id}:{(seq - 1) // BUCKET_SEQS}"


class MessageBucket(me.Document):
    """Derived from ``messages`` for reads (docs/adr/0028): a conversation's messages by seq range, so a page
    of old history is one or two reads by ``_id``. ``m`` maps the seq (as a string) to the message in its
    final state (edits and deletes applied, guarded by ``edit_seq`` like ``messages``). The drain writes it
    with inserts and ``_id``-keyed updates only; ``manage.py buckets_build`` builds it for existing data.
    A bucket exists as soon as any event of its seq range was persisted (possibly with no message in it)."""

    id = me.StringField(primary_key=True)
    conversation_id = me.ObjectIdField(required=True)
    n = me.IntField(required=True)
    m = me.DictField()
    # True while the bucket may lack messages persisted before it was created (readers then use ``messages``).
    partial = me.BooleanField(default=False)

    meta = {"collection": "message_buckets", "indexes": []}
