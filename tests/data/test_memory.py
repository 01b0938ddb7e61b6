"""Batching keeps memory bounded: stream data sets several times larger than a memory budget.

Each data set is written by the test process; a fresh Python process reads one chunk (one-time
costs: the first arrow-to-numpy conversion alone adds ~60 MiB of lazily initialised state), then
streams one epoch and reports its resident memory before and at peak (getrusage plus sampling).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

MB = 1 << 20
BUDGET = 40 * MB
RECORD = 4096  # bytes per image blob
ROWS = 64_000  # 64,000 x 4 KiB = 250 MiB: six times the budget

STREAM = r"""
import json, resource, sys, threading, time
import psutil, pyarrow.parquet, sqlalchemy, numpy as np
from distml.data import DecodeBytes, Loader, ParquetSource, SqlSource
kind, where = sys.argv[1], sys.argv[2]
if kind == "parquet":
    source = ParquetSource(where)
else:
    source = SqlSource.from_table(where, "blobs", chunk_rows=250)
loader = Loader(source, batch_size=64, cache=None, shuffle_window=2, format="numpy",
                preprocess=DecodeBytes("image", (64, 64)))
next(iter(source.iter_chunks(0)))  # one-time costs (lazy imports, kernel registries) are not streaming
proc = psutil.Process()
base = proc.memory_info().rss
ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
records = checksum = 0
for batch in loader:
    records += len(batch["label"])
    checksum += int(batch["label"].sum())
done.set()
ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
high = max(peak[0], ru_after if ru_after > ru_before else 0)
print(json.dumps({"base": base, "peak": high, "records": records, "checksum": checksum}))
print(f"grew {(high - base) >> 20} MiB", file=sys.stderr)
"""


def stream(kind: str, where: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STREAM, kind, where], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def blobs(start: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(start)
    raw = rng.integers(0, 256, (n, RECORD), dtype=np.uint8)  # incompressible
    return [row.tobytes() for row in raw]


def check(result: dict, data_bytes: int) -> None:
    assert data_bytes >= 3.5 * BUDGET
    assert result["records"] == ROWS and result["checksum"] == sum(i % 10 for i in range(ROWS))
    grew = result["peak"] - result["base"]
    print(f"resident memory grew by {grew / MB:.0f} MiB while streaming {data_bytes / MB:.0f} MiB")
    assert grew < BUDGET, f"streaming {data_bytes / MB:.0f} MiB grew resident memory by {grew / MB:.0f} MiB"


@pytest.mark.slow
def test_parquet_larger_than_budget_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.parquet"
    writer = None
    for start in range(0, ROWS, 4000):
        table = pa.table(
            {
                "image": pa.array(blobs(start, 4000), type=pa.binary(RECORD)),  # FIXED_LEN_BYTE_ARRAY
                "label": pa.array(np.arange(start, start + 4000) % 10),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema, compression="none")
        writer.write_table(table, row_group_size=250)
    writer.close()
    check(stream("parquet", str(path)), path.stat().st_size)


def fill_sql(url: str) -> int:
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    table = sa.Table(
        "blobs",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image", sa.LargeBinary),
        sa.Column("label", sa.Integer),
    )
    meta.drop_all(engine)
    meta.create_all(engine)
    for start in range(0, ROWS, 4000):
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                [{"id": start + i, "image": b, "label": (start + i) % 10} for i, b in enumerate(blobs(start, 4000))],
            )
    engine.dispose()
    return ROWS * RECORD


@pytest.mark.slow
def test_sqlite_table_larger_than_budget_streams_in_bounded_memory(tmp_path):
    url = f"sqlite:///{tmp_path / 'big.sqlite'}"
    size = fill_sql(url)
    check(stream("sql", url), size)


@pytest.mark.slow
def test_postgresql_table_larger_than_budget_streams_in_bounded_memory(postgres_url):
    size = fill_sql(postgres_url)
    check(stream("sql", postgres_url), size)
