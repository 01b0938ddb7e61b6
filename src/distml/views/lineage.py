"""`distml lineage`: where a model version came from and where it went, and what was trained from a snapshot.

`model_lineage` and `data_lineage` walk the ML Metadata graph that producers record
(`distml.lineage`), with the registry, the workflow store, the training runs and the live state
of the gateways' processes, into plain dicts; `render_model`/`render_data` draw them as a tree
(the CLI prints them, or the dicts as JSON). Every read goes through the owner of its tables.
Google's ml-metadata package was considered; its store is a C++ library with a schema of its
own and wheels for few platforms, and it would be a second database beside distml's.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from distml.core.errors import DistmlError
from distml.core.liveness import process_identity
from distml.core.refs import ModelRef
from distml.lineage import store as graph
from distml.lineage.store import (
    CHECKPOINT,
    DEPLOYMENT,
    MODEL,
    REGISTRATION,
    SNAPSHOT,
    STEP,
    TRAINING,
    Artifact,
    Execution,
)
from distml.models import registry
from distml.train import store as train_store
from distml.workflow import store as workflow_store

# -- reading the graph -------------------------------------------------------------------------


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat()


def _version_view(version: registry.ModelVersion) -> dict[str, Any]:
    return {
        "ref": version.ref,
        "name": version.name,
        "version": version.version,
        "aliases": list(version.aliases),
        "manifest_digest": version.manifest_digest,
        "weights_digest": version.weights_digest,
        "metrics": version.metrics,
        "created_at": _iso(version.created_at),
    }


def _snapshot_view(artifact: Artifact) -> dict[str, Any]:
    p = artifact.properties
    return {
        "dataset": p.get("dataset"),
        "split": p.get("split"),
        "fingerprint": artifact.fingerprint,
        "records": p.get("num_records"),
        "uri": artifact.uri,
        "dataset_id": p.get("dataset_id"),
    }


def _deployment_view(execution: Execution, host: str) -> dict[str, Any]:
    """A deployment as recorded, and whether it serves now: a `running` record counts only while
    its gateway process (same pid, same start time) still runs, as seen from this host."""
    p = execution.properties
    if execution.state != "running":
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
        "recorded_state": execution.state,
        "url": p.get("url"),
        "host": p.get("host"),
        "pid": p.get("pid"),
        "started_at": _iso(execution.started_at),
        "ended_at": _iso(execution.ended_at),
        "started_by": p.get("started_by"),
    }


def _training_view(engine: sa.Engine, execution: Execution, outputs: list[Artifact]) -> dict[str, Any]:
    p = execution.properties
    run_id = execution.key
    last = train_store.last_step(engine, run_id)
    return {
        "run_id": run_id,
        "state": execution.state,
        "parameters": p.get("parameters", {}),
        "code": p.get("code", {}),
        "host": p.get("host"),
        "workflow_run": (p.get("step") or {}).get("run_id"),
        "step": (p.get("step") or {}).get("node_id"),
        "last_step": last.step if last is not None else None,
        "last_loss": last.loss if last is not None else None,
        "checkpoints": [{"uri": o.uri, "step": o.properties.get("step")} for o in outputs if o.type == CHECKPOINT],
        "models": [o.name for o in outputs if o.type == MODEL],
        "started_at": _iso(execution.started_at),
        "ended_at": _iso(execution.ended_at),
    }


def _code_digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _step_view(node: str, r: workflow_store.StepExecution | None) -> dict[str, Any]:
    if r is None:
        return {"node_id": node, "status": None}
    parts = r.memo_parts
    return {
        "node_id": node,
        "step": r.step_name,
        "status": r.status,
        "cache": r.cache,
        "cache_reason": r.cache_reason,
        "memo_key": r.memo_key,
        "params": parts.get("params") if parts else None,
        "code_digest": _code_digest(parts["code"]) if parts and parts.get("code") else None,
        "started_at": _iso(r.started_at),
        "finished_at": _iso(r.finished_at),
    }


def _workflow_views(engine: sa.Engine, step_executions: list[Execution], closure: bool) -> list[dict[str, Any]]:
    """The workflow runs of `step_executions`, each with those steps (and, with `closure`, the
    steps of the same run they waited for: their upstream in the run's DAG)."""
    by_run: dict[str, set[str]] = {}
    for execution in step_executions:
        p = execution.properties
        by_run.setdefault(p.get("run_id") or execution.key.split("/")[0], set()).add(p.get("node_id") or execution.name)
    views = []
    for run_id in sorted(by_run):
        run = workflow_store.get_workflow_run(engine, run_id)
        latest = workflow_store.latest_executions(workflow_store.list_step_executions(engine, run_id))
        wanted, todo = set(), list(by_run[run_id])
        while todo:
            node = todo.pop()
            if node in wanted:
                continue
            wanted.add(node)
            if closure and node in latest:
                todo.extend(latest[node].upstream)
        order = sorted(wanted, key=lambda n: (latest[n].id if n in latest else 0, n))
        views.append(
            {
                "run_id": run_id,
                "status": run.status if run else None,
                "target": run.target if run else None,
                "params": run.params if run else None,
                "started_at": _iso(run.created_at) if run else None,
                "steps": [_step_view(node, latest.get(node)) for node in order],
            }
        )
    return views


def _linked(
    engine: sa.Engine, executions: Iterable[int]
) -> tuple[dict[int, list[Artifact]], dict[int, list[Artifact]]]:
    """execution id -> the artifacts it wrote, and -> those it read."""
    outputs: dict[int, list[Artifact]] = {}
    inputs: dict[int, list[Artifact]] = {}
    executions = list(executions)
    if executions:
        for kind, into in (("output", outputs), ("input", inputs)):
            events = graph.events_of(engine, executions=executions, kind=kind)
            linked = graph.artifacts_by_id(engine, [a for _, a in events])
            for execution_id, artifact_id in events:
                into.setdefault(execution_id, []).append(linked[artifact_id])
    return outputs, inputs


def _graph_view(engine: sa.Engine, artifact_ids: set[int], execution_ids: set[int], host: str) -> dict[str, Any]:
    """The reached part of the graph by kind: data, training runs, models, registrations, steps, deployments."""
    arts = graph.artifacts_by_id(engine, artifact_ids)
    execs = graph.executions_by_id(engine, execution_ids)
    outputs, inputs = _linked(engine, execs)
    known = registry.versions_by_digest(engine, [a.key for a in arts.values() if a.type == MODEL])

    def model_ref(artifact: Artifact) -> str:
        version = known.get(artifact.key)
        return version.ref if version else (artifact.name or artifact.key)

    ordered = sorted(execs.values(), key=lambda e: e.id)
    registrations = []
    for e in ordered:
        if e.type == REGISTRATION:
            step = e.properties.get("step") or {}
            registrations.append(
                {
                    "model": next((model_ref(a) for a in outputs.get(e.id, []) if a.type == MODEL), None),
                    "from": next((model_ref(a) for a in inputs.get(e.id, []) if a.type == MODEL), None),
                    "workflow_run": step.get("run_id"),
                    "step": step.get("node_id"),
                    "at": _iso(e.started_at),
                }
            )
    for outs in outputs.values():  # training views name their models as the registry does
        for a in outs:
            if a.type == MODEL:
                a.name = model_ref(a)
    models = [
        _version_view(known[a.key])
        if a.key in known
        else {"ref": a.name or a.key, "manifest_digest": a.key, "registered": False}
        for a in sorted(arts.values(), key=lambda a: a.id)
        if a.type == MODEL
    ]
    return {
        "data": [_snapshot_view(a) for a in sorted(arts.values(), key=lambda a: a.id) if a.type == SNAPSHOT],
        "training_runs": [_training_view(engine, e, outputs.get(e.id, [])) for e in ordered if e.type == TRAINING],
        "models": models,
        "registrations": registrations,
        "steps": [e for e in ordered if e.type == STEP],
        "deployments": [_deployment_view(e, host) for e in ordered if e.type == DEPLOYMENT],
    }


def _serving_now(deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"service": d["service"], "url": d["url"], "model": d["model"]} for d in deployments if d["status"] == "serving"
    ]


