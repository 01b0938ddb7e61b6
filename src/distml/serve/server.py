"""The model server of one replica: registered models behind the V2 (Open Inference) and V1 protocols.

FastAPI + uvicorn on one event loop, a `DynamicBatcher` per model version. Clients send raw
pixels (0..255) or PNG/JPEG; the server normalises them as in training (from the manifest) and
answers softmax probabilities and the argmax label. KServe's and Triton's servers were
considered; they need their own model repository layouts (KServe's PyTorch path pickles).
Run it with `python -m distml.serve.server --workspace W --model REF [...]` (see `main`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import gc
import hmac
import io
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import distml
from distml.errors import DistmlError
from distml.ops.metrics import ServingMetrics
from distml.serve import protocol
from distml.serve.batching import DynamicBatcher
from distml.serve.jobs import JobRunner, create_job, get_job, job_view
from distml.serve.protocol import NUMERIC_TYPES, InferRequest, InferResponse, ProtocolError, Tensor
from distml.workspace import Workspace, atomic_write

log = logging.getLogger("distml.serve")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
VERSION_HEADER = "X-Model-Version"
OUTPUTS = ("probabilities", "label")
EXTENSIONS = ["binary_tensor_data", "async_jobs", "v1_predict"]
INPUT_FORMAT = (
    "raw pixel values 0..255 (FP32, or any integer/FP16/FP64 type, cast to FP32); "
    "the server applies the model's normalisation (see 'normalization')"
)


# --- the models ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normalization:
    """`x * scale` then `(x - mean) / std`: what turns raw 0..255 pixels into the model's inputs."""

    scale: float
    mean: float
    std: float
    source: str

    def apply(self, raw: np.ndarray) -> np.ndarray:
        # Same arithmetic, in float32, as distml.data.preprocess.Normalize used in training.
        x = np.array(raw, dtype=np.float32)
        x *= np.float32(self.scale / self.std)
        x -= np.float32(self.mean / self.std)
        return x


def pixel_normalization(manifest: Mapping[str, Any]) -> Normalization:
    """The normalisation for raw 0..255 pixels, read from a model manifest's `preprocessing`.

    In order: explicit numbers `{"mean", "std", "scale"?}`; the data set named by `"dataset"`
    (its training mean/std from distml.data.datasets; scale 1/255 since clients send 8-bit
    pixels, also for `digits` whose 0..16 values map onto 0..255); a `Normalize` step's
    parameters under `"steps"`; otherwise pixels / 255 unnormalised.
    """
    from distml.data import datasets

    pre = manifest.get("preprocessing") or {}

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if number(pre.get("mean")) and number(pre.get("std")) and pre["std"] != 0:
        scale = pre.get("scale", 1 / 255)
        return Normalization(
            float(scale) if number(scale) else 1 / 255,
            float(pre["mean"]),
            float(pre["std"]),
            "manifest preprocessing mean/std",
        )
    known = {
        "fashion-mnist": (datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD),
        "digits": (datasets.DIGITS_MEAN, datasets.DIGITS_STD),
    }
    if pre.get("dataset") in known:
        mean, std = known[pre["dataset"]]
        return Normalization(1 / 255, mean, std, f"data set {pre['dataset']!r} (distml.data.datasets)")
    steps = pre.get("steps")
    if isinstance(steps, dict) and number(steps.get("mean")) and number(steps.get("std")) and steps["std"] != 0:
        scale = steps.get("scale", 1 / 255)
        return Normalization(
            float(scale) if number(scale) else 1 / 255,
            float(steps["mean"]),
            float(steps["std"]),
            "manifest preprocessing Normalize step",
        )
    log.warning("model %s: its manifest names no known normalisation; serving pixels / 255", manifest.get("name"))
    return Normalization(1 / 255, 0.0, 1.0, "default (the manifest names no known normalisation)")


