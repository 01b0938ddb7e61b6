"""How a run looks on a terminal: the DAG as a tree with each step's state, time, cache decision and resources.

One renderer for two sources: the orchestrator's live states (`distml run`, refreshed by
rich's Live) and the rows of the metadata store (`distml runs show`). A node is drawn under
its single upstream step, or, for a fan-in, under the nearest step all its inputs descend from.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from distml.workflow.store import StepExecution, WorkflowRun, latest_executions

STYLE = {
    "succeeded": ("✓", "green"),
    "cached": ("✓", "cyan"),
    "running": ("▶", "yellow"),
    "retrying": ("↻", "yellow"),
    "queued": ("…", "bright_black"),
    "waiting": ("·", "bright_black"),
    "pending": ("·", "bright_black"),
    "skipped": ("-", "bright_black"),
    "failed": ("✗", "red"),
    "upstream_failed": ("✗", "red"),
    "cancelled": ("✗", "bright_black"),
}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _resources(text: str | None) -> str:
    if not text:
        return ""
    r = json.loads(text)
    each = f"{r['cpus']:g} cpu" + (f"+{r['gpus']} gpu" if r.get("gpus") else "")
    return each if r.get("workers", 1) == 1 else f"gang {r['workers']}x{each}"


def layout(rows: list[dict[str, Any]]) -> dict[str | None, list[str]]:
    """Children of each node in the drawing (None: the roots)."""
    parent: dict[str, str | None] = {}

    def chain(node_id: str | None) -> list[str]:
        out = []
        while node_id is not None:
            out.append(node_id)
            node_id = parent.get(node_id)
        return out

    for row in rows:
        ups = row["upstream"]
        if not ups:
            parent[row["node_id"]] = None
        elif len(ups) == 1:
            parent[row["node_id"]] = ups[0]
        else:
            common = set(chain(ups[0]))
            for up in ups[1:]:
                common &= set(chain(up))
            parent[row["node_id"]] = next((n for n in chain(ups[0]) if n in common), None)
    children: dict[str | None, list[str]] = {}
    for row in rows:
        children.setdefault(parent[row["node_id"]], []).append(row["node_id"])
    return children


def _label(row: dict[str, Any], now: float) -> Text:
    icon, style = STYLE.get(row["status"], ("?", "white"))
    text = Text()
    text.append(f"{icon} ", style=style)
    text.append(row["node_id"], style="bold")
    text.append(f"  {row['status']}", style=style)
    started, ended = row.get("started"), row.get("ended")
    if started is not None:
        text.append(f"  {_duration((ended or now) - started)}")
    progress = row.get("progress")
    if progress and row["status"] == "running":
        done, total, note = progress
        if total:
            filled = int(20 * min(done / total, 1.0))
            text.append(f"  {'█' * filled}{'░' * (20 - filled)} {done:g}/{total:g}", style="yellow")
        if note:
            text.append(f" {note}", style="yellow")
    if row.get("attempt"):
        text.append(f"  attempt {row['attempt'] + 1}", style="yellow")
    if row.get("cache") == "hit":
        text.append(f"  cache hit ({row.get('cache_reason')})", style="cyan")
    elif row.get("cache") == "miss":
        text.append(f"  cache miss: {row.get('cache_reason')}", style="magenta")
    elif row.get("cache_reason") and row["status"] in ("skipped", "succeeded"):
        text.append(f"  {row['cache_reason']}", style="bright_black")
    resources = _resources(row.get("resources"))
    if resources:
        text.append(f"  [{resources}]", style="bright_black")
    if len(row["upstream"]) > 1:
        text.append("  ← " + ", ".join(row["upstream"]), style="bright_black")
    if row.get("error") and row["status"] in ("failed", "retrying"):
        text.append(f"\n    {row['error'][:300]}", style="red")
    return text


def render(title: Text | str, rows: list[dict[str, Any]], now: float) -> Tree:
    tree = Tree(title if isinstance(title, Text) else Text(title, style="bold"))
    by_id = {row["node_id"]: row for row in rows}
    children = layout(rows)

    def add(branch: Tree, node_id: str | None) -> None:
        for child in children.get(node_id, []):
            add(branch.add(_label(by_id[child], now)), child)

    add(tree, None)
    return tree


def live_rows(orchestrator: Any) -> list[dict[str, Any]]:
    """Rows of the orchestrator's in-memory states."""
    rows = []
    for state in orchestrator.states.values():
        node = state.node
        resources = None
        if node.step is not None:
            r = node.step.policy.resources
            resources = json.dumps({"cpus": r.cpus, "gpus": r.gpus, "workers": r.workers})
        rows.append(
            {
                "node_id": node.id,
                "status": state.status,
                "started": state.started,
                "ended": state.ended if state.status != "running" else None,
                "attempt": state.attempt,
                "cache": state.cache,
                "cache_reason": state.cache_reason,
                "resources": resources,
                "upstream": [u.id for u in node.upstream],
                "progress": state.progress,
                "error": state.error,
            }
        )
    return rows


