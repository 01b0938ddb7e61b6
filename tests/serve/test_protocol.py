"""V2 wire format: every datatype round-trips as JSON and as binary; bad bodies get clear ProtocolErrors."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distml.serve import protocol
from distml.serve.protocol import (
    DATATYPES,
    HEADER_LENGTH,
    InferResponse,
    ProtocolError,
    RequestedOutput,
    Tensor,
    datatype_of,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
    parse_infer_response,
)

NUMPY = {name: dtype for name, dtype in DATATYPES.items() if name != "BYTES"}
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _elements(name: str, json_safe: bool):
    dtype = NUMPY[name]
    if dtype.kind == "f":
        return hnp.from_dtype(dtype, allow_nan=not json_safe, allow_infinity=not json_safe)
    return hnp.from_dtype(dtype)


def _arrays(name: str, json_safe: bool):
    if name == "BYTES":
        item = st.text(max_size=6) if json_safe else st.binary(max_size=6)
        return SHAPES.flatmap(
            lambda shape: st.lists(item, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))).map(
                lambda values, s=shape: _object_array(values, s)
            )
        )
    return hnp.arrays(NUMPY[name].newbyteorder("="), SHAPES, elements=_elements(name, json_safe))


def _object_array(values, shape):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape)


def _same(a: np.ndarray, b: np.ndarray, datatype: str) -> None:
    assert a.shape == b.shape
    if datatype == "BYTES":
        as_bytes = [v.encode() if isinstance(v, str) else v for v in a.reshape(-1)]
        assert list(b.reshape(-1)) == as_bytes
    else:
        assert b.dtype == NUMPY[datatype].newbyteorder("=")
        assert a.tobytes() == b.tobytes()  # bit-exact, NaN payloads and -0.0 included


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
@SETTINGS
@given(data=st.data())
def test_request_round_trip(datatype, binary, data):
    array = data.draw(_arrays(datatype, json_safe=not binary))
    tensor = Tensor.from_numpy("x", array, datatype)
    body, header = encode_infer_request([tensor], binary=binary, id="r1", outputs=["y"])
    assert (header is not None) == binary
    request = parse_infer_request(body, header)
    assert request.id == "r1" and request.binary_input == binary and request.outputs[0].name == "y"
    (parsed,) = request.inputs
    assert (parsed.name, parsed.datatype, parsed.shape) == ("x", datatype, array.shape)
    _same(array, parsed.data, datatype)


@pytest.mark.parametrize("datatype", list(DATATYPES))
@SETTINGS
@given(data=st.data())
def test_response_round_trip_mixed_json_and_binary(datatype, data):
    as_json = data.draw(_arrays(datatype, json_safe=True))
    as_binary = data.draw(_arrays(datatype, json_safe=False))
    response = InferResponse(
        "m",
        [Tensor.from_numpy("a", as_json, datatype), Tensor.from_numpy("b", as_binary, datatype)],
        model_version="3",
        id="x",
    )
    body, headers = encode_infer_response(response, lambda name: name == "b")
    assert headers["content-type"] == "application/octet-stream"
    parsed = parse_infer_response(body, headers[HEADER_LENGTH])
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("m", "3", "x")
    _same(as_json, parsed.outputs[0].data, datatype)
    _same(as_binary, parsed.outputs[1].data, datatype)
    head = json.loads(body[: int(headers[HEADER_LENGTH])])
    assert "data" in head["outputs"][0] and "binary_data_size" in head["outputs"][1]["parameters"]


def test_datatype_mapping_covers_every_v2_type():
    assert set(DATATYPES) == {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    }
    for name, dtype in NUMPY.items():
        assert datatype_of(np.zeros(2, dtype=dtype)) == name
        assert datatype_of(np.zeros(2, dtype=dtype.newbyteorder(">"))) == name
    assert datatype_of(np.array(["a"])) == "BYTES" and datatype_of(np.array([b"a"])) == "BYTES"


def test_binary_layout_is_little_endian_and_bytes_are_length_prefixed():
    body, header = encode_infer_request(
        [
            Tensor.from_numpy("f", np.array([1.5, -2.0], np.float32)),
            Tensor.from_numpy("s", np.array([b"ab", b""], dtype=object), "BYTES"),
        ],
        binary=True,
    )
    head = json.loads(body[:header])
    assert [i["parameters"]["binary_data_size"] for i in head["inputs"]] == [8, 10]
    assert body[header:] == struct.pack("<2f", 1.5, -2.0) + struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)


def test_nested_and_flat_json_data_are_the_same_tensor():
    flat = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT32", "data": [1, 2, 3, 4, 5, 6]}]}
    nested = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT32", "data": [[1, 2, 3], [4, 5, 6]]}]}
    a = parse_infer_request(json.dumps(flat).encode()).inputs[0].data
    b = parse_infer_request(json.dumps(nested).encode()).inputs[0].data
    assert np.array_equal(a, b) and a.dtype == np.int32 and a.shape == (2, 3)
    # JSON integers are fine for floating point types; huge integers become floats
    request = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2.5, 2**70]}]}
    assert parse_infer_request(json.dumps(request).encode()).inputs[0].data.tolist() == [1.0, 2.5, 2.0**70]


def test_wants_binary_per_output_overrides_request_default():
    body = {
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        "outputs": [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
        "parameters": {"binary_data_output": True},
    }
    request = parse_infer_request(json.dumps(body).encode())
    assert not request.wants_binary("a") and request.wants_binary("b") and request.wants_any_binary()
    request = parse_infer_request(json.dumps({**body, "parameters": {}}).encode())
    assert not request.wants_binary("b") and not request.wants_any_binary()
    assert request.outputs == [RequestedOutput("a", {"binary_data": False}), RequestedOutput("b", {})]


def test_compressed_bodies():
    body, header = encode_infer_request({"x": np.arange(6, dtype=np.float32)}, binary=True)
    for encoding, packed in [("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))]:
        assert parse_infer_request(packed, header, encoding).inputs[0].data.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ProtocolError, match="inflates to more than 10 bytes") as info:
        parse_infer_request(gzip.compress(body), header, "gzip", max_bytes=10)
    assert info.value.status == 413
    with pytest.raises(ProtocolError, match="not supported; expected gzip, deflate") as info:
        parse_infer_request(body, header, "br")
    assert info.value.status == 415
    with pytest.raises(ProtocolError, match="not valid gzip data"):
        parse_infer_request(b"not gzip", None, "gzip")


def _request(**tensor):
    return json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", **tensor}]}).encode()


BAD_JSON = [
    (b"{not json", None, "request body is not valid JSON"),
    (b"[1, 2]", None, "request body is a JSON list, expected an object"),
    (b"{}", None, "needs a non-empty 'inputs' list"),
    (json.dumps({"inputs": [5]}).encode(), None, "inputs[0] is 5; expected an object with name, shape"),
    (json.dumps({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}).encode(), None, "no 'name' string"),
    (_request(datatype="FLOAT", data=[1] * 6), None, "datatype is 'FLOAT'; expected one of BOOL, UINT8"),
    (_request(shape=[2, -3], data=[1] * 6), None, "shape is [2, -3]; expected a list of non-negative integers"),
    (_request(shape="2x3", data=[1] * 6), None, "shape is '2x3'; expected a list of non-negative integers"),
    (_request(data=[1, 2, 3, 4, 5]), None, "data has 5 values but shape [2, 3] needs 6"),
    (_request(data=[[1, 2, 3], [4, 5]]), None, "ragged nested list"),
    (_request(data=[[1, 2], [3, 4], [5, 6]]), None, "nested as [3, 2] but shape is [2, 3]"),
    (_request(data="123456"), None, "data is a str; expected a list of FP32 values"),
    (_request(data=[1, 2, "3", 4, 5, 6]), None, "holds '1'; FP32 data must be numbers"),
    (_request(data=[1, 2, None, 4, 5, 6]), None, "holds None; FP32 data must be numbers"),
    (_request(datatype="INT32", data=[1, 2, 3.5, 4, 5, 6]), None, "INT32 data must be integers"),
    (_request(datatype="UINT8", data=[1, 2, 256, 4, 5, 6]), None, "holds 256, out of range for UINT8 (0..255)"),
    (_request(datatype="INT8", data=[1, 2, -129, 4, 5, 6]), None, "holds -129, out of range for INT8"),
    (_request(datatype="UINT64", data=[1, 2, 2**64, 4, 5, 6]), None, "out of range for UINT64"),
    (_request(datatype="BOOL", data=[True, 1, True, True, True, True]), None, "BOOL data must be true/false"),
    (_request(datatype="BYTES", data=["a", "b", 3, "d", "e", "f"]), None, "BYTES data in JSON must be strings"),
    (_request(), None, "has no 'data'"),
    (_request(data=[1] * 6, parameters=[1]), None, "parameters is a list; expected an object"),
    (
        json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}).encode(),
        None,
        "names inputs 'x' more than once",
    ),
    (
        json.dumps({"id": 7, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(),
        None,
        "'id' is 7; expected a string",
    ),
    (
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{}]}
        ).encode(),
        None,
        "outputs[0] is {}; expected an object like",
    ),
    (_request(parameters={"binary_data_size": 24}), None, "has parameters.binary_data_size but the body has no binary"),
]


@pytest.mark.parametrize("body, header, message", BAD_JSON, ids=[m for _, _, m in BAD_JSON])
def test_bad_json_requests_are_refused_clearly(body, header, message):
    with pytest.raises(ProtocolError) as info:
        parse_infer_request(body, header)
    assert info.value.status == 400
    assert message in info.value.message


def _binary(size: int, payload: bytes, datatype: str = "FP32", shape=(2, 3), **extra):
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": size},
                    **extra,
                }
            ]
        }
    ).encode()
    return head + payload, len(head)


BAD_BINARY = [
    (_binary(24, b"\0" * 24, data=[1] * 6), "has both 'data' and parameters.binary_data_size"),
    (_binary(20, b"\0" * 20), "binary_data_size is 20 bytes but shape [2, 3] of FP32 needs 24 bytes"),
    (_binary(24, b"\0" * 20), "declares binary_data_size 24 but only 20 bytes"),
    (_binary(24, b"\0" * 28), "4 bytes of binary data follow"),
    (_binary(-1, b""), "binary_data_size is -1; expected a non-negative integer"),
    (_binary(6, b"\0\1\2\0\0\0", "BOOL"), "BOOL binary data holds byte value 2"),
    (_binary(6, struct.pack("<I", 5) + b"ab", "BYTES", (1,)), "declares 5 bytes but only 2 remain"),
    (_binary(3, b"abc", "BYTES", (1,)), "ends inside a 4-byte length prefix"),
    (_binary(5, struct.pack("<I", 1) + b"a", "BYTES", (2,)), "holds 1 BYTES elements but shape [2] needs 2"),
]


@pytest.mark.parametrize("body_header, message", BAD_BINARY, ids=[m for _, m in BAD_BINARY])
def test_bad_binary_requests_are_refused_clearly(body_header, message):
    body, header = body_header
    with pytest.raises(ProtocolError) as info:
        parse_infer_request(body, header)
    assert info.value.status == 400 and message in info.value.message


@pytest.mark.parametrize("header", ["abc", "-1", "99999"])
def test_bad_header_length(header):
    body, _ = _binary(24, b"\0" * 24)
    with pytest.raises(ProtocolError, match=HEADER_LENGTH):
        parse_infer_request(body, header)


def test_responses_that_json_cannot_carry():
    response = InferResponse("m", [Tensor.from_numpy("y", np.array([np.nan], np.float32))])
    with pytest.raises(ProtocolError, match="NaN or infinite values, which JSON cannot carry") as info:
        encode_infer_response(response)
    assert info.value.status == 500
    body, headers = encode_infer_response(response, True)  # binary carries them
    assert np.isnan(parse_infer_response(body, headers[HEADER_LENGTH]).outputs[0].data[0])
    # finite tensors written the fast way (orjson), NaN elsewhere in the response still refused, not null
    finite = [Tensor.from_numpy("y", np.array([0.5, 1e-7], np.float32)), Tensor.from_numpy("k", np.array([3]))]
    body, _ = encode_infer_response(InferResponse("m", finite))
    assert [o["data"] for o in json.loads(body)["outputs"]] == [[0.5, float(np.float32(1e-7))], [3]]
    for nan_elsewhere in (
        InferResponse("m", finite, parameters={"score": float("nan")}),
        InferResponse("m", [Tensor.from_numpy("y", np.array([0.5], np.float32), score=float("inf"))]),
        InferResponse("m", [Tensor.from_numpy("y", np.array([0.5], np.float32), score=float("nan"))]),
    ):
        with pytest.raises(ProtocolError, match="NaN or infinite values, which JSON cannot carry"):
            encode_infer_response(nan_elsewhere, lambda name: False)
        with pytest.raises(ProtocolError, match="NaN or infinite values, which JSON cannot carry"):
            encode_infer_response(nan_elsewhere, lambda name: True)
    bad_utf8 = InferResponse("m", [Tensor.from_numpy("s", np.array([b"\xff"], dtype=object), "BYTES")])
    with pytest.raises(ProtocolError, match="not UTF-8"):
        encode_infer_response(bad_utf8)
    assert protocol.infer_response_json(InferResponse("m", [], model_version="2")) == {
        "model_name": "m",
        "model_version": "2",
        "outputs": [],
    }
