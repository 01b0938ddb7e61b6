"""What each page of `distml ui` shows, assembled from the owners' reads, and what its actions call.

Plain functions of the workspace returning dicts for the templates (and, as JSON, for `/api/...`
and the event streams). Reads go through `workflow.store`, `train.store`, `models.registry`,
`pipelines.watches`, `scheduling.admission` and the gateways' admin API; actions through the
functions the CLI calls (`set_alias`, `GatewayAdmin`, the orchestrator's stop).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from distml.core.errors import DistmlError
from distml.core.layout import ServiceRecord, run_dir
from distml.serve.service import find_service
from distml.ui import svg
from distml.workspace import Workspace

HISTORY_S = 600.0  # a service's scrapes are kept this long
RATE_WINDOW_S = 300.0  # rates and quantiles over the last minutes
STATES = ("running", "succeeded", "failed", "stopped")


# -- formatting ------------------------------------------------------------------------------------


def when(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def jsonable(value: Any) -> Any:
    """Dataclasses, datetimes and paths as JSON values (for /api and the event streams)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not str(k).endswith("_svg")}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


# -- runs ------------------------------------------------------------------------------------------


def run_list(ws: Workspace, page: int, size: int, state: str | None, target: str | None, since: str | None) -> dict:
    from distml.workflow.store import count_workflow_runs, list_workflow_runs

    if state is not None and state not in STATES:
        raise DistmlError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    try:
        after = dt.datetime.fromisoformat(since).replace(tzinfo=dt.UTC) if since else None
    except ValueError:
        raise DistmlError(f"since must be a date such as 2026-12-07, got {since!r}") from None
    page = max(1, page)
    total = count_workflow_runs(ws.engine, status=state, target=target, since=after)
    runs = list_workflow_runs(ws.engine, size, status=state, offset=(page - 1) * size, target=target, since=after)
    return {
        "runs": runs,
        "page": page,
        "pages": max(1, -(-total // size)),
        "total": total,
        "filters": {"state": state or "", "target": target or "", "since": since or ""},
        "states": STATES,
    }


def _seconds(row: Any) -> float | None:
    if row.started_at is None:
        return None
    end = row.finished_at or dt.datetime.now(dt.UTC)
    return (end - row.started_at).total_seconds()


def _detail(row: Any) -> str:
    parts = [duration(_seconds(row))]
    if row.cache in ("hit", "miss"):
        parts.append(f"cache {row.cache}")
    resources = row.resources or {}
    if resources.get("workers", 1) > 1:
        parts.append(f"gang {resources['workers']}")
    return " · ".join(p for p in parts if p)


def run_page(ws: Workspace, run_id: str, step: str | None, open_steps: set[str]) -> dict:
    from distml.workflow.store import get_workflow_run, latest_executions, list_step_executions, list_step_metrics

    run = get_workflow_run(ws.engine, run_id)
    if run is None:
        raise DistmlError(f"no workflow run {run_id!r}; the Runs page lists them")
    executions = list_step_executions(ws.engine, run_id)
    latest = latest_executions(executions)
    first_upstream = {r.node_id: r.upstream for r in executions if r.upstream}
    nodes = [
        svg.DagNode(
            node_id,
            node_id,
            row.status,
            _detail(row),
            first_upstream.get(node_id, []),
            f"/runs/{run_id}?step={node_id}",
        )
        for node_id, row in latest.items()
    ]
    folded = svg.fold_fanouts(nodes, open_steps, {n: r.step_name for n, r in latest.items()})
    for node in folded:
        if node.members:
            step_name = node.id.removesuffix("[*]")
            node.href = f"/runs/{run_id}?open={','.join(sorted(open_steps | {step_name}))}"
    selected = None
    if step is not None:
        row = latest.get(step)
        if row is None:
            raise DistmlError(f"run {run_id} has no step {step!r}; its steps are: {', '.join(sorted(latest))}")
        selected = {
            "row": row,
            "seconds": _seconds(row),
            "metrics": list_step_metrics(ws.engine, run_id, step),
            "inputs": json.dumps(row.inputs, indent=1) if row.inputs_json else "",
            "output": json.dumps(row.output, indent=1) if row.output_json else "",
            "memo": row.memo_parts,
            "log": log_text(ws, run_id, step),
        }
    return {
        "run": run,
        "steps": [dict(row=r, seconds=_seconds(r)) for r in latest.values()],
        "dag_svg": svg.dag(folded),
        "selected": selected,
        "step": step,
    }


def run_states(ws: Workspace, run_id: str) -> dict:
    """What a run page follows live: the run's state and each step's."""
    from distml.workflow.store import get_workflow_run, latest_executions, list_step_executions

    run = get_workflow_run(ws.engine, run_id)
    if run is None:
        raise DistmlError(f"no workflow run {run_id!r}")
    latest = latest_executions(list_step_executions(ws.engine, run_id))
    return {
        "status": run.status,
        "steps": {n: {"status": r.status, "cache": r.cache, "detail": _detail(r)} for n, r in latest.items()},
    }


def log_text(ws: Workspace, run_id: str, step: str, lines: int = 400) -> str:
    """The tail of a step's log (the CLI's `distml logs` lookup)."""
    from distml.workflow.logs import step_logs

    try:
        text = step_logs(ws.engine, run_id, step).read()
    except DistmlError as exc:
        return f"({exc})"
    return "\n".join(text.splitlines()[-lines:])


def cancel_run(ws: Workspace, run_id: str) -> str:
    from distml.workflow.orchestrator import stop_run

    return stop_run(ws, run_id)


def rerun_args(ws: Workspace, run_id: str, refresh: str) -> list[str]:
    """`distml run TARGET --param ... [--refresh STEP]`: the run again, with its parameters."""
    from distml.workflow.store import get_workflow_run

    run = get_workflow_run(ws.engine, run_id)
    if run is None:
        raise DistmlError(f"no workflow run {run_id!r}")
    args = ["run", run.target]
    for key, value in sorted(run.params.items()):
        args += ["--param", f"{key}={json.dumps(value)}"]
    if refresh:
        args += ["--refresh", refresh]
    return args


# -- training runs ----------------------------------------------------------------------------------


def training_list(ws: Workspace) -> list[Any]:
    from distml.train.store import list_training_runs

    return list_training_runs(ws.engine, everything=True, limit=200)


def training_page(ws: Workspace, run_id: str) -> dict:
    from distml.train.store import list_training_runs, train_history

    rows = list_training_runs(ws.engine, include=[run_id], everything=True, limit=1, run_id=run_id)
    folder = run_dir(ws.root, run_id)
    if not rows and not folder.exists():
        raise DistmlError(f"no training run {run_id!r}; the Training page lists them")
    history = train_history(ws.engine, run_id)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else (rows[0].config if rows else {})
    checkpoints = sorted(p.name for p in (folder / "checkpoints").glob("*"))
    return {
        "run": rows[0] if rows else None,
        "run_id": run_id,
        "config": json.dumps(config, indent=1, sort_keys=True),
        "checkpoints": checkpoints,
        "steps": len(history),
        "loss_svg": svg.line_chart({"loss (lead rank)": [(h.step, h.loss) for h in history]}, "loss by step"),
        "speed_svg": svg.line_chart(
            {"samples/s (all ranks)": [(h.step, h.samples_per_s) for h in history]}, "samples/s by step"
        ),
        "ranks": _rank_values(folder),
    }


def _rank_values(folder: Path) -> list[dict[str, Any]]:
    """Each live rank's loss and samples/s, scraped from the endpoint it recorded."""
    import httpx

    from distml.monitoring.metrics import read_endpoint
    from distml.views.top import parse

    out = []
    for path in sorted(folder.glob("metrics/rank-*.json")):
        record = read_endpoint(path)
        if record is None:
            continue
        try:
            scrape = parse(httpx.get(record["url"], timeout=0.8).text, time.monotonic())
        except (httpx.HTTPError, ValueError):
            out.append({"rank": path.stem, "error": "unreachable"})
            continue
        out.append(
            {
                "rank": path.stem,
                "step": scrape.total("distml_train_step"),
                "loss": scrape.total("distml_train_loss"),
                "samples_per_s": scrape.total("distml_train_samples_per_second"),
            }
        )
    return out


# -- models -----------------------------------------------------------------------------------------


def model_list(ws: Workspace) -> list[dict[str, Any]]:
    from distml.models.registry import list_model_versions

    by_name: dict[str, list[Any]] = {}
    for version in list_model_versions(ws.engine):
        by_name.setdefault(version.name, []).append(version)
    return [
        {"name": name, "versions": len(vs), "latest": vs[0], "aliases": {a: v.version for v in vs for a in v.aliases}}
        for name, vs in sorted(by_name.items())
    ]


def model_page(ws: Workspace, name: str) -> dict:
    from distml.models.registry import list_model_versions, resolve

    resolve(ws.engine, name)  # one error naming what exists
    return {"name": name, "versions": list_model_versions(ws.engine, name)}


def lineage_page(ws: Workspace, name: str, version: int) -> dict:
    from distml.views.lineage import model_lineage

    view = model_lineage(ws.engine, f"{name}:{version}")
    up, down = view["upstream"], view["downstream"]
    data = [(f"{d['dataset']}/{d['split']} {d['fingerprint'][:12]}", "data", None) for d in up["data"]]
    runs = [(r["run_id"], "training", f"/training/{r['run_id']}") for r in up["training_runs"]]
    sources = [(m["ref"], "model", None) for m in up["models"]]
    this = [(view["model"]["ref"], "model", f"/models/{name}")]
    registered = [(m["ref"], "model", None) for m in down["models"]]
    deployments = [(f"{d['service']} ({d['status']})", d["status"], None) for d in down["deployments"]]
    graph = svg.columns(
        [
            ("data snapshots", data),
            ("training runs", runs),
            ("registered from", sources),
            ("this version", this),
            ("registered as", registered),
            ("deployments", deployments),
        ]
    )
    return {"name": name, "version": version, "view": view, "graph_svg": graph}


def set_model_alias(ws: Workspace, name: str, alias: str, version: int) -> str:
    from distml.models.artifact import set_alias

    set_alias(ws, name, alias, version)
    return f"{name}@{alias} now points at {name}:{version}"


# -- services ---------------------------------------------------------------------------------------


class ServiceMetrics:
    """The last minutes of each service's /metrics scrapes, for req/s, error rate and p50/p99, and
    the services' bearer token (`DISTML_SERVE_TOKEN`) for their /metrics and admin API."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.history: dict[str, deque] = {}
        self._lock = threading.Lock()

    def observe(self, url: str) -> dict[str, Any]:
        import httpx

        from distml.views.top import parse

        now = time.monotonic()
        try:
            response = httpx.get(url.rstrip("/") + "/metrics", timeout=1.0, headers=self.headers)
            response.raise_for_status()
            scrape = parse(response.text, now)
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"unreachable ({type(exc).__name__})"}
        with self._lock:
            history = self.history.setdefault(url, deque())
            history.append(scrape)
            while history and now - history[0].at > HISTORY_S:
                history.popleft()
            before = next((s for s in history if now - s.at <= RATE_WINDOW_S and s is not scrape), None)
        return _rates(scrape, before)


def _rates(now: Any, before: Any | None) -> dict[str, Any]:
    from distml.views.top import quantile, window

    name = "distml_gateway_requests_total"
    requests = now.total(name)
    errors = sum(v for labels, v in now.samples.get(name, []) if not labels.get("status", "").startswith("2"))
    out: dict[str, Any] = {"requests": requests, "errors": errors, "window_s": None}
    if before is None or now.at <= before.at:
        return out
    seconds = now.at - before.at
    done = requests - before.total(name)
    failed = errors - sum(
        v for labels, v in before.samples.get(name, []) if not labels.get("status", "").startswith("2")
    )
    recent = window(now.buckets("distml_gateway_request_seconds"), before.buckets("distml_gateway_request_seconds"))
    p50, p99 = quantile(0.5, recent), quantile(0.99, recent)
    out.update(
        window_s=round(seconds, 1),
        rps=round(done / seconds, 2),
        error_rate=round(failed / done, 4) if done else 0.0,
        p50_ms=round(p50 * 1000, 2) if p50 is not None else None,
        p99_ms=round(p99 * 1000, 2) if p99 is not None else None,
    )
    return out


def _gateway(record: ServiceRecord, token: str | None) -> dict[str, Any]:
    from distml.serve.admin import GatewayAdmin

    try:
        with GatewayAdmin(record.url, token, timeout=3.0) as admin:
            return admin.snapshot()
    except DistmlError as exc:
        return {"error": str(exc)}


def service_list(ws: Workspace, metrics: ServiceMetrics) -> list[dict[str, Any]]:
    """Every service (`distml services`' rows), with its rates over the last minutes when it runs."""
    from distml.serve.service import list_services

    return [
        {"status": status, "rates": metrics.observe(status.url) if status.state == "running" else {}}
        for status in list_services(ws, metrics.token)
    ]


def _replica_count(state: dict[str, Any]) -> str:
    replicas = [r for g in state.get("groups", []) for r in g.get("replicas", [])]
    ready = sum(1 for r in replicas if r.get("state") == "ready")
    return f"{ready}/{len(replicas)}" if replicas else ""


def service_live(ws: Workspace, name: str, metrics: ServiceMetrics) -> dict[str, Any]:
    record = find_service(ws, name)
    if not record.alive():
        return {"state": "gone"}
    state = _gateway(record, metrics.token)
    return {
        "state": "running",
        "traffic": state.get("traffic", {}),
        "canaries": state.get("canaries", {}),
        "groups": state.get("groups", []),
        "replicas": _replica_count(state),
        "rates": metrics.observe(record.url),
        "error": state.get("error"),
    }


def service_page(ws: Workspace, name: str, metrics: ServiceMetrics) -> dict:
    record = find_service(ws, name)
    live = service_live(ws, name, metrics)
    models = sorted({ref.split(":")[0] for g in live.get("groups", []) for ref in g.get("models", [])})
    return {"record": record, "live": live, "models": models}


def service_action(
    ws: Workspace, metrics: ServiceMetrics, name: str, action: str, model: str, version: int, value: float
) -> str:
    """canary (P % to `model`:`version` beside the version serving now), promote, rollback, scale."""
    from distml.serve.admin import GatewayAdmin

    record = find_service(ws, name)
    if not record.alive():
        raise DistmlError(f"service {name!r} is gone (its gateway stopped); start it again with distml serve")
    with GatewayAdmin(record.url, metrics.token) as admin:
        if action == "canary":
            if not 0 < value < 100:
                raise DistmlError(f"a canary's share is a percentage between 0 and 100, got {value:g}")
            deployed = admin.deploy(model, version, canary_percent=value)
            return f"{model}:{version} takes {deployed.percent:g} % of the traffic (the rest: {deployed.previous})"
        if action == "promote":
            admin.promote(model, version)
            return f"{model}:{version} takes all of {model}'s traffic"
        if action == "rollback":
            status = admin.canary_status(model)
            if status.get("state") == "running":
                admin.abort_canary(model)
                return f"the canary of {model}:{status.get('canary')} was rolled back"
            admin.promote(model, version)
            return f"rolled back: {model}:{version} takes all of {model}'s traffic"
        if action == "scale":
            admin.scale(int(value))
            return f"scaled to {int(value)} replica(s) per group"
    raise DistmlError(f"unknown service action {action!r}; expected canary, promote, rollback or scale")


# -- queues and watches -------------------------------------------------------------------------------


def queues_page(ws: Workspace) -> dict:
    from distml.scheduling.admission import snapshot

    return {"pool": snapshot(ws.engine)}


def watch_list(ws: Workspace) -> list[Any]:
    from distml.pipelines.watches import watch_summaries

    return watch_summaries(ws.engine)


def watch_page(ws: Workspace, name: str) -> dict:
    from distml.pipelines.continuous import cycle_rows
    from distml.pipelines.watches import list_arrivals, watch_summaries

    found = watch_summaries(ws.engine, [name])
    if not found:
        raise DistmlError(f"no watch {name!r} in this workspace; the Watches page lists them")
    return {"summary": found[0], "cycles": cycle_rows(ws.engine, name), "arrivals": list_arrivals(ws.engine, name)}
