"""Lineage: where a model version came from and where it went, and what was trained from a snapshot.

The facts come from many processes at different times (ingest, the lead training rank, step
processes, the registry, gateways); each records them through the small `record_*` functions
here as ML Metadata artifacts, executions and events (`distml.ops.metadata`, migration 7),
idempotently. `model_lineage` and `data_lineage` walk that graph, with the registry, the
workflow tables and the live state of the gateways' processes, into plain dicts that
`distml lineage` prints as a tree or as JSON. Google's ml-metadata package was considered; its
store is a C++ library with a schema of its own and wheels for few platforms, and it would be a
second database beside the one every other part of distml already writes.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from distml.core.errors import DistmlError
from distml.core.liveness import process_identity
from distml.core.refs import ModelRef
from distml.ops import metadata as md

#: Set in a step process to the step execution it runs (run_id, node_id, generation and the
#: properties to record it with): what that process and its children (training ranks) record is
#: linked to the step as well.
STEP_ENV = "DISTML_STEP_EXECUTION"

SNAPSHOT, CHECKPOINT, MODEL = "dataset_snapshot", "checkpoint", "model"
TRAINING, STEP, REGISTRATION, DEPLOYMENT = "training_run", "step_execution", "registration", "deployment"
PIPELINE_RUN, SERVICE = "pipeline_run", "service"


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
    row = conn.execute(
        sa.select(md.executions.c.id, md.executions.c.state, md.executions.c.properties_json).where(
            md.executions.c.type == STEP, md.executions.c.key == key
        )
    ).first()
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

    return md.in_transaction(engine, work)


def enter_step(run_id: str, node_id: str, generation: int, properties: dict[str, Any] | None = None) -> None:
    """From now on, what this process and its children record is linked to this pipeline step's
    execution as well. The execution itself is written with the first artifact it reads or writes,
    so a step that touches none costs no write."""
    step = {"run_id": run_id, "node_id": node_id, "generation": generation, "properties": properties or {}}
    os.environ[STEP_ENV] = json.dumps(step, default=str)


def end_step(engine: sa.Engine, run_id: str, node_id: str, generation: int, state: str) -> None:
    """The step execution ended in `state` (complete, failed), if it was recorded."""
    where = (md.executions.c.type == STEP, md.executions.c.key == step_key(run_id, node_id, generation))
    with engine.connect() as conn:  # a read first: most steps touch no artifact, and a write would
        if conn.execute(sa.select(md.executions.c.id).where(*where)).first() is None:  # queue for the lock
            return
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(md.executions.update().where(*where).values(state=state, ended_at=now, updated_at=now))


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

    md.in_transaction(engine, work)


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

    md.in_transaction(engine, work)


def _resolve_ref(conn: sa.Connection, ref: str) -> tuple[str, int] | None:
    """(name, version) of the registered model `ref` names (any `ModelRef` form), else None."""
    v = md.model_versions
    try:
        parsed = ModelRef.parse(ref)
    except DistmlError:
        return None
    if parsed.digest is not None:
        found = conn.execute(sa.select(v.c.name, v.c.version).where(v.c.manifest_digest == parsed.digest)).first()
        return (found.name, int(found.version)) if found is not None else None
    name, version = parsed.name, parsed.version
    if parsed.alias is not None:
        version = conn.execute(
            sa.select(md.model_aliases.c.version).where(
                md.model_aliases.c.name == name, md.model_aliases.c.alias == parsed.alias
            )
        ).scalar()
    elif version is None:
        version = conn.execute(sa.select(sa.func.max(v.c.version)).where(v.c.name == name)).scalar()
    if version is None:
        return None
    found = conn.execute(sa.select(v.c.id).where(v.c.name == name, v.c.version == version)).first()
    return (name, int(version)) if found is not None else None


def record_deployment(
    engine: sa.Engine,
    *,
    service: str,
    ref: str,
    state: str,
    pid: int,
    host: str,
    pid_started: str | None,
    url: str | None = None,
    properties: dict[str, Any] | None = None,
) -> str | None:
    """Service `service` (a gateway: `pid` on `host`) starts (`running`) or stops (`ended`) serving
    model `ref`; the deployment reads that model version. Returns the version as NAME:VERSION
    (record the end with it: an alias may have moved meanwhile), None if `ref` is not registered."""

    def work(conn: sa.Connection) -> str | None:
        resolved = _resolve_ref(conn, ref)
        if resolved is None:
            return None
        name, version = resolved
        digest = conn.execute(
            sa.select(md.model_versions.c.manifest_digest).where(
                md.model_versions.c.name == name, md.model_versions.c.version == version
            )
        ).scalar_one()
        pinned = f"{name}:{version}"
        execution_id = md.record_execution(
            conn,
            DEPLOYMENT,
            f"{service}/{host}/{pid}/{pid_started}/{pinned}",
            state=state,
            name=f"{service} serves {pinned}",
            properties={
                "service": service,
                "model": pinned,
                "host": host,
                "pid": pid,
                "pid_started": pid_started,
                "url": url,
                **(properties or {}),
            },
        )
        md.associate(conn, md.record_context(conn, SERVICE, service), execution_id=execution_id)
        md.link(conn, execution_id, md.record_artifact(conn, MODEL, digest), "input")
        return pinned

    return md.in_transaction(engine, work)


# -- reading the graph -------------------------------------------------------------------------


def _rows(conn: sa.Connection, table: sa.Table, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    out = {}
    for row in conn.execute(sa.select(table).where(table.c.id.in_(ids))):
        item = dict(row._mapping)
        item["properties"] = json.loads(item.pop("properties_json") or "{}")
        out[item["id"]] = item
    return out


def _events(conn: sa.Connection, *, artifacts: Iterable[int] = (), executions: Iterable[int] = (), kind: str):
    e = md.events
    where = [e.c.kind == kind]
    artifacts, executions = sorted(set(artifacts)), sorted(set(executions))
    if artifacts:
        where.append(e.c.artifact_id.in_(artifacts))
    if executions:
        where.append(e.c.execution_id.in_(executions))
    if not artifacts and not executions:
        return []
    return conn.execute(sa.select(e.c.execution_id, e.c.artifact_id).where(*where)).all()


def _walk(conn: sa.Connection, start: Iterable[int], direction: str) -> tuple[set[int], set[int]]:
    """Artifacts and executions reachable from `start`: upstream through the executions that wrote
    an artifact and what they read (data snapshots are where it stops: their lineage is their
    fingerprint), or downstream through the executions that read one and what they wrote."""
    seen_artifacts, seen_executions = set(start), set()
    frontier = set(start)
    into, out_of = ("output", "input") if direction == "up" else ("input", "output")
    while frontier:
        executions = {r.execution_id for r in _events(conn, artifacts=frontier, kind=into)} - seen_executions
        seen_executions |= executions
        found = {r.artifact_id for r in _events(conn, executions=executions, kind=out_of)} - seen_artifacts
        seen_artifacts |= found
        frontier = found
        if direction == "up":
            types = _rows(conn, md.artifacts, found)
            frontier = {a for a in found if types[a]["type"] != SNAPSHOT}
    return seen_artifacts, seen_executions


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat()


def _registry_views(conn: sa.Connection, digests: Iterable[str]) -> dict[str, dict[str, Any]]:
    """manifest digest -> {ref, name, version, aliases, metrics, created_at} from the registry."""
    digests = sorted(set(digests))
    if not digests:
        return {}
    v, a = md.model_versions, md.model_aliases
    rows = conn.execute(sa.select(v).where(v.c.manifest_digest.in_(digests)).order_by(v.c.id)).all()
    aliases: dict[tuple[str, int], list[str]] = {}
    names = sorted({row.name for row in rows})
    if names:
        for row in conn.execute(sa.select(a).where(a.c.name.in_(names)).order_by(a.c.alias)):
            aliases.setdefault((row.name, row.version), []).append(row.alias)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out.setdefault(
            row.manifest_digest,
            {
                "ref": f"{row.name}:{row.version}",
                "name": row.name,
                "version": row.version,
                "aliases": aliases.get((row.name, row.version), []),
                "manifest_digest": row.manifest_digest,
                "weights_digest": row.weights_digest,
                "metrics": json.loads(row.metrics_json),
                "created_at": _iso(row.created_at),
            },
        )
    return out


def _snapshot_view(artifact: dict[str, Any]) -> dict[str, Any]:
    p = artifact["properties"]
    return {
        "dataset": p.get("dataset"),
        "split": p.get("split"),
        "fingerprint": artifact["fingerprint"],
        "records": p.get("num_records"),
        "uri": artifact["uri"],
        "dataset_id": p.get("dataset_id"),
    }


def _deployment_view(execution: dict[str, Any], host: str) -> dict[str, Any]:
    """A deployment as recorded, and whether it serves now: a `running` record counts only while
    its gateway process (same pid, same start time) still runs, as seen from this host."""
    p = execution["properties"]
    if execution["state"] != "running":
        status = "ended"
    elif p.get("host") != host:
        status = "unknown"  # another machine's process: not ours to probe
    else:
        identity = process_identity(int(p.get("pid") or 0))
        alive = identity is not None and (p.get("pid_started") in (None, identity))
        status = "serving" if alive else "gone"
    return {
        "service": p.get("service"),
        "model": p.get("model"),
        "status": status,
        "recorded_state": execution["state"],
        "url": p.get("url"),
        "host": p.get("host"),
        "pid": p.get("pid"),
        "started_at": _iso(execution["started_at"]),
        "ended_at": _iso(execution["ended_at"]),
        "started_by": p.get("started_by"),
    }


def _training_view(conn: sa.Connection, execution: dict[str, Any], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    p = execution["properties"]
    run_id = execution["key"]
    steps = conn.execute(
        sa.select(md.train_steps.c.step, md.train_steps.c.loss)
        .where(md.train_steps.c.run_id == run_id)
        .order_by(md.train_steps.c.step.desc())
        .limit(1)
    ).first()
    return {
        "run_id": run_id,
        "state": execution["state"],
        "parameters": p.get("parameters", {}),
        "code": p.get("code", {}),
        "host": p.get("host"),
        "workflow_run": (p.get("step") or {}).get("run_id"),
        "step": (p.get("step") or {}).get("node_id"),
        "last_step": steps.step if steps is not None else None,
        "last_loss": steps.loss if steps is not None else None,
        "checkpoints": [
            {"uri": o["uri"], "step": o["properties"].get("step")} for o in outputs if o["type"] == CHECKPOINT
        ],
        "models": [o["name"] for o in outputs if o["type"] == MODEL],
        "started_at": _iso(execution["started_at"]),
        "ended_at": _iso(execution["ended_at"]),
    }


def _code_digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _workflow_views(conn: sa.Connection, step_executions: list[dict[str, Any]], closure: bool) -> list[dict[str, Any]]:
    """The workflow runs of `step_executions`, each with those steps (and, with `closure`, the
    steps of the same run they waited for: their upstream in the run's DAG)."""
    by_run: dict[str, set[str]] = {}
    for execution in step_executions:
        p = execution["properties"]
        by_run.setdefault(p.get("run_id") or execution["key"].split("/")[0], set()).add(
            p.get("node_id") or execution["name"]
        )
    views = []
    for run_id in sorted(by_run):
        row = conn.execute(sa.select(md.workflow_runs).where(md.workflow_runs.c.run_id == run_id)).first()
        run = dict(row._mapping) if row is not None else None
        latest: dict[str, dict[str, Any]] = {}
        query = (
            sa.select(md.step_executions)
            .where(md.step_executions.c.run_id == run_id)
            .order_by(md.step_executions.c.generation)
        )
        for r in conn.execute(query):
            latest[r.node_id] = dict(r._mapping)
        wanted, todo = set(), list(by_run[run_id])
        while todo:
            node = todo.pop()
            if node in wanted:
                continue
            wanted.add(node)
            if closure and node in latest and latest[node]["upstream_json"]:
                todo.extend(json.loads(latest[node]["upstream_json"]))
        steps = []
        for node in sorted(wanted, key=lambda n: (latest.get(n, {}).get("id") or 0, n)):
            r = latest.get(node)
            if r is None:
                steps.append({"node_id": node, "status": None})
                continue
            parts = json.loads(r["memo_parts_json"]) if r["memo_parts_json"] else None
            steps.append(
                {
                    "node_id": node,
                    "step": r["step_name"],
                    "status": r["status"],
                    "cache": r["cache"],
                    "cache_reason": r["cache_reason"],
                    "memo_key": r["memo_key"],
                    "params": parts.get("params") if parts else None,
                    "code_digest": _code_digest(parts["code"]) if parts and parts.get("code") else None,
                    "started_at": _iso(r["started_at"]),
                    "finished_at": _iso(r["finished_at"]),
                }
            )
        views.append(
            {
                "run_id": run_id,
                "status": run["status"] if run else None,
                "target": run["target"] if run else None,
                "params": json.loads(run["params_json"]) if run else None,
                "started_at": _iso(run["created_at"]) if run else None,
                "steps": steps,
            }
        )
    return views


def _graph_view(conn: sa.Connection, artifact_ids: set[int], execution_ids: set[int], host: str) -> dict[str, Any]:
    """The reached part of the graph by kind: data, training runs, models, registrations, steps, deployments."""
    arts = _rows(conn, md.artifacts, artifact_ids)
    execs = _rows(conn, md.executions, execution_ids)
    outputs: dict[int, list[dict[str, Any]]] = {}
    inputs: dict[int, list[dict[str, Any]]] = {}
    if execs:
        for kind, into in (("output", outputs), ("input", inputs)):
            events = _events(conn, executions=list(execs), kind=kind)
            linked = _rows(conn, md.artifacts, [r.artifact_id for r in events])
            for r in events:
                into.setdefault(r.execution_id, []).append(linked[r.artifact_id])
    registry = _registry_views(conn, [a["key"] for a in arts.values() if a["type"] == MODEL])

    def model_ref(artifact: dict[str, Any]) -> str:
        known = registry.get(artifact["key"])
        return known["ref"] if known else (artifact["name"] or artifact["key"])

    ordered = sorted(execs.values(), key=lambda e: e["id"])
    registrations = []
    for e in ordered:
        if e["type"] == REGISTRATION:
            step = e["properties"].get("step") or {}
            registrations.append(
                {
                    "model": next((model_ref(a) for a in outputs.get(e["id"], []) if a["type"] == MODEL), None),
                    "from": next((model_ref(a) for a in inputs.get(e["id"], []) if a["type"] == MODEL), None),
                    "workflow_run": step.get("run_id"),
                    "step": step.get("node_id"),
                    "at": _iso(e["started_at"]),
                }
            )
    for outs in outputs.values():  # training views name their models as the registry does
        for a in outs:
            if a["type"] == MODEL:
                a["name"] = model_ref(a)
    models = []
    for a in sorted(arts.values(), key=lambda a: a["id"]):
        if a["type"] == MODEL:
            models.append(
                registry.get(a["key"])
                or {"ref": a["name"] or a["key"], "manifest_digest": a["key"], "registered": False}
            )
    deployments = [_deployment_view(e, host) for e in ordered if e["type"] == DEPLOYMENT]
    return {
        "data": [_snapshot_view(a) for a in sorted(arts.values(), key=lambda a: a["id"]) if a["type"] == SNAPSHOT],
        "training_runs": [_training_view(conn, e, outputs.get(e["id"], [])) for e in ordered if e["type"] == TRAINING],
        "models": models,
        "registrations": registrations,
        "steps": [e for e in ordered if e["type"] == STEP],
        "deployments": deployments,
    }


def _find_version(conn: sa.Connection, ref: str) -> Any:
    """The registry row `ref` names, or one error that says what exists."""
    parsed = ModelRef.parse(ref)
    name, alias, version = parsed.name, parsed.alias, parsed.version
    v, a = md.model_versions, md.model_aliases
    if parsed.digest is not None:
        row = conn.execute(sa.select(v).where(v.c.manifest_digest == parsed.digest)).first()
        if row is None:
            raise DistmlError(f"no registered model version has manifest digest {parsed.digest}")
        return row
    versions = [r.version for r in conn.execute(sa.select(v.c.version).where(v.c.name == name).order_by(v.c.version))]
    if not versions:
        names = [r.name for r in conn.execute(sa.select(v.c.name).distinct().order_by(v.c.name))]
        known = "registered models: " + ", ".join(names[:20]) if names else "no models are registered yet"
        raise DistmlError(f"no model named {name!r} is registered; {known}")
    if alias is not None:
        aliases = conn.execute(sa.select(a.c.alias, a.c.version).where(a.c.name == name).order_by(a.c.alias)).all()
        version = next((r.version for r in aliases if r.alias == alias), None)
        if version is None:
            known = ", ".join(f"{r.alias} (-> {name}:{r.version})" for r in aliases)
            raise DistmlError(
                f"model {name!r} has no alias {alias!r}; "
                + (f"its aliases are {known}" if known else "it has no aliases")
            )
    elif version is None:
        version = versions[-1]
    if version not in versions:
        raise DistmlError(f"model {name!r} has no version {version}; its versions are {_ranges(versions)}")
    return conn.execute(sa.select(v).where(v.c.name == name, v.c.version == version)).one()


def _ranges(values: list[int]) -> str:
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]} to {values[-1]}"
    return ", ".join(map(str, values))


