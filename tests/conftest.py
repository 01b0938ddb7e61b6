"""Shared fixtures: a fresh workspace per test and one private PostgreSQL server per session."""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
from pg_server import PostgresServer, find_pg_bin


@pytest.fixture
def workspace(tmp_path):
    from distml.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    yield ws
    ws.close()


@pytest.fixture(scope="session")
def postgres_url():
    if find_pg_bin() is None:
        message = "PostgreSQL server binaries not found (run scripts/ensure-postgres.sh)"
        if os.environ.get("DISTML_REQUIRE_POSTGRES"):
            pytest.fail(message + "; DISTML_REQUIRE_POSTGRES is set, so this is an error")
        pytest.skip(message)
    with PostgresServer() as server:
        yield server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """A metadata store of the test's own: None (the workspace's SQLite file) or the URL of a new
    PostgreSQL database on the session's server, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    server_url = sa.engine.make_url(request.getfixturevalue("postgres_url"))
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
