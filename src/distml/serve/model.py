"""The transport-free core of serving: a loaded model version, its input checks and its inference.

`ServedModel` turns protocol tensors (V2) or instances (V1: nested lists, base64 PNG/JPEG) into the
exact inputs the model was trained on (the `Preprocessing` its manifest records) and answers
softmax probabilities and labels through a `DynamicBatcher`; `ModelRepository` holds the versions
one replica serves. No HTTP here: `server.py` is a thin FastAPI layer over it (as kserve's DataPlane).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from distml.core import refs
from distml.core.errors import DistmlError
from distml.models.datatypes import NUMERIC_TYPES
from distml.serve import protocol
from distml.serve.batching import DynamicBatcher
from distml.serve.protocol import InferRequest, InferResponse, ProtocolError, Tensor
from distml.workspace import Workspace

log = logging.getLogger("distml.serve")

MAX_IMAGE_PIXELS = 4096 * 4096
OUTPUTS = ("probabilities", "label")
INPUT_FORMAT = (
    "raw pixel values 0..255 (FP32, or any integer/FP16/FP64 type, cast to FP32); "
    "the server applies the model's normalisation (see 'normalization')"
)
_PREPROCESSING_HELP = (
    "expected preprocessing.normalization {scale, mean, std} and preprocessing.input {shape, dtype}, "
    "which `distml train` records; retrain the model or save it with them"
)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a client's raw input into the model's: `(x * scale - mean) / std` on `input_shape`.

    Read only from the model's manifest, where training wrote it; a manifest without it is refused.
    """

    input_shape: tuple[int, ...]
    input_dtype: str
    scale: float
    mean: float
    std: float

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], tag: str) -> Preprocessing:
        pre = manifest.get("preprocessing")
        norm = pre.get("normalization") if isinstance(pre, Mapping) else None
        spec = pre.get("input") if isinstance(pre, Mapping) else None
        if not isinstance(norm, Mapping) or not isinstance(spec, Mapping):
            raise DistmlError(
                f"model {tag} cannot be served: its manifest records no input normalisation; {_PREPROCESSING_HELP}"
            )

        def number(key: str) -> float:
            value = norm.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DistmlError(
                    f"model {tag} cannot be served: preprocessing.normalization.{key} is "
                    f"{value!r}; expected a finite number"
                )
            return float(value)

        scale, mean, std = number("scale"), number("mean"), number("std")
        if std == 0 or scale == 0:
            raise DistmlError(
                f"model {tag} cannot be served: preprocessing.normalization has scale {scale:g} "
                f"and std {std:g}; both must be non-zero"
            )
        shape = spec.get("shape")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        ):
            raise DistmlError(
                f"model {tag} cannot be served: preprocessing.input.shape is {shape!r}; "
                "expected a list of positive integers such as [28, 28]"
            )
        dtype = spec.get("dtype")
        if dtype not in NUMERIC_TYPES:
            raise DistmlError(
                f"model {tag} cannot be served: preprocessing.input.dtype is {dtype!r}; "
                f"expected one of {', '.join(sorted(NUMERIC_TYPES))}"
            )
        return cls(tuple(shape), dtype, scale, mean, std)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return self.apply_in_place(np.array(raw, dtype=np.float32))

    def apply_in_place(self, x: np.ndarray) -> np.ndarray:
        """`apply` on a float32 array the caller owns (no copy)."""
        # The same float32 arithmetic as distml.data.preprocess.Normalize in training.
        x *= np.float32(self.scale / self.std)
        x -= np.float32(self.mean / self.std)
        return x

    def describe(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "scale": self.scale,
            "mean": self.mean,
            "std": self.std,
        }


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
    """One version of a model: manifest, input handling and (once `load`ed) weights and batcher.

    Constructing one checks the manifest's preprocessing, so a model that cannot be served
    correctly is refused before any weights load.
    """

    def __init__(self, name: str, version: int, manifest: dict[str, Any]):
        self.name, self.version, self.manifest = name, version, manifest
        self.input_name: str = manifest["input_spec"]["name"]
        self.preprocessing = Preprocessing.from_manifest(manifest, f"{name}:{version}")
        self.spec_shape: tuple[int, ...] = self.preprocessing.input_shape
        self.class_names: list[str] = list(manifest["class_names"])
        self.model = None
        self.batcher: DynamicBatcher | None = None
        self.in_use = 0  # requests that looked this version up and have not answered yet (see unload)

    def load(
        self,
        workspace: Workspace,
        max_batch_size: int,
        max_batch_delay_ms: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """Read the weights (blocking: call it in a thread) and start batching."""
        from distml.models.artifact import load_model

        model, manifest = load_model(workspace, self.tag)
        self.model = optimize_for_serving(model, self.spec_shape, self.tag)
        self.manifest = manifest
        self.batcher = DynamicBatcher(
            self.forward, max_batch_size, max_batch_delay_ms, on_batch=on_batch, name=self.tag
        )

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
        if len(shape) == len(self.spec_shape) + 1 and tuple(shape[1:]) == self.spec_shape and shape[0] >= 1:
            return tuple(shape)  # already (n, *spec): the common case, without building the patterns

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
        return self.normalize(np.asarray(tensor.data).reshape(shape), where)

    def normalize(self, raw: np.ndarray, where: str) -> np.ndarray:
        """Raw numeric pixels (any integer or float dtype) as normalised float32 model inputs (a new array)."""
        x = raw.astype(np.float32)
        # integers are always finite in float32; floats may be NaN/inf, or overflow float32 (FP64)
        if raw.dtype.kind not in "iub" and not np.isfinite(x).all():
            raise ProtocolError(400, f"{where} holds NaN or infinite values; expected pixel values 0..255")
        return self.preprocessing.apply_in_place(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities for normalised inputs; runs in the batcher's thread."""
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return torch.softmax(logits.float(), dim=1).numpy()

    # -- V2 and V1 inference ------------------------------------------------------------------

    def check_request(self, request: InferRequest) -> tuple[np.ndarray, list[str]]:
        """Validate a V2 request against the model; return normalised inputs and the outputs to send."""
        if len(request.inputs) != 1:
            names = ", ".join(repr(t.name) for t in request.inputs)
            raise ProtocolError(
                400,
                f"model {self.name!r} takes exactly one input {self.input_name!r}; got {len(request.inputs)} ({names})",
            )
        x = self.prepare_tensor(request.inputs[0])
        requested = [o.name for o in request.outputs] if request.outputs else list(OUTPUTS)
        unknown = [n for n in requested if n not in OUTPUTS]
        if unknown:
            raise ProtocolError(
                400,
                f"model {self.name!r} has no output {unknown[0]!r}; its outputs are "
                "'probabilities' (FP32 [-1, classes]) and 'label' (INT64 [-1])",
            )
        return x, requested

    async def infer(self, request: InferRequest) -> InferResponse:
        x, requested = self.check_request(request)
        probabilities = await self.batcher.submit(x)
        tensors = {
            "probabilities": lambda: Tensor(
                "probabilities", "FP32", tuple(probabilities.shape), probabilities.astype(np.float32, copy=False)
            ),
            "label": lambda: Tensor(
                "label", "INT64", (len(probabilities),), probabilities.argmax(axis=1).astype(np.int64)
            ),
        }
        return InferResponse(
            model_name=self.name,
            model_version=str(self.version),
            id=request.id,
            outputs=[tensors[name]() for name in requested],
        )

    def v1_images(self, instances: list) -> np.ndarray:
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
                images.append(self._decode_image(b64, where))
            elif isinstance(instance, list):
                try:
                    array = np.array(instance)
                except (ValueError, TypeError):
                    raise ProtocolError(
                        400,
                        f"{where} is a ragged nested list; expected a "
                        f"{'x'.join(map(str, self.spec_shape))} grid of pixel values",
                    ) from None
                if array.dtype.kind not in "iuf":
                    raise ProtocolError(400, f"{where} holds non-numeric values; expected pixel values 0..255")
                if array.shape != self.spec_shape:
                    array = array.reshape(self._reshape((1, *array.shape), where)[1:])
                images.append(array)  # cast to float32 once, by `normalize`
            else:
                raise ProtocolError(
                    400,
                    f"{where} is a {type(instance).__name__}; expected a "
                    f"{'x'.join(map(str, self.spec_shape))} nested list of pixel values 0..255 "
                    'or {"image_bytes": {"b64": "..."}}',
                )
        if len(images) == 1:
            return images[0][np.newaxis]
        if any(image.dtype != images[0].dtype for image in images):  # each cast as it is, not via float64
            images = [image.astype(np.float32) for image in images]
        return np.stack(images)

    def _decode_image(self, b64: str, where: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if len(self.spec_shape) != 2 or any(d < 1 for d in self.spec_shape):
            raise ProtocolError(
                400,
                f"model {self.name!r} takes inputs of shape {list(self.spec_shape)}, not images; send nested lists",
            )
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(400, f"{where}: image_bytes.b64 is not valid base64") from None
        height, width = self.spec_shape
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

    async def predict(self, instances: Any) -> list[dict[str, Any]]:
        """V1 `:predict`: one prediction {label, class, probabilities} per instance."""
        if not isinstance(instances, list) or not instances:
            raise ProtocolError(400, f"request has no non-empty 'instances' list; expected {self.v1_example()}")
        if any(isinstance(i, dict) for i in instances):  # image decoding is CPU work: off the event loop
            raw = await asyncio.to_thread(self.v1_images, instances)
        else:
            raw = self.v1_images(instances)
        probabilities = await self.batcher.submit(self.normalize(raw, "instances"))
        if not np.isfinite(probabilities).all():
            raise ProtocolError(500, f"model {self.tag} answered NaN or infinite probabilities; it cannot be served")
        labels = probabilities.argmax(axis=1)
        return [
            {"label": int(label), "class": self.class_names[int(label)], "probabilities": p.tolist()}
            for label, p in zip(labels, probabilities.astype(np.float64))
        ]

    def v1_example(self) -> str:
        return (
            '{"instances": [...]} with one image per instance: a '
            f"{'x'.join(map(str, self.spec_shape))} nested list of pixel values 0..255, or "
            '{"image_bytes": {"b64": "<base64 PNG or JPEG>"}}'
        )

    # -- metadata ---------------------------------------------------------------------------

    def output_specs(self) -> list[dict[str, Any]]:
        return [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.class_names)]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ]

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        n = self.preprocessing
        return {
            "name": self.name,
            "versions": versions,
            "platform": "pytorch",
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.spec_shape]}],
            "outputs": self.output_specs(),
            "parameters": {
                "version": str(self.version),
                "input_format": INPUT_FORMAT,
                "normalization": {**n.describe(), "source": "model manifest"},
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


class ModelRepository:
    """The model versions one replica serves, by name and version; the default version of a name
    is its highest loaded one (Triton's "latest" policy), also after `load_version`/`unload_version`."""

    def __init__(self, workspace: Workspace, models: str | Sequence[str] | Mapping[str, Sequence[Any]]):
        self.workspace = workspace
        self.models: dict[str, dict[int, ServedModel]] = {}
        for name, version, manifest in resolve_refs(workspace, models):
            self.models.setdefault(name, {})[version] = ServedModel(name, version, manifest)
        self.default_version = {name: max(versions) for name, versions in self.models.items()}
        self.tags = ",".join(m.tag for m in self)
        self.load_error: str | None = None
        self.listeners: list[Callable[[], None]] = []  # called when a version is loaded or unloaded
        self._loading: dict[tuple[str, int], asyncio.Task] = {}

    def __iter__(self):
        return (m for versions in self.models.values() for m in versions.values())

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self)

    def versions(self, name: str) -> list[str]:
        return [str(v) for v in sorted(self.models[name])]

    def lookup(self, name: str, version: str | None, *, need_ready: bool = True) -> ServedModel:
        """The version `version` of `name` (None: the default); 404 if not served, 503 if not loaded."""
        versions = self.models.get(name)
        if versions is None:
            raise ProtocolError(404, f"unknown model {name!r}; this server serves {', '.join(sorted(self.models))}")
        try:
            number = self.default_version[name] if version is None else parse_version(name, version)
        except ProtocolError:
            number = None
        if number not in versions:
            loaded = ", ".join(str(v) for v in sorted(versions))
            raise ProtocolError(
                404, f"model {name!r} has no version {version!r} on this server; loaded versions: {loaded}"
            )
        served = versions[number]
        if need_ready and not served.ready:
            raise ProtocolError(503, self.load_error or f"model {served.tag} is still loading; retry shortly")
        return served

    async def load(
        self,
        max_batch_size: int,
        max_batch_delay_ms: float,
        on_batch: Callable[[ServedModel], Callable[[int], None]] | None = None,
    ) -> None:
        """Load every version's weights in a thread; on failure `load_error` says why."""
        for served in self:
            callback = on_batch(served) if on_batch is not None else None
            await asyncio.to_thread(served.load, self.workspace, max_batch_size, max_batch_delay_ms, callback)
            log.info("event=model_loaded model=%s", served.tag)

    async def close(self) -> None:
        for served in self:
            if served.batcher is not None:
                await served.batcher.aclose()

    # -- loading and unloading a version while serving (the V2 model-repository extension) ------

    async def load_version(
        self,
        name: str,
        version: int,
        max_batch_size: int,
        max_batch_delay_ms: float,
        on_batch: Callable[[ServedModel], Callable[[int], None]] | None = None,
    ) -> tuple[ServedModel, bool]:
        """Load registered version `name:version` beside the others; (its ServedModel, loaded now).

        Resolved as at start (`resolve_refs`: 404 for an unknown one, 400 for a manifest that cannot be
        served), weights read in a thread; it joins `models` only once it can answer, so nothing is
        ever routed to a half-loaded version. Already loaded: returned as it is (False). Concurrent
        loads of one version share one load. The default version of `name` stays its highest loaded
        version, so loading a higher one changes what unpinned requests get: a gateway pins versions.
        """
        served = self.models.get(name, {}).get(version)
        if served is not None:
            if not served.ready:
                raise ProtocolError(503, self.load_error or f"model {served.tag} is still loading; retry shortly")
            return served, False
        key = (name, version)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._load_version(name, version, max_batch_size, max_batch_delay_ms, on_batch)
            )
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        return await asyncio.shield(task), True

    async def _load_version(
        self,
        name: str,
        version: int,
        max_batch_size: int,
        max_batch_delay_ms: float,
        on_batch: Callable[[ServedModel], Callable[[int], None]] | None,
    ) -> ServedModel:
        tag = f"{name}:{version}"
        try:
            [(_, _, manifest)] = await asyncio.to_thread(resolve_refs, self.workspace, [tag])
        except DistmlError as exc:
            raise ProtocolError(404, f"cannot load {tag}: {exc}") from None
        try:
            served = ServedModel(name, version, manifest)
        except DistmlError as exc:
            raise ProtocolError(400, str(exc)) from None
        callback = on_batch(served) if on_batch is not None else None
        try:
            await asyncio.to_thread(served.load, self.workspace, max_batch_size, max_batch_delay_ms, callback)
        except DistmlError as exc:
            raise ProtocolError(400, f"cannot load {tag}: {exc}") from None
        self.models.setdefault(name, {})[version] = served
        self._changed()
        log.info("event=model_loaded model=%s default=%s:%d", tag, name, self.default_version[name])
        return served

    async def unload_version(self, name: str, version: int, timeout: float = 30.0) -> ServedModel:
        """Stop serving `name:version`: new requests get 404 at once, the ones that already looked it
        up finish (up to `timeout` s), then its batcher closes. 404 if not loaded; 409 for the last
        loaded version of `name` (a replica always answers every model it was started with)."""
        versions = self.models.get(name)
        if versions is None or version not in versions:
            loaded = ", ".join(str(v) for v in sorted(versions or ()))
            where = f"loaded versions: {loaded}" if loaded else f"this server serves {', '.join(sorted(self.models))}"
            raise ProtocolError(404, f"model {name!r} has no version {version} loaded on this server; {where}")
        if len(versions) == 1:
            raise ProtocolError(
                409,
                f"version {version} is the last loaded version of model {name!r}; load another version "
                "first (a model cannot be left with no version)",
            )
        served = versions.pop(version)
        self._changed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while served.in_use > 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if served.batcher is not None:
            await served.batcher.aclose(max(0.0, deadline - loop.time()))
        log.info("event=model_unloaded model=%s default=%s:%d", served.tag, name, self.default_version[name])
        return served

    def _changed(self) -> None:
        self.default_version = {name: max(versions) for name, versions in self.models.items()}
        self.tags = ",".join(m.tag for m in self)
        for listener in self.listeners:
            listener()

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every version served or loading, with its state."""
        out = [{"name": m.name, "version": str(m.version), "state": "READY" if m.ready else "LOADING"} for m in self]
        loaded = {(m.name, m.version) for m in self}
        out += [{"name": n, "version": str(v), "state": "LOADING"} for n, v in self._loading if (n, v) not in loaded]
        return out

    async def run_job(self, model: str, version: int | None, request: dict) -> tuple[int, dict]:
        """An asynchronous job's V2 request, run like a synchronous one; (version, response JSON)."""
        served = self.lookup(model, None if version is None else str(version))
        served.in_use += 1
        try:
            response = await served.infer(protocol.infer_request_from_json(request))
        finally:
            served.in_use -= 1
        return served.version, protocol.infer_response_json(response)


def parse_version(name: str, version: str) -> int:
    """A version from a path or an `X-Model-Version` header: '3' or 'name:3'; a bad one is a 400."""
    try:
        return refs.parse_version(version, name)
    except DistmlError as exc:
        raise ProtocolError(400, str(exc)) from None


__all__ = ["ModelRepository", "Preprocessing", "ServedModel", "optimize_for_serving", "parse_version", "resolve_refs"]
