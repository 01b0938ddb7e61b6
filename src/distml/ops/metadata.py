"""The metadata store: what data sets, executions and artifacts exist, and how they relate.

SQLAlchemy Core on any URL (SQLite by default, PostgreSQL via psycopg). The schema grows
through numbered migrations applied in order on open and recorded in `schema_version`.
Alembic was considered; its script directory and env.py are heavy for migrations that ship
inside the package and run on every open, so migrations are plain ordered functions here.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from distml.core.db import UTCDateTime, utc_now
from distml.core.errors import DistmlError

metadata_obj = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata_obj,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

datasets = sa.Table(
    "datasets",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("split", sa.String(100), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("num_records", sa.BigInteger, nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("schema_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("name", "split", "fingerprint", name="uq_dataset_snapshot"),
)


def _m1_datasets(conn: sa.Connection) -> None:
    datasets.create(conn)


# Append only: a released migration never changes, a new one gets the next number.
MIGRATIONS: list[tuple[int, Callable[[sa.Connection], None]]] = [
    (1, _m1_datasets),
]


_now = utc_now


def _rows(engine: sa.Engine, query: sa.Select) -> list[dict[str, Any]]:
    """Every row of `query`, each as a dict of its columns."""
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def _first(engine: sa.Engine, query: sa.Select) -> dict[str, Any] | None:
    """The first row of `query` as a dict of its columns, or None."""
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return dict(row) if row is not None else None


def migrate(engine: sa.Engine) -> int:
    """Bring the schema up to date; return the version now in force.

    Each migration runs in its own transaction together with its `schema_version` row, so a
    crash leaves the store at the previous version, never half-migrated.
    """
    schema_version.create(engine, checkfirst=True)
    with engine.connect() as conn:
        current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    latest = MIGRATIONS[-1][0]
    if current > latest:
        raise DistmlError(
            f"the metadata store is at schema version {current}, newer than this distml "
            f"knows ({latest}); upgrade distml to open it"
        )
    for version, step in MIGRATIONS:
        if version <= current:
            continue
        with engine.begin() as conn:
            step(conn)
            conn.execute(schema_version.insert().values(version=version, applied_at=_now()))
        current = version
    return current


def record_dataset(
    engine: sa.Engine,
    *,
    name: str,
    split: str,
    fingerprint: str,
    num_records: int,
    uri: str,
    schema: dict[str, Any],
) -> int:
    """Record a data set snapshot (idempotent per name, split and fingerprint); return its id."""
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(datasets.c.id).where(
                datasets.c.name == name,
                datasets.c.split == split,
                datasets.c.fingerprint == fingerprint,
            )
        ).first()
        if row is not None:
            return int(row.id)
        result = conn.execute(
            datasets.insert().values(
                name=name,
                split=split,
                fingerprint=fingerprint,
                num_records=num_records,
                uri=uri,
                schema_json=json.dumps(schema, sort_keys=True),
                created_at=_now(),
            )
        )
        return int(result.inserted_primary_key[0])


def list_datasets(engine: sa.Engine, name: str | None = None) -> list[dict[str, Any]]:
    """All recorded data set snapshots, newest first, optionally for one name."""
    query = sa.select(datasets).order_by(datasets.c.id.desc())
    if name is not None:
        query = query.where(datasets.c.name == name)
    return _rows(engine, query)


# --- model registry (migration 2) -------------------------------------------------------

model_versions = sa.Table(
    "model_versions",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("manifest_digest", sa.String(64), nullable=False, index=True),
    sa.Column("weights_digest", sa.String(64), nullable=False),
    sa.Column("metrics_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_model_version"),
)

model_aliases = sa.Table(
    "model_aliases",
    metadata_obj,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.ForeignKeyConstraint(
        ["name", "version"], ["model_versions.name", "model_versions.version"], name="fk_alias_version"
    ),
)


def _m2_models(conn: sa.Connection) -> None:
    model_versions.create(conn)
    model_aliases.create(conn)


MIGRATIONS.append((2, _m2_models))


def record_model_version(
    engine: sa.Engine,
    *,
    name: str,
    manifest_digest: str,
    weights_digest: str,
    metrics: dict[str, Any],
    attempts: int = 50,
) -> int:
    """Register a new version of model `name` (previous highest + 1, from 1); return it.

    Two writers racing for the same number meet the unique (name, version) constraint; the
    loser retries with the next number.
    """
    for _ in range(attempts):
        try:
            with engine.begin() as conn:
                current = conn.execute(
                    sa.select(sa.func.max(model_versions.c.version)).where(model_versions.c.name == name)
                ).scalar()
                version = (current or 0) + 1
                conn.execute(
                    model_versions.insert().values(
                        name=name,
                        version=version,
                        manifest_digest=manifest_digest,
                        weights_digest=weights_digest,
                        metrics_json=json.dumps(metrics, sort_keys=True),
                        created_at=_now(),
                    )
                )
                return version
        except sa.exc.IntegrityError:
            continue

    raise DistmlError(f"could not register a new version of model {name!r}: {attempts} concurrent conflicts")


def get_model_version(engine: sa.Engine, name: str, version: int | None = None) -> dict[str, Any] | None:
    """One model version's row (the latest when `version` is None), or None."""
    query = sa.select(model_versions).where(model_versions.c.name == name)
    query = (
        query.order_by(model_versions.c.version.desc())
        if version is None
        else query.where(model_versions.c.version == version)
    )
    return _first(engine, query.limit(1))


