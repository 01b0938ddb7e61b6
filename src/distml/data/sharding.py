"""Epoch order and sharding: which record each rank reads at each step, from (seed, epoch).

The epoch order is a permutation of the chunks followed by a shuffle of the records inside
consecutive windows of chunks (memory is bounded by a window). It depends only on the data
and (seed, epoch), never on the world size. Global batch t is positions [t*W*B, (t+1)*W*B)
of that order and rank r takes its r-th slice, so the sequence of samples a job sees is the
same on any number of workers, and a resume on another world size continues it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from distml.core.errors import DistmlError


def epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *stream])


@dataclass
class Window:
    """A run of chunks whose records are shuffled together."""

    chunks: np.ndarray  # chunk ids, in the epoch's chunk order
    start: int  # position of the window's first record in the epoch order
    size: int


class EpochOrder:
    """The epoch's record order over the chosen chunks, materialised one window at a time.

    `ids(w)` gives the record ids of window w in order; `local(w)` the index of each of those
    records inside the concatenation of the window's chunks (as they are read).
    """

    def __init__(
        self,
        chunk_sizes: Sequence[int],
        chunks: Sequence[int],
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        window_chunks: int | None,
        shuffle_chunks: bool,
        stream: int = 0,
    ):
        sizes = np.asarray(chunk_sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        chunk_ids = np.asarray(list(chunks), dtype=np.int64)
        self.seed, self.epoch, self.shuffle, self.stream = seed, epoch, shuffle, stream
        if shuffle and shuffle_chunks and len(chunk_ids) > 1:
            chunk_ids = chunk_ids[epoch_rng(seed, epoch, stream, 0).permutation(len(chunk_ids))]
        step = len(chunk_ids) if not window_chunks else max(1, int(window_chunks))
        self.windows: list[Window] = []
        position = 0
        for lo in range(0, len(chunk_ids), max(step, 1)):
            ids = chunk_ids[lo : lo + step]
            size = int(sizes[ids].sum())
            self.windows.append(Window(ids, position, size))
            position += size
        self.total = position
        self._starts = np.array([w.start for w in self.windows] + [position], dtype=np.int64)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def window_of(self, position: int) -> int:
        return int(np.searchsorted(self._starts, position, side="right") - 1)

    def _build(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        if w not in self._cache:
            window = self.windows[w]
            ids = (
                np.concatenate([np.arange(self.offsets[c], self.offsets[c + 1]) for c in window.chunks])
                if len(window.chunks)
                else np.empty(0, np.int64)
            )
            local = np.arange(len(ids), dtype=np.int64)
            if self.shuffle and len(ids) > 1:
                perm = epoch_rng(self.seed, self.epoch, self.stream, 1, w).permutation(len(ids))
                ids, local = ids[perm], local[perm]
            if len(self._cache) >= 2:  # keep the current and the previous window only
                self._cache.pop(next(iter(self._cache)))
            self._cache[w] = (ids, local)
        return self._cache[w]

    def ids(self, w: int) -> np.ndarray:
        return self._build(w)[0]

    def local(self, w: int) -> np.ndarray:
        return self._build(w)[1]

    def segments(self, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray | slice, np.ndarray]]:
        """Group epoch positions by window: (window, where in `positions`, offsets in the window)."""
        if len(self.windows) == 1:
            yield 0, slice(None), positions
            return
        windows = np.searchsorted(self._starts, positions, side="right") - 1
        if len(windows) and windows[0] == windows[-1] and (windows == windows[0]).all():
            yield int(windows[0]), slice(None), positions - self._starts[windows[0]]
            return
        for w in np.unique(windows):
            mask = windows == w
            yield int(w), mask, positions[mask] - self._starts[w]

    def record_ids(self, step: RankStep) -> np.ndarray:
        """Record ids a step reads (a view when they are one run in one window)."""
        if step.span is not None and len(self.windows) == 1:
            return self.ids(0)[step.span[0] : step.span[1]]
        positions = step.positions
        out = np.empty(len(positions), dtype=np.int64)
        for w, where, offsets in self.segments(positions):
            out[where] = self.ids(w)[offsets]
        return out


@dataclass(frozen=True)
class RankStep:
    """The epoch positions one rank reads at one step (pad positions already mapped): the run
    `span` = (start, stop) when they are contiguous, else the array `mapped`."""

    index: int
    consumed: int  # epoch position reached by all ranks once this step is done
    span: tuple[int, int] | None = None
    mapped: np.ndarray | None = None

    @property
    def positions(self) -> np.ndarray:
        if self.mapped is not None:
            return self.mapped
        assert self.span is not None
        return np.arange(self.span[0], self.span[1], dtype=np.int64)


def record_schedule(total: int, start: int, world: int, rank: int, batch: int, drop_last: bool) -> Iterator[RankStep]:
    """Steps of one rank when sharding by record, from epoch position `start`.

    The remaining records [start, total) are split into global batches of world*batch; rank r
    takes the r-th equal slice of each. With drop_last the incomplete last global batch is
    dropped; otherwise the remainder is padded to a multiple of world by repeating the
    epoch's last records, so every rank gets the same number of batches (a smaller last one).
    """
    _check_shard(world, rank, batch)
    remaining = max(0, total - start)
    global_batch = world * batch
    if drop_last:
        end = start + (remaining // global_batch) * global_batch
    else:
        end = start + math.ceil(remaining / world) * world
    index, lo = 0, start
    while lo < end:
        hi = min(lo + global_batch, end)
        share = (hi - lo) // world
        span = (lo + rank * share, lo + (rank + 1) * share)
        if span[1] > total:  # padding: positions past the end repeat the epoch's last records
            positions = np.arange(*span, dtype=np.int64)
            over = positions >= total
            positions[over] = total - 1 - ((positions[over] - total) % max(total, 1))
            yield RankStep(index, min(hi, total), mapped=positions)
        else:
            yield RankStep(index, min(hi, total), span)
        index, lo = index + 1, hi


def local_schedule(count: int, target: int, start: int, batch: int) -> Iterator[RankStep]:
    """Steps over a rank's own records (sharding by file), padded or cut to `target` records."""
    index, lo = 0, start
    while lo < target:
        hi = min(lo + batch, target)
        if hi > count:
            positions = np.arange(lo, hi, dtype=np.int64)
            over = positions >= count
            positions[over] = count - 1 - ((positions[over] - count) % max(count, 1))
            yield RankStep(index, hi, mapped=positions)
        else:
            yield RankStep(index, hi, (lo, hi))
        index, lo = index + 1, hi


def assign_files(
    groups: Sequence[Sequence[int]], chunk_sizes: Sequence[int], world: int, seed: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """Deal whole files to ranks, largest first to the least-loaded rank (deterministic)."""
    if len(groups) < world:
        raise DistmlError(
            f"sharding by file needs at least one file per worker: {len(groups)} files for {world} workers; "
            "use shard_by='record' or split the data into more files"
        )
    sizes = [int(sum(chunk_sizes[c] for c in g)) for g in groups]
    order = list(range(len(groups)))
    if shuffle:
        order = list(epoch_rng(seed, epoch, 2).permutation(len(groups)))
    order.sort(key=lambda g: -sizes[g])  # stable: equal sizes keep the shuffled order
    loads = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for g in order:
        r = min(range(world), key=lambda k: (loads[k], k))
        owned[r].append(g)
        loads[r] += sizes[g]
    return [[c for g in files for c in groups[g]] for files in owned]


def _check_shard(world: int, rank: int, batch: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise DistmlError(f"shard=(rank, world_size) must satisfy 0 <= rank < world_size, got ({rank}, {world})")
    if batch < 1:
        raise DistmlError(f"batch_size must be a positive integer, got {batch}")
