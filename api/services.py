"""Writes of the REST API about conversations: chats and group membership, and the message events (which go
through ``messaging.services``, the one write path shared with WebSockets), and staff moderation. Accounts,
tokens, profile and contacts are ``api/accounts.py``.

Every function takes keyword-only, already type-checked arguments (serializers did that) and raises
``core.errors`` domain errors; the DRF exception handler turns them into HTTP answers.
MongoDB has no transactions here (FerretDB v1): multi-document changes are ordered so that a crash between
two writes leaves a state the next call repairs (see each function).
"""

from __future__ import annotations

import logging

import mongoengine
from bson import ObjectId

from api.selectors import group_get_for_member, object_id_or_404, user_by_username
from core.clients import run_async, sync_redis
from core.documents import Conversation, GroupChat, Message, MessageVersion, SingleChat, User, utcnow
from core.entries import Event
from core.errors import Conflict, Forbidden, NotFound, ValidationFailed
from core.keys import group_card_key
from messaging import services as messaging
from messaging.membership import membership_changed_sync, membership_invalidate_sync
from messaging.mentions import usernames_remember_sync
from messaging.reactions import ReactionChange, reaction_change
from messaging.services import Accepted
from storage.writes import message_event_write

logger = logging.getLogger(__name__)
# A group's members: 256 (WhatsApp's long-time cap) keeps each message's fan-out and a group's membership
# set small, while covering teams and classes. One request adds at most GROUP_ADD_MAX_PER_REQUEST others:
# a whole department at once, but not 999 strangers added to a group in one call (issue 14).
GROUP_MAX_MEMBERS = 256
GROUP_ADD_MAX_PER_REQUEST = 50


# ------------------------------------------------------------------ chats


def _conversation_for_room(*, type: str, room_id: ObjectId, members: list[ObjectId]) -> Conversation:
    """The room's conversation, created if missing (unique ``room_id`` decides races)."""
    existing = Conversation.objects(room_id=room_id).first()
    if existing is not None:
        return existing
    try:
        return Conversation(type=type, room_id=room_id, members=members).save()
    except mongoengine.NotUniqueError:
        return Conversation.objects(room_id=room_id).get()


def chat_single_get_or_create(*, user_id: str, username: str) -> tuple[Conversation, bool]:
    """The 1:1 conversation between the caller and ``username``; the same pair always gets the same one.

    Returns ``(conversation, created)``. Raises NotFound (no such user), ValidationFailed (oneself).
    Side effects: at most one ``single_chats`` and one ``conversations`` document; a crash between the two
    is repaired by the next call (the conversation is looked up by the chat's id).
    """
    peer = user_by_username(username=username)
    usernames_remember_sync(sync_redis(), names={peer.username_key: str(peer.id)})  # accounts made before it
    if str(peer.id) == user_id:
        raise ValidationFailed("a single chat needs another user", details={"field": "username"})
    first, second = sorted([user_id, str(peer.id)])
    chat = SingleChat.objects(member1=ObjectId(first), member2=ObjectId(second)).first()
    created = False
    if chat is None:
        try:
            chat = SingleChat(member1=ObjectId(first), member2=ObjectId(second)).save()
            created = True
        except mongoengine.NotUniqueError:
            chat = SingleChat.objects(member1=ObjectId(first), member2=ObjectId(second)).get()
    conversation = _conversation_for_room(type="single", room_id=chat.id,
                                          members=[ObjectId(first), ObjectId(second)])
    if created:
        _membership_notify(conversation_id=str(conversation.id), user_ids=[first, second])
    return conversation, created


