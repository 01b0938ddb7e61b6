"""Sources read real files and databases: IDX, NPZ, Parquet, CSV, SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from distml.core.errors import DistmlError
from distml.data import (
    ArraySource,
    CsvSource,
    DecodeBytes,
    IdxSource,
    Loader,
    NpzSource,
    ParquetSource,
    Source,
    SqlSource,
)
from distml.data.idx import MAGIC_IMAGES, read_idx, write_idx


def all_records(source: Source) -> dict[str, np.ndarray]:
    chunks = list(source.iter_chunks(0))
    assert [len(next(iter(c.values()))) for c in chunks] == source.chunk_sizes()
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


# -- IDX -------------------------------------------------------------------------------------


@pytest.fixture
def idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab.gz", labels)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lab", labels)
    return tmp_path, images, labels


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_roundtrip(idx_files, suffix):
    folder, images, labels = idx_files
    source = IdxSource(folder / f"img{suffix}", folder / f"lab{suffix}", chunk_rows=16)
    data = all_records(source)
    assert source.chunk_sizes() == [16, 16, 16, 2]
    np.testing.assert_array_equal(data["image"], images)
    np.testing.assert_array_equal(data["label"], labels)


def test_idx_header_is_big_endian(tmp_path):
    path = tmp_path / "x"
    write_idx(path, np.zeros((3, 2, 5), np.uint8))
    raw = path.read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", raw[4:16]) == (3, 2, 5)


def test_idx_truncated_and_corrupt_files_are_clear_errors(idx_files, tmp_path):
    folder, images, _ = idx_files
    raw = (folder / "img").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-100])
    with pytest.raises(DistmlError, match="truncated.*header declares shape \\(50, 28, 28\\)"):
        read_idx(tmp_path / "short", MAGIC_IMAGES)
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(raw[:1000])
    with pytest.raises(DistmlError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "labels-as-images").write_bytes((folder / "lab").read_bytes())
    with pytest.raises(DistmlError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(tmp_path / "labels-as-images", MAGIC_IMAGES)
    (tmp_path / "garbage").write_bytes(b"\x12\x34\x56\x78" + b"\0" * 20)
    with pytest.raises(DistmlError, match="not an IDX file"):
        read_idx(tmp_path / "garbage")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DistmlError, match="not a readable gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DistmlError, match="does not exist"):
        read_idx(tmp_path / "nothing")
    write_idx(tmp_path / "few", np.zeros(10, np.uint8))
    with pytest.raises(DistmlError, match="50 images.*10 labels"):
        IdxSource(folder / "img", tmp_path / "few")


# -- NPZ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz(tmp_path, compressed):
    x = np.arange(300, dtype=np.float32).reshape(100, 3)
    y = np.arange(100, dtype=np.int64)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", x=x, y=y)
    source = NpzSource(tmp_path / "d.npz", chunk_rows=30)
    if not compressed:
        assert isinstance(source.columns["x"], np.memmap), "uncompressed members are memory-mapped"
    data = all_records(source)
    np.testing.assert_array_equal(data["x"], x)
    np.testing.assert_array_equal(data["y"], y)
    with pytest.raises(DistmlError, match="no arrays \\['z'\\]"):
        NpzSource(tmp_path / "d.npz", keys=["z"])


def test_npz_refuses_pickles_and_bad_files(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DistmlError, match="unpickl"):
        NpzSource(tmp_path / "obj.npz")
    (tmp_path / "no.npz").write_bytes(b"hello")
    with pytest.raises(DistmlError, match="not a NumPy .npz"):
        NpzSource(tmp_path / "no.npz")
    np.savez(tmp_path / "ragged.npz", x=np.zeros(3), y=np.zeros(4))
    with pytest.raises(DistmlError, match="different lengths"):
        NpzSource(tmp_path / "ragged.npz")


# -- Parquet ---------------------------------------------------------------------------------


def write_parquet(path, n, start=0, row_group_size=25):
    table = pa.table(
        {
            "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "value": pa.array(np.arange(start, start + n, dtype=np.float64) / 2),
            "text": pa.array([f"row {i}" for i in range(start, start + n)]),
            "blob": pa.array([bytes([i % 256]) * (i % 5) for i in range(start, start + n)], type=pa.binary()),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(3 * n, dtype=np.float32)), 3),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_row_groups_columns_and_types(tmp_path):
    write_parquet(tmp_path / "a.parquet", 60)
    source = ParquetSource(tmp_path / "a.parquet")
    assert source.chunk_sizes() == [25, 25, 10]
    data = all_records(source)
    np.testing.assert_array_equal(data["id"], np.arange(60))
    assert data["text"][7] == "row 7" and data["blob"][7] == bytes([7]) * 2
    assert data["vec"].shape == (60, 3) and data["vec"].dtype == np.float32
    only = ParquetSource(tmp_path / "a.parquet", columns=["id"])
    assert set(only.read_chunk(1)) == {"id"}
    with pytest.raises(DistmlError, match="no columns \\['nope'\\]"):
        ParquetSource(tmp_path / "a.parquet", columns=["nope"])


def test_parquet_folder_is_multi_file(tmp_path):
    write_parquet(tmp_path / "p0.parquet", 30, 0)
    write_parquet(tmp_path / "p1.parquet", 40, 30)
    source = ParquetSource(tmp_path)
    assert source.file_groups() == [[0, 1], [2, 3]]
    np.testing.assert_array_equal(np.sort(all_records(source)["id"]), np.arange(70))
    ids = [
        set(b["id"].tolist())
        for r in range(2)
        for b in Loader(source, batch_size=8, shard=(r, 2), shard_by="file", format="numpy")
    ]
    assert set().union(*ids) == set(range(70))


def test_parquet_bad_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DistmlError, match="not a readable Parquet"):
        ParquetSource(tmp_path / "bad.parquet")
    with pytest.raises(DistmlError, match="does not exist"):
        ParquetSource(tmp_path / "missing.parquet")


# -- CSV -------------------------------------------------------------------------------------


def test_csv_chunked(tmp_path):
    lines = ["id,x,name"] + [f"{i},{i * 0.5},n{i}" for i in range(1000)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    source = CsvSource(tmp_path / "d.csv", chunk_rows=128, block_size=4096)
    assert source.chunk_sizes() == [128] * 7 + [104]
    data = all_records(source)
    np.testing.assert_array_equal(data["id"], np.arange(1000))
    assert data["name"][999] == "n999"
    skipped = next(source.iter_chunks(3))
    np.testing.assert_array_equal(skipped["id"], np.arange(384, 512))
    loaded = [b for b in Loader(source, batch_size=100, cache=None, format="numpy", with_index=True)]
    for b in loaded:
        np.testing.assert_array_equal(b["id"], b["index"])


def test_csv_errors(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(DistmlError, match="malformed row|not a readable CSV"):
        CsvSource(tmp_path / "d.csv")
    (tmp_path / "ok.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DistmlError, match="no columns \\['c'\\]"):
        CsvSource(tmp_path / "ok.csv", columns=["c"])


# -- SQL (SQLite and a real PostgreSQL server) -------------------------------------------------


def fill_table(engine, n, width=16):
    meta = sa.MetaData()
    table = sa.Table(
        "items",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", sa.Float),
        sa.Column("name", sa.Text),
        sa.Column("image", sa.LargeBinary),
    )
    meta.drop_all(engine)
    meta.create_all(engine)
    rows = [{"id": i, "value": i / 4, "name": f"item {i}", "image": bytes([i % 256]) * width} for i in range(n)]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    return table


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_engine(request, tmp_path):
    if request.param == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    else:
        engine = sa.create_engine(request.getfixturevalue("postgres_url"))
    yield engine
    engine.dispose()


def test_sql_streams_typed_columns(sql_engine):
    fill_table(sql_engine, 500)
    source = SqlSource.from_table(sql_engine, "items", chunk_rows=64)
    assert source.chunk_sizes() == [64] * 7 + [52]
    data = all_records(source)
    np.testing.assert_array_equal(data["id"], np.arange(500))
    assert data["value"].dtype == np.float64 and data["name"][3] == "item 3"
    assert data["image"][5] == bytes([5]) * 16
    decoded = Loader(source, batch_size=50, preprocess=DecodeBytes("image", (4, 4)), format="numpy", shuffle=False)
    first = next(iter(decoded))
    assert first["image"].shape == (50, 4, 4) and (first["image"][2] == 2).all()
    resumed = list(source.iter_chunks(5))
    assert resumed[0]["id"][0] == 320


def test_sql_uses_a_server_side_cursor_on_postgresql(postgres_url):
    engine = sa.create_engine(postgres_url)
    fill_table(engine, 300)
    cursors = []
    sa.event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *a: cursors.append((statement, getattr(cursor, "name", None))),
    )
    source = SqlSource.from_table(engine, "items", chunk_rows=100)
    cursors.clear()  # ignore the reflection queries
    list(source.iter_chunks(0))
    data_queries = [name for statement, name in cursors if "ORDER BY" in statement]
    assert data_queries and all(name for name in data_queries), "PostgreSQL must stream with a named cursor"
    engine.dispose()


def test_sql_errors(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = sa.create_engine(url)
    fill_table(engine, 10)
    with pytest.raises(DistmlError, match="table 'nope' does not exist"):
        SqlSource.from_table(url, "nope")
    with pytest.raises(DistmlError, match="SQL query failed"):
        SqlSource(url, "SELECT missing_column FROM items").chunk_sizes()
    with pytest.raises(DistmlError, match="not a usable SQLAlchemy URL"):
        SqlSource("nosuchdb://x", "SELECT 1")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET value = NULL WHERE id = 3"))
    with pytest.raises(DistmlError, match="NULL"):
        list(SqlSource.from_table(url, "items").iter_chunks(0))


def test_sql_fingerprint_follows_changes(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = sa.create_engine(url)
    fill_table(engine, 10)
    before = SqlSource.from_table(url, "items").fingerprint()
    assert SqlSource.from_table(url, "items").fingerprint() == before
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (id, value, name, image) VALUES (99, 1, 'x', x'00')"))
    assert SqlSource.from_table(url, "items").fingerprint() != before
    query = "SELECT max(value) FROM items"
    watched = SqlSource.from_table(url, "items", fingerprint_query=query).fingerprint()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET value = 1000 WHERE id = 2"))
    assert SqlSource.from_table(url, "items", fingerprint_query=query).fingerprint() != watched


# -- a user's own source -----------------------------------------------------------------------


class Squares(Source):
    """The documented interface: three methods."""

    def fingerprint(self):
        return "squares-v1"

    def chunk_sizes(self):
        return [10, 10, 5]

    def iter_chunks(self, start=0):
        for c in range(start, 3):
            ids = np.arange(c * 10, c * 10 + self.chunk_sizes()[c])
            yield {"x": ids, "y": ids**2}


def test_user_source_plugs_in():
    batches = list(Loader(Squares(), batch_size=4, shard=(1, 2), format="numpy", cache=None))
    seen = np.concatenate([b["x"] for b in batches])
    assert all((b["y"] == b["x"] ** 2).all() for b in batches)
    other = np.concatenate([b["x"] for b in Loader(Squares(), batch_size=4, shard=(0, 2), format="numpy", cache=None)])
    assert set(seen) | set(other) == set(range(25))
    with pytest.raises(DistmlError, match="distml.data.Source"):
        Loader([1, 2, 3], batch_size=2)


def test_array_source_validation():
    with pytest.raises(DistmlError, match="different lengths"):
        ArraySource({"a": np.zeros(3), "b": np.zeros(2)})
    with pytest.raises(DistmlError, match="chunk_rows"):
        ArraySource({"a": np.zeros(3)}, chunk_rows=0)
