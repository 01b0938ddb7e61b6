"""Data sources: anything that can stream its records as a known list of column chunks.

A source says how many records each chunk holds (cheap: file metadata, a COUNT query) and
streams chunks of columns (`dict[str, numpy array]`) from any chunk index; that is all the
loader needs for batching, sharding, caching and resume. To plug in your own data, subclass
`Source` and implement `fingerprint`, `chunk_sizes` and `iter_chunks` (see `Source`).
"""

from __future__ import annotations

import abc
import glob
import hashlib
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distml.core.errors import DistmlError
from distml.data.idx import MAGIC_IMAGES, MAGIC_LABELS, read_idx

Columns = dict[str, np.ndarray]


class Source(abc.ABC):
    """An ordered data set of records, split into chunks.

    Contract:
    - `chunk_sizes()` returns the number of records in every chunk, in order, without reading
      the records themselves; it must agree with what `iter_chunks` yields.
    - `iter_chunks(start)` yields the chunks `start, start+1, ...` as dicts of equal-length
      numpy arrays (one entry per column; first axis = record). The order is deterministic:
      the same source yields the same records in the same chunks every time.
    - `fingerprint()` is a hex digest that changes whenever the content may have changed;
      caches are keyed by it.
    - Sources whose chunks can be read in any order cheaply set `random_access = True` and may
      override `read_chunk`; the loader then also shuffles the order of chunks.
    - `file_groups()` optionally groups chunk indices by file, for sharding by file.
    """

    random_access: bool = False

    @abc.abstractmethod
    def fingerprint(self) -> str: ...

    @abc.abstractmethod
    def chunk_sizes(self) -> list[int]: ...

    @abc.abstractmethod
    def iter_chunks(self, start: int = 0) -> Iterator[Columns]: ...

    def read_chunk(self, index: int) -> Columns:
        return next(iter(self.iter_chunks(index)))

    def file_groups(self) -> list[list[int]]:
        return [list(range(len(self.chunk_sizes())))]

    def describe(self) -> str:
        return type(self).__name__

    def __len__(self) -> int:
        return int(sum(self.chunk_sizes()))


