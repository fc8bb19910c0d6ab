"""Staff pages of the storage pipeline, inside the admin's look: per-partition backlog, lag and
throughput, and the dead letters with retry and discard buttons. Reads through ``storage.selectors``,
writes through ``storage.services``."""

from __future__ import annotations

import time

from django.contrib import admin, messages
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from core.errors import NotFound
from storage import deadletters, selectors


@staff_member_required
def pipeline_view(request: HttpRequest) -> HttpResponse:
    now_ms = int(time.time() * 1000)
    rates = selectors.persisted_rates()
    states = selectors.partitions_state()
    rows = [{"state": s, "lag_s": round(s.lag_s(now_ms=now_ms), 1), "rate": round(rates.get(s.partition, 0.0), 1)}
            for s in states]
    context = {
        **admin.site.each_context(request),
        "title": "Storage pipeline",
        "rows": rows,
        "total_backlog": sum(s.backlog for s in states),
        "letters": selectors.deadletters_list(limit=200),
        "letters_count": selectors.deadletters_count(),
    }
    return render(request, "storage/pipeline.html", context)


@staff_member_required
@require_POST
def deadletter_action_view(request: HttpRequest, letter_id: str, action: str) -> HttpResponse:
    try:
        if action == "retry":
            new_id = deadletters.deadletter_retry(id=letter_id)
            messages.success(request, f"Dead letter {letter_id} is back in its stream as {new_id}.")
        elif action == "discard" and deadletters.deadletter_discard(id=letter_id):
            messages.success(request, f"Dead letter {letter_id} discarded.")
        else:
            raise NotFound("no such dead letter")
    except NotFound:
        messages.error(request, f"No dead letter {letter_id}.")
    return HttpResponseRedirect(reverse("storage-pipeline"))
