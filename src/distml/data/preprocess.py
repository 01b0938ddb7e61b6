"""Preprocessing applied to each chunk before it is cached: decode, resize, normalise.

Every step has a `key` that names its code and parameters; the cache key combines it with
the source fingerprint, so changing a step (or its version) rebuilds the cache. For user
functions the key also hashes the function's bytecode, so an edit is noticed even when the
author forgets to bump `version` (unlike Flyte's cache_version or Prefect's source hash).
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distml.core.errors import DistmlError
from distml.data.sources import Columns


class Step(abc.ABC):
    """One preprocessing step: a pure function of a chunk's columns, named by `key`."""

    version = "1"

    def params(self) -> dict[str, Any]:
        return {}

    @property
    def key(self) -> str:
        payload = json.dumps({"step": type(self).__name__, "version": self.version, **self.params()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @abc.abstractmethod
    def __call__(self, columns: Columns) -> Columns: ...


def _column(columns: Columns, name: str, step: str) -> np.ndarray:
    if name not in columns:
        raise DistmlError(f"{step}: the data has no column {name!r}; it has {sorted(columns)}")
    return columns[name]


class Normalize(Step):
    """`(x * scale - mean) / std` as float32: uint8 pixels to normalised floats."""

    def __init__(self, column: str = "image", mean: float = 0.0, std: float = 1.0, scale: float = 1 / 255):
        if std == 0:
            raise DistmlError("Normalize: std must not be 0")
        self.column, self.mean, self.std, self.scale = column, float(mean), float(std), float(scale)

    def params(self) -> dict[str, Any]:
        return {"column": self.column, "mean": self.mean, "std": self.std, "scale": self.scale}

    def __call__(self, columns: Columns) -> Columns:
        x = _column(columns, self.column, "Normalize").astype(np.float32)
        x *= np.float32(self.scale / self.std)
        x -= np.float32(self.mean / self.std)
        return {**columns, self.column: x}


class DecodeBytes(Step):
    """Raw fixed-size bytes per record (e.g. an image BLOB) to an array of `shape` and `dtype`."""

    def __init__(self, column: str, shape: Sequence[int], dtype: str = "uint8"):
        self.column, self.shape, self.dtype = column, tuple(int(s) for s in shape), np.dtype(dtype)

    def params(self) -> dict[str, Any]:
        return {"column": self.column, "shape": list(self.shape), "dtype": self.dtype.str}

    def __call__(self, columns: Columns) -> Columns:
        values = _column(columns, self.column, "DecodeBytes")
        expected = int(np.prod(self.shape)) * self.dtype.itemsize
        if values.dtype == np.uint8 and values.ndim == 2:  # fixed-size binary, already one buffer
            if values.shape[1] != expected:
                raise DistmlError(
                    f"DecodeBytes: column {self.column!r} has {values.shape[1]} bytes per record; expected "
                    f"{expected} ({self.shape} of {self.dtype.name})"
                )
            array = np.ascontiguousarray(values).view(self.dtype).reshape((len(values), *self.shape))
            return {**columns, self.column: array}
        if values.dtype != object:
            return columns
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        if (lengths != expected).any():
            bad = int(lengths[lengths != expected][0])
            raise DistmlError(
                f"DecodeBytes: column {self.column!r} has a value of {bad} bytes; expected {expected} bytes "
                f"per record ({self.shape} of {self.dtype.name})"
            )
        array = np.frombuffer(b"".join(values), dtype=self.dtype).reshape((len(values), *self.shape))
        return {**columns, self.column: array}


class Reshape(Step):
    """Give each record of `column` the shape `shape` (e.g. flat 784 pixels to 28x28)."""

    def __init__(self, column: str, shape: Sequence[int]):
        self.column, self.shape = column, tuple(int(s) for s in shape)

    def params(self) -> dict[str, Any]:
        return {"column": self.column, "shape": list(self.shape)}

    def __call__(self, columns: Columns) -> Columns:
        x = _column(columns, self.column, "Reshape")
        if int(np.prod(x.shape[1:])) != int(np.prod(self.shape)):
            raise DistmlError(
                f"Reshape: records of {self.column!r} have shape {x.shape[1:]}, cannot become {self.shape}"
            )
        return {**columns, self.column: x.reshape((len(x), *self.shape))}


class Resize(Step):
    """Bilinear resize of 2-D images (N, H, W) to `size` with torch; e.g. 8x8 digits to 28x28."""

    def __init__(self, column: str = "image", size: tuple[int, int] = (28, 28)):
        self.column, self.size = column, (int(size[0]), int(size[1]))

    def params(self) -> dict[str, Any]:
        return {"column": self.column, "size": list(self.size)}

    def __call__(self, columns: Columns) -> Columns:
        import torch
        import torch.nn.functional as F

        x = _column(columns, self.column, "Resize")
        if x.ndim != 3:
            raise DistmlError(f"Resize: expected images of shape (N, H, W), got {x.shape}")
        if tuple(x.shape[1:]) == self.size:
            return columns
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
        out = F.interpolate(t, size=self.size, mode="bilinear", align_corners=False)[:, 0].numpy()
        return {**columns, self.column: out}


class Function(Step):
    """A user function `fn(columns) -> columns`; its key hashes its bytecode and `version`."""

    def __init__(self, fn: Callable[[Columns], Columns], version: str = "1"):
        self.fn, self.version = fn, version

    def params(self) -> dict[str, Any]:
        code = getattr(self.fn, "__code__", None)
        digest = hashlib.sha256()
        if code is not None:
            digest.update(code.co_code)
            digest.update(repr(code.co_consts).encode())
        return {"name": getattr(self.fn, "__qualname__", repr(self.fn)), "code": digest.hexdigest()[:16]}

    def __call__(self, columns: Columns) -> Columns:
        return self.fn(columns)


class Compose(Step):
    """Steps applied in order; the key covers all of them."""

    def __init__(self, steps: Sequence[Step]):
        self.steps = list(steps)

    def params(self) -> dict[str, Any]:
        return {"steps": [s.key for s in self.steps]}

    def __call__(self, columns: Columns) -> Columns:
        for step in self.steps:
            columns = step(columns)
        return columns


class Identity(Step):
    def __call__(self, columns: Columns) -> Columns:
        return columns
