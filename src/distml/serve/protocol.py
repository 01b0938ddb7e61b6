"""The wire formats: Open Inference Protocol (V2) tensors as JSON or raw binary data, and V1 bodies.

V2 requests and responses (JSON, or JSON + little-endian tensor bytes under the binary extension)
to and from numpy, every shape/datatype/size checked with a message saying what was expected; V1
`instances`/`predictions` bodies; pydantic schemas of both, for the API docs only.
tritonclient's and kserve's codecs were considered: client-side halves without validation (and
kserve's pulls in pandas), so this is written here and checked against both in test_compliance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from distml.core.errors import DistmlError
from distml.models.datatypes import DATATYPES, FLOAT_TYPES, INTEGER_TYPES, NUMERIC_TYPES

HEADER_LENGTH = "Inference-Header-Content-Length"

_TYPE_LIST = ", ".join(DATATYPES)
_REQUEST_HELP = (
    'expected a V2 infer request such as {"inputs": [{"name": "image", "shape": [1, 28, 28], '
    '"datatype": "FP32", "data": [...]}]}'
)


class ProtocolError(DistmlError):
    """A request (or response) that breaks the protocol; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype for a numpy array's dtype (str/bytes/object arrays are BYTES)."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise ProtocolError(400, f"numpy dtype {array.dtype} has no V2 datatype; expected one of {_TYPE_LIST}")


@dataclasses.dataclass
class Tensor:
    """One named tensor of a request or response; `data` has exactly `shape` (BYTES: objects of bytes)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_numpy(cls, name: str, array: Any, datatype: str | None = None, **parameters: Any) -> Tensor:
        array = np.asarray(array)
        datatype = datatype or datatype_of(array)
        if datatype == "BYTES":
            array = _as_bytes_array(array, name)
        else:
            array = array.astype(DATATYPES[datatype].newbyteorder("="), copy=False)
        return cls(name, datatype, tuple(int(d) for d in array.shape), array, dict(parameters))


@dataclasses.dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    binary_input: bool = False  # the body used the binary tensor data extension

    def wants_binary(self, output_name: str) -> bool:
        """Binary data for this output? `outputs[i].parameters.binary_data` wins over `binary_data_output`."""
        for output in self.outputs or []:
            if output.name == output_name and "binary_data" in output.parameters:
                return bool(output.parameters["binary_data"])
        return bool(self.parameters.get("binary_data_output", False))

    def wants_any_binary(self) -> bool:
        names = [o.name for o in self.outputs or []]
        return bool(self.parameters.get("binary_data_output", False)) or any(self.wants_binary(n) for n in names)


@dataclasses.dataclass
class InferResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- small helpers ------------------------------------------------------------------------


def _as_bytes_array(array: np.ndarray, name: str) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, value in enumerate(array.reshape(-1)):
        if isinstance(value, (bytes, bytearray, memoryview)):
            flat[i] = bytes(value)
        elif isinstance(value, str):
            flat[i] = value.encode("utf-8")
        else:
            raise ProtocolError(
                400, f"tensor {name!r} is BYTES but holds a {type(value).__name__}; expected str or bytes elements"
            )
    return out


def _num_elements(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decompress_body(body: bytes, encoding: str | None, max_bytes: int | None) -> bytes:
    """Undo a request's Content-Encoding (gzip, deflate or none), refusing more than `max_bytes` (413)."""
    if not encoding or encoding.lower() == "identity":
        return body
    encoding = encoding.lower()
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported; expected gzip, deflate or none")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    limit = max_bytes if max_bytes is not None else 0
    try:
        out = decoder.decompress(body, limit + 1 if limit else 0)
    except zlib.error as exc:
        raise ProtocolError(400, f"request body is not valid {encoding} data ({exc})") from exc
    if limit and (len(out) > limit or decoder.unconsumed_tail):
        raise ProtocolError(413, f"request body inflates to more than {limit} bytes, the server's limit")
    return out


