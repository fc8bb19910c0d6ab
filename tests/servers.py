"""The tests' private servers: the harness lives in ``chatstream_site.localservers`` (shared with bench/)."""

from chatstream_site.localservers import (
    FERRETDB_BIN,
    ROOT,
    RedisCluster,
    Server,
    Servers,
    ferretdb_server,
    free_port,
    redis_cluster_start,
    redis_server,
    run_with_redis,
    servers_start,
    wait_port,
)

__all__ = [
    "FERRETDB_BIN",
    "ROOT",
    "RedisCluster",
    "Server",
    "Servers",
    "ferretdb_server",
    "free_port",
    "redis_cluster_start",
    "redis_server",
    "run_with_redis",
    "servers_start",
    "wait_port",
]
