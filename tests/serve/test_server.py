"""The model server as a real process: routes, errors, answers equal to the model in-process,
dynamic batching, token auth, SIGTERM draining, durable async jobs and their callbacks."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from distml.core.layout import WorkspaceRef
from distml.serve.config import ReplicaConfig
from distml.serve.protocol import HEADER_LENGTH, Tensor, encode_infer_request, parse_infer_response

ALL_TAGS = "cnn:1,cnn:2,mlp:1"


def v2_body(images: np.ndarray, datatype: str = "FP32", **extra) -> dict:
    return {
        "inputs": [
            {"name": "image", "shape": list(images.shape), "datatype": datatype, "data": images.reshape(-1).tolist()}
        ],
        **extra,
    }


def png_b64(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def batch_histogram(url: str, model: str, version: str, headers: dict | None = None) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name == "distml_serve_batch_size":
            for sample in family.samples:
                if sample.labels.get("model") == model and sample.labels.get("version") == version:
                    key = sample.name.rsplit("_", 1)[-1] + sample.labels.get("le", "")
                    values[key] = sample.value
    return values


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- health, metadata, readiness ------------------------------------------------------------


def test_health_and_server_metadata(server):
    live = httpx.get(f"{server.url}/v2/health/live")
    ready = httpx.get(f"{server.url}/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    meta = httpx.get(f"{server.url}/v2")
    assert meta.json()["name"] == "distml" and "binary_tensor_data" in meta.json()["extensions"]
    for response in (live, ready, meta):
        assert response.headers["X-Model-Version"] == ALL_TAGS


def test_model_metadata_and_readiness(server):
    meta = httpx.get(f"{server.url}/v2/models/cnn")
    assert meta.status_code == 200 and meta.headers["X-Model-Version"] == "cnn:2"  # highest loaded version
    body = meta.json()
    assert body["name"] == "cnn" and body["versions"] == ["1", "2"] and body["platform"] == "pytorch"
    assert body["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28]}]
    assert body["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    params = body["parameters"]
    assert "raw pixel values 0..255" in params["input_format"]
    assert params["normalization"]["mean"] == pytest.approx(0.2860) and params["normalization"]["std"] == 0.353
    assert params["accepted_input_shapes"] == [[-1, 28, 28], [-1, 1, 28, 28], [-1, 784]]
    assert params["class_names"][9] == "Ankle boot"
    v1 = httpx.get(f"{server.url}/v2/models/cnn/versions/1")
    assert v1.headers["X-Model-Version"] == "cnn:1" and v1.json()["parameters"]["version"] == "1"
    assert httpx.get(f"{server.url}/v2/models/mlp").json()["versions"] == ["1"]
    for path, tag in [
        ("/v2/models/cnn/ready", "cnn:2"),
        ("/v2/models/cnn/versions/1/ready", "cnn:1"),
        ("/v2/models/mlp/ready", "mlp:1"),
    ]:
        response = httpx.get(server.url + path)
        assert response.status_code == 200 and response.json()["ready"] is True
        assert response.headers["X-Model-Version"] == tag
    v1_ready = httpx.get(f"{server.url}/v1/models/cnn")
    assert v1_ready.json() == {"name": "cnn", "ready": True}


# --- inference --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, ref",
    [
        ("/v2/models/cnn/infer", "cnn:2"),
        ("/v2/models/cnn/versions/1/infer", "cnn:1"),
        ("/v2/models/mlp/infer", "mlp:1"),
    ],
)
def test_json_infer_equals_the_model_in_process(server, reference, make_pixels, path, ref):
    images = make_pixels(3, seed=1)
    response = httpx.post(server.url + path, json=v2_body(images, id="req-7"))
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == ref and HEADER_LENGTH not in response.headers
    body = response.json()
    name, version = ref.split(":")
    assert (body["model_name"], body["model_version"], body["id"]) == (name, version, "req-7")
    outputs = {o["name"]: o for o in body["outputs"]}
    expected = reference.probabilities(ref, images)
    assert outputs["probabilities"]["shape"] == [3, 10] and outputs["probabilities"]["datatype"] == "FP32"
    got = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert outputs["label"] == {"name": "label", "datatype": "INT64", "shape": [3], "data": expected.argmax(1).tolist()}


def test_binary_infer_with_uint8_channel_images(server, reference, make_pixels):
    images = make_pixels(4, seed=2).astype(np.uint8).reshape(4, 1, 28, 28)
    body, header = encode_infer_request(
        [Tensor.from_numpy("image", images)],
        binary=True,
        outputs=["probabilities", "label"],
        parameters={"binary_data_output": True},
    )
    response = httpx.post(
        f"{server.url}/v2/models/cnn/versions/1/infer",
        content=body,
        headers={HEADER_LENGTH: str(header), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    parsed = parse_infer_response(response.content, response.headers[HEADER_LENGTH])
    head = json.loads(response.content[: int(response.headers[HEADER_LENGTH])])
    assert all("binary_data_size" in o["parameters"] for o in head["outputs"])
    probabilities, labels = parsed.outputs
    expected = reference.probabilities("cnn:1", images)
    np.testing.assert_allclose(probabilities.data, expected, rtol=1e-5, atol=1e-6)
    assert labels.datatype == "INT64" and labels.data.tolist() == expected.argmax(1).tolist()


def test_flat_fp64_input_and_output_selection(server, reference, make_pixels):
    images = make_pixels(2, seed=3).reshape(2, 784)
    body = v2_body(
        images, "FP64", outputs=[{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}]
    )
    response = httpx.post(f"{server.url}/v2/models/cnn/infer", json=body)
    parsed = parse_infer_response(response.content, response.headers.get(HEADER_LENGTH))
    assert [o.name for o in parsed.outputs] == ["label", "probabilities"]
    expected = reference.probabilities("cnn:2", images)
    assert parsed.outputs[0].data.tolist() == expected.argmax(1).tolist()
    np.testing.assert_allclose(parsed.outputs[1].data, expected, rtol=1e-5, atol=1e-6)
    only = httpx.post(f"{server.url}/v2/models/cnn/infer", json=v2_body(images, outputs=[{"name": "label"}]))
    assert [o["name"] for o in only.json()["outputs"]] == ["label"]


def test_v1_instances_png_and_jpeg(server, reference, make_pixels):
    images = make_pixels(2, seed=4)
    gray = Image.fromarray(images[0].astype(np.uint8), mode="L")
    color = Image.fromarray(np.random.RandomState(5).randint(0, 256, (56, 40, 3)).astype(np.uint8), mode="RGB")
    jpeg_b64 = png_b64(gray, "JPEG", quality=90)
    instances = [
        images[0].tolist(),
        images[1].reshape(-1).tolist(),
        {"image_bytes": {"b64": png_b64(gray)}},
        {"image_bytes": {"b64": jpeg_b64}},
        {"b64": png_b64(color)},
    ]
    response = httpx.post(f"{server.url}/v1/models/cnn:predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "cnn:2"
    predictions = response.json()["predictions"]
    # what the server must have done with each image: decode, grayscale, resize to 28x28
    decoded_jpeg = np.asarray(Image.open(io.BytesIO(base64.b64decode(jpeg_b64))).convert("L"), dtype=np.float32)
    resized = np.asarray(color.convert("L").resize((28, 28), Image.Resampling.BILINEAR), dtype=np.float32)
    expected = reference.probabilities("cnn:2", np.stack([images[0], images[1], images[0], decoded_jpeg, resized]))
    assert len(predictions) == 5
    for prediction, want in zip(predictions, expected):
        assert set(prediction) == {"label", "class", "probabilities"}
        np.testing.assert_allclose(prediction["probabilities"], want, rtol=1e-5, atol=1e-6)
        assert prediction["label"] == int(want.argmax())
        assert prediction["class"] == reference.model("cnn:2")[1]["class_names"][prediction["label"]]
    assert predictions[0]["probabilities"] == predictions[2]["probabilities"]  # PNG is lossless


IMAGE = np.zeros((1, 28, 28)).tolist()
ERRORS = [
    (
        "post",
        "/v2/models/cnn/infer",
        {"json": {"inputs": [{"name": "image", "shape": [1, 27, 28], "datatype": "FP32", "data": [0] * 756}]}},
        400,
        "has shape [1, 27, 28]; model 'cnn' expects one of [-1, 28, 28], [-1, 1, 28, 28], [-1, 784]",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {"json": {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "BOOL", "data": [False] * 784}]}},
        400,
        "has datatype BOOL; expected FP32 raw pixel values 0..255",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {"json": {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "BYTES", "data": ["a"] * 784}]}},
        400,
        "has datatype BYTES; expected FP32",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {"json": {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [1] * 783}]}},
        400,
        "has 783 values but shape [1, 28, 28] needs 784",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
        400,
        "request body is not valid JSON",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {"json": {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32", "data": IMAGE}]}},
        400,
        "model 'cnn' has one input named 'image'; got 'pixels'",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {
            "json": {
                "inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": IMAGE}],
                "outputs": [{"name": "logits"}],
            }
        },
        400,
        "has no output 'logits'",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {"json": {"inputs": [{"name": "image", "shape": [0, 28, 28], "datatype": "FP32", "data": []}]}},
        400,
        "batch dimension 0; expected at least 1 image",
    ),
    (
        "post",
        "/v2/models/cnn/infer",
        {
            "content": json.dumps(
                {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP32", "data": [float("nan")] * 784}]}
            )
        },
        400,
        "NaN or infinite values",
    ),
    (  # finite as FP64, infinite once cast to the model's FP32
        "post",
        "/v2/models/cnn/infer",
        {"json": {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP64", "data": [1e300] * 784}]}},
        400,
        "NaN or infinite values",
    ),
    ("post", "/v1/models/cnn:predict", {"json": {"instances": [[[1e300] * 28] * 28]}}, 400, "NaN or infinite values"),
    ("post", "/v2/models/cnn/infer", {"content": b"{}", "headers": {HEADER_LENGTH: "x"}}, 400, HEADER_LENGTH),
    ("post", "/v2/models/nope/infer", {"json": {}}, 404, "unknown model 'nope'; this server serves cnn, mlp"),
    ("get", "/v2/models/nope", {}, 404, "unknown model 'nope'"),
    ("get", "/v2/models/nope/ready", {}, 404, "unknown model 'nope'"),
    (
        "post",
        "/v2/models/cnn/versions/7/infer",
        {"json": {}},
        404,
        "model 'cnn' has no version '7' on this server; loaded versions: 1, 2",
    ),
    ("get", "/v2/models/cnn/versions/x", {}, 404, "has no version 'x'"),
    ("get", "/v1/models/nope", {}, 404, "unknown model 'nope'"),
    ("get", "/v2/nowhere", {}, 404, "no route GET /v2/nowhere"),
    ("get", "/v2/models/cnn/infer", {}, 405, "method GET is not allowed"),
    ("post", "/v1/models/cnn:predict", {"json": {"inputs": []}}, 400, "request has no non-empty 'instances' list"),
    ("post", "/v1/models/cnn:predict", {"json": {"instances": [[[1, 2], [3]]]}}, 400, "ragged nested list"),
    ("post", "/v1/models/cnn:predict", {"json": {"instances": [[0] * 10]}}, 400, "has shape [1, 10]"),
    ("post", "/v1/models/cnn:predict", {"json": {"instances": ["x"]}}, 400, "instances[0] is a str"),
    (
        "post",
        "/v1/models/cnn:predict",
        {"json": {"instances": [{"image_bytes": {"b64": "@@"}}]}},
        400,
        "not valid base64",
    ),
    (
        "post",
        "/v1/models/cnn:predict",
        {"json": {"instances": [{"image_bytes": {"b64": "aGVsbG8="}}]}},
        400,
        "image_bytes is not a readable PNG or JPEG image",
    ),
    ("post", "/v1/models/nope:predict", {"json": {"instances": [IMAGE[0]]}}, 404, "unknown model 'nope'"),
    (
        "post",
        "/v2/models/cnn/jobs",
        {"content": b"{}", "headers": {HEADER_LENGTH: "2"}},
        400,
        "asynchronous jobs take JSON requests only",
    ),
    (
        "post",
        "/v2/models/cnn/jobs",
        {"json": v2_body(np.zeros((1, 28, 28)), callback_url="ftp://x")},
        400,
        "callback_url is 'ftp://x'; expected an absolute http:// or https:// URL",
    ),
    ("post", "/v2/models/cnn/jobs", {"json": v2_body(np.zeros((1, 27, 28)))}, 400, "expects one of"),
    ("get", "/v2/jobs/00000000-0000-0000-0000-000000000000", {}, 404, "no inference job with id"),
]


@pytest.mark.parametrize(
    "method, path, kwargs, status, message", ERRORS, ids=[f"{s}-{m[:40]}" for _, _, _, s, m in ERRORS]
)
def test_error_statuses_and_messages(server, method, path, kwargs, status, message):
    response = getattr(httpx, method)(server.url + path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert response.headers["X-Model-Version"]


# --- batching, auth, limits ---------------------------------------------------------------------


async def _concurrent(url: str, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        return await asyncio.gather(*(client.post(url, json=body) for body in bodies))


def test_dynamic_batching_merges_concurrent_requests(server, reference, make_pixels):
    images = make_pixels(32, seed=6)
    before = batch_histogram(server.url, "mlp", "1")
    responses = asyncio.run(
        _concurrent(f"{server.url}/v2/models/mlp/infer", [v2_body(images[i : i + 1]) for i in range(32)])
    )
    after = batch_histogram(server.url, "mlp", "1")
    assert all(r.status_code == 200 for r in responses)
    got = np.array([r.json()["outputs"][0]["data"] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, reference.probabilities("mlp:1", images), rtol=1e-5, atol=1e-6)
    batches = after["count"] - before.get("count", 0)
    items = after["sum"] - before.get("sum", 0)
    multi = (after["count"] - after["bucket1.0"]) - (before.get("count", 0) - before.get("bucket1.0", 0))
    assert items == 32 and batches < 32 and multi >= 1, (batches, multi)


def test_a_request_pins_a_version_by_path_or_header_on_v1_and_v2(server, reference, make_pixels):
    images = make_pixels(2, seed=8)
    for version in ("1", "2"):
        expected = reference.probabilities(f"cnn:{version}", images)
        for url, headers in (
            (f"{server.url}/v1/models/cnn/versions/{version}:predict", {}),
            (f"{server.url}/v1/models/cnn:predict", {"X-Model-Version": version}),
            (f"{server.url}/v1/models/cnn:predict", {"X-Model-Version": f"cnn:{version}"}),
        ):
            response = httpx.post(url, json={"instances": images.tolist()}, headers=headers)
            assert response.status_code == 200 and response.headers["X-Model-Version"] == f"cnn:{version}"
            got = [p["probabilities"] for p in response.json()["predictions"]]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        v2 = httpx.post(f"{server.url}/v2/models/cnn/infer", json=v2_body(images), headers={"X-Model-Version": version})
        assert v2.status_code == 200 and v2.json()["model_version"] == version
    unknown = httpx.post(f"{server.url}/v1/models/cnn/versions/7:predict", json={"instances": images.tolist()})
    assert unknown.status_code == 404 and "loaded versions: 1, 2" in unknown.json()["error"]
    bad = httpx.post(f"{server.url}/v1/models/cnn:predict", json={"instances": [1]}, headers={"X-Model-Version": "x"})
    assert bad.status_code == 404 and "has no version 'x'" in bad.json()["error"]


def test_openapi_documents_the_v2_and_v1_bodies(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    infer = schema["paths"]["/v2/models/{model}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferRequestBody")
    assert infer["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferResponseBody")
    predict = schema["paths"]["/v1/models/{model}:predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequestBody")
    components = schema["components"]["schemas"]
    assert {"InferRequestBody", "TensorBody", "InferResponseBody", "PredictRequestBody", "ErrorBody"} <= set(components)
    assert "FP32" in components["TensorBody"]["properties"]["datatype"]["enum"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_a_model_without_recorded_preprocessing_is_refused_at_load(tmp_path):
    import torch

    from distml.models.artifact import IMAGE_INPUT_SPEC, save_model
    from distml.models.zoo import build_model
    from distml.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    torch.manual_seed(0)
    save_model(ws, build_model("cnn"), name="old", architecture="cnn", arch_args={}, input_spec=IMAGE_INPUT_SPEC,
               preprocessing={"dataset": "fashion-mnist"}, class_names=[str(i) for i in range(10)], metrics={},
               training={}, data_fingerprint=None)  # fmt: skip
    ws.close()
    config = tmp_path / "replica.json"
    config.write_text(
        ReplicaConfig(workspace=WorkspaceRef(root=str(tmp_path / "ws")), models=["old:1"]).model_dump_json()
    )
    proc = subprocess.run(
        [sys.executable, "-m", "distml.serve.server", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "model old:1 cannot be served: its manifest records no input normalisation" in proc.stderr
    # and `distml serve` refuses it before any replica starts
    cli = subprocess.run(
        [sys.executable, "-m", "distml.cli", "--workspace", str(tmp_path / "ws"), "serve", "old:1", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2 and "records no input normalisation" in cli.stderr
    assert not (tmp_path / "ws" / "services").exists()


def test_token_auth_body_limit_and_batching_off(launch, make_pixels):
    replica = launch(["cnn:1"], token="s3cret", max_body_bytes=200000, max_batch_size=1)
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{replica.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{replica.url}/v2/health/ready").status_code == 200
    for path in ("/v2", "/v2/models/cnn", "/v2/models/cnn/ready", "/v1/models/cnn", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(replica.url + path, headers=headers)
            assert response.status_code == 401 and "bearer token" in response.json()["error"]
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(replica.url + path, headers=auth).status_code == 200
        # the scheme is case-insensitive (RFC 7235), the token is not: the gateway checks the same way
        assert httpx.get(replica.url + path, headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert httpx.get(replica.url + path, headers={"Authorization": "Bearer S3CRET"}).status_code == 401
    body = v2_body(make_pixels(1))
    assert httpx.post(f"{replica.url}/v2/models/cnn/infer", json=body).status_code == 401
    assert httpx.post(f"{replica.url}/v2/models/cnn/infer", json=body, headers=auth).status_code == 200
    big = httpx.post(f"{replica.url}/v2/models/cnn/infer", json=v2_body(make_pixels(80)), headers=auth)
    assert big.status_code == 413 and "exceeds the server's limit of 200000 bytes" in big.json()["error"]
    # max batch size 1 = batching off: every forward pass has one item
    before = batch_histogram(replica.url, "cnn", "1", auth)
    responses = asyncio.run(_concurrent(f"{replica.url}/v2/models/cnn/infer", [body] * 8, auth))
    after = batch_histogram(replica.url, "cnn", "1", auth)
    assert all(r.status_code == 200 for r in responses)
    assert after["count"] - before["count"] == 8 and after["bucket1.0"] - before["bucket1.0"] == 8
    # a request larger than the batch size is run in pieces
    several = httpx.post(f"{replica.url}/v2/models/cnn/infer", json=v2_body(make_pixels(3)), headers=auth)
    assert several.status_code == 200 and several.json()["outputs"][0]["shape"] == [3, 10]


def _post_with_urllib(url: str, body: bytes) -> tuple[int, dict]:
    """urllib sends the whole body (and `Connection: close`) before it reads any of the answer."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post_with_requests(url: str, body) -> tuple[int, dict]:
    """requests (http.client where it is not installed) also writes the whole body first; an iterable
    `body` goes chunked, without Content-Length."""
    try:
        import requests
    except ImportError:  # pragma: no cover
        conn = http.client.HTTPConnection(url.split("/")[2], timeout=60)
        conn.request("POST", "/" + url.split("/", 3)[3], body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    with requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60) as answer:
        return answer.status_code, answer.json()