def model_lineage(engine: sa.Engine, ref: str, host: str | None = None) -> dict[str, Any]:
    """Upstream (data snapshots, training runs with their parameters and code, the models it was
    registered from, workflow runs and their steps) and downstream (models registered from it,
    deployments, the services serving it now) of model `ref` (NAME, NAME:VERSION or NAME@ALIAS)."""
    host = host or socket.gethostname()
    with engine.connect() as conn:
        row = _find_version(conn, ref)
        model = _registry_views(conn, [row.manifest_digest])[row.manifest_digest]
        start = conn.execute(
            sa.select(md.artifacts.c.id).where(md.artifacts.c.type == MODEL, md.artifacts.c.key == row.manifest_digest)
        ).scalar()
        view: dict[str, Any] = {"model": model, "recorded": start is not None}
        up_artifacts, up_executions = _walk(conn, [start], "up") if start is not None else (set(), set())
        down_artifacts, down_executions = _walk(conn, [start], "down") if start is not None else (set(), set())
        up = _graph_view(conn, up_artifacts - {start}, up_executions, host)
        down = _graph_view(conn, down_artifacts - {start}, down_executions, host)
        up["workflow_runs"] = _workflow_views(conn, up.pop("steps"), closure=True)
        down["workflow_runs"] = _workflow_views(conn, down.pop("steps"), closure=False)
        del up["deployments"], down["data"]  # nothing upstream is a deployment, nothing downstream a snapshot
    down["serving_now"] = [
        {"service": d["service"], "url": d["url"], "model": d["model"]}
        for d in down["deployments"]
        if d["status"] == "serving"
    ]
    view["upstream"], view["downstream"] = up, down
    return view


