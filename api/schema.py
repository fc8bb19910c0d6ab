"""OpenAPI details drf-spectacular cannot infer: the one error body, on every operation.

Every operation may answer 400 (malformed or invalid input), 404 (unknown path or id), 405, 406, 415 and,
when authenticated, 401; the hook adds each with the ``Error`` schema, so a client (and schemathesis) sees
every status the API can really give.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "description": "stable, machine-readable (e.g. not_found)"},
                "message": {"type": "string", "description": "for humans"},
                "details": {"type": "object", "additionalProperties": True},
            },
        }
    },
}
_DESCRIPTIONS = {
    "400": "Malformed JSON, wrong types, missing or invalid fields",
    "401": "Missing, expired, forged or revoked token",
    "403": "Authenticated but not allowed (e.g. not the sender, not an admin)",
    "404": "Unknown id, or a conversation/group the caller is not in",
    "405": "Method not allowed",
    "406": "Not acceptable",
    "409": "Duplicate (taken username, existing contact or member)",
    "413": "Content over the size limit",
    "415": "Unsupported media type (send application/json)",
    "429": "Rate limited; see Retry-After",
    "503": "A backing service is unavailable; see Retry-After",
}
ALWAYS = ("400", "404", "405", "406", "415", "503")
WITH_BODY = ("409", "413", "429")
# Reads with a rate limit of their own (docs/api.md): they may answer 429 too.
RATE_LIMITED_READS = frozenset({"/api/v1/search"})


def error_responses_hook(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: add the error responses to every operation."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for path, methods in result.get("paths", {}).items():
        for method, operation in methods.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            codes = [*ALWAYS, "401", "403"]
            if method in ("post", "patch", "put", "delete"):
                codes += list(WITH_BODY)
            elif path in RATE_LIMITED_READS:
                codes.append("429")
            for code in codes:
                operation["responses"].setdefault(code, {
                    "description": _DESCRIPTIONS[code],
                    "content": {"application/json": {"schema": ref}},
                })
    return result


class JWTAuthenticationScheme(OpenApiAuthenticationExtension):
    """Documents ``api.auth.JWTAuthentication`` as an HTTP bearer scheme (registered on import)."""

    target_class = "api.auth.JWTAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "An access token from /api/v1/auth/login or /api/v1/auth/refresh"}