def test_an_over_limit_body_gets_its_413_even_when_the_client_sends_it_all_before_reading(launch, make_pixels):
    # A client that writes the whole body first (urllib, requests, many SDKs) used to see "connection
    # reset by peer": the replica answered 413 and closed with the rest of the body unread. It now
    # reads and discards the rest (up to a bound), answers 413 with its message, then closes.
    limit = 1024 * 1024
    replica = launch(["cnn:1"], max_body_bytes=limit)
    url = f"{replica.url}/v2/models/cnn/infer"
    message = f"exceeds the server's limit of {limit} bytes"
    big = b"x" * (64 * 1024 * 1024)
    status, answer = _post_with_urllib(url, big)  # Content-Length over the limit
    assert status == 413 and message in answer["error"]
    status, answer = _post_with_requests(url, big)
    assert status == 413 and message in answer["error"]
    # chunked (no Content-Length): the limit is found while reading, then the rest is discarded
    chunks = (big[i : i + 1024 * 1024] for i in range(0, 8 * 1024 * 1024, 1024 * 1024))
    status, answer = _post_with_requests(url, chunks)
    assert status == 413 and message in answer["error"]
    # a declared length past the drain bound is answered at once (nothing read), then closed
    conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=30)
    conn.putrequest("POST", "/v2/models/cnn/infer")
    conn.putheader("Content-Length", str(1 << 40))
    conn.endheaders(b"{}")
    answer = conn.getresponse()
    assert answer.status == 413 and message in json.loads(answer.read())["error"]
    assert answer.getheader("Connection") == "close"
    conn.close()
    # under the limit, the same server answers as ever
    status, answer = _post_with_urllib(url, json.dumps(v2_body(make_pixels(1))).encode())
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 10]


