"""Bad data waves, each kind through the watch's own acceptance (`Watcher.ingest_once`): rejected and
recorded with a reason that names what is wrong, nothing snapshotted for training, and the next good
wave accepted as if nothing had happened.

Corrupt, truncated and empty files (Parquet and NumPy), the wrong columns, shape or types, labels out
of range, NaN and infinite pixels, a wave over the size bound, a file that vanishes between the
listing and the read, and a wave that repeats one already accepted. A real `distml watch` over bad
and good waves is tests/pipelines/test_continuous.py (it trains, so it is one run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distml.pipelines import watches as watch_store
from distml.pipelines.continuous import Watcher, parse_watch_config

NAME = "waves"


def digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, (n, 64)).astype(np.uint8), rng.integers(0, 10, n)


def parquet(path: Path, image, label, image_type=pa.uint8()) -> None:
    columns = {"image": pa.array(list(image), type=pa.list_(image_type)), "label": label}
    pq.write_table(pa.table(columns), path)


def good(path: Path, seed: int = 0) -> None:
    parquet(path, *digits(6, seed))


def truncated(path: Path, writer: Callable[[Path], None]) -> None:
    writer(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def npz(path: Path, **arrays) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def with_pixels(value: float) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        image, label = digits(4, 1)
        image = image.astype(np.float32)
        image[2, 5] = value
        parquet(path, image, label, pa.float32())

    return write


image, label = digits(4, 1)
# (file name, how to write it, what the reason must say)
BAD: list[tuple[str, Callable[[Path], None], str]] = [
    ("corrupt.parquet", lambda p: p.write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1"), "cannot read corrupt.parquet"),
    ("truncated.parquet", lambda p: truncated(p, good), "cannot read truncated.parquet"),
    ("truncated.npz", lambda p: truncated(p, lambda q: npz(q, image=image, label=label)), "cannot read truncated.npz"),
    ("empty.parquet", lambda p: p.write_bytes(b""), "cannot read empty.parquet"),
    ("empty.npz", lambda p: p.write_bytes(b""), "cannot read empty.npz"),
    ("no-rows.parquet", lambda p: parquet(p, image[:0], label[:0]), "no records"),
    ("no-label.npz", lambda p: npz(p, image=image), "no column 'label'"),
    ("wrong-shape.npz", lambda p: npz(p, image=np.zeros((4, 7, 7)), label=label), "images of shape 7x7"),
    ("labels-out-of-range.parquet", lambda p: parquet(p, image, [0, 3, 12, 1]), "1 label(s) out of range (e.g. 12"),
    ("negative-label.npz", lambda p: npz(p, image=image, label=np.array([0, -1, 2, 3])), "out of range"),
    (
        "fractional-label.npz",
        lambda p: npz(p, image=image, label=np.array([0, 1.5, 2, 3])),
        "labels that are not whole",
    ),
    ("string-labels.npz", lambda p: npz(p, image=image, label=np.array(["a"] * 4)), "labels of type <U1"),
    ("string-pixels.npz", lambda p: npz(p, image=np.full((4, 64), "x"), label=label), "image pixels of type <U1"),
    ("nan-pixels.parquet", with_pixels(float("nan")), "NaN or infinite"),
    ("inf-pixels.parquet", with_pixels(float("inf")), "NaN or infinite"),
    ("big-pixels.parquet", with_pixels(300.0), "pixels from 0 to 300"),
    ("huge.parquet", lambda p: parquet(p, *digits(4000, 2)), "expected at most 4096 bytes per arrival"),
    ("vanishes.parquet", good, "cannot read vanishes.parquet"),
    ("repeat.parquet", lambda p: good(p, seed=7), "the same records as first.parquet"),
]


@pytest.fixture
def watcher(workspace, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = parse_watch_config({"name": NAME, "source": str(inbox), "workspace": str(workspace.root)})
    said: list[str] = []
    watcher = Watcher(workspace, config, say=said.append)
    watcher.source.max_bytes = 4096  # "huge" at test scale; every other wave here is far smaller
    return watcher, inbox, said


def ingest(watcher: Watcher) -> None:
    """Two polls: a file is offered once it held still for one."""
    watcher.ingest_once()
    watcher.ingest_once()


@pytest.mark.parametrize(("name", "write", "reason"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_wave_is_rejected_with_its_reason_and_the_next_good_one_is_accepted(watcher, name, write, reason):
    watcher, inbox, said = watcher
    if name == "repeat.parquet":  # the same records as a wave already accepted
        good(inbox / "first.parquet", seed=7)
        ingest(watcher)
    write(inbox / name)
    if name == "vanishes.parquet":  # listed by the poll, gone before it is read
        poll = watcher.source.poll

        def poll_then_vanish(known):
            arrivals = poll(known)
            for arrival in arrivals:
                (inbox / arrival.key).unlink()
            return arrivals

        watcher.source.poll = poll_then_vanish
    ingest(watcher)
    watcher.source.poll = type(watcher.source).poll.__get__(watcher.source)
    snapshots = set(watcher.snapshots.glob("*")) if watcher.snapshots.exists() else set()

    (row,) = [a for a in watch_store.list_arrivals(watcher.engine, NAME) if a.key == name]
    assert row.status == "rejected" and reason in row.reason, row.reason
    assert row.snapshot is None and row.fingerprint is None  # nothing of it to train on
    assert any(line.startswith(f"rejected {name}: ") for line in said), said
    pending = [a for a in watch_store.list_arrivals(watcher.engine, NAME) if a.status == "pending"]
    assert [a.key for a in pending] == (["first.parquet"] if name == "repeat.parquet" else [])

    good(inbox / "next.parquet", seed=3)
    ingest(watcher)
    (accepted,) = [a for a in watch_store.list_arrivals(watcher.engine, NAME) if a.key == "next.parquet"]
    assert accepted.status == "pending" and accepted.num_records == 6 and accepted.reason is None
    assert Path(accepted.snapshot).exists() and Path(accepted.snapshot) not in snapshots
    # the bad wave is never offered again (a producer fixes it under a new name)
    ingest(watcher)
    assert [a.key for a in watch_store.list_arrivals(watcher.engine, NAME)].count(name) == 1


def test_files_of_other_formats_are_not_waves(watcher):
    watcher, inbox, said = watcher
    (inbox / "wave.csv").write_text("image,label\n1,2,3\n4,")  # truncated CSV: not a format the watch reads
    (inbox / "notes.txt").write_text("hello")
    ingest(watcher)
    assert watch_store.list_arrivals(watcher.engine, NAME) == [] and said == []
