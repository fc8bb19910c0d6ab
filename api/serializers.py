"""Request validation (strict types: a JSON value of the wrong type is a 400, never coerced, and never a dict
that could reach a query as an operator) and the documented shapes of the answers.

Views build answers with the ``*_out`` functions; the ``*Out`` serializers only describe them for the
OpenAPI schema (schemathesis checks that the two agree).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from core.errors import PayloadTooLarge
from messaging.services import text_storable_require

# ------------------------------------------------------------------ strict fields


class StrictCharField(serializers.CharField):
    """A JSON string only: numbers, booleans, lists and objects are refused (DRF would stringify numbers)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictEmailField(serializers.EmailField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only: ``"5"``, ``5.0`` and ``true`` are refused."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(super().to_internal_value(data))


class ContentField(StrictCharField):
    """Message content: a JSON string every store can hold, checked by the write path's own rule
    (``messaging.services.text_storable_require``) before DRF's validators, so REST refuses what the WebSocket
    refuses with the same error (400 ``invalid``, ``details: {field, reason, index}``)."""

    def to_internal_value(self, data: Any) -> str:
        return text_storable_require(super().to_internal_value(data), field=self.field_name or "content")


def _content_limit(value: str) -> str:
    # 413 rather than 400: the request is well-formed, just too big (the write path checks it again).
    if len(value) > settings.MESSAGE_MAX_CHARS:
        raise PayloadTooLarge(f"content is {len(value)} characters; the limit is {settings.MESSAGE_MAX_CHARS}",
                              details={"field": "content", "limit": settings.MESSAGE_MAX_CHARS})
    return value


# ------------------------------------------------------------------ requests


class RegisterIn(serializers.Serializer):
    username = StrictCharField(min_length=3, max_length=32, help_text="3-32 of A-Z a-z 0-9 _ . -")
    email = StrictEmailField(max_length=254)
    password = StrictCharField(min_length=8, max_length=128, trim_whitespace=False)


class LoginIn(serializers.Serializer):
    username = StrictCharField(max_length=64)
    password = StrictCharField(max_length=128, trim_whitespace=False)


class RefreshIn(serializers.Serializer):
    refresh = StrictCharField(max_length=4096)


class PasswordChangeIn(serializers.Serializer):
    old_password = StrictCharField(max_length=128, trim_whitespace=False)
    new_password = StrictCharField(min_length=8, max_length=128, trim_whitespace=False,
                                   help_text="checked by the same validators as at registration")


class PasswordIn(serializers.Serializer):
    password = StrictCharField(max_length=128, trim_whitespace=False, help_text="the account's current password")


class StatusIn(serializers.Serializer):
    status = StrictCharField(max_length=16, help_text="online, away, busy or offline")


class UsernameIn(serializers.Serializer):
    username = StrictCharField(max_length=64)


class UserSearchQuery(serializers.Serializer):
    username = serializers.CharField(min_length=1, max_length=64, help_text="exact name or prefix, any case")


class GroupCreateIn(serializers.Serializer):
    name = StrictCharField(max_length=100)
    members = serializers.ListField(child=StrictCharField(max_length=64), max_length=999, required=False,
                                    default=list, help_text="usernames; the creator is added as admin")


class GroupRenameIn(serializers.Serializer):
    name = StrictCharField(max_length=100)


class MessageIn(serializers.Serializer):
    content = ContentField(trim_whitespace=False, help_text="at most CHATSTREAM_MESSAGE_MAX_CHARS (413)")
    client_msg_id = StrictCharField(max_length=64, help_text="the client's id for retries: 1-64 of A-Z a-z 0-9 _.:-")
    reply_to = StrictCharField(required=False, allow_null=True, max_length=64,
                               help_text="the id of a message of this conversation this one answers (a reply): the "
                                         "message then carries its quote; 400 invalid with details.reason "
                                         "not_found or deleted otherwise")

    def validate_content(self, value: str) -> str:
        return _content_limit(value)


class MessageEditIn(serializers.Serializer):
    content = ContentField(trim_whitespace=False)

    def validate_content(self, value: str) -> str:
        return _content_limit(value)


class ReadIn(serializers.Serializer):
    seq = StrictIntegerField(min_value=0, max_value=2**53)


class HistoryQuery(serializers.Serializer):
    before_seq = serializers.IntegerField(required=False, min_value=1, max_value=2**53)
    after_seq = serializers.IntegerField(required=False, min_value=0, max_value=2**53)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=200, default=50)


class MentionsQuery(serializers.Serializer):
    before = serializers.CharField(required=False, max_length=20, help_text="an item's cursor: older mentions")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=100, default=50)


class SearchQuery(serializers.Serializer):
    # The length limit (100, code query_too_long) and the words' (8, too_many_terms) are the selector's, so
    # their errors carry their own codes; this only keeps a huge value out.
    q = serializers.CharField(max_length=2000, trim_whitespace=False,
                              help_text="words to find, all of them, whole words, case-insensitive")
    cursor = serializers.CharField(required=False, max_length=64, help_text="next_cursor of the previous page")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=50, default=20)