def data_lineage(engine: sa.Engine, fingerprint: str, host: str | None = None) -> dict[str, Any]:
    """Everything trained from the data snapshot whose fingerprint is (or starts with, when that
    is unique) `fingerprint`: training runs, steps, models, deployments and what serves now."""
    host = host or socket.gethostname()
    text = (fingerprint or "").strip().lower()
    if not text:
        raise DistmlError("--data expects a data snapshot fingerprint (or a unique prefix of one)")
    a = md.artifacts
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(a.c.id, a.c.fingerprint, a.c.name)
            .where(a.c.type == SNAPSHOT, a.c.fingerprint.startswith(text, autoescape=True))
            .order_by(a.c.id)
        ).all()
        matches = sorted({r.fingerprint for r in rows})
        if not matches:
            known = conn.execute(
                sa.select(a.c.fingerprint, a.c.name).where(a.c.type == SNAPSHOT).order_by(a.c.id.desc()).limit(10)
            ).all()
            listing = ", ".join(f"{r.fingerprint[:16]} ({r.name})" for r in known)
            raise DistmlError(
                f"no data snapshot has a fingerprint starting with {text!r}; "
                + (
                    f"recorded snapshots: {listing}"
                    if listing
                    else "no data snapshots are recorded yet (`distml data prepare` or `distml run` records them)"
                )
            )
        if len(matches) > 1:
            listing = ", ".join(f"{fp} ({next(r.name for r in rows if r.fingerprint == fp)})" for fp in matches[:10])
            raise DistmlError(
                f"fingerprint prefix {text!r} is ambiguous: {len(matches)} data snapshots match ({listing}); "
                "give more characters"
            )
        start = [r.id for r in rows]
        artifact_ids, execution_ids = _walk(conn, start, "down")
        view = _graph_view(conn, artifact_ids, execution_ids, host)
        view["workflow_runs"] = _workflow_views(conn, view.pop("steps"), closure=False)
    view["fingerprint"] = matches[0]
    view["serving_now"] = [
        {"service": d["service"], "url": d["url"], "model": d["model"]}
        for d in view["deployments"]
        if d["status"] == "serving"
    ]
    return view


