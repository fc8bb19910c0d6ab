"""REST API v1 views (docs/interface.md): thin. Each one validates with a serializer, calls one service (writes)
or selector (reads), and renders the result; errors are raised and translated by ``api.exceptions``.
Over 400 lines because it is the list of the API's endpoint views, one short class each with its schema
annotation, in the order of docs/api.md: one place to read the whole HTTP surface.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api import accounts, conversation_list, finders, history, mention_list, selectors, services
from api import serializers as s
from api.auth import request_user
from api.ratelimit import (
    client_ip,
    login_backoff_check,
    login_failure_record,
    login_success_record,
    rate_limit,
)
from core.documents import Conversation, GroupChat, User
from core.errors import Forbidden, NotFound, Unauthenticated, ValidationFailed
from core.tokens import Claims
from core.values import iso_ms as iso
from messaging.reactions import ReactionChange, reactions_ordered
from messaging.services import MESSAGE_ID_RE, Accepted


def _valid(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


# ``format`` picks a renderer (``?format=api`` is the browsable API); any other unknown query parameter is a
# client mistake worth hearing about (a misspelt ``befor_seq`` would otherwise silently page from the end).
_RENDERER_PARAMS = frozenset({"format"})


def _valid_query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    unknown = sorted(set(request.query_params) - set(serializer_class().fields) - _RENDERER_PARAMS)
    if unknown:
        raise ValidationFailed(f"unknown query parameter: {unknown[0][:64]}",
                               details={"unknown": [u[:64] for u in unknown[:10]]})
    return _valid(serializer_class, request.query_params)


# ------------------------------------------------------------------ renderers of answers


def user_out(user: User) -> dict[str, Any]:
    return {"id": str(user.id), "username": user.username, "status": user.status or "offline",
            "last_seen": iso(user.last_seen)}


def _shown(user: User) -> User:
    """The user with the status Redis presence says (docs/adr/0051), for a renderer."""
    return selectors.users_presence_applied([user])[0]


def me_out(user: User) -> dict[str, Any]:
    return {**user_out(user), "email": user.email, "created_at": iso(user.created_at),
            "contacts": len(user.contacts or [])}


def group_out(group: GroupChat, conversation_id: str | None) -> dict[str, Any]:
    return {"conversation_id": conversation_id, "group_id": str(group.id), "name": group.name,
            "admins": [str(a) for a in group.admins], "members": [str(m) for m in group.members],
            "added_by": _added_by_out(group),
            "created_at": iso(group.created_at), "updated_at": iso(group.updated_at)}


def _added_by_out(group: GroupChat) -> dict[str, str | None]:
    added_by = group.added_by or {}
    return {str(m): (str(added_by[str(m)]) if added_by.get(str(m)) else None) for m in group.members}


def conversation_out(summary: conversation_list.ConversationSummary) -> dict[str, Any]:
    last, peer = summary.last_message, summary.peer
    return {
        "id": summary.id, "type": summary.type, "room_id": summary.room_id, "title": summary.title,
        "members": list(summary.members),
        "peer": None if peer is None else {"id": peer.id, "username": peer.username, "status": peer.status,
                                           "last_seen": peer.last_seen},
        "group_id": summary.room_id if summary.type == "group" else None,
        "last_message": None if last is None else {
            "id": last.id, "seq": last.seq, "sender_id": last.sender_id,
            "content": "" if last.deleted else (last.content or ""), "timestamp": last.timestamp,
            "deleted": last.deleted},
        "last_seq": summary.last_seq, "read_seq": summary.read_seq, "unread": summary.unread,
        "unread_capped": summary.unread_capped, "mentions": summary.mentions, "created_at": summary.created_at,
        "updated_at": summary.updated_at,
    }


def message_out(message: history.PageMessage) -> dict[str, Any]:
    return {
        "id": message.id, "conversation_id": str(message.conversation_id), "seq": message.seq,
        "sender_id": str(message.sender_id), "content": "" if message.deleted else message.content,
        "timestamp": iso(message.timestamp), "edited_at": iso(message.edited_at), "deleted": bool(message.deleted),
        "read_status": message.read_status or "sent", "client_msg_id": message.client_msg_id,
        "reply_to": message.reply_to or None,
        "reactions": [] if message.deleted else reactions_ordered(message.reactions),
        "mentions": list(message.mentions or ()),
    }


def event_out(accepted: Accepted, *, deleted: bool) -> dict[str, Any]:
    return {"id": accepted.message_id, "conversation_id": accepted.conversation_id, "seq": accepted.seq,
            "deleted": deleted, "content": accepted.event.get("content") if not deleted else None,
            "edited_at": accepted.event.get("edited_at")}


def _message_id_or_404(message_id: str) -> str:
    if not MESSAGE_ID_RE.match(message_id):
        raise NotFound("no such message", details={"message_id": message_id[:64]})
    return message_id


# ------------------------------------------------------------------ auth


class RegisterView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(request=s.RegisterIn, responses={201: s.RegisteredOut}, tags=["auth"],
                   summary="Create an account (rate-limited per IP and per username)")
    def post(self, request: Request) -> Response:
        rate_limit(request, group="register.ip", value=client_ip(request), rate=settings.API_RATE_REGISTER_IP)
        data = _valid(s.RegisterIn, request.data)
        rate_limit(request, group="register.user", value=data["username"].lower(),
                   rate=settings.API_RATE_REGISTER_USER)
        user = accounts.user_create(username=data["username"], email=data["email"], password=data["password"])
        return Response({"id": str(user.id), "username": user.username, "email": user.email}, status=201)


class LoginView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(request=s.LoginIn, responses={200: s.TokenPairOut}, tags=["auth"],
                   summary="Exchange username and password for an access/refresh pair (rate-limited)")
    def post(self, request: Request) -> Response:
        rate_limit(request, group="login.ip", value=client_ip(request), rate=settings.API_RATE_LOGIN_IP)
        data = _valid(s.LoginIn, request.data)
        # Throttled per (username, client) on failed passwords only: a per-username count of attempts would
        # let anyone lock the owner out by guessing wrong (docs/security.md).
        client = client_ip(request)
        login_backoff_check(username=data["username"], client=client)
        try:
            pair = accounts.auth_login(username=data["username"], password=data["password"])
        except Unauthenticated:
            login_failure_record(username=data["username"], client=client)
            raise
        login_success_record(username=data["username"], client=client)
        return Response(_pair_out(pair), headers=NO_STORE)


# Responses that carry tokens or tickets: no cache (the browser's, a proxy's) may keep them (RFC 6749 5.1).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _pair_out(pair: accounts.TokenPair) -> dict[str, Any]:
    return {"access": pair.access, "refresh": pair.refresh, "token_type": pair.token_type,
            "expires_in": pair.expires_in}


class RefreshView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(request=s.RefreshIn, responses={200: s.TokenPairOut}, tags=["auth"],
                   summary="Rotate: the refresh token is spent and a new pair is issued")
    def post(self, request: Request) -> Response:
        data = _valid(s.RefreshIn, request.data)
        return Response(_pair_out(accounts.auth_refresh(refresh=data["refresh"])), headers=NO_STORE)


class LogoutView(APIView):
    permission_classes = [AllowAny]

    @extend_schema(request=s.RefreshIn, responses={204: None}, tags=["auth"],
                   summary="Revoke the refresh token (and the access token of the request, if any)")
    def post(self, request: Request) -> Response:
        data = _valid(s.RefreshIn, request.data)
        access = request.auth if isinstance(request.auth, Claims) else None
        accounts.auth_logout(refresh=data["refresh"], access=access)
        return Response(status=204)


class WsTicketView(APIView):
    @extend_schema(request=None, responses={200: s.TicketOut}, tags=["auth"],
                   summary="A single-use WebSocket ticket (valid for at most 30 s)")
    def post(self, request: Request) -> Response:
        user = request_user(request)
        gen = request.auth.gen if isinstance(request.auth, Claims) else 0
        ticket, expires_in = accounts.ws_ticket_create(user_id=user.id, username=user.username, gen=gen)
        return Response({"ticket": ticket, "expires_in": expires_in}, headers=NO_STORE)


def _password_guarded(request: Request, *, username: str, check: Any) -> Any:
    """Run ``check`` (a service that verifies the caller's password) under the login back-off of
    (username, client): a stolen access token must not become a way around it to guess the password."""
    client = client_ip(request)
    login_backoff_check(username=username, client=client)
    try:
        result = check()
    except Forbidden as exc:
        if exc.code == "wrong_password":
            login_failure_record(username=username, client=client)
        raise
    login_success_record(username=username, client=client)
    return result


class PasswordView(APIView):
    @extend_schema(request=s.PasswordChangeIn, responses={200: s.TokenPairOut}, tags=["auth"],
                   summary="Change my password: every session ends (sockets close with 4010, all refresh "
                           "tokens refused); a fresh pair for this device")
    def post(self, request: Request) -> Response:
        user = request_user(request)
        data = _valid(s.PasswordChangeIn, request.data)
        pair = _password_guarded(request, username=user.username, check=lambda: accounts.auth_password_change(
            user_id=user.id, old_password=data["old_password"], new_password=data["new_password"]))
        return Response(_pair_out(pair), headers=NO_STORE)


# ------------------------------------------------------------------ users and contacts


class MeView(APIView):
    @extend_schema(responses={200: s.MeOut}, tags=["users"], summary="My profile")
    def get(self, request: Request) -> Response:
        return Response(me_out(_shown(selectors.user_get(user_id=request_user(request).id))))

    @extend_schema(request=s.StatusIn, responses={200: s.MeOut}, tags=["users"], summary="Set my status")
    def patch(self, request: Request) -> Response:
        data = _valid(s.StatusIn, request.data)
        return Response(me_out(_shown(accounts.user_status_set(user_id=request_user(request).id,
                                                               status=data["status"]))))

    @extend_schema(request=s.PasswordIn, responses={204: None}, tags=["users"],
                   summary="Remove my account (password required): sessions end, groups are left, messages stay")
    def delete(self, request: Request) -> Response:
        user = request_user(request)
        data = _valid(s.PasswordIn, request.data)
        _password_guarded(request, username=user.username,
                          check=lambda: accounts.user_remove(user_id=user.id, password=data["password"]))
        return Response(status=204)


class UsersView(APIView):
    @extend_schema(parameters=[s.UserSearchQuery], responses={200: s.UserListOut}, tags=["users"],
                   summary="Look users up by username (exact match first, then by prefix)")
    def get(self, request: Request) -> Response:
        query = _valid_query(s.UserSearchQuery, request)
        found = selectors.users_presence_applied(selectors.user_search(username=query["username"]))
        return Response({"results": [user_out(u) for u in found]})


class ContactsView(APIView):
    @extend_schema(responses={200: s.UserListOut}, tags=["users"], summary="My contacts")
    def get(self, request: Request) -> Response:
        contacts = selectors.users_presence_applied(selectors.contact_list(user_id=request_user(request).id))
        return Response({"results": [user_out(u) for u in contacts]})

    @extend_schema(request=s.UsernameIn, responses={201: s.UserOut}, tags=["users"], summary="Add a contact")
    def post(self, request: Request) -> Response:
        data = _valid(s.UsernameIn, request.data)
        contact = accounts.contact_add(user_id=request_user(request).id, username=data["username"])
        return Response(user_out(_shown(contact)), status=201)


class ContactView(APIView):
    @extend_schema(responses={204: None}, tags=["users"], summary="Remove a contact")
    def delete(self, request: Request, user_id: str) -> Response:
        accounts.contact_remove(user_id=request_user(request).id, contact_id=user_id)
        return Response(status=204)


# ------------------------------------------------------------------ chats


class SingleChatView(APIView):
    @extend_schema(request=s.UsernameIn, responses={200: s.SingleChatOut, 201: s.SingleChatOut}, tags=["chats"],
                   summary="Open the 1:1 chat with a user (201 when new, 200 with the same one afterwards)")
    def post(self, request: Request) -> Response:
        data = _valid(s.UsernameIn, request.data)
        conversation, created = services.chat_single_get_or_create(user_id=request_user(request).id,
                                                                   username=data["username"])
        body = {"conversation_id": str(conversation.id), "chat_id": str(conversation.room_id), "type": "single",
                "members": [str(m) for m in conversation.members], "created": created}
        return Response(body, status=201 if created else 200)


class GroupsView(APIView):
    @extend_schema(request=s.GroupCreateIn, responses={201: s.GroupOut}, tags=["chats"],
                   summary="Create a group; the creator is its first admin")
    def post(self, request: Request) -> Response:
        data = _valid(s.GroupCreateIn, request.data)
        group, conversation = services.group_create(creator_id=request_user(request).id, name=data["name"],
                                                    usernames=data["members"])
        return Response(group_out(group, str(conversation.id)), status=201)


def _group_answer(group: GroupChat) -> dict[str, Any]:
    conversation = Conversation.objects(room_id=group.id).only("id").first()
    return group_out(group, str(conversation.id) if conversation is not None else None)


class GroupView(APIView):
    @extend_schema(responses={200: s.GroupOut}, tags=["chats"], summary="A group I am in")
    def get(self, request: Request, group_id: str) -> Response:
        return Response(_group_answer(selectors.group_get_for_member(user_id=request_user(request).id,
                                                                     group_id=group_id)))

    @extend_schema(request=s.GroupRenameIn, responses={200: s.GroupOut}, tags=["chats"],
                   summary="Rename a group (admins only)")
    def patch(self, request: Request, group_id: str) -> Response:
        data = _valid(s.GroupRenameIn, request.data)
        group = services.group_rename(user_id=request_user(request).id, group_id=group_id, name=data["name"])
        return Response(_group_answer(group))

    @extend_schema(responses={204: None}, tags=["chats"],
                   summary="Delete a group and its conversation for every member (admins only)")
    def delete(self, request: Request, group_id: str) -> Response:
        services.group_delete(user_id=request_user(request).id, group_id=group_id)
        return Response(status=204)


class GroupMembersView(APIView):
    @extend_schema(request=s.UsernameIn, responses={201: s.UserOut}, tags=["chats"],
                   summary="Add a member (admins only)")
    def post(self, request: Request, group_id: str) -> Response:
        data = _valid(s.UsernameIn, request.data)
        member = services.group_member_add(user_id=request_user(request).id, group_id=group_id,
                                           username=data["username"])
        return Response(user_out(_shown(member)), status=201)


class GroupMemberView(APIView):
    @extend_schema(responses={204: None}, tags=["chats"],
                   summary="Remove a member (admins only; removing yourself is leaving)")
    def delete(self, request: Request, group_id: str, user_id: str) -> Response:
        services.group_member_remove(user_id=request_user(request).id, group_id=group_id, member_id=user_id)
        return Response(status=204)


class GroupAdminsView(APIView):
    @extend_schema(request=s.UsernameIn, responses={201: s.UserOut}, tags=["chats"],
                   summary="Promote a member to admin (admins only)")
    def post(self, request: Request, group_id: str) -> Response:
        data = _valid(s.UsernameIn, request.data)
        admin = services.group_admin_add(user_id=request_user(request).id, group_id=group_id,
                                         username=data["username"])
        return Response(user_out(_shown(admin)), status=201)


class GroupAdminView(APIView):
    @extend_schema(responses={204: None}, tags=["chats"],
                   summary="Demote an admin to a member (admins only; never the last admin: 409 last_admin)")
    def delete(self, request: Request, group_id: str, user_id: str) -> Response:
        services.group_admin_remove(user_id=request_user(request).id, group_id=group_id, admin_id=user_id)
        return Response(status=204)


class GroupLeaveView(APIView):
    @extend_schema(request=None, responses={204: None}, tags=["chats"], summary="Leave a group")
    def post(self, request: Request, group_id: str) -> Response:
        services.group_leave(user_id=request_user(request).id, group_id=group_id)
        return Response(status=204)


# ------------------------------------------------------------------ conversations and messages


class ConversationsView(APIView):
    @extend_schema(parameters=[s.ListQuery], responses={200: s.ConversationListOut}, tags=["conversations"],
                   operation_id="conversations_list",
                   summary="My conversations, most recently active first")
    def get(self, request: Request) -> Response:
        query = _valid_query(s.ListQuery, request)
        summaries = conversation_list.conversation_list_for_user(user_id=request_user(request).id, limit=query["limit"],
                                                         offset=query["offset"])
        return Response({"results": [conversation_out(x) for x in summaries]})


class ConversationView(APIView):
    @extend_schema(responses={200: s.ConversationOut}, tags=["conversations"], summary="One of my conversations")
    def get(self, request: Request, conversation_id: str) -> Response:
        summary = conversation_list.conversation_summary_for_member(user_id=request_user(request).id,
                                                            conversation_id=conversation_id)
        return Response(conversation_out(summary))


class ConversationMembersView(APIView):
    @extend_schema(responses={200: s.MemberListOut}, tags=["conversations"],
                   summary="Members of one of my conversations, with presence and read cursors")
    def get(self, request: Request, conversation_id: str) -> Response:
        members = selectors.conversation_members_get(user_id=request_user(request).id,
                                                     conversation_id=conversation_id)
        return Response({"results": [{**user_out(m.user), "online": m.online, "read_seq": m.read_seq}
                                     for m in members]})


class MessagesView(APIView):
    @extend_schema(parameters=[s.HistoryQuery], responses={200: s.HistoryOut}, tags=["conversations"],
                   summary="A page of history ordered by seq (before_seq pages back, after_seq forward)")
    def get(self, request: Request, conversation_id: str) -> Response:
        query = _valid_query(s.HistoryQuery, request)
        page = history.message_history_get(
            user_id=request_user(request).id, conversation_id=conversation_id, before_seq=query.get("before_seq"),
            after_seq=query.get("after_seq"), limit=query["limit"])
        return Response({"results": [message_out(m) for m in page.messages], "has_more": page.has_more})

    @extend_schema(request=s.MessageIn, responses={201: s.SentOut}, tags=["conversations"],
                   summary="Send a message (the WebSocket path's write function; retries dedup on client_msg_id)")
    def post(self, request: Request, conversation_id: str) -> Response:
        user = request_user(request)
        selectors.object_id_or_404(conversation_id, what="conversation")
        data = _valid(s.MessageIn, request.data)
        accepted = services.conversation_message_send(user_id=user.id, conversation_id=conversation_id,
                                                      client_msg_id=data["client_msg_id"], content=data["content"],
                                                      reply_to=data.get("reply_to"))
        event = accepted.event
        body = {"id": accepted.message_id, "conversation_id": accepted.conversation_id, "seq": accepted.seq,
                "sender_id": user.id, "content": event["content"], "timestamp": event["timestamp"],
                "client_msg_id": event["client_msg_id"], "duplicate": accepted.duplicate,
                "reply_to": event.get("reply_to")}
        return Response(body, status=201)


class ReadView(APIView):
    @extend_schema(request=s.ReadIn, responses={200: s.ReadOut}, tags=["conversations"],
                   summary="Move my read cursor forward (it never moves back)")
    def post(self, request: Request, conversation_id: str) -> Response:
        user = request_user(request)
        selectors.object_id_or_404(conversation_id, what="conversation")
        data = _valid(s.ReadIn, request.data)
        cursor = services.conversation_read_mark(user_id=user.id, conversation_id=conversation_id, seq=data["seq"])
        return Response({"conversation_id": conversation_id, "seq": cursor})


class MessageView(APIView):
    @extend_schema(request=s.MessageEditIn, responses={200: s.MessageEventOut}, tags=["messages"],
                   parameters=[OpenApiParameter("message_id", str, OpenApiParameter.PATH)],
                   summary="Edit my message")
    def patch(self, request: Request, message_id: str) -> Response:
        user = request_user(request)
        _message_id_or_404(message_id)
        data = _valid(s.MessageEditIn, request.data)
        accepted = services.message_edit(user_id=user.id, message_id=message_id, content=data["content"])
        return Response(event_out(accepted, deleted=False))

    @extend_schema(responses={200: s.MessageEventOut}, tags=["messages"],
                   parameters=[OpenApiParameter("message_id", str, OpenApiParameter.PATH)],
                   summary="Delete my message (it stays as a tombstone with its seq)")
    def delete(self, request: Request, message_id: str) -> Response:
        user = request_user(request)
        _message_id_or_404(message_id)
        accepted = services.message_delete(user_id=user.id, message_id=message_id)
        return Response(event_out(accepted, deleted=True))


class MessageVersionsView(APIView):
    @extend_schema(responses={200: s.MessageVersionsOut}, tags=["messages"],
                   parameters=[OpenApiParameter("message_id", str, OpenApiParameter.PATH)],
                   summary="The versions of a message, oldest first (edit history; members only)")
    def get(self, request: Request, message_id: str) -> Response:
        found = selectors.message_versions_get(user_id=request_user(request).id, message_id=message_id)
        return Response({"message_id": found.message_id, "conversation_id": found.conversation_id,
                         "results": [{"seq": v.seq, "content": v.content,
                                      "at": v.at if isinstance(v.at, str) or v.at is None else iso(v.at)}
                                     for v in found.versions],
                         "has_more": found.has_more})


def _not_blank(request: Request, name: str) -> None:
    """DRF takes an optional query parameter given empty (``?before=``) as absent; a cursor given empty is a
    client mistake (it would restart from the newest), so it is refused like any malformed cursor."""
    if request.query_params.get(name, None) == "":
        raise ValidationFailed(f"{name} must not be empty", details={"field": name})


class MentionsView(APIView):
    @extend_schema(parameters=[s.MentionsQuery], responses={200: s.MentionListOut}, tags=["messages"],
                   summary="Messages that mention me, newest first")
    def get(self, request: Request) -> Response:
        query = _valid_query(s.MentionsQuery, request)
        _not_blank(request, "before")
        found, more = mention_list.mentions_list(user_id=request_user(request).id, before=query.get("before"),
                                            limit=query["limit"])
        return Response({"results": [{"conversation_id": m.conversation_id, "message_id": m.message_id,
                                      "seq": m.seq, "sender_id": m.sender_id, "content": m.content,
                                      "timestamp": m.timestamp, "deleted": m.deleted, "cursor": m.cursor}
                                     for m in found], "has_more": more})


class SearchView(APIView):
    @extend_schema(parameters=[s.SearchQuery], responses={200: s.SearchOut}, tags=["messages"],
                   summary="Search the text of messages in my conversations, newest first")
    def get(self, request: Request) -> Response:
        user = request_user(request)
        query = _valid_query(s.SearchQuery, request)
        _not_blank(request, "cursor")
        rate_limit(request, group="search.user", value=user.id, rate=settings.API_RATE_SEARCH_USER)
        hits, cursor = finders.messages_search(user_id=user.id, query=query["q"], cursor=query.get("cursor"),
                                               limit=query["limit"])
        return Response({"results": [{"conversation_id": h.conversation_id, "message_id": h.message_id,
                                      "seq": h.seq, "sender_id": h.sender_id, "content": h.content,
                                      "timestamp": h.timestamp, "highlights": [list(x) for x in h.highlights]}
                                     for h in hits], "next_cursor": cursor})


def reaction_change_out(change: ReactionChange) -> dict[str, Any]:
    return {"message_id": change.message_id, "conversation_id": change.conversation_id, "emoji": change.emoji,
            "changed": change.changed, "seq": change.seq, "count": len(change.user_ids), "user_ids": change.user_ids}


class ReactionSetView(APIView):
    @extend_schema(responses={200: s.ReactionSetOut}, tags=["messages"],
                   summary="The reaction set and its limits (for clients' pickers)")
    def get(self, request: Request) -> Response:
        return Response({"emoji": list(settings.REACTION_EMOJI), "per_message": int(settings.REACTIONS_PER_MESSAGE),
                         "per_user": int(settings.REACTIONS_PER_USER)})


class ReactionsView(APIView):
    @extend_schema(responses={200: s.ReactionsOut}, tags=["messages"],
                   parameters=[OpenApiParameter("message_id", str, OpenApiParameter.PATH)],
                   summary="The reactions of a message: count and who per emoji (members only)")
    def get(self, request: Request, message_id: str) -> Response:
        _message_id_or_404(message_id)
        conversation_id, reactions = selectors.message_reactions_get(user_id=request_user(request).id,
                                                                      message_id=message_id)
        return Response({"message_id": message_id, "conversation_id": conversation_id, "results": reactions})

    @extend_schema(request=s.ReactionIn, responses={200: s.ReactionChangeOut}, tags=["messages"],
                   parameters=[OpenApiParameter("message_id", str, OpenApiParameter.PATH)],
                   summary="Add my reaction (idempotent: one per user per emoji)")
    def post(self, request: Request, message_id: str) -> Response:
        user = request_user(request)
        _message_id_or_404(message_id)
        data = _valid(s.ReactionIn, request.data)
        change = services.message_reaction_change(user_id=user.id, message_id=message_id, emoji=data["emoji"],
                                                  op="add")
        return Response(reaction_change_out(change))


class ReactionView(APIView):
    @extend_schema(responses={200: s.ReactionChangeOut}, tags=["messages"],
                   parameters=[OpenApiParameter("message_id", str, OpenApiParameter.PATH),
                               OpenApiParameter("emoji", str, OpenApiParameter.PATH,
                                                description="the emoji, percent-encoded")],
                   summary="Remove my reaction (idempotent)")
    def delete(self, request: Request, message_id: str, emoji: str) -> Response:
        user = request_user(request)
        _message_id_or_404(message_id)
        change = services.message_reaction_change(user_id=user.id, message_id=message_id, emoji=emoji, op="remove")
        return Response(reaction_change_out(change))
