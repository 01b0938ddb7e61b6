"""The captured output of a pipeline's steps: which log files a step of a run wrote, in order.

Each execution of a step (each generation: a retry, a resumed run) has its own log file under
`workflows/RUN/logs/`; a cache hit points at the log of the execution whose result it reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distml.core.errors import DistmlError
from distml.workflow.store import get_workflow_run, list_step_executions


@dataclass(frozen=True)
class StepLogs:
    """The log files of `step` in `run_id`, oldest first; `cached` when its last execution was a
    cache hit (its log is that of the execution it reused)."""

    run_id: str
    step: str
    paths: list[Path]
    cached: bool

    def read(self) -> str:
        """Every log's text, in order; one error if a file was removed from the workspace."""
        parts = []
        for path in self.paths:
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                raise DistmlError(f"the log of {self.step} ({path}) was removed from the workspace") from None
        return "".join(parts)


def step_logs(engine: Any, run_id: str, step: str) -> StepLogs:
    """The logs of step `step` (a node id such as train[cnn]) in run `run_id`, or one error that
    names what exists: the runs, the run's steps, or why the step has no log."""
    if get_workflow_run(engine, run_id) is None:
        raise DistmlError(f"no workflow run {run_id!r}; `distml runs` lists them")
    executions = list_step_executions(engine, run_id)
    rows = sorted((r for r in executions if r.node_id == step), key=lambda r: r.generation)
    if not rows:
        nodes = sorted({r.node_id for r in executions})
        raise DistmlError(f"run {run_id} has no step {step!r}; its steps are: {', '.join(nodes)}")
    paths = [Path(p) for p in dict.fromkeys(r.log_path for r in rows if r.log_path)]
    if not paths:
        raise DistmlError(f"step {step} of run {run_id} has no log: it did not run a process ({rows[-1].status})")
    return StepLogs(run_id, step, paths, rows[-1].status == "cached")
