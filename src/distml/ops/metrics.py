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
        self.loss = Gauge("distml_train_loss", "Training loss of the last step", ["run"],
                          registry=self.registry).labels(**labels)
        self.samples_per_second = Gauge("distml_train_samples_per_second", "Global training throughput", ["run"],
                                        registry=self.registry).labels(**labels)
        self.samples = Counter("distml_train_samples", "Training samples processed (global)", ["run"],
                               registry=self.registry).labels(**labels)
        self.step_seconds = Histogram("distml_train_step_seconds", "Wall time of one optimizer step", ["run"],
                                      registry=self.registry,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
                                      ).labels(**labels)
        self.world_size = Gauge("distml_train_world_size", "Workers in the current rendezvous round", ["run"],
                                registry=self.registry).labels(**labels)
        self.restarts = Gauge("distml_train_restarts", "Restarts of this run's workers so far", ["run"],
                              registry=self.registry).labels(**labels)

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve /metrics; return the bound port (a free one when `port` is 0)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
