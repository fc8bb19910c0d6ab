"""Django admin pages over the MongoDB data: staff browse chat users, conversations (with the last
accepted and last persisted seq) and messages (filters by conversation, sender and date; search in the
content; one message; delete = tombstone, logged as a Django LogEntry and a log line).

Each ModelAdmin of an unmanaged stand-in model (``api.models``) swaps its views for ones that read
MongoDB via ``api.selectors``; the admin site's own login and staff check guard them (``admin_view``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from bson import ObjectId
from django.contrib import admin, messages
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST

from api import selectors, services
from api.models import MongoConversation, MongoMessage, MongoUser
from core.documents import Message, User
from core.errors import NotFound

logger = logging.getLogger(__name__)
PER_PAGE = 50


def _int(value: str | None, default: int) -> int:
    try:
        return max(1, int(value or default))
    except ValueError:
        return default


def _date(value: str | None) -> datetime | None:
    try:
        return datetime.strptime(value or "", "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None


class MongoAdmin(admin.ModelAdmin):
    """Staff may look; adding and editing happen through the API, never here."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
        return {**self.admin_site.each_context(request), "title": title, "opts": self.model._meta, **extra}


@admin.register(MongoMessage)
class MessageAdmin(MongoAdmin):
    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.list_view), name="api_mongomessage_changelist"),
            path("<str:message_id>/", wrap(self.detail_view), name="api_mongomessage_change"),
            path("<str:message_id>/delete/", wrap(require_POST(self.delete_view_post)),
                 name="api_mongomessage_delete"),
        ]

    def list_view(self, request: HttpRequest) -> HttpResponse:
        q = request.GET
        days = q.get("days", "")
        date_from = _date(q.get("from"))
        if days in ("1", "7", "30"):
            date_from = datetime.now(UTC) - timedelta(days=int(days))
        to = _date(q.get("to"))
        page = selectors.admin_messages(
            conversation_id=q.get("conversation", "").strip(), sender=q.get("sender", "").strip(),
            date_from=date_from, date_to=to + timedelta(days=1) if to else None, search=q.get("q", "").strip(),
            page=_int(q.get("page"), 1), per_page=PER_PAGE)
        senders = selectors.users_by_id(ids=[m.sender_id for m in page.rows])
        rows = [{"m": m, "sender": senders[str(m.sender_id)].username if str(m.sender_id) in senders else "?"}
                for m in page.rows]
        params = {k: v for k, v in q.items() if k != "page"}
        return TemplateResponse(request, "admin/api/message_list.html", self._context(
            request, "Messages", rows=rows, page=page, filters=params, days=days,
            query=urlencode(params)))

    def _message(self, message_id: str) -> Message:
        message = Message.objects(id=message_id).first() if selectors.MESSAGE_ID_RE.match(message_id) else None
        if message is None:
            raise Http404("no such message")
        return message

    def detail_view(self, request: HttpRequest, message_id: str) -> HttpResponse:
        message = self._message(message_id)
        sender = User.objects(id=message.sender_id).only("username").first()
        # The users its @usernames named, each read by _id (at most messaging.mentions' per-message bound; a
        # query by a list of ids would scan ``users`` on FerretDB v1).
        mentioned = []
        for uid in message.mentions or ():
            user = User.objects(id=uid).only("username").first() if ObjectId.is_valid(uid) else None
            mentioned.append((uid, user.username if user else "?"))
        return TemplateResponse(request, "admin/api/message_detail.html", self._context(
            request, f"Message {message.id}", m=message, sender=sender.username if sender else "?",
            mentioned=mentioned, can_delete=self.has_delete_permission(request)))

    def delete_view_post(self, request: HttpRequest, message_id: str) -> HttpResponse:
        if not self.has_delete_permission(request):
            raise Http404("no such page")
        message = self._message(message_id)
        try:
            seq = services.message_tombstone_by_staff(message_id=message.id, staff_username=request.user.get_username())
        except NotFound:
            raise Http404("no such message") from None
        LogEntry.objects.create(
            user_id=request.user.pk, content_type=ContentType.objects.get_for_model(MongoMessage),
            object_id=message.id, object_repr=f"message {message.id} (seq {message.seq})"[:200],
            action_flag=DELETION,
            change_message=f"tombstoned message {message.id} of conversation {message.conversation_id}; "
                           f"event seq {seq}")
        messages.success(request, f"Message {message.id} deleted (tombstone, event seq {seq}).")
        return HttpResponseRedirect(reverse("admin:api_mongomessage_change", args=[message.id]))


@admin.register(MongoConversation)
class ConversationAdmin(MongoAdmin):
    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [path("", wrap(self.list_view), name="api_mongoconversation_changelist")]

    def list_view(self, request: HttpRequest) -> HttpResponse:
        page = _int(request.GET.get("page"), 1)
        rows, has_next = selectors.admin_conversations(conversation_id=request.GET.get("id", "").strip(), page=page,
                                                       per_page=PER_PAGE)
        return TemplateResponse(request, "admin/api/conversation_list.html", self._context(
            request, "Conversations", rows=rows, page=page, has_next=has_next, filter_id=request.GET.get("id", "")))


@admin.register(MongoUser)
class ChatUserAdmin(MongoAdmin):
    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [path("", wrap(self.list_view), name="api_mongouser_changelist")]

    def list_view(self, request: HttpRequest) -> HttpResponse:
        result = selectors.admin_users(search=request.GET.get("q", "").strip(), page=_int(request.GET.get("page"), 1),
                                       per_page=PER_PAGE)
        selectors.users_presence_applied(result.rows)  # the status Redis presence says (docs/adr/0051)
        return TemplateResponse(request, "admin/api/user_list.html", self._context(
            request, "Chat users", page=result, q=request.GET.get("q", "")))
