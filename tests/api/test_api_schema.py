"""Property-based run of the whole REST API against its own OpenAPI schema (schemathesis over WSGI, in
process): no input may cause a 500, and every answer must match the schema (status, content type, body).

Bounded on purpose (a few examples per operation, positive and negative data) so it takes well under a
few minutes on a shared 2-core machine; the real servers (Redis, FerretDB) answer behind the views.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from drf_spectacular.generators import SchemaGenerator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.api import Account, account

# The WSGI handler's request signals touch Django's SQL connection once any earlier test opened it, so the
# run needs the database allowed (the API itself keeps no data there).
pytestmark = pytest.mark.django_db
MAX_EXAMPLES = 25

schema = schemathesis.openapi.from_wsgi("/api/v1/schema?format=json", get_wsgi_application())


@pytest.fixture(scope="module")
def fuzz_user(servers: Any) -> Account:
    return account("fuzz")


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_api_answers_every_input_without_5xx_and_as_documented(case: Any, fuzz_user: Account,
                                                               generous_rates: None) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {fuzz_user.access}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance, negative_data_rejection],
    )


def test_schema_is_openapi_3_with_every_contract_path() -> None:
    document = SchemaGenerator().get_schema(request=None, public=True)
    assert document["openapi"].startswith("3.")
    paths = set(document["paths"])
    for required in ("/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/auth/refresh", "/api/v1/auth/logout",
                     "/api/v1/auth/ws-ticket", "/api/v1/users/me", "/api/v1/users", "/api/v1/chats/single",
                     "/api/v1/chats/group", "/api/v1/chats/group/{group_id}/members",
                     "/api/v1/chats/group/{group_id}/admins", "/api/v1/conversations",
                     "/api/v1/conversations/{conversation_id}/messages", "/api/v1/messages/{message_id}",
                     "/api/v1/conversations/{conversation_id}/read"):
        assert required in paths, required


def test_docs_page_schema_and_browsable_api(servers: Any) -> None:
    from tests.support.api import anonymous

    client = anonymous()
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()
    assert client.get("/api/v1/redoc").status_code == 200
    schema_yaml = client.get("/api/v1/schema")
    assert schema_yaml.status_code == 200 and b"openapi: 3" in schema_yaml.content
    # The browsable API renders HTML (with its raw-data form) for a browser.
    form = client.get("/api/v1/auth/login", HTTP_ACCEPT="text/html")
    assert form["Content-Type"].startswith("text/html") and b"_content" in form.content
    user = account("browser")
    page = user.client.get("/api/v1/conversations", HTTP_ACCEPT="text/html")
    assert page.status_code == 200 and page["Content-Type"].startswith("text/html")
    missing = client.get("/api/v1/no-such-route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