def group_create(*, creator_id: str, name: str, usernames: list[str]) -> tuple[GroupChat, Conversation]:
    """Create a group whose only admin is the creator and whose members are the creator plus ``usernames``.

    Raises ValidationFailed (bad name, too many members) or NotFound (unknown usernames, all listed).
    Side effects: one ``group_chats`` and one ``conversations`` document.
    """
    name = _group_name(name)
    keys = list(dict.fromkeys(u.lower() for u in usernames))
    if len(keys) > GROUP_ADD_MAX_PER_REQUEST:
        raise ValidationFailed(f"at most {GROUP_ADD_MAX_PER_REQUEST} members can be added at once",
                               code="too_many_members",
                               details={"field": "members", "limit": GROUP_ADD_MAX_PER_REQUEST})
    if len(keys) + 1 > GROUP_MAX_MEMBERS:
        raise ValidationFailed(f"a group has at most {GROUP_MAX_MEMBERS} members", code="too_many_members",
                               details={"field": "members", "limit": GROUP_MAX_MEMBERS})
    found = {u.username_key: u.id
             for u in User.objects(username_key__in=keys, deactivated_at=None).only("id", "username_key")}
    missing = [k for k in keys if k not in found]
    if missing:
        raise NotFound("unknown usernames", details={"usernames": missing})
    usernames_remember_sync(sync_redis(), names={k: str(v) for k, v in found.items()})  # accounts made before it
    creator = ObjectId(creator_id)
    members = [creator, *(oid for oid in found.values() if oid != creator)]
    group = GroupChat(name=name, admins=[creator], members=members,
                      added_by={str(m): creator for m in members if m != creator}).save()
    conversation = _conversation_for_room(type="group", room_id=group.id, members=members)
    _membership_notify(conversation_id=str(conversation.id), user_ids=[str(m) for m in members])
    return group, conversation


def _group_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ValidationFailed("name must be 1-100 characters", details={"field": "name"})
    return name


def _admin_group(*, user_id: str, group_id: str) -> GroupChat:
    group = group_get_for_member(user_id=user_id, group_id=group_id)
    if ObjectId(user_id) not in group.admins:
        raise Forbidden("only the group's admins may do this", details={"group_id": group_id})
    return group


def _membership_notify(*, conversation_id: str, user_ids: list[str]) -> None:
    """Drop the cached members of a conversation and tell the brokers which users joined or left, so their
    open connections start or stop receiving the conversation at once."""
    membership_changed_sync(sync_redis(), user_ids=user_ids, conversation_id=conversation_id)


def _members_changed(group: GroupChat, *, added: ObjectId | None = None, removed: ObjectId | None = None) -> None:
    """Mirror one membership change into the group's conversation, then drop the cached membership (brokers
    and the write path re-read it). Atomic ``$addToSet``/``$pull``, never a read-then-set, so concurrent
    changes cannot overwrite each other. The group document was written first: it is the truth."""
    if added is not None:
        Conversation.objects(room_id=group.id).update_one(add_to_set__members=added, set__updated_at=utcnow())
    if removed is not None:
        Conversation.objects(room_id=group.id).update_one(pull__members=removed)
    conversation = Conversation.objects(room_id=group.id).only("id").first()
    if conversation is not None:
        _membership_notify(conversation_id=str(conversation.id),
                           user_ids=[str(u) for u in (added, removed) if u is not None])


def group_rename(*, user_id: str, group_id: str, name: str) -> GroupChat:
    """Rename a group (admins only). Raises NotFound (not a member), Forbidden (not an admin)."""
    group = _admin_group(user_id=user_id, group_id=group_id)
    name = _group_name(name)
    GroupChat.objects(id=group.id).update_one(set__name=name, set__updated_at=utcnow())
    sync_redis().delete(group_card_key(str(group.id)))  # the conversation list shows the new name at once
    return GroupChat.objects(id=group.id).get()


def group_member_add(*, user_id: str, group_id: str, username: str) -> User:
    """Add ``username`` to the group (admins only); return the new member.

    Raises NotFound (group or user), Forbidden (not an admin), Conflict (already a member), ValidationFailed
    (group full). Side effects: group and conversation members, membership cache invalidated.
    """
    group = _admin_group(user_id=user_id, group_id=group_id)
    new = user_by_username(username=username)
    usernames_remember_sync(sync_redis(), names={new.username_key: str(new.id)})  # accounts made before it
    if len(group.members) >= GROUP_MAX_MEMBERS:
        raise ValidationFailed(f"a group has at most {GROUP_MAX_MEMBERS} members", code="too_many_members",
                               details={"limit": GROUP_MAX_MEMBERS})
    added = GroupChat.objects(id=group.id, members__ne=new.id).update_one(
        push__members=new.id, **{f"set__added_by__{new.id}": ObjectId(user_id)}, set__updated_at=utcnow())
    if not added:
        raise Conflict("already a member", details={"user_id": str(new.id)})
    _members_changed(group, added=new.id)
    return new


