"""Bodies no one wrote by hand, straight into the wire-format parsers: whatever the bytes, headers or
JSON, the V2 request parser (JSON and the binary extension) and the V1 body decoder either return a
request or raise the protocol's own error with a 4xx status; and what the encoders write, they read back.

The round trip of each datatype alone is in test_protocol.py; here several tensors travel together.
"""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distml.serve.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    PredictRequest,
    ProtocolError,
    Tensor,
    encode_infer_request,
    encode_predict_request,
    parse_infer_request,
    parse_infer_response,
    parse_predict_request,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 1 << 20

# -- generators ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# Values that are almost what each field wants: the right type, the wrong one, out of range.
shapes = st.lists(st.integers(-2, 6) | st.sampled_from([10**12, 2**64]), max_size=4) | json_values
datatypes = st.sampled_from([*DATATYPES, "FP8", "", "fp32"]) | json_values
flat_data = st.lists(json_scalars, max_size=12)
nested_data = st.lists(st.lists(json_scalars | st.lists(json_scalars, max_size=3), max_size=4), max_size=4)
parameters = (
    st.fixed_dictionaries(
        {},
        optional={
            "binary_data_size": st.integers(-1, 64) | json_values,
            "binary_data": json_values,
            "binary_data_output": json_values,
        },
    )
    | json_values
)


@st.composite
def tensors(draw) -> dict:
    fields = {
        "name": st.sampled_from(["x", "y", ""]) | json_values,
        "shape": shapes,
        "datatype": datatypes,
        "data": flat_data | nested_data | json_values,
        "parameters": parameters,
    }
    keys = draw(st.sets(st.sampled_from(list(fields)), min_size=3))
    return {key: draw(fields[key]) for key in sorted(keys)}


@st.composite
def v2_bodies(draw) -> tuple[bytes, str | None]:
    """An infer request near the valid ones, as JSON, perhaps with a binary part and its header."""
    obj: dict = {"inputs": draw(st.lists(tensors(), max_size=3) | json_values)}
    for key, value in (("id", json_values), ("outputs", json_values), ("parameters", parameters)):
        if draw(st.booleans()):
            obj[key] = draw(value)
    head = json.dumps(obj).encode()
    tail = draw(st.binary(max_size=64))
    header = draw(
        st.sampled_from([None, str(len(head))])
        | st.integers(-3, len(head) + len(tail) + 3).map(str)
        | st.text(max_size=6)
    )
    return head + (tail if header is not None else b""), header


def deep(depth: int, open_: bytes = b"[") -> bytes:
    close = b"]" if open_ == b"[" else b"}"
    item = b'{"a":' if open_ == b"{" else open_
    return item * depth + close * depth


def refused_properly(call) -> None:
    """`call()` returns, or raises a ProtocolError with a 4xx status and a message; nothing else."""
    try:
        call()
    except ProtocolError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        assert exc.message


# -- never anything but a 4xx ProtocolError -----------------------------------------------------


@SETTINGS
@given(
    body=st.binary(max_size=200),
    header=st.none() | st.text(max_size=8),
    encoding=st.sampled_from([None, "identity", "gzip", "deflate", "br", "GZIP"]),
)
def test_arbitrary_bytes_and_headers_get_a_4xx_at_worst(body, header, encoding):
    refused_properly(lambda: parse_infer_request(body, header, encoding, max_bytes=LIMIT))
    refused_properly(lambda: parse_predict_request(body))


