"""The web client reads the API as documented: every field its normalizers read from a REST answer is a
property of that answer's schema in the OpenAPI document (a renamed or guessed field fails here, not in a
user's browser after a reload)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from drf_spectacular.generators import SchemaGenerator

from chatstream_site.localservers import ROOT

STATE_JS = ROOT / "gateway" / "webclient" / "state.js"
# normalizer in state.js -> the schema component of the REST answer it reads
READERS = {"normalizeConversation": "ConversationOut", "normalizeMembers": "MemberOut",
           "normalizeMessage": "MessageOut", "normalizeGroup": "GroupOut", "normalizeVersions": "MessageVersionOut"}


def function_body(source: str, name: str) -> str:
    """The text of ``export function name(...) { ... }`` (braces balanced)."""
    start = source.index(f"export function {name}(")
    depth, i = 0, source.index("{", start)
    for j in range(i, len(source)):
        depth += {"{": 1, "}": -1}.get(source[j], 0)
        if depth == 0:
            return source[i:j + 1]
    raise AssertionError(f"unbalanced braces in {name}")


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return schema["components"]["schemas"]


@pytest.mark.parametrize(("function", "component"), sorted(READERS.items()))
def test_every_field_the_client_reads_is_in_the_schema(function: str, component: str,
                                                       components: dict[str, Any]) -> None:
    body = function_body(STATE_JS.read_text(), function)
    read = set(re.findall(r"\braw\.(\w+)", body))
    assert read, f"{function} reads no field: the pattern no longer matches the code"
    properties = set(components[component]["properties"])
    assert read <= properties, f"{function} reads {sorted(read - properties)}, not in {component}"


def test_the_peer_fields_the_client_reads_are_in_the_schema(components: dict[str, Any]) -> None:
    source = STATE_JS.read_text()
    read = set(re.findall(r"\bc\.peer\.(\w+)", source))
    assert read and read <= set(components["UserOut"]["properties"]), read


def test_the_old_guessed_fields_are_gone() -> None:
    """``other_user`` and ``read_cursors`` were never sent by the API (found in review)."""
    client = "\n".join(p.read_text() for p in (ROOT / "gateway" / "webclient").glob("*.js"))
    assert "other_user" not in client and "read_cursors" not in client
