"""Helpers for the REST API tests: accounts without paying for argon2 each time, authenticated clients,
and a stand-in for the storage pipeline that persists a conversation's stream events into MongoDB."""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from bson import ObjectId
from django.contrib.auth.hashers import make_password
from rest_framework.test import APIClient

from api.tokens import token_issue
from messaging.streams import event_decode, partition_of, stream_key
from storage.documents import Conversation, LastMessage, Message, User
from tests.servers import Servers

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


def anonymous() -> APIClient:
    return APIClient()


@pytest.fixture
def generous_rates(settings: Any) -> None:
    """Most tests log in and register far more often than a person would."""
    for name in ("API_RATE_LOGIN_IP", "API_RATE_REGISTER_IP", "API_RATE_REGISTER_USER"):
        setattr(settings, name, "100000/m")


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    return str(body["error"]["code"])


def persist(servers: Servers, conversation_id: str) -> int:
    """Stand-in for the storage pipeline (issue 5): apply the conversation's stream events to MongoDB,
    idempotently. Returns the number of events applied."""
    client = redis.Redis.from_url(servers.redis_url)
    entries = client.xrange(stream_key(partition_of(conversation_id)))
    applied = 0
    conv_oid = ObjectId(conversation_id)
    for entry_id, fields in entries:
        event = event_decode(entry_id, fields)
        if event.conversation_id != conversation_id:
            continue
        data = event.data
        if event.type == "message.new":
            Message.objects(id=data["id"]).update_one(
                upsert=True, set__conversation_id=conv_oid, set__seq=event.seq,
                set__sender_id=ObjectId(data["sender_id"]), set__content=data["content"],
                set__client_msg_id=data["client_msg_id"], set__timestamp=_time(data["timestamp"]))
            last = LastMessage(id=data["id"], seq=event.seq, sender_id=data["sender_id"], content=data["content"],
                               timestamp=_time(data["timestamp"]))
            Conversation.objects(id=conv_oid).update_one(set__last_message=last, set__updated_at=_time(
                data["timestamp"]))
        elif event.type == "message.edited":
            Message.objects(id=data["id"]).update_one(set__content=data["content"],
                                                      set__edited_at=_time(data["edited_at"]))
        elif event.type == "message.deleted":
            Message.objects(id=data["id"]).update_one(set__deleted=True, set__content="")
        elif event.type == "read.updated":
            Conversation.objects(id=conv_oid).update_one(**{f"set__read_cursors__{data['user_id']}": data["seq"]})
        if event.seq:
            Conversation.objects(id=conv_oid, last_seq__lt=event.seq).update_one(set__last_seq=event.seq)
        applied += 1
    return applied


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def bulk_messages(*, conversation_id: str, sender_id: str, count: int, start_seq: int = 1) -> None:
    """Insert ``count`` persisted messages with consecutive seqs (fast: one insert_many per 1,000)."""
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


def dumps(value: Any) -> str:
    return json.dumps(value)
