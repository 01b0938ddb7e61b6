"""A user pipeline with its own training and serving steps: an MLP on digits, served as a service.

Run it here with `distml run examples/digits_mlp.py:pipeline`; hand it to a cluster with
`distml export k8s examples/digits_mlp.py:pipeline --image IMAGE --namespace NS --out k8s/`,
which makes a Kubeflow training job of `train` (kind="training": its TrainConfig is `mlp_run`'s)
and a KServe InferenceService of `publish` (kind="serving": `service_of` names the service).
"""

from __future__ import annotations

from distml.core.errors import DistmlError
from distml.models.artifact import register_as, set_alias
from distml.serve.service import ensure_serving
from distml.train.config import DataSection, ModelSection, ParallelismSection, TrainConfig, TrainingSection
from distml.train.launcher import launch
from distml.workflow import Resources, current, step

WORKERS = 2  # the training gang: processes here, pods on a cluster


def mlp_run(dataset: str, width: int, epochs: int) -> TrainConfig:
    """The training run of `train`, here and on a cluster."""
    ws = current().workspace
    return TrainConfig(
        model=ModelSection(name="mlp", args={"width": width, "depth": 2}),
        data=DataSection(dataset=dataset),
        training=TrainingSection(epochs=epochs),
        parallelism=ParallelismSection(workers=WORKERS),
        workspace=ws.ref,
    )


def trained(config: TrainConfig, result: dict, *args, **kwargs) -> dict:
    """`train`'s value once its run finished."""
    return {"model": result["model"], "test_accuracy": result["test_accuracy"], "run": config.resolved_run_id()}


@step(kind="training", spec=mlp_run, collect=trained, memoize=True, resources=Resources(cpus=1, workers=WORKERS))
def train(dataset: str, width: int, epochs: int) -> dict:
    config = mlp_run(dataset, width, epochs)
    result = launch(config)
    if result is None:
        raise DistmlError(f"training run {config.resolved_run_id()} stopped before the end")
    return trained(config, result)


def service_of(model: dict, name: str, replicas: int = 1) -> dict:
    """What `publish` serves, for a cluster: service NAME with NAME@production."""
    return {"service": name, "model": name, "replicas": replicas}


@step(kind="serving", spec=service_of, resources=Resources(cpus=0))
def publish(model: dict, name: str, replicas: int = 1) -> dict:
    ws = current().workspace
    record = register_as(ws, model["model"], name, {"workflow_run": current().run_id})
    set_alias(ws, name, "production", record.version)
    served = ensure_serving(ws, name, record.ref, {"replicas": replicas})
    return {"url": served["url"], "model": record.ref, "action": served["action"]}


def pipeline(dataset: str = "digits", width: int = 256, epochs: int = 2, name: str = "digits-mlp"):
    return publish(train(dataset, width, epochs), name)
