"""Shared fixtures: a fresh workspace per test, one private PostgreSQL server per session, and an
environment free of the user's distml settings; and how the suite runs on two pytest-xdist workers:
every `heavy` test (it trains or serves a real model) in one group, each light test on its own."""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
from digits_pipeline import SERVICE, run_digits_pipeline
from pg_server import PostgresServer, find_pg_bin

# A hang costs this much, not the whole run: tests not marked slow get the short limit.
LIGHT_TIMEOUT_S, SLOW_TIMEOUT_S = 30, 240


def pytest_itemcollected(item):
    """The tests of each `heavy` group run one after another on one xdist worker (two 2-rank
    trainings at once would share 2 cores and each would run at half speed); every test gets a
    timeout unless it sets its own. Marked as each test is collected: xdist names the groups in
    its own collection hook, which runs first."""
    heavy = item.get_closest_marker("heavy")
    if heavy:
        item.add_marker(pytest.mark.xdist_group(f"heavy-{heavy.args[0] if heavy.args else 'training'}"))
    if item.get_closest_marker("timeout") is None:
        slow = item.get_closest_marker("slow") is not None
        item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S if slow else LIGHT_TIMEOUT_S))


@pytest.fixture(scope="session", autouse=True)
def _no_ambient_distml_settings():
    """A DISTML_DB_URL or DISTML_HOME in the shell would redirect every test's workspace (and its
    child processes') to the user's store; tests that want one set it themselves. Session-wide and
    autouse, so it is in place before the session's fixtures (trained models, servers) start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("DISTML_DB_URL", raising=False)
        patch.delenv("DISTML_HOME", raising=False)
        yield


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


@pytest.fixture(scope="session")
def digits_pipeline(tmp_path_factory):
    """The end-to-end pipeline run once (tests/digits_pipeline.py); its service stopped at the end."""
    from distml.serve.service import stop_service

    pipeline = run_digits_pipeline(tmp_path_factory.mktemp("digits-pipeline") / "ws")
    yield pipeline
    stop_service(pipeline.ws, SERVICE)
    pipeline.ws.close()
