"""Routes of REST API v1 (mounted at ``api/v1/``), plus the OpenAPI schema and its docs pages."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from api import views

urlpatterns = [
    path("auth/register", views.RegisterView.as_view(), name="auth-register"),
    path("auth/login", views.LoginView.as_view(), name="auth-login"),
    path("auth/refresh", views.RefreshView.as_view(), name="auth-refresh"),
    path("auth/logout", views.LogoutView.as_view(), name="auth-logout"),
    path("auth/ws-ticket", views.WsTicketView.as_view(), name="auth-ws-ticket"),
    path("auth/password", views.PasswordView.as_view(), name="auth-password"),
    path("users", views.UsersView.as_view(), name="users"),
    path("users/me", views.MeView.as_view(), name="users-me"),
    path("users/me/contacts", views.ContactsView.as_view(), name="contacts"),
    path("users/me/contacts/<str:user_id>", views.ContactView.as_view(), name="contact"),
    path("chats/single", views.SingleChatView.as_view(), name="chat-single"),
    path("chats/group", views.GroupsView.as_view(), name="chat-groups"),
    path("chats/group/<str:group_id>", views.GroupView.as_view(), name="chat-group"),
    path("chats/group/<str:group_id>/members", views.GroupMembersView.as_view(), name="chat-group-members"),
    path("chats/group/<str:group_id>/members/<str:user_id>", views.GroupMemberView.as_view(),
         name="chat-group-member"),
    path("chats/group/<str:group_id>/admins", views.GroupAdminsView.as_view(), name="chat-group-admins"),
    path("chats/group/<str:group_id>/admins/<str:user_id>", views.GroupAdminView.as_view(),
         name="chat-group-admin"),
    path("chats/group/<str:group_id>/leave", views.GroupLeaveView.as_view(), name="chat-group-leave"),
    path("conversations", views.ConversationsView.as_view(), name="conversations"),
    path("conversations/<str:conversation_id>", views.ConversationView.as_view(), name="conversation"),
    path("conversations/<str:conversation_id>/members", views.ConversationMembersView.as_view(),
         name="conversation-members"),
    path("conversations/<str:conversation_id>/messages", views.MessagesView.as_view(), name="messages"),
    path("conversations/<str:conversation_id>/read", views.ReadView.as_view(), name="read"),
    path("messages/<str:message_id>", views.MessageView.as_view(), name="message"),
    path("messages/<str:message_id>/versions", views.MessageVersionsView.as_view(), name="message-versions"),
    path("messages/<str:message_id>/reactions", views.ReactionsView.as_view(), name="message-reactions"),
    path("messages/<str:message_id>/reactions/<str:emoji>", views.ReactionView.as_view(), name="message-reaction"),
    path("reactions", views.ReactionSetView.as_view(), name="reactions"),
    path("mentions", views.MentionsView.as_view(), name="mentions"),
    path("search", views.SearchView.as_view(), name="search"),
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("redoc", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
]
