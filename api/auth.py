"""DRF authentication by JWT access token (``Authorization: Bearer <access>``).

The token is checked with :func:`core.tokens.token_decode` (algorithm pinned) and against the revocation
list (a logged-out session's access token, and every token of a user whose password changed or whose
account was removed, is refused before it expires). The request's user is a small
:class:`ApiUser`: the chat users live in MongoDB, not in Django's auth tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from core import revocation
from core.errors import Unauthenticated
from core.tokens import Claims, token_decode


@dataclass(frozen=True, slots=True)
class ApiUser:
    """The authenticated chat user of a request (from the token's claims; no database read)."""

    id: str
    username: str
    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_active = True

    def __str__(self) -> str:
        return self.username


class JWTAuthentication(BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[ApiUser, Claims] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None  # anonymous; IsAuthenticated answers 401 where a user is required
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or " " in token.strip():
            raise Unauthenticated("Authorization must be 'Bearer <access token>'", code="token_invalid")
        claims = token_decode(token.strip(), expected_type="access")
        # One MGET: the token's jti (logout) and the user's generation marker (password change, removal).
        if revocation.access_refused(jti=claims.jti, user_id=claims.user_id, gen=claims.gen):
            raise Unauthenticated("token revoked; log in again", code="token_revoked")
        return ApiUser(id=claims.user_id, username=claims.username), claims

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) to anonymous requests.
        return f'{self.keyword} realm="api"'


def request_user(request: Any) -> ApiUser:
    """The authenticated user of a view that requires one (IsAuthenticated ran before)."""
    user = request.user
    if not isinstance(user, ApiUser):
        raise Unauthenticated("authentication required")
    return user