def _split_body(body: bytes, header_length: str | int | None, what: str) -> tuple[Any, memoryview | None]:
    binary: memoryview | None = None
    if header_length is not None and header_length != "":
        try:
            length = int(header_length)
        except (TypeError, ValueError):
            raise ProtocolError(
                400,
                f"{HEADER_LENGTH} header is {header_length!r}; expected the byte length "
                "of the JSON part as a non-negative integer",
            ) from None
        if length < 0 or length > len(body):
            raise ProtocolError(
                400,
                f"{HEADER_LENGTH} header says {length} bytes of JSON but the body has "
                f"{len(body)} bytes; expected 0..{len(body)}",
            )
        binary = memoryview(body)[length:]
        body = body[:length]
    return load_json_object(body, what, _REQUEST_HELP), binary


# Digits to "0", every other byte to " ": a run of 19 zeros in the translation is a number of 19 digits
# or more, the shortest an integer past 64 bits has (-2**63 - 1; above, 2**64 has 20).
# translate + `in` take ~6 us on a 5 KB body, re.search(rb"\d{19}") ~130 us (most of the parse).
_DIGITS_TO_ZERO = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_RUN = b"0" * 19


def loads(body: bytes) -> Any:
    """`json.loads`, through orjson first: 784 pixel values parse in ~19 us instead of ~128 us.
    Python's json decides where they differ: numbers of 19+ digits (orjson turns integers beyond
    64 bits into floats), NaN literals (orjson refuses them) and every error message."""
    if _LONG_RUN not in body.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def load_json_object(body: bytes, what: str, hint: str) -> dict:
    """Parse `body` as a JSON object, or raise one 400 naming `what` and ending with `hint`."""
    try:
        obj = loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(400, f"{what} is not valid JSON ({exc}); {hint}") from None
    except RecursionError:  # json.loads recurses per level: thousands of nested [ or { exhaust the stack
        raise ProtocolError(400, f"{what} nests JSON arrays or objects too deeply to parse; {hint}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(400, f"{what} is a JSON {type(obj).__name__}, expected an object; {hint}")
    return obj


class _BinaryReader:
    def __init__(self, data: memoryview | None):
        self.data = data
        self.offset = 0

    def take(self, size: int, where: str) -> memoryview:
        if self.data is None:
            raise ProtocolError(
                400,
                f"{where} has parameters.binary_data_size but the body has no binary part; "
                f"send the {HEADER_LENGTH} header with the JSON length and append the bytes",
            )
        remaining = len(self.data) - self.offset
        if size > remaining:
            raise ProtocolError(
                400,
                f"{where} declares binary_data_size {size} but only {remaining} bytes of "
                "binary data remain after the tensors before it",
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def finish(self, what: str) -> None:
        if self.data is not None and self.offset != len(self.data):
            extra = len(self.data) - self.offset
            raise ProtocolError(
                400,
                f"{extra} bytes of binary data follow the {what}' declared binary_data_size "
                f"total ({self.offset}); expected exactly the declared sizes, in order",
            )


# --- decoding one tensor --------------------------------------------------------------------


def _check_parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(400, f"{where}.parameters is a {type(value).__name__}; expected an object")
    return dict(value)


def _check_shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ProtocolError(
            400, f"{where}.shape is {_describe(value)}; expected a list of non-negative integers such as [1, 28, 28]"
        )
    return tuple(value)


def _decode_binary(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    count = _num_elements(shape)
    if datatype == "BYTES":
        items: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ProtocolError(
                    400,
                    f"{where}: BYTES binary data ends inside a 4-byte length prefix; "
                    "expected each element as a 4-byte little-endian length then its bytes",
                )
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise ProtocolError(
                    400,
                    f"{where}: BYTES element {len(items)} declares {length} bytes but only "
                    f"{len(raw) - offset} remain in its binary_data_size",
                )
            items.append(bytes(raw[offset : offset + length]))
            offset += length
        if len(items) != count:
            raise ProtocolError(
                400, f"{where}: binary data holds {len(items)} BYTES elements but shape {list(shape)} needs {count}"
            )
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(
            400,
            f"{where}: binary_data_size is {len(raw)} bytes but shape {list(shape)} of "
            f"{datatype} needs {expected} bytes ({dtype.itemsize} per element, little-endian)",
        )
    if datatype == "BOOL":
        values = np.frombuffer(raw, dtype=np.uint8)
        if values.size and values.max() > 1:
            raise ProtocolError(
                400, f"{where}: BOOL binary data holds byte value {int(values.max())}; expected 0 or 1 per element"
            )
        return values.astype(bool).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _flatten_nested(data: list, where: str) -> tuple[list, tuple[int, ...]]:
    """Flatten a nested list, returning the flat values and the nesting shape; ragged lists are refused."""

    def shape_of(value: Any) -> tuple[int, ...]:
        dims = []
        while isinstance(value, list):
            dims.append(len(value))
            if not value:
                break
            value = value[0]
        return tuple(dims)

    shape = shape_of(data)
    flat: list = []

    def walk(value: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(value, list):
                raise ProtocolError(
                    400,
                    f"{where}.data is a ragged nested list; expected a flat list or one nested exactly as the shape",
                )
            flat.append(value)
            return
        if not isinstance(value, list) or len(value) != shape[depth]:
            raise ProtocolError(
                400, f"{where}.data is a ragged nested list; expected a flat list or one nested exactly as the shape"
            )
        for item in value:
            walk(item, depth + 1)

    walk(data, 0)
    return flat, shape


def _decode_json_data(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    count = _num_elements(shape)
    if not isinstance(data, list):
        raise ProtocolError(
            400,
            f"{where}.data is a {type(data).__name__}; expected a list of {datatype} values "
            "(flat, or nested as the shape), row-major",
        )
    if datatype == "BYTES":
        flat, nested = _flatten_nested(data, where)
        array = np.empty(len(flat), dtype=object)
        for i, value in enumerate(flat):
            if not isinstance(value, str):
                raise ProtocolError(
                    400,
                    f"{where}.data[{i}] is {_describe(value)}; BYTES data in JSON must be "
                    "strings (use the binary extension for arbitrary bytes)",
                )
            array[i] = value.encode("utf-8")
    else:
        try:
            parsed = np.array(data)
        except (ValueError, TypeError):
            raise ProtocolError(
                400, f"{where}.data is a ragged nested list; expected a flat list or one nested exactly as the shape"
            ) from None
        nested = parsed.shape
        array = _check_values(parsed, data, datatype, where).reshape(-1)
    if len(nested) > 1 and tuple(nested) != shape:
        raise ProtocolError(
            400,
            f"{where}.data is nested as {list(nested)} but shape is {list(shape)}; "
            "send it flat or nested exactly as the shape",
        )
    if array.size != count:
        raise ProtocolError(400, f"{where}.data has {array.size} values but shape {list(shape)} needs {count}")
    return array.reshape(shape)


_ALL_OK = object()


def _first_bad(values: np.ndarray, ok: Callable[[Any], bool]) -> Any:
    """The first element failing `ok`, or `_ALL_OK`."""
    for value in values.reshape(-1).tolist() if values.dtype != object else values.reshape(-1):
        if not ok(value):
            return value
    return _ALL_OK


def _check_values(parsed: np.ndarray, data: list, datatype: str, where: str) -> np.ndarray:
    kind = parsed.dtype.kind
    target = DATATYPES[datatype].newbyteorder("=")
    if parsed.size == 0:
        return parsed.astype(target)
    if datatype == "BOOL":
        if kind != "b":
            bad = _first_bad(parsed, lambda v: isinstance(v, bool))
            raise ProtocolError(400, f"{where}.data holds {_describe(bad)}; BOOL data must be true/false")
        return parsed
    if datatype in INTEGER_TYPES:
        if kind in "iu":
            values = parsed
            low, high = int(values.min()), int(values.max())
        else:
            # numpy turns a mix of int64 and uint64 range integers into floats, and integers beyond
            # both into objects: look at the Python values themselves.
            values = np.array(data, dtype=object) if kind == "f" else parsed
            bad = _first_bad(values, lambda v: isinstance(v, int) and not isinstance(v, bool))
            if bad is not _ALL_OK or kind not in "fO":
                raise ProtocolError(400, f"{where}.data holds {_describe(bad)}; {datatype} data must be integers")
            flat = values.reshape(-1).tolist()
            low, high = min(flat), max(flat)
        info = np.iinfo(target)
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise ProtocolError(400, f"{where}.data holds {bad}, out of range for {datatype} ({info.min}..{info.max})")
        return values.astype(target)
    if datatype in FLOAT_TYPES:
        if kind not in "iuf":
            bad = _first_bad(parsed, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
            if bad is not _ALL_OK or kind != "O":
                raise ProtocolError(400, f"{where}.data holds {_describe(bad)}; {datatype} data must be numbers")
            parsed = parsed.astype(np.float64)  # integers too large for int64 (an object array)
        return parsed.astype(target)
    raise ProtocolError(400, f"{where}: datatype {datatype} cannot be sent as JSON data")  # pragma: no cover


def _decode_tensor(obj: Any, where: str, reader: _BinaryReader) -> Tensor:
    if not isinstance(obj, dict):
        raise ProtocolError(400, f"{where} is {_describe(obj)}; expected an object with name, shape, datatype and data")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(400, f'{where} has no \'name\' string; expected e.g. "name": "image"')
    where = f"{where} ({name!r})"
    datatype = obj.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list or an object: not hashable
        raise ProtocolError(400, f"{where}.datatype is {_describe(datatype)}; expected one of {_TYPE_LIST}")
    shape = _check_shape(obj.get("shape"), where)
    parameters = _check_parameters(obj.get("parameters"), where)
    size = parameters.get("binary_data_size")
    has_data = "data" in obj and obj["data"] is not None
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(
                400,
                f"{where}.parameters.binary_data_size is {_describe(size)}; expected a non-negative integer byte count",
            )
        if has_data:
            raise ProtocolError(400, f"{where} has both 'data' and parameters.binary_data_size; send one of them")
        array = _decode_binary(reader.take(size, where), datatype, shape, where)
    elif has_data:
        array = _decode_json_data(obj["data"], datatype, shape, where)
    else:
        raise ProtocolError(
            400,
            f"{where} has no 'data'; expected its values as a JSON list, or "
            "parameters.binary_data_size with the binary tensor data extension",
        )
    return Tensor(name, datatype, shape, array, parameters)


def _tensor_list(obj: dict, key: str, what: str, reader: _BinaryReader, *, required: bool = True) -> list[Tensor]:
    items = obj.get(key)
    if not isinstance(items, list) or (required and not items):
        raise ProtocolError(400, f"{what} needs a non-empty '{key}' list; {_REQUEST_HELP}")
    tensors = [_decode_tensor(item, f"{key}[{i}]", reader) for i, item in enumerate(items)]
    names = [t.name for t in tensors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProtocolError(
            400, f"{what} names {key} {', '.join(map(repr, duplicates))} more than once; expected distinct names"
        )
    reader.finish(key)
    return tensors


def _optional_id(obj: dict, what: str) -> str | None:
    value = obj.get("id")
    if value is not None and not isinstance(value, str):
        raise ProtocolError(400, f"{what} 'id' is {_describe(value)}; expected a string")
    return value


# --- requests ----------------------------------------------------------------------------


def parse_infer_request(
    body: bytes,
    header_length: str | int | None = None,
    content_encoding: str | None = None,
    *,
    max_bytes: int | None = None,
) -> InferRequest:
    """Decode a V2 infer request body (JSON, or JSON + binary tensor data after `header_length` bytes)."""
    body = decompress_body(bytes(body), content_encoding, max_bytes)
    obj, binary = _split_body(body, header_length, "request body")
    return infer_request_from_json(obj, binary)


def infer_request_from_json(obj: Mapping[str, Any], binary: memoryview | bytes | None = None) -> InferRequest:
    """Decode an already parsed request object (and the binary part, if any)."""
    if not isinstance(obj, Mapping):
        raise ProtocolError(400, f"request is a {type(obj).__name__}, expected an object; {_REQUEST_HELP}")
    obj = dict(obj)
    reader = _BinaryReader(memoryview(binary) if binary is not None else None)
    inputs = _tensor_list(obj, "inputs", "an infer request", reader)
    outputs = None
    if obj.get("outputs") is not None:
        if not isinstance(obj["outputs"], list):
            raise ProtocolError(400, '\'outputs\' must be a list of objects like {"name": "probabilities"}')
        outputs = []
        for i, item in enumerate(obj["outputs"]):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                raise ProtocolError(
                    400,
                    f"outputs[{i}] is {_describe(item)}; expected an object like "
                    '{"name": "probabilities", "parameters": {"binary_data": true}}',
                )
            outputs.append(RequestedOutput(item["name"], _check_parameters(item.get("parameters"), f"outputs[{i}]")))
    return InferRequest(
        inputs=inputs,
        id=_optional_id(obj, "request"),
        outputs=outputs,
        parameters=_check_parameters(obj.get("parameters"), "request"),
        binary_input=binary is not None,
    )


def _encode_tensor_data(tensor: Tensor, binary: bool, status: int) -> tuple[dict[str, Any], bytes | None]:
    entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    parameters = {k: v for k, v in tensor.parameters.items() if k != "binary_data_size"}
    array = np.asarray(tensor.data)
    if tuple(array.shape) != tuple(tensor.shape) and array.size != _num_elements(tensor.shape):
        raise ProtocolError(
            status,
            f"tensor {tensor.name!r} has {array.size} values but shape "
            f"{list(tensor.shape)} needs {_num_elements(tensor.shape)}",
        )
    if binary:
        if tensor.datatype == "BYTES":
            flat = _as_bytes_array(array, tensor.name).reshape(-1)
            raw = b"".join(struct.pack("<I", len(v)) + v for v in flat)
        else:
            raw = np.ascontiguousarray(array, dtype=DATATYPES[tensor.datatype]).tobytes()
        parameters["binary_data_size"] = len(raw)
        entry["parameters"] = parameters
        return entry, raw
    if tensor.datatype == "BYTES":
        values = []
        for value in _as_bytes_array(array, tensor.name).reshape(-1):
            try:
                values.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(
                    status,
                    f"tensor {tensor.name!r} holds bytes that are not UTF-8, which JSON "
                    "cannot carry; ask for binary data",
                ) from None
        entry["data"] = values
    else:
        entry["data"] = np.asarray(array, dtype=DATATYPES[tensor.datatype].newbyteorder("=")).reshape(-1).tolist()
    if parameters:
        entry["parameters"] = parameters
    return entry, None


def _dump(obj: dict, what: str, status: int) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        raise ProtocolError(
            status,
            f"{what} holds NaN or infinite values, which JSON cannot carry; "
            "ask for binary data (parameters.binary_data: true)",
        ) from None


def _dump_checked(obj: dict, what: str, status: int) -> bytes:
    """`_dump` through orjson (~15x faster) for an object known to hold no NaN or infinity (orjson
    would write them as null); anything else orjson refuses goes to `_dump`."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return _dump(obj, what, status)


def _join(obj: dict, raws: list[bytes], what: str, status: int, *, finite: bool = False) -> tuple[bytes, int | None]:
    head = _dump_checked(obj, what, status) if finite else _dump(obj, what, status)
    if not raws:
        return head, None
    return b"".join([head, *raws]), len(head)


def encode_infer_request(
    inputs: Iterable[Tensor] | Mapping[str, Any],
    *,
    binary: bool = False,
    outputs: Sequence[str | RequestedOutput] | None = None,
    id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a request; returns (body, JSON length for the header, or None when the body is pure JSON)."""
    tensors = [Tensor.from_numpy(k, v) for k, v in inputs.items()] if isinstance(inputs, Mapping) else list(inputs)
    entries, raws = [], []
    for tensor in tensors:
        entry, raw = _encode_tensor_data(tensor, binary, 400)
        entries.append(entry)
        if raw is not None:
            raws.append(raw)
    obj: dict[str, Any] = {"inputs": entries}
    if id is not None:
        obj["id"] = id
    if parameters:
        obj["parameters"] = dict(parameters)
    if outputs is not None:
        obj["outputs"] = [
            {"name": o}
            if isinstance(o, str)
            else {"name": o.name, **({"parameters": o.parameters} if o.parameters else {})}
            for o in outputs
        ]
    return _join(obj, raws, "the request", 400)


# --- responses ---------------------------------------------------------------------------


def infer_response_json(response: InferResponse) -> dict[str, Any]:
    """The response as a JSON-ready dict (all outputs as JSON data)."""
    body, _ = encode_infer_response(response)
    return json.loads(body)


def encode_infer_response(
    response: InferResponse, binary: Callable[[str], bool] | bool = False
) -> tuple[bytes, dict[str, str]]:
    """Encode a response; `binary(name)` says which outputs go as binary. Returns (body, headers)."""
    wants = binary if callable(binary) else (lambda _name, _b=bool(binary): _b)
    entries, raws = [], []
    finite = not response.parameters  # JSON values orjson may write: no NaN/inf anywhere (checked below)
    for tensor in response.outputs:
        entry, raw = _encode_tensor_data(tensor, wants(tensor.name), 500)
        entries.append(entry)
        if raw is not None:
            raws.append(raw)
        if finite and (
            any(key != "binary_data_size" for key in tensor.parameters)
            or (raw is None and tensor.datatype in FLOAT_TYPES and not np.isfinite(np.asarray(tensor.data)).all())
        ):
            finite = False
    obj: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        obj["model_version"] = str(response.model_version)
    if response.id is not None:
        obj["id"] = response.id
    if response.parameters:
        obj["parameters"] = dict(response.parameters)
    obj["outputs"] = entries
    body, header_length = _join(obj, raws, f"output of model {response.model_name!r}", 500, finite=finite)
    if header_length is None:
        return body, {"content-type": "application/json"}
    return body, {"content-type": "application/octet-stream", HEADER_LENGTH: str(header_length)}


def parse_infer_response(body: bytes, header_length: str | int | None = None) -> InferResponse:
    """Decode a V2 infer response (the client side of `encode_infer_response`)."""
    obj, binary = _split_body(bytes(body), header_length, "response body")
    if not isinstance(obj.get("model_name"), str):
        raise ProtocolError(400, "infer response has no 'model_name' string")
    reader = _BinaryReader(binary)
    outputs = _tensor_list(obj, "outputs", "an infer response", reader, required=False)
    version = obj.get("model_version")
    return InferResponse(
        model_name=obj["model_name"],
        outputs=outputs,
        model_version=None if version is None else str(version),
        id=_optional_id(obj, "response"),
        parameters=_check_parameters(obj.get("parameters"), "response"),
    )


# --- V1 (TF Serving / KServe V1) --------------------------------------------------------------


@dataclasses.dataclass
class PredictRequest:
    """A V1 `:predict` body: `instances` (one per item) and any other keys, kept as sent."""

    instances: list
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PredictResponse:
    predictions: list
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_predict_request(body: bytes) -> PredictRequest:
    obj = load_json_object(body, "request body", 'expected {"instances": [...]}')
    instances = obj.pop("instances", None)
    if not isinstance(instances, list) or not instances:
        raise ProtocolError(400, "request has no non-empty 'instances' list; expected {\"instances\": [...]}")
    return PredictRequest(instances, obj)


def encode_predict_request(request: PredictRequest) -> bytes:
    return _dump({**request.extra, "instances": request.instances}, "the request", 400)


def parse_predict_response(body: bytes) -> PredictResponse:
    obj = load_json_object(body, "response body", 'expected {"predictions": [...]}')
    predictions = obj.pop("predictions", None)
    if not isinstance(predictions, list):
        raise ProtocolError(502, "V1 response has no 'predictions' list")
    return PredictResponse(predictions, obj)


def encode_predict_response(response: PredictResponse) -> bytes:
    return _dump({**response.extra, "predictions": response.predictions}, "the response", 500)


__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "NUMERIC_TYPES",
    "InferRequest",
    "InferResponse",
    "PredictRequest",
    "PredictResponse",
    "ProtocolError",
    "RequestedOutput",
    "Tensor",
    "datatype_of",
    "decompress_body",
    "encode_infer_request",
    "encode_infer_response",
    "encode_predict_request",
    "encode_predict_response",
    "infer_request_from_json",
    "infer_response_json",
    "parse_infer_request",
    "parse_infer_response",
    "parse_predict_request",
    "parse_predict_response",
]
