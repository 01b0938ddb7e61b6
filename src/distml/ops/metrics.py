"""Prometheus metrics for long-running distml processes, each on its own registry.

prometheus-client's collectors in a per-process `CollectorRegistry` (no global state), served
over HTTP at `/metrics` on a given or free port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class TrainingMetrics:
    def __init__(self, run_id: str):
        self.registry = CollectorRegistry()
        labels = {"run": run_id}
        self.step = Gauge("distml_train_step", "Optimizer steps done", ["run"], registry=self.registry).labels(**labels)
        self.loss = Gauge(
            "distml_train_loss", "Training loss of the last step", ["run"], registry=self.registry
        ).labels(**labels)
        self.samples_per_second = Gauge(
            "distml_train_samples_per_second", "Global training throughput", ["run"], registry=self.registry
        ).labels(**labels)
        self.samples = Counter(
            "distml_train_samples", "Training samples processed (global)", ["run"], registry=self.registry
        ).labels(**labels)
        self.step_seconds = Histogram(
            "distml_train_step_seconds",
            "Wall time of one optimizer step",
            ["run"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        ).labels(**labels)
        self.world_size = Gauge(
            "distml_train_world_size", "Workers in the current rendezvous round", ["run"], registry=self.registry
        ).labels(**labels)
        self.restarts = Gauge(
            "distml_train_restarts", "Restarts of this run's workers so far", ["run"], registry=self.registry
        ).labels(**labels)

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve /metrics; return the bound port (a free one when `port` is 0)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)


class ServingMetrics:
    """Metrics of one model server replica: requests, latency, dynamic batching, queue, jobs."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
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
        self.jobs = Counter(
            "distml_serve_jobs",
            "Asynchronous inference jobs finished",
            ["model", "version", "status"],
            registry=self.registry,
        )

    def observe_request(self, model: str, version: str, endpoint: str, status: int, seconds: float) -> None:
        labels = {"model": model, "version": version, "endpoint": endpoint, "status": str(status)}
        self.requests.labels(**labels).inc()
        self.latency.labels(**labels).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, with its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