def _ts(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    return value.timestamp()


def stored_rows(executions: Iterable[StepExecution]) -> list[dict[str, Any]]:
    """Rows of a stored run: the latest execution of each node."""
    executions = list(executions)
    latest = latest_executions(executions)
    first_upstream = {r.node_id: r.upstream_json for r in executions if r.upstream_json}
    out = []
    for node_id, row in latest.items():
        runs = sum(1 for r in executions if r.node_id == node_id and r.status in ("succeeded", "cached"))
        out.append(
            {
                "node_id": node_id,
                "status": row.status,
                "started": _ts(row.started_at),
                "ended": _ts(row.finished_at),
                "attempt": row.attempt,
                "cache": row.cache,
                "cache_reason": row.cache_reason,
                "resources": row.resources_json,
                "upstream": json.loads(first_upstream.get(node_id) or "[]"),
                "error": row.error,
                "log_path": row.log_path,
                "executions": runs,
            }
        )
    return out


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_view(run: WorkflowRun, executions: list[StepExecution], now: float) -> Group:
    """`distml runs show`: header, tree, and the error and log tail of each failed step."""
    rows = stored_rows(executions)
    started, updated = _ts(run.created_at), _ts(run.updated_at)
    end = now if run.status == "running" else updated
    icon, style = STYLE.get(run.status, ("?", "white"))
    title = Text()
    title.append(f"{icon} run {run.run_id}", style=f"bold {style}")
    title.append(f"  {run.status}  {_duration(end - started)}  {run.target}")
    if run.params:
        title.append("  " + " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(run.params.items())))
    parts: list[Any] = [render(title, rows, now)]
    for row in rows:
        if row["status"] == "failed":
            parts.append(Text(f"\n{row['node_id']} failed: {row['error']}", style="bold red"))
            tail = log_tail(row["log_path"])
            if tail:
                parts.append(Text(f"last lines of {row['log_path']}:\n{tail}", style="red"))
    return Group(*parts)


# `distml runs list`: the columns other than the run id fold down to these widths (and the
# started time never wraps); the id never folds: the table is as wide as it takes to show it whole.
_STARTED = "%Y-%m-%d %H:%M"
_FOLDED_MIN_WIDTH = 6
_COLUMN_GAP = 3  # rich's padding and separator between two columns of a SIMPLE_HEAD table


def runs_table(runs: list[WorkflowRun]) -> tuple[Table, int]:
    """`distml runs list`: the runs as a table, and the width to print it at (at least): the one
    where each run id is whole on one line, copyable, however narrow the terminal or $COLUMNS."""
    from rich import box

    id_width = max([len("run"), *(len(run.run_id) for run in runs)])
    status_width = max([len("status"), *(len(run.status) for run in runs)])
    started_width = max([len("started"), *(len(f"{run.created_at:{_STARTED}}") for run in runs)])
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("run", no_wrap=True, min_width=id_width)
    table.add_column("status", no_wrap=True, min_width=status_width)
    table.add_column("started", no_wrap=True, min_width=started_width)
    table.add_column("target", overflow="fold", min_width=_FOLDED_MIN_WIDTH)
    table.add_column("steps", overflow="fold", min_width=_FOLDED_MIN_WIDTH)
    for run in runs:
        steps = ", ".join(f"{n} {s}" for s, n in sorted(run.steps.items()))
        table.add_row(run.run_id, run.status, f"{run.created_at:{_STARTED}}", short_target(run.target), steps)
    widths = [id_width, status_width, started_width, _FOLDED_MIN_WIDTH, _FOLDED_MIN_WIDTH]
    return table, sum(widths) + _COLUMN_GAP * (len(widths) - 1)


def short_target(target: str) -> str:
    """A pipeline file's name instead of its whole path (`pipe.py:pipeline`); modules as they are."""
    path, sep, function = target.rpartition(":")
    return f"{Path(path).name}:{function}" if sep and "/" in path else target


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def run_record(run: WorkflowRun, executions: Iterable[StepExecution] | None = None) -> dict[str, Any]:
    """A run as JSON (`distml runs list --json`): its steps counted by the state of each node's
    latest execution (from `executions` when given, else as `list_workflow_runs` counted them)."""
    steps = dict(run.steps)
    if executions is not None:
        steps = {}
        for row in stored_rows(executions):
            steps[row["status"]] = steps.get(row["status"], 0) + 1
    return {
        "run_id": run.run_id,
        "status": run.status,
        "target": run.target,
        "params": run.params,
        "created_at": _iso(run.created_at),
        "updated_at": _iso(run.updated_at),
        "steps": dict(sorted(steps.items())),
        "error": run.error,
    }


def step_record(row: StepExecution) -> dict[str, Any]:
    """One step execution as JSON (`distml runs show --json`)."""
    return {
        "node_id": row.node_id,
        "generation": row.generation,
        "step_name": row.step_name,
        "status": row.status,
        "attempt": row.attempt,
        "cache": row.cache,
        "cache_reason": row.cache_reason,
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "error": row.error,
        "log_path": row.log_path,
    }


def run_detail(run: WorkflowRun, executions: list[StepExecution]) -> dict[str, Any]:
    """`distml runs show --json`: {"run": the run as `run_record`, "steps": every execution}."""
    return {"run": run_record(run, executions), "steps": [step_record(row) for row in executions]}


class LiveView:
    """The orchestrator's `on_change` for `distml run`: a live tree on a terminal, else one line per change."""

    def __init__(self, console: Any, title: str):
        self.console = console
        self.title = title
        self.live: Any = None
        self.seen: dict[str, str] = {}
        self.orchestrator: Any = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(
                console=self.console, refresh_per_second=4, transient=False, get_renderable=self._renderable
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _renderable(self) -> Any:
        import time

        if self.orchestrator is None:
            return Text("")
        return render(f"{self.title} {self.orchestrator.run_id}", live_rows(self.orchestrator), time.time())

    def __call__(self, orchestrator: Any) -> None:
        import time

        self.orchestrator = orchestrator
        if self.live is not None:
            self.live.refresh()
            return
        rows = live_rows(orchestrator)
        for row in rows:
            if self.seen.get(row["node_id"]) != row["status"]:
                self.seen[row["node_id"]] = row["status"]
                if row["status"] not in ("waiting", "queued"):
                    self.console.print(_label(row, time.time()), soft_wrap=True)