# -- showing it ------------------------------------------------------------------------------------


def _params(values: dict[str, Any] | None, keys: Iterable[str] | None = None) -> str:
    if not values:
        return ""
    items = [(k, values[k]) for k in (keys or sorted(values)) if k in values and values[k] is not None]
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in items)


TRAINING_KEYS = ("model", "dataset", "strategy", "workers", "epochs", "max_steps", "batch_size", "lr", "seed")


def _status(text: str | None) -> str:
    colours = {"serving": "green", "complete": "green", "succeeded": "green", "cached": "cyan"}
    colours.update({"gone": "red", "failed": "red", "ended": "dim", "unknown": "yellow"})
    return f"[{colours.get(text or '', 'white')}]{text}[/]"


def _add_common(tree: Any, part: dict[str, Any]) -> None:
    from rich.markup import escape

    if part.get("data"):
        node = tree.add("data snapshots")
        for d in part["data"]:
            node.add(
                escape(
                    f"{d['dataset']}/{d['split']}  fingerprint {d['fingerprint']}  {d['records']} records  {d['uri']}"
                )
            )
    if part.get("training_runs"):
        node = tree.add("training runs")
        for t in part["training_runs"]:
            code = t["code"]
            git = (
                f" git {code['git_commit'][:12]}{'+changes' if code.get('git_dirty') else ''}"
                if code.get("git_commit")
                else ""
            )
            run = node.add(f"{escape(t['run_id'])}  {_status(t['state'])}")
            run.add(escape(f"parameters: {_params(t['parameters'], TRAINING_KEYS)}"))
            run.add(escape(f"code: distml {code.get('distml', '?')}{git}"))
            if t["last_step"] is not None:
                run.add(f"last recorded step {t['last_step']}, loss {t['last_loss']:.4f}")
            for c in t["checkpoints"]:
                run.add(escape(f"checkpoint step {c['step']}: {c['uri']}"))
            if t["models"]:
                run.add(escape("saved " + ", ".join(t["models"])))
            if t["workflow_run"]:
                run.add(escape(f"in step {t['step']} of workflow run {t['workflow_run']}"))
    if part.get("registrations"):
        node = tree.add("registrations")
        for r in part["registrations"]:
            where = f" (step {r['step']} of {r['workflow_run']})" if r["workflow_run"] else ""
            node.add(escape(f"{r['model']} registered from {r['from']}{where}"))
    if part.get("workflow_runs"):
        node = tree.add("workflow runs")
        for w in part["workflow_runs"]:
            run = node.add(f"{escape(w['run_id'])}  {_status(w['status'])}  {escape(w['target'] or '')}")
            for s in w["steps"]:
                memo = f"  memo {s['memo_key'][:12]}" if s.get("memo_key") else ""
                code = f"  code {s['code_digest']}" if s.get("code_digest") else ""
                cache = f"  cache {s['cache']}" if s.get("cache") else ""
                run.add(f"{escape(s['node_id'])}  {_status(s['status'])}{cache}{memo}{code}")