def find_model_version_by_manifest(engine: sa.Engine, manifest_digest: str) -> dict[str, Any] | None:
    """The earliest model version registered with this manifest digest, or None."""
    query = (
        sa.select(model_versions)
        .where(model_versions.c.manifest_digest == manifest_digest)
        .order_by(model_versions.c.id)
        .limit(1)
    )
    return _first(engine, query)


def set_model_alias(engine: sa.Engine, name: str, alias: str, version: int) -> None:
    """Point `name@alias` at `version` (creating or moving the alias)."""
    with engine.begin() as conn:
        values = dict(version=version, updated_at=_now())
        updated = conn.execute(
            model_aliases.update().where(model_aliases.c.name == name, model_aliases.c.alias == alias).values(**values)
        ).rowcount
        if not updated:
            conn.execute(model_aliases.insert().values(name=name, alias=alias, **values))


def get_model_alias(engine: sa.Engine, name: str, alias: str) -> int | None:
    """The version `name@alias` points at, or None."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(model_aliases.c.version).where(model_aliases.c.name == name, model_aliases.c.alias == alias)
        ).scalar()


def delete_model_alias(engine: sa.Engine, name: str, alias: str, version: int | None = None) -> int | None:
    """Remove `name@alias`; return the version it pointed at, or None if nothing was removed.

    With `version`, the alias is removed only while it points at that version, so an alias
    someone else has just moved is left alone (None is returned; read it again to tell why).
    """
    where = (model_aliases.c.name == name, model_aliases.c.alias == alias)
    with engine.begin() as conn:
        current = conn.execute(sa.select(model_aliases.c.version).where(*where).with_for_update()).scalar()
        if current is None or (version is not None and current != version):
            return None
        conn.execute(model_aliases.delete().where(*where, model_aliases.c.version == current))
        return current


def list_model_versions(engine: sa.Engine, name: str | None = None) -> list[dict[str, Any]]:
    """Registered model versions (name ascending, newest version first) with their aliases."""
    query = sa.select(model_versions).order_by(model_versions.c.name, model_versions.c.version.desc())
    aliases_query = sa.select(model_aliases).order_by(model_aliases.c.alias)
    if name is not None:
        query = query.where(model_versions.c.name == name)
        aliases_query = aliases_query.where(model_aliases.c.name == name)
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(query)]
        aliases: dict[tuple[str, int], list[str]] = {}
        for row in conn.execute(aliases_query):
            aliases.setdefault((row.name, row.version), []).append(row.alias)
    for row in rows:
        row["metrics"] = json.loads(row.pop("metrics_json"))
        row["aliases"] = aliases.get((row["name"], row["version"]), [])
    return rows


# -- training runs and their per-step metrics (migration 3) ----------------------------------

train_runs = sa.Table(
    "train_runs",
    metadata_obj,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("config_json", sa.Text, nullable=False),
    sa.Column("result_json", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

train_steps = sa.Table(
    "train_steps",
    metadata_obj,
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


def list_training_runs(engine: sa.Engine, include: Iterable[str] = (), limit: int = 50) -> list[TrainingRunRow]:
    """The runs still marked running, and those named in `include`, newest first, each with its
    latest recorded step: one query, whatever the number of runs."""
    latest = (
        sa.select(train_steps.c.run_id, sa.func.max(train_steps.c.step).label("step"))
        .group_by(train_steps.c.run_id)
        .subquery()
    )
    last = train_steps.alias("last")
    query = (
        sa.select(train_runs, last.c.step, last.c.loss, last.c.samples_per_s, last.c.recorded_at)
        .outerjoin(latest, latest.c.run_id == train_runs.c.run_id)
        .outerjoin(last, sa.and_(last.c.run_id == latest.c.run_id, last.c.step == latest.c.step))
        .where(sa.or_(train_runs.c.status == "running", train_runs.c.run_id.in_(list(include))))
        .order_by(train_runs.c.updated_at.desc())
        .limit(limit)
    )
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


MIGRATIONS.append((3, _m3_training))


def record_train_run(
    engine: sa.Engine, run_id: str, config: dict[str, Any], *, status: str, result: dict[str, Any] | None = None
) -> None:
    """Create or update a training run's row (status running/complete/stopped)."""
    now = _now()
    values = {"status": status, "config_json": json.dumps(config, sort_keys=True, default=str), "updated_at": now}
    if result is not None:
        values["result_json"] = json.dumps(result, sort_keys=True)
    with engine.begin() as conn:
        updated = conn.execute(train_runs.update().where(train_runs.c.run_id == run_id).values(**values)).rowcount
        if not updated:
            conn.execute(train_runs.insert().values(run_id=run_id, created_at=now, **values))