def test_metrics_exposition(server, make_pixels):
    # a request of its own: the module's other tests may run on another xdist worker's server
    answer = httpx.post(f"{server.url}/v2/models/cnn/versions/2/infer", json=v2_body(make_pixels(1)))
    assert answer.status_code == 200, answer.text
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {
        "distml_serve_requests",
        "distml_serve_request_seconds",
        "distml_serve_batch_size",
        "distml_serve_queue_depth",
        "distml_serve_in_flight_requests",
    } <= set(families)
    labels = [s.labels for s in families["distml_serve_requests"].samples if s.name.endswith("_total")]
    assert {"model": "cnn", "version": "2", "endpoint": "infer", "status": "200"} in labels
    depth = [s for s in families["distml_serve_queue_depth"].samples if s.labels == {"model": "cnn", "version": "1"}]
    assert depth and depth[0].value == 0


# --- process lifecycle ------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_0(launch, reference, make_pixels):
    # Five requests wait in the batcher for a sixth to fill their batch (its 60 s window never closes
    # it); the sixth has sent its headers and part of its body. SIGTERM lands with all six in flight
    # and none answerable; the rest of the sixth's body goes only once the server says it waits for
    # its open connections (uvicorn's drain), so only the drain can answer them.
    replica = launch(["cnn:1"], max_batch_delay_ms=60_000, max_batch_size=6, log_level="info")
    images = make_pixels(6, seed=8)
    bodies = [json.dumps(v2_body(images[i : i + 1])).encode() for i in range(6)]
    connections = []
    for i, body in enumerate(bodies):
        conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=60)
        conn.putrequest("POST", "/v2/models/cnn/infer")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body if i < 5 else body[:20])
        connections.append(conn)
    queued = 'distml_serve_queue_depth{model="cnn",version="1"} 5.0'
    in_flight = "distml_serve_in_flight_requests 7.0"  # the six and this /metrics request
    wait_for(
        lambda: queued in (text := httpx.get(f"{replica.url}/metrics").text) and in_flight in text,
        30,
        "5 requests in the batcher and the 6th in flight",
    )
    replica.proc.send_signal(signal.SIGTERM)
    wait_for(
        lambda: "Waiting for connections to close" in replica.log() or replica.proc.poll() is not None,
        30,
        "the server to drain its connections (or to exit)",
    )
    with pytest.raises(httpx.ConnectError):  # draining, it accepts no new connection
        httpx.get(f"{replica.url}/v2/health/live")
    connections[5].send(bodies[5][20:])
    answers = [conn.getresponse() for conn in connections]
    assert [r.status for r in answers] == [200] * 6
    got = np.array([json.loads(r.read())["outputs"][0]["data"][:10] for r in answers], dtype=np.float32)
    assert replica.proc.wait(30) == 0, replica.log()
    np.testing.assert_allclose(got, reference.probabilities("cnn:1", images), rtol=1e-5, atol=1e-6)
    for conn in connections:
        conn.close()


