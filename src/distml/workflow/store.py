"""The workflow store: pipeline runs, their step executions and the metrics steps log.

Migration 5's tables. A step process writes the final state of its own execution (so a result
survives the orchestrator's death); the orchestrator writes the rest. Memo lookups (`find_memo_hit`)
find an earlier successful execution by step name and memo key.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from distml.core.db import METADATA, UTCDateTime, fetch_all, fetch_one, in_transaction, insert_once, utc_now

# -- workflow runs, step executions and what steps record (migration 5) ------------------------
# One row per run, one per (run, node, generation): generation > 0 are the re-executions of a
# step downstream of an asynchronous fan-in. A step process writes the final state of its own
# execution (so a result survives the orchestrator's death); the orchestrator writes the rest.

workflow_runs = sa.Table(
    "workflow_runs",
    METADATA,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
    sa.Column("options_json", sa.Text, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # running, succeeded, failed, stopped
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("host", sa.String(200), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

step_executions = sa.Table(
    "step_executions",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("workflow_runs.run_id"), nullable=False),
    sa.Column("node_id", sa.String(300), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("step_name", sa.String(200), nullable=False),
    # pending, running, succeeded, cached, failed, skipped, upstream_failed, cancelled
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("pid_started", sa.String(40), nullable=True),  # the process's start time: pid reuse check
    sa.Column("memo_key", sa.String(64), nullable=True),
    sa.Column("memo_parts_json", sa.Text, nullable=True),
    sa.Column("cache", sa.String(10), nullable=True),  # hit, miss, off
    sa.Column("cache_reason", sa.Text, nullable=True),
    sa.Column("cached_from", sa.Integer, nullable=True),
    sa.Column("inputs_json", sa.Text, nullable=True),
    sa.Column("output_json", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("log_path", sa.Text, nullable=True),
    sa.Column("resources_json", sa.Text, nullable=True),
    sa.Column("upstream_json", sa.Text, nullable=True),  # node ids this one waits for
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("run_id", "node_id", "generation", name="uq_step_execution"),
    sa.Index("ix_step_executions_memo", "step_name", "memo_key", "status"),
)

step_metrics = sa.Table(
    "step_metrics",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("node_id", sa.String(300), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("step", sa.Integer, nullable=True),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sa.Index("ix_step_metrics_run", "run_id", "node_id"),
)


def _m5_workflows(conn: sa.Connection) -> None:
    workflow_runs.create(conn)
    step_executions.create(conn)
    step_metrics.create(conn)


TERMINAL_STEP_STATES = ("succeeded", "cached", "failed", "skipped", "upstream_failed", "cancelled")


@dataclass(frozen=True)
class WorkflowRun:
    """A pipeline run: its target and parameters, state and owner process; `steps` counts its
    step executions by state (filled by `list_workflow_runs`)."""

    run_id: str
    target: str
    params: dict[str, Any]
    options: dict[str, Any]
    status: str
    pid: int | None
    host: str | None
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    steps: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Any, steps: dict[str, int] | None = None) -> WorkflowRun:
        m = row._mapping
        return cls(
            m["run_id"], m["target"], json.loads(m["params_json"]), json.loads(m["options_json"]), m["status"],
            m["pid"], m["host"], m["error"], m["created_at"], m["updated_at"], steps or {},
        )  # fmt: skip


@dataclass(frozen=True)
class StepExecution:
    """One execution of a step (a node of a run, generation > 0 for re-executions after an
    asynchronous fan-in); the JSON columns are kept as stored and decoded by the properties."""

    id: int
    run_id: str
    node_id: str
    generation: int
    step_name: str
    status: str
    attempt: int
    pid: int | None
    pid_started: str | None
    memo_key: str | None
    memo_parts_json: str | None
    cache: str | None
    cache_reason: str | None
    cached_from: int | None
    inputs_json: str | None
    output_json: str | None
    error: str | None
    log_path: str | None
    resources_json: str | None
    upstream_json: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def memo_parts(self) -> dict[str, Any] | None:
        return json.loads(self.memo_parts_json) if self.memo_parts_json else None

    @property
    def output(self) -> Any:
        return json.loads(self.output_json) if self.output_json else None

    @property
    def inputs(self) -> Any:
        return json.loads(self.inputs_json) if self.inputs_json else None

    @property
    def upstream(self) -> list[str]:
        return json.loads(self.upstream_json) if self.upstream_json else []

    @property
    def resources(self) -> dict[str, Any] | None:
        return json.loads(self.resources_json) if self.resources_json else None

    @property
    def final(self) -> bool:
        return self.status in TERMINAL_STEP_STATES


def latest_executions(executions: Iterable[StepExecution]) -> dict[str, StepExecution]:
    """Each node's latest execution (its highest generation: a step runs again in later
    generations), by node id in the order the nodes first appear."""
    latest: dict[str, StepExecution] = {}
    for row in executions:
        if row.node_id not in latest or row.generation >= latest[row.node_id].generation:
            latest[row.node_id] = row
    return latest


@dataclass(frozen=True)
class StepMetric:
    """A metric a step logged: its name, value and optional step number."""

    id: int
    run_id: str
    node_id: str
    name: str
    value: float
    step: int | None
    recorded_at: dt.datetime


def create_workflow_run(
    engine: sa.Engine, run_id: str, target: str, params: dict[str, Any], options: dict[str, Any], pid: int, host: str
) -> None:
    now = utc_now()
    row = {
        "run_id": run_id,
        "target": target,
        "params_json": json.dumps(params, sort_keys=True),
        "options_json": json.dumps(options, sort_keys=True),
        "status": "running",
        "pid": pid,
        "host": host,
        "created_at": now,
        "updated_at": now,
    }
    in_transaction(engine, lambda conn: insert_once(conn, workflow_runs, row, ("run_id",)))


def update_workflow_run(engine: sa.Engine, run_id: str, **values: Any) -> None:
    query = workflow_runs.update().where(workflow_runs.c.run_id == run_id).values(updated_at=utc_now(), **values)
    in_transaction(engine, lambda conn: conn.execute(query))


def get_workflow_run(engine: sa.Engine, run_id: str) -> WorkflowRun | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(workflow_runs).where(workflow_runs.c.run_id == run_id)).first()
    return WorkflowRun.of(row) if row is not None else None


def _runs_where(query: sa.Select, status: str | None, target: str | None, since: dt.datetime | None) -> sa.Select:
    if status is not None:
        query = query.where(workflow_runs.c.status == status)
    if target:
        query = query.where(workflow_runs.c.target.contains(target, autoescape=True))
    if since is not None:
        query = query.where(workflow_runs.c.created_at >= since)
    return query


def count_workflow_runs(
    engine: sa.Engine, *, status: str | None = None, target: str | None = None, since: dt.datetime | None = None
) -> int:
    """How many runs `list_workflow_runs` would page through with the same filters."""
    query = _runs_where(sa.select(sa.func.count()).select_from(workflow_runs), status, target, since)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def list_workflow_runs(
    engine: sa.Engine,
    limit: int = 50,
    *,
    status: str | None = None,
    offset: int = 0,
    target: str | None = None,
    since: dt.datetime | None = None,
) -> list[WorkflowRun]:
    """The latest runs (with `status` only, whose target contains `target`, created since `since`),
    newest first, each with its steps counted by the state of their latest execution (a step runs
    again in later generations): two queries."""
    s = step_executions
    query = sa.select(workflow_runs).order_by(workflow_runs.c.created_at.desc()).limit(limit).offset(offset)
    query = _runs_where(query, status, target, since)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        latest = (
            sa.select(s.c.run_id, s.c.node_id, sa.func.max(s.c.generation).label("generation"))
            .where(s.c.run_id.in_([r.run_id for r in rows]))
            .group_by(s.c.run_id, s.c.node_id)
            .subquery()
        )
        counts = conn.execute(
            sa.select(s.c.run_id, s.c.status, sa.func.count())
            .join(
                latest,
                sa.and_(
                    s.c.run_id == latest.c.run_id,
                    s.c.node_id == latest.c.node_id,
                    s.c.generation == latest.c.generation,
                ),
            )
            .group_by(s.c.run_id, s.c.status)
        ).all()
    by_run: dict[str, dict[str, int]] = {}
    for run_id, status, count in counts:
        by_run.setdefault(run_id, {})[status] = count
    return [WorkflowRun.of(row, by_run.get(row.run_id, {})) for row in rows]


def save_step_execution(engine: sa.Engine, run_id: str, node_id: str, generation: int, **values: Any) -> int:
    """Create or update the execution row of (run, node, generation); return its id (one statement
    when the row exists, as it does for every step from the start of its run)."""
    key = (
        step_executions.c.run_id == run_id,
        step_executions.c.node_id == node_id,
        step_executions.c.generation == generation,
    )

    def work(conn: sa.Connection) -> int:
        row = conn.execute(
            step_executions.update().where(*key).values(**values).returning(step_executions.c.id)
        ).first()
        if row is not None:
            return int(row.id)
        # A later generation of a node (a step run again in the same run) keeps what its run recorded
        # of the node at the start: its name, resources and the nodes it waits for (lineage walks those).
        first = conn.execute(
            sa.select(step_executions.c.step_name, step_executions.c.resources_json, step_executions.c.upstream_json)
            .where(step_executions.c.run_id == run_id, step_executions.c.node_id == node_id)
            .order_by(step_executions.c.generation)
            .limit(1)
        ).first()
        inserted = {**(dict(first._mapping) if first is not None else {}), "attempt": 0, **values}
        result = conn.execute(
            step_executions.insert().values(run_id=run_id, node_id=node_id, generation=generation, **inserted)
        )
        return int(result.inserted_primary_key[0])

    return in_transaction(engine, work)  # a rerun finds the row it inserted (its key is unique) and updates it


def add_step_executions(engine: sa.Engine, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Insert the pending executions of a new run in one transaction."""
    if not rows:
        return

    def work(conn: sa.Connection) -> None:
        there = sa.select(step_executions.c.id).where(step_executions.c.run_id == run_id).limit(1)
        if conn.execute(there).first() is None:  # a rerun after a commit whose answer was lost adds nothing
            conn.execute(step_executions.insert(), [{"run_id": run_id, "attempt": 0, **row} for row in rows])

    in_transaction(engine, work)


