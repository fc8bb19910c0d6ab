"""Unmanaged stand-ins so the Django admin lists the MongoDB collections (users, conversations, messages).

They have no table and are never queried: ``api.admin`` replaces their admin views with views that read
MongoDB through ``api.selectors``. They exist for the admin index, permissions and the action log
(LogEntry needs a content type).
"""

from __future__ import annotations

from django.db import models


class MongoUser(models.Model):
    class Meta:
        managed = False
        verbose_name = "chat user"
        default_permissions = ("view",)


class MongoConversation(models.Model):
    class Meta:
        managed = False
        verbose_name = "conversation (chat)"
        default_permissions = ("view",)


class MongoMessage(models.Model):
    class Meta:
        managed = False
        verbose_name = "message"
        default_permissions = ("view", "delete")
