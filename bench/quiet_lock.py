"""Hold a shared machine's benchmark locks (``DIR/gate.lock`` then ``DIR/bench.lock``, ``flock`` exclusive)
around the measuring part of a long benchmark only, not its seeding: ``--quiet-lock DIR``. Off by default
(CI and users need nothing)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def quiet_lock(folder: str) -> Iterator[None]:
    """Block until both locks are held (nothing when ``folder`` is empty); release them on exit."""
    if not folder:
        yield
        return
    with open(Path(folder) / "gate.lock", "a") as gate, open(Path(folder) / "bench.lock", "a") as bench:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(bench, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(bench, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)
