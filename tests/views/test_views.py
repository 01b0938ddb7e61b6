"""The reads that views (distml top, the CLI, a web UI) need, each one query whatever the number
of rows, returning typed rows; on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib

import pytest
import sqlalchemy as sa

from distml.train import store as train_store
from distml.workspace import Workspace


@contextlib.contextmanager
def counted(engine: sa.Engine):
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def _step(step: int, loss: float) -> dict:
    return {"step": step, "epoch": 0, "loss": loss, "samples_per_s": 100.0 * step, "step_seconds": 0.01}


@pytest.fixture
def ws(db_url, tmp_path):
    ws = Workspace(tmp_path / "ws", db_url)
    yield ws
    ws.close()


def test_training_runs_with_their_latest_step_in_one_query(ws):
    for index in range(12):
        train_store.record_train_run(ws.engine, f"run-{index}", {"model": "cnn", "index": index}, status="running")
        train_store.record_train_steps(ws.engine, f"run-{index}", [_step(s, 1.0 / s) for s in range(1, index + 2)])
    train_store.record_train_run(ws.engine, "done", {"model": "mlp"}, status="complete")
    train_store.record_train_run(ws.engine, "fresh", {"model": "mlp"}, status="running")  # no step recorded yet
    with counted(ws.engine) as statements:
        rows = train_store.list_training_runs(ws.engine)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1, statements
    by_id = {row.run_id: row for row in rows}
    assert set(by_id) == {*(f"run-{i}" for i in range(12)), "fresh"}, "complete runs only when asked for"
    assert (by_id["run-7"].step, by_id["run-7"].loss, by_id["run-7"].samples_per_s) == (8, 1.0 / 8, 800.0)
    assert by_id["run-7"].config == {"model": "cnn", "index": 7} and by_id["run-7"].recorded_at.tzinfo is not None
    assert (by_id["fresh"].step, by_id["fresh"].recorded_at) == (None, None)
    assert [row.run_id for row in train_store.list_training_runs(ws.engine, include=["done"], limit=50)].count(
        "done"
    ) == 1
    assert len(train_store.list_training_runs(ws.engine, limit=5)) == 5