def record_train_steps(engine: sa.Engine, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Store per-step metrics; a step recorded again (after a restart) is replaced."""
    if not rows:
        return
    now = _now()
    with engine.begin() as conn:
        conn.execute(
            train_steps.delete().where(
                train_steps.c.run_id == run_id, train_steps.c.step.in_([r["step"] for r in rows])
            )
        )
        conn.execute(train_steps.insert(), [{"run_id": run_id, "recorded_at": now, **r} for r in rows])


def train_history(engine: sa.Engine, run_id: str) -> list[dict[str, Any]]:
    return _rows(engine, sa.select(train_steps).where(train_steps.c.run_id == run_id).order_by(train_steps.c.step))


# -- asynchronous inference jobs (migration 4) ---------------------------------------------------
# A row is written before the job is acknowledged; a replica claims it by a conditional UPDATE
# of (status, owner) and holds it under a lease (`lease_expires`, epoch seconds) that it renews.

inference_jobs = sa.Table(
    "inference_jobs",
    metadata_obj,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),  # null: whichever version the runner serves
    sa.Column("status", sa.String(20), nullable=False),  # queued, running, succeeded, failed
    sa.Column("request_json", sa.Text, nullable=False),
    sa.Column("result_json", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("callback_url", sa.Text, nullable=True),
    sa.Column("callback_status", sa.String(20), nullable=True),  # pending, delivered, failed
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("lease_expires", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_inference_jobs_status_model", "status", "model"),
)


def _m4_inference_jobs(conn: sa.Connection) -> None:
    inference_jobs.create(conn)


MIGRATIONS.append((4, _m4_inference_jobs))


# -- workflow runs, step executions and what steps record (migration 5) ------------------------
# One row per run, one per (run, node, generation): generation > 0 are the re-executions of a
# step downstream of an asynchronous fan-in. A step process writes the final state of its own
# execution (so a result survives the orchestrator's death); the orchestrator writes the rest.

workflow_runs = sa.Table(
    "workflow_runs",
    metadata_obj,
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
    metadata_obj,
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
    metadata_obj,
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


MIGRATIONS.append((5, _m5_workflows))

TERMINAL_STEP_STATES = ("succeeded", "cached", "failed", "skipped", "upstream_failed", "cancelled")


def create_workflow_run(
    engine: sa.Engine, run_id: str, target: str, params: dict[str, Any], options: dict[str, Any], pid: int, host: str
) -> None:
    now = _now()
    with engine.begin() as conn:
        conn.execute(
            workflow_runs.insert().values(
                run_id=run_id,
                target=target,
                params_json=json.dumps(params, sort_keys=True),
                options_json=json.dumps(options, sort_keys=True),
                status="running",
                pid=pid,
                host=host,
                created_at=now,
                updated_at=now,
            )
        )


def update_workflow_run(engine: sa.Engine, run_id: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(workflow_runs.update().where(workflow_runs.c.run_id == run_id).values(updated_at=_now(), **values))


def get_workflow_run(engine: sa.Engine, run_id: str) -> dict[str, Any] | None:
    run = _first(engine, sa.select(workflow_runs).where(workflow_runs.c.run_id == run_id))
    if run is None:
        return None
    run["params"] = json.loads(run.pop("params_json"))
    run["options"] = json.loads(run.pop("options_json"))
    return run


def list_workflow_runs(engine: sa.Engine, limit: int = 50) -> list[dict[str, Any]]:
    """The latest runs, newest first, each with counts of its steps by state."""
    with engine.connect() as conn:
        runs = [
            dict(r._mapping)
            for r in conn.execute(sa.select(workflow_runs).order_by(workflow_runs.c.created_at.desc()).limit(limit))
        ]
        ids = [r["run_id"] for r in runs]
        counts = conn.execute(
            sa.select(step_executions.c.run_id, step_executions.c.status, sa.func.count())
            .where(step_executions.c.run_id.in_(ids))
            .group_by(step_executions.c.run_id, step_executions.c.status)
        ).all()
    by_run: dict[str, dict[str, int]] = {}
    for run_id, status, count in counts:
        by_run.setdefault(run_id, {})[status] = count
    for run in runs:
        run["params"] = json.loads(run.pop("params_json"))
        run.pop("options_json")
        run["steps"] = by_run.get(run["run_id"], {})
    return runs


def save_step_execution(engine: sa.Engine, run_id: str, node_id: str, generation: int, **values: Any) -> int:
    """Create or update the execution row of (run, node, generation); return its id (one statement
    when the row exists, as it does for every step from the start of its run)."""
    key = (
        step_executions.c.run_id == run_id,
        step_executions.c.node_id == node_id,
        step_executions.c.generation == generation,
    )
    with engine.begin() as conn:
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
        for column, value in first._mapping.items() if first is not None else ():
            values.setdefault(column, value)
        values.setdefault("attempt", 0)
        result = conn.execute(
            step_executions.insert().values(run_id=run_id, node_id=node_id, generation=generation, **values)
        )
        return int(result.inserted_primary_key[0])


def add_step_executions(engine: sa.Engine, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Insert the pending executions of a new run in one transaction."""
    if rows:
        with engine.begin() as conn:
            conn.execute(step_executions.insert(), [{"run_id": run_id, "attempt": 0, **row} for row in rows])


def finish_step_execution(engine: sa.Engine, execution_id: int, attempt: int, **values: Any) -> bool:
    """Record the end of attempt `attempt` of an execution, only while that attempt is the one
    running (a step process that outlived a timeout cannot overwrite what came after)."""
    with engine.begin() as conn:
        return bool(
            conn.execute(
                step_executions.update()
                .where(
                    step_executions.c.id == execution_id,
                    step_executions.c.attempt == attempt,
                    step_executions.c.status == "running",
                )
                .values(finished_at=_now(), **values)
            ).rowcount
        )


def list_step_executions(engine: sa.Engine, run_id: str) -> list[dict[str, Any]]:
    query = (
        sa.select(step_executions)
        .where(step_executions.c.run_id == run_id)
        .order_by(step_executions.c.id, step_executions.c.generation)
    )
    return _rows(engine, query)


def find_memo_hit(engine: sa.Engine, step_name: str, memo_key: str, not_before: dt.datetime | None) -> dict | None:
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
    return _first(engine, query)


def last_memoized_execution(engine: sa.Engine, step_name: str, exclude_run: str) -> dict | None:
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
    return _first(engine, query)


def record_step_metrics(engine: sa.Engine, run_id: str, node_id: str, rows: list[dict[str, Any]]) -> None:
    """Store metrics a step logs: rows of name, value and optional step number."""
    if not rows:
        return
    now = _now()
    with engine.begin() as conn:
        conn.execute(
            step_metrics.insert(),
            [{"run_id": run_id, "node_id": node_id, "recorded_at": now, "step": None, **row} for row in rows],
        )


def list_step_metrics(engine: sa.Engine, run_id: str, node_id: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(step_metrics).where(step_metrics.c.run_id == run_id).order_by(step_metrics.c.id)
    if node_id is not None:
        query = query.where(step_metrics.c.node_id == node_id)
    return _rows(engine, query)


# -- the scheduler's shared state (migration 6) -----------------------------------------------
# Every process that runs a job (distml train, workflow steps, serving replicas) writes a row in
# sched_jobs and waits until a scheduling pass admits it. A pass runs in one transaction that
# starts by updating sched_lock's row, which serialises passes on SQLite and PostgreSQL alike.
# A holder is identified by host + pid + the pid's start time; on another host, by its lease.

sched_nodes = sa.Table(
    "sched_nodes",
    metadata_obj,
    sa.Column("name", sa.String(200), primary_key=True),  # the host
    sa.Column("cpus", sa.Float, nullable=False),
    sa.Column("gpus", sa.Integer, nullable=False),
    sa.Column("memory_gb", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

sched_queues = sa.Table(
    "sched_queues",
    metadata_obj,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

sched_jobs = sa.Table(
    "sched_jobs",
    metadata_obj,
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
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("passes", sa.BigInteger, nullable=False),
)


def _m6_scheduler(conn: sa.Connection) -> None:
    for table in (sched_nodes, sched_queues, sched_jobs, sched_lock):
        table.create(conn)
    conn.execute(sched_lock.insert().values(id=1, passes=0))
    conn.execute(sched_queues.insert().values(name="default", weight=1.0, updated_at=0.0))


MIGRATIONS.append((6, _m6_scheduler))


# -- ML Metadata: artifacts, executions, contexts and the events that link them (migration 7) ----
# The model of ML Metadata (MLMD): an artifact is a thing that exists (a data snapshot, a checkpoint,
# a model), an execution something that ran (a training run, a pipeline step, a deployment), an
# event says an execution read (input) or wrote (output) an artifact, and a context groups
# executions and artifacts (a pipeline run, a service) through associations and attributions.
# Artifacts and executions carry a `key` unique within their type, so a producer records what it
# knows whenever it knows it, any number of times, from any process: recording is idempotent.
# The registry (model_versions, model_aliases) lives on top: a version's manifest digest is the
# key of its `model` artifact. `distml.ops.lineage` records the producers' facts and walks the graph.

artifacts = sa.Table(
    "artifacts",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(50), nullable=False),  # dataset_snapshot, checkpoint, model
    sa.Column("key", sa.String(500), nullable=False),
    sa.Column("name", sa.String(300), nullable=True),
    sa.Column("uri", sa.Text, nullable=True),
    sa.Column("fingerprint", sa.String(200), nullable=True, index=True),  # content digest
    sa.Column("properties_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("type", "key", name="uq_artifact_key"),
)

executions = sa.Table(
    "executions",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(50), nullable=False),  # training_run, step_execution, registration, deployment
    sa.Column("key", sa.String(500), nullable=False),
    sa.Column("name", sa.String(300), nullable=True),
    sa.Column("state", sa.String(20), nullable=False),  # running, complete, failed, stopped, ended
    sa.Column("properties_json", sa.Text, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("ended_at", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("type", "key", name="uq_execution_key"),
)

contexts = sa.Table(
    "contexts",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(50), nullable=False),  # pipeline_run, service
    sa.Column("name", sa.String(300), nullable=False),
    sa.Column("properties_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("type", "name", name="uq_context_name"),
)

events = sa.Table(
    "events",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("execution_id", sa.Integer, sa.ForeignKey("executions.id"), nullable=False),
    sa.Column("artifact_id", sa.Integer, sa.ForeignKey("artifacts.id"), nullable=False, index=True),
    sa.Column("kind", sa.String(10), nullable=False),  # input, output
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("execution_id", "artifact_id", "kind", name="uq_event"),
)

attributions = sa.Table(
    "attributions",
    metadata_obj,
    sa.Column("context_id", sa.Integer, sa.ForeignKey("contexts.id"), primary_key=True),
    sa.Column("artifact_id", sa.Integer, sa.ForeignKey("artifacts.id"), primary_key=True, index=True),
)

associations = sa.Table(
    "associations",
    metadata_obj,
    sa.Column("context_id", sa.Integer, sa.ForeignKey("contexts.id"), primary_key=True),
    sa.Column("execution_id", sa.Integer, sa.ForeignKey("executions.id"), primary_key=True, index=True),
)

EVENT_KINDS = ("input", "output")


def _m7_lineage(conn: sa.Connection) -> None:
    for table in (artifacts, executions, contexts, events, attributions, associations):
        table.create(conn)


MIGRATIONS.append((7, _m7_lineage))


def in_transaction(engine: sa.Engine, work: Callable[[sa.Connection], Any], attempts: int = 20) -> Any:
    """Run `work(conn)` in one transaction and return its result. On SQLite and PostgreSQL the
    functions below never collide on a unique key (`INSERT ... ON CONFLICT DO NOTHING`); on other
    databases a collision runs `work` again from the start, and the next try finds the other's row."""
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                return work(conn)
        except sa.exc.IntegrityError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _insert_once(conn: sa.Connection, table: sa.Table, values: dict[str, Any], unique: tuple[str, ...]) -> bool:
    """Insert the row unless one with the same `unique` columns exists (a concurrent writer's
    included); True if this call inserted it."""
    if conn.dialect.name in ("sqlite", "postgresql"):
        if conn.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        statement = insert(table).values(**values).on_conflict_do_nothing().returning(*table.primary_key.columns)
        return conn.execute(statement).first() is not None  # (rowcount is -1 on PostgreSQL)
    where = [table.c[column] == values[column] for column in unique]
    if conn.execute(sa.select(*[table.c[c] for c in unique]).where(*where)).first() is not None:
        return False
    conn.execute(table.insert().values(**values))
    return True


def _merged(old_json: str | None, new: dict[str, Any] | None) -> str:
    properties = json.loads(old_json) if old_json else {}
    properties.update(new or {})
    return json.dumps(properties, sort_keys=True, default=str)


def record_artifact(
    conn: sa.Connection,
    type: str,
    key: str,
    *,
    name: str | None = None,
    uri: str | None = None,
    fingerprint: str | None = None,
    properties: dict[str, Any] | None = None,
) -> int:
    """The id of artifact (`type`, `key`), created on first record; later records add the
    properties and fields they give. Run inside `in_transaction`."""
    given = {k: v for k, v in {"name": name, "uri": uri, "fingerprint": fingerprint}.items() if v is not None}
    where = (artifacts.c.type == type, artifacts.c.key == key)
    row = conn.execute(sa.select(artifacts).where(*where)).first()
    if row is None:
        values = dict(type=type, key=key, properties_json=_merged(None, properties), created_at=_now(), **given)
        if _insert_once(conn, artifacts, values, ("type", "key")):
            return int(conn.execute(sa.select(artifacts.c.id).where(*where)).scalar_one())
        row = conn.execute(sa.select(artifacts).where(*where)).one()
    merged = _merged(row.properties_json, properties)
    if merged != row.properties_json or any(getattr(row, k) != v for k, v in given.items()):
        conn.execute(artifacts.update().where(artifacts.c.id == row.id).values(properties_json=merged, **given))
    return int(row.id)


def record_execution(
    conn: sa.Connection,
    type: str,
    key: str,
    *,
    state: str,
    name: str | None = None,
    properties: dict[str, Any] | None = None,
) -> int:
    """The id of execution (`type`, `key`), created on first record with `state`; a later record
    moves it to `state` (ended_at is set once it is no longer running) and adds its properties.
    One process writes each execution (its producer). Run inside `in_transaction`."""
    now = _now()
    where = (executions.c.type == type, executions.c.key == key)
    values: dict[str, Any] = {"state": state, "updated_at": now, "ended_at": None if state == "running" else now}
    if name is not None:
        values["name"] = name
    if properties is None:  # a change of state: one statement when the execution exists
        row = conn.execute(executions.update().where(*where).values(**values).returning(executions.c.id)).first()
        if row is not None:
            return int(row.id)
    first = dict(type=type, key=key, started_at=now, properties_json=_merged(None, properties), **values)
    inserted = _insert_once(conn, executions, first, ("type", "key"))
    row = conn.execute(sa.select(executions.c.id, executions.c.properties_json).where(*where)).one()
    if not inserted:
        conn.execute(
            executions.update()
            .where(executions.c.id == row.id)
            .values(properties_json=_merged(row.properties_json, properties), **values)
        )
    return int(row.id)


def record_context(conn: sa.Connection, type: str, name: str, properties: dict[str, Any] | None = None) -> int:
    """The id of context (`type`, `name`), created on first record. Run inside `in_transaction`."""
    where = (contexts.c.type == type, contexts.c.name == name)
    found = conn.execute(sa.select(contexts.c.id).where(*where)).scalar()
    if found is None:
        values = dict(type=type, name=name, properties_json=_merged(None, properties), created_at=_now())
        _insert_once(conn, contexts, values, ("type", "name"))
        found = conn.execute(sa.select(contexts.c.id).where(*where)).scalar_one()
    return int(found)


def link(conn: sa.Connection, execution_id: int, artifact_id: int, kind: str) -> None:
    """Record the event: execution `execution_id` read (`input`) or wrote (`output`) the artifact
    (once, however often it is recorded). Run inside `in_transaction`."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"event kind must be one of {EVENT_KINDS}, got {kind!r}")
    values = dict(execution_id=execution_id, artifact_id=artifact_id, kind=kind, created_at=_now())
    _insert_once(conn, events, values, ("execution_id", "artifact_id", "kind"))


def associate(
    conn: sa.Connection, context_id: int, *, execution_id: int | None = None, artifact_id: int | None = None
) -> None:
    """Put an execution (association) or an artifact (attribution) in a context, once."""
    if execution_id is not None:
        _insert_once(
            conn, associations, {"context_id": context_id, "execution_id": execution_id}, ("context_id", "execution_id")
        )
    if artifact_id is not None:
        _insert_once(
            conn, attributions, {"context_id": context_id, "artifact_id": artifact_id}, ("context_id", "artifact_id")
        )


# -- continuous training: watches, arrivals and cycles (migration 8) ---------------------------
# A watch follows one source. Each arrival (a new file or partition, or a range of new rows) is
# ingested once into a snapshot and recorded `pending` (or `rejected`, with why); a cycle claims
# every pending arrival in one transaction, so data that arrives while a cycle runs waits for
# the next one, and an arrival is new in exactly one cycle even across a `kill -9`.

watches = sa.Table(
    "watches",
    metadata_obj,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("settings_json", sa.Text, nullable=False),
    sa.Column("watermark", sa.Text, nullable=True),  # SQL sources: the last order-column value ingested
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("pid_started", sa.String(40), nullable=True),
    sa.Column("host", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

watch_arrivals = sa.Table(
    "watch_arrivals",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("watch", sa.String(200), nullable=False),
    sa.Column("key", sa.String(1000), nullable=False),  # a file or partition path, or a row range
    sa.Column("fingerprint", sa.String(200), nullable=True),
    sa.Column("num_records", sa.Integer, nullable=True),
    sa.Column("snapshot", sa.Text, nullable=True),  # the ingested .npz (accepted arrivals)
    sa.Column("status", sa.String(20), nullable=False),  # pending, rejected, claimed, trained
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("cycle", sa.Integer, nullable=True),  # the cycle it was new in
    sa.Column("arrived_at", UTCDateTime, nullable=False),
    sa.Column("detected_at", UTCDateTime, nullable=False),
    sa.Column("ingested_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("watch", "key", name="uq_watch_arrival"),
)

watch_cycles = sa.Table(
    "watch_cycles",
    metadata_obj,
    sa.Column("watch", sa.String(200), primary_key=True),
    sa.Column("cycle", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),  # running, promoted, kept, rolled_back, failed
    sa.Column("run_id", sa.String(64), nullable=True),  # its workflow run
    sa.Column("production", sa.String(300), nullable=True),  # what served before it
    sa.Column("candidate", sa.String(300), nullable=True),
    sa.Column("decision_json", sa.Text, nullable=True),
    sa.Column("timings_json", sa.Text, nullable=True),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
)


def _m8_continuous(conn: sa.Connection) -> None:
    for table in (watches, watch_arrivals, watch_cycles):
        table.create(conn)


MIGRATIONS.append((8, _m8_continuous))


def list_watches(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every watch, by name."""
    return _rows(engine, sa.select(watches).order_by(watches.c.name))


def get_watch(engine: sa.Engine, name: str) -> dict[str, Any] | None:
    return _first(engine, sa.select(watches).where(watches.c.name == name))


def save_watch(engine: sa.Engine, name: str, **values: Any) -> None:
    """Create watch `name` or update the given columns."""

    def work(conn: sa.Connection) -> None:
        now = _now()
        if conn.execute(sa.select(watches.c.name).where(watches.c.name == name)).first() is None:
            conn.execute(
                watches.insert().values(
                    name=name, settings_json=values.pop("settings_json", "{}"), created_at=now, updated_at=now, **values
                )
            )
        else:
            conn.execute(watches.update().where(watches.c.name == name).values(updated_at=now, **values))

    in_transaction(engine, work)


def record_arrival(engine: sa.Engine, watch: str, key: str, watermark: str | None = None, **values: Any) -> bool:
    """Record an ingested (or rejected) arrival; with `watermark`, move the watch's watermark in the
    same transaction. False when `key` was already recorded (a restart redoing its last arrival)."""

    def work(conn: sa.Connection) -> bool:
        now = _now()
        row = {"watch": watch, "key": key, "detected_at": now, "ingested_at": now, "arrived_at": now, **values}
        inserted = _insert_once(conn, watch_arrivals, row, ("watch", "key"))
        if watermark is not None:
            conn.execute(watches.update().where(watches.c.name == watch).values(watermark=watermark, updated_at=now))
        return inserted

    return in_transaction(engine, work)


def known_arrival_keys(engine: sa.Engine, watch: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(watch_arrivals.c.key).where(watch_arrivals.c.watch == watch)).scalars())


def list_arrivals(engine: sa.Engine, watch: str) -> list[dict[str, Any]]:
    return _rows(engine, sa.select(watch_arrivals).where(watch_arrivals.c.watch == watch).order_by(watch_arrivals.c.id))


def claim_cycle(engine: sa.Engine, watch: str, production: str | None) -> tuple[int, list[dict[str, Any]]] | None:
    """Start the next cycle with every pending arrival (one transaction); None when none is pending."""

    def work(conn: sa.Connection) -> tuple[int, list[dict[str, Any]]] | None:
        pending = [
            dict(r)
            for r in conn.execute(
                sa.select(watch_arrivals)
                .where(watch_arrivals.c.watch == watch, watch_arrivals.c.status == "pending")
                .order_by(watch_arrivals.c.id)
            ).mappings()
        ]
        if not pending:
            return None
        last = conn.execute(sa.select(sa.func.max(watch_cycles.c.cycle)).where(watch_cycles.c.watch == watch)).scalar()
        cycle = (last or 0) + 1
        conn.execute(
            watch_cycles.insert().values(
                watch=watch, cycle=cycle, status="running", production=production, started_at=_now()
            )
        )
        conn.execute(
            watch_arrivals.update()
            .where(watch_arrivals.c.id.in_([a["id"] for a in pending]))
            .values(status="claimed", cycle=cycle)
        )
        return cycle, pending

    return in_transaction(engine, work)


def update_cycle(engine: sa.Engine, watch: str, cycle: int, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(
            watch_cycles.update().where(watch_cycles.c.watch == watch, watch_cycles.c.cycle == cycle).values(**values)
        )


def finish_cycle(engine: sa.Engine, watch: str, cycle: int, status: str, **values: Any) -> None:
    """End a cycle and mark its arrivals trained (whether or not its model was promoted)."""
    with engine.begin() as conn:
        conn.execute(
            watch_cycles.update()
            .where(watch_cycles.c.watch == watch, watch_cycles.c.cycle == cycle)
            .values(status=status, finished_at=_now(), **values)
        )
        conn.execute(
            watch_arrivals.update()
            .where(watch_arrivals.c.watch == watch, watch_arrivals.c.cycle == cycle)
            .values(status="trained")
        )


def list_cycles(engine: sa.Engine, watch: str) -> list[dict[str, Any]]:
    return _rows(engine, sa.select(watch_cycles).where(watch_cycles.c.watch == watch).order_by(watch_cycles.c.cycle))