def test_bad_model_reference_exits_2_with_a_clear_message(serve_workspace, tmp_path):
    port_file = tmp_path / "port"
    config = tmp_path / "replica.json"
    config.write_text(
        ReplicaConfig(
            workspace=WorkspaceRef(root=str(serve_workspace)), models=["cnn:9"], port_file=str(port_file)
        ).model_dump_json()
    )
    proc = subprocess.run(
        [sys.executable, "-m", "distml.serve.server", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "model 'cnn' has no version 9; its versions are 1 to 2" in proc.stderr
    assert not port_file.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"workspace": "w"}', "models: Field required"),
        ('{"workspace": "w", "models": ["cnn"], "max_batch_size": 0}', "max_batch_size: Input should be greater"),
        ('{"models": ["cnn"], "batch": 3}', "batch: Extra inputs are not permitted"),
        ("[1, 2]", "holds a JSON list; expected an object"),
        ("{", "is not valid JSON"),
    ],
)
def test_bad_replica_config_exits_2_with_one_clear_line(tmp_path, content, message):
    path = tmp_path / "replica.json"
    path.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "distml.serve.server", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr


def test_a_replica_config_names_its_workspace_by_value_and_an_old_flat_file_still_loads(tmp_path, monkeypatch):
    from distml.core import DB_URL_ENV
    from distml.core.errors import DistmlError
    from distml.serve.config import load_replica_config, parse_replica_config, store_from_env

    old = tmp_path / "old.json"  # as written before WorkspaceRef: workspace a path, db_url beside it
    old.write_text(json.dumps({"workspace": str(tmp_path / "ws"), "db_url": "sqlite:///x.db", "models": ["cnn"]}))
    config = load_replica_config(old)
    assert config.workspace == WorkspaceRef(root=str(tmp_path / "ws"), db_url="sqlite:///x.db")
    written = json.loads(config.model_dump_json())
    assert (
        written["workspace"] == {"root": str(tmp_path / "ws"), "db_url": "sqlite:///x.db"} and "db_url" not in written
    )
    new = tmp_path / "new.json"
    new.write_text(config.model_dump_json())
    assert load_replica_config(new) == config
    assert ReplicaConfig(models=["cnn"]).workspace == WorkspaceRef()  # ./.distml with its distml.db
    with pytest.raises(DistmlError, match="db_url goes inside workspace"):
        parse_replica_config({"workspace": {"root": "w"}, "db_url": "sqlite:///x.db", "models": ["cnn"]})
    # a cluster's pod: DISTML_DB_URL names the store of a workspace whose config names none
    monkeypatch.setenv(DB_URL_ENV, "postgresql://db/distml")
    assert store_from_env(config) == config
    bare = ReplicaConfig(workspace=WorkspaceRef(root="/workspace"), models=["cnn"])
    assert store_from_env(bare).workspace == WorkspaceRef(root="/workspace", db_url="postgresql://db/distml")