def _short_time(text: str | None) -> str:
    return text[:19].replace("T", " ") if text else ""


def _add_deployments(tree: Any, deployments: list[dict[str, Any]], serving: list[dict[str, Any]]) -> None:
    from rich.markup import escape

    if deployments:
        node = tree.add("deployments")
        for d in deployments:
            until = f" until {_short_time(d['ended_at'])}" if d["ended_at"] else ""
            note = " (its gateway process is gone; the record was never closed)" if d["status"] == "gone" else ""
            by = d.get("started_by") or {}
            origin = f", started by step {by['node_id']} of {by['run_id']}" if by.get("node_id") else ""
            node.add(
                f"{escape(d['service'] or '?')} serves {escape(d['model'] or '?')}  {_status(d['status'])}{note}  "
                + escape(
                    f"{d['url'] or ''} pid {d['pid']} on {d['host']}, {_short_time(d['started_at'])}{until}{origin}"
                )
            )
    if serving:
        tree.add("[green]serving now:[/] " + escape(", ".join(f"{s['service']} at {s['url']}" for s in serving)))
    else:
        tree.add("serving now: nothing")


def render_model(view: dict[str, Any]) -> Any:
    """`model_lineage`'s result as a rich tree."""
    from rich.markup import escape
    from rich.tree import Tree

    m = view["model"]
    aliases = f" ({', '.join('@' + a for a in m['aliases'])})" if m["aliases"] else ""
    tree = Tree(f"[bold]{escape(m['ref'])}[/]{escape(aliases)}  manifest {m['manifest_digest'][:16]}")
    tree.add(escape(f"metrics: {_params(m['metrics'])}"))
    if not view["recorded"]:
        tree.add("[yellow]no lineage is recorded for this version (registered before lineage was recorded)[/]")
        return tree
    upstream = tree.add("[bold]upstream[/]")
    if view["upstream"]["models"]:
        upstream.add(escape("registered from " + ", ".join(x["ref"] for x in view["upstream"]["models"])))
    _add_common(upstream, view["upstream"])
    downstream = tree.add("[bold]downstream[/]")
    if view["downstream"]["models"]:
        downstream.add(escape("registered as " + ", ".join(x["ref"] for x in view["downstream"]["models"])))
    _add_common(downstream, view["downstream"])
    _add_deployments(downstream, view["downstream"]["deployments"], view["downstream"]["serving_now"])
    return tree


def render_data(view: dict[str, Any]) -> Any:
    """`data_lineage`'s result as a rich tree."""
    from rich.markup import escape
    from rich.tree import Tree

    tree = Tree(f"[bold]data snapshot {escape(view['fingerprint'])}[/]")
    _add_common(tree, {**view, "data": [d for d in view["data"] if d["fingerprint"] == view["fingerprint"]]})
    if view["models"]:
        tree.add(escape("models: " + ", ".join(x["ref"] for x in view["models"])))
    _add_deployments(tree, view["deployments"], view["serving_now"])
    return tree