def group_admin_add(*, user_id: str, group_id: str, username: str) -> User:
    """Promote a member to admin (admins only). Raises NotFound, Forbidden, ValidationFailed (not a member),
    Conflict (already an admin)."""
    group = _admin_group(user_id=user_id, group_id=group_id)
    member = user_by_username(username=username)
    if member.id not in group.members:
        raise ValidationFailed("only members can become admins", details={"field": "username"},
                               code="not_a_member")
    promoted = GroupChat.objects(id=group.id, admins__ne=member.id).update_one(push__admins=member.id,
                                                                                set__updated_at=utcnow())
    if not promoted:
        raise Conflict("already an admin", details={"user_id": str(member.id)})
    _group_conversation_invalidate(group)
    return member


def group_admin_remove(*, user_id: str, group_id: str, admin_id: str) -> None:
    """Demote an admin to a plain member (admins only; an admin may demote themself).

    Raises NotFound (not a member of the group; ``admin_id`` not one of its admins), Forbidden (not an admin),
    Conflict ``last_admin`` (the group would be left without an admin: promote someone first, or leave, which
    hands the rights over). Side effects: ``group_chats.admins`` loses the id; the membership cache is dropped
    (admin rights are not cached, but every group change invalidates, so no reader is ever left stale).
    """
    target = object_id_or_404(admin_id, what="admin")
    group = _admin_group(user_id=user_id, group_id=group_id)
    if target not in group.admins:
        raise NotFound("not an admin of this group", details={"user_id": admin_id})
    # One conditional update, never a read-then-set: it matches only while the group still has a second admin
    # ("admins.1" exists), so two admins demoting each other at once cannot leave the group with none.
    demoted = GroupChat.objects(__raw__={"_id": group.id, "admins": target, "admins.1": {"$exists": True}}) \
        .update_one(pull__admins=target, set__updated_at=utcnow())
    if not demoted:
        if target not in GroupChat.objects(id=group.id).only("admins").get().admins:
            return  # demoted meanwhile by another admin: the outcome asked for
        raise Conflict("a group keeps at least one admin: promote another member first",
                       details={"user_id": admin_id}, code="last_admin")
    _group_conversation_invalidate(group)


def _group_conversation_invalidate(group: GroupChat) -> None:
    conversation = Conversation.objects(room_id=group.id).only("id").first()
    if conversation is not None:
        membership_invalidate_sync(sync_redis(), conversation_id=str(conversation.id))


def group_delete(*, user_id: str, group_id: str) -> None:
    """Delete a group and its conversation for every member (admins only). Raises NotFound, Forbidden.

    Side effects, in this order (no transactions: a crash part-way leaves a state the next call repairs):
    the ``conversations`` document goes first, so from then on REST answers 404 and the write path refuses
    sends (its membership cache is dropped and every broker told, through the membership-change announcement,
    that all members left: their live sockets get a ``membership left`` frame and stop receiving the
    conversation); then the group document (until then an admin still sees the group and may call again);
    then the conversation's messages and their edit versions. Events still in the stream when the group is
    deleted may be persisted afterwards; with no conversation they are never served.
    """
    group = _admin_group(user_id=user_id, group_id=group_id)
    conversation = Conversation.objects(room_id=group.id).only("id", "members").first()
    members = [str(m) for m in group.members]
    if conversation is not None:
        cid = str(conversation.id)
        Conversation.objects(id=conversation.id).delete()
        _membership_notify(conversation_id=cid, user_ids=sorted({*members, *(str(m) for m in conversation.members)}))
    GroupChat.objects(id=group.id).delete()
    if conversation is not None:
        # One indexed delete per collection on MongoDB; FerretDB v1 scans each collection once.
        Message.objects(conversation_id=conversation.id).delete()
        MessageVersion.objects(conversation_id=conversation.id).delete()


def _member_drop(group: GroupChat, member: ObjectId) -> None:
    GroupChat.objects(id=group.id).update_one(pull__members=member, pull__admins=member,
                                              **{f"unset__added_by__{member}": True}, set__updated_at=utcnow())
    # A group is never left without an admin while it has members: the longest-standing member inherits.
    fresh = GroupChat.objects(id=group.id).only("admins", "members").get()
    if not fresh.admins and fresh.members:
        GroupChat.objects(id=group.id).update_one(push__admins=fresh.members[0])
    _members_changed(group, removed=member)


