"""The Django admin pages over MongoDB: they render for staff, refuse others, filter, search, and delete
(tombstone) with the action logged."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
import redis.asyncio
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth.models import User as StaffUser
from django.test import Client

from chatstream_site.localservers import Servers
from core.documents import Message
from core.entries import event_decode
from core.keys import partition_of, stream_key
from messaging import presence
from tests.support.api import account, persist

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("servers", "generous_rates")]

PAGES = ["/admin/", "/admin/api/mongomessage/", "/admin/api/mongoconversation/", "/admin/api/mongouser/"]


@pytest.fixture
def conversation(servers: Servers) -> dict[str, str]:
    alice, bob = account("alice"), account("bob")
    cid = alice.client.post("/api/v1/chats/single", {"username": bob.username}, format="json").json()[
        "conversation_id"]
    marker = uuid.uuid4().hex[:8]
    ids = []
    for text in (f"Hello (world) {marker}", f"second {marker} with [brackets]", "third"):
        sent = alice.client.post(f"/api/v1/conversations/{cid}/messages",
                                 {"content": text, "client_msg_id": uuid.uuid4().hex}, format="json")
        ids.append(sent.json()["id"])
    bob.client.post(f"/api/v1/conversations/{cid}/messages", {"content": "from bob", "client_msg_id": "b"},
                    format="json")
    persist(servers, cid)
    # One more accepted but not yet persisted: the admin shows accepted 5 vs persisted 4.
    alice.client.post(f"/api/v1/conversations/{cid}/messages", {"content": "pending", "client_msg_id": "p"},
                      format="json")
    return {"cid": cid, "marker": marker, "first": ids[0], "alice": alice.username, "alice_id": alice.id}


def test_pages_refuse_anonymous_and_non_staff(conversation: dict[str, str]) -> None:
    anonymous = Client()
    for page in PAGES:
        response = anonymous.get(page)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], page
    plain = StaffUser.objects.create_user("plain", password="x-pass-123456")
    client = Client()
    client.force_login(plain)
    for page in PAGES[1:]:
        assert client.get(page).status_code == 302, page
    assert client.get(f"/admin/api/mongomessage/{conversation['first']}/").status_code == 302
    assert client.post(f"/admin/api/mongomessage/{conversation['first']}/delete/").status_code == 302
    assert not Message.objects(id=conversation["first"]).get().deleted


def test_pages_render_for_staff(servers: Servers, admin_client: Client, conversation: dict[str, str]) -> None:
    for page in PAGES:
        response = admin_client.get(page)
        assert response.status_code == 200, page
    index = admin_client.get("/admin/").content.decode()
    assert "/admin/api/mongomessage/" in index and "/admin/api/mongoconversation/" in index

    convs = admin_client.get("/admin/api/mongoconversation/", {"id": conversation["cid"]}).content.decode()
    assert '<td class="accepted-seq">5</td>' in convs and '<td class="persisted-seq">4</td>' in convs
    users = admin_client.get("/admin/api/mongouser/", {"q": conversation["alice"]}).content.decode()
    assert conversation["alice"] in users and "<td>offline</td>" in users
    # Online as Redis presence says, at once: a connect writes no users.status (docs/adr/0051).
    asyncio.run(_connected(servers.redis_url, conversation["alice_id"]))
    users = admin_client.get("/admin/api/mongouser/", {"q": conversation["alice"]}).content.decode()
    assert "<td>online</td>" in users


async def _connected(redis_url: str, user_id: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await presence.presence_connect(client, user_id=user_id, session_id=uuid.uuid4().hex,
                                               conversation_ids=[])
    finally:
        await client.aclose()


def test_message_filters_and_search(admin_client: Client, conversation: dict[str, str]) -> None:
    def rows(**params: str) -> int:
        page = admin_client.get("/admin/api/mongomessage/", params)
        assert page.status_code == 200
        return page.content.decode().count('class="message-row"')

    assert rows(conversation=conversation["cid"]) == 4
    assert rows(conversation=conversation["cid"], sender=conversation["alice"]) == 3
    assert rows(conversation=conversation["cid"], sender=conversation["alice_id"]) == 3
    assert rows(q=conversation["marker"]) == 2
    # Regex metacharacters are text, and the search ignores case.
    assert rows(q=f"hello (WORLD) {conversation['marker']}") == 1
    assert rows(q="[brackets]", conversation=conversation["cid"]) == 1
    assert rows(q=".*", conversation=conversation["cid"]) == 0
    assert rows(conversation=conversation["cid"], days="1") == 4
    assert rows(conversation=conversation["cid"], **{"from": "2001-01-01", "to": "2001-01-02"}) == 0
    assert rows(conversation="not-an-id") == 0
    assert rows(sender="nobody-at-all") == 0


def test_view_and_delete_a_message_is_a_logged_tombstone(servers: Servers, admin_client: Client,
                                                         conversation: dict[str, str]) -> None:
    mid = conversation["first"]
    detail = admin_client.get(f"/admin/api/mongomessage/{mid}/")
    assert detail.status_code == 200 and conversation["marker"] in detail.content.decode()
    assert admin_client.get(f"/admin/api/mongomessage/{uuid.uuid4().hex}/").status_code == 404
    assert admin_client.get(f"/admin/api/mongomessage/{mid}/delete/").status_code == 405

    deleted = admin_client.post(f"/admin/api/mongomessage/{mid}/delete/")
    assert deleted.status_code == 302
    stored = Message.objects(id=mid).get()
    assert stored.deleted and stored.content == ""
    entry = LogEntry.objects.get(object_id=mid)
    assert entry.action_flag == DELETION and entry.user.username == "admin"
    # The delete travelled the stream like a sender's: clients and the drain see it after the message.
    entries = redis.Redis.from_url(servers.redis_url).xrange(stream_key(partition_of(conversation["cid"])))
    events = [event_decode(i, f) for i, f in entries]
    deletes = [e for e in events if e.type == "message.deleted" and e.data["id"] == mid]
    assert len(deletes) == 1 and deletes[0].data["deleter_id"] == "staff:admin"
    assert "deleted (tombstone)" in admin_client.get(f"/admin/api/mongomessage/{mid}/").content.decode()


def test_the_conversation_list_shows_who_added_whom_to_a_group(admin_client: Client) -> None:
    alice, bob, carol = account("alice"), account("bob"), account("carol")
    group = alice.client.post("/api/v1/chats/group", {"name": "Admins see", "members": [bob.username]},
                              format="json").json()
    alice.client.post(f"/api/v1/chats/group/{group['group_id']}/admins", {"username": bob.username}, format="json")
    bob.client.post(f"/api/v1/chats/group/{group['group_id']}/members", {"username": carol.username},
                    format="json")
    page = admin_client.get("/admin/api/mongoconversation/", {"id": group["conversation_id"]})
    assert page.status_code == 200
    html = page.content.decode()
    assert f"{alice.username} &larr; (creator)" in html
    assert f"{bob.username} &larr; {alice.username}" in html
    assert f"{carol.username} &larr; {bob.username}" in html


def test_a_message_page_shows_whom_it_mentions(servers: Servers, admin_client: Client) -> None:
    alice, bob = account("alice"), account("bob")
    cid = alice.client.post("/api/v1/chats/single", {"username": bob.username}, format="json").json()[
        "conversation_id"]
    named = alice.client.post(f"/api/v1/conversations/{cid}/messages",
                              {"content": f"hi @{bob.username}", "client_msg_id": "m1"}, format="json").json()["id"]
    plain = alice.client.post(f"/api/v1/conversations/{cid}/messages",
                              {"content": "no one named", "client_msg_id": "m2"}, format="json").json()["id"]
    persist(servers, cid)
    html = admin_client.get(f"/admin/api/mongomessage/{named}/").content.decode()
    assert f'<td id="message-mentions">@{bob.username} ({bob.id})</td>' in html
    html = admin_client.get(f"/admin/api/mongomessage/{plain}/").content.decode()
    assert '<td id="message-mentions">-</td>' in html
