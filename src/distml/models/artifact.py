"""Model artifacts: a trained model stored so any process can rebuild it exactly and safely.

Weights go to the content-addressed artifact store as safetensors bytes, next to a JSON
manifest (architecture and args, input spec, preprocessing, class names, metrics, training
config, data fingerprint, lineage); the metadata store numbers versions per name and keeps
aliases such as `champion`. Loading validates the manifest and digests, rebuilds the model
from the zoo and loads the weights strictly. Nothing is ever pickled or unpickled.
MLflow's model registry was considered; it pickles by default and brings a server, while
this needs two tables and two blobs.

Note: an architecture given as an import path `package.module:factory` is imported and
called at load time, so a manifest is trusted to the same degree as the installed packages.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import inspect
import json
from typing import TYPE_CHECKING, Any

import distml
from distml.core.errors import DistmlError
from distml.core.refs import DIGEST_PATTERN, ModelRef, check_name
from distml.lineage import record as lineage_graph
from distml.models import BUILTIN_MODELS, registry
from distml.models.datatypes import DATATYPES
from distml.workspace import Workspace

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "distml.model"
FORMAT_VERSION = 1
WEIGHTS_FORMAT = "safetensors"

#: The input spec of the zoo's models, in the V2 inference protocol's terms.
IMAGE_INPUT_SPEC: dict[str, Any] = {"name": "image", "shape": [28, 28], "datatype": "FP32"}


# key -> (accepted types, description) for format version 1.
_MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "format": ((str,), f"the string {FORMAT!r}"),
    "format_version": ((int,), "an integer"),
    "name": ((str,), "a model name"),
    "architecture": ((str,), "a zoo model name or 'package.module:factory'"),
    "arch_args": ((dict,), "an object of keyword arguments"),
    "input_spec": ((dict,), "an object with name, shape and datatype"),
    "preprocessing": ((dict,), "an object"),
    "class_names": ((list,), "a list of strings"),
    "metrics": ((dict,), "an object"),
    "training": ((dict,), "an object"),
    "data_fingerprint": ((str, type(None)), "a string or null"),
    "lineage": ((dict,), "an object"),
    "weights_digest": ((str,), "a 64-character SHA-256 hex digest"),
    "weights_format": ((str,), f"the string {WEIGHTS_FORMAT!r}"),
    "num_parameters": ((int,), "an integer"),
    "created_at": ((str,), "an ISO 8601 timestamp"),
    "distml_version": ((str,), "a version string"),
}


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """One stored model: its registry name and version (None if only in the artifact store)."""

    name: str
    version: int | None
    manifest_digest: str
    weights_digest: str
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}" if self.version is not None else self.manifest_digest


# --- saving ----------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    # numpy scalars and 0-d tensors (a metric straight from a loss) become plain numbers.
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _plain_json(field: str, value: Any, types: tuple[type, ...] = (dict,)) -> Any:
    """`value` round-tripped through strict JSON, so the manifest holds exactly what reads back."""
    if not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise DistmlError(f"{field} must be {names}, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise DistmlError(
            f"{field} must be plain JSON (strings, finite numbers, booleans, null, lists, objects "
            f"with string keys): {exc}"
        ) from exc


def _check_input_spec(spec: Any) -> dict[str, Any]:
    spec = _plain_json("input_spec", spec)
    expected = "expected e.g. {'name': 'image', 'shape': [28, 28], 'datatype': 'FP32'}"
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise DistmlError(f"input_spec needs a non-empty string 'name'; {expected}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1) for d in shape
    ):
        raise DistmlError(
            f"input_spec 'shape' must be a list of positive integers (-1 for any), got {shape!r}; {expected}"
        )
    if spec.get("datatype") not in DATATYPES:
        raise DistmlError(
            f"input_spec 'datatype' {spec.get('datatype')!r} is not a V2 datatype; expected one of "
            f"{', '.join(sorted(DATATYPES))}"
        )
    return spec


def _expected_num_classes(architecture: str, arch_args: dict[str, Any]) -> int | None:
    if "num_classes" in arch_args:
        return arch_args["num_classes"]
    from distml.models import zoo

    try:
        param = inspect.signature(zoo.resolve_factory(architecture)).parameters.get("num_classes")
    except (TypeError, ValueError):
        return None
    if param is None or param.default is param.empty:
        return None
    return param.default


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as dense, contiguous CPU tensors that share no memory (safetensors' rule)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise DistmlError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; model artifacts "
                "hold tensors only (safetensors), so extra state must be a tensor or a manifest field"
            )
        tensor = value.detach().to("cpu")
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()  # tied weights: each key gets its own copy; strict loading still fits
        else:
            seen_storages.add(storage)
        tensors[key] = tensor
    return tensors


def _state_mismatch(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> str | None:
    """A description of key and shape differences between two state dicts, or None if they fit."""

    def listing(keys: list[str]) -> str:
        shown = ", ".join(repr(k) for k in keys[:10])
        return shown + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")

    def natural(key: str) -> list[Any]:  # '2.weight' before '11.weight'
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]

    missing = sorted(set(expected) - set(actual), key=natural)
    unexpected = sorted(set(actual) - set(expected), key=natural)
    shapes = [
        f"{k!r} is {tuple(actual[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(actual), key=natural)
        if tuple(expected[k].shape) != tuple(actual[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {listing(unexpected)}")
    if shapes:
        more = f" and {len(shapes) - 10} more" if len(shapes) > 10 else ""
        problems.append("shape mismatch " + ", ".join(shapes[:10]) + more)
    return "; ".join(problems) or None


def save_model(
    workspace: Workspace,
    model: nn.Module,
    *,
    name: str,
    architecture: str,
    arch_args: dict[str, Any],
    input_spec: dict[str, Any],
    preprocessing: dict[str, Any],
    class_names: list[str],
    metrics: dict[str, Any],
    training: dict[str, Any],
    data_fingerprint: str | None,
    lineage: dict[str, Any] | None = None,
) -> ModelRecord:
    """Store `model` as safetensors weights + JSON manifest and register it as the next version of `name`.

    `architecture` and `arch_args` must rebuild a model with exactly `model`'s state dict keys
    and shapes (checked here, so a bad artifact is refused before it is stored).
    """
    import safetensors.torch
    from torch import nn

    from distml.models import zoo

    if not isinstance(model, nn.Module):
        raise DistmlError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_name("model name", name)
    arch_args = _plain_json("arch_args", arch_args)
    input_spec = _check_input_spec(input_spec)
    preprocessing = _plain_json("preprocessing", preprocessing)
    metrics = _plain_json("metrics", metrics)
    training = _plain_json("training", training)
    lineage = _plain_json("lineage", {} if lineage is None else lineage)
    data_fingerprint = _plain_json("data_fingerprint", data_fingerprint, (str, type(None)))
    if (
        not isinstance(class_names, (list, tuple))
        or not all(isinstance(c, str) and c for c in class_names)
        or len(set(class_names)) != len(class_names)
    ):
        raise DistmlError(f"class_names must be a list of distinct non-empty strings, got {class_names!r}")
    class_names = list(class_names)

    reference = zoo.build_model(architecture, **arch_args)
    tensors = _state_tensors(model)
    mismatch = _state_mismatch(reference.state_dict(), tensors)
    if mismatch:
        raise DistmlError(
            f"model does not match architecture {architecture!r} with arguments {arch_args}: {mismatch}; "
            "pass the architecture and arch_args the model was built with"
        )
    expected_classes = _expected_num_classes(architecture, arch_args)
    if expected_classes is not None and len(class_names) != expected_classes:
        raise DistmlError(
            f"class_names has {len(class_names)} names but architecture {architecture!r} has "
            f"{expected_classes} classes; pass one name per class"
        )

    weights = safetensors.torch.save(tensors, metadata={"format": "pt"})
    weights_digest = workspace.artifacts.put_bytes(weights)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": architecture,
        "arch_args": arch_args,
        "input_spec": input_spec,
        "preprocessing": preprocessing,
        "class_names": class_names,
        "metrics": metrics,
        "training": training,
        "data_fingerprint": data_fingerprint,
        "lineage": lineage,
        "weights_digest": weights_digest,
        "weights_format": WEIGHTS_FORMAT,
        "num_parameters": zoo.count_parameters(model),
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "distml_version": distml.__version__,
    }
    return _register(workspace, manifest)


def _register(workspace: Workspace, manifest: dict[str, Any], derived_from: str | None = None) -> ModelRecord:
    """Store a manifest and register it as the next version of its name (a `model` artifact in the
    lineage graph; `derived_from`: the manifest digest of the model it was registered from)."""
    manifest_digest = workspace.artifacts.put_bytes(
        json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False).encode("utf-8")
    )
    name, weights_digest = manifest["name"], manifest["weights_digest"]
    version = registry.record_model_version(
        workspace.engine,
        name=name,
        manifest_digest=manifest_digest,
        weights_digest=weights_digest,
        metrics=manifest["metrics"],
    )
    lineage_graph.record_model(
        workspace.engine,
        name=name,
        version=version,
        manifest_digest=manifest_digest,
        weights_digest=weights_digest,
        properties={"architecture": manifest["architecture"], "data_fingerprint": manifest["data_fingerprint"]},
        derived_from=derived_from,
    )
    return ModelRecord(name, version, manifest_digest, weights_digest, manifest)


# --- resolving and loading ---------------------------------------------------------------


def _verified_bytes(workspace: Workspace, digest: str, what: str) -> bytes:
    data = workspace.artifacts.get_bytes(digest)
    if hashlib.sha256(data).hexdigest() != digest:
        raise DistmlError(
            f"{what} {digest} in the artifact store is corrupted (its content no longer has that SHA-256); "
            "save the model again"
        )
    return data


def _validate_manifest(raw: bytes, digest: str) -> dict[str, Any]:
    where = f"model manifest {digest}"
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DistmlError(f"{where} is not valid UTF-8 JSON ({exc}); expected a distml model manifest") from exc
    if not isinstance(manifest, dict):
        raise DistmlError(f"{where} is a JSON {type(manifest).__name__}, expected an object")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise DistmlError(
            f"{where} has format version {version}, newer than this distml reads ({FORMAT_VERSION}); "
            "upgrade distml to load it"
        )
    missing = [key for key in _MANIFEST_FIELDS if key not in manifest]
    if missing:
        raise DistmlError(f"{where} lacks required key(s) {', '.join(missing)}; expected a distml model manifest")
    for key, (types, description) in _MANIFEST_FIELDS.items():
        value = manifest[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise DistmlError(f"{where}: {key!r} is {value!r}, expected {description}")
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise DistmlError(
            f"{where} has format {manifest['format']!r} version {manifest['format_version']}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    if manifest["weights_format"] != WEIGHTS_FORMAT:
        raise DistmlError(f"{where}: weights_format {manifest['weights_format']!r}, expected {WEIGHTS_FORMAT!r}")
    if not DIGEST_PATTERN.match(manifest["weights_digest"]):
        raise DistmlError(
            f"{where}: weights_digest {manifest['weights_digest']!r} is not a 64-character SHA-256 hex digest"
        )
    try:
        _check_architecture(manifest["architecture"])
    except DistmlError as exc:
        raise DistmlError(f"{where} names an architecture this installation cannot build: {exc}") from exc
    return manifest


def _check_architecture(name: str) -> None:
    """`name` can be built here: one of the zoo's own models (known without importing torch) or a
    factory the zoo resolves (registered in this process, or `package.module:factory`)."""
    if name in BUILTIN_MODELS:
        return
    from distml.models import zoo

    zoo.resolve_factory(name)


def _resolve_row(workspace: Workspace, ref: str | ModelRef) -> registry.ModelVersion | None:
    """The registered version `ref` names; None for a manifest digest that is only in the artifact store."""
    parsed = ModelRef.parse(ref)
    if parsed.digest is not None:
        found = registry.find_model_version_by_manifest(workspace.engine, parsed.digest)
        if found is None and not workspace.artifacts.exists(parsed.digest):
            raise DistmlError(f"no model manifest with digest {parsed.digest} in the metadata or artifact store")
        return found
    return registry.resolve(workspace.engine, parsed)


def resolve_model(workspace: Workspace, ref: str | ModelRef) -> ModelRecord:
    """The stored model `ref` names (a `ModelRef` or its text), with its validated manifest (weights
    not loaded). Every form resolves here, against the registry: the one place that does."""
    parsed = ModelRef.parse(ref)
    row = _resolve_row(workspace, parsed)
    manifest_digest = row.manifest_digest if row is not None else parsed.digest
    manifest = _validate_manifest(_verified_bytes(workspace, manifest_digest, "model manifest"), manifest_digest)
    if row is not None and row.weights_digest != manifest["weights_digest"]:
        raise DistmlError(
            f"model {row.ref}: the metadata store records weights {row.weights_digest} "
            f"but its manifest names {manifest['weights_digest']}; the registry entry is inconsistent"
        )
    if not workspace.artifacts.exists(manifest["weights_digest"]):
        raise DistmlError(
            f"model manifest {manifest_digest} names weights {manifest['weights_digest']}, which are not in "
            f"the artifact store at {workspace.artifacts.root}"
        )
    if row is not None:
        return ModelRecord(row.name, row.version, manifest_digest, row.weights_digest, manifest)
    return ModelRecord(manifest["name"], None, manifest_digest, manifest["weights_digest"], manifest)


def load_model(workspace: Workspace, ref: str | ModelRef) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model `ref` names ('name', 'name:version', 'name@alias', manifest digest).

    Returns the model in eval mode and its manifest. Weights are read with safetensors and
    loaded strictly; no pickle is involved anywhere.
    """
    import safetensors.torch

    from distml.models import zoo

    record = resolve_model(workspace, ref)
    manifest = record.manifest
    weights = _verified_bytes(workspace, record.weights_digest, "model weights")
    try:
        model = zoo.build_model(manifest["architecture"], **manifest["arch_args"])
    except DistmlError as exc:
        raise DistmlError(f"model manifest {record.manifest_digest}: {exc}") from exc
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as exc:  # SafetensorError and friends: the bytes are not a safetensors file
        raise DistmlError(f"model weights {record.weights_digest} are not a readable safetensors file ({exc})") from exc
    mismatch = _state_mismatch(model.state_dict(), tensors)
    if mismatch:
        raise DistmlError(
            f"model weights {record.weights_digest} do not fit architecture {manifest['architecture']!r} "
            f"with arguments {manifest['arch_args']}: {mismatch}"
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise DistmlError(f"model weights {record.weights_digest} could not be loaded: {exc}") from exc
    return model.eval(), manifest


# --- registry views ---------------------------------------------------------------------


def register_as(workspace: Workspace, ref: str, name: str, lineage: dict[str, Any] | None = None) -> ModelRecord:
    """Register the model `ref` names as a version of `name` (same weights, its manifest renamed,
    `lineage` added with the candidate's ref). A version of `name` with the same weights is
    returned as it is, so registering again does not multiply versions."""
    check_name("model name", name)
    record = resolve_model(workspace, ref)
    for row in registry.list_model_versions(workspace.engine, name):
        if row.weights_digest == record.weights_digest:
            return resolve_model(workspace, row.ref)
    manifest = {
        **record.manifest,
        "name": name,
        "lineage": {**record.manifest["lineage"], **_plain_json("lineage", lineage or {}), "candidate": record.ref},
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    return _register(workspace, manifest, derived_from=record.manifest_digest)


def set_alias(workspace: Workspace, name: str, alias: str, version: int) -> None:
    """Point `name@alias` (e.g. `champion`) at an existing version of `name`."""
    check_name("model name", name)
    check_name("alias", alias)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DistmlError(f"alias version must be a positive integer, got {version!r}")
    registry.resolve(workspace.engine, ModelRef(name=name, version=version))  # one error if there is none
    registry.set_model_alias(workspace.engine, name, alias, version)


def unset_alias(workspace: Workspace, name: str, alias: str, version: int | None = None) -> int:
    """Remove `name@alias`; return the version it pointed at.

    With `version`, the alias is removed only if it points at that version (so an alias that
    has since been moved elsewhere is not removed by mistake); without it, whatever it points at.
    """
    check_name("model name", name)
    check_name("alias", alias)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise DistmlError(f"alias version must be a positive integer or None, got {version!r}")
    engine = workspace.engine
    registry.resolve(engine, ModelRef(name=name, version=version))  # one error if there is none
    removed = registry.delete_model_alias(engine, name, alias, version)
    if removed is not None:
        return removed
    current = registry.get_model_alias(engine, name, alias)
    if current is None:
        registry.resolve(engine, ModelRef(name=name, alias=alias))  # one error that lists its aliases
    raise DistmlError(
        f"alias {name}@{alias} points at version {current}, not {version}; nothing was removed. "
        f"Give {name}:{current}, or {name} alone, to remove it"
    )


def list_models(workspace: Workspace, name: str | None = None) -> list[registry.ModelVersion]:
    """Registered versions (name ascending, newest first): name, version, digests, metrics, aliases."""
    return registry.list_model_versions(workspace.engine, name)


__all__ = [
    "FORMAT_VERSION",
    "IMAGE_INPUT_SPEC",
    "ModelRecord",
    "list_models",
    "load_model",
    "resolve_model",
    "save_model",
    "set_alias",
    "unset_alias",
]
