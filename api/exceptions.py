"""The REST edge of the domain error hierarchy: every failure becomes ``{"error": {code, message, details}}``.

DRF calls :func:`exception_handler` for anything a view (or its authentication, parsing, permission checks)
raises. Domain errors carry their own status; DRF's own errors and Django's 404 are mapped to the same body;
an unavailable Redis or MongoDB is a 503 with Retry-After. Only a genuine bug falls through to Django's
``handler500`` (also a JSON body).
"""

from __future__ import annotations

import logging
from typing import Any

import mongoengine
import pymongo.errors
import redis
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from django_ratelimit.exceptions import Ratelimited
from rest_framework import exceptions as drf
from rest_framework.response import Response

from core.errors import Conflict, DomainError, RateLimited, Unavailable, ValidationFailed, error_body

logger = logging.getLogger(__name__)

# DRF exception class -> our error code (the status comes from the exception).
_DRF_CODES: list[tuple[type[drf.APIException], str]] = [
    (drf.ParseError, "malformed"),
    (drf.ValidationError, "invalid"),
    (drf.NotAuthenticated, "unauthenticated"),
    (drf.AuthenticationFailed, "unauthenticated"),
    (drf.PermissionDenied, "forbidden"),
    (drf.NotFound, "not_found"),
    (drf.MethodNotAllowed, "method_not_allowed"),
    (drf.NotAcceptable, "not_acceptable"),
    (drf.UnsupportedMediaType, "unsupported_media_type"),
    (drf.Throttled, "rate_limited"),
]
UNAVAILABLE_RETRY_AFTER_S = 5


def _body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return error_body(code=code, message=message, details=details)


def _domain_response(exc: DomainError) -> Response:
    response = Response(exc.as_body(), status=exc.status)
    if isinstance(exc, RateLimited):
        response["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Unavailable):
        response["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


def _drf_details(exc: drf.APIException) -> tuple[str, dict[str, Any]]:
    """A one-line message plus the structured detail (field errors for a ValidationError)."""
    detail = exc.detail
    if isinstance(detail, dict):
        fields = {str(k): v for k, v in detail.items()}
        first_field, first = next(iter(fields.items()), ("", ""))
        first_text = first[0] if isinstance(first, list) and first else first
        if first_field == "non_field_errors":
            return str(first_text), {"fields": fields}
        return f"{first_field}: {first_text}", {"fields": fields}
    if isinstance(detail, list):
        return (str(detail[0]) if detail else "invalid request"), {"errors": detail}
    return str(detail), {}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF ``EXCEPTION_HANDLER``: translate once, here. Returns None only for unexpected bugs (-> 500)."""
    if isinstance(exc, DomainError):
        return _domain_response(exc)
    if isinstance(exc, Ratelimited):  # django-ratelimit's decorator form, should a view use it
        return _domain_response(RateLimited("too many requests; slow down", retry_after_s=60))
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()
    if isinstance(exc, drf.APIException):
        code = next((c for cls, c in _DRF_CODES if isinstance(exc, cls)), "error")
        message, details = _drf_details(exc)
        response = Response(_body(code, message, details), status=exc.status_code)
        if isinstance(exc, drf.Throttled) and exc.wait is not None:
            response["Retry-After"] = str(int(exc.wait) + 1)
        if exc.status_code == 401:
            response["WWW-Authenticate"] = 'Bearer realm="api"'
        return response
    # Safety nets: these mean a race or a bad value slipped past validation, not a server bug.
    if isinstance(exc, mongoengine.NotUniqueError):
        return _domain_response(Conflict("already exists"))
    if isinstance(exc, mongoengine.ValidationError):
        return _domain_response(ValidationFailed(str(exc.message)))
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, pymongo.errors.ConnectionFailure)):
        logger.warning("dependency unavailable: %s", exc)
        return _domain_response(Unavailable("a backing service is unavailable; retry shortly"))
    return None