def optimize_for_serving(model: Any, shape: Sequence[int], tag: str) -> Any:
    """Convolutional models run with channels_last weights (oneDNN's NHWC kernels: the cnn at
    batch 32 took 98 us per image instead of 340 us). TorchScript's optimize_for_inference was
    faster still (71 us) but is deprecated in torch 2.13, and torch.compile costs a C++ build at
    every replica start; kept only if it matches the eager model, eager otherwise."""
    import torch

    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return model
    try:
        with torch.no_grad():
            probe = torch.rand(3, *shape) * 3 - 1.5
            expected = model(probe)
            model = model.to(memory_format=torch.channels_last)
            if torch.allclose(model(probe), expected, rtol=1e-4, atol=1e-4):
                return model
        log.warning("event=optimize_skipped model=%s reason=outputs_differ", tag)
        return model.to(memory_format=torch.contiguous_format)
    except Exception as exc:  # an unusual model: serve it as it came
        log.warning("event=optimize_skipped model=%s reason=%s", tag, exc)
        return model.to(memory_format=torch.contiguous_format)


class ServedModel:
    """One loaded version of a model: weights, manifest, batcher and input handling."""

    def __init__(self, name: str, version: int, manifest: dict[str, Any]):
        self.name, self.version, self.manifest = name, version, manifest
        spec = manifest["input_spec"]
        self.input_name: str = spec["name"]
        self.spec_shape: tuple[int, ...] = tuple(spec["shape"])
        self.class_names: list[str] = list(manifest["class_names"])
        self.normalization = pixel_normalization(manifest)
        self.model = None
        self.batcher: DynamicBatcher | None = None

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    # -- shapes -----------------------------------------------------------------------------

    def accepted_shapes(self) -> list[list[int]]:
        shapes = [[-1, *self.spec_shape]]
        if len(self.spec_shape) == 2:
            shapes.append([-1, 1, *self.spec_shape])
        if len(self.spec_shape) > 1 and all(d > 0 for d in self.spec_shape):
            shapes.append([-1, math.prod(self.spec_shape)])
        return shapes

    def _reshape(self, shape: Sequence[int], where: str) -> tuple[int, ...]:
        """The (n, *spec) shape an input of `shape` becomes, or a 400 naming the accepted shapes."""

        def fits(dims: Sequence[int], spec: Sequence[int]) -> bool:
            return len(dims) == len(spec) and all(s == -1 or d == s for d, s in zip(dims, spec))

        for pattern in self.accepted_shapes():
            if len(shape) == len(pattern) and fits(shape[1:], pattern[1:]):
                if shape[0] < 1:
                    raise ProtocolError(400, f"{where} has batch dimension {shape[0]}; expected at least 1 image")
                rest = [d for d in shape[1:]]
                if len(pattern) == len(self.spec_shape) + 2:  # [n, 1, H, W]: drop the channel
                    rest = rest[1:]
                elif len(pattern) == 2 and len(self.spec_shape) > 1:  # [n, H*W]
                    rest = list(self.spec_shape)
                return (int(shape[0]), *rest)
        raise ProtocolError(
            400,
            f"{where} has shape {list(shape)}; model {self.name!r} expects one of "
            f"{', '.join(str(s) for s in self.accepted_shapes())} (-1: any batch size)",
        )

    def prepare_tensor(self, tensor: Tensor) -> np.ndarray:
        """Check a V2 input against the input spec and return normalised model inputs (n, *spec)."""
        where = f"input {tensor.name!r}"
        if tensor.name != self.input_name:
            raise ProtocolError(
                400, f"model {self.name!r} has one input named {self.input_name!r}; got {tensor.name!r}"
            )
        if tensor.datatype not in NUMERIC_TYPES:
            raise ProtocolError(
                400,
                f"{where} has datatype {tensor.datatype}; expected FP32 raw pixel values "
                "0..255 (UINT8, other integer types, FP16 and FP64 are accepted and cast to FP32)",
            )
        shape = self._reshape(tensor.shape, where)
        raw = np.asarray(tensor.data, dtype=np.float32).reshape(shape)
        return self.normalize(raw, where)

    def normalize(self, raw: np.ndarray, where: str) -> np.ndarray:
        if not np.isfinite(raw).all():
            raise ProtocolError(400, f"{where} holds NaN or infinite values; expected pixel values 0..255")
        return self.normalization.apply(raw)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities for normalised inputs; runs in the batcher's thread."""
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return torch.softmax(logits.float(), dim=1).numpy()

    # -- metadata ---------------------------------------------------------------------------

    def output_specs(self) -> list[dict[str, Any]]:
        return [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.class_names)]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ]

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        n = self.normalization
        return {
            "name": self.name,
            "versions": versions,
            "platform": "pytorch",
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.spec_shape]}],
            "outputs": self.output_specs(),
            "parameters": {
                "version": str(self.version),
                "input_format": INPUT_FORMAT,
                "normalization": {"scale": n.scale, "mean": n.mean, "std": n.std, "source": n.source},
                "accepted_input_shapes": self.accepted_shapes(),
                "accepted_input_datatypes": sorted(NUMERIC_TYPES),
                "outputs": "'probabilities' (softmax) and 'label' (argmax); both unless 'outputs' names some",
                "class_names": self.class_names,
                "architecture": self.manifest.get("architecture"),
                "metrics": self.manifest.get("metrics", {}),
            },
        }


