"""The tests' cluster harness: it lives in ``chatstream_site.localcluster`` (shared with bench/)."""

from chatstream_site.localcluster import (
    Cluster,
    child_env,
    manage,
    process_env,
    tagged_pids,
    wait_until,
)

__all__ = [
    "Cluster",
    "child_env",
    "manage",
    "process_env",
    "tagged_pids",
    "wait_until",
]
