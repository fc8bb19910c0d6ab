"""The default store serves ``_id`` equality from the ``_id`` index (docs/adr/0035).

FerretDB v1.24.2's SQLite backend created the ``_id`` index on one spelling of the path and filtered on another,
so every find, update and delete by ``_id`` scanned the whole table; ``scripts/bootstrap.py`` builds it with the
one-line patch that makes them agree. The plan is what FerretDB's ``explain`` returns from SQLite's
``EXPLAIN QUERY PLAN`` (the same ``WHERE`` its updates and deletes use), so this fails on an unpatched build.
"""

from __future__ import annotations

import uuid
from typing import Any

import pymongo
import pytest
from bson import ObjectId

from chatstream_site.localservers import Servers


@pytest.fixture
def collection(servers: Servers) -> Any:
    if servers.mongodb is None:
        pytest.skip("a real MongoDB: its _id index is its own")
    client: Any = pymongo.MongoClient(servers.mongodb_uri)
    coll = client.get_default_database()[f"idx_{uuid.uuid4().hex[:8]}"]
    coll.insert_many([{"_id": f"m{n}", "n": n} for n in range(200)] + [{"_id": ObjectId(), "n": -1}])
    yield coll
    coll.drop()
    client.close()


def plan(coll: Any, value: Any) -> str:
    reply = coll.database.command("explain", {"find": coll.name, "filter": {"_id": value}})
    return " | ".join(str(step) for step in reply["queryPlanner"]["Plan"])


@pytest.mark.parametrize("value", ["m150", ObjectId()], ids=["string", "objectid"])
def test_an_id_equality_is_an_index_search(collection: Any, value: Any) -> None:
    steps = plan(collection, value)
    assert "USING INDEX" in steps and "SCAN" not in steps, steps


def test_writes_by_id_still_find_their_document(collection: Any) -> None:
    """The patched spelling selects the same documents: an update and a delete by _id hit exactly one."""
    assert collection.update_one({"_id": "m199"}, {"$set": {"n": 1000}}).modified_count == 1
    assert collection.find_one({"_id": "m199"})["n"] == 1000
    assert collection.find_one({"_id": "m198"})["n"] == 198
    assert collection.delete_one({"_id": "m0"}).deleted_count == 1
    assert collection.find_one({"_id": "m0"}) is None and collection.count_documents({}) == 200
