"""Tests for the throwaway PostgreSQL helper in tests/pg_server.py."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pg_server
from pg_server import PostgresServer, find_pg_bin

needs_postgres = pytest.mark.skipif(
    find_pg_bin() is None and not os.environ.get("DISTML_REQUIRE_POSTGRES"),
    reason="PostgreSQL server binaries not installed (see scripts/ensure-postgres.sh)",
)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@needs_postgres
def test_server_roundtrip_and_teardown() -> None:
    with PostgresServer() as server:
        port = server.port
        tmpdir = server.tmpdir
        assert port is not None and tmpdir is not None
        assert server.url == f"postgresql+psycopg://distml@127.0.0.1:{port}/distml_test"

        engine = sa.create_engine(server.url)
        try:
            with engine.begin() as conn:
                assert conn.execute(sa.text("select current_database()")).scalar() == "distml_test"
                conn.execute(sa.text("create table t (id int primary key, name text not null)"))
                conn.execute(
                    sa.text("insert into t (id, name) values (:id, :name)"),
                    [{"id": 1, "name": "alpha"}, {"id": 2, "name": "β"}],
                )
            with engine.connect() as conn:
                rows = conn.execute(sa.text("select id, name from t order by id")).all()
            assert [tuple(r) for r in rows] == [(1, "alpha"), (2, "β")]
        finally:
            engine.dispose()
        assert _accepts_connections(port)

    assert not _accepts_connections(port)
    assert not tmpdir.exists()
    assert server.tmpdir is None


def test_url_requires_running_server(tmp_path: Path) -> None:
    # needs no PostgreSQL: a server that was never started (given any bin_dir) has no URL yet
    with pytest.raises(RuntimeError, match="PostgresServer is not running"):
        _ = PostgresServer(bin_dir=tmp_path).url


@needs_postgres
def test_a_port_taken_before_the_server_binds_it_costs_a_retry(monkeypatch) -> None:
    """Another process (the other xdist worker's server) takes the port chosen for the server
    before it binds it: the start goes on with another port instead of failing the session."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        lost = taken.getsockname()[1]
        choices = iter([lost])
        free_port = pg_server._free_port
        monkeypatch.setattr(pg_server, "_free_port", lambda: next(choices, None) or free_port())
        with PostgresServer() as server:
            assert server.ports_tried[0] == lost and len(server.ports_tried) == 2, server.ports_tried
            assert server.port == server.ports_tried[-1] != lost
            assert "Address already in use" in server.log_file.read_text()
            engine = sa.create_engine(server.url)
            try:
                with engine.connect() as conn:
                    assert conn.execute(sa.text("select current_database()")).scalar() == "distml_test"
            finally:
                engine.dispose()
