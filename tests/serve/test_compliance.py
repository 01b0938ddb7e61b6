"""Real V2 clients against the server: tritonclient[http] and kserve's InferenceRESTClient."""

from __future__ import annotations

import asyncio
import importlib
import os
from types import ModuleType

import numpy as np
import pytest


def optional_import(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


tritonhttp = optional_import("tritonclient.http")
kserve = optional_import("kserve")


def require(module: ModuleType | None, name: str) -> None:
    """Each client gates only its own tests: skipped where it is not installed, a failure where
    DISTML_REQUIRE_CLIENTS is set (CI), so a broken install cannot pass as skipped."""
    if module is None:
        message = f"{name} cannot be imported (pip install 'tritonclient[http]' kserve)"
        if os.environ.get("DISTML_REQUIRE_CLIENTS"):
            pytest.fail(f"{message}; DISTML_REQUIRE_CLIENTS is set, so this is an error")
        pytest.skip(message)


@pytest.fixture
def triton(request):
    require(tritonhttp, "tritonclient.http")  # before the server starts
    server = request.getfixturevalue("server")
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def test_triton_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("cnn") and triton.is_model_ready("cnn", "1") and triton.is_model_ready("mlp")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("cnn", "9")
    server_meta = triton.get_server_metadata()
    assert server_meta["name"] == "distml" and "binary_tensor_data" in server_meta["extensions"]
    meta = triton.get_model_metadata("cnn", "1")
    assert meta["name"] == "cnn" and meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 28, 28]}
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    with pytest.raises(tritonhttp.InferenceServerException, match="unknown model 'nope'"):
        triton.get_model_metadata("nope")


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("outputs", ["none", "binary", "json"])
def test_triton_infer(triton, reference, make_pixels, binary_input, outputs):
    images = make_pixels(3, seed=20)
    infer_input = tritonhttp.InferInput("image", list(images.shape), "FP32")
    infer_input.set_data_from_numpy(images, binary_data=binary_input)
    requested = None
    if outputs != "none":  # "none": the client asks for every output as binary (binary_data_output)
        requested = [
            tritonhttp.InferRequestedOutput(name, binary_data=outputs == "binary")
            for name in ("probabilities", "label")
        ]
    result = triton.infer("cnn", [infer_input], model_version="1", outputs=requested, request_id="t-1")
    expected = reference.probabilities("cnn:1", images)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
    assert result.as_numpy("label").tolist() == expected.argmax(1).tolist()
    response = result.get_response()
    assert response["model_name"] == "cnn" and response["model_version"] == "1" and response["id"] == "t-1"
    binary = outputs != "json"
    assert all(("binary_data_size" in o.get("parameters", {})) == binary for o in response["outputs"])


def test_triton_uint8_input_and_errors(triton, reference, make_pixels):
    images = make_pixels(2, seed=21).astype(np.uint8).reshape(2, 784)
    infer_input = tritonhttp.InferInput("image", [2, 784], "UINT8")
    infer_input.set_data_from_numpy(images)
    result = triton.infer("cnn", [infer_input])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.probabilities("cnn:2", images), rtol=1e-5, atol=1e-6
    )
    bad = tritonhttp.InferInput("image", [2, 28], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 28), np.float32))
    with pytest.raises(tritonhttp.InferenceServerException, match=r"expects one of \[-1, 28, 28\]"):
        triton.infer("cnn", [bad])


def test_kserve_rest_client(request, make_pixels):
    require(kserve, "kserve")  # before the server starts
    server, reference = request.getfixturevalue("server"), request.getfixturevalue("reference")
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    images = make_pixels(2, seed=22)

    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            assert await client.is_server_live(server.url) is True
            assert await client.is_server_ready(server.url) is True
            assert await client.is_model_ready(server.url, "cnn") is True
            assert await client.is_model_ready(server.url, "nope") is False
            results = []
            for binary in (False, True):
                infer_input = InferInput(name="image", shape=list(images.shape), datatype="FP32")
                infer_input.set_data_from_numpy(images, binary_data=binary)
                request = InferRequest(
                    model_name="cnn",
                    infer_inputs=[infer_input],
                    request_id=f"k-{binary}",
                    parameters={"binary_data_output": binary},
                )
                results.append(await client.infer(server.url, request, model_name="cnn"))
            return results
        finally:
            await client.close()

    expected = reference.probabilities("cnn:2", images)
    for response in asyncio.run(run()):
        assert response.model_name == "cnn"
        outputs = {o.name: o for o in response.outputs}
        np.testing.assert_allclose(outputs["probabilities"].as_numpy(), expected, rtol=1e-5, atol=1e-6)
        assert outputs["label"].as_numpy().tolist() == expected.argmax(1).tolist()
