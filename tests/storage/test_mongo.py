"""mongoengine over the wire: what one process writes, another reads through the MongoDB-protocol server."""

from __future__ import annotations

import subprocess
import sys
import uuid

import mongoengine

from chatstream_site.localcluster import child_env
from chatstream_site.localservers import ROOT, Servers

WRITER = """
import sys, mongoengine
mongoengine.connect(host=sys.argv[1], uuidRepresentation="standard")
class Probe(mongoengine.Document):
    token = mongoengine.StringField(required=True, unique=True)
    n = mongoengine.IntField()
    meta = {"collection": "probes"}
Probe(token=sys.argv[2], n=42).save()
print("written")
"""


class Probe(mongoengine.Document):
    token = mongoengine.StringField(required=True, unique=True)
    n = mongoengine.IntField()
    meta = {"collection": "probes", "db_alias": "probe"}


def test_document_written_by_one_process_is_read_by_another(servers: Servers) -> None:
    token = uuid.uuid4().hex
    result = subprocess.run([sys.executable, "-c", WRITER, servers.mongodb_uri, token], cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "written", result.stderr
    mongoengine.connect(host=servers.mongodb_uri, alias="probe", uuidRepresentation="standard")
    try:
        found = Probe.objects(token=token).get()
        assert found.n == 42
        # The unique index the writer declared is enforced by the server, not by the client.
        try:
            Probe(token=token, n=1).save()
            raise AssertionError("a duplicate token was accepted")
        except mongoengine.NotUniqueError:
            pass
    finally:
        mongoengine.disconnect(alias="probe")
