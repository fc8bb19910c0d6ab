"""Fixtures of the real-time tests: a Redis Cluster as the message bus and two brokers on it (the fixtures
themselves are in tests/support/realtime.py; a module shapes its cluster with ``REDIS_CLUSTER``)."""

from tests.support.realtime import brokers, cluster, fresh_hub

__all__ = ["brokers", "cluster", "fresh_hub"]  # fixtures: pytest finds them by name in this conftest
