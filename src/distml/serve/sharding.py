"""Sharded serving: consistent hashing of X-Shard-Key to a replica group, scatter-gather of batches.

`HashRing` (virtual nodes, 64-bit BLAKE2b points) moves only ~1/K of keys when K changes; `uhashring`
was considered, but a dependency for 40 lines does not pay. split/merge cut a V2 batch along the first
axis of its inputs (V1: `instances`) and re-join the parts' outputs in order.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from distml.errors import DistmlError


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


def v2_batch_rows(body: Any) -> int | None:
    """The shared first dimension of every input of a JSON V2 infer request, or None if not splittable."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        return None
    params = body.get("parameters") or {}
    if isinstance(params, dict) and params.get("binary_data_output"):
        return None
    for out in body.get("outputs") or []:
        if isinstance(out, dict) and isinstance(out.get("parameters"), dict) and out["parameters"].get("binary_data"):
            return None
    rows = None
    for item in body["inputs"]:
        if not isinstance(item, dict) or "data" not in item:
            return None
        shape = item.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        if not isinstance(item["data"], list):
            return None
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            return None
        nested = bool(item["data"]) and isinstance(item["data"][0], list)
        expected = shape[0] if nested else math.prod(shape)
        if len(item["data"]) != expected:
            return None
    return rows


def _slice_rows(item: dict, start: int, stop: int) -> dict:
    shape = item["shape"]
    data = item["data"]
    if data and isinstance(data[0], list):  # nested: the first axis is the outer list
        part = data[start:stop]
    else:
        row = math.prod(shape[1:])
        part = data[start * row : stop * row]
    return {**item, "shape": [stop - start, *shape[1:]], "data": part}


def split_v2(body: dict, parts: int) -> list[dict]:
    """Split a V2 infer request along the first axis of its inputs into contiguous parts."""
    rows = v2_batch_rows(body)
    if rows is None:
        raise DistmlError("V2 request cannot be split: every input needs JSON `data` and the same first dimension")
    return [
        {**body, "inputs": [_slice_rows(item, start, stop) for item in body["inputs"]]}
        for start, stop in chunk_bounds(rows, parts)
    ]


def merge_v2(responses: Sequence[dict]) -> dict:
    """Join the parts' V2 infer responses back into one, outputs concatenated along the first axis."""
    if not responses:
        raise DistmlError("nothing to merge: no part responses")
    first = responses[0]
    names = [o.get("name") for o in first.get("outputs", [])]
    merged_outputs = []
    for index, name in enumerate(names):
        data: list = []
        rows = 0
        template = first["outputs"][index]
        for resp in responses:
            outputs = resp.get("outputs") or []
            if index >= len(outputs) or outputs[index].get("name") != name:
                raise DistmlError(
                    f"shard responses disagree on outputs: expected {names}, got {[o.get('name') for o in outputs]}"
                )
            out = outputs[index]
            if "data" not in out or not isinstance(out.get("shape"), list) or not out["shape"]:
                raise DistmlError(f"shard output {name!r} has no JSON data or no shape; cannot gather it")
            data.extend(out["data"])
            rows += out["shape"][0]
        merged_outputs.append({**template, "shape": [rows, *template["shape"][1:]], "data": data})
    return {**first, "outputs": merged_outputs}


def v1_batch_rows(body: Any) -> int | None:
    if isinstance(body, dict) and isinstance(body.get("instances"), list):
        return len(body["instances"])
    return None


def split_v1(body: dict, parts: int) -> list[dict]:
    rows = v1_batch_rows(body)
    if rows is None:
        raise DistmlError('V1 request cannot be split: expected {"instances": [...]}')
    return [{**body, "instances": body["instances"][start:stop]} for start, stop in chunk_bounds(rows, parts)]


def merge_v1(responses: Sequence[dict]) -> dict:
    predictions: list = []
    for resp in responses:
        if not isinstance(resp.get("predictions"), list):
            raise DistmlError("shard response has no `predictions` list; cannot gather it")
        predictions.extend(resp["predictions"])
    return {**responses[0], "predictions": predictions}
