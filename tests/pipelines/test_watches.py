"""The watches store: a cycle's claim whose commit succeeded but whose answer was lost (the
connection dropped right after COMMIT) is rerun by `in_transaction` and returns the cycle it
claimed, instead of None with the cycle left "running" until the watch restarts. And how a watch
follows its folder: an arrival is seen through the folder's filesystem event (no poll could have
seen it before the test's timeout) and its cycle runs; where events cannot be trusted (a network
mount) the folder is polled instead.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
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


# -- how a watch follows its folder: filesystem events, or polling where there are none -----------

STAND_IN_CYCLE = textwrap.dedent(
    """
    from distml.workflow import step


    @step
    def judge(watch: dict, train_files: list[str]) -> dict:
        evaluation = {"candidate": {"holdout": 0.5}, "production": None}
        return {"action": "kept", "model": f"{watch['name']}:1", "reason": "a stand-in", "evaluation": evaluation}


    def cycle(watch, cycle, train_files, newest_files, production=None):
        return judge(watch, train_files)
    """
)


def _digits_wave(path: Path) -> None:
    """A small wave of digits, arriving as a producer should: written under a hidden name, then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distml.data.datasets import _read_bundled_digits

    images, labels = _read_bundled_digits()
    flat = pa.array(list(images[:50].reshape(50, 64)), type=pa.list_(pa.uint8()))
    hidden = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table({"image": flat, "label": labels[:50]}), hidden)
    os.replace(hidden, path)


def _wait_until(predicate) -> None:
    """Until `predicate()` holds; the test's timeout ends a wait that never does."""
    while not predicate():
        time.sleep(0.02)


def _watch_one_cycle(workspace: Workspace, tmp_path: Path, monkeypatch, **settings) -> tuple[list[str], int]:
    """A watch (the stand-in cycle: no training) over an empty inbox; a wave arrives once the watch
    has looked at the inbox twice (its first look, then its ingest loop's). Returns what the watch
    said and how many looks it took; returns once the wave's cycle has run."""
    from distml.pipelines import continuous

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (tmp_path / "stand_in_cycle.py").write_text(STAND_IN_CYCLE)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cycle file's folder is put on it
    monkeypatch.setattr(continuous, "CYCLE_TARGET", f"{tmp_path / 'stand_in_cycle.py'}:cycle")
    monkeypatch.setattr(continuous, "CYCLE_MODULE", "json")
    monkeypatch.setattr(continuous, "CYCLE_PRELOAD", ())  # no torch: the stand-in needs none
    values = {"name": "w", "source": str(inbox), "workspace": str(workspace.root), "max_cycles": 1, **settings}
    said: list[str] = []
    watcher = continuous.Watcher(workspace, continuous.parse_watch_config(values), say=said.append)
    looks, poll = [], watcher.source.poll

    def counted_poll(known):
        looks.append(1)
        return poll(known)

    monkeypatch.setattr(watcher.source, "poll", counted_poll)

    def arrive() -> None:
        _wait_until(lambda: len(looks) >= 2)  # the watch's first look, then its ingest loop's
        _digits_wave(inbox / "wave1.parquet")

    threading.Thread(target=arrive, daemon=True).start()
    watcher.run()  # in the main thread (its cycles' workflow runs handle signals); ends after one cycle
    assert watcher.cycles_done == 1, said
    rows = watch_store.list_cycles(workspace.engine, "w")
    assert [(c.cycle, c.status) for c in rows] == [(1, "kept")], said
    assert [(a.key, a.cycle) for a in watch_store.list_arrivals(workspace.engine, "w")] == [("wave1.parquet", 1)]
    return said, len(looks)


@pytest.mark.timeout(120)
def test_an_arrival_is_seen_through_a_filesystem_event_and_its_cycle_starts(workspace, tmp_path, monkeypatch):
    from distml.pipelines import continuous

    # The fallback poll an hour away, the claim loop's wait a minute: only the folder's event (and
    # the arrival it records) can start the cycle before the test's timeout.
    monkeypatch.setattr(continuous, "EVENT_POLL_S", 3600.0)
    said, _ = _watch_one_cycle(workspace, tmp_path, monkeypatch, poll_s=60)
    assert "filesystem events (" in said[0], said[0]  # the log says how the folder is followed
    assert any(line == "arrived wave1.parquet: 50 records" for line in said), said


@pytest.mark.timeout(120)
def test_a_folder_without_trustworthy_events_is_polled(workspace, tmp_path, monkeypatch):
    from distml.data import arrivals
    from distml.pipelines import continuous

    monkeypatch.setattr(continuous, "EVENT_POLL_S", 3600.0)  # the event path's fallback poll would never come
    monkeypatch.setattr(arrivals, "filesystem_type", lambda path: "nfs4")  # as on a network mount
    said, looks = _watch_one_cycle(workspace, tmp_path, monkeypatch, poll_s=0.05)
    why = "a nfs4 filesystem, whose changes from other machines send no events"
    assert said[0].endswith(f"polling every 0.05 s ({why})"), said[0]
    assert looks >= 4  # two before the wave, two to see it and see it hold still


def test_filesystem_type_is_the_longest_mount_point_above_the_path(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\nserver:/export /mnt/data nfs4 rw 0 0\n//nas/share /mnt/data/my\\040share cifs rw 0 0\n"
    )
    from distml.data.arrivals import filesystem_type

    assert filesystem_type("/mnt/data/inbox", mounts) == "nfs4"
    assert filesystem_type("/mnt/data", mounts) == "nfs4"
    assert filesystem_type("/mnt/data/my share/inbox", mounts) == "cifs"
    assert filesystem_type("/mnt/database/x", mounts) == "ext4"  # not /mnt/data's: a prefix of the name only
    assert filesystem_type("/srv/inbox", mounts) == "ext4"
    assert filesystem_type("/srv/inbox", tmp_path / "no-such-file") is None


def test_a_file_written_in_place_counts_once_it_held_still_between_two_looks(tmp_path):
    """What the watch's ingest loop waits on: a file seen for the first time is looked at again soon
    (renamed in, it is complete); one seen changing (written in place), only after a poll interval."""
    from distml.data.arrivals import FolderArrivals

    source = FolderArrivals(tmp_path)
    wave = tmp_path / "wave.parquet"
    wave.write_bytes(b"PAR1 the first rows")
    assert source.poll(set()) == [] and (source.unsettled, source.changing) == (["wave.parquet"], [])
    with wave.open("ab") as handle:  # its writer goes on
        handle.write(b" and more rows")
    assert source.poll(set()) == [] and (source.unsettled, source.changing) == (["wave.parquet"], ["wave.parquet"])
    assert [a.key for a in source.poll(set())] == ["wave.parquet"]  # held still since the last look
    assert (source.unsettled, source.changing) == ([], [])
    assert source.poll({"wave.parquet"}) == []  # known: not offered again
