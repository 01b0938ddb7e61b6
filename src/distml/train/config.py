"""One validated description of a training run, shared by the launcher and every worker.

A pydantic model so that the CLI, the launcher and the workers agree on one schema and bad
values fail before any process starts. The run id defaults to a digest of the settings that
define the result, so running the same command again resumes that run from its checkpoint.

The settings come in sections, as torchtitan's JobConfig: `model`, `data`, `optimizer`,
`training`, `parallelism`, `checkpoint`, `job` (scheduling and naming) and `workspace` (a
`WorkspaceRef`). The previous release's flat form (`workers`, `epochs`, `workspace` a folder and
`db_url`, ...) still loads, so that its runs resume; `TrainConfig.flat()` gives that form back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distml.core.errors import DistmlError
from distml.core.layout import WorkspaceRef

# Set by `distml train`'s launcher for its workers: its pid and start time, "PID:START"
# (core.liveness.process_identity); a worker ends when that process is gone (worker.exit_with_launcher).
LAUNCHER_ENV = "DISTML_LAUNCHER_PID"


class Section(BaseModel):
    """One section of a TrainConfig: its own settings only."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    """What is trained."""

    name: str = Field("cnn", description="cnn, dropout, batch_norm, mlp or package.module:factory")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model's factory")
    init_from: str | None = Field(None, description="start from this model's weights (NAME:VERSION), not at random")


class DataSection(Section):
    """What it is trained on, in batches of what size."""

    dataset: str = Field("digits", description="fashion-mnist, digits or a registered data set")
    data_dir: str | None = Field(None, description="folder that already holds the data set's files (no download)")
    train_files: list[str] | None = Field(
        None, description="train on these .npz snapshots (image, label) instead of the data set's train split"
    )
    batch_size: int = Field(64, ge=1, description="per worker; global batch = batch_size x workers")


class OptimizerSection(Section):
    """The optimizer and its learning rate."""

    name: Literal["adam", "sgd"] = Field("adam", description="adam (fused) or plain sgd (needs lr)")
    lr: float | None = Field(
        None, gt=0, description="for the global batch; None: Adam's 1e-3 x sqrt(global batch / 64)"
    )

    @model_validator(mode="after")
    def _sgd_needs_lr(self) -> OptimizerSection:
        if self.name == "sgd" and self.lr is None:
            raise ValueError("optimizer 'sgd' needs lr (the default rule is Adam's)")
        return self


class TrainingSection(Section):
    """How long, from which seed, on what."""

    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="intra-op threads per process; None: cores / processes")
    log_samples: bool = Field(False, description="log the sample ids of every step (tests)")


class CheckpointSection(Section):
    """Checkpoints, and restarts from them."""

    every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    max_restarts: int = Field(0, ge=0, description="restarts of the workers after a failure")


class JobSection(Section):
    """The run as a job: its name, its place in the scheduler, its metrics endpoint."""

    run_id: str | None = Field(None, description="name of the run; None: a digest of the defining settings")
    queue: str = Field("default", description="scheduler queue the run's gang waits in")
    priority: str = Field("normal", description="priority class (low, normal, high) or an integer")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics (0: a free port)")

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str) -> str:
        from distml.scheduling.core import parse_priority

        try:
            parse_priority(value)
        except DistmlError as exc:  # a validation error, so that the message names job.priority
            raise ValueError(str(exc)) from None
        return value


class ParallelismSection(Section):
    """How many processes on how many nodes, and how they share the model."""

    workers: int = Field(2, ge=1, le=256, description="worker processes per node")
    strategy: Literal["allreduce", "parameter-server"] = "allreduce"
    nnodes: str = Field("1", description="N or MIN:MAX (elastic)")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the c10d rendezvous (multi-node)")
    rdzv_last_call_timeout: int = Field(5, ge=1, description="seconds a rendezvous waits for more nodes")
    rdzv_keep_alive: int = Field(
        5, ge=1, description="seconds between a node's rendezvous heartbeats; a node that misses 3 is dropped"
    )
    ps_shards: int = Field(1, ge=1, le=64, description="parameter servers")
    ps_mode: Literal["sync", "async"] = "sync"
    ps_staleness: int | None = Field(None, ge=0, description="async: max steps a worker may run ahead")

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
    def _consistent(self) -> ParallelismSection:
        if self.nnodes != "1" and self.rdzv_endpoint is None:
            raise ValueError("nnodes other than 1 needs rdzv_endpoint HOST:PORT (the c10d rendezvous)")
        if self.strategy == "allreduce" and (self.ps_shards != 1 or self.ps_staleness is not None):
            raise ValueError("ps_shards and ps_staleness apply only to strategy 'parameter-server'")
        if self.ps_staleness is not None and self.ps_mode != "async":
            raise ValueError("ps_staleness bounds the async mode; use ps_mode 'async'")
        return self

    @property
    def max_nodes(self) -> int:
        return int(self.nnodes.split(":")[-1])

    @property
    def procs_per_node(self) -> int:
        """Processes each launcher agent starts: workers, plus the servers in PS mode."""
        return self.workers + (self.ps_shards if self.strategy == "parameter-server" else 0)


# The previous release's flat keys, in its order, and where each setting lives now: old config
# files load through it, and `TrainConfig.flat()` (run ids, the metadata store) gives that form.
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"),
    "model_args": ("model", "args"),
    "dataset": ("data", "dataset"),
    "data_dir": ("data", "data_dir"),
    "train_files": ("data", "train_files"),
    "init_from": ("model", "init_from"),
    "workers": ("parallelism", "workers"),
    "strategy": ("parallelism", "strategy"),
    "epochs": ("training", "epochs"),
    "max_steps": ("training", "max_steps"),
    "batch_size": ("data", "batch_size"),
    "lr": ("optimizer", "lr"),
    "optimizer": ("optimizer", "name"),
    "seed": ("training", "seed"),
    "device": ("training", "device"),
    "checkpoint_every": ("checkpoint", "every"),
    "max_restarts": ("checkpoint", "max_restarts"),
    "nnodes": ("parallelism", "nnodes"),
    "rdzv_endpoint": ("parallelism", "rdzv_endpoint"),
    "rdzv_last_call_timeout": ("parallelism", "rdzv_last_call_timeout"),
    "rdzv_keep_alive": ("parallelism", "rdzv_keep_alive"),
    "ps_shards": ("parallelism", "ps_shards"),
    "ps_mode": ("parallelism", "ps_mode"),
    "ps_staleness": ("parallelism", "ps_staleness"),
    "workspace": ("workspace", "root"),
    "db_url": ("workspace", "db_url"),
    "run_id": ("job", "run_id"),
    "metrics_port": ("job", "metrics_port"),
    "log_samples": ("training", "log_samples"),
    "threads": ("training", "threads"),
    "queue": ("job", "queue"),
    "priority": ("job", "priority"),
}

# The flat keys the run id leaves out: where and how a run goes, not what it computes.
NOT_DEFINING = frozenset(
    {
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


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    parallelism: ParallelismSection = Field(default_factory=ParallelismSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    job: JobSection = Field(default_factory=JobSection)
    workspace: WorkspaceRef = Field(
        default_factory=WorkspaceRef, description="the workspace's folder and metadata store (None: distml.db in it)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_flat(cls, values: Any) -> Any:
        """The previous release's flat keys (a config file of a run to resume), alone or mixed with
        sections, each moved to its section: `workers` to `parallelism.workers`, `workspace` (a
        folder) and `db_url` to the WorkspaceRef."""
        if not isinstance(values, Mapping):
            return values
        flat = [key for key, value in values.items() if key in FLAT_KEYS and not _is_section(key, value)]
        if not flat:
            return values
        nested = {key: value for key, value in values.items() if key not in flat}
        for key in flat:
            section, field = FLAT_KEYS[key]
            part = nested.get(section, {})
            part = dict(part.model_dump() if isinstance(part, BaseModel) else part)
            if field in part:
                raise ValueError(f"{key} is given twice: as {key} and as {section}.{field}")
            value = values[key]
            part[field] = os.fspath(value) if isinstance(value, os.PathLike) else value
            nested[section] = part
        return nested

    @property
    def max_nodes(self) -> int:
        return self.parallelism.max_nodes

    @property
    def procs_per_node(self) -> int:
        """Processes each launcher agent starts: workers, plus the servers in PS mode."""
        return self.parallelism.procs_per_node

    def threads_per_process(self, local_processes: int) -> int:
        """Intra-op threads of each process: `threads`, or the node's cores shared by its processes."""
        return self.training.threads or max(1, (os.cpu_count() or 1) // local_processes)

    def learning_rate(self, world_workers: int) -> float:
        """The learning-rate rule: `lr` is for the global batch as given. Without `lr`, Adam's
        1e-3 at batch 64 is scaled by the square root of (global batch / 64), the rule for
        adaptive optimisers (Hoffer et al. 2017; linear scaling, Goyal et al. 2017, is for SGD)."""
        if self.optimizer.lr is not None:
            return self.optimizer.lr
        return 1e-3 * ((self.data.batch_size * world_workers) / 64) ** 0.5

    def flat(self) -> dict[str, Any]:
        """The settings in the previous release's flat form (`workers`, `epochs`, `workspace` a
        folder, `db_url`, ...): what the run id digests and what the metadata store records."""
        dumped = self.model_dump()
        return {key: dumped[section][field] for key, (section, field) in FLAT_KEYS.items()}

    def resolved_run_id(self) -> str:
        if self.job.run_id:
            return self.job.run_id
        defining = {key: value for key, value in self.flat().items() if key not in NOT_DEFINING}
        if defining["optimizer"] == "adam":  # runs from before the setting existed keep their ids
            del defining["optimizer"]
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.model.name}-{self.data.dataset}-{digest}"

    def run_dir(self) -> Path:
        return self.workspace.run_dir(self.resolved_run_id())

    def updated(self, changes: Mapping[str, Any]) -> TrainConfig:
        """A copy with the settings at these dotted locations changed (`{"parallelism.workers": 1,
        "workspace": ref}`), validated again: a bad value is a DistmlError naming its location."""
        values = self.model_dump()
        for location, value in changes.items():
            *sections, field = location.split(".")
            part = values
            for section in sections:
                part = part.setdefault(section, {})
            part[field] = value
        return parse_config(values)


def _is_section(key: str, value: Any) -> bool:
    """`model`, `optimizer` and `workspace` are flat keys (a string) and sections (an object)."""
    return key in TrainConfig.model_fields and isinstance(value, Mapping | BaseModel)


def parse_config(values: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig (its sections, or the previous release's flat form), turning validation
    errors into one clear DistmlError that names each error's dotted location."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise DistmlError(f"invalid training configuration: {problems}") from None


def load_config(path: str | os.PathLike) -> TrainConfig:
    return parse_config(json.loads(Path(path).read_text()))
