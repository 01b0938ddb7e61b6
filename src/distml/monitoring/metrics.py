"""Prometheus metrics of every long-running distml process, and where each process serves them.

prometheus-client's collectors, each process on its own `CollectorRegistry`, served over HTTP at
`/metrics` on a free port (`serve`), which the process records in an endpoint file in the
workspace (`WORKSPACE/runs/RUN/metrics/rank-N.json`, `WORKSPACE/workflows/RUN/metrics.json`,
`WORKSPACE/services/NAME/service.json`) so that `distml top` and scrapers find it. Names follow
`distml_<area>_<thing>_<unit>`; the README's Monitoring section lists every one.

Scheduling passes happen in free functions of many processes, so the scheduler's counters are
process-wide (`observe_pass`), and its queue and pool gauges are read from the metadata store
when scraped (`PoolCollector`), never cached.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

# -- serving a registry and saying where ---------------------------------------------------------


class MetricsEndpoint:
    """A running `/metrics` server and the endpoint file that points at it (removed on close)."""

    def __init__(self, server: Any, thread: threading.Thread, port: int, url: str, file: Path | None):
        self.server, self.thread, self.port, self.url, self.file = server, thread, port, url, file

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        record = read_endpoint(self.file, alive=False) if self.file is not None else None
        if record is not None and record.get("pid") == os.getpid():  # not a later process's file
            with contextlib.suppress(FileNotFoundError):
                self.file.unlink()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def serve(
    registry: CollectorRegistry,
    port: int = 0,
    addr: str = "127.0.0.1",
    endpoint_file: str | os.PathLike | None = None,
    **info: Any,
) -> MetricsEndpoint:
    """Serve `registry` at /metrics (a free port when `port` is 0); when `endpoint_file` is given,
    write {url, port, pid, started, host, **info} there atomically once the port is bound."""
    from distml.core.files import atomic_write
    from distml.core.liveness import process_identity

    server = make_server(addr, port, make_wsgi_app(registry), ThreadingWSGIServer, handler_class=_QuietHandler)
    # prometheus_client's start_http_server polls for shutdown every 0.5 s: every close (the end of
    # each training rank, launcher and orchestrator) would wait for it
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    bound = int(server.server_port)
    host = socket.gethostname() if addr in ("0.0.0.0", "::", "") else addr
    url = f"http://{host}:{bound}/metrics"
    path = Path(endpoint_file) if endpoint_file is not None else None
    if path is not None:
        pid = os.getpid()
        record = {"url": url, "port": bound, "pid": pid, "started": process_identity(pid), "host": socket.gethostname()}
        with atomic_write(path, "w") as handle:
            json.dump({**record, **info}, handle)
    return MetricsEndpoint(server, thread, bound, url, path)


def read_endpoint(path: str | os.PathLike, alive: bool = True) -> dict[str, Any] | None:
    """An endpoint file's record; with `alive`, None unless its process still runs (on this host,
    the same pid and start time; on another host it cannot be told, so it counts as running)."""
    from distml.core.liveness import is_running

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    here = record.get("host", socket.gethostname()) == socket.gethostname()
    if alive and here and not is_running(record.get("pid"), record.get("started")):
        return None
    return record


# -- training ------------------------------------------------------------------------------------


class TrainingMetrics:
    """Metrics of one training rank (a worker, or a parameter server), labelled run and rank.

    Counters and throughput are this rank's own: sum over `rank` for the run's."""

    STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self, run_id: str, rank: int = 0, registry: CollectorRegistry | None = None):
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        names, labels = ["run", "rank"], {"run": run_id, "rank": str(rank)}
        self.run_id, self.rank = run_id, rank
        self.step = Gauge("distml_train_step", "Optimizer steps done", names, registry=registry).labels(**labels)
        self.loss = Gauge(
            "distml_train_loss", "Training loss of this rank's last step", names, registry=registry
        ).labels(**labels)
        self.samples_per_second = Gauge(
            "distml_train_samples_per_second",
            "This rank's training throughput (moving average; sum over ranks for the run's)",
            names,
            registry=registry,
        ).labels(**labels)
        self.samples = Counter(
            "distml_train_samples", "Training samples this rank processed", names, registry=registry
        ).labels(**labels)
        self.step_seconds = Histogram(
            "distml_train_step_seconds",
            "Wall time of one optimizer step (compute and communication, not the data wait)",
            names,
            registry=registry,
            buckets=self.STEP_BUCKETS,
        ).labels(**labels)
        self.world_size = Gauge(
            "distml_train_world_size", "Training workers in the current rendezvous round", names, registry=registry
        ).labels(**labels)
        self.restarts = Gauge(
            "distml_train_restarts", "Restarts of this run's workers so far", names, registry=registry
        ).labels(**labels)
        self._last: float | None = None
        self._speed = 0.0
        self._loss: Any = float("nan")
        self.loss.set_function(self._loss_value)

    def _loss_value(self) -> float:
        return float(self._loss)  # a tensor is read only when scraped: no device sync per step

    def observe_step(self, step: int, loss: Any, seconds: float, samples: int) -> None:
        """Record one optimizer step of `samples` samples; `loss` may be a tensor (read on scrape)."""
        now = time.perf_counter()
        wall = now - self._last if self._last is not None else seconds
        self._last = now
        instant = samples / max(wall, 1e-9)
        self._speed = instant if self._speed == 0 else 0.9 * self._speed + 0.1 * instant
        self._loss = loss
        self.step.set(step)
        self.samples.inc(samples)
        self.step_seconds.observe(seconds)
        self.samples_per_second.set(self._speed)

    def serve(
        self, port: int = 0, addr: str = "127.0.0.1", endpoint_file: str | os.PathLike | None = None
    ) -> MetricsEndpoint:
        """Serve /metrics (a free port when `port` is 0), recorded in `endpoint_file` when given."""
        return serve(self.registry, port, addr, endpoint_file, run=self.run_id, rank=self.rank)


# -- workflows -----------------------------------------------------------------------------------

#: Every state a workflow step can be in; each is exported, at 0 when no step is in it.
STEP_STATES = (
    "waiting",
    "queued",
    "running",
    "retrying",
    "succeeded",
    "cached",
    "skipped",
    "failed",
    "upstream_failed",
    "cancelled",
)


class _StepStates(Collector):
    def __init__(self, run_id: str, states: Callable[[], Iterable[str]]):
        self.run_id, self.states = run_id, states

    def describe(self):
        return [GaugeMetricFamily("distml_workflow_steps", "Steps of the run by state", labels=["run", "state"])]

    def collect(self):
        counts = dict.fromkeys(STEP_STATES, 0)
        for state in list(self.states()):
            counts[state] = counts.get(state, 0) + 1
        family = GaugeMetricFamily("distml_workflow_steps", "Steps of the run by state", labels=["run", "state"])
        for state, count in counts.items():
            family.add_metric([self.run_id, state], count)
        yield family


class WorkflowMetrics:
    """Metrics of one `distml run` orchestrator: steps by state (read from `states()` when
    scraped), step durations by outcome, memo-cache lookups and retries, labelled run and step."""

    STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

    def __init__(self, run_id: str, states: Callable[[], Iterable[str]], registry: CollectorRegistry | None = None):
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.run_id = run_id
        registry.register(_StepStates(run_id, states))
        self.step_seconds = Histogram(
            "distml_workflow_step_seconds",
            "Wall time of one step attempt, start of its process to its result",
            ["run", "step", "outcome"],
            registry=registry,
            buckets=self.STEP_BUCKETS,
        )
        self.cache = Counter(
            "distml_workflow_cache_lookups",
            "Memo-cache lookups of memoized steps (result: hit or miss)",
            ["run", "step", "result"],
            registry=registry,
        )
        self.retries = Counter(
            "distml_workflow_retries", "Failed step attempts that were retried", ["run", "step"], registry=registry
        )

    def step_finished(self, step: str, outcome: str, seconds: float) -> None:
        self.step_seconds.labels(self.run_id, step, outcome).observe(max(seconds, 0.0))

    def cache_lookup(self, step: str, hit: bool) -> None:
        self.cache.labels(self.run_id, step, "hit" if hit else "miss").inc()

    def retried(self, step: str) -> None:
        self.retries.labels(self.run_id, step).inc()

    def serve(self, endpoint_file: str | os.PathLike | None = None, port: int = 0) -> MetricsEndpoint:
        return serve(self.registry, port, endpoint_file=endpoint_file, run=self.run_id)


# -- serving -----------------------------------------------------------------------------------------

#: Request latency buckets (seconds) of every serving process, so replica and gateway histograms line up.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """`registry` in the Prometheus text format, with its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


