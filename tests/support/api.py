"""Helpers for the REST API tests: accounts without paying for argon2 each time, authenticated clients,
and ``persist``, which runs the real storage drain so the events accepted so far are in MongoDB."""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from django.conf import settings
from django.contrib.auth.hashers import make_password
from rest_framework.test import APIClient

from chatstream_site.localservers import Servers
from core.documents import Conversation, Message, User
from core.keys import partition_of
from core.tokens import token_issue
from storage.services import partition_drain
from tests.support.storage import tails_flush

PASSWORD = "correct-horse-battery-9"


@functools.cache
def password_hash() -> str:
    return make_password(PASSWORD)


@dataclass
class Account:
    id: str
    username: str
    access: str
    client: APIClient


def account(prefix: str = "u") -> Account:
    """A user in MongoDB (with the shared test password) and a client sending its access token."""
    username = f"{prefix}{uuid.uuid4().hex[:10]}"
    user = User(username=username, username_key=username.lower(), email=f"{username}@example.com",
                password=password_hash()).save()
    access = token_issue(user_id=str(user.id), username=username, type="access")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    return Account(id=str(user.id), username=username, access=access, client=client)


def registered(prefix: str) -> tuple[str, str, APIClient]:
    """A user created by the REST registration (so every cache and document registration writes exists);
    returns (id, username, a client with their access token)."""
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    response = APIClient().post("/api/v1/auth/register", {"username": name, "email": f"{name}@example.test",
                                                          "password": PASSWORD}, format="json")
    assert response.status_code == 201, response.content
    user_id = str(response.json()["id"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_issue(user_id=user_id, username=name, type='access')}")
    return user_id, name, client


def anonymous() -> APIClient:
    return APIClient()


@pytest.fixture
def generous_rates(settings: Any) -> None:
    """Most tests log in and register far more often than a person would."""
    for name in ("API_RATE_LOGIN_IP", "API_RATE_REGISTER_IP", "API_RATE_REGISTER_USER", "API_RATE_SEARCH_USER"):
        setattr(settings, name, "100000/m")


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    return str(body["error"]["code"])


def persist(servers: Servers, conversation_id: str) -> int:
    """Run the real storage drain (``storage.services.partition_drain``, in this process) on the
    conversation's partition until nothing is left: every event accepted so far is in MongoDB as the storage
    workers would write it, buckets in progress included (as after a day: docs/adr/0041). Returns the number
    of entries persisted (of every conversation of the partition). ``servers`` is the session's (the drain
    uses the settings' Redis and MongoDB, which are its)."""
    del servers  # the drain's clients come from the settings, which point at the session's servers
    partition = partition_of(conversation_id)
    persisted = 0
    # A lease held by another drain (a worker of another test on the session's Redis) ends within
    # DRAIN_RECLAIM_IDLE_S, or it is taken over: waiting that long, plus a margin, is enough.
    busy_until = time.monotonic() + float(settings.DRAIN_RECLAIM_IDLE_S) + 5
    for _ in range(PERSIST_MAX_BATCHES):  # bounded: a drain that never ends fails the test instead of hanging it
        result = partition_drain(partition=partition, batch_size=PERSIST_BATCH, consumer=PERSIST_CONSUMER)
        persisted += result.persisted
        if result.busy and time.monotonic() < busy_until:
            time.sleep(0.05)
            continue
        if not result.more and not result.busy:
            tails_flush(partition)  # the buckets in progress too, as a day's idleness stores them (ADR 0041)
            return persisted
    raise AssertionError(f"partition {partition} never ran empty")


# The drain's batch size in production; batches enough for any test's backlog (busy waits are bounded apart).
PERSIST_BATCH = 500
PERSIST_MAX_BATCHES = 200
PERSIST_CONSUMER = "api-tests"


def bulk_messages(*, conversation_id: str, sender_id: str, count: int, start_seq: int = 1) -> None:
    """Insert ``count`` persisted messages with consecutive seqs (fast: one insert_many per 1,000), and raise the
    conversation's ``last_seq`` over them as the drain does (history trusts it when Redis has no seq)."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    collection = Message._get_collection()
    batch: list[dict[str, Any]] = []
    for seq in range(start_seq, start_seq + count):
        batch.append({"_id": uuid.uuid4().hex, "conversation_id": ObjectId(conversation_id), "seq": seq,
                      "sender_id": ObjectId(sender_id), "content": f"message {seq}",
                      "timestamp": base + timedelta(seconds=seq), "deleted": False, "read_status": "sent"})
        if len(batch) == 1000:
            collection.insert_many(batch, ordered=False)
            batch = []
    if batch:
        collection.insert_many(batch, ordered=False)
    Conversation._get_collection().update_one({"_id": ObjectId(conversation_id)},
                                              {"$max": {"last_seq": start_seq + count - 1}})


def dumps(value: Any) -> str:
    return json.dumps(value)
