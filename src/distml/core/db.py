"""The metadata store: its engine, its schema's history, and the column type its times are kept in.

`create_engine` opens any SQLAlchemy URL with one error message for a bad one and SQLite's
pragmas for concurrent processes; `migrate` applies the numbered migrations each owner package
declares (SCHEMA says which); `UTCDateTime` hands back aware UTC datetimes on every backend
(SQLite stores them naive), so no caller repairs a time it reads. SQLAlchemy Core on any URL;
Alembic was considered, but its script directory and env.py are heavy for migrations that ship
inside the package and run on every open. A store that goes away (a restart, a dropped connection,
SQLite's "database is locked") is waited for: connecting retries, `in_transaction` runs its work
again, up to `STORE_WAIT_S`; past it `StoreUnavailable` ends the work (resumable).
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from distml.core.errors import DistmlError

log = logging.getLogger("distml.store")

STORE_WAIT_S = 120.0  # how long work waits for a metadata store that went away, then stops (resumable)
SQLITE_BUSY_MS = 30000  # how long one SQLite statement waits for another process's write lock


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


class StoreUnavailable(DistmlError):
    """The metadata store stayed unreachable (or locked) longer than its engine waits for it."""


# What a driver says when the store is away, not when the request is wrong: worth waiting for.
_AWAY = (
    "connection refused",
    "could not connect",
    "connection failed",
    "starting up",
    "shutting down",
    "in recovery mode",
    "terminating connection",
    "server closed the connection",
    "connection is closed",
    "connection already closed",
    "consuming input failed",
    "connection reset",
    "connection timed out",
    "database is locked",
    "database table is locked",
)


def store_away(exc: BaseException) -> bool:
    """Did `exc` (a DBAPI error, or SQLAlchemy's wrapper of one) come from a store that went away or is
    locked, so that the same work may succeed once it is back?"""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    text = str(exc).lower()
    return any(marker in text for marker in _AWAY)


class _Outage:
    """One engine's view of its store going away: the first waiter logs one line, the first to get
    through logs it is back; every waiter gives up at the same time, `wait_s` after it went away."""

    def __init__(self, where: str, wait_s: float) -> None:
        self.where, self.wait_s = where, wait_s
        self._lock = threading.Lock()
        self.since: float | None = None  # monotonic time it was found away
        self._last = 0.0  # the latest failure (a failure long after an unnoticed return is a new outage)

    def wait(self, exc: BaseException, attempt: int) -> None:
        """Sleep before attempt `attempt + 1` at the store that failed with `exc`, or raise
        `StoreUnavailable` once it has been away `wait_s`."""
        now = time.monotonic()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
        state = "locked by another writer" if "is locked" in reason else "unreachable"
        with self._lock:
            if self.since is None or now - self._last > 10.0:
                self.since = now
                log.warning(
                    "metadata store at %s %s (%s); retrying for up to %g s", self.where, state, reason, self.wait_s
                )
            self._last = now
            left = self.since + self.wait_s - now
        if left <= 0:
            raise StoreUnavailable(
                f"metadata store at {self.where} {state} for {self.wait_s:g} s ({reason}); "
                "the work stopped here is recorded up to this point and resumable once the store is back"
            ) from exc
        time.sleep(min(0.05 * 2**attempt, 1.0, left))

    def back(self) -> None:
        if self.since is None:
            return
        with self._lock:
            if self.since is not None:
                log.warning("metadata store at %s is back after %.1f s", self.where, time.monotonic() - self.since)
                self.since = None


_OUTAGES: weakref.WeakKeyDictionary[sa.Engine, _Outage] = weakref.WeakKeyDictionary()


def _outage(engine: sa.Engine) -> _Outage:
    outage = _OUTAGES.get(engine)
    if outage is None:  # an engine made without create_engine (a test's, an admin's)
        outage = _OUTAGES.setdefault(engine, _Outage(_where(engine.url), STORE_WAIT_S))
    return outage


def _where(url: sa.URL) -> str:
    if url.get_backend_name() == "sqlite":
        return url.database or "memory"
    return f"{url.host or 'localhost'}:{url.port or 'default port'}/{url.database or ''}"


def create_engine(url: str, wait_s: float | None = None) -> sa.Engine:
    """An engine for the metadata store at `url`, or one error naming what a URL looks like.

    A server's connections are checked before use (`pool_pre_ping`: one the server dropped is
    replaced; a SQLite file has no server to drop them, and its checkouts skip the round trip), and
    connecting to a store that is away waits for it up to `wait_s` seconds, then raises
    `StoreUnavailable` (`STORE_WAIT_S` unless told)."""
    wait_s = STORE_WAIT_S if wait_s is None else wait_s
    if not wait_s > 0:
        raise DistmlError(f"the wait for the metadata store must be > 0 seconds, got {wait_s!r}")
    try:
        server = sa.engine.make_url(url).get_backend_name() != "sqlite"
        engine = sa.create_engine(url, pool_pre_ping=server)
    except sa.exc.ArgumentError as exc:  # NoSuchModuleError (an unknown dialect) is one too
        raise DistmlError(
            f"metadata store URL {url!r} is not a valid SQLAlchemy URL "
            "(expected e.g. sqlite:///path/distml.db or postgresql+psycopg://user@host/db)"
        ) from exc
    outage = _OUTAGES[engine] = _Outage(_where(engine.url), wait_s)

    def connect(dialect: sa.Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        attempt = 0
        while True:
            try:
                connection = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.Error as exc:
                if not store_away(exc):
                    raise
                outage.wait(exc, attempt)
                attempt += 1
                continue
            outage.back()
            return connection

    sa.event.listen(engine, "do_connect", connect)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets readers (a serving process) work while a writer (training) records.
    cursor = dbapi_conn.cursor()
    # The busy timeout first: switching a new store to WAL waits for a process that holds it
    # (one migrating it), instead of failing at once with "database is locked".
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
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
    other databases a collision runs `work` again from the start, and the next try finds the other's row.

    A transaction PostgreSQL rolls back for a deadlock with another (two holders' rows locked in
    different orders) also runs again, at once.

    A store that goes away meanwhile (the connection dropped, the server restarting, SQLite locked)
    runs `work` again from the start once it is back, up to the engine's wait (`create_engine`),
    then raises `StoreUnavailable`. A commit whose answer was lost may have succeeded: a `work`
    that inserts makes its rows once (`insert_once`, a key it chose before) so a rerun adds nothing."""
    collisions = failures = 0
    while True:
        try:
            with engine.begin() as conn:
                result = work(conn)
        except sa.exc.IntegrityError:
            collisions += 1
            if collisions >= attempts:
                raise
            continue
        except sa.exc.DBAPIError as exc:
            if _conflict(exc) and collisions + 1 < attempts:  # the server rolled this one back: run it again
                collisions += 1
                time.sleep(random.uniform(0.0, 0.01 * collisions))
                continue
            if not store_away(exc):
                raise
            _outage(engine).wait(exc, failures)
            failures += 1
            continue
        if failures:
            _outage(engine).back()
        return result


def _conflict(exc: sa.exc.DBAPIError) -> bool:
    """Did PostgreSQL roll the transaction back for a deadlock or a serialization failure with
    another one (SQLSTATE 40P01, 40001), so that running it again succeeds?"""
    return getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")


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
    """Every row of `query` as `row_type(**columns)` (a dataclass of the owner's); read again if
    the store went away meanwhile, as `in_transaction` does."""
    return in_transaction(engine, lambda conn: [row_type(**row) for row in conn.execute(query).mappings()])


def fetch_one(engine: sa.Engine, query: sa.Select, row_type: Callable[..., R]) -> R | None:
    """The first row of `query` as `row_type(**columns)`, or None."""
    row = in_transaction(engine, lambda conn: conn.execute(query).mappings().first())
    return row_type(**row) if row is not None else None
