"""The Loader: bounded-memory batches of a sharded, shuffled, cached, resumable epoch.

`Loader(source, batch_size=64, shard=(rank, world_size), cache="memory")` yields dicts of
torch tensors (or numpy arrays). Which records a rank reads comes from `distml.data.sharding`
(deterministic from seed and epoch, world-size independent); where they come from is the
cache (filled in one pass, then the source is never read again) or, with `cache=None`, the
source itself one shuffle window at a time. `state_dict()` / `load_state_dict()` resume
mid-epoch, on the same or another world size. torch's DataLoader + DistributedSampler were
considered: per-sample `__getitem__` + collate costs ~10x a vectorised gather, and its
sampler cannot resume mid-epoch or reshard.

Pattern: batching, sharding and caching of ingestion, and the resumable iterator that elastic
training needs (state_dict at one world size, load_state_dict at another).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distml.core.errors import DistmlError
from distml.data import cache as cache_mod
from distml.data.preprocess import Identity, Step
from distml.data.sharding import EpochOrder, assign_files, local_schedule, record_schedule
from distml.data.sources import Columns, Source

CacheMode = Literal["memory", "disk"] | None
STATE_VERSION = 1


class Loader:
    """Batches of one rank's shard of a source, epoch after epoch.

    Arguments:
        source: any `distml.data.Source`.
        batch_size: records per batch on this rank (global batch = batch_size x world_size).
        shard: (rank, world_size). Every rank gets the same number of batches per epoch.
        shuffle, seed: the epoch order is a function of (seed, epoch) only.
        drop_last: drop the incomplete last global batch; otherwise pad it by repeating the
            epoch's last records so that the ranks' batch counts stay equal (unequal counts
            hang collective training).
        preprocess: a `distml.data.preprocess.Step` applied per chunk before caching.
        cache: "memory", "disk" (memory-mapped, shared by the workers of one machine and
            by later runs) or None (stream the source every epoch, memory bounded by the
            shuffle window).
        cache_dir: where disk caches live (default: `<workspace>/cache/data`).
        shuffle_window: records are shuffled within windows of this many chunks (default:
            all chunks when cached, 8 chunks when streaming).
        shard_by: "record" (default; elastic, world-size independent order) or "file"
            (each rank reads whole files only; resume needs the same world size).
        format: "torch" or "numpy". with_index: add an "index" column of record ids.
    """

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        shard: tuple[int, int] = (0, 1),
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        preprocess: Step | None = None,
        cache: CacheMode = "memory",
        cache_dir: str | Path | None = None,
        workspace: Any = None,
        shuffle_window: int | None = None,
        shard_by: Literal["record", "file"] = "record",
        format: Literal["torch", "numpy"] = "torch",
        with_index: bool = False,
        progress: bool = False,
    ):
        if not isinstance(source, Source):
            raise DistmlError(f"source must be a distml.data.Source, got {type(source).__name__}")
        rank, world = shard
        if world < 1 or not 0 <= rank < world:
            raise DistmlError(f"shard=(rank, world_size) must satisfy 0 <= rank < world_size, got {shard}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DistmlError(f"batch_size must be a positive integer, got {batch_size!r}")
        if cache not in ("memory", "disk", None):
            raise DistmlError(f"cache must be 'memory', 'disk' or None, got {cache!r}")
        if shard_by not in ("record", "file"):
            raise DistmlError(f"shard_by must be 'record' or 'file', got {shard_by!r}")
        if format not in ("torch", "numpy"):
            raise DistmlError(f"format must be 'torch' or 'numpy', got {format!r}")
        if shuffle_window is not None and shuffle_window < 1:
            raise DistmlError(f"shuffle_window must be a positive number of chunks, got {shuffle_window}")
        self.source, self.batch_size, self.rank, self.world_size = source, batch_size, rank, world
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.preprocess = preprocess or Identity()
        self.cache_mode, self.shard_by, self.format, self.with_index = cache, shard_by, format, with_index
        self.progress = progress
        if cache == "disk" and cache_dir is None:
            if workspace is None:
                raise DistmlError("cache='disk' needs cache_dir=... or workspace=... to know where to store the cache")
            cache_dir = Path(workspace.cache_dir) / "data"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.shuffle_window = shuffle_window if shuffle_window is not None else (None if cache else 8)
        self.chunk_sizes = list(source.chunk_sizes())
        self.num_records = int(sum(self.chunk_sizes))
        self._cache: cache_mod.ColumnCache | None = None
        self._epoch, self._position = 0, 0
        self._windows: dict[tuple[int, int], Columns] = {}
        self._stream: Iterator[Columns] | None = None
        self._stream_next = -1

    # -- epoch plan -------------------------------------------------------------------------

    def _order(self, epoch: int) -> tuple[EpochOrder, int, int]:
        """(order over this rank's chunks, records to serve in total, real records in order)."""
        shuffle_chunks = self.source.random_access or self.cache_mode is not None
        common = dict(
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            window_chunks=self.shuffle_window,
            shuffle_chunks=shuffle_chunks,
        )
        if self.shard_by == "record":
            order = EpochOrder(self.chunk_sizes, range(len(self.chunk_sizes)), **common)
            return order, order.total, order.total
        owned = assign_files(
            self.source.file_groups(), self.chunk_sizes, self.world_size, self.seed, epoch, self.shuffle
        )
        counts = [sum(self.chunk_sizes[c] for c in chunks) for chunks in owned]
        if self.drop_last:
            target = (min(counts) // self.batch_size) * self.batch_size
        else:
            target = max(counts)
        order = EpochOrder(self.chunk_sizes, owned[self.rank], stream=1 + self.rank, **common)
        return order, target, order.total

    def _steps(self, order: EpochOrder, target: int, start: int):
        if self.shard_by == "record":
            return record_schedule(order.total, start, self.world_size, self.rank, self.batch_size, self.drop_last)
        return local_schedule(order.total, target, start, self.batch_size)

    def __len__(self) -> int:
        """Batches per full epoch on this rank."""
        order, target, _ = self._order(self._epoch)
        return sum(1 for _ in self._steps(order, target, 0))

    def batches_left(self) -> int:
        """Batches this rank still yields in the current epoch (all of them at its start)."""
        order, target, _ = self._order(self._epoch)
        return sum(1 for _ in self._steps(order, target, self._position))

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next iteration."""
        self._epoch, self._position = int(epoch), 0

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.cache_mode is not None and self._cache is None:
            self.fill_cache()
        epoch = self._epoch
        order, target, _ = self._order(epoch)
        self._windows.clear()
        if self._cache is not None:  # the common path, kept lean: ~10 us a batch above the gather itself
            take, with_index = self._cache.take, self.with_index
            for step in self._steps(order, target, self._position):
                ids = order.record_ids(step)
                columns = take(ids)
                if with_index:
                    columns["index"] = np.array(ids)  # a copy: `ids` may be a view of the epoch order
                self._position = step.consumed
                yield self._format(columns)
        else:
            for step in self._steps(order, target, self._position):
                batch = self._stream_batch(order, step.positions)
                self._position = step.consumed
                yield batch
        if self._epoch == epoch:
            self._epoch, self._position = epoch + 1, 0

    def _stream_batch(self, order: EpochOrder, positions: np.ndarray) -> dict[str, Any]:
        """Gather a batch from the windows read from the source (no cache)."""
        ids = np.empty(len(positions), dtype=np.int64)
        parts: list[tuple[Any, Columns]] = []
        segments = list(order.segments(positions))
        lowest = min(w for w, _, _ in segments) if segments else 0
        for key in [k for k in self._windows if k[1] < lowest]:  # windows behind us are done
            del self._windows[key]
        for w, where, offsets in segments:
            ids[where] = order.ids(w)[offsets]
            data = self._window_data(order, w)
            local = order.local(w)[offsets]
            parts.append((where, {k: np.take(v, local, axis=0) for k, v in data.items()}))
        if len(parts) == 1:
            columns = parts[0][1]
        else:
            columns = {}
            for name, first in parts[0][1].items():
                out = np.empty((len(positions), *first.shape[1:]), dtype=first.dtype)
                for where, part in parts:
                    out[where] = part[name]
                columns[name] = out
        if self.with_index:
            columns["index"] = ids
        return self._format(columns)

    def _format(self, columns: dict[str, Any]) -> dict[str, Any]:
        if self.format == "numpy":
            return columns
        from_numpy = _torch().from_numpy
        out: dict[str, Any] = {}
        for name, array in columns.items():
            if not isinstance(array, np.ndarray):
                out[name] = array  # already a tensor
            elif array.dtype == object:
                out[name] = array.tolist()
            else:
                out[name] = from_numpy(array if array.flags.writeable else np.array(array))
        return out

    # -- streaming without a cache ----------------------------------------------------------

    def _window_data(self, order: EpochOrder, w: int) -> Columns:
        key = (id(order), w)
        if key not in self._windows:
            if len(self._windows) >= 2:
                self._windows.pop(next(iter(self._windows)))
            chunks = [self.preprocess(self._read_chunk(int(c))) for c in order.windows[w].chunks]
            if len(chunks) == 1:
                self._windows[key] = chunks[0]
            else:
                self._windows[key] = {k: np.concatenate([c.pop(k) for c in chunks]) for k in list(chunks[0])}
            del chunks
        return self._windows[key]

    def _read_chunk(self, index: int) -> Columns:
        if self.source.random_access:
            return self.source.read_chunk(index)
        if self._stream is None or index < self._stream_next:
            self._stream, self._stream_next = self.source.iter_chunks(index), index
        while self._stream_next < index:  # sequential source: skip forward
            next(self._stream)
            self._stream_next += 1
        chunk = next(self._stream)
        self._stream_next += 1
        return chunk

    # -- cache --------------------------------------------------------------------------------

    @property
    def cache_key(self) -> str:
        return cache_mod.cache_key(self.source, self.preprocess.key)

    def fill_cache(self) -> cache_mod.ColumnCache:
        """Fill the cache now (one pass over the source) unless it is there; return it."""
        if self._cache is not None:
            return self._cache
        key = self.cache_key
        with _progress(
            self.progress and self.rank == 0, f"caching {self.source.describe()}", self.num_records
        ) as advance:
            if self.cache_mode == "disk":
                self._cache = cache_mod.build_disk(self.source, self.preprocess, key, self.cache_dir, advance)
            else:
                self._cache = cache_mod.build_memory(self.source, self.preprocess, key, advance)
        return self._cache

    # -- resumable state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: the next batch it yields is the first one not consumed."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard_by": self.shard_by,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_records": self.num_records,
            "shuffle_window": self.shuffle_window,
            "fingerprint": self.source.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; with shard_by='record' the world size may have changed."""
        required = {
            "version",
            "epoch",
            "position",
            "seed",
            "shuffle",
            "shard_by",
            "world_size",
            "num_records",
            "fingerprint",
        }
        missing = required - set(state)
        if missing:
            raise DistmlError(f"loader state is missing {sorted(missing)}; expected a dict from Loader.state_dict()")
        if state["version"] != STATE_VERSION:
            raise DistmlError(f"loader state version {state['version']} is not supported (expected {STATE_VERSION})")
        mismatches = [
            f"{name}: saved {state[name]!r}, now {mine!r}"
            for name, mine in (
                ("seed", self.seed),
                ("shuffle", self.shuffle),
                ("shard_by", self.shard_by),
                ("num_records", self.num_records),
                ("shuffle_window", self.shuffle_window),
                ("fingerprint", self.source.fingerprint()),
            )
            if state.get(name) != mine
        ]
        if self.shard_by == "file" and state["world_size"] != self.world_size:
            mismatches.append(
                f"world_size: saved {state['world_size']}, now {self.world_size} "
                "(shard_by='file' resumes only on the same world size; use shard_by='record')"
            )
        if mismatches:
            raise DistmlError(
                "cannot resume this loader from the saved state, it was taken on different data or "
                "settings: " + "; ".join(mismatches)
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])


def _torch():
    import torch

    return torch


class _progress:
    """A rich progress bar on a terminal, nothing otherwise; yields an `advance(n)` callable."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.description, self.total = description, total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
        )
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
