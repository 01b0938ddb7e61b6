"""Sharded serving: consistent hashing moves only the keys it must, scatter-gather keeps order."""

from __future__ import annotations

from collections import Counter

import fake_replica as fake
import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distml.core.errors import DistmlError
from distml.serve import protocol
from distml.serve.protocol import InferRequest, InferResponse, PredictRequest, PredictResponse, ProtocolError, Tensor
from distml.serve.sharding import HashRing, chunk_bounds, encode_part, merge_v1, merge_v2, split_v1, split_v2

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


def _echo(request: InferRequest) -> InferResponse:
    """What a replica of an identity model answers to one part."""
    outputs = [Tensor(f"out{i}", t.datatype, t.shape, t.data) for i, t in enumerate(request.inputs)]
    return InferResponse("m", outputs, model_version="1", id=request.id)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 4),
    parts=st.integers(1, 5),
    binary=st.booleans(),
    with_bytes=st.booleans(),
)
def test_v2_scatter_gather_preserves_order(rows, cols, parts, binary, with_bytes):
    a = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols)
    b = np.arange(rows, dtype=np.float32) / 4
    inputs = [Tensor.from_numpy("a", a), Tensor.from_numpy("b", b)]
    if with_bytes:
        inputs.append(Tensor.from_numpy("c", np.array([f"row {r}" for r in range(rows)], dtype=object), "BYTES"))
    request = InferRequest(inputs, id="r1", parameters={"binary_data_output": binary}, binary_input=binary)
    pieces = split_v2(request, parts)
    assert len(pieces) == min(parts, rows)
    assert [p.inputs[0].shape[0] for p in pieces] == [b - a for a, b in chunk_bounds(rows, parts)]
    for piece in pieces:
        assert piece.id == "r1" and piece.binary_input == binary and piece.parameters == request.parameters
        # each part goes on the wire as the original did (binary tensors or JSON) and reads back the same
        body, json_length = encode_part(piece)
        assert (json_length is not None) == binary
        again = protocol.parse_infer_request(body, json_length)
        assert [t.name for t in again.inputs] == [t.name for t in piece.inputs]
        for sent, got in zip(piece.inputs, again.inputs):
            assert got.shape == sent.shape and got.datatype == sent.datatype
            assert np.array_equal(got.data, sent.data)
    merged = merge_v2([_echo(p) for p in pieces])
    assert merged.id == "r1" and [o.name for o in merged.outputs] == [f"out{i}" for i in range(len(inputs))]
    for out, sent in zip(merged.outputs, inputs):
        assert out.shape == sent.shape and out.datatype == sent.datatype
        assert np.array_equal(out.data, sent.data)


def test_unsplittable_requests_and_disagreeing_parts_are_refused():
    one_row = InferRequest([Tensor.from_numpy("a", np.zeros((1, 3), np.float32))])
    assert len(split_v2(one_row, 4)) == 1  # nothing to scatter: the gateway sends it whole
    mismatched = InferRequest(
        [Tensor.from_numpy("a", np.zeros((4, 1), np.float32)), Tensor.from_numpy("b", np.zeros((3, 1), np.float32))]
    )
    with pytest.raises(ProtocolError, match="do not share a first"):
        split_v2(mismatched, 2)
    scalar = InferRequest([Tensor.from_numpy("a", np.float32(1.0))])
    with pytest.raises(ProtocolError):
        split_v2(scalar, 2)

    def part(name: str, array) -> InferResponse:
        return InferResponse("m", [Tensor.from_numpy(name, array)])

    with pytest.raises(DistmlError, match="disagree"):
        merge_v2([part("a", np.ones(1)), part("b", np.ones(1))])
    with pytest.raises(DistmlError, match="datatype or shape"):
        merge_v2([part("a", np.ones((1, 2), np.float32)), part("a", np.ones((1, 3), np.float32))])
    with pytest.raises(DistmlError, match="datatype or shape"):
        merge_v2([part("a", np.ones(1, np.float32)), part("a", np.ones(1, np.int64))])
    with pytest.raises(DistmlError):
        merge_v2([])
    with pytest.raises(DistmlError):
        merge_v1([])