def digest_files(paths: Sequence[Path]) -> str:
    """SHA-256 over the names, sizes and full contents of files, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode() + b"\0" + str(os.path.getsize(path)).encode() + b"\0")
        with open(path, "rb") as handle:
            h.update(hashlib.file_digest(handle, "sha256").digest())
    return h.hexdigest()


def digest_arrays(columns: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(columns):
        array = np.asarray(columns[name])
        h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        if array.dtype == object:
            for item in array:
                h.update(repr(item).encode())
        else:
            h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def _chunked_sizes(total: int, chunk_rows: int) -> list[int]:
    if chunk_rows <= 0:
        raise DistmlError(f"chunk_rows must be a positive integer, got {chunk_rows}")
    sizes = [chunk_rows] * (total // chunk_rows)
    if total % chunk_rows:
        sizes.append(total % chunk_rows)
    return sizes


def _check_columns(columns: Mapping[str, np.ndarray], where: str) -> int:
    if not columns:
        raise DistmlError(f"{where} has no columns; expected at least one named array")
    lengths = {name: len(array) for name, array in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DistmlError(f"{where}: columns have different lengths {lengths}; every column needs one row per record")
    return next(iter(lengths.values()))


class ArraySource(Source):
    """Columns already in memory (or memory-mapped): chunks are slices, read in any order."""

    random_access = True

    def __init__(self, columns: Mapping[str, np.ndarray], chunk_rows: int = 4096, name: str = "arrays"):
        self.columns = {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in columns.items()}
        self.num_records = _check_columns(self.columns, f"source {name!r}")
        self.chunk_rows = chunk_rows
        self.name = name
        self._sizes = _chunked_sizes(self.num_records, chunk_rows)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_arrays(self.columns)
        return self._fingerprint

    def chunk_sizes(self) -> list[int]:
        return list(self._sizes)

    def read_chunk(self, index: int) -> Columns:
        lo = index * self.chunk_rows
        return {k: np.asarray(v[lo : lo + self.chunk_rows]) for k, v in self.columns.items()}

    def iter_chunks(self, start: int = 0) -> Iterator[Columns]:
        for index in range(start, len(self._sizes)):
            yield self.read_chunk(index)

    def describe(self) -> str:
        return f"arrays:{self.name}"


class ConcatSource(Source):
    """Several sources one after the other, as one: chunk i of the whole is a chunk of one member.

    Every member must have the same columns. Continuous training reads the data that has arrived
    so far this way: one snapshot per arrival, never copied into one file.
    """

    def __init__(self, members: Sequence[Source], name: str = "concat"):
        if not members:
            raise DistmlError(f"source {name!r} needs at least one member source")
        self.members = list(members)
        self.name = name
        self.random_access = all(m.random_access for m in self.members)
        self._where: list[tuple[int, int]] = []  # (member, its chunk index) per chunk
        self._sizes: list[int] = []
        for m, member in enumerate(self.members):
            sizes = member.chunk_sizes()
            self._where += [(m, i) for i in range(len(sizes))]
            self._sizes += sizes
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(b"concat")
            for member in self.members:
                h.update(member.fingerprint().encode() + b"\0")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def chunk_sizes(self) -> list[int]:
        return list(self._sizes)

    def read_chunk(self, index: int) -> Columns:
        m, i = self._where[index]
        return self.members[m].read_chunk(i)

    def iter_chunks(self, start: int = 0) -> Iterator[Columns]:
        if start >= len(self._where):
            return
        first, offset = self._where[start]
        yield from self.members[first].iter_chunks(offset)
        for member in self.members[first + 1 :]:
            yield from member.iter_chunks(0)

    def file_groups(self) -> list[list[int]]:
        groups, base = [], 0
        for member in self.members:
            groups += [[base + i for i in group] for group in member.file_groups()]
            base += len(member.chunk_sizes())
        return groups

    def describe(self) -> str:
        return f"concat:{self.name}(" + ",".join(m.describe() for m in self.members) + ")"


class IdxSource(ArraySource):
    """An IDX image file and its IDX label file (MNIST layout): columns `image` and `label`."""

    def __init__(self, images: str | Path, labels: str | Path, chunk_rows: int = 4096, name: str = "idx"):
        self.paths = [Path(images), Path(labels)]
        image_array = read_idx(images, MAGIC_IMAGES)
        label_array = read_idx(labels, MAGIC_LABELS)
        if len(image_array) != len(label_array):
            raise DistmlError(
                f"IDX files disagree: {images} holds {len(image_array)} images, {labels} holds "
                f"{len(label_array)} labels; expected one label per image"
            )
        super().__init__({"image": image_array, "label": label_array}, chunk_rows, name)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_files(self.paths)
        return self._fingerprint

    def describe(self) -> str:
        return "idx:" + ",".join(str(p) for p in self.paths)


class NpzSource(ArraySource):
    """A NumPy `.npz` archive; each array is a column (all of equal length).

    Members stored uncompressed (`np.savez`) are memory-mapped straight from the archive, so
    they are never read whole; compressed members (`np.savez_compressed`) are decompressed
    into memory once.
    """

    def __init__(self, path: str | Path, keys: Sequence[str] | None = None, chunk_rows: int = 4096):
        self.path = Path(path)
        if not self.path.exists():
            raise DistmlError(f"NumPy archive {self.path} does not exist")
        try:
            archive = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise DistmlError(f"{self.path} is not a NumPy .npz archive (not a zip file)") from None
        with archive:
            members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
            wanted = list(keys) if keys is not None else sorted(members)
            missing = [k for k in wanted if k not in members]
            if missing:
                raise DistmlError(f"{self.path} has no arrays {missing}; it holds {sorted(members)}")
            columns = {key: self._open_member(archive, members[key]) for key in wanted}
        super().__init__(columns, chunk_rows, name=self.path.name)

    def _open_member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                start = info.header_offset + 30 + name_len + extra_len
                raw.seek(start)
                version = np.lib.format.read_magic(raw)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
                else:
                    return self._read_member(archive, info)
                offset = raw.tell()
            if dtype.hasobject:
                raise DistmlError(f"{self.path}:{info.filename} holds Python objects; distml never unpickles data")
            if int(np.prod(shape)) == 0:
                return np.empty(shape, dtype)
            return np.memmap(
                self.path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
            )
        return self._read_member(archive, info)

    def _read_member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
        with archive.open(info) as handle:
            try:
                return np.lib.format.read_array(handle, allow_pickle=False)
            except ValueError as exc:
                raise DistmlError(f"{self.path}:{info.filename} cannot be read without unpickling ({exc})") from None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_files([self.path])
        return self._fingerprint

    def describe(self) -> str:
        return f"npz:{self.path}"


def _expand_paths(paths: str | Path | Sequence[str | Path], suffix: str) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found.extend(sorted(item.glob(f"*{suffix}")))
        elif any(ch in str(item) for ch in "*?["):
            found.extend(sorted(Path(p) for p in glob.glob(str(item))))
        elif item.exists():
            found.append(item)
        else:
            raise DistmlError(f"{item} does not exist; expected a {suffix} file, a folder of them or a glob pattern")
    if not found:
        raise DistmlError(f"no {suffix} files found in {paths}")
    return found


def arrow_to_numpy(column: Any, name: str) -> np.ndarray:
    """Convert a pyarrow array/chunked array to numpy: numbers stay numbers, bytes and text
    become object arrays, fixed-length lists of numbers become a 2-D numeric array and
    fixed-size binary values a 2-D uint8 array (decode either with DecodeBytes)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if column.null_count:
            raise DistmlError(f"column {name!r} has null lists; expected a value in every row")
        values = column.flatten().to_numpy(zero_copy_only=False)
        if len(column) == 0:
            return values.reshape(0, 0)
        width = len(values) // len(column)
        if pa.types.is_fixed_size_list(kind):
            return values.reshape(len(column), kind.list_size)
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != width).any():
            raise DistmlError(f"column {name!r} holds lists of different lengths; expected one fixed length per row")
        return values.reshape(len(column), width)
    if pa.types.is_fixed_size_binary(kind) and column.null_count == 0:
        # FIXED_LEN_BYTE_ARRAY (e.g. raw pixels): one (n, width) uint8 array, no per-record objects
        data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        start = column.offset * kind.byte_width
        return data[start : start + len(column) * kind.byte_width].reshape(len(column), kind.byte_width).copy()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return np.array(column.to_pylist(), dtype=object)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return np.array(column.to_pylist(), dtype=object)
    # a copy: a zero-copy view would pin arrow's whole read buffer for as long as the batch lives
    return np.array(column.to_numpy(zero_copy_only=False), copy=True)


