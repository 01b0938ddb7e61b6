"""The floor's database helpers: times come back aware in UTC on SQLite and PostgreSQL alike,
rows written before `UTCDateTime` read the same, and a bad URL gets one clear error."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from distml.core.db import UTCDateTime, create_engine
from distml.core.errors import DistmlError

PARIS = dt.timezone(dt.timedelta(hours=1))


def _table(kind) -> tuple[sa.MetaData, sa.Table]:
    meta = sa.MetaData()
    return meta, sa.Table("t", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("at", kind))


@pytest.fixture
def engine(db_url, tmp_path):
    engine = create_engine(db_url or f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield engine
    engine.dispose()


def test_a_stored_time_reads_back_aware_in_utc(engine):
    meta, table = _table(UTCDateTime)
    meta.create_all(engine)
    written = dt.datetime(2026, 12, 7, 4, 30, 15, 123456, tzinfo=PARIS)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=1, at=written))
        read = conn.execute(sa.select(table.c.at)).scalar_one()
        # a comparison binds through the type too: the same instant in another zone matches
        matched = conn.execute(sa.select(table.c.id).where(table.c.at == written.astimezone(dt.UTC))).scalar()
    assert read == written and read.tzinfo == dt.UTC
    assert read.hour == 3, "stored as the UTC wall time, not Paris'"
    assert matched == 1


def test_rows_written_before_the_type_read_as_utc(engine):
    # what earlier releases did: a plain DateTime(timezone=True) column written with aware UTC
    meta, old = _table(sa.DateTime(timezone=True))
    meta.create_all(engine)
    written = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    with engine.begin() as conn:
        conn.execute(old.insert().values(id=1, at=written))
    _, new = _table(UTCDateTime)
    with engine.connect() as conn:
        assert conn.execute(sa.select(new.c.at)).scalar_one() == written


def test_a_naive_time_is_refused_and_nothing_is_written(engine):
    meta, table = _table(UTCDateTime)
    meta.create_all(engine)
    with pytest.raises(sa.exc.StatementError, match="must be a timezone-aware datetime"), engine.begin() as conn:
        conn.execute(table.insert().values(id=1, at=dt.datetime(2026, 1, 1)))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://x/y"])
def test_a_bad_store_url_gets_one_clear_error(url):
    with pytest.raises(DistmlError, match=r"is not a valid SQLAlchemy URL \(expected e.g. sqlite:///"):
        create_engine(url)