# --- asynchronous jobs --------------------------------------------------------------------------


class CallbackSink:
    """A tiny local HTTP server recording the JSON bodies POSTed to it."""

    def __init__(self):
        received, condition = [], threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with condition:
                    received.append(json.loads(body))
                    condition.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received, self.condition = received, condition
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/done"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 30.0) -> list[dict]:
        with self.condition:
            assert self.condition.wait_for(lambda: len(self.received) >= count, timeout), self.received
            return list(self.received)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sink():
    server = CallbackSink()
    yield server
    server.close()


def test_a_job_pinned_by_header_runs_on_that_version(server, make_pixels):
    submitted = httpx.post(
        f"{server.url}/v2/models/cnn/jobs", json=v2_body(make_pixels(1)), headers={"X-Model-Version": "cnn:1"}
    )
    assert submitted.status_code == 202 and submitted.json()["model_version"] == "1", submitted.text
    job = wait_for(
        lambda: (
            (r := httpx.get(f"{server.url}/v2/jobs/{submitted.json()['id']}").json())["status"] == "succeeded" and r
        ),
        30,
        "the job to succeed",
    )
    assert job["result"]["model_version"] == "1"  # not the default version 2
    # metrics answer while models load and after: the queue gauge never breaks the scrape
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_job_runs_and_posts_its_result_to_the_callback(server, reference, make_pixels, sink):
    images = make_pixels(2, seed=9)
    submitted = httpx.post(
        f"{server.url}/v2/models/cnn/versions/1/jobs", json=v2_body(images, id="job-a", callback_url=sink.url)
    )
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["status"] == "queued" and submitted.headers["Location"] == f"/v2/jobs/{job['id']}"
    (callback,) = sink.wait(1)
    assert callback["id"] == job["id"] and callback["status"] == "succeeded" and callback["model_version"] == "1"
    status = wait_for(
        lambda: (r := httpx.get(f"{server.url}/v2/jobs/{job['id']}").json())["status"] == "succeeded" and r,
        10,
        "the job to succeed",
    )
    assert status["result"] == callback["result"] and status["callback"]["status"] == "delivered"
    result = status["result"]
    assert result["model_name"] == "cnn" and result["model_version"] == "1" and result["id"] == "job-a"
    np.testing.assert_allclose(
        np.array(result["outputs"][0]["data"]).reshape(2, 10),
        reference.probabilities("cnn:1", images),
        rtol=1e-5,
        atol=1e-6,
    )