def model_lineage(engine: sa.Engine, ref: str, host: str | None = None) -> dict[str, Any]:
    """Upstream (data snapshots, training runs with their parameters and code, the models it was
    registered from, workflow runs and their steps) and downstream (models registered from it,
    deployments, the services serving it now) of model `ref` (NAME, NAME:VERSION or NAME@ALIAS)."""
    host = host or socket.gethostname()
    version = registry.resolve(engine, ModelRef.parse(ref))
    start = graph.artifact_id(engine, MODEL, version.manifest_digest)
    view: dict[str, Any] = {"model": _version_view(version), "recorded": start is not None}
    up_artifacts, up_executions = graph.walk(engine, [start], "up") if start is not None else (set(), set())
    down_artifacts, down_executions = graph.walk(engine, [start], "down") if start is not None else (set(), set())
    up = _graph_view(engine, up_artifacts - {start}, up_executions, host)
    down = _graph_view(engine, down_artifacts - {start}, down_executions, host)
    up["workflow_runs"] = _workflow_views(engine, up.pop("steps"), closure=True)
    down["workflow_runs"] = _workflow_views(engine, down.pop("steps"), closure=False)
    del up["deployments"], down["data"]  # nothing upstream is a deployment, nothing downstream a snapshot
    down["serving_now"] = _serving_now(down["deployments"])
    view["upstream"], view["downstream"] = up, down
    return view


def data_lineage(engine: sa.Engine, fingerprint: str, host: str | None = None) -> dict[str, Any]:
    """Everything trained from the data snapshot whose fingerprint is (or starts with, when that
    is unique) `fingerprint`: training runs, steps, models, deployments and what serves now."""
    host = host or socket.gethostname()
    text = (fingerprint or "").strip().lower()
    if not text:
        raise DistmlError("--data expects a data snapshot fingerprint (or a unique prefix of one)")
    found = graph.snapshots(engine, text)
    matches = sorted({a.fingerprint for a in found})
    if not matches:
        listing = ", ".join(f"{a.fingerprint[:16]} ({a.name})" for a in graph.snapshots(engine, limit=10))
        raise DistmlError(
            f"no data snapshot has a fingerprint starting with {text!r}; "
            + (
                f"recorded snapshots: {listing}"
                if listing
                else "no data snapshots are recorded yet (`distml data prepare` or `distml run` records them)"
            )
        )
    if len(matches) > 1:
        listing = ", ".join(f"{fp} ({next(a.name for a in found if a.fingerprint == fp)})" for fp in matches[:10])
        raise DistmlError(
            f"fingerprint prefix {text!r} is ambiguous: {len(matches)} data snapshots match ({listing}); "
            "give more characters"
        )
    artifact_ids, execution_ids = graph.walk(engine, [a.id for a in found], "down")
    view = _graph_view(engine, artifact_ids, execution_ids, host)
    view["workflow_runs"] = _workflow_views(engine, view.pop("steps"), closure=False)
    view["fingerprint"] = matches[0]
    view["serving_now"] = _serving_now(view["deployments"])
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
