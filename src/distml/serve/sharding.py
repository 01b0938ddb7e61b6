"""Sharded serving: consistent hashing of X-Shard-Key to a replica group, scatter-gather of batches.

`HashRing` (virtual nodes, 64-bit BLAKE2b points) moves only ~1/K of keys when K changes; `uhashring`
was considered, but a dependency for 40 lines does not pay. split/merge cut a V2 batch (the protocol's
`InferRequest`, JSON or binary tensors) along the first axis of its inputs (V1: `instances`) and re-join
the parts' outputs in order.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from distml.core.errors import DistmlError
from distml.serve import protocol
from distml.serve.protocol import InferRequest, InferResponse, PredictRequest, PredictResponse, ProtocolError, Tensor


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing: `node_for(key)` is the first virtual node clockwise from hash(key)."""

    def __init__(self, nodes: Iterable[Hashable] = (), vnodes: int = 160):
        if vnodes < 1:
            raise DistmlError(f"vnodes must be a positive integer, got {vnodes}")
        self.vnodes = vnodes
        self._nodes: list[Hashable] = []
        self._points: list[int] = []
        self._owners: list[Hashable] = []
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> list[Hashable]:
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def add(self, node: Hashable) -> None:
        if node in self._nodes:
            raise DistmlError(f"node {node!r} is already on the hash ring")
        self._nodes.append(node)
        for i in range(self.vnodes):
            point = _point(f"{node!r}#{i}")
            at = bisect.bisect_left(self._points, point)
            self._points.insert(at, point)
            self._owners.insert(at, node)

    def remove(self, node: Hashable) -> None:
        if node not in self._nodes:
            raise DistmlError(f"node {node!r} is not on the hash ring (nodes: {self._nodes})")
        self._nodes.remove(node)
        keep = [(p, o) for p, o in zip(self._points, self._owners) if o != node]
        self._points = [p for p, _ in keep]
        self._owners = [o for _, o in keep]

    def node_for(self, key: str | bytes) -> Hashable:
        if not self._points:
            raise DistmlError("the hash ring has no nodes; add at least one shard group")
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        at = bisect.bisect_right(self._points, _point(text))
        return self._owners[at % len(self._owners)]


# ---------------------------------------------------------------- scatter / gather


def chunk_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """`rows` split into min(parts, rows) contiguous, near-equal [start, stop) ranges."""
    parts = max(1, min(parts, rows))
    base, extra = divmod(rows, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _rows(tensors: Sequence[Tensor], what: str) -> int:
    """The first dimension every tensor shares, or a ProtocolError saying why the batch cannot be split."""
    rows = {t.shape[0] if t.shape else None for t in tensors}
    if len(rows) != 1 or None in rows:
        raise ProtocolError(400, f"{what} cannot be split: its tensors do not share a first (batch) dimension")
    return rows.pop()


def split_v2(request: InferRequest, parts: int) -> list[InferRequest]:
    """Split a V2 infer request along the first axis of its inputs into contiguous parts."""
    rows = _rows(request.inputs, "V2 request")
    return [
        dataclasses.replace(
            request,
            inputs=[
                dataclasses.replace(t, shape=(stop - start, *t.shape[1:]), data=t.data[start:stop])
                for t in request.inputs
            ],
        )
        for start, stop in chunk_bounds(rows, parts)
    ]


def encode_part(request: InferRequest) -> tuple[bytes, int | None]:
    """One part as a request body, binary tensors if the original used them; (body, JSON length)."""
    return protocol.encode_infer_request(
        request.inputs,
        binary=request.binary_input,
        outputs=request.outputs,
        id=request.id,
        parameters=request.parameters,
    )


def merge_v2(responses: Sequence[InferResponse]) -> InferResponse:
    """Join the parts' V2 infer responses back into one, outputs concatenated along the first axis."""
    if not responses:
        raise DistmlError("nothing to merge: no part responses")
    first = responses[0]
    names = [o.name for o in first.outputs]
    outputs = []
    for index, name in enumerate(names):
        pieces = []
        for response in responses:
            if [o.name for o in response.outputs] != names:
                raise DistmlError(
                    f"shard responses disagree on outputs: expected {names}, got {[o.name for o in response.outputs]}"
                )
            pieces.append(response.outputs[index])
        if any(not p.shape for p in pieces) or len({(p.datatype, p.shape[1:]) for p in pieces}) != 1:
            raise DistmlError(f"shard responses disagree on the datatype or shape of output {name!r}")
        data = np.concatenate([np.asarray(p.data) for p in pieces])
        outputs.append(dataclasses.replace(pieces[0], shape=tuple(data.shape), data=data))
    return dataclasses.replace(first, outputs=outputs)


def split_v1(request: PredictRequest, parts: int) -> list[PredictRequest]:
    rows = len(request.instances)
    return [dataclasses.replace(request, instances=request.instances[a:b]) for a, b in chunk_bounds(rows, parts)]


def merge_v1(responses: Sequence[PredictResponse]) -> PredictResponse:
    if not responses:
        raise DistmlError("nothing to merge: no part responses")
    return dataclasses.replace(responses[0], predictions=[p for r in responses for p in r.predictions])
