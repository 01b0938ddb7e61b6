"""One validated description of a training run, shared by the launcher and every worker.

A pydantic model so that the CLI, the launcher and the workers agree on one schema and bad
values fail before any process starts. The run id defaults to a digest of the settings that
define the result, so running the same command again resumes that run from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distml.core.errors import DistmlError
from distml.core.layout import run_dir
from distml.workspace import DEFAULT_ROOT


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "cnn"
    model_args: dict[str, Any] = Field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    train_files: list[str] | None = Field(
        None, description="train on these .npz snapshots (image, label) instead of the data set's train split"
    )
    init_from: str | None = Field(None, description="start from this model's weights (NAME:VERSION), not at random")
    workers: int = Field(2, ge=1, le=256, description="worker processes per node")
    strategy: Literal["allreduce", "parameter-server"] = "allreduce"
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(64, ge=1, description="per worker; global batch = batch_size x workers")
    lr: float | None = Field(None, gt=0)
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam (fused) or plain sgd (needs lr)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    max_restarts: int = Field(0, ge=0)
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    rdzv_last_call_timeout: int = Field(5, ge=1, description="seconds a rendezvous waits for more nodes")
    rdzv_keep_alive: int = Field(
        5, ge=1, description="seconds between a node's rendezvous heartbeats; a node that misses 3 is dropped"
    )
    ps_shards: int = Field(1, ge=1, le=64)
    ps_mode: Literal["sync", "async"] = "sync"
    ps_staleness: int | None = Field(None, ge=0)
    workspace: str = DEFAULT_ROOT
    db_url: str | None = None  # the workspace's metadata store; None: distml.db in `workspace`
    run_id: str | None = None
    metrics_port: int | None = Field(None, ge=0, le=65535)
    log_samples: bool = False
    threads: int | None = Field(None, ge=1)
    queue: str = Field("default", description="scheduler queue the run's gang waits in")
    priority: str = Field("normal", description="priority class (low, normal, high) or an integer")

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str) -> str:
        from distml.ops.scheduler import parse_priority

        parse_priority(value)
        return value

    @field_validator("nnodes")
    @classmethod
    def _nnodes(cls, value: str) -> str:
        parts = value.split(":")
        if (
            len(parts) not in (1, 2)
            or not all(p.isdigit() and int(p) >= 1 for p in parts)
            or (len(parts) == 2 and int(parts[0]) > int(parts[1]))
        ):
            raise ValueError(f"nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
        return value

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.nnodes != "1" and self.rdzv_endpoint is None:
            raise ValueError("nnodes other than 1 needs rdzv_endpoint HOST:PORT (the c10d rendezvous)")
        if self.strategy == "allreduce" and (self.ps_shards != 1 or self.ps_staleness is not None):
            raise ValueError("ps_shards and ps_staleness apply only to strategy 'parameter-server'")
        if self.ps_staleness is not None and self.ps_mode != "async":
            raise ValueError("ps_staleness bounds the async mode; use ps_mode 'async'")
        if self.optimizer == "sgd" and self.lr is None:
            raise ValueError("optimizer 'sgd' needs lr (the default rule is Adam's)")
        return self

    @property
    def max_nodes(self) -> int:
        return int(self.nnodes.split(":")[-1])

    @property
    def procs_per_node(self) -> int:
        """Processes each launcher agent starts: workers, plus the servers in PS mode."""
        return self.workers + (self.ps_shards if self.strategy == "parameter-server" else 0)

    def threads_per_process(self, local_processes: int) -> int:
        """Intra-op threads of each process: `threads`, or the node's cores shared by its processes."""
        return self.threads or max(1, (os.cpu_count() or 1) // local_processes)

    def learning_rate(self, world_workers: int) -> float:
        """The learning-rate rule: `lr` is for the global batch as given. Without `lr`, Adam's
        1e-3 at batch 64 is scaled by the square root of (global batch / 64), the rule for
        adaptive optimisers (Hoffer et al. 2017; linear scaling, Goyal et al. 2017, is for SGD)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 * ((self.batch_size * world_workers) / 64) ** 0.5

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        defining = self.model_dump(
            exclude={
                "workspace",
                "db_url",
                "run_id",
                "metrics_port",
                "max_restarts",
                "data_dir",
                "rdzv_endpoint",
                "rdzv_last_call_timeout",
                "rdzv_keep_alive",
                "log_samples",
                "threads",
                "queue",
                "priority",
                "nnodes",
                "workers",
            }
        )
        if defining["optimizer"] == "adam":  # runs from before the setting existed keep their ids
            del defining["optimizer"]
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.model}-{self.dataset}-{digest}"

    def run_dir(self) -> Path:
        return run_dir(self.workspace, self.resolved_run_id())


def parse_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig, turning validation errors into one clear DistmlError."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise DistmlError(f"invalid training configuration: {problems}") from None


def load_config(path: str | os.PathLike) -> TrainConfig:
    return parse_config(json.loads(Path(path).read_text()))
