"""Staff pages of the storage pipeline, mounted under ``admin/storage/`` (before the admin's own URLs)."""

from __future__ import annotations

from django.urls import path

from storage.views import deadletter_action_view, pipeline_view

urlpatterns = [
    path("", pipeline_view, name="storage-pipeline"),
    path("deadletters/<str:letter_id>/<str:action>", deadletter_action_view, name="storage-deadletter-action"),
]
