"""Probe: does the MongoDB-protocol server isolate concurrent updates of one document?

    .venv/bin/python bench/ferretdb_update_race.py [--mongodb-uri URI]

Two threads `$inc` one field 300 times each and two threads `$push` 100 items each, all on one document.
MongoDB ends with n = 600 and 200 members. FerretDB v1.24.2 (SQLite backend) on the dev machine ended with
n = 308 and 26 members: it applies an update as an unisolated read-modify-write of the whole document, so
concurrent writers to one document lose each other's changes (docs/adr/0003, docs/storage.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pymongo

from chatstream_site.localservers import ferretdb_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mongodb-uri", default="")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-race-"))
    server = None
    uri = args.mongodb_uri
    if not uri:
        server = ferretdb_server(workdir)
        server.start()
        uri = f"mongodb://127.0.0.1:{server.port}/race"
    try:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, maxPoolSize=10)
        col = client.get_default_database().race
        col.delete_many({})
        col.insert_one({"_id": 1, "n": 0, "members": []})

        def inc() -> None:
            for _ in range(300):
                col.update_one({"_id": 1}, {"$inc": {"n": 1}})

        def push(k: int) -> None:
            for i in range(100):
                col.update_one({"_id": 1}, {"$push": {"members": f"{k}-{i}"}})

        threads = [threading.Thread(target=inc) for _ in range(2)]
        threads += [threading.Thread(target=push, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        doc = col.find_one({"_id": 1}) or {}
        print(f"n = {doc.get('n')} of 600; members = {len(doc.get('members', []))} of 200")
        client.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
