"""The one domain error hierarchy. Services raise these; each edge translates them once:

* HTTP (DRF exception handler, gateway): ``status`` and ``{"error": {"code", "message", "details"}}``;
* WebSocket (consumers): an ``error {code, message, ref}`` frame, the connection stays open;
* Celery tasks: :class:`Retryable` means retry with backoff, anything else is a poison entry.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "error"
    status = 400

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def as_body(self) -> dict[str, Any]:
        return error_body(code=self.code, message=self.message, details=self.details)


def error_body(*, code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one error shape of every HTTP answer of every role (docs/interface.md):
    ``{"error": {"code", "message", "details"}}``. Pure."""
    return {"error": {"code": code, "message": message, "details": details or {}}}


class ValidationFailed(DomainError):
    code = "invalid"
    status = 400


class Unauthenticated(DomainError):
    code = "unauthenticated"
    status = 401


class Forbidden(DomainError):
    code = "forbidden"
    status = 403


class NotFound(DomainError):
    code = "not_found"
    status = 404


class Conflict(DomainError):
    code = "conflict"
    status = 409


class PayloadTooLarge(DomainError):
    code = "too_large"
    status = 413


class RateLimited(DomainError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details={"retry_after": retry_after_s, **(details or {})})
        self.retry_after_s = retry_after_s


class Unavailable(DomainError):
    """A dependency (Redis, MongoDB, an upstream) is down; safe to retry later."""

    code = "unavailable"
    status = 503


class Retryable(DomainError):
    """For tasks: the work may succeed if tried again (a server was away)."""

    code = "retry"
    status = 503
