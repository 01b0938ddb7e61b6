"""Reader for the IDX format (MNIST, Fashion-MNIST): big-endian magic, dimensions, raw values.

Validates the magic number, the dimension count and the exact byte length before numpy sees
the data, so a truncated or corrupt file is one clear error instead of a reshape failure.
Uncompressed files are memory-mapped; `.gz` files are decompressed into memory once.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from distml.core.errors import DistmlError

# The third byte of the magic number names the element type (IDX specification).
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAGIC_IMAGES = 0x00000803  # ubyte, 3 dimensions
MAGIC_LABELS = 0x00000801  # ubyte, 1 dimension


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DistmlError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DistmlError(f"IDX file {path} is not a readable gzip file ({exc}); expected a .gz IDX file") from None


def parse_header(header: bytes, path: Path, expected_magic: int | None = None) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, shape, data offset) from the start of an IDX file."""
    if len(header) < 4:
        raise DistmlError(f"IDX file {path} is truncated: {len(header)} bytes, shorter than the 4-byte magic number")
    (magic,) = struct.unpack(">I", header[:4])
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise DistmlError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if expected_magic == MAGIC_IMAGES else 'labels'})"
        )
    if zero != 0 or type_code not in IDX_TYPES or ndim == 0:
        raise DistmlError(f"{path} is not an IDX file: magic number 0x{magic:08x} is not 0x0000TTDD")
    offset = 4 + 4 * ndim
    if len(header) < offset:
        raise DistmlError(f"IDX file {path} is truncated inside its header ({len(header)} of {offset} bytes)")
    shape = struct.unpack(f">{ndim}I", header[4:offset])
    return IDX_TYPES[type_code], tuple(int(d) for d in shape), offset


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of its declared shape."""
    path = Path(path)
    if path.suffix != ".gz":
        try:
            with open(path, "rb") as handle:
                head = handle.read(4 + 4 * 255)
        except FileNotFoundError:
            raise DistmlError(f"IDX file {path} does not exist") from None
        dtype, shape, offset = parse_header(head, path, expected_magic)
        size = path.stat().st_size
        data = None
    else:
        data = _read_bytes(path)
        dtype, shape, offset = parse_header(data[: 4 + 4 * 255], path, expected_magic)
        size = len(data)
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise DistmlError(
            f"IDX file {path} is {problem}: header declares shape {shape} of {dtype.name} "
            f"({expected} bytes with the header), the {'decompressed ' if data is not None else ''}file "
            f"has {size} bytes"
        )
    if data is None:
        if int(np.prod(shape)) == 0:
            return np.empty(shape, dtype=dtype.newbyteorder("="))
        array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    else:
        array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))
    return array


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip when the name ends in .gz); used to make test data."""
    path = Path(path)
    codes = {v.str.lstrip("<>|="): k for k, v in IDX_TYPES.items()}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = codes.get(array.dtype.str[1:])
    if code is None:
        raise DistmlError(
            f"cannot write dtype {array.dtype} as IDX; expected one of uint8, int8, int16, int32, float32, float64"
        )
    payload = struct.pack(">I", (code << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=1) as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
