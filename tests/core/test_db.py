"""The floor's database helpers: times come back aware in UTC on SQLite and PostgreSQL alike,
rows written before `UTCDateTime` read the same, and a bad URL gets one clear error; a store that
goes away (restarted, a dropped connection, SQLite locked) is waited for, up to a limit."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from distml.core import db
from distml.core.db import StoreUnavailable, UTCDateTime, create_engine, fetch_all, in_transaction
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


# -- a store that goes away: connecting waits, a transaction runs again, past the wait it stops ----


@pytest.fixture
def own_postgres():
    """A private server of the test's own, which it may halt and restart (the session's is shared)."""
    from pg_server import PostgresServer, find_pg_bin

    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not found")
    with PostgresServer() as server:
        yield server


def _counter(engine) -> sa.Table:
    meta = sa.MetaData()
    table = sa.Table("writes", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("n", sa.Integer))
    meta.create_all(engine)
    return table


def test_work_waits_for_a_restarting_store_and_says_so_once(own_postgres, caplog):
    engine = create_engine(own_postgres.url, wait_s=30)
    table = _counter(engine)
    in_transaction(engine, lambda conn: conn.execute(table.insert().values(n=0)))  # a pooled connection
    own_postgres.halt()
    threading.Timer(2.0, own_postgres.restart).start()
    with caplog.at_level(logging.WARNING, logger="distml.store"):
        for n in range(1, 4):
            in_transaction(engine, lambda conn, n=n: conn.execute(table.insert().values(n=n)))
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(table.c.n)).scalars()) == [0, 1, 2, 3], "each write once"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0] and "retrying for up to 30 s" in lines[0], lines
    assert "is back after" in lines[1], lines
    engine.dispose()


def test_a_transaction_whose_connection_the_server_dropped_runs_again_once(own_postgres):
    engine = create_engine(own_postgres.url, wait_s=30)
    table = _counter(engine)
    admin = sa.create_engine(own_postgres.url, isolation_level="AUTOCOMMIT")
    tries = []

    def work(conn: sa.Connection) -> None:
        tries.append(1)
        conn.execute(table.insert().values(n=len(tries)))
        if len(tries) == 1:  # the server drops this connection mid-transaction
            pid = conn.execute(sa.select(sa.func.pg_backend_pid())).scalar()
            with admin.connect() as other:
                other.execute(sa.select(sa.func.pg_terminate_backend(pid)))
            conn.execute(table.insert().values(n=-1))

    in_transaction(engine, work)
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(table.c.n)).scalars()) == [2], "the second try only, once"
    assert len(tries) == 2
    admin.dispose()
    engine.dispose()


def test_a_store_away_past_the_wait_stops_the_work_with_one_clear_error(own_postgres, caplog, monkeypatch):
    engine = create_engine(own_postgres.url, wait_s=1.5)
    table = _counter(engine)
    own_postgres.halt()
    waits, wait = [], db._Outage.wait

    def counted(self, exc, attempt):
        waits.append(attempt)
        return wait(self, exc, attempt)

    monkeypatch.setattr(db._Outage, "wait", counted)
    with (
        caplog.at_level(logging.WARNING, logger="distml.store"),
        pytest.raises(StoreUnavailable, match=r"unreachable for 1.5 s .*resumable once the store is back"),
    ):
        in_transaction(engine, lambda conn: conn.execute(table.insert().values(n=1)))
    lines = [r.getMessage() for r in caplog.records]  # it waited (and said so) before it gave up
    assert len(lines) == 1 and "retrying for up to 1.5 s" in lines[0], lines
    assert len(waits) > 1, "it tried again before it gave up"
    own_postgres.restart()
    engine.dispose()


def test_sqlite_locked_longer_than_its_busy_timeout_is_waited_for(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(db, "SQLITE_BUSY_MS", 100)  # one statement gives up after 0.1 s; the work does not
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", wait_s=30)
    table = _counter(engine)
    holder = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.0, holder.commit).start()
    with caplog.at_level(logging.WARNING, logger="distml.store"):
        in_transaction(engine, lambda conn: conn.execute(table.insert().values(n=1)))
    assert fetch_all(engine, sa.select(table.c.n), lambda n: n) == [1]
    lines = [r.getMessage() for r in caplog.records]  # what the wait was for, not "unreachable"
    assert len(lines) == 2 and "locked by another writer (database is locked); retrying" in lines[0], lines
    holder.close()
    engine.dispose()


def test_two_transactions_that_deadlock_on_postgresql_both_end_written_once(postgres_url):
    """Two writers lock the same two rows in opposite orders: PostgreSQL rolls one back with
    `deadlock detected`; it runs again and both writes land, each once."""
    engine = create_engine(postgres_url, wait_s=30)
    table = _counter(engine)
    with engine.begin() as conn:
        conn.execute(sa.delete(table))
        conn.execute(table.insert(), [{"id": 1, "n": 0}, {"id": 2, "n": 0}])
    both_hold_one = threading.Barrier(2, timeout=30)
    tries = {"a": 0, "b": 0}
    errors: list[BaseException] = []

    def writer(name: str, first: int, second: int) -> None:
        def work(conn: sa.Connection) -> None:
            tries[name] += 1
            conn.execute(table.update().where(table.c.id == first).values(n=table.c.n + 1))
            if tries[name] == 1:
                both_hold_one.wait()  # each holds its first row: the second update closes the cycle
            conn.execute(table.update().where(table.c.id == second).values(n=table.c.n + 1))

        try:
            in_transaction(engine, work)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=args) for args in (("a", 1, 2), ("b", 2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(table.c.n)).scalars()) == [2, 2], "each write once"
    assert sorted(tries.values()) == [1, 2]  # one was rolled back and ran again
    engine.dispose()


WRITER = """
import sys
from distml.core import db
from distml.workflow import store

