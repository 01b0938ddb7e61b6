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
        self._models: set[str] = set()

    def model_label(self, model: str) -> str:
        """`model`, or `_other` past 100 distinct names (a client cannot blow up the label space)."""
        if model in self._models or len(self._models) < 100:
            self._models.add(model)
            return model
        return "_other"

    def exposition(self) -> tuple[bytes, str]:
        return exposition(self.registry)
