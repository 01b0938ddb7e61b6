"""Shared helpers for the export tests: one export of the end-to-end pipeline, and strict validators.

Every validator compares the object with its round trip through the library's model, so a field
the model does not know (a misspelling) is an error instead of being dropped silently."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from distml.export.k8s import ExportOptions, export_k8s

K8S_VERSION = "1.33.0"  # kubernetes-validate's schemas for the Kubernetes release the manifests target
CRD_SCHEMAS = Path(__file__).parent / "crd_schemas"  # Kueue's and Volcano's CRD schemas (see its README)


def e2e_options(**overrides: Any) -> ExportOptions:
    values: dict[str, Any] = dict(
        target="distml.pipelines.end_to_end:pipeline",
        image="registry.example/distml:1.0",
        namespace="ml",
        params={"dataset": "digits", "epochs": 1, "batch_size": 32},
    )
    values.update(overrides)
    return ExportOptions(**values)


@pytest.fixture(scope="session")
def e2e_export() -> Any:
    return export_k8s(e2e_options())


def _diff(original: Any, round_trip: Any, path: str = "") -> list[str]:
    """Where `round_trip` lost or changed something of `original` (values compared as YAML scalars)."""
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [f"{path}: became {round_trip!r}"]
        out = []
        for key, value in original.items():
            if key not in round_trip:
                out.append(f"{path}.{key}: unknown field (dropped by the model)")
            else:
                out += _diff(value, round_trip[key], f"{path}.{key}")
        return out
    if isinstance(original, list):
        if not isinstance(round_trip, list) or len(original) != len(round_trip):
            return [f"{path}: list changed"]
        return [d for i, (a, b) in enumerate(zip(original, round_trip)) for d in _diff(a, b, f"{path}[{i}]")]
    if str(original) != str(round_trip) and original != round_trip:
        return [f"{path}: {original!r} became {round_trip!r}"]
    return []


def assert_round_trip(original: dict, round_trip: dict, what: str) -> None:
    problems = _diff(original, round_trip)
    assert not problems, f"{what} is not valid: " + "; ".join(problems[:10])


def validate_argo(obj: dict) -> None:
    from hera.workflows import models as m

    model = {"Workflow": m.Workflow, "WorkflowTemplate": m.WorkflowTemplate}[obj["kind"]]
    parsed = model.model_validate(obj)
    assert_round_trip(obj, parsed.model_dump(by_alias=True, exclude_none=True, mode="json"), obj["kind"])


def validate_pytorchjob(obj: dict) -> None:
    """Through kubeflow-training's models; they name `Quantity` (schedulingPolicy.minResources) but
    do not define it, so it is offered as what the API has it as: a string."""
    import kubeflow.training.models
    from kubeflow.training import ApiClient

    if not hasattr(kubeflow.training.models, "Quantity"):
        kubeflow.training.models.Quantity = str
    client = ApiClient()
    parsed = client._ApiClient__deserialize(obj, "KubeflowOrgV1PyTorchJob")
    assert_round_trip(obj, client.sanitize_for_serialization(parsed), "PyTorchJob")


def validate_trainjob(obj: dict) -> None:
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    parsed = TrainerV1alpha1TrainJob.from_dict(obj)
    assert_round_trip(obj, parsed.to_dict(), "TrainJob")


def validate_inference_service(obj: dict) -> None:
    """Through kserve's models; the Kubernetes models they embed (V1ObjectMeta, V1Container, ...)
    live in the kubernetes package, where kserve's own client does not look, so they are offered too."""
    import kserve.models
    import kubernetes.client.models
    from kserve import ApiClient

    for name in dir(kubernetes.client.models):
        if name.startswith("V1") and not hasattr(kserve.models, name):
            setattr(kserve.models, name, getattr(kubernetes.client.models, name))
    client = ApiClient()
    parsed = client._ApiClient__deserialize(obj, "V1beta1InferenceService")
    assert_round_trip(obj, client.sanitize_for_serialization(parsed), "InferenceService")


def validate_core(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_pod_template(pod_spec: dict, metadata: dict | None = None) -> None:
    """A pod spec checked strictly, wrapped as a core PodTemplate."""
    validate_core(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": {"metadata": metadata or {}, "spec": pod_spec},
        }
    )