db.SQLITE_BUSY_MS = 1  # one statement gives up at once: every lock it meets is a "database is locked"
engine = db.create_engine(sys.argv[1], wait_s=60)
for i in range(int(sys.argv[3])):
    store.record_step_metrics(engine, "run", sys.argv[2], [{"name": "loss", "value": float(i), "step": i}])
"""


def test_many_writer_processes_on_one_sqlite_store_all_land_each_row_once(tmp_path):
    """Six processes record step metrics into one SQLite store while another connection takes its
    write lock again and again: each lock they meet is waited out and retried, no process dies of
    `database is locked`, and every row is there once."""
    from distml.workflow import store as workflow_store

    url = f"sqlite:///{tmp_path / 'distml.db'}"
    engine = create_engine(url)
    db.migrate(engine)
    writers, rows = 6, 20
    holder = sqlite3.connect(tmp_path / "distml.db", isolation_level=None, check_same_thread=False)
    done = threading.Event()

    def hold_the_lock() -> None:
        while not done.is_set():
            holder.execute("BEGIN IMMEDIATE")
            done.wait(0.03)
            holder.execute("COMMIT")
            done.wait(0.05)

    locker = threading.Thread(target=hold_the_lock)
    locker.start()
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, url, f"w{n}", str(rows)], stderr=subprocess.PIPE, text=True)
            for n in range(writers)
        ]
        errors = [(p.wait(120), p.stderr.read()) for p in procs]
    finally:
        done.set()
        locker.join()
        holder.close()
    assert [rc for rc, _ in errors] == [0] * writers, "\n".join(err[-600:] for _, err in errors if err)
    metrics = workflow_store.list_step_metrics(engine, "run")
    by_writer = {f"w{n}": sorted(m.step for m in metrics if m.node_id == f"w{n}") for n in range(writers)}
    assert by_writer == {f"w{n}": list(range(rows)) for n in range(writers)}, "every row once"
    engine.dispose()
