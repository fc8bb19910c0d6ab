"""Prometheus ``/metrics`` of the storage role: the pipeline's state per partition, read from Redis at
scrape time (so every storage instance reports the same cluster-wide figures; scrape any one of them)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from storage.selectors import deadletters_count, partitions_state, persisted_rates


class StorageCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now_ms = int(time.time() * 1000)
        states = partitions_state()
        rates = persisted_rates()
        backlog = GaugeMetricFamily("chatstream_storage_backlog", "Entries appended and not yet persisted",
                                    labels=["partition"])
        lag = GaugeMetricFamily("chatstream_storage_drain_lag_seconds",
                                "Age of the oldest unpersisted entry", labels=["partition"])
        pending = GaugeMetricFamily("chatstream_storage_pending",
                                    "Entries read by a storage worker and not yet acknowledged", labels=["partition"])
        rate = GaugeMetricFamily("chatstream_storage_persisted_per_second",
                                 "Events persisted per second, averaged over the last minute", labels=["partition"])
        persisted = CounterMetricFamily("chatstream_storage_persisted", "Events persisted and acknowledged",
                                        labels=["partition"])
        appended = CounterMetricFamily("chatstream_storage_appended", "Entries ever appended to the stream",
                                       labels=["partition"])
        dead = CounterMetricFamily("chatstream_storage_dead_lettered", "Entries sent to the dead-letter stream",
                                   labels=["partition"])
        for s in states:
            p = [str(s.partition)]
            backlog.add_metric(p, s.backlog)
            lag.add_metric(p, s.lag_s(now_ms=now_ms))
            pending.add_metric(p, s.pending)
            rate.add_metric(p, rates.get(s.partition, 0.0))
            persisted.add_metric(p, s.persisted)
            appended.add_metric(p, s.appended)
            dead.add_metric(p, s.dead)
        yield from (backlog, lag, pending, rate, persisted, appended, dead)
        letters = GaugeMetricFamily("chatstream_storage_deadletters", "Dead letters waiting for staff")
        letters.add_metric([], deadletters_count())
        yield letters


_registry: CollectorRegistry | None = None


def metrics_text() -> bytes:
    global _registry
    if _registry is None:
        _registry = CollectorRegistry()
        _registry.register(StorageCollector())
    return generate_latest(_registry)


def metrics_route() -> tuple[int, str, bytes]:
    """``extra_routes`` handler for ``chatstream_site.health.health_server_start``."""
    try:
        return 200, CONTENT_TYPE_LATEST, metrics_text()
    except Exception as exc:  # Redis away: say so, the scraper records the failure
        return 503, "text/plain; charset=utf-8", f"metrics unavailable: {exc}\n".encode()
