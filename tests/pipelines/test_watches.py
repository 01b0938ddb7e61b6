"""The watches store: a cycle's claim whose commit succeeded but whose answer was lost (the
connection dropped right after COMMIT) is rerun by `in_transaction` and returns the cycle it
claimed, instead of None with the cycle left "running" until the watch restarts."""

from __future__ import annotations

import sqlalchemy as sa

from distml.pipelines import watches as watch_store
from distml.workspace import Workspace


def _lose_the_next_commits_answer(engine: sa.Engine) -> list[int]:
    """The next COMMIT reaches the store, then its connection reports the store gone away."""
    lost: list[int] = []

    def commit(conn: sa.Connection) -> None:
        if lost:
            return
        lost.append(1)
        conn.connection.dbapi_connection.commit()  # it is stored...
        orig = Exception("server closed the connection unexpectedly")  # ...and the reply never comes
        raise sa.exc.OperationalError("COMMIT", None, orig, connection_invalidated=True)

    sa.event.listen(engine, "commit", commit)
    return lost


def test_a_claim_whose_commit_answer_was_lost_returns_the_cycle_it_claimed(tmp_path):
    ws = Workspace(tmp_path / "ws")
    engine = ws.engine
    try:
        watch_store.save_watch(engine, "w")
        for key in ("a.parquet", "b.parquet"):
            watch_store.record_arrival(engine, "w", key, status="pending", snapshot=f"/s/{key}", num_records=3)
        lost = _lose_the_next_commits_answer(engine)

        claimed = watch_store.claim_cycle(engine, "w", "w:1")

        assert lost == [1], "the first commit's answer was lost"
        assert claimed is not None, "the rerun found the cycle its lost commit claimed"
        number, arrivals = claimed
        assert number == 1 and [a.key for a in arrivals] == ["a.parquet", "b.parquet"]
        rows = watch_store.list_cycles(engine, "w")
        assert [(c.cycle, c.status, c.production) for c in rows] == [(1, "running", "w:1")], "claimed once"
        assert {(a.status, a.cycle) for a in watch_store.list_arrivals(engine, "w")} == {("claimed", 1)}
        assert watch_store.claim_cycle(engine, "w", "w:1") is None, "nothing pending is claimed again"
    finally:
        ws.close()


def test_a_running_cycle_left_by_another_claim_is_not_taken_for_this_one(tmp_path):
    ws = Workspace(tmp_path / "ws")
    engine = ws.engine
    try:
        watch_store.save_watch(engine, "w")
        watch_store.record_arrival(engine, "w", "a.parquet", status="pending", snapshot="/s/a", num_records=3)
        assert watch_store.claim_cycle(engine, "w", None)[0] == 1  # left running (a killed watch's)
        watch_store.record_arrival(engine, "w", "b.parquet", status="pending", snapshot="/s/b", num_records=3)
        number, arrivals = watch_store.claim_cycle(engine, "w", None)
        assert number == 2 and [a.key for a in arrivals] == ["b.parquet"]
        assert watch_store.claim_cycle(engine, "w", None) is None
    finally:
        ws.close()
