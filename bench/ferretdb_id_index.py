"""Whether FerretDB v1 (SQLite, ``make run``'s store) serves ``_id`` equality from its ``_id`` index: the
measurement behind the build patch of docs/adr/0035.

    nice .venv/bin/python bench/ferretdb_id_index.py --sizes 2000 10000 40000 100000 \\
        [--binary unpatched=/path/to/ferretdb] [--tries 10]

Each ``--binary NAME=PATH`` (default: ``built=.tools/bin/ferretdb``) gets a private server and one collection
grown to each size (documents ``{_id: "m<n>", a, c: 200 chars}``, inserted in order); per size, median of
``--tries`` (ms): ``find_one({_id})`` of a document inserted **late** and of one inserted **early** (a table
scan finds an early row at once and stops: a benchmark that looks up early ids cannot see the scan),
``update_one({_id}, $set)`` that **changes** a late document, ``insert_one``; plus the plan FerretDB's
``explain`` reports for a find by ``_id`` (SQLite's ``EXPLAIN QUERY PLAN``: ``SCAN`` or ``SEARCH … USING INDEX``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymongo  # noqa: E402

from chatstream_site.localservers import FERRETDB_BIN, ferretdb_server  # noqa: E402


def median_ms(tries: int, op: Callable[[int], Any]) -> float:
    times = []
    for k in range(tries):
        t = time.perf_counter()
        op(k)
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def measure(binary: Path, sizes: list[int], tries: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cs-idindex-") as tmp:
        server = ferretdb_server(Path(tmp), binary=binary)
        server.start()
        try:
            db: Any = pymongo.MongoClient(f"mongodb://127.0.0.1:{server.port}/")["cs_idindex"]
            have = 0
            for size in sorted(sizes):
                for at in range(have, size, 1000):  # bounded: grows the collection to size
                    db.t.insert_many([{"_id": f"m{n}", "a": n, "c": "x" * 200}
                                      for n in range(at, min(size, at + 1000))])
                have = size

                def late(k: int, size: int = size) -> str:
                    return f"m{size - 1 - 3 * k}"

                def insert(k: int, size: int = size) -> None:
                    db.t.insert_one({"_id": f"x{size}-{k}", "c": "y"})

                plan = db.command("explain", {"find": "t", "filter": {"_id": late(0)}})["queryPlanner"]["Plan"]
                rows.append({
                    "documents": size,
                    "find_late": median_ms(tries, lambda k: db.t.find_one({"_id": late(k)})),
                    "find_early": median_ms(tries, lambda k: db.t.find_one({"_id": f"m{k}"})),
                    "update_changing_late": median_ms(
                        tries, lambda k: db.t.update_one({"_id": late(k)}, {"$set": {"a": -time.time()}})),
                    "insert": median_ms(tries, insert),
                    "plan": " | ".join(str(p).split("detail=")[-1] for p in plan)})
                print(json.dumps({"binary": str(binary), **rows[-1]}), flush=True)
        finally:
            server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 10_000, 40_000])
    parser.add_argument("--binary", action="append", default=[], help="NAME=PATH of a FerretDB build")
    parser.add_argument("--tries", type=int, default=10)
    args = parser.parse_args()
    binaries = dict(b.split("=", 1) for b in args.binary) or {"built": str(FERRETDB_BIN)}
    out = {name: measure(Path(path).resolve(), args.sizes, args.tries) for name, path in binaries.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
