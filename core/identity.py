"""The identity the gateway passes upstream: signed headers that upstreams trust and clients cannot forge.

The gateway authenticates every protected request at the edge (a JWT for HTTP, the single-use ticket for
``/ws/``), removes every client-sent ``X-ChatStream-*`` header, and adds:

* ``X-ChatStream-User-Id`` and ``X-ChatStream-Username``: the verified user;
* ``X-ChatStream-Identity-Ts``: the signing time, integer Unix seconds;
* ``X-Request-Id``: the request id (see :mod:`gateway.requestid`);
* ``X-ChatStream-Identity-Sig``: hex HMAC-SHA256 over ``v1``, user id, username, timestamp and request id,
  keyed with a secret derived from ``SECRET_KEY`` (Django's :func:`~django.utils.crypto.salted_hmac` with the
  salt :data:`SALT`), so only holders of ``SECRET_KEY`` (the gateway and the upstreams) can sign.

Upstreams (brokers, api) call :func:`identity_verify` on the request's headers and use the returned
:class:`~core.tokens.TicketOwner`; a missing, stale or forged signature gives ``None`` (treat as anonymous).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Mapping

from django.conf import settings
from django.utils.crypto import salted_hmac

from core.tokens import TicketOwner

SALT = "chatstream.gateway.identity.v1"
PREFIX = b"x-chatstream-"
USER_ID = b"x-chatstream-user-id"
USERNAME = b"x-chatstream-username"
TIMESTAMP = b"x-chatstream-identity-ts"
SIGNATURE = b"x-chatstream-identity-sig"
REQUEST_ID = b"x-request-id"
# 60 s: the gateway signs right before it connects upstream, so a valid header is at most a few ms old;
# the slack covers clock skew between machines (NTP keeps it far below this) without letting a header
# captured inside the network be replayed for long.
MAX_AGE_S = 60

Headers = Iterable[tuple[bytes, bytes]] | Mapping[str, str]


def _signature(*, user_id: str, username: str, timestamp: str, request_id: str, secret: str) -> str:
    message = "\n".join(("v1", user_id, username, timestamp, request_id))
    return salted_hmac(SALT, message, secret=secret, algorithm="sha256").hexdigest()


def identity_strip(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without any ``X-ChatStream-*`` header: clients must never set the identity. Pure."""
    return [(k, v) for k, v in headers if not k.lower().startswith(PREFIX)]


def identity_headers(*, owner: TicketOwner, request_id: str, now: float | None = None,
                     secret: str | None = None) -> list[tuple[bytes, bytes]]:
    """The signed identity headers for ``owner`` (ASGI-style byte pairs, lower-case names). Pure.

    ``X-Request-Id`` is not included: the request-id layer always sets it, and the signature covers it.
    """
    timestamp = str(int(now if now is not None else time.time()))
    signature = _signature(user_id=owner.user_id, username=owner.username, timestamp=timestamp,
                           request_id=request_id, secret=secret or settings.SECRET_KEY)
    return [
        (USER_ID, owner.user_id.encode()),
        (USERNAME, owner.username.encode()),
        (TIMESTAMP, timestamp.encode()),
        (SIGNATURE, signature.encode()),
    ]


def _lookup(headers: Headers) -> dict[bytes, bytes]:
    if isinstance(headers, Mapping):
        return {str(k).lower().encode(): str(v).encode() for k, v in headers.items()}
    found: dict[bytes, bytes] = {}
    for key, value in headers:
        name = key.lower()
        if name in found:
            # Two copies of a signed header: refuse rather than guess which one the signature covers.
            found[name] = b"\0duplicate"
        else:
            found[name] = value
    return found


def identity_verify(headers: Headers, *, now: float | None = None, max_age_s: int = MAX_AGE_S,
                    secret: str | None = None) -> TicketOwner | None:
    """The user the gateway vouched for in ``headers``, or None. Pure (reads ``settings.SECRET_KEY``).

    ``headers`` is an ASGI scope's ``headers`` list of byte pairs, or a mapping of header names to values
    (Django's ``request.headers``). None when a header is missing or duplicated, the signature does not
    match, or the timestamp is older than ``max_age_s`` (or that far in the future).
    """
    found = _lookup(headers)
    try:
        user_id = found[USER_ID].decode()
        username = found[USERNAME].decode()
        timestamp = found[TIMESTAMP].decode()
        signature = found[SIGNATURE].decode()
        request_id = found.get(REQUEST_ID, b"").decode()
    except (KeyError, UnicodeDecodeError):
        return None
    if not timestamp.isdigit() or not user_id:
        return None
    current = now if now is not None else time.time()
    if abs(current - int(timestamp)) > max_age_s:
        return None
    expected = _signature(user_id=user_id, username=username, timestamp=timestamp, request_id=request_id,
                          secret=secret or settings.SECRET_KEY)
    if not hmac.compare_digest(expected, signature):
        return None
    return TicketOwner(user_id=user_id, username=username)