class ServingMetrics:
    """Metrics of one model server replica: requests, latency, dynamic batching, queue, jobs."""

    LATENCY_BUCKETS = LATENCY_BUCKETS
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def __init__(self):
        self.registry = CollectorRegistry()
        request_labels = ["model", "version", "endpoint", "status"]
        self.requests = Counter(
            "distml_serve_requests", "HTTP requests handled", request_labels, registry=self.registry
        )
        self.latency = Histogram(
            "distml_serve_request_seconds",
            "HTTP request latency (receive to last byte)",
            request_labels,
            registry=self.registry,
            buckets=self.LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "distml_serve_batch_size",
            "Items per model forward pass (dynamic batching)",
            ["model", "version"],
            registry=self.registry,
            buckets=self.BATCH_BUCKETS,
        )
        self.queue_depth = Gauge(
            "distml_serve_queue_depth",
            "Items waiting in the dynamic batcher",
            ["model", "version"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "distml_serve_in_flight_requests", "HTTP requests being handled now", registry=self.registry
        )
        self.ready = Gauge("distml_serve_ready", "1 once every model of this replica is loaded", registry=self.registry)
        self._children: dict[tuple, tuple] = {}
        self.jobs = Counter(
            "distml_serve_jobs",
            "Asynchronous inference jobs finished",
            ["model", "version", "status"],
            registry=self.registry,
        )

    def observe_request(self, model: str, version: str, endpoint: str, status: int, seconds: float) -> None:
        key = (model, version, endpoint, status)
        children = self._children.get(key)
        if children is None:  # labels() costs a lock and a dict per call: look each series up once
            labels = (model, version, endpoint, str(status))
            children = self._children[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return exposition(self.registry)


class GatewayMetrics:
    """Metrics of the serving gateway: answers by model and status, retries, ejections, replica counts."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry = registry or CollectorRegistry()
        self.requests = Counter(
            "distml_gateway_requests",
            "Requests answered, by model and HTTP status",
            ["model", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "distml_gateway_request_seconds",
            "Gateway request latency",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.retries = Counter("distml_gateway_retries", "Requests retried on another replica", registry=registry)
        self.ejections = Counter(
            "distml_gateway_replica_ejections",
            "Replicas ejected (died or failed health checks)",
            ["group"],
            registry=registry,
        )
        self.desired = Gauge("distml_gateway_replicas_desired", "Replicas wanted", ["group"], registry=registry)
        self.ready = Gauge("distml_gateway_replicas_ready", "Replicas ready", ["group"], registry=registry)
        self.queue = Gauge(
            "distml_gateway_queue_depth", "Requests waiting for a ready replica", ["group"], registry=registry
        )
        self.in_flight = Gauge(
            "distml_gateway_in_flight", "Requests being served by replicas", ["group"], registry=registry
        )
        self.panic = Gauge(
            "distml_gateway_autoscaler_panic", "1 while the autoscaler panics", ["group"], registry=registry
        )
        self.canary_state = Gauge(
            "distml_gateway_canary_state",
            "1 for the state of each model's last canary (running, promoted, rolled_back), 0 for the others",
            ["model", "state"],
            registry=registry,
        )
        self.canary_requests = Counter(
            "distml_gateway_canary_requests",
            "Answers judged by a running canary analysis, by model, version and outcome (ok, error: 5xx)",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self._models: set[str] = set()

    def model_label(self, model: str) -> str:
        """`model`, or `_other` past 100 distinct names (a client cannot blow up the label space)."""
        if model in self._models or len(self._models) < 100:
            self._models.add(model)
            return model
        return "_other"

    def exposition(self) -> tuple[bytes, str]:
        return exposition(self.registry)