class ListQuery(serializers.Serializer):
    limit = serializers.IntegerField(required=False, min_value=1, max_value=500, default=100)
    offset = serializers.IntegerField(required=False, min_value=0, max_value=100_000, default=0)


# ------------------------------------------------------------------ answers (documentation of the shapes)


class RegisteredOut(serializers.Serializer):
    id = serializers.CharField()
    username = serializers.CharField()
    email = serializers.CharField()


class TokenPairOut(serializers.Serializer):
    access = serializers.CharField()
    refresh = serializers.CharField()
    token_type = serializers.CharField()
    expires_in = serializers.IntegerField(help_text="seconds the access token lives")


class TicketOut(serializers.Serializer):
    ticket = serializers.CharField()
    expires_in = serializers.IntegerField()


class UserOut(serializers.Serializer):
    id = serializers.CharField()
    username = serializers.CharField()
    status = serializers.CharField()
    last_seen = serializers.DateTimeField(allow_null=True)


class MeOut(UserOut):
    email = serializers.CharField()
    created_at = serializers.DateTimeField(allow_null=True)
    contacts = serializers.IntegerField(help_text="number of contacts")


class UserListOut(serializers.Serializer):
    results = UserOut(many=True)


class LastMessageOut(serializers.Serializer):
    id = serializers.CharField()
    seq = serializers.IntegerField()
    sender_id = serializers.CharField()
    content = serializers.CharField(allow_blank=True)
    timestamp = serializers.DateTimeField(allow_null=True)
    deleted = serializers.BooleanField()


class ConversationOut(serializers.Serializer):
    id = serializers.CharField()
    type = serializers.ChoiceField(choices=["single", "group"])
    room_id = serializers.CharField(help_text="the single chat's or the group's id")
    title = serializers.CharField(allow_blank=True, help_text="the group's name or the other member's username")
    members = serializers.ListField(child=serializers.CharField())
    peer = UserOut(allow_null=True, help_text="the other member of a 1:1 chat")
    group_id = serializers.CharField(allow_null=True)
    last_message = LastMessageOut(allow_null=True)
    last_seq = serializers.IntegerField()
    read_seq = serializers.IntegerField()
    unread = serializers.IntegerField()
    unread_capped = serializers.BooleanField(help_text="unread is a lower bound (show it as N+): the reader is "
                                             "further behind than one list counts on the default store")
    mentions = serializers.IntegerField(help_text="messages mentioning me above my read cursor (at most 100)")
    created_at = serializers.DateTimeField(allow_null=True)
    updated_at = serializers.DateTimeField(allow_null=True)


class ConversationListOut(serializers.Serializer):
    results = ConversationOut(many=True)


class SingleChatOut(serializers.Serializer):
    conversation_id = serializers.CharField()
    chat_id = serializers.CharField()
    type = serializers.CharField()
    members = serializers.ListField(child=serializers.CharField())
    created = serializers.BooleanField(help_text="false when the pair already had this chat")


class GroupOut(serializers.Serializer):
    conversation_id = serializers.CharField(allow_null=True)
    group_id = serializers.CharField()
    name = serializers.CharField()
    admins = serializers.ListField(child=serializers.CharField())
    members = serializers.ListField(child=serializers.CharField())
    added_by = serializers.DictField(child=serializers.CharField(allow_null=True),
                                     help_text="member id -> id of the admin who added them (null: the creator)")
    created_at = serializers.DateTimeField(allow_null=True)
    updated_at = serializers.DateTimeField(allow_null=True)


class ReactionIn(serializers.Serializer):
    emoji = StrictCharField(max_length=16, help_text="one of the reaction set (docs/protocol.md, Reactions); 400 "
                                                     "invalid otherwise, with details.allowed")


class QuoteOut(serializers.Serializer):
    id = serializers.CharField(help_text="the original message")
    seq = serializers.IntegerField(help_text="the original's seq (to jump to it)")
    sender_id = serializers.CharField()
    username = serializers.CharField(allow_blank=True)
    excerpt = serializers.CharField(allow_blank=True, help_text="the original's first 100 characters; never its "
                                                                "own quote")
    deleted = serializers.BooleanField(help_text="the original was deleted (excerpt is empty)")


class ReactionOut(serializers.Serializer):
    emoji = serializers.CharField()
    count = serializers.IntegerField()
    user_ids = serializers.ListField(child=serializers.CharField(), help_text="who, in the order they reacted")


class ReactionChangeOut(serializers.Serializer):
    message_id = serializers.CharField()
    conversation_id = serializers.CharField()
    emoji = serializers.CharField()
    changed = serializers.BooleanField(help_text="false: I had (add) / had not (remove) it already; no event")
    seq = serializers.IntegerField(allow_null=True, help_text="the seq of the reaction event, when changed")
    count = serializers.IntegerField()
    user_ids = serializers.ListField(child=serializers.CharField(), help_text="who has this emoji on it now")