def _version_specs(name: str, specs: Iterable[Any]) -> list[str]:
    refs = []
    for spec in specs:
        if isinstance(spec, int) and not isinstance(spec, bool):
            refs.append(f"{name}:{spec}")
        elif not isinstance(spec, str):
            raise DistmlError(
                f"model {name!r}: version {spec!r} is not valid; expected a version number, "
                "'latest', '@alias' or a full reference"
            )
        elif spec in ("", "latest"):
            refs.append(name)
        elif spec.isdigit():
            refs.append(f"{name}:{spec}")
        elif spec.startswith("@"):
            refs.append(name + spec)
        else:
            refs.append(spec)
    return refs


def resolve_refs(
    workspace: Workspace, models: str | Sequence[str] | Mapping[str, Sequence[Any]]
) -> list[tuple[str, int, dict]]:
    """(name, version, manifest) for each model reference, deduplicated, in the order given."""
    from distml.models.artifact import resolve_model

    if isinstance(models, str):
        refs = [models]
    elif isinstance(models, Mapping):
        refs = [
            ref
            for name, specs in models.items()
            for ref in _version_specs(name, [specs] if isinstance(specs, (str, int)) else specs)
        ]
    else:
        refs = list(models)
    if not refs:
        raise DistmlError("no models to serve; pass at least one reference such as 'cnn', 'cnn:3' or 'cnn@champion'")
    resolved: dict[tuple[str, int], dict] = {}
    for ref in refs:
        record = resolve_model(workspace, ref)
        if record.version is None:
            raise DistmlError(
                f"model {ref!r} is in the artifact store but not registered; the server serves "
                "registered models (name, version) only"
            )
        resolved.setdefault((record.name, record.version), record.manifest)
    return [(name, version, manifest) for (name, version), manifest in resolved.items()]


# --- the server ------------------------------------------------------------------------------