def embedded_manifests(workflow_template: dict) -> dict[str, dict]:
    """The objects the WorkflowTemplate's resource templates create, by template name."""
    return {
        t["name"]: yaml.safe_load(t["resource"]["manifest"])
        for t in workflow_template["spec"]["templates"]
        if "resource" in t
    }


# -- custom resources without Python models (Kueue, Volcano): their CRDs' OpenAPI v3 schemas ---------

_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
# A label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
_QUALIFIED_NAME = rf"^({_DNS_SUBDOMAIN}/)?(?=.{{1,63}}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_INT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# Extensions the translation understands; a refreshed CRD with another one fails loudly instead.
_K8S_EXTENSIONS = {
    "x-kubernetes-int-or-string",  # -> anyOf integer / string
    "x-kubernetes-preserve-unknown-fields",  # -> no additionalProperties: false
    "x-kubernetes-list-type",  # set -> uniqueItems; map -> unique list-map-keys; atomic: merge semantics only
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",  # merge semantics only
    "x-kubernetes-validations",  # CEL: not evaluated (see validate_crd)
    "x-kubernetes-embedded-resource",
}


def _metadata_schema(scope: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "name": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": f"^{_DNS_SUBDOMAIN}$"},
        "labels": {
            "type": "object",
            "propertyNames": {"maxLength": 317, "pattern": _QUALIFIED_NAME},
            "additionalProperties": {"type": "string", "maxLength": 63, "pattern": _LABEL_VALUE},
        },
        "annotations": {
            "type": "object",
            "propertyNames": {"maxLength": 317, "pattern": _QUALIFIED_NAME},
            "additionalProperties": {"type": "string"},
        },
    }
    if scope == "Namespaced":  # a cluster-scoped object has no namespace
        properties["namespace"] = {"type": "string", "maxLength": 63, "pattern": f"^{_DNS_LABEL}$"}
    return {"type": "object", "required": ["name"], "properties": properties, "additionalProperties": False}


def _strict_schema(schema: Any) -> Any:
    """A CRD's structural schema as plain, strict JSON Schema (draft 7): every object schema with
    `properties` refuses other fields unless it preserves unknown fields; OpenAPI's and Kubernetes'
    extensions become what they mean."""
    if not isinstance(schema, dict):
        return schema
    out = copy.copy(schema)
    unknown = {k for k in out if k.startswith("x-kubernetes-")} - _K8S_EXTENSIONS
    assert not unknown, f"the CRD schema uses extensions the validator does not translate: {sorted(unknown)}"
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: _strict_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:  # OpenAPI 3.0
        out["type"] = [out["type"], "null"]
    for bound in ("Minimum", "Maximum"):  # OpenAPI 3.0's boolean exclusiveMinimum/Maximum
        if out.get(f"exclusive{bound}") is True:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
        elif out.get(f"exclusive{bound}") is False:
            del out[f"exclusive{bound}"]
    if out.get("type") == "integer" and out.get("format") in _INT_BOUNDS:
        low, high = _INT_BOUNDS[out["format"]]
        out["minimum"] = max(out.get("minimum", low), low)
        out["maximum"] = min(out.get("maximum", high), high)
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (
        "properties" in out
        and "additionalProperties" not in out
        and out.get("x-kubernetes-preserve-unknown-fields") is not True
    ):
        out["additionalProperties"] = False
    return out


def _unique_list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict) -> Any:
    """`x-kubernetes-list-type: map`: no two items have the same values of the list-map-keys."""
    import jsonschema

    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k)) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"items {seen[key]} and {i} have the same {', '.join(keys)}: {key}")
        seen.setdefault(key, i)