@SETTINGS
@given(request=v2_bodies(), compress=st.sampled_from([None, "gzip", "deflate"]))
@example(request=(b'{"inputs": [{"name": "x", "shape": [], "datatype": []}]}', None), compress=None)  # was a 500
def test_near_valid_v2_requests_get_a_4xx_at_worst(request, compress):
    body, header = request
    refused_properly(lambda: parse_infer_request(body, header, max_bytes=LIMIT))
    if compress is not None:
        packed = gzip.compress(body) if compress == "gzip" else zlib.compress(body)
        refused_properly(lambda: parse_infer_request(packed, header, compress, max_bytes=LIMIT))
        refused_properly(lambda: parse_infer_request(packed, header, compress, max_bytes=max(1, len(body) // 2)))


@SETTINGS
@given(body=json_values, extra=st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_any_json_v1_body_gets_a_4xx_at_worst(body, extra):
    refused_properly(lambda: parse_predict_request(json.dumps(body).encode()))
    refused_properly(lambda: parse_predict_request(json.dumps({**extra, "instances": body}).encode()))


@settings(max_examples=20, deadline=None)
@given(depth=st.integers(1, 200_000), open_=st.sampled_from([b"[", b"{"]))
def test_deeply_nested_json_is_a_400_not_a_crash(depth, open_):
    nested = deep(depth, open_)
    refused_properly(lambda: parse_infer_request(b'{"inputs": ' + nested + b"}"))
    refused_properly(lambda: parse_predict_request(b'{"instances": ' + nested + b"}"))
    refused_properly(lambda: parse_infer_response(b'{"model_name": "m", "outputs": ' + nested + b"}"))


def test_the_nesting_bound_names_the_problem():
    body = b'{"inputs": ' + deep(100_000) + b"}"
    try:
        parse_infer_request(body)
    except ProtocolError as exc:
        assert exc.status == 400 and "too deeply" in exc.message
    else:
        raise AssertionError("a 100,000-deep body was accepted")


# -- round trips -------------------------------------------------------------------------------

NUMERIC = [name for name in DATATYPES if name != "BYTES"]


@st.composite
def tensor_sets(draw, binary: bool) -> list[Tensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4, unique=True))
    out = []
    for name in names:
        datatype = draw(st.sampled_from(list(DATATYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
        if datatype == "BYTES":
            item = st.binary(max_size=5) if binary else st.text(max_size=5).map(str.encode)
            values = draw(st.lists(item, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
            array = np.empty(len(values), dtype=object)
            array[:] = values
            array = array.reshape(shape)
        else:
            dtype = DATATYPES[datatype].newbyteorder("=")
            elements = hnp.from_dtype(dtype, allow_nan=binary, allow_infinity=binary)
            array = draw(hnp.arrays(dtype, shape, elements=elements))
        out.append(Tensor.from_numpy(name, array, datatype))
    return out


@SETTINGS
@given(data=st.data(), binary=st.booleans())
def test_several_tensors_round_trip_in_order(data, binary):
    tensors_ = data.draw(tensor_sets(binary))
    body, header = encode_infer_request(tensors_, binary=binary, parameters={"binary_data_output": binary})
    parsed = parse_infer_request(body, header)
    assert [t.name for t in parsed.inputs] == [t.name for t in tensors_]
    assert parsed.binary_input == binary and parsed.wants_binary("anything") == binary
    for sent, got in zip(tensors_, parsed.inputs):
        assert (got.datatype, got.shape) == (sent.datatype, sent.shape)
        if sent.datatype == "BYTES":
            assert got.data.reshape(-1).tolist() == sent.data.reshape(-1).tolist()
        else:
            np.testing.assert_array_equal(got.data, sent.data)  # NaN == NaN here, bit for bit otherwise
            assert got.data.dtype == sent.data.dtype
    if binary:  # the header is exactly the JSON part, which names every tensor's size
        head = json.loads(body[: int(header)])
        sizes = [t["parameters"]["binary_data_size"] for t in head["inputs"]]
        assert sum(sizes) == len(body) - int(header)
    else:
        assert header is None and HEADER_LENGTH not in body.decode()


@SETTINGS
@given(
    instances=st.lists(json_values.filter(lambda v: v is not None), min_size=1, max_size=5),
    extra=st.dictionaries(st.text(max_size=5).filter(lambda k: k != "instances"), json_values, max_size=3),
)
# integers just past 64 bits, of 19 and 20 digits: orjson would make them floats (the first was found in CI)
@example(instances=[[]], extra={"": -(2**63) - 1})
@example(instances=[2**64], extra={"n": -(10**19) + 1})
def test_v1_bodies_round_trip(instances, extra):
    def finite(value) -> bool:
        if isinstance(value, float):
            return np.isfinite(value)
        if isinstance(value, list):
            return all(finite(v) for v in value)
        if isinstance(value, dict):
            return all(finite(v) for v in value.values())
        return True

    request = PredictRequest(instances, extra)
    if not finite([instances, extra]):  # JSON cannot carry NaN or infinity: refused, as a 400
        refused_properly(lambda: encode_predict_request(request))
        return
    parsed = parse_predict_request(encode_predict_request(request))
    assert parsed.instances == instances and parsed.extra == extra