class ParquetSource(Source):
    """Parquet files (a file, a folder or a glob); one chunk per row group, columns selectable.

    Row groups are read one at a time with pyarrow, so memory is bounded by the largest row
    group, and they can be read in any order.
    """

    random_access = True

    def __init__(self, paths: str | Path | Sequence[str | Path], columns: Sequence[str] | None = None):
        import pyarrow.parquet as pq

        self.paths = _expand_paths(paths, ".parquet")
        self.columns = list(columns) if columns is not None else None
        self._index: list[tuple[int, int]] = []  # (file index, row group)
        self._sizes: list[int] = []
        self._groups: list[list[int]] = []
        for file_index, path in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(path).metadata
                schema_names = pq.ParquetFile(path).schema_arrow.names
            except Exception as exc:  # pyarrow raises several types for a bad file
                raise DistmlError(f"{path} is not a readable Parquet file: {exc}") from None
            if self.columns:
                missing = [c for c in self.columns if c not in schema_names]
                if missing:
                    raise DistmlError(f"{path} has no columns {missing}; it has {schema_names}")
            group = []
            for rg in range(meta.num_row_groups):
                group.append(len(self._index))
                self._index.append((file_index, rg))
                self._sizes.append(meta.row_group(rg).num_rows)
            self._groups.append(group)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_files(self.paths)
        return self._fingerprint

    def chunk_sizes(self) -> list[int]:
        return list(self._sizes)

    def file_groups(self) -> list[list[int]]:
        return [list(g) for g in self._groups]

    def read_chunk(self, index: int) -> Columns:
        import pyarrow.parquet as pq

        file_index, rg = self._index[index]
        # one row group at a time on the calling thread: arrow's thread pool keeps per-thread
        # allocator caches (measured: 36 MiB vs 22 MiB resident growth for 1 MiB row groups)
        table = pq.ParquetFile(self.paths[file_index], pre_buffer=False).read_row_group(
            rg, columns=self.columns, use_threads=False
        )
        return {name: arrow_to_numpy(table.column(name), name) for name in table.column_names}

    def iter_chunks(self, start: int = 0) -> Iterator[Columns]:
        for index in range(start, len(self._index)):
            yield self.read_chunk(index)

    def describe(self) -> str:
        return "parquet:" + ",".join(str(p) for p in self.paths)


