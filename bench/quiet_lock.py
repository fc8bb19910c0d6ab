"""Hold a shared machine's benchmark locks (``DIR/gate.lock`` then ``DIR/bench.lock``, ``flock`` exclusive)
around the measuring part of a long benchmark only, not its seeding: ``--quiet-lock DIR``. Off by default
(CI and users need nothing).

The convention: test runs take ``gate.lock`` shared for a moment and then hold ``bench.lock`` shared, so a
benchmark waiting here (holding ``gate.lock``) holds new test runs back and then measures alone. Waits are
polled, never a blocking ``flock``: a run stopped while it waits (SIGTERM, Ctrl-C) unwinds at once, and an
asyncio loop's shutdown would wait for ever for a worker thread stuck in ``flock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

# How often a waiting benchmark retries the lock: short next to any measuring phase, cheap to poll.
POLL_S = 0.2
LOCK_NAMES = ("gate.lock", "bench.lock")


def _try(handle: IO[bytes]) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def quiet_lock(folder: str, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold both locks for the block; yields whether they are held. Nothing (yields False) when ``folder``
    is empty. ``wait_s`` > 0: give up after that many seconds and run the block anyway (a run must end, and a
    queue of other benchmarks can hold the lock for much longer); 0: wait as long as it takes."""
    if not folder:
        yield False
        return
    deadline = time.monotonic() + wait_s if wait_s > 0 else float("inf")
    with contextlib.ExitStack() as stack:
        held = True
        for name in LOCK_NAMES:  # the handles close (and so unlock) with the stack
            handle = stack.enter_context(open(Path(folder) / name, "a+b"))
            while not _try(handle):  # bounded by the deadline, or by the holder ending
                if time.monotonic() > deadline:
                    held = False
                    break
                time.sleep(POLL_S)
            if not held:
                break
        if not held:
            stack.close()  # never measure while holding only the gate: tests would wait for nothing
        yield held


@contextlib.asynccontextmanager
async def quiet_lock_async(folder: str) -> AsyncIterator[bool]:
    """:func:`quiet_lock` for a coroutine: the wait yields to the event loop; waits as long as it takes."""
    if not folder:
        yield False
        return
    with contextlib.ExitStack() as stack:
        for name in LOCK_NAMES:
            handle = stack.enter_context(open(Path(folder) / name, "a+b"))
            while not _try(handle):  # bounded by the holder ending; a stopped run unwinds here
                await asyncio.sleep(POLL_S)
        yield True
