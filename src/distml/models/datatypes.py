"""The tensor datatypes of the Open Inference Protocol (V2): one table for manifests and the wire.

A model manifest's input spec and the serving protocol both name datatypes; both read them from
here, so they cannot disagree. BF16 is left out: numpy has no bfloat16, so it could be named in a
manifest but never decoded from a request.
"""

from __future__ import annotations

import numpy as np

#: V2 datatype -> numpy dtype (little-endian as on the wire); BYTES elements are Python `bytes`.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}
INTEGER_TYPES = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
NUMERIC_TYPES = INTEGER_TYPES | FLOAT_TYPES

__all__ = ["DATATYPES", "FLOAT_TYPES", "INTEGER_TYPES", "NUMERIC_TYPES"]
