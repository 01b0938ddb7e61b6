"""Recording lineage: the small functions every producer calls to say what it read and wrote.

The facts come from many processes at different times (ingest, the lead training rank, step
processes, the registry, gateways); each records them here as ML Metadata artifacts, executions
and events (`lineage/store.py`), idempotently. `distml.views.lineage` walks the graph.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from distml.core.db import in_transaction
from distml.lineage import store as md
from distml.lineage.store import (
    CHECKPOINT,
    DEPLOYMENT,
    MODEL,
    PIPELINE_RUN,
    REGISTRATION,
    SERVICE,
    SNAPSHOT,
    STEP,
    TRAINING,
)

__all__ = ["DEPLOYMENT", "STEP", "TRAINING", "code_version", "end_step", "enter_step", "record_data_snapshot",
           "record_deployment", "record_model", "record_training", "step_key"]  # fmt: skip

#: Set in a step process to the step execution it runs (run_id, node_id, generation and the
#: properties to record it with): what that process and its children (training ranks) record is
#: linked to the step as well.
STEP_ENV = "DISTML_STEP_EXECUTION"


# -- recording ---------------------------------------------------------------------------------


def step_key(run_id: str, node_id: str, generation: int) -> str:
    return f"{run_id}/{node_id}/{generation}"


def enclosing_step() -> dict[str, Any] | None:
    """The step execution this process runs in or was started by ({run_id, node_id, generation}), or None."""
    text = os.environ.get(STEP_ENV)
    if not text:
        return None
    try:
        step = json.loads(text)
        return {"run_id": str(step["run_id"]), "node_id": str(step["node_id"]), "generation": int(step["generation"])}
    except (ValueError, KeyError, TypeError):
        return None


def _step_ids(conn: sa.Connection, step: dict[str, Any] | None) -> tuple[int, int] | None:
    """(execution id, pipeline_run context id) of the enclosing step, recorded as it first reads or
    writes an artifact (from its own process or a child's), or recorded again by a retry."""
    if step is None:
        return None
    key = step_key(step["run_id"], step["node_id"], step["generation"])
    row = md.find_execution(conn, STEP, key)
    context_id = md.record_context(conn, PIPELINE_RUN, step["run_id"])
    try:
        properties = {**(json.loads(os.environ.get(STEP_ENV, "{}")).get("properties") or {}), **step}
    except ValueError:
        properties = dict(step)
    if row is not None and (
        row.state == "running" or json.loads(row.properties_json).get("attempt") == properties.get("attempt")
    ):  # running, or ended while a process it started still records: its state stays
        return int(row.id), context_id
    execution_id = md.record_execution(conn, STEP, key, state="running", name=step["node_id"], properties=properties)
    md.associate(conn, context_id, execution_id=execution_id)
    return execution_id, context_id


def _event(conn: sa.Connection, execution_id: int, artifact_id: int, kind: str, step: tuple[int, int] | None) -> None:
    """Link the event, and the same event for the step the execution ran in."""
    md.link(conn, execution_id, artifact_id, kind)
    if step is not None and step[0] != execution_id:
        md.link(conn, step[0], artifact_id, kind)


def _snapshot_artifact(conn: sa.Connection, snapshot: dict[str, Any]) -> int:
    name, split, fingerprint = snapshot["name"], snapshot["split"], snapshot["fingerprint"]
    properties = {"dataset": name, "split": split}
    for key in ("num_records", "dataset_id"):
        if snapshot.get(key) is not None:
            properties[key] = snapshot[key]
    return md.record_artifact(
        conn,
        SNAPSHOT,
        f"{name}/{split}@{fingerprint}",
        name=f"{name}/{split}",
        uri=snapshot.get("uri"),
        fingerprint=fingerprint,
        properties=properties,
    )


def record_data_snapshot(engine: sa.Engine, **snapshot: Any) -> int:
    """A data set split's snapshot (name, split, fingerprint, uri, num_records, dataset_id) as an
    artifact; recorded inside a step (ingest), it is that step's output. Returns its id."""

    def work(conn: sa.Connection) -> int:
        artifact_id = _snapshot_artifact(conn, snapshot)
        step = _step_ids(conn, enclosing_step())
        if step is not None:
            md.link(conn, step[0], artifact_id, "output")
            md.associate(conn, step[1], artifact_id=artifact_id)
        return artifact_id

    return in_transaction(engine, work)


def enter_step(run_id: str, node_id: str, generation: int, properties: dict[str, Any] | None = None) -> None:
    """From now on, what this process and its children record is linked to this pipeline step's
    execution as well. The execution itself is written with the first artifact it reads or writes,
    so a step that touches none costs no write."""
    step = {"run_id": run_id, "node_id": node_id, "generation": generation, "properties": properties or {}}
    os.environ[STEP_ENV] = json.dumps(step, default=str)


def end_step(engine: sa.Engine, run_id: str, node_id: str, generation: int, state: str) -> None:
    """The step execution ended in `state` (complete, failed), if it was recorded."""
    md.end_execution(engine, STEP, step_key(run_id, node_id, generation), state)


@functools.cache
def code_version() -> dict[str, Any]:
    """The running code: distml's version and, from a git checkout, its commit and whether the
    checkout has changes that are not committed."""
    from distml import __version__

    version: dict[str, Any] = {"distml": __version__}
    folder = Path(__file__).resolve().parent
    if {"site-packages", "dist-packages"} & set(folder.parts):  # installed: a repository above is not ours
        return version
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            status = subprocess.run(
                ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            version["git_commit"] = commit.stdout.strip()
            version["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def record_training(
    engine: sa.Engine,
    run_id: str,
    *,
    state: str,
    parameters: dict[str, Any] | None = None,
    data: Iterable[dict[str, Any]] = (),
    checkpoint: dict[str, Any] | None = None,
    model_digest: str | None = None,
) -> None:
    """A training run: as it starts, its parameters, code version and input data snapshots; as it
    ends, its last checkpoint ({uri, step}) and the manifest digest of the model it saved."""
    step = enclosing_step()
    properties: dict[str, Any] = {"host": socket.gethostname()}
    if parameters is not None:
        properties.update(parameters=parameters, code=code_version())
    if step is not None:
        properties["step"] = step

    def work(conn: sa.Connection) -> None:
        execution_id = md.record_execution(conn, TRAINING, run_id, state=state, name=run_id, properties=properties)
        in_step = _step_ids(conn, step)
        if in_step is not None:
            md.associate(conn, in_step[1], execution_id=execution_id)
        for snapshot in data:
            _event(conn, execution_id, _snapshot_artifact(conn, snapshot), "input", in_step)
        if checkpoint is not None:
            artifact_id = md.record_artifact(
                conn,
                CHECKPOINT,
                f"{run_id}@{checkpoint['step']}",
                name=f"{run_id} step {checkpoint['step']}",
                uri=checkpoint["uri"],
                properties={"run_id": run_id, "step": checkpoint["step"]},
            )
            _event(conn, execution_id, artifact_id, "output", in_step)
        if model_digest is not None:
            _event(conn, execution_id, md.record_artifact(conn, MODEL, model_digest), "output", in_step)

    in_transaction(engine, work)


def record_model(
    engine: sa.Engine,
    *,
    name: str,
    version: int,
    manifest_digest: str,
    weights_digest: str,
    properties: dict[str, Any] | None = None,
    derived_from: str | None = None,
) -> None:
    """A registered model version as a `model` artifact (keyed by its manifest digest). With
    `derived_from` (the manifest digest it was registered from), a `registration` execution reads
    that model and writes this one; inside a step, the step does too."""
    step = enclosing_step()

    def work(conn: sa.Connection) -> None:
        artifact_id = md.record_artifact(
            conn,
            MODEL,
            manifest_digest,
            name=f"{name}:{version}",
            uri=f"artifacts/{manifest_digest[:2]}/{manifest_digest}",
            fingerprint=weights_digest,
            properties={"name": name, "version": version, **(properties or {})},
        )
        in_step = _step_ids(conn, step)
        if derived_from is None:
            if in_step is not None:  # saved by the step itself (or a training run inside it)
                md.link(conn, in_step[0], artifact_id, "output")
            return
        execution_id = md.record_execution(
            conn,
            REGISTRATION,
            f"{name}:{version}",
            state="complete",
            name=f"register {name}:{version}",
            properties={"step": step} if step is not None else None,
        )
        if in_step is not None:
            md.associate(conn, in_step[1], execution_id=execution_id)
        _event(conn, execution_id, md.record_artifact(conn, MODEL, derived_from), "input", in_step)
        _event(conn, execution_id, artifact_id, "output", in_step)

    in_transaction(engine, work)


def record_deployment(
    engine: sa.Engine,
    *,
    service: str,
    model: str,
    manifest_digest: str,
    state: str,
    pid: int,
    host: str,
    pid_started: str | None,
    url: str | None = None,
    properties: dict[str, Any] | None = None,
) -> None:
    """Service `service` (a gateway: `pid` on `host`) starts (`running`) or stops (`ended`) serving
    the registered version `model` (NAME:VERSION, whose manifest is `manifest_digest`); the
    deployment reads that model artifact."""

    def work(conn: sa.Connection) -> None:
        execution_id = md.record_execution(
            conn,
            DEPLOYMENT,
            f"{service}/{host}/{pid}/{pid_started}/{model}",
            state=state,
            name=f"{service} serves {model}",
            properties={
                "service": service,
                "model": model,
                "host": host,
                "pid": pid,
                "pid_started": pid_started,
                "url": url,
                **(properties or {}),
            },
        )
        md.associate(conn, md.record_context(conn, SERVICE, service), execution_id=execution_id)
        md.link(conn, execution_id, md.record_artifact(conn, MODEL, manifest_digest), "input")

    in_transaction(engine, work)
