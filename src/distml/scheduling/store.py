"""The scheduler's shared state: nodes, weighted queues, jobs and the pass lock (migration 6).

Every process that runs a job writes a row in `sched_jobs` and waits until a scheduling pass
(`scheduling/admission.py`) admits it; a pass runs in one transaction that starts by updating
`sched_lock`'s row, which serialises passes on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from distml.core.db import METADATA, fetch_all

# -- the scheduler's shared state (migration 6) -----------------------------------------------
# Every process that runs a job (distml train, workflow steps, serving replicas) writes a row in
# sched_jobs and waits until a scheduling pass admits it. A pass runs in one transaction that
# starts by updating sched_lock's row, which serialises passes on SQLite and PostgreSQL alike.
# A holder is identified by host + pid + the pid's start time; on another host, by its lease.

sched_nodes = sa.Table(
    "sched_nodes",
    METADATA,
    sa.Column("name", sa.String(200), primary_key=True),  # the host
    sa.Column("cpus", sa.Float, nullable=False),
    sa.Column("gpus", sa.Integer, nullable=False),
    sa.Column("memory_gb", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

sched_queues = sa.Table(
    "sched_queues",
    METADATA,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

sched_jobs = sa.Table(
    "sched_jobs",
    METADATA,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(300), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # train, step, serve, job
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("preemptible", sa.Boolean, nullable=False),
    sa.Column("tasks", sa.Integer, nullable=False),
    sa.Column("cpus", sa.Float, nullable=False),
    sa.Column("gpus", sa.Integer, nullable=False),
    sa.Column("memory_gb", sa.Float, nullable=False),
    sa.Column("estimate_s", sa.Float, nullable=True),
    sa.Column("state", sa.String(20), nullable=False),  # waiting, running, preempting, done
    sa.Column("outcome", sa.String(20), nullable=True),  # finished, failed, lost, cancelled
    sa.Column("node", sa.String(200), nullable=False),
    sa.Column("placement_json", sa.Text, nullable=True),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("pid_started", sa.String(40), nullable=True),
    sa.Column("lease_expires", sa.Float, nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("preemptions", sa.Integer, nullable=False, default=0),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Index("ix_sched_jobs_state", "state", "node"),
)

sched_lock = sa.Table(
    "sched_lock",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("passes", sa.BigInteger, nullable=False),
)


def _m6_scheduler(conn: sa.Connection) -> None:
    for table in (sched_nodes, sched_queues, sched_jobs, sched_lock):
        table.create(conn)
    conn.execute(sched_lock.insert().values(id=1, passes=0))
    conn.execute(sched_queues.insert().values(name="default", weight=1.0, updated_at=0.0))


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {6: _m6_scheduler}


@dataclass(frozen=True)
class SchedJob:
    """A job of the pool: its gang (tasks x resources), queue and priority, state and holder."""

    id: str
    name: str
    kind: str
    queue: str
    priority: int
    preemptible: bool
    tasks: int
    cpus: float
    gpus: int
    memory_gb: float
    estimate_s: float | None
    state: str
    outcome: str | None
    node: str
    placement_json: str | None
    pid: int
    pid_started: str | None
    lease_expires: float
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    preemptions: int
    reason: str | None


def list_jobs(engine: sa.Engine, *, include_done: int = 0) -> list[SchedJob]:
    """The pool's jobs not done (and the last `include_done` done ones), oldest first."""
    j = sched_jobs
    jobs = fetch_all(engine, sa.select(j).where(j.c.state != "done").order_by(j.c.submitted_at), SchedJob)
    if include_done:
        done = sa.select(j).where(j.c.state == "done").order_by(j.c.ended_at.desc()).limit(include_done)
        jobs += fetch_all(engine, done, SchedJob)
    return jobs


def passes(engine: sa.Engine) -> int:
    """Scheduling passes run in this workspace so far, by every process."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sched_lock.c.passes).where(sched_lock.c.id == 1)).scalar() or 0)
