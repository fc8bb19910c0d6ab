"""FerretDB v1 (SQLite) hangs on an ``update`` command of more than 100 statements: each statement holds one of
its 100 pooled SQLite connections until the command ends, so the 101st waits forever (and so does every later
command). Why the drain sends at most ``storage.writes.UPDATE_STATEMENTS_MAX`` statements per command.

    .venv/bin/python bench/ferretdb_update_limit.py

Prints, on a private FerretDB: ``90 statements ok``, ``99 statements ok``, ``101 statements FAILED
NetworkTimeout`` (measured 2026-12-02, FerretDB v1.24.2).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymongo  # noqa: E402

from chatstream_site.localservers import ferretdb_server  # noqa: E402


def main() -> None:
    server = ferretdb_server(Path(tempfile.mkdtemp(prefix="cs-ferret-limit-")))
    server.start()
    try:
        db: Any = pymongo.MongoClient(f"mongodb://127.0.0.1:{server.port}/", socketTimeoutMS=15000).x
        db.b.insert_many([{"_id": f"c{i}", "m": {}} for i in range(300)])
        for k in (90, 99, 101, 150):
            t = time.time()
            try:
                db.command("update", "b", ordered=False,
                           updates=[{"q": {"_id": f"c{j}"}, "u": {"$set": {"m.1": j}}} for j in range(k)])
                print(k, "statements ok", round(time.time() - t, 2))
            except pymongo.errors.PyMongoError as exc:
                print(k, "statements FAILED", type(exc).__name__)
                break
    finally:
        server.stop()


if __name__ == "__main__":
    main()