def group_member_remove(*, user_id: str, group_id: str, member_id: str) -> None:
    """Remove a member (admins only; removing oneself is leaving). Raises NotFound, Forbidden.
    Side effects: the member loses membership and admin rights; the membership cache is invalidated."""
    member = object_id_or_404(member_id, what="member")
    if member_id == user_id:
        group_leave(user_id=user_id, group_id=group_id)
        return
    group = _admin_group(user_id=user_id, group_id=group_id)
    if member not in group.members:
        raise NotFound("not a member of this group", details={"user_id": member_id})
    _member_drop(group, member)


def group_leave(*, user_id: str, group_id: str) -> None:
    """Leave a group. The last admin leaving hands admin rights to the longest-standing member."""
    group = group_get_for_member(user_id=user_id, group_id=group_id)
    _member_drop(group, ObjectId(user_id))


# ------------------------------------------------------------------ message events (the shared write path)


def conversation_message_send(*, user_id: str, conversation_id: str, client_msg_id: str, content: str,
                              reply_to: str | None = None) -> Accepted:
    """Send through ``messaging.services.message_send`` (the WebSocket path's function): the message is in
    the stream, and so on its way to live clients and MongoDB, when this returns. ``reply_to``: a reply."""
    return run_async(lambda c, b: messaging.message_send(c, bus=b, user_id=user_id, conversation_id=conversation_id,
                                                         client_msg_id=client_msg_id, content=content,
                                                         reply_to=reply_to))


def message_reaction_change(*, user_id: str, message_id: str, emoji: str, op: str) -> ReactionChange:
    """Add (``op`` "add") or remove ("remove") the caller's reaction through
    ``messaging.reactions.reaction_change`` (the WebSocket path's function)."""
    return run_async(lambda c, b: reaction_change(c, bus=b, user_id=user_id, message_id=message_id, emoji=emoji,
                                                  op=op))


def message_edit(*, user_id: str, message_id: str, content: str) -> Accepted:
    """Edit (sender only) through ``messaging.services.message_edit``."""
    return run_async(lambda c, b: messaging.message_edit(c, bus=b, user_id=user_id, message_id=message_id,
                                                         content=content))


def message_delete(*, user_id: str, message_id: str) -> Accepted:
    """Tombstone (sender only) through ``messaging.services.message_delete``."""
    return run_async(lambda c, b: messaging.message_delete(c, bus=b, user_id=user_id, message_id=message_id))


def conversation_read_mark(*, user_id: str, conversation_id: str, seq: int) -> int:
    """Move the caller's read cursor forward (never back); return the cursor now in force."""
    return run_async(lambda c, b: messaging.read_mark(c, bus=b, user_id=user_id, conversation_id=conversation_id,
                                                      seq=seq))


# ------------------------------------------------------------------ staff moderation


def message_tombstone_by_staff(*, message_id: str, staff_username: str) -> int:
    """Delete a message on behalf of staff; return the seq of the ``message.deleted`` event.

    The event is built and appended by ``messaging.services.message_delete_by_staff``, like a sender's delete
    (live clients see it, the storage pipeline applies it, later edits are refused); the drain's own statement
    for it is also written to MongoDB at once (``storage.services.message_event_write``), so the admin shows
    the result without waiting for the drain (the drain's later write of the same entry changes nothing).
    Raises NotFound (no such message, or already deleted). The caller logs the action (``api.admin`` writes a
    Django LogEntry).
    """
    if not messaging.MESSAGE_ID_RE.match(message_id):
        raise NotFound("no such message", details={"message_id": message_id[:64]})
    accepted = run_async(lambda c, b: messaging.message_delete_by_staff(c, bus=b, staff_username=staff_username,
                                                                        message_id=message_id))
    payload = {k: v for k, v in accepted.event.items() if k != "seq"}  # the entry's payload (the ack adds seq)
    message_event_write(event=Event(
        entry_id="", type="message.deleted", conversation_id=accepted.conversation_id, seq=accepted.seq,
        data=payload))
    logger.info("staff %s deleted message %s of conversation %s (event seq %s)", staff_username, message_id,
                accepted.conversation_id, accepted.seq)
    return accepted.seq

