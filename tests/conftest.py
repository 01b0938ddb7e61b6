"""Shared fixtures: a fresh workspace per test and one private PostgreSQL server per session."""

from __future__ import annotations

import os

import pytest
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