class CsvSource(Source):
    """CSV files streamed in blocks with pyarrow's incremental reader, re-cut into chunks.

    Chunk sizes come from one counting pass at construction; reading from chunk k skips the
    rows before it, so CSV is a sequential source (cache it for shuffled epochs).
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        columns: Sequence[str] | None = None,
        chunk_rows: int = 8192,
        block_size: int = 1 << 20,
    ):
        self.paths = _expand_paths(paths, ".csv")
        self.columns = list(columns) if columns is not None else None
        self.chunk_rows = chunk_rows
        self.block_size = block_size
        self._file_rows = [self._count_rows(p) for p in self.paths]
        self._sizes: list[int] = []
        self._groups: list[list[int]] = []
        for rows in self._file_rows:
            sizes = _chunked_sizes(rows, chunk_rows)
            self._groups.append(list(range(len(self._sizes), len(self._sizes) + len(sizes))))
            self._sizes.extend(sizes)
        self._fingerprint: str | None = None

    def _reader(self, path: Path, columns: Sequence[str] | None):
        import pyarrow as pa
        import pyarrow.csv as pacsv

        try:
            return pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=self.block_size),
                convert_options=pacsv.ConvertOptions(include_columns=columns),
            )
        except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
            raise DistmlError(f"{path} is not a readable CSV file with a header row: {exc}") from None

    def _count_rows(self, path: Path) -> int:
        import pyarrow as pa

        names = self._reader(path, None).schema.names
        if self.columns:
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise DistmlError(f"{path} has no columns {missing}; it has {names}")
        reader = self._reader(path, self.columns)
        try:
            return sum(batch.num_rows for batch in reader)
        except pa.ArrowInvalid as exc:
            raise DistmlError(f"{path} has a malformed row: {exc}") from None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_files(self.paths)
        return self._fingerprint

    def chunk_sizes(self) -> list[int]:
        return list(self._sizes)

    def file_groups(self) -> list[list[int]]:
        return [list(g) for g in self._groups]

    def iter_chunks(self, start: int = 0) -> Iterator[Columns]:
        import pyarrow as pa

        for file_index, group in enumerate(self._groups):
            if not group or group[-1] < start:
                continue
            skip_rows = max(0, start - group[0]) * self.chunk_rows
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            for batch in self._reader(self.paths[file_index], self.columns):
                if skip_rows:
                    drop = min(skip_rows, batch.num_rows)
                    batch, skip_rows = batch.slice(drop), skip_rows - drop
                pending.append(batch)
                pending_rows += batch.num_rows
                while pending_rows >= self.chunk_rows:
                    table = pa.Table.from_batches(pending)
                    yield self._columns(table.slice(0, self.chunk_rows))
                    rest = table.slice(self.chunk_rows)
                    pending, pending_rows = rest.to_batches(), rest.num_rows
            if pending_rows:
                yield self._columns(pa.Table.from_batches(pending))

    @staticmethod
    def _columns(table) -> Columns:
        return {name: arrow_to_numpy(table.column(name), name) for name in table.column_names}

    def describe(self) -> str:
        return "csv:" + ",".join(str(p) for p in self.paths)


class SqlSource(Source):
    """The rows of a SQL query on any SQLAlchemy URL, streamed with a server-side cursor.

    The query runs with `stream_results` and `yield_per`, so PostgreSQL uses a named cursor
    and at most one chunk of rows is in memory. Numbers become numeric arrays, bytes (e.g.
    image blobs) and text become object arrays. The query must return rows in a
    deterministic order (`from_table` adds ORDER BY on the primary key). The fingerprint is
    the URL, query and row count, plus the result of `fingerprint_query` when given (e.g.
    `SELECT max(updated_at) FROM t`), so updates that keep the count are seen too.
    """

    def __init__(
        self,
        url_or_engine: Any,
        query: str,
        *,
        params: Mapping[str, Any] | None = None,
        chunk_rows: int = 2048,
        fingerprint_query: str | None = None,
    ):
        import sqlalchemy as sa

        if isinstance(url_or_engine, sa.Engine):
            self.engine = url_or_engine
        else:
            try:
                self.engine = sa.create_engine(url_or_engine)
            except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
                raise DistmlError(f"{url_or_engine!r} is not a usable SQLAlchemy URL: {exc}") from None
        self.query = query
        self.params = dict(params or {})
        self.chunk_rows = chunk_rows
        self.fingerprint_query = fingerprint_query
        self._count: int | None = None
        self._fingerprint: str | None = None

    @classmethod
    def from_table(cls, url_or_engine: Any, table: str, columns: Sequence[str] | None = None, **kwargs) -> SqlSource:
        import sqlalchemy as sa

        engine = url_or_engine if isinstance(url_or_engine, sa.Engine) else sa.create_engine(url_or_engine)
        try:
            reflected = sa.Table(table, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise DistmlError(
                f"table {table!r} does not exist in {engine.url.render_as_string(hide_password=True)}"
            ) from None
        names = list(columns) if columns else [c.name for c in reflected.columns]
        missing = [c for c in names if c not in reflected.columns]
        if missing:
            raise DistmlError(f"table {table!r} has no columns {missing}; it has {[c.name for c in reflected.columns]}")
        key = [c for c in reflected.primary_key.columns] or list(reflected.columns)
        query = sa.select(*[reflected.c[n] for n in names]).order_by(*key)
        return cls(engine, str(query.compile(engine, compile_kwargs={"literal_binds": True})), **kwargs)

    def _text(self, sql: str):
        import sqlalchemy as sa

        return sa.text(sql)

    def _run_scalar(self, sql: str) -> Any:
        import sqlalchemy as sa

        try:
            with self.engine.connect() as conn:
                return conn.execute(self._text(sql), self.params).scalar()
        except sa.exc.SQLAlchemyError as exc:
            raise DistmlError(f"SQL query failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None

    def num_records(self) -> int:
        if self._count is None:
            self._count = int(self._run_scalar(f"SELECT COUNT(*) FROM ({self.query}) AS distml_q"))
        return self._count

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.engine.url.render_as_string(hide_password=True).encode())
            h.update(self.query.encode())
            h.update(repr(sorted(self.params.items())).encode())
            h.update(str(self.num_records()).encode())
            if self.fingerprint_query:
                h.update(repr(self._run_scalar(self.fingerprint_query)).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def chunk_sizes(self) -> list[int]:
        return _chunked_sizes(self.num_records(), self.chunk_rows)

    def iter_chunks(self, start: int = 0) -> Iterator[Columns]:
        import sqlalchemy as sa

        skip = start * self.chunk_rows
        try:
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=self.chunk_rows).execute(
                    self._text(self.query), self.params
                )
                names = list(result.keys())
                for rows in result.partitions(self.chunk_rows):
                    if skip >= len(rows):
                        skip -= len(rows)
                        continue
                    if skip:
                        rows, skip = rows[skip:], 0
                    yield {name: _sql_column(list(values), name) for name, values in zip(names, zip(*rows))}
        except sa.exc.SQLAlchemyError as exc:
            raise DistmlError(f"SQL query failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None

    def describe(self) -> str:
        return f"sql:{self.engine.url.render_as_string(hide_password=True)}"


def _sql_column(values: list[Any], name: str) -> np.ndarray:
    first = next((v for v in values if v is not None), None)
    if isinstance(first, (bytes, bytearray, memoryview)):
        out = np.empty(len(values), dtype=object)
        out[:] = [v if v is None or type(v) is bytes else bytes(v) for v in values]
        return out
    if isinstance(first, str):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    if None in values:
        raise DistmlError(f"column {name!r} has NULL values; expected a number in every row (filter or COALESCE them)")
    array = np.asarray(values)
    if array.dtype == object:
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):
            raise DistmlError(
                f"column {name!r} holds values of type {type(first).__name__}; expected numbers, text or bytes"
            ) from None
    return array
