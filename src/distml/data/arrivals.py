"""Arriving data: new files or partitions in a folder, new rows in a SQL table, each checked and
ingested once into an immutable snapshot.

A folder source sees `*.parquet` and `*.npz` files and partition folders (`wave=3/`, complete once
they hold a `_SUCCESS` marker, as Spark and Hive write them); names starting with `.` or `_` are
in progress and ignored, and a file counts only once its size and mtime held still between two
looks. Producers should write under such a name and rename the file in when it is complete: a file
written in place under its final name is read once it held still between two looks, which a
writer that pauses longer than that mid-file defeats. `FolderEvents` says when to look: on the
folder's filesystem events (inotify, through watchfiles), or None where they cannot be trusted (no
inotify, a network mount) and the folder is polled instead.

A table source reads the rows whose order column (an increasing id or timestamp) is above the
last one ingested. `validate` turns a batch into (image, label) arrays or says why it cannot; a wave
over MAX_WAVE_BYTES (its files in all) is refused before it is read.

Pattern: event-driven processing: each arrival triggers a cycle of the continuous pipeline
(pipelines/continuous.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distml.core.errors import DistmlError
from distml.data.sources import Columns, NpzSource, ParquetSource, SqlSource, digest_arrays

SUFFIXES = (".parquet", ".npz")
MARKER = "_SUCCESS"
MAX_WAVE_BYTES = 1 << 30  # a wave's files in all: more is refused before it is read into memory


class BadBatch(DistmlError):
    """An arrival that cannot be trained on; the message says what is wrong and what is expected."""


@dataclasses.dataclass
class Arrival:
    key: str  # what it is, unique within the source: a file or partition name, a row range
    arrived_at: float  # seconds since the epoch: the file's mtime, or when the rows were seen
    read: Callable[[], Columns]  # its records (raises BadBatch when they cannot be read)
    watermark: str | None = None  # table sources: the order value to resume after, JSON-encoded


@dataclasses.dataclass(frozen=True)
class Schema:
    """What a batch must hold: raw images of `image_shape` with pixels in `pixel_range`, and
    integer labels in [0, num_classes)."""

    image_shape: tuple[int, ...]
    pixel_range: tuple[float, float]
    num_classes: int

    @classmethod
    def of_dataset(cls, dataset: Any) -> Schema:
        first = dataset.splits["test"].read_chunk(0)["image"]
        low, high = dataset.info.get("pixel_range", (0, 255))
        return cls(tuple(int(d) for d in first.shape[1:]), (float(low), float(high)), len(dataset.class_names))


# -- validation --------------------------------------------------------------------------------


def validate(columns: Columns, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """(images as uint8 of shape (n, *image_shape), labels as int64) or BadBatch saying why."""
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise BadBatch(f"no column {' or '.join(map(repr, missing))}; expected columns 'image' and 'label'")
    images, labels = columns["image"], np.asarray(columns["label"])
    n = len(labels)
    if n == 0:
        raise BadBatch("no records; expected at least one (image, label) row")
    if len(images) != n:
        raise BadBatch(f"{len(images)} images but {n} labels; expected one label per image")
    pixels = int(np.prod(schema.image_shape))
    if images.dtype == object:  # bytes per record (SQL blobs, Parquet binary)
        sizes = {len(b) if isinstance(b, (bytes, bytearray)) else -1 for b in images}
        if sizes != {pixels}:
            raise BadBatch(
                f"image values of {sorted(sizes)[:3]} bytes; expected {pixels} bytes (an "
                f"{'x'.join(map(str, schema.image_shape))} image of 8-bit pixels) per record"
            )
        images = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(n, pixels)
    shape = tuple(images.shape[1:])
    if shape != schema.image_shape and int(np.prod(shape)) != pixels:
        raise BadBatch(
            f"images of shape {'x'.join(map(str, shape)) or 'scalar'}; expected "
            f"{'x'.join(map(str, schema.image_shape))} ({pixels} pixels per image)"
        )
    if not np.issubdtype(images.dtype, np.number):
        raise BadBatch(f"image pixels of type {images.dtype}; expected numbers")
    values = images.astype(np.float64, copy=False)
    low, high = schema.pixel_range
    if not np.isfinite(values).all():
        raise BadBatch(f"image pixels that are NaN or infinite; expected integers in [{low:g}, {high:g}]")
    if (values != np.round(values)).any():
        raise BadBatch(f"image pixels that are not whole numbers; expected integers in [{low:g}, {high:g}]")
    if values.min() < low or values.max() > high:
        raise BadBatch(f"pixels from {values.min():g} to {values.max():g}; expected [{low:g}, {high:g}]")
    if labels.dtype == object or not np.issubdtype(labels.dtype, np.number):
        raise BadBatch(f"labels of type {labels.dtype}; expected integers in [0, {schema.num_classes})")
    if not np.isfinite(labels.astype(np.float64)).all() or (labels != np.round(labels)).any():
        raise BadBatch(f"labels that are not whole numbers; expected integers in [0, {schema.num_classes})")
    bad = (labels < 0) | (labels >= schema.num_classes)
    if bad.any():
        raise BadBatch(
            f"{int(bad.sum())} label(s) out of range (e.g. {labels[bad][0]:g} at row {int(np.flatnonzero(bad)[0])}); "
            f"expected integers in [0, {schema.num_classes})"
        )
    return images.reshape(n, *schema.image_shape).astype(np.uint8), labels.astype(np.int64)


def write_snapshot(folder: Path, image: np.ndarray, label: np.ndarray) -> tuple[Path, str]:
    """Store a validated batch as an uncompressed .npz named by its content (written atomically,
    a second write of the same batch is a no-op); returns (path, fingerprint)."""
    from distml.core.files import atomic_write

    digest = digest_arrays({"image": image, "label": label})
    path = Path(folder) / f"{digest[:32]}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            np.savez(handle, image=image, label=label)
    return path, NpzSource(path).fingerprint()


# -- sources -----------------------------------------------------------------------------------


def _read_files(paths: Sequence[Path], max_bytes: int = MAX_WAVE_BYTES) -> Columns:
    try:
        total = sum(path.stat().st_size for path in paths)
    except OSError as exc:  # gone between the listing and now
        raise BadBatch(f"cannot read {Path(exc.filename or '?').name}: {exc.strerror}") from None
    if total > max_bytes:
        raise BadBatch(f"files of {total} bytes in all; expected at most {max_bytes} bytes per arrival (split it)")
    parts: list[Columns] = []
    for path in paths:
        try:
            source = NpzSource(path) if path.suffix == ".npz" else ParquetSource(path)
            parts += list(source.iter_chunks())
        except DistmlError as exc:
            raise BadBatch(f"cannot read {path.name}: {exc}") from None
        except Exception as exc:  # a damaged file raises whatever its reader raises
            raise BadBatch(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from None
    names = set(parts[0]) if parts else set()
    if any(set(p) != names for p in parts):
        raise BadBatch(f"files with different columns ({[sorted(p) for p in parts]}); expected the same in each")
    try:
        return {name: np.concatenate([p[name] for p in parts]) for name in names}
    except ValueError as exc:
        raise BadBatch(f"files whose columns do not stack: {exc}") from None


class FolderArrivals:
    """New files and complete partitions in `folder` (see the module docstring)."""

    def __init__(self, folder: str | Path, max_bytes: int = MAX_WAVE_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        if not self.folder.is_dir():
            raise DistmlError(f"--source {self.folder} is not a folder; expected a folder new data files arrive in")
        self._seen_at: dict[str, tuple[int, int]] = {}  # key -> (size, mtime_ns) at the last poll
        # files the last poll saw that had not yet held still: seen for the first time, or changed
        # since the poll before (being written in place, not renamed in as a producer should)
        self.unsettled: list[str] = []
        self.changing: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "path": str(self.folder.resolve())}

    def poll(self, known: set[str]) -> list[Arrival]:
        """Arrivals not in `known` whose files held still since the last poll, oldest first."""
        found: list[tuple[float, str, list[Path]]] = []
        self.unsettled, self.changing = [], []
        for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if entry.name.startswith((".", "_")):
                continue
            if entry.is_dir():
                key, marker = entry.name + "/", Path(entry.path) / MARKER
                if key in known or not marker.exists():
                    continue
                files = sorted(p for p in Path(entry.path).rglob("*") if p.suffix in SUFFIXES and p.is_file())
                found.append((marker.stat().st_mtime, key, files))
            elif entry.name.endswith(SUFFIXES) and entry.name not in known:
                stat = entry.stat()
                state = (stat.st_size, stat.st_mtime_ns)
                previous, self._seen_at[entry.name] = self._seen_at.get(entry.name), state
                if previous == state:
                    found.append((stat.st_mtime, entry.name, [Path(entry.path)]))
                else:
                    self.unsettled.append(entry.name)
                    if previous is not None:
                        self.changing.append(entry.name)
        found.sort()
        return [
            Arrival(key, mtime, lambda files=files: _read_files(files, self.max_bytes)) for mtime, key, files in found
        ]


# Filesystems whose changes made on another machine send this one no inotify event.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs"}
    | {"fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs", "fuse.ceph", "fuse.davfs"}
)


def filesystem_type(path: str | Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the filesystem `path` is on (the longest mount point above it), or None where
    the mount table cannot be read (not Linux)."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target, best, kind = str(Path(path).resolve()), "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # a space is \040
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


class FolderEvents:
    """The filesystem events of one folder (and its partition folders), through watchfiles' notify
    backend (inotify on Linux). `wait` returns when something in it changed (a burst of events,
    once quiet for `QUIET_MS`), at `timeout_s`, or when `stop` is set. `open` returns None, with
    why, where events cannot be trusted: then the folder is polled."""

    QUIET_MS = 20  # a burst of events ends after this long without one
    MAX_BURST_MS = 1000  # a longer burst is returned anyway (its files are looked at; those still
    # being written do not hold still and are counted at a later look)

    def __init__(self, notify: Any, kind: str):
        self._notify, self.kind = notify, kind

    @classmethod
    def open(cls, folder: str | Path) -> tuple[FolderEvents | None, str]:
        """(the events, which backend) or (None, why not)."""
        fstype = filesystem_type(folder)
        if fstype in NETWORK_FILESYSTEMS:
            return None, f"a {fstype} filesystem, whose changes from other machines send no events"
        try:
            from watchfiles._rust_notify import RustNotify

            notify = RustNotify([str(folder)], False, False, 1000, True, False)
        except ImportError:
            return None, "watchfiles is not installed"
        except (OSError, RuntimeError) as exc:  # e.g. the inotify watch limit reached
            return None, f"no filesystem events: {exc}"
        # its repr names the backend: RustNotify(Recommended(INotifyWatcher {...})) or RustNotify(Poll(...))
        backend = re.match(r"RustNotify\((\w+)\(\s*(\w*)", repr(notify))
        if backend is None or backend.group(1) == "Poll":  # notify fell back to polling by itself
            notify.close()
            return None, "no filesystem events on this system"
        kind = backend.group(2) or backend.group(1)
        return cls(notify, kind), kind

    def wait(self, timeout_s: float, stop: Any) -> bool:
        """True when something changed (events kept since the last call count too)."""
        timeout_ms = max(1, int(timeout_s * 1000))
        return not isinstance(self._notify.watch(self.MAX_BURST_MS, self.QUIET_MS, timeout_ms, stop), str)

    def close(self) -> None:
        self._notify.close()


class TableArrivals:
    """Rows of `table` whose `order_column` is above the watermark (the last value ingested).

    Rows are read as one arrival per poll, up to the largest value seen at that poll. A row that
    commits later with a smaller value than the watermark is not seen: use a column that grows
    in commit order (an insert timestamp or a sequence written at commit)."""

    def __init__(self, url: str, table: str, order_column: str):
        import sqlalchemy as sa

        self.url, self.table, self.column = url, table, order_column
        try:
            self.engine = sa.create_engine(url)
            reflected = sa.Table(table, sa.MetaData(), autoload_with=self.engine)
        except sa.exc.NoSuchTableError:
            raise DistmlError(f"table {table!r} does not exist in {self._where()}") from None
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, sa.exc.OperationalError) as exc:
            raise DistmlError(f"cannot open {url!r}: {str(exc).splitlines()[0]}") from None
        if order_column not in reflected.columns:
            names = [c.name for c in reflected.columns]
            raise DistmlError(f"table {table!r} has no column {order_column!r}; it has {names}")
        self._table = reflected

    def _where(self) -> str:
        import sqlalchemy as sa

        return sa.make_url(self.url).render_as_string(hide_password=True)

    def describe(self) -> dict[str, Any]:
        return {"kind": "table", "url": self._where(), "table": self.table, "order_column": self.column}

    def poll(self, watermark: str | None) -> list[Arrival]:
        import sqlalchemy as sa

        t, col = self._table, self._table.c[self.column]
        after = json.loads(watermark) if watermark is not None else None
        newer = [col > after] if after is not None else []
        with self.engine.connect() as conn:
            upto = conn.execute(sa.select(sa.func.max(col)).where(*newer)).scalar()
        if upto is None:
            return []
        query = sa.select(t.c.image, t.c.label).where(*newer, col <= upto).order_by(col)
        sql = str(query.compile(self.engine, compile_kwargs={"literal_binds": True}))
        key = f"{self.table}.{self.column} in ({after if after is not None else '-inf'}, {upto}]"

        def read() -> Columns:
            source = SqlSource(self.engine, sql)
            chunks = list(source.iter_chunks())
            return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]} if chunks else {}

        return [Arrival(key, time.time(), read, watermark=json.dumps(_plain(upto)))]


def _plain(value: Any) -> Any:
    """An order value as JSON keeps it: numbers stay numbers, timestamps become ISO text."""
    if isinstance(value, (int, float, str)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def open_source(source: str, table: str | None, order_column: str | None) -> FolderArrivals | TableArrivals:
    """`--source DIR`, or `--source SQL-URL --table T --order-column C`."""
    if "://" in source:
        if not table or not order_column:
            raise DistmlError("a SQL --source needs --table T and --order-column C (an increasing id or timestamp)")
        return TableArrivals(source, table, order_column)
    if table or order_column:
        raise DistmlError(
            "--table and --order-column apply to a SQL --source (a SQLAlchemy URL such as sqlite:///f.db)"
        )
    return FolderArrivals(source)