def _finish_update(execution_id: int, attempt: int, finished_at: dt.datetime, values: dict[str, Any]) -> sa.Update:
    """The end of attempt `attempt` of an execution, while that attempt is the one running."""
    mine = (step_executions.c.id == execution_id, step_executions.c.attempt == attempt)
    return (
        step_executions.update()
        .where(*mine, step_executions.c.status == "running")
        .values(finished_at=finished_at, **values)
    )


def finish_step_execution(engine: sa.Engine, execution_id: int, attempt: int, **values: Any) -> bool:
    """Record the end of attempt `attempt` of an execution, only while that attempt is the one
    running (a step process that outlived a timeout cannot overwrite what came after)."""
    mine = (step_executions.c.id == execution_id, step_executions.c.attempt == attempt)
    now = utc_now()

    def work(conn: sa.Connection) -> bool:
        if conn.execute(_finish_update(execution_id, attempt, now, values)).rowcount:
            return True
        # a rerun after a commit whose answer was lost finds its own end recorded
        recorded = sa.select(step_executions.c.id).where(*mine, step_executions.c.finished_at == now)
        return conn.execute(recorded).first() is not None

    return in_transaction(engine, work)


def prepare_finish(engine: sa.Engine) -> None:
    """Compile the update of a successful `finish_step_execution` ahead (a step process does it
    while it waits for its step), so that the step's own end only executes it. The update is run in
    a read-only transaction, which refuses it before it takes any lock: the step processes getting
    ready never hold up the writers of the steps that run."""
    query = _finish_update(-1, -1, utc_now(), {"status": "succeeded", "output_json": "null"})
    with engine.connect() as conn:
        read_only = "PRAGMA query_only = 1" if conn.dialect.name == "sqlite" else "SET TRANSACTION READ ONLY"
        try:
            conn.exec_driver_sql(read_only)
            conn.execute(query)
        except sa.exc.DBAPIError:
            pass  # refused, as meant (or a store away: the step's own write will say so)
        finally:
            conn.rollback()
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA query_only = 0")