@functools.cache
def _crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a draft 7 validator of the whole object, from crd_schemas/*.json."""
    import jsonschema

    checker = jsonschema.validators.extend(
        jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
    )
    validators = {}
    for path in sorted(CRD_SCHEMAS.glob("*.json")):
        crd = json.loads(path.read_text())
        schema = _strict_schema(crd["openAPIV3Schema"])
        properties = schema["properties"]
        properties["apiVersion"] = {"const": crd["apiVersion"]}
        properties["kind"] = {"const": crd["kind"]}
        properties["metadata"] = _metadata_schema(crd["scope"])
        schema["required"] = ["apiVersion", "kind", "metadata", *schema.get("required", [])]
        checker.check_schema(schema)
        validators[crd["apiVersion"], crd["kind"]] = checker(schema)
    return validators


def _error_lines(error: Any) -> list[str]:
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        scoped = " (the kind is cluster-scoped)" if error.json_path == "$.metadata" else ""
        return [f"{error.json_path}.{key}: unknown field" + (scoped if key == "namespace" else "") for key in extra]
    return [f"{error.json_path}: {error.message}"]


def _kueue_cluster_queue_rules(obj: dict) -> list[str]:
    """The ClusterQueue CRD's CEL rules (v0.13), and its webhook's resource-order check, in Python."""
    spec = obj.get("spec", {})
    out = []
    for i, group in enumerate(spec.get("resourceGroups", [])):
        covered = group.get("coveredResources", [])
        for j, flavor in enumerate(group.get("flavors", [])):
            names = [r.get("name") for r in flavor.get("resources", [])]
            path = f"$.spec.resourceGroups[{i}].flavors[{j}].resources"
            if len(names) != len(covered):  # CEL on resourceGroups[*]
                out.append(f"{path}: flavors must have the same number of resources as the coveredResources")
            elif names != covered:  # the webhook: resources[k].name must be coveredResources[k]
                out.append(f"{path}: names {names} must match coveredResources {covered} in order")
            if "cohort" not in spec and any("borrowingLimit" in r for r in flavor.get("resources", [])):
                out.append(f"{path}: borrowingLimit must be nil when cohort is empty")  # CEL on spec
    preemption = spec.get("preemption", {})
    borrow = preemption.get("borrowWithinCohort", {}).get("policy", "Never")
    if preemption.get("reclaimWithinCohort", "Never") == "Never" and borrow != "Never":  # CEL on preemption
        out.append("$.spec.preemption: reclaimWithinCohort=Never and borrowWithinCohort.Policy!=Never")
    return out


def validate_crd(obj: dict) -> None:
    """A Kueue or Volcano object checked against its CRD's own OpenAPI v3 schema (crd_schemas/),
    made strict: a field the schema does not define fails (a misspelling), as do a wrong type, a
    value outside an enum, a pattern or a bound (int32/int64 included), a repeated set item or
    list-map key. apiVersion and kind must be the schema's; metadata may hold only name (required,
    a DNS-1123 subdomain), namespace (a DNS-1123 label; only for namespaced kinds), labels and
    annotations (qualified-name keys, string values). Every problem is reported with its JSON path.

    Not checked: the CRDs' CEL rules (`x-kubernetes-validations`) are not evaluated, except those
    that bear on what distml writes, re-stated in Python for the ClusterQueue: each flavor lists as
    many resources as `coveredResources` (and, as Kueue's webhook requires, in the same order);
    no `borrowingLimit` without a `cohort`; not `reclaimWithinCohort: Never` together with a
    `borrowWithinCohort.policy` other than Never. The rest concern fields distml does not write
    (ResourceFlavor topologyName/nodeTaints/tolerations) or updates (LocalQueue's immutable
    clusterQueue); Volcano's Queue CRD (v1.9) has none. Also not checked: the admission webhooks'
    other rules, `format`s other than int32/int64 (e.g. date-time), and that quantities parse
    beyond the schema's pattern."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    validators = _crd_validators()
    assert key in validators, f"no CRD schema for {key} in {CRD_SCHEMAS}; have {sorted(validators)}"
    errors = sorted(validators[key].iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    problems = [line for error in errors for line in _error_lines(error)]
    if key == ("kueue.x-k8s.io/v1beta1", "ClusterQueue"):
        problems += _kueue_cluster_queue_rules(obj)
    name = obj.get("metadata", {}).get("name") if isinstance(obj.get("metadata"), dict) else None
    assert not problems, f"{key[1]} {name!r} is not valid: " + "; ".join(problems)