class ModelServer:
    """State and handlers of one replica; `create_app` wires it into FastAPI."""

    def __init__(
        self,
        workspace: Workspace,
        resolved: list[tuple[str, int, dict]],
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        token: str | None,
        max_body_bytes: int,
        job_concurrency: int = 4,
    ):
        self.workspace = workspace
        self.max_batch_size = max_batch_size
        self.max_batch_delay_ms = max_batch_delay_ms
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.metrics = ServingMetrics()
        self.models: dict[str, dict[int, ServedModel]] = {}
        for name, version, manifest in resolved:
            self.models.setdefault(name, {})[version] = ServedModel(name, version, manifest)
        # The default version of a name is its highest loaded version (Triton's "latest" policy).
        self.default_version = {name: max(versions) for name, versions in self.models.items()}
        self.all_tags = ",".join(m.tag for versions in self.models.values() for m in versions.values())
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.jobs = JobRunner(
            workspace.engine,
            self._execute_job,
            {name: set(versions) for name, versions in self.models.items()},
            on_finish=lambda m, v, s: self.metrics.jobs.labels(m, v, s).inc(),
            concurrency=job_concurrency,
        )
        self._jobs_started = False

    # -- lifecycle --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        load = asyncio.get_running_loop().create_task(self._load())
        try:
            yield
        finally:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
            if self._jobs_started:
                await self.jobs.stop()
            for versions in self.models.values():
                for served in versions.values():
                    if served.batcher is not None:
                        await served.batcher.aclose()
            log.info("event=stopped models=%s", self.all_tags)

    async def _load(self) -> None:
        from distml.models.artifact import load_model

        try:
            for versions in self.models.values():
                for served in versions.values():
                    started = time.perf_counter()
                    model, manifest = await asyncio.to_thread(load_model, self.workspace, served.tag)
                    model = await asyncio.to_thread(optimize_for_serving, model, served.spec_shape, served.tag)
                    served.model, served.manifest = model, manifest
                    histogram = self.metrics.batch_size.labels(served.name, str(served.version))
                    served.batcher = DynamicBatcher(
                        served.forward,
                        self.max_batch_size,
                        self.max_batch_delay_ms,
                        on_batch=histogram.observe,
                        name=served.tag,
                    )
                    self.metrics.queue_depth.labels(served.name, str(served.version)).set_function(
                        lambda b=served.batcher: b.queue_depth
                    )
                    log.info("event=model_loaded model=%s seconds=%.3f", served.tag, time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.load_error = f"loading the models failed: {exc}"
            log.error("event=load_failed error=%s", exc)
            return
        # Everything loaded so far lives as long as the server: keep it out of the garbage
        # collector's full passes (measured at c64: 116-353 ms pauses before, 5-11 ms after).
        gc.freeze()
        self.ready = True
        self.metrics.ready.set(1)
        self.jobs.start()
        self._jobs_started = True

    # -- lookups ----------------------------------------------------------------------------

    def lookup(
        self, name: str, version: str | None, labels: dict | None = None, *, need_ready: bool = True
    ) -> ServedModel:
        versions = self.models.get(name)
        if versions is None:
            raise ProtocolError(404, f"unknown model {name!r}; this server serves {', '.join(sorted(self.models))}")
        if version is None:
            number = self.default_version[name]
        else:
            if not version.isdigit() or int(version) not in versions:
                loaded = ", ".join(str(v) for v in sorted(versions))
                raise ProtocolError(
                    404, f"model {name!r} has no version {version!r} on this server; loaded versions: {loaded}"
                )
            number = int(version)
        served = versions[number]
        if labels is not None:
            labels["model"], labels["version"] = served.name, str(served.version)
        if need_ready and not served.ready:
            raise ProtocolError(503, self.load_error or f"model {served.tag} is still loading; retry shortly")
        return served

    def _lookup(self, request: Request, endpoint: str, *, need_ready: bool = True) -> ServedModel:
        labels = request.scope.get("distml.labels", {})
        labels["endpoint"] = endpoint
        return self.lookup(
            request.path_params["model"], request.path_params.get("version"), labels, need_ready=need_ready
        )

    async def read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ProtocolError(
                413,
                f"request body of {length} bytes exceeds the server's limit of "
                f"{self.max_body_bytes} bytes; send fewer images per request",
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ProtocolError(
                    413,
                    f"request body exceeds the server's limit of {self.max_body_bytes} bytes; "
                    "send fewer images per request",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(self, request: Request, example: str) -> dict[str, Any]:
        body = protocol.decompress_body(
            await self.read_body(request), request.headers.get("content-encoding"), self.max_body_bytes
        )
        return protocol.load_json_object(body, "request body", f"expected {example}")

    # -- inference --------------------------------------------------------------------------

    def check_request(self, served: ServedModel, request: InferRequest) -> tuple[np.ndarray, list[str]]:
        """Validate a V2 request against the model; return normalised inputs and the outputs to send."""
        if len(request.inputs) != 1:
            names = ", ".join(repr(t.name) for t in request.inputs)
            raise ProtocolError(
                400,
                f"model {served.name!r} takes exactly one input {served.input_name!r}; got "
                f"{len(request.inputs)} ({names})",
            )
        x = served.prepare_tensor(request.inputs[0])
        requested = [o.name for o in request.outputs] if request.outputs else list(OUTPUTS)
        unknown = [n for n in requested if n not in OUTPUTS]
        if unknown:
            raise ProtocolError(
                400,
                f"model {served.name!r} has no output {unknown[0]!r}; its outputs are "
                "'probabilities' (FP32 [-1, classes]) and 'label' (INT64 [-1])",
            )
        return x, requested

    async def infer(self, served: ServedModel, request: InferRequest) -> InferResponse:
        x, requested = self.check_request(served, request)
        probabilities = await served.batcher.submit(x)
        tensors = {
            "probabilities": lambda: Tensor(
                "probabilities", "FP32", tuple(probabilities.shape), probabilities.astype(np.float32, copy=False)
            ),
            "label": lambda: Tensor(
                "label", "INT64", (len(probabilities),), probabilities.argmax(axis=1).astype(np.int64)
            ),
        }
        return InferResponse(
            model_name=served.name,
            model_version=str(served.version),
            id=request.id,
            outputs=[tensors[name]() for name in requested],
        )

    async def _execute_job(self, model: str, version: int | None, request: dict) -> tuple[int, dict]:
        served = self.lookup(model, None if version is None else str(version))
        response = await self.infer(served, protocol.infer_request_from_json(request))
        return served.version, protocol.infer_response_json(response)

    def v1_images(self, served: ServedModel, instances: list) -> np.ndarray:
        """Raw pixels (n, *spec) for V1 instances: nested lists or base64 PNG/JPEG images."""
        images = []
        for i, instance in enumerate(instances):
            where = f"instances[{i}]"
            if isinstance(instance, dict):
                holder = instance.get("image_bytes", instance)
                b64 = holder.get("b64") if isinstance(holder, dict) else None
                if not isinstance(b64, str):
                    raise ProtocolError(
                        400,
                        f"{where} is an object without image_bytes.b64; expected "
                        '{"image_bytes": {"b64": "<base64 PNG or JPEG>"}}',
                    )
                images.append(self._decode_image(served, b64, where))
            elif isinstance(instance, list):
                try:
                    array = np.array(instance)
                except (ValueError, TypeError):
                    raise ProtocolError(
                        400,
                        f"{where} is a ragged nested list; expected a "
                        f"{'x'.join(map(str, served.spec_shape))} grid of pixel values",
                    ) from None
                if array.dtype.kind not in "iuf":
                    raise ProtocolError(400, f"{where} holds non-numeric values; expected pixel values 0..255")
                shape = served._reshape((1, *array.shape), where)
                images.append(array.astype(np.float32).reshape(shape[1:]))
            else:
                raise ProtocolError(
                    400,
                    f"{where} is a {type(instance).__name__}; expected a "
                    f"{'x'.join(map(str, served.spec_shape))} nested list of pixel values 0..255 "
                    'or {"image_bytes": {"b64": "..."}}',
                )
        return np.stack(images)

    def _decode_image(self, served: ServedModel, b64: str, where: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if len(served.spec_shape) != 2 or any(d < 1 for d in served.spec_shape):
            raise ProtocolError(
                400,
                f"model {served.name!r} takes inputs of shape {list(served.spec_shape)}, not images; send nested lists",
            )
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(400, f"{where}: image_bytes.b64 is not valid base64") from None
        height, width = served.spec_shape
        try:
            with Image.open(io.BytesIO(raw), formats=("PNG", "JPEG")) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ProtocolError(
                        400,
                        f"{where}: image of {image.width}x{image.height} pixels is larger than "
                        f"the {MAX_IMAGE_PIXELS} pixels accepted",
                    )
                gray = image.convert("L")
                if gray.size != (width, height):
                    gray = gray.resize((width, height), Image.Resampling.BILINEAR)
                return np.asarray(gray, dtype=np.float32)
        except ProtocolError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ProtocolError(400, f"{where}: image_bytes is not a readable PNG or JPEG image ({exc})") from None

    # -- handlers ---------------------------------------------------------------------------

    async def health_live(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "health"
        return JSONResponse({"live": True})

    async def health_ready(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "health"
        if self.draining:
            return JSONResponse({"ready": False, "error": "the server is shutting down"}, 503)
        if not self.ready:
            return JSONResponse({"ready": False, "error": self.load_error or "models are still loading"}, 503)
        return JSONResponse({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "server_metadata"
        return JSONResponse({"name": "distml", "version": distml.__version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        served = self._lookup(request, "model_metadata", need_ready=False)
        versions = [str(v) for v in sorted(self.models[served.name])]
        return JSONResponse(served.metadata(versions))

    async def model_ready(self, request: Request) -> Response:
        served = self._lookup(request, "model_ready", need_ready=False)
        if not served.ready:
            message = self.load_error or f"model {served.tag} is still loading"
            return JSONResponse({"name": served.name, "ready": False, "error": message}, 503)
        return JSONResponse({"name": served.name, "version": str(served.version), "ready": True})

    async def v2_infer(self, request: Request) -> Response:
        served = self._lookup(request, "infer")
        body = await self.read_body(request)
        infer_request = protocol.parse_infer_request(
            body,
            request.headers.get(protocol.HEADER_LENGTH),
            request.headers.get("content-encoding"),
            max_bytes=self.max_body_bytes,
        )
        response = await self.infer(served, infer_request)
        content, headers = protocol.encode_infer_response(response, infer_request.wants_binary)
        return Response(content, 200, headers=headers)

    async def submit_job(self, request: Request) -> Response:
        served = self._lookup(request, "job_submit")
        if protocol.HEADER_LENGTH.lower() in request.headers:
            raise ProtocolError(
                400,
                "asynchronous jobs take JSON requests only (they are stored as JSON); drop the "
                f"binary tensor data extension ({protocol.HEADER_LENGTH})",
            )
        obj = await self.read_json(request, 'a V2 infer request object, optionally with "callback_url"')
        callback_url = obj.pop("callback_url", None)
        parameters = obj.get("parameters")
        if isinstance(parameters, dict) and "callback_url" in parameters:
            parameters = dict(parameters)
            callback_url = callback_url or parameters.pop("callback_url")
            obj["parameters"] = parameters
        if callback_url is not None:
            callback_url = _check_callback_url(callback_url)
        infer_request = protocol.infer_request_from_json(obj)
        if infer_request.wants_any_binary():
            raise ProtocolError(400, "asynchronous jobs store JSON results; drop binary_data / binary_data_output")
        self.check_request(served, infer_request)
        pinned = request.path_params.get("version")
        row = await asyncio.to_thread(
            create_job,
            self.workspace.engine,
            model=served.name,
            version=int(pinned) if pinned is not None else None,
            request=obj,
            callback_url=callback_url,
        )
        self.jobs.wake()
        log.info("event=job_queued id=%s model=%s version=%s", row["id"], served.name, pinned or "default")
        return JSONResponse(
            {"id": row["id"], "status": row["status"], "model": served.name, "model_version": pinned},
            202,
            headers={"Location": f"/v2/jobs/{row['id']}"},
        )

    async def job_status(self, request: Request) -> Response:
        labels = request.scope["distml.labels"]
        labels["endpoint"] = "job_status"
        job_id = request.path_params["job_id"]
        row = await asyncio.to_thread(get_job, self.workspace.engine, job_id) if len(job_id) <= 64 else None
        if row is None:
            raise ProtocolError(404, f"no inference job with id {job_id!r}")
        if row["version"] is not None:
            labels["model"], labels["version"] = row["model"], str(row["version"])
        return JSONResponse(job_view(row))

    async def v1_model(self, request: Request) -> Response:
        served = self._lookup(request, "v1_model", need_ready=False)
        if not served.ready:
            return JSONResponse(
                {
                    "name": served.name,
                    "ready": False,
                    "error": self.load_error or f"model {served.tag} is still loading",
                },
                503,
            )
        return JSONResponse({"name": served.name, "ready": True})

    async def v1_predict(self, request: Request) -> Response:
        served = self._lookup(request, "v1_predict")
        example = (
            '{"instances": [...]} with one image per instance: a '
            f"{'x'.join(map(str, served.spec_shape))} nested list of pixel values 0..255, or "
            '{"image_bytes": {"b64": "<base64 PNG or JPEG>"}}'
        )
        obj = await self.read_json(request, example)
        instances = obj.get("instances")
        if not isinstance(instances, list) or not instances:
            raise ProtocolError(400, f"request has no non-empty 'instances' list; expected {example}")
        if any(isinstance(i, dict) for i in instances):
            raw = await asyncio.to_thread(self.v1_images, served, instances)
        else:
            raw = self.v1_images(served, instances)
        probabilities = await served.batcher.submit(served.normalize(raw, "instances"))
        labels = probabilities.argmax(axis=1)
        predictions = [
            {"label": int(label), "class": served.class_names[int(label)], "probabilities": p.tolist()}
            for label, p in zip(labels, probabilities.astype(np.float64))
        ]
        return JSONResponse({"predictions": predictions})

    async def metrics_endpoint(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "metrics"
        body, content_type = self.metrics.exposition()
        return Response(body, 200, media_type=content_type)


def _check_callback_url(value: Any) -> str:
    import httpx

    problem = None
    if not isinstance(value, str):
        problem = f"is a {type(value).__name__}"
    else:
        try:
            url = httpx.URL(value)
            if url.scheme not in ("http", "https") or not url.host:
                problem = f"is {value!r}"
        except Exception:
            problem = f"is {value!r}"
    if problem:
        raise ProtocolError(400, f"callback_url {problem}; expected an absolute http:// or https:// URL")
    return value


class _ServingMiddleware:
    """Pure ASGI: bearer-token check, X-Model-Version on every response, request metrics, JSON 500s."""

    def __init__(self, app, server: ModelServer):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.server
        labels = {"model": "", "version": "", "endpoint": "other"}
        scope["distml.labels"] = labels
        state = {"status": 500, "started": False}
        started = time.perf_counter()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-model-version"]
                tag = f"{labels['model']}:{labels['version']}" if labels["model"] else server.all_tags
                headers.append((b"x-model-version", tag.encode()))
                message = {**message, "headers": headers}
            await send(message)

        async def send_error(status: int, text: str, extra: Sequence[tuple[bytes, bytes]] = ()):
            body = json.dumps({"error": text}).encode()
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        *extra,
                    ],
                }
            )
            await send_with_headers({"type": "http.response.body", "body": body})

        server.metrics.in_flight.inc()
        try:
            if server.token is not None and not scope["path"].startswith("/v2/health/"):
                given = dict(scope.get("headers", [])).get(b"authorization", b"")
                scheme, _, value = given.partition(b" ")
                if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), server.token):
                    labels["endpoint"] = "unauthorized"
                    await send_error(
                        401,
                        "missing or wrong bearer token; send the header 'Authorization: Bearer <token>'",
                        [(b"www-authenticate", b"Bearer")],
                    )
                    return
            try:
                await self.app(scope, receive, send_with_headers)
            except Exception as exc:
                log.exception("event=unhandled_error path=%s", scope["path"])
                if state["started"]:
                    raise
                await send_error(500, f"internal server error: {type(exc).__name__}: {exc}")
        finally:
            server.metrics.in_flight.dec()
            server.metrics.observe_request(
                labels["model"], labels["version"], labels["endpoint"], state["status"], time.perf_counter() - started
            )


def create_app(
    workspace: Workspace | str | os.PathLike,
    models: str | Sequence[str] | Mapping[str, Sequence[Any]],
    *,
    max_batch_size: int = 32,
    max_batch_delay_ms: float = 0.0,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    job_concurrency: int = 4,
) -> FastAPI:
    """The FastAPI app of one replica serving `models`.

    `models` is a reference ('cnn' = latest, 'cnn:3', 'cnn@champion', a manifest digest of a
    registered model), a list of them, or {name: [version, 'latest', '@alias', ...]}. References
    are resolved now (a bad one raises DistmlError); weights load in the background once the app
    starts, and /v2/health/ready answers 503 until they are in.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise DistmlError(f"max_batch_size must be an integer >= 1 (1 turns batching off), got {max_batch_size!r}")
    if not isinstance(max_batch_delay_ms, (int, float)) or not 0 <= max_batch_delay_ms <= 60_000:
        raise DistmlError(f"max_batch_delay_ms must be a number of milliseconds 0..60000, got {max_batch_delay_ms!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise DistmlError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}")
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    server = ModelServer(
        ws,
        resolve_refs(ws, models),
        max_batch_size=max_batch_size,
        max_batch_delay_ms=float(max_batch_delay_ms),
        token=token,
        max_body_bytes=max_body_bytes,
        job_concurrency=job_concurrency,
    )
    app = FastAPI(title="distml model server", version=distml.__version__, lifespan=server.lifespan)
    app.state.server = server

    @app.exception_handler(DistmlError)
    async def _distml_error(_request: Request, exc: DistmlError) -> Response:
        return JSONResponse({"error": str(exc)}, getattr(exc, "status", 400))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail
        if exc.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}; see /docs for the V2 (/v2/...) and "
                "V1 (/v1/models/{model}[:predict]) routes"
            )
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": str(message)}, exc.status_code, headers=getattr(exc, "headers", None))

    routes = [
        ("GET", "/v2/health/live", server.health_live),
        ("GET", "/v2/health/ready", server.health_ready),
        ("GET", "/v2", server.server_metadata),
        ("GET", "/v2/models/{model}", server.model_metadata),
        ("GET", "/v2/models/{model}/versions/{version}", server.model_metadata),
        ("GET", "/v2/models/{model}/ready", server.model_ready),
        ("GET", "/v2/models/{model}/versions/{version}/ready", server.model_ready),
        ("POST", "/v2/models/{model}/infer", server.v2_infer),
        ("POST", "/v2/models/{model}/versions/{version}/infer", server.v2_infer),
        ("POST", "/v2/models/{model}/jobs", server.submit_job),
        ("POST", "/v2/models/{model}/versions/{version}/jobs", server.submit_job),
        ("GET", "/v2/jobs/{job_id}", server.job_status),
        ("GET", "/v1/models/{model}", server.v1_model),
        ("POST", "/v1/models/{model}:predict", server.v1_predict),
        ("GET", "/metrics", server.metrics_endpoint),
    ]
    for method, path, endpoint in routes:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=True)
    # The inference routes are matched first and called as plain Starlette endpoints: FastAPI's
    # per-request dependency solving and the linear scan over every route took 31% of the event
    # loop at c64. They stay in the OpenAPI schema through the FastAPI routes above.
    from starlette.routing import Route

    hot = [
        Route(path, endpoint, methods=[method])
        for method, path, endpoint in routes
        if endpoint in (server.v2_infer, server.v1_predict)
    ]
    app.router.routes[:0] = hot
    app.add_middleware(_ServingMiddleware, server=server)
    return app


# --- the replica process ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distml.serve.server",
        description="Serve registered distml models over the V2 (Open Inference) and V1 REST protocols.",
    )
    parser.add_argument("--workspace", default=None, help="workspace folder (default: $DISTML_HOME or ./.distml)")
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="REF",
        help="model to serve: NAME (latest), NAME:VERSION or NAME@ALIAS; repeatable",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: a free port)")
    parser.add_argument("--port-file", default=None, help="write the bound port here once ready to serve")
    parser.add_argument("--max-batch-size", type=int, default=32, help="items per forward pass (1: no batching)")
    parser.add_argument(
        "--max-batch-delay-ms", type=float, default=0.0, help="longest wait for a batch to fill after its first item"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("DISTML_SERVE_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default: $DISTML_SERVE_TOKEN)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise DistmlError(
            f"cannot listen on {host}:{port} ({exc}); pick another --host/--port (0: a free port)"
        ) from exc
    sock.setblocking(False)
    return sock


async def _serve(server: Any, sock: socket.socket, app: FastAPI, port_file: str | None) -> int:
    """Run uvicorn on the bound socket; write the port file once it listens and the models are loaded."""
    model_server: ModelServer = app.state.server
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not task.done() and not (server.started and model_server.ready):
        if model_server.load_error:
            log.error("event=exit reason=%r", model_server.load_error)
            server.should_exit = True
            await task
            return 1
        await asyncio.sleep(0.02)
    if not task.done():
        port = sock.getsockname()[1]
        if port_file:
            with atomic_write(Path(port_file), "w") as handle:
                handle.write(str(port))
        log.info("event=ready port=%d models=%s", port, model_server.all_tags)
    while not task.done() and not server.should_exit:
        await asyncio.sleep(0.05)
    model_server.draining = True  # SIGTERM: readiness turns 503 while in-flight requests finish
    await task
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one replica. Contract (the gateway relies on it):

    binds --host/--port (0 = a free port), loads every --model, then writes the bound port to
    --port-file atomically (temp + rename); on SIGTERM (or SIGINT) it stops accepting
    connections, finishes in-flight requests and exits 0. Exit 2: bad arguments or model
    references; 1: the models failed to load.
    """
    import uvicorn

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per callback POST is noise
    if args.port_file:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.port_file)  # never leave a previous run's port for the caller to read
    try:
        if not 0 <= args.port <= 65535:
            raise DistmlError(f"--port must be 0..65535, got {args.port}")
        workspace = Workspace(args.workspace)
        app = create_app(
            workspace,
            args.model,
            max_batch_size=args.max_batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms,
            token=args.token,
            max_body_bytes=args.max_body_bytes,
        )
        sock = _bind(args.host, args.port)
    except DistmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises a caught SIGTERM/SIGINT after its graceful shutdown; with these no-op
    # handlers in place the process then exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        return asyncio.run(_serve(server, sock, app, args.port_file))
    finally:
        workspace.close()


if __name__ == "__main__":
    sys.exit(main())
