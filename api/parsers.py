"""The request body parser of the REST API: DRF's JSON parser, plus one failure it lets through."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's ``JSONParser``, except that a body nested deeper than the interpreter's recursion limit (about
    1,000 levels: ``[[[[...]]]]``) is a 400 ``malformed`` like any other unparsable body. DRF catches only
    ``ValueError``; ``json.load`` raises ``RecursionError`` for such a body, which became a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict[str, Any] | None = None) -> Any:
        try:
            return super().parse(stream, media_type=media_type, parser_context=parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body nests too deeply") from None
