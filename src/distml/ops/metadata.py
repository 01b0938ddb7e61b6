"""The metadata store: what data sets, executions and artifacts exist, and how they relate.

SQLAlchemy Core on any URL (SQLite by default, PostgreSQL via psycopg). The schema grows
through numbered migrations applied in order on open and recorded in `schema_version`.
Alembic was considered; its script directory and env.py are heavy for migrations that ship
inside the package and run on every open, so migrations are plain ordered functions here.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable

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
    return dt.datetime.now(dt.timezone.utc)


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
