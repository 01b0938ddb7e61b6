"""The scheduler's metrics: the passes this process ran, and the workspace pool read at each scrape.

Scheduling passes happen in free functions of many processes, so the pass counters are
process-wide (`observe_pass`), and the queue and pool gauges are read from the metadata store
when scraped (`PoolCollector`, through `admission.pool_state`), never cached.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from distml.monitoring.metrics import MetricsEndpoint, serve


class SchedulerMetrics:
    """The scheduling passes this process ran: their duration and what they decided. One per
    process (`scheduler_metrics()`); `expose_scheduler` adds it to a process's registry."""

    PASS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

    def __init__(self) -> None:
        self.pass_seconds = Histogram(
            "distml_scheduler_pass_seconds",
            "Wall time of one scheduling pass run by this process (one store transaction)",
            registry=None,
            buckets=self.PASS_BUCKETS,
        )
        self.admitted = Counter("distml_scheduler_jobs_admitted", "Jobs a pass of this process started", registry=None)
        self.preempted = Counter(
            "distml_scheduler_jobs_preempted", "Running jobs a pass of this process chose to preempt", registry=None
        )
        self.reclaimed = Counter(
            "distml_scheduler_jobs_reclaimed",
            "Jobs whose holder died; a pass of this process took their resources back",
            registry=None,
        )
        self.rejected = Counter(
            "distml_scheduler_jobs_rejected", "Waiting jobs a pass of this process found could never fit", registry=None
        )
        self.collectors = (self.pass_seconds, self.admitted, self.preempted, self.reclaimed, self.rejected)
        self._by_state = {
            "running": self.admitted,
            "preempting": self.preempted,
            "lost": self.reclaimed,
            "failed": self.rejected,
        }

    def observe_pass(self, seconds: float, changed: dict[str, str] | None = None) -> None:
        self.pass_seconds.observe(seconds)
        for state in (changed or {}).values():
            counter = self._by_state.get(state)
            if counter is not None:
                counter.inc()


_scheduler: SchedulerMetrics | None = None
_scheduler_lock = threading.Lock()


def scheduler_metrics() -> SchedulerMetrics:
    """This process's scheduler metrics (created on first use)."""
    global _scheduler
    if _scheduler is None:
        with _scheduler_lock:
            if _scheduler is None:
                _scheduler = SchedulerMetrics()
    return _scheduler


def observe_pass(seconds: float, changed: dict[str, str] | None = None) -> None:
    """Record one scheduling pass: how long it took and its {job id: new state} changes
    (running: admitted, preempting: preempted, lost: reclaimed, failed: rejected)."""
    scheduler_metrics().observe_pass(seconds, changed)


JOB_STATES = ("waiting", "running", "preempting")
RESOURCES = ("cpus", "gpus", "memory_gb")


class PoolCollector(Collector):
    """The workspace pool's queues, jobs and capacity, read from the metadata store at each scrape
    through `read_pool` (the scheduler's `distml.scheduling.admission.pool_state`, which owns those tables)."""

    def __init__(self, read_pool: Callable[[], dict[str, Any]]):
        self.read_pool = read_pool

    def describe(self):
        return list(self._families())

    @staticmethod
    def _families() -> tuple:
        return (
            GaugeMetricFamily("distml_scheduler_jobs", "Jobs not done, by queue and state", labels=["queue", "state"]),
            GaugeMetricFamily("distml_scheduler_queue_weight", "Each queue's weight", labels=["queue"]),
            GaugeMetricFamily(
                "distml_scheduler_queue_share",
                "Each queue's dominant share of the pool over its nominal share (1 = its fair share)",
                labels=["queue"],
            ),
            GaugeMetricFamily(
                "distml_scheduler_pool_capacity",
                "What each node offers the pool (resource: cpus slots, gpus, memory_gb GiB)",
                labels=["node", "resource"],
            ),
            GaugeMetricFamily(
                "distml_scheduler_pool_used",
                "What running jobs hold on each node (resource: cpus slots, gpus, memory_gb GiB)",
                labels=["node", "resource"],
            ),
            CounterMetricFamily("distml_scheduler_passes", "Scheduling passes in this workspace, all processes"),
            GaugeMetricFamily("distml_scheduler_store_up", "1 when the last scrape could read the metadata store"),
        )

    def collect(self):
        jobs, weight, share, capacity, used, passes, up = self._families()
        try:
            pool = self.read_pool()
            passes.add_metric([], pool["passes"])
        except Exception:  # the store is busy or gone: say so instead of failing the whole scrape
            up.add_metric([], 0)
            yield up
            return
        for queue in pool["queues"]:
            counts = dict.fromkeys(JOB_STATES, 0)
            for job in pool["jobs"]:
                if job["queue"] == queue["name"]:
                    counts[job["state"]] = counts.get(job["state"], 0) + 1
            for state, count in counts.items():
                jobs.add_metric([queue["name"], state], count)
            weight.add_metric([queue["name"]], queue["weight"])
            share.add_metric([queue["name"]], queue["share"])
        node = pool["node"]
        for dim in RESOURCES:
            capacity.add_metric([node["name"], dim], float(node[dim]))
            used.add_metric([node["name"], dim], float(pool["used"][dim]))
        up.add_metric([], 1)
        yield from (jobs, weight, share, capacity, used, passes, up)


def expose_scheduler(registry: CollectorRegistry, read_pool: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """Add this process's scheduler metrics and the workspace pool's state (`read_pool()`) to `registry`."""
    for collector in scheduler_metrics().collectors:
        registry.register(collector)
    registry.register(PoolCollector(read_pool))
    return registry


def serve_scheduler(
    read_pool: Callable[[], dict[str, Any]], endpoint_file: str | os.PathLike | None = None, **info: Any
) -> MetricsEndpoint:
    """Serve the scheduler metrics alone on a free port (a process that schedules but has no
    registry of its own, such as `distml train`'s launcher); close() it when done."""
    return serve(expose_scheduler(CollectorRegistry(), read_pool), endpoint_file=endpoint_file, **info)
