"""What a broker does about the cyclic garbage collector: long-lived objects are frozen out of its reach, and the
garbage that freezing can keep is collected at a bounded pace (docs/adr/0052).

Why: a broker holding 10,000 connections tracks ~780,000 objects (each socket's uvicorn protocol, websockets
parser, consumer and their dicts), and every full collection walked all of them again: 0.33-0.9 s each, a
pause of the event loop (a ``gc.callbacks`` hook, docs/benchmarks.md, "Issue 16: the broker's garbage
collector"); a ``perf`` profile at 5,000 deliveries/s had 10-13 % of a broker's CPU in the collector. Those
objects live as long as their connection, so walking them finds nothing. With this, a settle under that load
took 13-55 ms every 10 s.

* Every ``BROKER_GC_FREEZE_S`` (the hub's heap task calls :meth:`Heap.settle`): a collection of what is not
  frozen (cheap: only what survived since the previous settle), then ``gc.freeze()``, which moves every
  survivor into the permanent generation that collections skip. Freed objects still go by reference counting as before.
* A frozen object that later becomes cyclic garbage (most of a closed connection's objects are freed by
  reference counting; some form cycles) is kept until the next thaw: after ``thaw_after_closes`` connections
  (``BROKER_GC_THAW_AFTER_CLOSES``, 2,000: ~30 MB at ~15 KB each) closed since the last one, a settle first
  unfreezes everything and runs one full collection (what every full collection cost before, now once per that
  many closes instead of every few seconds under load).
"""

from __future__ import annotations

import gc
import time


class Heap:
    """The policy above for one process. Precondition: one owner (the broker's hub) calls it from one thread."""

    def __init__(self, *, thaw_after_closes: int) -> None:
        self.thaw_after_closes = thaw_after_closes
        self.closes = 0  # connections closed since the last thaw
        self.thaws = 0
        self.last_s = 0.0  # how long the last settle paused the event loop

    def connection_closed(self) -> None:
        self.closes += 1

    def settle(self) -> bool:
        """Freeze what survives a collection of the unfrozen objects; first thaw everything (one full collection)
        when ``thaw_after_closes`` connections closed since the last thaw. Returns whether it thawed."""
        started = time.perf_counter()
        thaw = self.closes >= self.thaw_after_closes
        if thaw:
            self.closes = 0
            gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.last_s = time.perf_counter() - started
        self.thaws += thaw
        return thaw
