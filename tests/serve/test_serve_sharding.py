"""Sharded serving: consistent hashing moves only the keys it must, scatter-gather keeps order."""

from __future__ import annotations

from collections import Counter

import fake_replica as fake
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distml.errors import DistmlError
from distml.serve.sharding import HashRing, chunk_bounds, merge_v1, merge_v2, split_v1, split_v2, v2_batch_rows

KEYS = [f"user-{i}" for i in range(20000)]


def test_same_key_same_group_and_even_spread():
    ring = HashRing(range(4))
    owners = [ring.node_for(k) for k in KEYS]
    again = HashRing(range(4))
    assert owners == [again.node_for(k) for k in KEYS]  # deterministic across instances and processes
    shares = Counter(owners)
    assert set(shares) == {0, 1, 2, 3}
    for node, n in shares.items():
        assert 0.18 < n / len(KEYS) < 0.32, (node, shares)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_changing_group_count_moves_only_about_one_in_k_keys(k):
    before = HashRing(range(k))
    after = HashRing(range(k + 1))
    moved = [key for key in KEYS if before.node_for(key) != after.node_for(key)]
    assert all(after.node_for(key) == k for key in moved)  # keys move only to the new group
    assert 0.5 / (k + 1) < len(moved) / len(KEYS) < 1.6 / (k + 1)

    removed = HashRing(range(k + 1))
    removed.remove(k)
    assert all(removed.node_for(key) == before.node_for(key) for key in KEYS)  # back exactly as before
    with pytest.raises(DistmlError):
        removed.remove(k)
    with pytest.raises(DistmlError):
        HashRing().node_for("x")


def test_chunk_bounds_cover_rows_in_order():
    assert chunk_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert chunk_bounds(2, 5) == [(0, 1), (1, 2)]
    assert chunk_bounds(1, 1) == [(0, 1)]


def _echo_v2(request: dict) -> dict:
    return {
        "model_name": "m",
        "model_version": "1",
        "outputs": [
            {"name": f"out{i}", "shape": item["shape"], "datatype": item["datatype"], "data": item["data"]}
            for i, item in enumerate(request["inputs"])
        ],
    }


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 4), parts=st.integers(1, 5), nested=st.booleans())
def test_v2_scatter_gather_preserves_order(rows, cols, parts, nested):
    flat = list(range(rows * cols))
    data = [flat[r * cols : (r + 1) * cols] for r in range(rows)] if nested else flat
    request = {
        "id": "r1",
        "inputs": [
            {"name": "a", "shape": [rows, cols], "datatype": "INT32", "data": data},
            {"name": "b", "shape": [rows], "datatype": "INT32", "data": list(range(rows))},
        ],
    }
    pieces = split_v2(request, parts)
    assert len(pieces) == min(parts, rows)
    assert sum(p["inputs"][0]["shape"][0] for p in pieces) == rows
    merged = merge_v2([_echo_v2(p) for p in pieces])
    assert merged["outputs"][0]["data"] == data
    assert merged["outputs"][0]["shape"] == [rows, cols]
    assert merged["outputs"][1]["data"] == list(range(rows))


def test_unsplittable_requests_are_recognised():
    good = fake.v2_body(rows=4)
    assert v2_batch_rows(good) == 4
    mismatched = {
        "inputs": [
            {"name": "a", "shape": [4, 1], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [3, 1], "datatype": "FP32", "data": [1, 2, 3]},
        ]
    }
    assert v2_batch_rows(mismatched) is None
    assert v2_batch_rows({**good, "parameters": {"binary_data_output": True}}) is None
    assert v2_batch_rows({"inputs": [{"name": "a", "shape": [4, 2], "datatype": "FP32", "data": [1]}]}) is None
    with pytest.raises(DistmlError):
        split_v2(mismatched, 2)
    with pytest.raises(DistmlError, match="disagree"):
        merge_v2(
            [
                {"outputs": [{"name": "a", "shape": [1], "data": [1]}]},
                {"outputs": [{"name": "b", "shape": [1], "data": [1]}]},
            ]
        )


def test_v1_scatter_gather_preserves_order():
    request = {"instances": [[i, i + 1] for i in range(7)]}
    pieces = split_v1(request, 3)
    assert [len(p["instances"]) for p in pieces] == [3, 2, 2]
    merged = merge_v1([{"predictions": p["instances"]} for p in pieces])
    assert merged["predictions"] == request["instances"]


def test_gateway_routes_keys_consistently_and_scatters_batches(tmp_path):
    with fake.gateway_process(tmp_path, "--model", "echo:1", "--shards", "2", "--replicas", "1") as (base, _proc):
        with httpx.Client(base_url=base, timeout=30) as client:
            groups: dict[str, set[str]] = {}
            for _round in range(3):
                for i in range(12):
                    key = f"customer-{i}"
                    resp = client.post(
                        "/v2/models/echo/infer", json=fake.v2_body(rows=3, start=i), headers={"X-Shard-Key": key}
                    )
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["outputs"][0]["shape"] == [3, 3]
                    groups.setdefault(key, set()).add(resp.headers["x-distml-group"])
            assert all(len(g) == 1 for g in groups.values()), groups  # same key -> same group, always
            assert {g.pop() for g in groups.values()} == {"0", "1"}  # and both groups get keys
            ring = HashRing(range(2))
            assert all(
                resp_group == str(ring.node_for(k))
                for k, resp_group in ((k, next(iter(g))) for k, g in groups.items() if g)
            )

            before = {
                g["name"]: sum(r["served"] for r in g["replicas"])
                for g in client.get("/admin/replicas").json()["groups"]
            }
            nested = {
                "inputs": [{"name": "x", "shape": [7, 2], "datatype": "FP32", "data": [[r, r + 0.5] for r in range(7)]}]
            }
            resp = client.post("/v2/models/echo/infer", json=nested)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-distml-group"] == "0,1"
            assert resp.headers["x-model-version"] == "1"
            out = resp.json()["outputs"][0]
            assert out["shape"] == [7, 2] and out["data"] == [[2 * r, 2 * r + 1] for r in range(7)]
            flat = fake.v2_body(rows=5, cols=3)
            resp = client.post("/v2/models/echo/infer", json=flat)
            assert resp.json()["outputs"][0]["data"] == [2 * v for v in flat["inputs"][0]["data"]]
            resp = client.post("/v1/models/echo:predict", json={"instances": [[i] for i in range(5)]})
            assert resp.status_code == 200 and resp.headers["x-distml-group"] == "0,1"
            assert resp.json()["predictions"] == [[2 * i] for i in range(5)]
            after = {
                g["name"]: sum(r["served"] for r in g["replicas"])
                for g in client.get("/admin/replicas").json()["groups"]
            }
            assert all(after[g] - before[g] == 3 for g in after), (before, after)  # each group got a part
            # a part's error comes back as the answer, not a half-merged result
            resp = client.post("/v2/models/nope/infer", json=fake.v2_body(rows=4))
            assert resp.status_code == 404 and "error" in resp.json()