def list_step_executions(engine: sa.Engine, run_id: str) -> list[StepExecution]:
    query = (
        sa.select(step_executions)
        .where(step_executions.c.run_id == run_id)
        .order_by(step_executions.c.id, step_executions.c.generation)
    )
    return fetch_all(engine, query, StepExecution)


def find_memo_hit(
    engine: sa.Engine, step_name: str, memo_key: str, not_before: dt.datetime | None
) -> StepExecution | None:
    """The newest successful execution of `step_name` with `memo_key` (finished after `not_before`)."""
    query = (
        sa.select(step_executions)
        .where(
            step_executions.c.step_name == step_name,
            step_executions.c.memo_key == memo_key,
            step_executions.c.status == "succeeded",
        )
        .order_by(step_executions.c.finished_at.desc())
        .limit(1)
    )
    if not_before is not None:
        query = query.where(step_executions.c.finished_at >= not_before)
    return fetch_one(engine, query, StepExecution)


def last_memoized_execution(engine: sa.Engine, step_name: str, exclude_run: str) -> StepExecution | None:
    """The newest earlier successful execution of `step_name` (to explain a cache miss)."""
    query = (
        sa.select(step_executions)
        .where(
            step_executions.c.step_name == step_name,
            step_executions.c.status == "succeeded",
            step_executions.c.memo_parts_json.is_not(None),
            step_executions.c.run_id != exclude_run,
        )
        .order_by(step_executions.c.finished_at.desc())
        .limit(1)
    )
    return fetch_one(engine, query, StepExecution)


def record_step_metrics(engine: sa.Engine, run_id: str, node_id: str, rows: list[dict[str, Any]]) -> None:
    """Store metrics a step logs: rows of name, value and optional step number."""
    if not rows:
        return
    now = utc_now()
    m = step_metrics

    def work(conn: sa.Connection) -> None:
        # a rerun after a commit whose answer was lost finds its rows (same run, node, name and time)
        there = sa.select(m.c.id).where(m.c.run_id == run_id, m.c.node_id == node_id, m.c.recorded_at == now)
        if conn.execute(there.where(m.c.name == rows[0]["name"]).limit(1)).first() is None:
            conn.execute(
                m.insert(),
                [{"run_id": run_id, "node_id": node_id, "recorded_at": now, "step": None, **row} for row in rows],
            )

    in_transaction(engine, work)


def list_step_metrics(engine: sa.Engine, run_id: str, node_id: str | None = None) -> list[StepMetric]:
    query = sa.select(step_metrics).where(step_metrics.c.run_id == run_id).order_by(step_metrics.c.id)
    if node_id is not None:
        query = query.where(step_metrics.c.node_id == node_id)
    return fetch_all(engine, query, StepMetric)


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {5: _m5_workflows}
