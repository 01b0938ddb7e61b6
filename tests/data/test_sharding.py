"""Sharding and resume properties: disjoint, complete, equal batch counts, exact resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from distml.core.errors import DistmlError
from distml.data import ArraySource, Loader


def make_source(n: int, chunk_rows: int = 7) -> ArraySource:
    return ArraySource({"x": np.arange(n, dtype=np.int64) * 3, "y": np.arange(n) % 10}, chunk_rows=chunk_rows)


def epoch_ids(loader: Loader) -> list[np.ndarray]:
    return [np.asarray(b["index"]) for b in loader]


def loaders(source, world, **kw):
    return [Loader(source, shard=(r, world), with_index=True, format="numpy", **kw) for r in range(world)]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    world=st.integers(1, 5),
    batch=st.integers(1, 17),
    chunk=st.integers(1, 40),
    cache=st.sampled_from(["memory", None]),
    window=st.sampled_from([None, 1, 3]),
)
def test_shards_disjoint_complete_equal_counts(n, world, batch, chunk, cache, window):
    source = make_source(n, chunk_rows=chunk)
    per_rank = [epoch_ids(l) for l in loaders(source, world, batch_size=batch, cache=cache, shuffle_window=window)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, "every rank must get the same number of batches"
    sizes = [[len(x) for x in b] for b in per_rank]
    assert all(s == sizes[0] for s in sizes), "batch sizes must match across ranks step by step"
    seen = np.concatenate([np.concatenate(b) for b in per_rank if b]) if n else np.empty(0)
    counter = Counter(seen.tolist())
    assert set(counter) == set(range(n)), "the union of the shards is the whole data set"
    pads = sum(c - 1 for c in counter.values())
    assert pads == (-n) % world, "only the padding needed for equal counts repeats records"


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 4), batch=st.integers(1, 9))
def test_drop_last_is_disjoint_and_equal(n, world, batch):
    per_rank = [epoch_ids(l) for l in loaders(make_source(n), world, batch_size=batch, drop_last=True)]
    seen = [i for b in per_rank for x in b for i in x.tolist()]
    assert len(seen) == len(set(seen)) == (n // (world * batch)) * world * batch
    assert len({len(b) for b in per_rank}) == 1


def test_order_deterministic_and_changes_with_epoch():
    source = make_source(200)
    a = Loader(source, batch_size=10, with_index=True, seed=3)
    b = Loader(source, batch_size=10, with_index=True, seed=3)
    first_a, first_b = [x["index"].tolist() for x in a], [x["index"].tolist() for x in b]
    assert first_a == first_b
    second_a = [x["index"].tolist() for x in a]  # the loader moved on to epoch 1
    assert second_a != first_a and sorted(sum(second_a, [])) == list(range(200))
    assert [x["index"].tolist() for x in Loader(source, batch_size=10, with_index=True, seed=4)] != first_a
    unshuffled = [x["index"].tolist() for x in Loader(source, batch_size=10, with_index=True, shuffle=False)]
    assert sum(unshuffled, []) == list(range(200))


def test_global_order_independent_of_world_size():
    """The concatenation of global batches is the same sequence on 1, 2 or 4 workers."""
    source = make_source(512, chunk_rows=16)
    sequences = []
    for world in (1, 2, 4):
        per_rank = [epoch_ids(l) for l in loaders(source, world, batch_size=32 // world)]
        global_seq = []
        for step in range(len(per_rank[0])):
            for r in range(world):
                global_seq.extend(per_rank[r][step].tolist())
        sequences.append(global_seq)
    assert sequences[0] == sequences[1] == sequences[2]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 250),
    world=st.integers(1, 4),
    new_world=st.integers(1, 4),
    batch=st.integers(1, 8),
    cut=st.floats(0, 1),
    cache=st.sampled_from(["memory", None]),
    epoch=st.integers(0, 2),
)
@example(n=9, world=2, new_world=3, batch=2, cut=0.75, cache="memory", epoch=0)  # padding repeats seen records
def test_resume_yields_exactly_the_unseen_samples(n, world, new_world, batch, cut, cache, epoch):
    """Stop every rank after k steps, resume on `new_world` ranks: the rest of the epoch is
    exactly the records not yet seen (plus only the padding for equal counts)."""
    source = make_source(n, chunk_rows=5)
    kw = dict(batch_size=batch, cache=cache, seed=11)
    first = loaders(source, world, **kw)
    for l in first:
        l.set_epoch(epoch)
    steps = len(first[0])
    k = int(cut * steps)
    seen: list[int] = []
    states = []
    for l in first:
        it = iter(l)
        for _ in range(k):
            seen.extend(next(it)["index"].tolist())
        states.append(l.state_dict())
    assert all(s == states[0] for s in states), "every rank saves the same state"
    second = loaders(source, new_world, **kw)
    for l in second:
        l.load_state_dict(states[0])
    rest = [i for l in second for b in l for i in b["index"].tolist()]
    unseen = set(range(n)) - set(seen)
    assert set(rest) >= unseen, "every record not seen before the cut is served after it"
    # and nothing more than the padding for equal counts, which repeats the epoch's last records
    # (already seen ones when the cut is late: n=9, 2 -> 3 ranks, batch 2, cut after 2 of 3 steps)
    padding = (-(n - min(n, k * world * batch))) % new_world
    assert len(rest) == len(unseen) + padding
    assert all(l.epoch == epoch + 1 for l in second)


def test_resume_continues_the_same_global_sequence():
    source = make_source(300, chunk_rows=10)
    full = [b["index"].tolist() for b in Loader(source, batch_size=20, with_index=True)]
    loader = Loader(source, batch_size=20, with_index=True)
    it = iter(loader)
    head = [next(it)["index"].tolist() for _ in range(4)]
    state = loader.state_dict()
    resumed = Loader(source, batch_size=20, with_index=True)
    resumed.load_state_dict(state)
    assert head + [b["index"].tolist() for b in resumed] == full


def test_shard_by_file():
    parts = [ArraySource({"x": np.arange(k)}, chunk_rows=4) for k in (10, 7, 12, 3, 9)]

    # a multi-file source: each part is one file of chunks
    class Files(ArraySource):
        def file_groups(self):
            groups, start = [], 0
            for p in parts:
                groups.append(list(range(start, start + len(p.chunk_sizes()))))
                start += len(p.chunk_sizes())
            return groups

    chunks = [p.read_chunk(i)["x"] for p in parts for i in range(len(p.chunk_sizes()))]
    data = np.concatenate(chunks)
    source = Files({"x": data}, chunk_rows=4)
    # chunk boundaries must match the parts for this test: rebuild sizes accordingly
    source._sizes = [len(c) for c in chunks]
    offsets = np.concatenate([[0], np.cumsum(source._sizes)])
    source.read_chunk = lambda i: {"x": data[offsets[i] : offsets[i + 1]]}
    groups = source.file_groups()
    file_of = {
        int(i): g for g, chunk_ids in enumerate(groups) for c in chunk_ids for i in range(offsets[c], offsets[c + 1])
    }
    per_rank = [epoch_ids(l) for l in loaders(source, 2, batch_size=4, shard_by="file")]
    assert len(per_rank[0]) == len(per_rank[1])
    files = [{file_of[i] for b in r for i in b.tolist()} for r in per_rank]
    assert not files[0] & files[1], "each file is read by one rank only"
    assert files[0] | files[1] == set(range(5))
    with pytest.raises(DistmlError, match="one file per worker"):
        list(Loader(source, batch_size=4, shard=(0, 6), shard_by="file"))
    state = Loader(source, batch_size=4, shard=(0, 2), shard_by="file").state_dict()
    with pytest.raises(DistmlError, match="same world size"):
        Loader(source, batch_size=4, shard=(0, 3), shard_by="file").load_state_dict(state)


def test_bad_arguments_are_clear():
    source = make_source(10)
    with pytest.raises(DistmlError, match="rank < world_size"):
        Loader(source, batch_size=4, shard=(2, 2))
    with pytest.raises(DistmlError, match="batch_size"):
        Loader(source, batch_size=0)
    with pytest.raises(DistmlError, match="cache must be"):
        Loader(source, batch_size=4, cache="ram")
    with pytest.raises(DistmlError, match="cache_dir"):
        Loader(source, batch_size=4, cache="disk")
    with pytest.raises(DistmlError, match="missing"):
        Loader(source, batch_size=4).load_state_dict({"epoch": 1})
    other = Loader(make_source(11), batch_size=4)
    with pytest.raises(DistmlError, match="num_records"):
        other.load_state_dict(Loader(source, batch_size=4).state_dict())
