"""The metadata store: its engine, its schema's history, and the column type its times are kept in.

`create_engine` opens any SQLAlchemy URL with one error message for a bad one and SQLite's
pragmas for concurrent processes; `migrate` applies the numbered migrations each owner package
declares (SCHEMA says which); `UTCDateTime` hands back aware UTC datetimes on every backend
(SQLite stores them naive), so no caller repairs a time it reads. SQLAlchemy Core on any URL;
Alembic was considered, but its script directory and env.py are heavy for migrations that ship
inside the package and run on every open.
"""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from distml.core.errors import DistmlError


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator):
    """A timezone-aware datetime column: written as UTC, read back aware in UTC.

    The DDL is `DateTime(timezone=True)`, as before, so a store created earlier opens
    unchanged. A naive datetime is refused on write: it names no instant.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise DistmlError(f"a stored time must be a timezone-aware datetime, got {value!r}")
        value = value.astimezone(dt.UTC)
        # SQLite has no zone: store the UTC wall time, which process_result_value reads back as UTC
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def create_engine(url: str) -> sa.Engine:
    """An engine for the metadata store at `url`, or one error naming what a URL looks like."""
    try:
        engine = sa.create_engine(url)
    except sa.exc.ArgumentError as exc:  # NoSuchModuleError (an unknown dialect) is one too
        raise DistmlError(
            f"metadata store URL {url!r} is not a valid SQLAlchemy URL "
            "(expected e.g. sqlite:///path/distml.db or postgresql+psycopg://user@host/db)"
        ) from exc
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets readers (a serving process) work while a writer (training) records.
    cursor = dbapi_conn.cursor()
    # The busy timeout first: switching a new store to WAL waits for a process that holds it
    # (one migrating it), instead of failing at once with "database is locked".
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL loses no committed transaction when a process dies (only on power loss)
    # and spares an fsync per commit: workflow steps commit a few rows each.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# -- the schema: one MetaData, the history of migrations and who owns each -------------------------
# Every owner (the package of a concept) declares its tables on METADATA and its migrations in a
# `MIGRATIONS` dict of its own module; SCHEMA is the history: migration N belongs to that owner. A
# released migration never changes; a new one gets the next number. Like Django's INSTALLED_APPS,
# owners are named, not imported, here: `migrate` imports only the owners of migrations still to
# apply, so the floor imports nothing above it and a store that is up to date costs one query.

METADATA = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    METADATA,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

SCHEMA: dict[int, str] = {
    1: "distml.lineage.store",  # datasets
    2: "distml.models.registry",  # model_versions, model_aliases
    3: "distml.train.store",  # train_runs, train_steps
    4: "distml.serve.jobs",  # inference_jobs
    5: "distml.workflow.store",  # workflow_runs, step_executions, step_metrics
    6: "distml.scheduling.store",  # sched_nodes, sched_queues, sched_jobs, sched_lock
    7: "distml.lineage.store",  # artifacts, executions, contexts, events, attributions, associations
    8: "distml.pipelines.watches",  # watches, watch_arrivals, watch_cycles
}
LATEST = max(SCHEMA)


def migration(version: int) -> Callable[[sa.Connection], None]:
    """Migration `version`, from the module SCHEMA names as its owner."""
    owner = importlib.import_module(SCHEMA[version])
    try:
        return owner.MIGRATIONS[version]
    except (AttributeError, KeyError):
        raise DistmlError(f"{SCHEMA[version]} declares no migration {version}") from None


MIGRATION_LOCK = 0x64697374  # PostgreSQL advisory lock key of the migrations ("dist")


def _version_now(conn: sa.Connection) -> int | None:
    """The schema version in force, or None when the store has no `schema_version` table yet."""
    if not sa.inspect(conn).has_table(schema_version.name):
        return None
    return conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0


def _refuse_newer(current: int) -> None:
    if current > LATEST:
        raise DistmlError(
            f"the metadata store is at schema version {current}, newer than this distml "
            f"knows ({LATEST}); upgrade distml to open it"
        )


def _lock(conn: sa.Connection) -> None:
    """Begin the migration's transaction holding the store's migration lock: on SQLite an exclusive
    transaction (no other connection reads or writes until it ends), on PostgreSQL a transaction
    advisory lock (released with the transaction); elsewhere a plain transaction."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
    elif conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))


def migrate(engine: sa.Engine) -> int:
    """Bring the schema up to date; return the version now in force.

    Safe from any number of processes opening the store at once, new or older: a store already
    up to date costs one read; otherwise the migrations run under the store's migration lock
    (`_lock`), the version is read again under it, and each pending migration is applied once,
    all of them with their `schema_version` rows in one transaction, so a crash leaves the store
    at the version it had, never half-migrated.
    """
    with engine.connect() as conn:
        current = _version_now(conn)
    if current is not None:
        _refuse_newer(current)
        if current == LATEST:
            return current
    with engine.connect() as conn:
        _lock(conn)
        schema_version.create(conn, checkfirst=True)
        current = _version_now(conn) or 0  # another process may have migrated while this one waited
        _refuse_newer(current)
        for version in range(current + 1, LATEST + 1):
            migration(version)(conn)
            conn.execute(schema_version.insert().values(version=version, applied_at=utc_now()))
        conn.commit()
    return max(current, LATEST)


# -- helpers every owner's queries share -----------------------------------------------------------

R = TypeVar("R")


def in_transaction(engine: sa.Engine, work: Callable[[sa.Connection], R], attempts: int = 20) -> R:
    """Run `work(conn)` in one transaction and return its result. On SQLite and PostgreSQL the
    owners never collide on a unique key (`insert_once`: `INSERT ... ON CONFLICT DO NOTHING`); on
    other databases a collision runs `work` again from the start, and the next try finds the other's row."""
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                return work(conn)
        except sa.exc.IntegrityError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def insert_once(conn: sa.Connection, table: sa.Table, values: dict[str, Any], unique: tuple[str, ...]) -> bool:
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


def fetch_all(engine: sa.Engine, query: sa.Select, row_type: Callable[..., R]) -> list[R]:
    """Every row of `query` as `row_type(**columns)` (a dataclass of the owner's)."""
    with engine.connect() as conn:
        return [row_type(**row) for row in conn.execute(query).mappings()]


def fetch_one(engine: sa.Engine, query: sa.Select, row_type: Callable[..., R]) -> R | None:
    """The first row of `query` as `row_type(**columns)`, or None."""
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return row_type(**row) if row is not None else None
