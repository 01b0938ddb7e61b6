"""The scheduler's shared state: nodes, weighted queues, jobs and the pass lock (migration 6).

Every process that runs a job writes a row in `sched_jobs` and waits until a scheduling pass
(`scheduling/admission.py`) admits it; a pass runs in one transaction that starts by updating
`sched_lock`'s row, which serialises passes on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from distml.core.db import METADATA, fetch_all, fetch_one, in_transaction, insert_once

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


# -- nodes and queues --------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedNode:
    """What a host offers the pool."""

    name: str
    cpus: float
    gpus: int
    memory_gb: float
    updated_at: float


def get_node(engine: sa.Engine, name: str) -> SchedNode | None:
    return fetch_one(engine, sa.select(sched_nodes).where(sched_nodes.c.name == name), SchedNode)


def add_node(engine: sa.Engine, name: str, cpus: float, gpus: int, memory_gb: float) -> bool:
    """Register host `name`; False when another process registered it first."""
    try:
        with engine.begin() as conn:
            conn.execute(
                sched_nodes.insert().values(
                    name=name, cpus=cpus, gpus=gpus, memory_gb=memory_gb, updated_at=time.time()
                )
            )
        return True
    except sa.exc.IntegrityError:
        return False


def update_node(engine: sa.Engine, name: str, **values: Any) -> None:
    query = sched_nodes.update().where(sched_nodes.c.name == name).values(updated_at=time.time(), **values)
    in_transaction(engine, lambda conn: conn.execute(query))


def set_queue_weight(engine: sa.Engine, name: str, weight: float) -> None:
    """Create queue `name` or change its weight."""
    with engine.begin() as conn:
        query = sched_queues.update().where(sched_queues.c.name == name)
        if not conn.execute(query.values(weight=weight, updated_at=time.time())).rowcount:
            conn.execute(sched_queues.insert().values(name=name, weight=weight, updated_at=time.time()))


_QUEUES = sa.select(sched_queues.c.name, sched_queues.c.weight)


def queue_weights(conn: sa.Connection) -> dict[str, float]:
    return {row.name: row.weight for row in conn.execute(_QUEUES)}


# -- a scheduling pass: every statement runs inside the pass's one transaction --------------------


# The statements every pass runs, built once (SQLAlchemy then reuses their compiled form).
_BEGIN_PASS = sched_lock.update().where(sched_lock.c.id == 1).values(passes=sched_lock.c.passes + 1)
_WAITING_IDS = sa.select(sched_jobs.c.id).where(
    sched_jobs.c.state == "waiting", sched_jobs.c.node == sa.bindparam("node")
)
_START_JOB = (
    sched_jobs.update()
    .where(sched_jobs.c.id == sa.bindparam("job_id"))
    .values(state="running", started_at=sa.bindparam("now"), placement_json=sa.bindparam("placement"), reason=None)
)
_BIND_JOB = (
    sched_jobs.update()
    .where(sched_jobs.c.id == sa.bindparam("job_id"))
    .values(pid=sa.bindparam("holder"), pid_started=sa.bindparam("holder_started"))
)


def begin_pass(conn: sa.Connection) -> None:
    """Count the pass; the row lock this takes serialises passes on SQLite and PostgreSQL alike."""
    conn.execute(_BEGIN_PASS)


def _pass_rows_query() -> sa.Select:
    jobs = sched_jobs
    place = (
        sa.func.row_number()
        .over(partition_by=[jobs.c.queue, jobs.c.state], order_by=[jobs.c.priority.desc(), jobs.c.submitted_at])
        .label("place")
    )
    ranked = sa.select(jobs, place).where(jobs.c.state != "done", jobs.c.node == sa.bindparam("node")).subquery()
    return sa.select(*[ranked.c[c.name] for c in jobs.c]).where(
        sa.or_(ranked.c.state != "waiting", ranked.c.place <= sa.bindparam("window"))
    )


_PASS_ROWS = _pass_rows_query()  # built once: every pass runs it (SQLAlchemy then reuses its compiled form)


def pass_rows(conn: sa.Connection, node: str, window: int) -> list[Any]:
    """The rows a pass decides on: every job running on `node`, and the first `window` waiting
    jobs of each queue in queue order (priority, then age): a pass never looks further back."""
    return list(conn.execute(_PASS_ROWS, {"node": node, "window": window}).all())


def waiting_ids(conn: sa.Connection, node: str) -> list[str]:
    return list(conn.execute(_WAITING_IDS, {"node": node}).scalars())


def end_job(
    conn: sa.Connection, job_id: str, outcome: str, now: float, reason: str | None = None, *, only: str | None = None
) -> None:
    """Job `job_id` is done with `outcome` (finished, failed, lost, cancelled); with `only`, only
    while it is in that state ("waiting"), and never twice."""
    where = [sched_jobs.c.id == job_id, sched_jobs.c.state != "done"]
    if only is not None:
        where.append(sched_jobs.c.state == only)
    values: dict[str, Any] = {"state": "done", "outcome": outcome, "ended_at": now}
    if reason is not None:
        values["reason"] = reason
    conn.execute(sched_jobs.update().where(*where).values(**values))


def start_job(conn: sa.Connection, job_id: str, now: float, placement: list[str]) -> None:
    conn.execute(_START_JOB, {"job_id": job_id, "now": now, "placement": json.dumps(placement)})


def preempt_job(conn: sa.Connection, job_id: str, reason: str) -> None:
    conn.execute(
        sched_jobs.update()
        .where(sched_jobs.c.id == job_id)
        .values(state="preempting", reason=reason, preemptions=sched_jobs.c.preemptions + 1)
    )


def set_reason(conn: sa.Connection, job_id: str, reason: str | None) -> None:
    conn.execute(sched_jobs.update().where(sched_jobs.c.id == job_id).values(reason=reason))


# -- what holders write --------------------------------------------------------------------------


def submit_job(conn: sa.Connection, **values: Any) -> None:
    """A new waiting job (inside the pass that first considers it; once, if the pass runs again)."""
    insert_once(conn, sched_jobs, {"state": "waiting", "preemptions": 0, **values}, ("id",))


def requeue_job(engine: sa.Engine, job_id: str, lease_expires: float) -> None:
    """A preempted holder stopped: back in line, with its age."""
    query = (
        sched_jobs.update()
        .where(sched_jobs.c.id == job_id)
        .values(state="waiting", placement_json=None, started_at=None, lease_expires=lease_expires)
    )
    in_transaction(engine, lambda conn: conn.execute(query))


def running_job_id(engine: sa.Engine, name: str, node: str) -> str | None:
    """The id of the running (or preempting) gang named `name` on `node`, or None."""
    j = sched_jobs
    query = sa.select(j.c.id).where(j.c.name == name, j.c.node == node, j.c.state.in_(["running", "preempting"]))
    with engine.connect() as conn:
        return conn.execute(query).scalars().first()


def bind_job(conn: sa.Connection, job_id: str, pid: int, pid_started: str | None) -> None:
    conn.execute(_BIND_JOB, {"job_id": job_id, "holder": pid, "holder_started": pid_started})


def get_job(engine: sa.Engine, job_id: str) -> SchedJob:
    return fetch_all(engine, sa.select(sched_jobs).where(sched_jobs.c.id == job_id), SchedJob)[0]


def renew_leases(engine: sa.Engine, ids: list[str], held: list[str], until: float) -> set[str]:
    """Extend the leases of jobs `ids` to `until`; return those of `held` a pass chose to preempt."""
    j = sched_jobs

    def work(conn: sa.Connection) -> set[str]:
        conn.execute(j.update().where(j.c.id.in_(ids), j.c.state != "done").values(lease_expires=until))
        query = sa.select(j.c.id).where(j.c.id.in_(held), j.c.state == "preempting")
        return set(conn.execute(query).scalars())

    return in_transaction(engine, work)
