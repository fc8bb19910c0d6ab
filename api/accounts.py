"""Writes of the REST API about accounts: sign-up, tokens (login, refresh with rotation, logout), WebSocket
tickets, password change and account removal (which end every session), status and contacts.

Every function takes keyword-only, already type-checked arguments (serializers did that) and raises
``core.errors`` domain errors; the DRF exception handler turns them into HTTP answers.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import mongoengine
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.hashers import check_password, make_password
from django.contrib.auth.models import User as DjangoUser
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError

from api.selectors import object_id_or_404, user_by_username
from api.services import group_leave
from core import revocation
from core.clients import sync_redis
from core.closecodes import CLOSE_SESSION_ENDED
from core.documents import GroupChat, User, utcnow
from core.errors import Conflict, Forbidden, NotFound, Unauthenticated, ValidationFailed
from core.tokens import Claims, token_decode, token_issue, ws_ticket_issue
from messaging.conversation_index import user_conversations_created
from messaging.frames import SESSIONS_CLOSE, user_group
from messaging.mentions import usernames_remember_sync
from messaging.presence import user_cards_forget
from messaging.selectors import user_conversations_init

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
STATUSES = ("online", "away", "busy", "offline")

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ accounts and tokens


@dataclass(frozen=True, slots=True)
class TokenPair:
    access: str
    refresh: str
    expires_in: int  # seconds the access token lives
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type, not a secret


def _token_pair(*, user_id: str, username: str, gen: int = 0) -> TokenPair:
    return TokenPair(access=token_issue(user_id=user_id, username=username, type="access", gen=gen),
                     refresh=token_issue(user_id=user_id, username=username, type="refresh", gen=gen),
                     expires_in=int(settings.JWT_ACCESS_TTL_S))


def user_create(*, username: str, email: str, password: str) -> User:
    """Register a user. Raises ValidationFailed (bad username or weak password) or Conflict (taken).

    Side effect: one ``users`` document with an argon2 hash of the password (``settings.PASSWORD_HASHERS``).
    The unique indexes decide races: of two concurrent registrations of one name, one gets Conflict.
    """
    if not USERNAME_RE.match(username):
        raise ValidationFailed("username must be 3-32 characters of A-Z a-z 0-9 _ . -",
                               details={"field": "username"})
    email = email.strip().lower()
    try:
        # An unsaved Django user: the similarity validator reads field names from its _meta when it refuses.
        validate_password(password, user=DjangoUser(username=username, email=email))
    except DjangoValidationError as exc:
        raise ValidationFailed(" ".join(exc.messages), details={"field": "password"}) from None
    key = username.lower()
    if User.objects(username_key=key).only("id").first() is not None:
        raise Conflict("username is taken", details={"field": "username"}, code="username_taken")
    if User.objects(email=email).only("id").first() is not None:
        raise Conflict("email is already registered", details={"field": "email"}, code="email_taken")
    user = User(username=username, username_key=key, email=email, password=make_password(password))
    try:
        user.save()
    except mongoengine.NotUniqueError:
        raise Conflict("username or email is taken", code="username_taken") from None
    # The write path resolves @username from this index, never from MongoDB (messaging/mentions.py).
    usernames_remember_sync(sync_redis(), names={key: str(user.id)})
    # In no conversation yet: stored so (docs/adr/0043) and cached so, both kept by every membership change,
    # so connects read no store and a later rebuild of the cache reads one document by _id.
    user_conversations_created(user_id=str(user.id))
    user_conversations_init(sync_redis(), user_id=str(user.id))
    return user


def auth_login(*, username: str, password: str) -> TokenPair:
    """Check the password and issue an access/refresh pair. Raises Unauthenticated (one message for an
    unknown user, a removed account and a wrong password). Side effect: re-hashes a password stored with an
    older hasher."""
    user = User.objects(username_key=username.lower(), deactivated_at=None).first()
    if user is None:
        make_password(password)  # spend the same time as a real check: no user enumeration by timing
        raise Unauthenticated("wrong username or password", code="invalid_credentials")

    def upgrade(raw: str) -> None:
        User.objects(id=user.id).update_one(set__password=make_password(raw))

    if not check_password(password, user.password, setter=upgrade):
        raise Unauthenticated("wrong username or password", code="invalid_credentials")
    return _token_pair(user_id=str(user.id), username=user.username, gen=user.token_gen or 0)


def auth_refresh(*, refresh: str) -> TokenPair:
    """Rotate: revoke the presented refresh token and issue a new pair. A token already used or logged out
    is refused (Unauthenticated ``token_revoked``), and so is one issued before the user's last password
    change or of a removed account (its ``gen`` is below ``users.token_gen``: MongoDB, not Redis, is the
    truth for the 14-day refresh tokens). Side effect: one revocation entry in Redis."""
    claims = token_decode(refresh, expected_type="refresh")
    if not revocation.revoke(jti=claims.jti, expires_at=claims.expires_at):
        logger.warning("refused a reused refresh token of user %s (jti %s)", claims.user_id, claims.jti)
        raise Unauthenticated("refresh token was already used or logged out; log in again", code="token_revoked")
    user = User.objects(id=claims.user_id).only("id", "username", "token_gen", "deactivated_at").first()
    if user is None:
        raise Unauthenticated("the account no longer exists", code="token_invalid")
    if user.deactivated_at is not None or claims.gen < (user.token_gen or 0):
        raise Unauthenticated("the password changed or the account was removed; log in again",
                              code="token_revoked")
    return _token_pair(user_id=str(user.id), username=user.username, gen=user.token_gen or 0)


def auth_logout(*, refresh: str, access: Claims | None = None) -> None:
    """Revoke the refresh token (and the caller's access token, when the request carried one) and close the
    user's live WebSockets (:func:`user_sessions_close`). Idempotent: logging out twice is not an error.
    Raises Unauthenticated for a forged or expired token."""
    claims = token_decode(refresh, expected_type="refresh")
    revocation.revoke(jti=claims.jti, expires_at=claims.expires_at)
    if access is not None and access.user_id == claims.user_id:
        revocation.revoke(jti=access.jti, expires_at=access.expires_at)
    user_sessions_close(user_id=claims.user_id)


def user_sessions_close(*, user_id: str) -> None:
    """Close every live WebSocket of the user, on every broker, with close code 4010 (logout; and what a
    password change or an account removal must call). Side effect: one ``group_send`` on the channel layer
    (Redis) to the user's group, whose members are the brokers holding a socket of theirs (docs/adr/0027).
    A channel layer that is down is logged, not raised: the tokens are revoked already, and the sockets'
    tickets were single-use."""
    layer = get_channel_layer()
    try:
        async_to_sync(layer.group_send)(user_group(user_id), {
            "type": SESSIONS_CLOSE, "user_id": user_id, "code": CLOSE_SESSION_ENDED})
    except Exception:  # the layer's Redis errors are not one type (redis-py, channels-redis, OSError)
        logger.exception("could not close the live sessions of user %s", user_id)


def ws_ticket_create(*, user_id: str, username: str, gen: int = 0) -> tuple[str, int]:
    """A single-use WebSocket ticket and its lifetime in seconds; ``gen`` is the token generation of the
    access token that asked for it (a ticket of an older generation is refused where it is consumed).
    Side effect: one Redis key with a TTL."""
    return (ws_ticket_issue(sync_redis(), user_id=user_id, username=username, gen=gen),
            int(settings.WS_TICKET_TTL_S))


def _password_checked(*, user_id: str, password: str) -> User:
    """The user, if ``password`` is theirs. Raises Forbidden ``wrong_password`` (the caller counts it in the
    login back-off), Unauthenticated when the account is gone. No hash upgrade here: the callers replace
    the hash with a compare-and-set on the one read now."""
    user = User.objects(id=object_id_or_404(user_id, what="user"), deactivated_at=None).first()
    if user is None:
        raise Unauthenticated("the account no longer exists", code="token_revoked")
    if not check_password(password, user.password):
        raise Forbidden("wrong password", code="wrong_password", details={"field": "password"})
    return user


def _password_validate(password: str, *, field: str, username: str, email: str) -> None:
    try:
        validate_password(password, user=DjangoUser(username=username, email=email))
    except DjangoValidationError as exc:
        raise ValidationFailed(" ".join(exc.messages), details={"field": field}) from None


def auth_password_change(*, user_id: str, old_password: str, new_password: str) -> TokenPair:
    """Change the password and end every session of the user; return a fresh pair for the caller's device.

    Raises Forbidden ``wrong_password``, ValidationFailed (a weak new password, Django's validators as at
    registration), Conflict (the password changed meanwhile). Side effects, in this order: the new hash and
    ``users.token_gen`` + 1 in one MongoDB update (from then on every refresh token issued before is
    refused); the user's generation marker in Redis (every older access token and ticket refused, at the
    api and the gateway); every live WebSocket of the user closed with 4010 (:func:`user_sessions_close`).
    """
    user = _password_checked(user_id=user_id, password=old_password)
    _password_validate(new_password, field="new_password", username=user.username, email=user.email)
    # Compare-and-set on the hash that was checked: of two concurrent changes one wins, the other is a 409.
    changed = User.objects(id=user.id, deactivated_at=None, password=user.password).modify(
        new=True, set__password=make_password(new_password), inc__token_gen=1)
    if changed is None:
        raise Conflict("the password was changed meanwhile; log in again", code="password_changed")
    gen = int(changed.token_gen)
    revocation.user_tokens_revoke(user_id=user_id, gen=gen)
    user_sessions_close(user_id=user_id)
    logger.info("user %s changed their password (token generation %s)", user_id, gen)
    return _token_pair(user_id=user_id, username=changed.username, gen=gen)


def user_remove(*, user_id: str, password: str) -> None:
    """Remove (deactivate) the caller's account (docs/api.md "Account removal").

    Raises Forbidden ``wrong_password``. Side effects, in this order: the user leaves every group through
    :func:`group_leave` (admin hand-over applies; a crash after this leaves an account its owner can remove
    again); then one MongoDB update: ``deactivated_at`` set, ``token_gen`` + 1, an unusable password hash, the
    e-mail address replaced by ``<id>@removed.invalid`` (released for a new account), contacts emptied; the
    username stays reserved and the document stays, so the user's messages keep their sender. Then the
    generation marker in Redis (every access token and ticket refused) and every live WebSocket closed with
    4010. 1:1 conversations and sent messages are kept.
    """
    user = _password_checked(user_id=user_id, password=password)
    for group in GroupChat.objects(members=user.id).only("id"):
        with contextlib.suppress(NotFound):  # left (or was removed) concurrently
            group_leave(user_id=user_id, group_id=str(group.id))
    removed = User.objects(id=user.id, deactivated_at=None).modify(
        new=True, set__deactivated_at=utcnow(), inc__token_gen=1, set__password=make_password(None),
        set__email=f"{user.id}@removed.invalid", set__contacts=[], set__status="offline")
    if removed is None:
        raise Unauthenticated("the account no longer exists", code="token_revoked")
    user_cards_forget(sync_redis(), user_ids=[user_id])  # its status is offline now (docs/adr/0050)
    revocation.user_tokens_revoke(user_id=user_id, gen=int(removed.token_gen))
    user_sessions_close(user_id=user_id)
    logger.info("user %s removed their account", user_id)


# ------------------------------------------------------------------ profile and contacts


def user_status_set(*, user_id: str, status: str) -> User:
    """Set the user's status (one of ``STATUSES``). Side effects: updates ``status`` and ``last_seen``, drops
    the user's cached card."""
    if status not in STATUSES:
        raise ValidationFailed(f"status must be one of {', '.join(STATUSES)}", details={"field": "status"})
    user = User.objects(id=user_id).modify(new=True, set__status=status, set__last_seen=utcnow())
    if user is None:
        raise NotFound("no such user")
    user_cards_forget(sync_redis(), user_ids=[user_id])  # the conversation list shows it at once (docs/adr/0050)
    return user


def contact_add(*, user_id: str, username: str) -> User:
    """Add the user called ``username`` to the caller's contacts; return that user.

    Raises NotFound (no such user), ValidationFailed (oneself), Conflict (already a contact).
    """
    contact = user_by_username(username=username)
    if str(contact.id) == user_id:
        raise ValidationFailed("you cannot add yourself as a contact", details={"field": "username"})
    # Conditional push: atomic, so two concurrent adds cannot store the contact twice.
    added = User.objects(id=user_id, contacts__ne=contact.id).update_one(push__contacts=contact.id)
    if not added:
        raise Conflict("already a contact", details={"user_id": str(contact.id)})
    return contact


def contact_remove(*, user_id: str, contact_id: str) -> None:
    """Remove a contact. Raises NotFound if it is not one."""
    oid = object_id_or_404(contact_id, what="contact")
    removed = User.objects(id=user_id, contacts=oid).update_one(pull__contacts=oid)
    if not removed:
        raise NotFound("no such contact", details={"user_id": contact_id})
