"""Training runs in the metadata store: each run's state and config, and its per-step metrics.

Migration 3's tables, written by the lead rank (`train/progress.py`) and read by `distml top`,
the training benchmark and lineage: one query per view (`list_training_runs`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from distml.core.db import METADATA, UTCDateTime, fetch_all, fetch_one, in_transaction, utc_now

# -- training runs and their per-step metrics (migration 3) ----------------------------------

train_runs = sa.Table(
    "train_runs",
    METADATA,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("config_json", sa.Text, nullable=False),
    sa.Column("result_json", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

train_steps = sa.Table(
    "train_steps",
    METADATA,
    sa.Column("run_id", sa.String(200), sa.ForeignKey("train_runs.run_id"), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("loss", sa.Float, nullable=False),
    sa.Column("samples_per_s", sa.Float, nullable=False),
    sa.Column("step_seconds", sa.Float, nullable=False),
    sa.Column("recorded_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class TrainingRunRow:
    """A training run as views show it: its stored state and its latest recorded step (None before
    the lead rank recorded one)."""

    run_id: str
    status: str
    config: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    step: int | None
    loss: float | None
    samples_per_s: float | None
    recorded_at: dt.datetime | None


def list_training_runs(
    engine: sa.Engine,
    include: Iterable[str] = (),
    limit: int = 50,
    *,
    everything: bool = False,
    run_id: str | None = None,
) -> list[TrainingRunRow]:
    """The runs still marked running and those named in `include` (with `everything`, every run;
    with `run_id`, that one), newest first, each with its latest recorded step: one query,
    whatever the number of runs."""
    latest = sa.select(train_steps.c.run_id, sa.func.max(train_steps.c.step).label("step"))
    if run_id is not None:
        latest = latest.where(train_steps.c.run_id == run_id)
    latest = latest.group_by(train_steps.c.run_id).subquery()
    last = train_steps.alias("last")
    query = (
        sa.select(train_runs, last.c.step, last.c.loss, last.c.samples_per_s, last.c.recorded_at)
        .outerjoin(latest, latest.c.run_id == train_runs.c.run_id)
        .outerjoin(last, sa.and_(last.c.run_id == latest.c.run_id, last.c.step == latest.c.step))
        .order_by(train_runs.c.updated_at.desc())
        .limit(limit)
    )
    if run_id is not None:
        query = query.where(train_runs.c.run_id == run_id)
    elif not everything:
        query = query.where(sa.or_(train_runs.c.status == "running", train_runs.c.run_id.in_(list(include))))
    with engine.connect() as conn:
        return [
            TrainingRunRow(
                r.run_id,
                r.status,
                json.loads(r.config_json),
                r.created_at,
                r.updated_at,
                r.step,
                r.loss,
                r.samples_per_s,
                r.recorded_at,
            )
            for r in conn.execute(query)
        ]


def _m3_training(conn: sa.Connection) -> None:
    train_runs.create(conn)
    train_steps.create(conn)


def record_train_run(
    engine: sa.Engine, run_id: str, config: dict[str, Any], *, status: str, result: dict[str, Any] | None = None
) -> None:
    """Create or update a training run's row (status running/complete/stopped)."""
    now = utc_now()
    values = {"status": status, "config_json": json.dumps(config, sort_keys=True, default=str), "updated_at": now}
    if result is not None:
        values["result_json"] = json.dumps(result, sort_keys=True)

    def work(conn: sa.Connection) -> None:
        updated = conn.execute(train_runs.update().where(train_runs.c.run_id == run_id).values(**values)).rowcount
        if not updated:
            conn.execute(train_runs.insert().values(run_id=run_id, created_at=now, **values))

    in_transaction(engine, work)  # a rerun updates the row a lost commit inserted


def record_train_steps(engine: sa.Engine, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Store per-step metrics; a step recorded again (after a restart) is replaced."""
    if not rows:
        return
    now = utc_now()

    def work(conn: sa.Connection) -> None:  # replaces its steps: a rerun records them once
        conn.execute(
            train_steps.delete().where(
                train_steps.c.run_id == run_id, train_steps.c.step.in_([r["step"] for r in rows])
            )
        )
        conn.execute(train_steps.insert(), [{"run_id": run_id, "recorded_at": now, **r} for r in rows])

    in_transaction(engine, work)


@dataclass(frozen=True)
class TrainStep:
    """What the lead rank recorded of one optimizer step."""

    run_id: str
    step: int
    epoch: int
    loss: float
    samples_per_s: float
    step_seconds: float
    recorded_at: dt.datetime


def train_history(engine: sa.Engine, run_id: str) -> list[TrainStep]:
    """Every recorded step of run `run_id`, in order."""
    query = sa.select(train_steps).where(train_steps.c.run_id == run_id).order_by(train_steps.c.step)
    return fetch_all(engine, query, TrainStep)


def last_step(engine: sa.Engine, run_id: str) -> TrainStep | None:
    """The latest recorded step of run `run_id`, or None."""
    query = sa.select(train_steps).where(train_steps.c.run_id == run_id).order_by(train_steps.c.step.desc()).limit(1)
    return fetch_one(engine, query, TrainStep)


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {3: _m3_training}
