"""One validated description of a model service, shared by the CLI, the gateway and every replica.

Pydantic models (as `train/config.py`): `distml serve` builds a `ServeConfig`, validates it before
any process starts and writes it to the service's folder; each replica process reads its own
`ReplicaConfig` file. Every setting has its one default here; the bearer token never touches disk
(it travels in the `DISTML_SERVE_TOKEN` environment variable).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from distml.core import DB_URL_ENV
from distml.core.errors import DistmlError
from distml.core.layout import DEFAULT_ROOT, WorkspaceRef

TOKEN_ENV = "DISTML_SERVE_TOKEN"
SUPERVISOR_ENV = "DISTML_SUPERVISOR_PID"  # set for the gateways and replicas of a supervised service
STATE_FILE = "state.json"  # a supervised service's replicas and routing, which its next gateway takes over
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
REPLICA_COMMAND = (sys.executable, "-m", "distml.serve.server")
LogLevel = Literal["debug", "info", "warning", "error"]

#: config field path -> the `distml serve` flag that sets it, so errors name flags that exist.
FLAGS = {
    "replica.max_batch_size": "--max-batch-size",
    "replica.max_batch_delay_ms": "--max-batch-delay-ms",
    "replica.models": "MODEL",
    "replicas": "--replicas",
    "shards": "--shards",
    "host": "--host",
    "port": "--port",
    "insecure": "--insecure",
    "hold_timeout": "--hold-timeout",
    "autoscale": "--autoscale",
    "autoscale.min_replicas": "--autoscale MIN:MAX",
    "autoscale.max_replicas": "--autoscale MIN:MAX",
    "autoscale.target_concurrency": "--target-concurrency",
    "autoscale.stable_window": "--stable-window",
    "autoscale.panic_window": "--panic-window",
    "autoscale.scale_to_zero_after": "--scale-to-zero-after",
    "name": "--name",
    "seed": "--seed",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ReplicaConfig(_Strict):
    """One model-server replica: what it serves, where it listens, how it batches."""

    workspace: WorkspaceRef = Field(
        default_factory=WorkspaceRef, description="the workspace's folder and metadata store (db_url None: distml.db)"
    )
    models: list[str] = Field(min_length=1, description="references: NAME, NAME:VERSION or NAME@ALIAS")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = a free port")
    insecure: bool = Field(
        False, description="listen on a non-loopback host without a token (a network policy guards it)"
    )
    port_file: str | None = Field(None, description="the bound port is written here once the models are loaded")
    max_batch_size: int = Field(32, ge=1, le=4096, description="items per forward pass; 1 turns batching off")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, le=60_000, description="longest wait for a batch to fill; 0 batches what queued meanwhile"
    )
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    job_concurrency: int = Field(4, ge=1, le=256, description="asynchronous jobs run at once")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    log_level: LogLevel = "info"
    cpus: float = Field(
        0.0,
        ge=0,
        description="cpu slots the workspace's scheduler reserves for the replica before it starts; 0 registers "
        "it (visible in `distml queue`, freed when it dies) without reserving, as a replica mostly waits",
    )
    queue: str = Field("default", description="scheduler queue the replica asks in (priority class: serving)")

    @model_validator(mode="before")
    @classmethod
    def _flat_workspace(cls, values: Any) -> Any:
        """The flat form of the files written before `WorkspaceRef`, `workspace: PATH` with `db_url`
        beside it, still loads (as does a path given in Python)."""
        if not isinstance(values, dict):
            return values
        workspace = values.get("workspace", DEFAULT_ROOT)
        if isinstance(workspace, (str, os.PathLike)):
            flat = {key: value for key, value in values.items() if key != "db_url"}
            return {**flat, "workspace": {"root": os.fspath(workspace), "db_url": values.get("db_url")}}
        if "db_url" in values:
            raise ValueError("db_url goes inside workspace ({root, db_url}) when workspace is an object")
        return values


class ScalingPolicy(_Strict):
    """Knative-KPA-style autoscaling on in-flight requests (KServe's `scaleMetric: concurrency`)."""

    target_concurrency: float = Field(4.0, gt=0, description="in-flight requests per replica to aim for")
    min_replicas: int = Field(1, ge=0, description="0 allows scale to zero")
    max_replicas: int = Field(4, ge=1)
    stable_window: float = Field(60.0, gt=0, description="seconds averaged for scaling down (Knative's default)")
    panic_window: float = Field(6.0, gt=0, description="seconds averaged for panic scale-up (10% of stable)")
    panic_threshold: float = Field(2.0, gt=1, description="panic at this multiple of the target per replica")
    scale_to_zero_after: float = Field(30.0, ge=0, description="idle seconds before the last replica goes")

    @model_validator(mode="after")
    def _consistent(self) -> ScalingPolicy:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min replicas {self.min_replicas} > max replicas {self.max_replicas}")
        if self.panic_window > self.stable_window:
            raise ValueError(
                f"panic window ({self.panic_window:g} s) must not be longer than the stable window "
                f"({self.stable_window:g} s)"
            )
        return self


class ServeConfig(_Strict):
    """A whole service: the gateway's settings and the template of its replicas."""

    name: str = Field("service", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    replica: ReplicaConfig
    replica_command: list[str] = Field(default_factory=lambda: list(REPLICA_COMMAND), min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 = a free port")
    insecure: bool = Field(False, description="listen on a non-loopback host without a token (--insecure)")
    replicas: int = Field(1, ge=0, le=256, description="initial replicas per shard group")
    shards: int = Field(1, ge=1, le=64, description="shard groups (X-Shard-Key, scatter-gather)")
    autoscale: ScalingPolicy | None = None
    autoscale_tick: float = Field(0.5, gt=0)
    max_attempts: int = Field(3, ge=1, le=10, description="tries of one request on different replicas")
    hold_timeout: float = Field(60.0, gt=0, description="seconds a request waits for a ready replica")
    request_timeout: float = Field(120.0, gt=0)
    health_interval: float = Field(0.5, gt=0)
    health_timeout: float = Field(2.0, gt=0)
    max_health_failures: int = Field(3, ge=1)
    start_timeout: float = Field(60.0, gt=0)
    drain_timeout: float = Field(30.0, ge=0)
    seed: int | None = Field(None, description="seed of the canary split's random choice")
    port_file: str | None = Field(None, description="the gateway's bound port is written here once it serves")
    log_level: LogLevel = "warning"
    token: SecretStr | None = Field(None, exclude=True, description="bearer token; never written to disk")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.autoscale is not None:
            self.replicas = min(max(self.replicas, self.autoscale.min_replicas), self.autoscale.max_replicas)
        elif self.replicas == 0:
            raise ValueError("0 replicas can only start on demand: use --autoscale 0:N to scale from zero")
        return self

    @property
    def models(self) -> list[str]:
        return self.replica.models

    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token is not None else None

    def service_dir(self) -> Path:
        return self.replica.workspace.service_dir(self.name)


def _problems(exc: ValidationError, prefix: str = "", flags: dict[str, str] | None = None) -> str:
    parts = []
    for err in exc.errors():
        names = [str(p) for p in err["loc"] if not isinstance(p, int)]  # list indices say nothing to a user
        path = ".".join([prefix, *names] if prefix else names)
        where = (flags or {}).get(path, path or "config")
        message = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        shown = "" if isinstance(given, dict) or path == "" else f" (got {given!r})"
        parts.append(f"{where}: {message}{shown}")
    return "; ".join(parts)


def parse_serve_config(values: dict[str, Any]) -> ServeConfig:
    """Build a ServeConfig, turning validation errors into one DistmlError that names the flags."""
    try:
        return ServeConfig(**values)
    except ValidationError as exc:
        raise DistmlError(f"invalid serving configuration: {_problems(exc, flags=FLAGS)}") from None


def parse_replica_config(values: dict[str, Any]) -> ReplicaConfig:
    try:
        return ReplicaConfig(**values)
    except ValidationError as exc:
        raise DistmlError(f"invalid replica configuration: {_problems(exc)}") from None


def parse_scaling_policy(values: dict[str, Any]) -> ScalingPolicy:
    try:
        return ScalingPolicy(**values)
    except ValidationError as exc:
        raise DistmlError(f"invalid autoscaling policy: {_problems(exc, 'autoscale', FLAGS)}") from None


def _read(path: str | os.PathLike, what: str) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DistmlError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise DistmlError(f"the {what} file {path} is not valid JSON ({exc}); expected a {what} object") from None
    if not isinstance(values, dict):
        raise DistmlError(f"the {what} file {path} holds a JSON {type(values).__name__}; expected an object")
    return values


def load_replica_config(path: str | os.PathLike) -> ReplicaConfig:
    return parse_replica_config(_read(path, "replica configuration"))


def store_from_env(replica: ReplicaConfig) -> ReplicaConfig:
    """`replica` with its metadata store's URL from `DISTML_DB_URL` when its workspace names none: on a
    cluster's pod the URL (with its password) comes from a Secret, never from a config file."""
    url = os.environ.get(DB_URL_ENV)
    if replica.workspace.db_url is not None or not url:
        return replica
    return replica.model_copy(update={"workspace": replica.workspace.model_copy(update={"db_url": url})})


def load_serve_config(path: str | os.PathLike) -> ServeConfig:
    """A ServeConfig from its file; the token comes from `DISTML_SERVE_TOKEN` (it is never stored)."""
    values = _read(path, "serving configuration")
    values.pop("token", None)
    token = os.environ.get(TOKEN_ENV)
    return parse_serve_config({**values, "token": token or None})


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "REPLICA_COMMAND",
    "TOKEN_ENV",
    "ReplicaConfig",
    "ScalingPolicy",
    "ServeConfig",
    "load_replica_config",
    "load_serve_config",
    "parse_replica_config",
    "parse_scaling_policy",
    "parse_serve_config",
    "store_from_env",
]
