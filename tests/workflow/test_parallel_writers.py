"""Many writers on one metadata store: the orchestrator and 8 step processes at a time commit
rows concurrently (executions, one transaction per logged metric), on SQLite and PostgreSQL;
afterwards every row is there exactly once and the fan-in's result is right.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import sqlalchemy as sa

from distml.core import HOME_ENV
from distml.workflow import store as workflow_store
from distml.workflow.orchestrator import RunOptions, run_pipeline
from distml.workflow.target import file_module_name
from distml.workspace import Workspace

WIDTH = 40  # writer steps
METRICS = 30  # metrics each writer logs, one transaction each

PIPELINE = textwrap.dedent(
    f"""
    from distml.workflow import Resources, current, step


    @step(resources=Resources(cpus=0.25))  # 8 at once in a pool of 2 cpu slots
    def writer(index: int) -> int:
        ctx = current()
        for j in range({METRICS}):
            ctx.log_metric(f"m{{j:02d}}", index * 1000 + j, step=j)
        return index


    @step
    def total(values: list[int]) -> int:
        return sum(values)


    def pipeline():
        return total(writer.map(range({WIDTH})))
    """
)


@pytest.mark.slow
def test_parallel_step_processes_lose_no_writes(db_url, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTML_DB_URL", raising=False)  # "sqlite": the workspace's own file
    ws = Workspace(tmp_path / "ws", db_url)
    # The orchestrator sets these for its steps; monkeypatch restores them after the test.
    monkeypatch.setenv(HOME_ENV, str(ws.root.resolve()))
    monkeypatch.setenv("DISTML_DB_URL", ws.db_url)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the pipeline file's folder is put on it
    path = tmp_path / "parallel_writers.py"
    path.write_text(PIPELINE)
    try:
        assert ws.engine.dialect.name == ("sqlite" if db_url is None else "postgresql")
        result = run_pipeline(ws, f"{path}:pipeline", {}, RunOptions(cpus=2))

        errors = {n: s.error for n, s in result.states.items() if s.status != "succeeded"}
        assert result.status == "succeeded", errors
        assert result.result == sum(range(WIDTH))

        run = workflow_store.get_workflow_run(ws.engine, result.run_id)
        assert run.status == "succeeded" and run.error is None

        writers = {f"writer[{i}]": i for i in range(WIDTH)}
        executions = workflow_store.list_step_executions(ws.engine, result.run_id)
        assert sorted(r.node_id for r in executions) == sorted([*writers, "total"])
        for row in executions:
            assert (row.status, row.generation, row.attempt, row.error) == ("succeeded", 0, 0, None), row
            assert row.finished_at is not None and row.pid is not None, row
            expected = sum(range(WIDTH)) if row.node_id == "total" else writers[row.node_id]
            assert json.loads(row.output_json) == expected, row

        metrics = workflow_store.list_step_metrics(ws.engine, result.run_id)
        got = [(m.node_id, m.name, m.value, m.step) for m in metrics]
        want = {(f"writer[{i}]", f"m{j:02d}", float(i * 1000 + j), j) for i in range(WIDTH) for j in range(METRICS)}
        assert len(got) == WIDTH * METRICS, f"{len(got)} metric rows, expected {WIDTH * METRICS}"
        assert len(set(got)) == len(got), "a metric was recorded twice"
        assert set(got) == want
        with ws.engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(workflow_store.step_metrics)).scalar()
        assert stored == WIDTH * METRICS, f"{stored} metric rows in the store, expected those of this run only"
    finally:
        ws.close()
        sys.modules.pop(file_module_name(path), None)
