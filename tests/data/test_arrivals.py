"""Arriving data: what a folder or a table offers as new, and what a batch must hold to be trained on.

Folders: files count once they held still for a poll, partitions once complete, in-progress names
never. Tables: rows above the watermark, once each. Bad batches: one clear reason each.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from distml.core.errors import DistmlError
from distml.data.arrivals import BadBatch, FolderArrivals, Schema, TableArrivals, open_source, validate, write_snapshot
from distml.data.sources import NpzSource

SCHEMA = Schema(image_shape=(8, 8), pixel_range=(0.0, 16.0), num_classes=10)


def batch(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, (n, 8, 8)).astype(np.uint8), rng.integers(0, 10, n)


def write_parquet(path, image: np.ndarray, label: np.ndarray) -> None:
    flat = image.reshape(len(image), -1)
    pq.write_table(pa.table({"image": pa.array(list(flat), type=pa.list_(pa.uint8())), "label": label}), path)


def test_validate_accepts_flat_nested_and_blob_images():
    image, label = batch()
    for given in (image, image.reshape(5, 64), np.array([im.tobytes() for im in image], dtype=object)):
        got_image, got_label = validate({"image": given, "label": label}, SCHEMA)
        assert got_image.shape == (5, 8, 8) and got_image.dtype == np.uint8 and (got_image == image).all()
        assert got_label.dtype == np.int64 and (got_label == label).all()


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"image": np.zeros((3, 8, 8))}, "no column 'label'"),
        ({"image": np.zeros((3, 7, 7)), "label": np.zeros(3)}, "images of shape 7x7; expected 8x8"),
        ({"image": np.zeros((3, 8, 8)), "label": np.array([0, 10, 3])}, "1 label(s) out of range (e.g. 10 at row 1)"),
        ({"image": np.zeros((3, 8, 8)), "label": np.array([0, -1, 3])}, "expected integers in [0, 10)"),
        ({"image": np.full((3, 8, 8), 17), "label": np.zeros(3)}, "pixels from 17 to 17; expected [0, 16]"),
        ({"image": np.full((3, 8, 8), 0.5), "label": np.zeros(3)}, "not whole numbers"),
        ({"image": np.zeros((0, 8, 8)), "label": np.zeros(0)}, "no records"),
        ({"image": np.zeros((2, 8, 8)), "label": np.zeros(3)}, "2 images but 3 labels"),
        ({"image": np.array([b"ab", b"cd"], dtype=object), "label": np.zeros(2)}, "expected 64 bytes"),
        ({"image": np.zeros((2, 8, 8)), "label": np.array(["a", "b"], dtype=object)}, "labels of type object"),
    ],
)
def test_validate_names_what_is_wrong(columns, expected):
    with pytest.raises(BadBatch) as exc:
        validate(columns, SCHEMA)
    assert expected in str(exc.value)


def test_snapshots_are_named_by_content_and_written_once(tmp_path):
    image, label = batch()
    path, fingerprint = write_snapshot(tmp_path, image, label)
    again, same = write_snapshot(tmp_path, image, label)
    assert (again, same) == (path, fingerprint)
    source = NpzSource(path)
    assert (source.columns["image"] == image).all() and fingerprint == source.fingerprint()
    assert write_snapshot(tmp_path, *batch(seed=1))[1] != fingerprint


def test_folder_offers_settled_files_and_complete_partitions_oldest_first(tmp_path):
    folder = FolderArrivals(tmp_path)
    write_parquet(tmp_path / "b.parquet", *batch())
    np.savez(tmp_path / "a.npz", image=batch()[0], label=batch()[1])
    os.utime(tmp_path / "a.npz", (time.time() - 10, time.time() - 10))
    write_parquet(tmp_path / ".c.parquet.tmp", *batch())  # still being written: never
    (tmp_path / "_staging").mkdir()
    (tmp_path / "part=1").mkdir()
    write_parquet(tmp_path / "part=1" / "x.parquet", *batch(3))
    write_parquet(tmp_path / "part=1" / "y.parquet", *batch(4))
    assert folder.poll(set()) == []  # nothing has held still yet; the partition has no marker
    first = folder.poll(set())
    assert [a.key for a in first] == ["a.npz", "b.parquet"]
    assert (first[1].read()["label"] == batch()[1]).all()
    (tmp_path / "part=1" / "_SUCCESS").touch()
    second = folder.poll({"a.npz", "b.parquet"})
    assert [a.key for a in second] == ["part=1/"]
    assert len(second[0].read()["label"]) == 7
    write_parquet(tmp_path / "b.parquet", *batch(6))  # changed since the last poll: wait again
    assert folder.poll({"a.npz", "part=1/"}) == []


def test_a_corrupt_file_is_a_bad_batch(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    folder = FolderArrivals(tmp_path)
    folder.poll(set())
    (arrival,) = folder.poll(set())
    with pytest.raises(BadBatch, match="cannot read broken.parquet"):
        arrival.read()


def test_table_offers_rows_above_the_watermark_once(tmp_path, db_url):
    url = db_url or f"sqlite:///{tmp_path / 'data.db'}"
    engine = sa.create_engine(url)
    rows = sa.Table(
        "digits",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image", sa.LargeBinary),
        sa.Column("label", sa.Integer),
    )
    rows.create(engine)
    image, label = batch(6)

    def insert(lo: int, hi: int) -> None:
        with engine.begin() as conn:
            values = [{"id": i + 1, "image": image[i].tobytes(), "label": int(label[i])} for i in range(lo, hi)]
            conn.execute(rows.insert(), values)

    table = TableArrivals(url, "digits", "id")
    assert table.poll(None) == []
    insert(0, 4)
    (first,) = table.poll(None)
    assert first.key == "digits.id in (-inf, 4]" and first.watermark == "4"
    got, _ = validate(first.read(), SCHEMA)
    assert (got == image[:4]).all()
    assert table.poll(first.watermark) == []
    insert(4, 6)
    (second,) = table.poll(first.watermark)
    assert second.key == "digits.id in (4, 6]"
    assert (validate(second.read(), SCHEMA)[1] == label[4:]).all()


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(DistmlError, match="is not a folder"):
        open_source(str(tmp_path / "missing"), None, None)
    with pytest.raises(DistmlError, match="needs --table T and --order-column C"):
        open_source(f"sqlite:///{tmp_path / 'x.db'}", None, None)
    with pytest.raises(DistmlError, match="apply to a SQL --source"):
        open_source(str(tmp_path), "t", "id")
    sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}").connect().close()
    with pytest.raises(DistmlError, match="table 'nope' does not exist"):
        open_source(f"sqlite:///{tmp_path / 'x.db'}", "nope", "id")
