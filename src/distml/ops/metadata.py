"""The metadata store: what data sets, executions and artifacts exist, and how they relate.

SQLAlchemy Core on any URL (SQLite by default, PostgreSQL via psycopg). The schema grows
through numbered migrations applied in order on open and recorded in `schema_version`.
Alembic was considered; its script directory and env.py are heavy for migrations that ship
inside the package and run on every open, so migrations are plain ordered functions here.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

metadata_obj = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata_obj,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("name", "split", "fingerprint", name="uq_dataset_snapshot"),
)


def _m1_datasets(conn: sa.Connection) -> None:
    datasets.create(conn)


# Append only: a released migration never changes, a new one gets the next number.
MIGRATIONS: list[tuple[int, Callable[[sa.Connection], None]]] = [
    (1, _m1_datasets),
]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        from distml.errors import DistmlError

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
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_model_version"),
)

model_aliases = sa.Table(
    "model_aliases",
    metadata_obj,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
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
    from distml.errors import DistmlError

    raise DistmlError(f"could not register a new version of model {name!r}: {attempts} concurrent conflicts")


def get_model_version(engine: sa.Engine, name: str, version: int | None = None) -> dict[str, Any] | None:
    """One model version's row (the latest when `version` is None), or None."""
    query = sa.select(model_versions).where(model_versions.c.name == name)
    query = (
        query.order_by(model_versions.c.version.desc())
        if version is None
        else query.where(model_versions.c.version == version)
    )
    with engine.connect() as conn:
        row = conn.execute(query.limit(1)).first()
    return dict(row._mapping) if row is not None else None


def find_model_version_by_manifest(engine: sa.Engine, manifest_digest: str) -> dict[str, Any] | None:
    """The earliest model version registered with this manifest digest, or None."""
    query = (
        sa.select(model_versions)
        .where(model_versions.c.manifest_digest == manifest_digest)
        .order_by(model_versions.c.id)
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
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
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)


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
    with engine.connect() as conn:
        query = sa.select(train_steps).where(train_steps.c.run_id == run_id).order_by(train_steps.c.step)
        return [dict(row._mapping) for row in conn.execute(query)]


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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_inference_jobs_status_model", "status", "model"),
)


def _m4_inference_jobs(conn: sa.Connection) -> None:
    inference_jobs.create(conn)


MIGRATIONS.append((4, _m4_inference_jobs))
