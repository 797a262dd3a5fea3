"""The api's metrics (docs/design.md §6): HTTP counts and latency, and the queue read at
scrape time.

Several uvicorn worker processes (`cvserve api --workers N`) each count their own
requests; with PROMETHEUS_MULTIPROC_DIR set (`cvserve api` sets it for N > 1) every process
writes its samples to that folder and any one of them answers /metrics with the sum
(prometheus-client's multiprocess mode). The queue's gauges are not per process: they are
read from the queue (Redis) when /metrics is scraped, so any process answers them alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("cvserve.metrics")

HTTP_REQUESTS = Counter("cvserve_http_requests", "HTTP requests by endpoint and status",
                        ["endpoint", "method", "status"])
CLIENT_DISCONNECTS = Counter("cvserve_http_client_disconnects",
                             "Requests whose client left before the answer", ["task"])
HTTP_SECONDS = Histogram("cvserve_http_request_duration_seconds", "HTTP latency by endpoint",
                         ["endpoint", "method"],
                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))

# Counted by the process that takes a job over: a worker (app/redis_queue.py).
RECLAIMED = Counter("cvserve_jobs_reclaimed", "Jobs taken over from a worker that stopped "
                    "answering (idle past the visibility timeout)", ["model"])
DEAD_LETTERED = Counter("cvserve_jobs_dead_lettered", "Jobs moved to the dead-letter stream "
                        "after max_deliveries", ["model"])


@dataclass(frozen=True)
class QueueStats:
    """One model's queue as read at a scrape."""

    depth: int  # jobs queued or in flight
    oldest_age_s: float | None  # the oldest of those; None when there is none
    dead: int  # jobs kept in the dead-letter stream
    workers: int  # live workers serving the model


class _Snapshot(Collector):
    """Gauges of values read just before this scrape (no state between scrapes)."""

    def __init__(self, stats: dict[str, QueueStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("cvserve_queue_depth", "Jobs queued or in flight",
                                  labels=["model"])
        age = GaugeMetricFamily("cvserve_queue_oldest_job_age_seconds",
                                "Age of the oldest job queued or in flight", labels=["model"])
        dead = GaugeMetricFamily("cvserve_queue_dead_letter_depth",
                                 "Jobs kept in the dead-letter stream after max_deliveries",
                                 labels=["model"])
        workers = GaugeMetricFamily("cvserve_model_workers", "Live workers serving the model",
                                    labels=["model"])
        for model, s in sorted(self.stats.items()):
            depth.add_metric([model], s.depth)
            # 0 with an empty queue: "nothing waits" is a value, unlike a missing GPU.
            age.add_metric([model], s.oldest_age_s or 0.0)
            dead.add_metric([model], s.dead)
            workers.add_metric([model], s.workers)
        yield from (depth, age, dead, workers)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(stats: dict[str, QueueStats], extra: Iterable[Collector] = ()) -> bytes:
    """The /metrics body: this process's metrics (or, in multiprocess mode, every
    process's), then the queue's gauges."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(stats))
    for collector in extra:
        snapshot.register(collector)
    return body + generate_latest(snapshot)
