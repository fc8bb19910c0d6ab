"""What ``manage.py bench`` records beside its throughput and latency to tell *why* a run fell short of the
offered load (docs/benchmarks.md, "Issue 16"): how long each process waited for a CPU, and what the first
message of a conversation cost against its later ones.

* **Run-queue wait** (``/proc/<pid>/task/<tid>/schedstat``, second field: nanoseconds a runnable thread waited
  for a CPU). CPU % alone cannot tell a process that had nothing to do from one that wanted the CPU and did
  not get it (a benchmark at ``nice 5`` on a machine shared with others' work): a process whose threads waited
  for a CPU for a large part of the window was held back by the machine, not by its own code.
* **Cold start per conversation**: every message id of the load client is ``<conversation>-<n>``; the
  latencies of the deliveries of each conversation's first message (n = 1) against its later ones (n >= 10)
  and its hundredth (n = 100, when the run is long enough). p99 over the whole window excludes nothing;
  this only says where the slow deliveries were.
"""

from __future__ import annotations

from pathlib import Path

# A message from this n on counts as "steady state" of its conversation: past the first few, whatever a first
# send loads (membership, a cursor, a cache) has been loaded.
STEADY_FROM_N = 10


def runq_wait_s(pids: list[int]) -> float:
    """Seconds the threads of ``pids`` have waited, runnable, for a CPU since they started (threads that ended
    are not counted: sample before and after a window and subtract). Missing processes count 0."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def message_n(client_msg_id: str) -> int:
    """n of a load-client message id ``<conversation>-<n>``; 0 for anything else."""
    _, _, tail = client_msg_id.rpartition("-")
    return int(tail) if tail.isdigit() else 0


class ColdStart:
    """Latencies of deliveries grouped as first message / steady state / hundredth message of their
    conversation."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.steady: list[float] = []
        self.hundredth: list[float] = []

    def add(self, n: int, latency_ms: float) -> None:
        if n == 1:
            self.first.append(latency_ms)
        elif n >= STEADY_FROM_N:
            self.steady.append(latency_ms)
            if n == 100:
                self.hundredth.append(latency_ms)

    def summary(self) -> dict[str, float | int]:
        def pct(values: list[float], q: float) -> float:
            if not values:
                return 0.0
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {"first_p50_ms": pct(self.first, 0.5), "first_p99_ms": pct(self.first, 0.99),
                "first_n": len(self.first),
                "steady_p50_ms": pct(self.steady, 0.5), "steady_p99_ms": pct(self.steady, 0.99),
                "steady_n": len(self.steady),
                "hundredth_p50_ms": pct(self.hundredth, 0.5), "hundredth_p99_ms": pct(self.hundredth, 0.99),
                "hundredth_n": len(self.hundredth)}