class ReactionsOut(serializers.Serializer):
    message_id = serializers.CharField()
    conversation_id = serializers.CharField()
    results = ReactionOut(many=True, help_text="emoji in the order of the reaction set")


class ReactionSetOut(serializers.Serializer):
    emoji = serializers.ListField(child=serializers.CharField(), help_text="the emoji a message may carry, in "
                                  "display order (CHATSTREAM_REACTION_EMOJI)")
    per_message = serializers.IntegerField(help_text="distinct emoji one message may carry")
    per_user = serializers.IntegerField(help_text="emoji one user may put on one message")


class MessageOut(serializers.Serializer):
    id = serializers.CharField()
    conversation_id = serializers.CharField()
    seq = serializers.IntegerField()
    sender_id = serializers.CharField()
    content = serializers.CharField(allow_blank=True)
    timestamp = serializers.DateTimeField(allow_null=True)
    edited_at = serializers.DateTimeField(allow_null=True)
    deleted = serializers.BooleanField()
    read_status = serializers.CharField()
    client_msg_id = serializers.CharField(allow_null=True)
    reply_to = QuoteOut(allow_null=True, help_text="the quote of the message this one answers (null: not a reply)")
    reactions = ReactionOut(many=True, help_text="empty for a deleted message")
    mentions = serializers.ListField(child=serializers.CharField(),
                                     help_text="ids of the members its @usernames named when it was sent")


class HistoryOut(serializers.Serializer):
    results = MessageOut(many=True)
    has_more = serializers.BooleanField(help_text="more messages beyond this page in the direction of travel")


class SentOut(serializers.Serializer):
    id = serializers.CharField()
    conversation_id = serializers.CharField()
    seq = serializers.IntegerField()
    sender_id = serializers.CharField()
    content = serializers.CharField()
    timestamp = serializers.CharField()
    client_msg_id = serializers.CharField()
    duplicate = serializers.BooleanField(help_text="true when this client_msg_id was already accepted")
    reply_to = QuoteOut(allow_null=True, help_text="the quote the message carries (null: not a reply)")


class MessageEventOut(serializers.Serializer):
    id = serializers.CharField()
    conversation_id = serializers.CharField()
    seq = serializers.IntegerField(help_text="the seq of this edit or delete event")
    deleted = serializers.BooleanField()
    content = serializers.CharField(allow_null=True)
    edited_at = serializers.CharField(allow_null=True)


class ReadOut(serializers.Serializer):
    conversation_id = serializers.CharField()
    seq = serializers.IntegerField(help_text="the read cursor now in force")




class MemberOut(UserOut):
    online = serializers.BooleanField(help_text="a live WebSocket session on some broker right now")
    read_seq = serializers.IntegerField(help_text="the member's read cursor: messages up to this seq are read")


class MemberListOut(serializers.Serializer):
    results = MemberOut(many=True)


class MessageVersionOut(serializers.Serializer):
    seq = serializers.IntegerField(help_text="the event that made this content: the send, or an edit")
    content = serializers.CharField(allow_blank=True)
    at = serializers.DateTimeField(allow_null=True, help_text="the send's timestamp, or the edit's edited_at")


class MessageVersionsOut(serializers.Serializer):
    message_id = serializers.CharField()
    conversation_id = serializers.CharField()
    results = MessageVersionOut(many=True, help_text="oldest first; the last is the current content; empty if "
                                                     "the message was never edited")
    has_more = serializers.BooleanField(help_text="more than 100 versions: these are the newest 100, the older "
                                                  "ones are left out")


class MentionOut(serializers.Serializer):
    conversation_id = serializers.CharField()
    message_id = serializers.CharField()
    seq = serializers.IntegerField()
    sender_id = serializers.CharField()
    content = serializers.CharField(allow_blank=True, help_text="the current content (empty once deleted)")
    timestamp = serializers.DateTimeField(allow_null=True)
    deleted = serializers.BooleanField()
    cursor = serializers.CharField(help_text="pass as before= for the mentions older than this one")


class MentionListOut(serializers.Serializer):
    results = MentionOut(many=True, help_text="newest first")
    has_more = serializers.BooleanField()


class SearchHitOut(serializers.Serializer):
    conversation_id = serializers.CharField()
    message_id = serializers.CharField()
    seq = serializers.IntegerField()
    sender_id = serializers.CharField()
    content = serializers.CharField()
    timestamp = serializers.DateTimeField(allow_null=True)
    highlights = serializers.ListField(child=serializers.ListField(child=serializers.IntegerField()),
                                       help_text="[start, end) of each word found, in Unicode code points")


class SearchOut(serializers.Serializer):
    results = SearchHitOut(many=True, help_text="newest first")
    next_cursor = serializers.CharField(allow_null=True, help_text="more may follow: pass as cursor= (10 min)")
