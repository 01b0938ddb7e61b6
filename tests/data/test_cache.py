"""Caching: after the first pass the source is never read again; a changed source rebuilds."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from distml.data import (
    ArraySource,
    Compose,
    CsvSource,
    DecodeBytes,
    Function,
    Loader,
    Normalize,
    ParquetSource,
    SqlSource,
)
from distml.data.cache import open_disk


def count_reads(source):
    """Wrap a source's read methods to count how often the loader touches it."""
    calls = {"iter_chunks": 0, "read_chunk": 0}
    for name in calls:
        original = getattr(source, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(source, name, wrapped)
    return calls


def epoch(loader):
    return sorted(i for b in loader for i in np.asarray(b["index"]).tolist())


def make_parquet(path, n=400):
    table = pa.table(
        {
            "image": pa.array([bytes([i % 251]) * 16 for i in range(n)], type=pa.binary()),
            "label": pa.array(np.arange(n) % 10),
        }
    )
    pq.write_table(table, path, row_group_size=50)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_second_epoch_does_not_touch_parquet_files(tmp_path, mode):
    path = tmp_path / "d.parquet"
    make_parquet(path)
    source = ParquetSource(path)
    calls = count_reads(source)
    loader = Loader(
        source,
        batch_size=32,
        cache=mode,
        cache_dir=tmp_path / "cache",
        with_index=True,
        preprocess=DecodeBytes("image", (4, 4)),
    )
    assert epoch(loader) == list(range(400))
    assert calls["read_chunk"] + calls["iter_chunks"] > 0
    before = dict(calls)
    path.rename(tmp_path / "gone.parquet")  # any file open from now on would fail
    assert epoch(loader) == list(range(400))
    assert epoch(loader) == list(range(400))
    assert calls == before, "epochs 2 and 3 must read only the cache"


def test_second_epoch_does_not_touch_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(300)))
    source = CsvSource(path, chunk_rows=40)
    calls = count_reads(source)
    loader = Loader(source, batch_size=25, with_index=True)
    first = [b for b in loader]
    path.unlink()
    second = [b for b in loader]
    assert calls["iter_chunks"] == 1 and calls["read_chunk"] == 0
    assert sorted(np.concatenate([b["a"].numpy() for b in second]).tolist()) == list(range(300))
    assert [b["index"].tolist() for b in first] != [b["index"].tolist() for b in second], "a new epoch reshuffles"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_second_epoch_runs_no_sql_query(tmp_path, request, backend):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS pix"))
        conn.execute(
            sa.text(
                "CREATE TABLE pix (id INTEGER PRIMARY KEY, image BYTEA, label INTEGER)"
                if backend == "postgresql"
                else "CREATE TABLE pix (id INTEGER PRIMARY KEY, image BLOB, label INTEGER)"
            )
        )
        conn.execute(
            sa.text("INSERT INTO pix VALUES (:id, :image, :label)"),
            [{"id": i, "image": bytes([i % 256]) * 4, "label": i % 10} for i in range(250)],
        )
    queries = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    source = SqlSource.from_table(engine, "pix", chunk_rows=60)
    loader = Loader(
        source, batch_size=20, with_index=True, preprocess=Compose([DecodeBytes("image", (2, 2)), Normalize("image")])
    )
    first = [b for b in loader]
    assert any("pix" in q for q in queries)
    queries.clear()
    with engine.begin() as conn:  # the slow source goes away entirely
        conn.execute(sa.text("DROP TABLE pix"))
    queries.clear()
    second = [b for b in loader]
    assert queries == [], f"epoch 2 ran SQL: {queries}"
    assert sorted(np.concatenate([b["index"].numpy() for b in second]).tolist()) == list(range(250))
    image = second[0]["image"]
    assert image.dtype.is_floating_point and tuple(image.shape[1:]) == (2, 2)
    assert len(first) == len(second)
    engine.dispose()


def test_changed_source_or_preprocessing_invalidates_the_disk_cache(tmp_path):
    path = tmp_path / "d.parquet"
    make_parquet(path, 100)
    cache_dir = tmp_path / "cache"
    one = Loader(ParquetSource(path), batch_size=10, cache="disk", cache_dir=cache_dir)
    one.fill_cache()
    # the same data and preprocessing in a new loader (a new process) reuses the cache
    again = Loader(ParquetSource(path), batch_size=10, cache="disk", cache_dir=cache_dir)
    calls = count_reads(again.source)
    again.fill_cache()
    assert again.cache_key == one.cache_key and calls == {"iter_chunks": 0, "read_chunk": 0}
    make_parquet(path, 120)  # the data changed
    changed = Loader(ParquetSource(path), batch_size=10, cache="disk", cache_dir=cache_dir, format="numpy")
    assert changed.cache_key != one.cache_key
    assert sum(len(b["label"]) for b in changed) == 120
    steps = Loader(
        ParquetSource(path),
        batch_size=10,
        cache="disk",
        cache_dir=cache_dir,
        preprocess=Function(lambda c: {**c, "label": c["label"] * 2}),
    )
    assert steps.cache_key != changed.cache_key
    assert sorted(d.name for d in cache_dir.iterdir() if d.is_dir()) == sorted([one.cache_key, changed.cache_key])


def test_function_key_follows_its_code():
    a = Function(lambda c: {**c, "x": c["x"] + 1})
    b = Function(lambda c: {**c, "x": c["x"] + 2})
    assert a.key != b.key and Function(a.fn, version="2").key != a.key


def test_disk_cache_holds_bytes_and_text(tmp_path):
    source = ArraySource(
        {
            "blob": np.array([b"ab", b"", b"xyz"], dtype=object),
            "text": np.array(["α", "b", "cd"], dtype=object),
            "n": np.arange(3),
        },
        chunk_rows=2,
    )
    loader = Loader(source, batch_size=3, cache="disk", cache_dir=tmp_path, shuffle=False, format="numpy")
    batch = next(iter(loader))
    assert batch["blob"].tolist() == [b"ab", b"", b"xyz"] and batch["text"].tolist() == ["α", "b", "cd"]
    assert open_disk(tmp_path / loader.cache_key).num_records == 3


def _fill(args):
    path, cache_dir = args
    loader = Loader(ParquetSource(path), batch_size=10, cache="disk", cache_dir=cache_dir)
    calls = count_reads(loader.source)
    loader.fill_cache()
    return calls["read_chunk"] + calls["iter_chunks"]


def test_concurrent_workers_fill_the_disk_cache_once(tmp_path):
    path = tmp_path / "d.parquet"
    make_parquet(path, 2000)
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        reads = pool.map(_fill, [(str(path), str(tmp_path / "cache"))] * 3)
    assert sorted(reads)[:2] == [0, 0] and sorted(reads)[2] > 0, f"exactly one worker reads the source: {reads}"
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_failed_fill_leaves_no_cache(tmp_path):
    path = tmp_path / "d.parquet"
    make_parquet(path, 100)

    def boom(columns):
        raise ValueError("preprocessing failed")

    loader = Loader(
        ParquetSource(path), batch_size=10, cache="disk", cache_dir=tmp_path / "c", preprocess=Function(boom)
    )
    with pytest.raises(ValueError):
        loader.fill_cache()
    assert [p for p in (tmp_path / "c").iterdir() if p.is_dir()] == []
    assert os.path.exists(path)
