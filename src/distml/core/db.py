"""The metadata store's engine and the column type its times are kept in.

`create_engine` opens any SQLAlchemy URL with one error message for a bad one and SQLite's
pragmas for concurrent processes; `UTCDateTime` hands back aware UTC datetimes on every
backend (SQLite stores them naive), so no caller repairs a time it reads.
"""

from __future__ import annotations

import datetime as dt

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
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # In WAL mode NORMAL loses no committed transaction when a process dies (only on power loss)
    # and spares an fsync per commit: workflow steps commit a few rows each.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