def test_jobs_survive_kill_9_and_finish_on_a_new_server(
    serve_workspace, tmp_path, launch, reference, make_pixels, sink
):
    workspace = tmp_path / "jobs-ws"  # its own metadata store: no other replica may take the jobs
    shutil.copytree(serve_workspace, workspace)
    first = launch(["cnn:1"], max_batch_delay_ms=10000, max_batch_size=64, workspace=workspace)
    images = make_pixels(3, seed=10)
    ids = []
    for i in range(3):
        response = httpx.post(
            f"{first.url}/v2/models/cnn/jobs", json=v2_body(images[i : i + 1], parameters={"callback_url": sink.url})
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    first.proc.kill()  # SIGKILL right after the 202s: nothing can be flushed now
    first.proc.wait()
    assert not sink.received

    second = launch(["cnn:1"], workspace=workspace)
    for job_id, image in zip(ids, images):
        status = wait_for(
            lambda job_id=job_id: (
                (r := httpx.get(f"{second.url}/v2/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and r
            ),
            30,
            "the job to finish on the new server",
        )
        assert status["status"] == "succeeded", status
        assert status["model_version"] == "1" and status["attempts"] >= 1
        np.testing.assert_allclose(
            status["result"]["outputs"][0]["data"],
            reference.probabilities("cnn:1", image[None])[0],
            rtol=1e-5,
            atol=1e-6,
        )
    callbacks = sink.wait(3)
    assert sorted(c["id"] for c in callbacks) == sorted(ids)
    assert all(c["status"] == "succeeded" and c["result"]["model_name"] == "cnn" for c in callbacks)


# --- in process: readiness while loading, the dynamic batcher ---------------------------------------


def test_ready_is_503_until_the_models_are_loaded(serve_workspace, tmp_path, make_pixels):
    from distml.serve.server import create_app
    from distml.workspace import Workspace

    shutil.copytree(serve_workspace, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    config = ReplicaConfig(workspace=workspace.ref, models=["cnn", "cnn@champion", "cnn:1"])
    app = create_app(config, workspace=workspace)
    assert {m.tag for m in app.state.server.repository} == {"cnn:1", "cnn:2"}
    body = v2_body(make_pixels(1))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as client:
            ready = await client.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False and "loading" in ready.json()["error"]
            assert (await client.get("/v2/models/cnn/ready")).status_code == 503
            assert (await client.get("/v1/models/cnn")).status_code == 503
            infer = await client.post("/v2/models/cnn/infer", json=body)
            assert infer.status_code == 503 and "model cnn:2 is still loading" in infer.json()["error"]
            assert (await client.get("/v2/models/cnn")).status_code == 200  # metadata is known before loading
            async with app.router.lifespan_context(app):
                for _ in range(1500):  # a bound on the polls (about 30 s), not a speed
                    if (await client.get("/v2/health/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.02)
                else:
                    pytest.fail("the models never became ready")
                infer = await client.post("/v2/models/cnn/versions/1/infer", json=body)
                assert infer.status_code == 200 and infer.json()["model_version"] == "1"

    try:
        asyncio.run(run())
    finally:
        workspace.close()


def _batcher_run(calls: list):
    def run(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if (x < 0).any():
            raise ValueError("negative input")
        time.sleep(0.01)
        return x * 2

    return run


def test_batcher_merges_in_order_and_splits_large_requests():
    from distml.serve.batching import DynamicBatcher

    calls: list[int] = []

    async def run():
        batcher = DynamicBatcher(_batcher_run(calls), max_batch_size=4, max_delay_ms=50)
        items = [np.full((1, 3), i, np.float32) for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(x) for x in items))
        assert [r.tolist() for r in results] == [[[2 * i] * 3] for i in range(10)]
        merged = list(calls)
        calls.clear()
        big = np.arange(30, dtype=np.float32).reshape(10, 3)
        assert np.array_equal(await batcher.submit(big), big * 2)
        assert batcher.queue_depth == 0
        await batcher.aclose()
        return merged, batcher.batch_sizes

    merged, sizes = asyncio.run(run())
    assert merged == [4, 4, 2]  # 10 concurrent single items, at most 4 per forward pass
    assert calls == [4, 4, 2]  # one request of 10 items runs in pieces
    assert sizes == {4: 4, 2: 2}


def test_batcher_errors_reach_only_their_batch_and_batching_off():
    from distml.serve.batching import DynamicBatcher

    calls: list[int] = []

    async def run():
        batcher = DynamicBatcher(_batcher_run(calls), max_batch_size=2, max_delay_ms=50)
        values = [1, -1, 2, 3]  # batches [1, -1] (fails) and [2, 3]
        results = await asyncio.gather(
            *(batcher.submit(np.array([v], np.float32)) for v in values), return_exceptions=True
        )
        await batcher.aclose()
        # a full batch of 1 never waits for the delay: with a 10-minute delay this only
        # finishes (well inside wait_for's 60 s) if the batcher runs full batches at once
        off = DynamicBatcher(_batcher_run(calls), max_batch_size=1, max_delay_ms=600_000)
        await asyncio.wait_for(asyncio.gather(*(off.submit(np.array([v], np.float32)) for v in range(3))), 60)
        await off.aclose()
        return results, off.batch_sizes

    results, off_sizes = asyncio.run(run())
    assert isinstance(results[0], ValueError) and isinstance(results[1], ValueError)
    assert [r.tolist() for r in results[2:]] == [[4.0], [6.0]]
    assert off_sizes == {1: 3}
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        DynamicBatcher(lambda x: x, max_batch_size=0)


# --- model repository extension: a version loaded and unloaded in place -----------------------


def test_a_version_is_loaded_and_unloaded_in_place_without_a_new_process(launch, make_pixels):
    replica = launch(["cnn:1"], token="s3cret", max_batch_delay_ms=300)
    auth = {"Authorization": "Bearer s3cret"}
    load, unload = f"{replica.url}/v2/repository/models/cnn/load", f"{replica.url}/v2/repository/models/cnn/unload"
    body = v2_body(make_pixels(1))
    assert httpx.post(load, json={"parameters": {"version": "2"}}).status_code == 401  # under the token like /v2
    for bad in ({}, {"parameters": {"version": "two"}}, {"parameters": ["2"]}, {"parameters": {"version": 0}}):
        answer = httpx.post(load, json=bad, headers=auth)
        assert answer.status_code == 400, bad
        assert 'expected {"parameters": {"version": "<version number>"}}' in answer.json()["error"]
    missing = httpx.post(load, json={"parameters": {"version": "9"}}, headers=auth)
    assert missing.status_code == 404 and "cannot load cnn:9" in missing.json()["error"]
    unknown = httpx.post(f"{replica.url}/v2/repository/models/nope/load", json={"parameters": {"version": 1}},
                         headers=auth)  # fmt: skip
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]

    loaded = httpx.post(load, json={"parameters": {"version": "2"}}, headers=auth, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"name": "cnn", "version": "2", "state": "loaded", "versions": ["1", "2"],
                             "default_version": "2"}  # fmt: skip
    again = httpx.post(load, json={"parameters": {"version": 2}}, headers=auth)
    assert again.status_code == 200 and again.json()["state"] == "already_loaded"
    for path in ("/v2/models/cnn/versions/2/infer", "/v2/models/cnn/infer"):  # the default is the highest: 2
        answer = httpx.post(replica.url + path, json=body, headers=auth)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "cnn:2", path
    v1 = httpx.post(f"{replica.url}/v1/models/cnn/versions/2:predict", json={"instances": [make_pixels(1)[0].tolist()]},
                    headers=auth)  # fmt: skip
    assert v1.status_code == 200 and v1.headers["x-model-version"] == "cnn:2"
    index = httpx.post(f"{replica.url}/v2/repository/index", headers=auth).json()
    assert index == [{"name": "cnn", "version": v, "state": "READY"} for v in ("1", "2")]
    # the job runner runs jobs pinned to the new version; its metrics carry the version
    job = httpx.post(f"{replica.url}/v2/models/cnn/jobs", json=body, headers={**auth, "X-Model-Version": "2"})
    assert job.status_code == 202, job.text
    done = wait_for(lambda: (j := httpx.get(f"{replica.url}/v2/jobs/{job.json()['id']}", headers=auth).json())
                    ["status"] == "succeeded" and j, what="the job on version 2")  # fmt: skip
    assert done["model_version"] == "2"
    assert batch_histogram(replica.url, "cnn", "2", auth)["count"] >= 3

    # unloading version 1 waits for its requests in flight (held by the 300 ms batch window)
    pinned = [v2_body(make_pixels(1, seed=i)) for i in range(4)]
    results: list = []
    sender = threading.Thread(
        target=lambda: results.extend(
            asyncio.run(_concurrent(f"{replica.url}/v2/models/cnn/versions/1/infer", pinned, auth))
        )
    )
    sender.start()
    in_flight = "distml_serve_in_flight_requests"
    wait_for(lambda: _gauge(replica.url, in_flight, auth) >= 5, what="4 requests in flight on version 1")
    gone = httpx.post(unload, json={"parameters": {"version": "1"}}, headers=auth, timeout=60)
    sender.join(60)
    assert gone.status_code == 200 and gone.json()["versions"] == ["2"] and gone.json()["default_version"] == "2"
    assert [r.status_code for r in results] == [200] * 4
    after = httpx.post(f"{replica.url}/v2/models/cnn/versions/1/infer", json=body, headers=auth)
    assert after.status_code == 404 and "loaded versions: 2" in after.json()["error"]
    last = httpx.post(unload, json={"parameters": {"version": "2"}}, headers=auth)
    assert last.status_code == 409 and "last loaded version of model 'cnn'" in last.json()["error"]
    assert httpx.post(unload, json={"parameters": {"version": "1"}}, headers=auth).status_code == 404
    assert httpx.get(f"{replica.url}/v2/health/ready").status_code == 200


def _gauge(url: str, name: str, headers: dict) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", headers=headers).text):
        if family.name == name:
            return sum(s.value for s in family.samples)
    return 0.0