def test_v1_scatter_gather_preserves_order():
    request = PredictRequest([[i, i + 1] for i in range(7)], {"signature_name": "serving_default"})
    pieces = split_v1(request, 3)
    assert [len(p.instances) for p in pieces] == [3, 2, 2]
    assert all(p.extra == {"signature_name": "serving_default"} for p in pieces)
    merged = merge_v1([PredictResponse(p.instances) for p in pieces])
    assert merged.predictions == request.instances


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A gateway with 2 shard groups of 1 fake replica each, shared by the tests below."""
    with fake.gateway_process(tmp_path_factory.mktemp("sharded"), shards=2, replicas=1) as (base, _proc):
        yield base


def served_per_group(client: httpx.Client) -> dict[str, int]:
    return {g["name"]: sum(r["served"] for r in g["replicas"]) for g in client.get("/admin/replicas").json()["groups"]}


def test_gateway_routes_keys_consistently_and_scatters_batches(sharded):
    with httpx.Client(base_url=sharded, timeout=30) as client:
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
        owners = {k: next(iter(g)) for k, g in groups.items()}
        assert set(owners.values()) == {"0", "1"}  # and both groups get keys
        ring = HashRing(range(2))
        assert all(group == str(ring.node_for(k)) for k, group in owners.items())

        before = served_per_group(client)
        nested = {
            "inputs": [{"name": "x", "shape": [7, 2], "datatype": "FP32", "data": [[r, r + 0.5] for r in range(7)]}]
        }
        resp = client.post("/v2/models/echo/infer", json=nested)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-distml-group"] == "0,1"
        assert resp.headers["x-model-version"] == "echo:1" and resp.json()["model_version"] == "1"
        out = resp.json()["outputs"][0]
        assert out["shape"] == [7, 2] and out["data"] == [v for r in range(7) for v in (2 * r, 2 * r + 1)]
        flat = fake.v2_body(rows=5, cols=3)
        resp = client.post("/v2/models/echo/infer", json=flat)
        assert resp.headers["x-distml-group"] == "0,1"
        assert resp.json()["outputs"][0]["data"] == [2 * v for v in flat["inputs"][0]["data"]]
        resp = client.post("/v1/models/echo:predict", json={"instances": [[i] for i in range(5)]})
        assert resp.status_code == 200 and resp.headers["x-distml-group"] == "0,1"
        assert resp.headers["x-model-version"] == "echo:1"
        assert resp.json()["predictions"] == [[2 * i] for i in range(5)]
        after = served_per_group(client)
        assert all(after[g] - before[g] == 3 for g in after), (before, after)  # each group got a part
        # a part's error comes back as the answer, not a half-merged result
        resp = client.post("/v2/models/nope/infer", json=fake.v2_body(rows=4))
        assert resp.status_code == 404 and "error" in resp.json()


@pytest.mark.parametrize("binary_output", [True, False])
def test_scatter_gather_of_binary_tensors_answers_as_one_group_does(sharded, binary_output):
    x = (np.arange(21, dtype=np.float32) * 0.5 - 3).reshape(7, 3)
    ids = np.arange(7, dtype=np.int64) * 1_000_000_007 - 5
    parameters = {"binary_data_output": True} if binary_output else None
    body, json_length = protocol.encode_infer_request(
        {"x": x, "ids": ids}, binary=True, id="req-1", parameters=parameters
    )
    headers = {protocol.HEADER_LENGTH: str(json_length), "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=sharded, timeout=30) as client:
        before = served_per_group(client)
        scattered = client.post("/v2/models/echo/infer", content=body, headers=headers)
        assert scattered.status_code == 200, scattered.text
        assert scattered.headers["x-distml-group"] == "0,1"  # split over both groups
        assert served_per_group(client) == {g: n + 1 for g, n in before.items()}
        # the same request, unsharded: a shard key sends it whole to one group
        whole = client.post("/v2/models/echo/infer", content=body, headers={**headers, "X-Shard-Key": "k"})
        assert whole.status_code == 200, whole.text
        assert whole.headers["x-distml-group"] in ("0", "1")

    answers = []
    for resp in (scattered, whole):
        assert (protocol.HEADER_LENGTH.lower() in resp.headers) == binary_output
        assert resp.headers["x-model-version"] == "echo:1"
        answers.append(protocol.parse_infer_response(resp.content, resp.headers.get(protocol.HEADER_LENGTH)))
    split_answer, whole_answer = answers
    for answer in answers:
        assert answer.id == "req-1" and answer.model_version == "1"
        assert [(o.name, o.datatype, o.shape) for o in answer.outputs] == [
            ("output0", "FP32", (7, 3)),
            ("output1", "INT64", (7,)),
        ]
    for got, expected in zip(split_answer.outputs, whole_answer.outputs):
        assert np.array_equal(got.data, expected.data)
    assert np.array_equal(split_answer.outputs[0].data, 2 * x)
    assert np.array_equal(split_answer.outputs[1].data, 2 * ids)
