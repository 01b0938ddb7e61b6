"""Shared helpers for the export tests: one export of the end-to-end pipeline, and strict validators.

Every validator compares the object with its round trip through the library's model, so a field
the model does not know (a misspelling) is an error instead of being dropped silently."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from distml.export.k8s import ExportOptions, export_k8s

K8S_VERSION = "1.33.0"  # kubernetes-validate's schemas for the Kubernetes release the manifests target


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
