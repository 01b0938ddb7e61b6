"""`distml export k8s`: the Kubernetes manifests that run a distml pipeline on a cluster's engines.

The pipeline's graph is built (not run) from the same Python function `distml run` runs, and each
node becomes an Argo Workflows DAG task (generated with hera): memoized steps get the local memo
key, computed in the cluster by the same code; training steps create a Kubeflow PyTorchJob or
TrainJob (torchrun running `distml.train.worker`); the serving step applies a KServe
InferenceService running the distml replica. Kueue queues admit the training gangs (or, with
`scheduler="volcano"`, a Volcano Queue and the PodGroups the training operator makes). The result
is a kustomize folder. Objects are plain dicts (Argo's through hera's models); no other library
writes Kubeflow, KServe or Kueue objects without a cluster, so those are written here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

from distml.core.errors import DistmlError
from distml.export.steprunner import OUT_DIR, PipelineSpec

#: The releases the generated objects target (the README's "On Kubernetes" repeats them).
TARGETS = {
    "Argo Workflows": "v4.0 (hera 7.1.0, whose models are generated from Argo v4.0.5)",
    "Kubeflow Training Operator (PyTorchJob)": "v1.9",
    "Kubeflow Trainer (TrainJob)": "v2.1+ (API v1alpha1, runtimePatches as in kubeflow-trainer-api 2.3.0)",
    "KServe": "v0.15+ (serving.kserve.io/v1beta1)",
    "Kueue": "v0.13+ (kueue.x-k8s.io/v1beta1)",
    "Volcano (--scheduler volcano)": "v1.9+ (scheduling.volcano.sh/v1beta1)",
}

WORKSPACE_MOUNT = "/workspace"
PIPELINE_CONFIG = "/etc/distml/pipeline/pipeline.json"
REPLICA_CONFIG = "/etc/distml/replica/replica.json"
DB_SECRET = "distml-db"
#: the replicas' bearer token (key DISTML_SERVE_TOKEN): created by hand, never written in the folder
SERVE_SECRET = "distml-serve"
MEMO_CACHE = "distml-memo"
SERVICE_ACCOUNT = "distml-workflow"
REPLICA_PORT = 8080
TRAINING_RUNTIME = "torch-distributed"
SCHEDULERS = ("kueue", "volcano")
MAX_QUEUE_WEIGHT = 65535  # Volcano's Queue CRD bounds spec.weight to 1..65535 (v1.12+)
#: The queue's quota, shared by Kueue's ClusterQueue (nominalQuota) and Volcano's Queue (capability).
QUEUE_QUOTA = {"cpu": "16", "memory": "64Gi"}
PRIORITY_CLASSES = {"low": -100, "normal": 0, "high": 100, "serving": 1000}  # distml.scheduling.core's classes
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class Storage:
    claim: str
    path: str  # sub-path inside the claim ("" = its root)


def parse_storage(url: str) -> Storage:
    """`pvc://NAME/PATH` -> the claim and sub-path the workspace lives in."""
    match = re.fullmatch(r"pvc://([^/]+)(?:/(.*))?", url)
    if not match or not _DNS.match(match.group(1)) or len(match.group(1)) > 63:
        raise DistmlError(f"--storage must be pvc://NAME/PATH with NAME a Kubernetes name (a-z, 0-9, '-'), got {url!r}")
    path = (match.group(2) or "").strip("/")
    if any(part in ("", ".", "..") for part in path.split("/")) and path:
        raise DistmlError(f"--storage path must be a relative path without '.' or '..' parts, got {url!r}")
    return Storage(match.group(1), path)


def parse_nnodes(value: str | None) -> tuple[int, int] | None:
    """`--nnodes N` or `MIN:MAX` (elastic) -> (MIN, MAX); None keeps one pod per worker."""
    if value is None:
        return None
    parts = value.split(":")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise DistmlError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    low, high = int(parts[0]), int(parts[-1])
    if low > high:
        raise DistmlError(f"--nnodes MIN:MAX needs MIN <= MAX, got {value!r}")
    return low, high


def k8s_name(text: str) -> str:
    """A DNS-1123 label from a node id or a model name (`train[batch_norm]` -> `train-batch-norm`)."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not name:
        raise DistmlError(f"cannot make a Kubernetes name from {text!r}")
    return name


@dataclasses.dataclass
class ExportOptions:
    target: str
    image: str
    namespace: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    queue: str = "default"
    trainer: str = "pytorchjob"  # or "trainjob"
    storage: str = "pvc://distml-workspace"
    nnodes: str | None = None
    priority: str = "normal"
    canary_percent: int = 10
    storage_size: str = "20Gi"
    scheduler: str = "kueue"  # or "volcano"
    queue_weight: int = 1  # the queue's fair-share weight (as `distml queue set NAME --weight W`)

    def check(self) -> None:
        for what, value in (("--namespace", self.namespace), ("--queue", self.queue)):
            if not _DNS.match(value) or len(value) > 63:
                raise DistmlError(f"{what} must be a Kubernetes name (a-z, 0-9, '-'), got {value!r}")
        if self.trainer not in ("pytorchjob", "trainjob"):
            raise DistmlError(f"--trainer must be pytorchjob or trainjob, got {self.trainer!r}")
        if self.priority not in PRIORITY_CLASSES or self.priority == "serving":
            raise DistmlError(f"--priority must be low, normal or high, got {self.priority!r}")
        if self.scheduler not in SCHEDULERS:
            raise DistmlError(f"--scheduler must be kueue or volcano, got {self.scheduler!r}")
        if self.scheduler == "volcano" and self.trainer == "trainjob":
            # Trainer v2 turns Volcano on in the runtime's podGroupPolicy; in the pinned API
            # (kubeflow-trainer-api 2.3.0) a TrainJob's runtimePatches cannot set it.
            raise DistmlError(
                "--trainer trainjob cannot use --scheduler volcano: Kubeflow Trainer enables Volcano in the "
                "ClusterTrainingRuntime's podGroupPolicy, which a TrainJob cannot set; use --trainer pytorchjob "
                "or --scheduler kueue"
            )
        weight = self.queue_weight
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_QUEUE_WEIGHT:
            raise DistmlError(f"--queue-weight must be a whole number from 1 to {MAX_QUEUE_WEIGHT}, got {weight!r}")
        if not self.image or any(c.isspace() for c in self.image):
            raise DistmlError(f"--image must be an image reference, got {self.image!r}")
        if not 0 <= self.canary_percent <= 100:
            raise DistmlError(f"--canary-percent must be 0..100, got {self.canary_percent}")
        parse_storage(self.storage)
        parse_nnodes(self.nnodes)


# -- the pipeline's graph -------------------------------------------------------------------


def _is(node: Any, kind: str) -> bool:
    """Does `node` call a step of `kind` (training, serving: see `distml.workflow.dag.Policy`)?"""
    return node.step is not None and node.step.policy.kind == kind


def serving_spec(node: Any) -> dict[str, Any]:
    """{service, model, replicas} of a serving node, from its step's spec and literal arguments."""
    from distml.workflow import memo

    spec = node.step.policy.spec(**memo.bind(node.step, node.args, node.kwargs))
    if not isinstance(spec, dict) or not {"service", "model", "replicas"} <= set(spec):
        raise DistmlError(
            f"the spec of serving step {node.id} returned {spec!r}; expected "
            '{"service": NAME, "model": REGISTERED_NAME, "replicas": N}'
        )
    return spec


def pipeline_graph(options: ExportOptions) -> tuple[Any, Any]:
    """The target's pipeline graph, built without running anything, and the target."""
    from distml.workflow.dag import build
    from distml.workflow.target import load_target

    target = load_target(options.target)
    graph, _ = build(target.function, dict(options.params))
    for node in graph.nodes.values():
        if node.step is None:
            raise DistmlError(
                f"node {node.id} is an asynchronous fan-in (best_of); Argo has no equivalent, "
                "export the pipeline without it (e.g. --param async_selection=false)"
            )
    return graph, target


def task_names(graph: Any) -> dict[str, str]:
    names: dict[str, str] = {}
    for node_id in graph.nodes:
        name = k8s_name(node_id)
        if name in names.values():
            raise DistmlError(f"nodes {node_id} and another both map to the Argo task name {name}; rename a step")
        names[node_id] = name
    return names


# -- pod pieces shared by every container ------------------------------------------------------


def _env() -> list[dict[str, Any]]:
    return [
        {"name": "DISTML_HOME", "value": WORKSPACE_MOUNT},
        {"name": "DISTML_DB_URL", "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "DISTML_DB_URL"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _workspace_volume(storage: Storage) -> dict[str, Any]:
    return {"name": "workspace", "persistentVolumeClaim": {"claimName": storage.claim}}


def _workspace_mount(storage: Storage) -> dict[str, Any]:
    mount = {"name": "workspace", "mountPath": WORKSPACE_MOUNT}
    if storage.path:
        mount["subPath"] = storage.path
    return mount


def _resources(cpus: float, gpus: int = 0, memory_gb: float = 0.0) -> dict[str, Any]:
    """Requests (Kueue admits nothing without them) and limits; a step asking for 0 cpus gets 100m."""
    cpu = f"{round(cpus * 1000)}m" if cpus > 0 else "100m"
    memory = f"{max(1, round(memory_gb * 1024))}Mi" if memory_gb > 0 else "2Gi"
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _labels(options: ExportOptions, priority: str | None = None) -> dict[str, str]:
    if options.scheduler == "volcano":  # queue and priority go in the job's schedulingPolicy instead
        return {"app.kubernetes.io/part-of": "distml"}
    return {
        "app.kubernetes.io/part-of": "distml",
        "kueue.x-k8s.io/queue-name": options.queue,
        "kueue.x-k8s.io/priority-class": f"distml-{priority or options.priority}",
    }


def _quantity(value: str) -> float:
    """A quantity as _resources writes it (`250m`, `1024Mi`, `2Gi`, `1`) in cores, MiB or units."""
    for suffix, scale in (("m", 0.001), ("Mi", 1.0), ("Gi", 1024.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def pods_requests(requests: dict[str, str], pods: int) -> dict[str, str]:
    """The requests of `pods` identical pods added up (a gang's minResources)."""
    total: dict[str, str] = {}
    for name, value in requests.items():
        amount = _quantity(value) * pods
        if name == "cpu":
            total[name] = f"{round(amount * 1000)}m"
        elif name == "memory":
            total[name] = f"{round(amount)}Mi"
        else:
            total[name] = str(round(amount))
    return total


# -- training jobs ---------------------------------------------------------------------------


def worker_command(config_path: str) -> list[str]:
    """What each training pod runs: torchrun (the same launcher `distml train` calls) with one
    `distml.train.worker` process; the operator's environment gives the node rank and master."""
    return ["torchrun", "--nproc-per-node=1", "-m", "distml.train.worker", config_path]


def _train_pod_spec(options: ExportOptions, storage: Storage, args: list[str], resources: dict, env: list) -> dict:
    return {
        "restartPolicy": "OnFailure",
        "containers": [
            {
                "name": "pytorch",
                "image": options.image,
                "command": args[:1],
                "args": args[1:],
                "env": _env() + env,
                "resources": resources,
                "volumeMounts": [_workspace_mount(storage)],
            }
        ],
        "volumes": [_workspace_volume(storage)],
    }


def training_job(options: ExportOptions, node: Any, name: str, run_id: str) -> dict[str, Any]:
    """The Kubeflow job that trains one candidate: `workers` pods (one worker each) admitted as a gang.

    `run_id` may be an Argo parameter reference; the config at runs/RUN_ID/config.json was written
    onto the workspace volume by the step's `prepare` task."""
    storage = parse_storage(options.storage)
    per_pod = node.step.policy.resources
    workers = per_pod.workers  # the step's gang: one pod per worker
    low, high = parse_nnodes(options.nnodes) or (workers, workers)
    resources = _resources(per_pod.cpus, per_pod.gpus, per_pod.memory_gb)
    config_path = f"$(DISTML_HOME)/runs/{run_id}/config.json"
    command = worker_command(config_path)
    elastic = low != high
    if options.trainer == "trainjob":
        return {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": name, "namespace": options.namespace, "labels": _labels(options)},
            "spec": {
                "runtimeRef": {
                    "name": TRAINING_RUNTIME,
                    "apiGroup": "trainer.kubeflow.org",
                    "kind": "ClusterTrainingRuntime",
                },
                "trainer": {
                    "image": options.image,
                    "command": command,
                    "numNodes": high,
                    "numProcPerNode": 1,
                    "resourcesPerNode": resources,
                    "env": _env(),
                },
                "runtimePatches": [
                    {
                        "manager": "distml.io/export",
                        "trainingRuntimeSpec": {
                            "template": {
                                "spec": {
                                    "replicatedJobs": [
                                        {
                                            "name": "node",
                                            "template": {
                                                "spec": {
                                                    "template": {
                                                        "spec": {
                                                            "volumes": [_workspace_volume(storage)],
                                                            "containers": [
                                                                {
                                                                    "name": "node",
                                                                    "volumeMounts": [_workspace_mount(storage)],
                                                                }
                                                            ],
                                                        }
                                                    }
                                                }
                                            },
                                        }
                                    ]
                                }
                            }
                        },
                    }
                ],
            },
        }
    if elastic:  # elastic: every pod a Worker, membership through the c10d rendezvous the operator sets up
        command = [*command[:1], f"--nnodes={low}:{high}", "--rdzv-backend=c10d", *command[1:]]
        replica_specs = {"Worker": {"replicas": low, "restartPolicy": "OnFailure"}}
    else:  # static: the operator's MASTER_ADDR/MASTER_PORT, PET_NODE_RANK give the rendezvous
        command = [
            *command[:1],
            f"--nnodes={low}",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            *command[1:],
        ]
        replica_specs = {"Master": {"replicas": 1, "restartPolicy": "OnFailure"}}
        if low > 1:
            replica_specs["Worker"] = {"replicas": low - 1, "restartPolicy": "OnFailure"}
    for spec in replica_specs.values():
        pod = _train_pod_spec(options, storage, command, resources, [])
        if options.scheduler == "volcano":
            pod["schedulerName"] = "volcano"
        spec["template"] = {"metadata": {"labels": {"app.kubernetes.io/part-of": "distml"}}, "spec": pod}
    scheduling_policy: dict[str, Any] = {
        "minAvailable": low,
        "queue": options.queue,
        "priorityClass": f"distml-{options.priority}",
    }
    if options.scheduler == "volcano":
        # The Training Operator (--gang-scheduler-name=volcano) creates the PodGroup from this:
        # minMember = minAvailable, minResources, queue, priorityClassName. distml writes no PodGroup.
        scheduling_policy["minResources"] = pods_requests(resources["requests"], low)
    job: dict[str, Any] = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": options.namespace, "labels": _labels(options)},
        "spec": {
            "nprocPerNode": "1",
            "runPolicy": {
                "cleanPodPolicy": "None",
                "backoffLimit": 3,
                "schedulingPolicy": scheduling_policy,
            },
            "pytorchReplicaSpecs": replica_specs,
        },
    }
    if elastic:
        job["spec"]["elasticPolicy"] = {
            "minReplicas": low,
            "maxReplicas": high,
            "rdzvBackend": "c10d",
            "maxRestarts": 3,
        }
    return job


def job_conditions(trainer: str) -> tuple[str, str]:
    """successCondition / failureCondition of the resource template that waits for the job."""
    if trainer == "trainjob":
        return 'status.conditions.#(type=="Complete").status == True', (
            'status.conditions.#(type=="Failed").status == True'
        )
    return "status.replicaStatuses.Master.succeeded > 0", "status.replicaStatuses.Master.failed > 0"


# -- serving ---------------------------------------------------------------------------------


def replica_config(name: str) -> dict[str, Any]:
    """The replica's config (a ConfigMap): the model NAME@production from the workspace, on port 8080."""
    from distml.serve.config import ReplicaConfig

    config = ReplicaConfig(workspace=WORKSPACE_MOUNT, models=[f"{name}@production"], host="0.0.0.0", port=REPLICA_PORT)
    return config.model_dump(mode="json")


def _serve_token_env() -> dict[str, Any]:
    """The replica listens on 0.0.0.0 in its pod, so it needs its bearer token (it refuses to start
    without one): from the Secret SERVE_SECRET, which `kubectl create secret` makes (README), so the
    token is in no file of the folder."""
    ref = {"name": SERVE_SECRET, "key": "DISTML_SERVE_TOKEN"}
    return {"name": "DISTML_SERVE_TOKEN", "valueFrom": {"secretKeyRef": ref}}


def replica_command() -> list[str]:
    return ["python", "-m", "distml.serve.server", REPLICA_CONFIG]


def inference_service(options: ExportOptions, node: Any, model_annotation: str) -> dict[str, Any]:
    """The KServe InferenceService for a serve node: the distml replica as a custom V2 predictor."""
    from distml.serve.config import ScalingPolicy

    spec = serving_spec(node)
    scaling = ScalingPolicy()
    replicas = int(spec["replicas"])
    storage = parse_storage(options.storage)
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": k8s_name(spec["service"]),
            "namespace": options.namespace,
            "labels": {"app.kubernetes.io/part-of": "distml"},
            "annotations": {"distml.io/model": model_annotation},
        },
        "spec": {
            "predictor": {
                "minReplicas": replicas,
                "maxReplicas": max(replicas, scaling.max_replicas),
                "scaleMetric": "concurrency",
                "scaleTarget": max(1, round(scaling.target_concurrency)),
                "canaryTrafficPercent": options.canary_percent,
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": options.image,
                        "command": replica_command(),
                        "env": [*_env(), _serve_token_env(), {"name": "PROTOCOL", "value": "v2"}],
                        "ports": [{"containerPort": REPLICA_PORT, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": REPLICA_PORT}},
                        "resources": _resources(1.0, 0, 2.0),
                        "volumeMounts": [
                            _workspace_mount(storage),
                            {"name": "replica-config", "mountPath": str(Path(REPLICA_CONFIG).parent), "readOnly": True},
                        ],
                    }
                ],
                "volumes": [
                    _workspace_volume(storage),
                    {"name": "replica-config", "configMap": {"name": "distml-replica"}},
                ],
            }
        },
    }


# -- the Argo workflow (hera) ------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    return "" if seconds is None else f"{round(seconds)}s"  # Argo: an empty maxAge never expires


def workflow_template(options: ExportOptions, graph: Any, name: str) -> Any:
    """The pipeline as an Argo WorkflowTemplate (a hera object): one DAG task per local node."""
    from hera.workflows import DAG, Parameter, Task, WorkflowTemplate

    build = _ArgoTemplates(options, graph)
    names = build.names
    with WorkflowTemplate(
        name=name,
        namespace=options.namespace,
        entrypoint="pipeline",
        service_account_name=SERVICE_ACCOUNT,
        volumes=build.volumes,
        labels={"app.kubernetes.io/part-of": "distml"},
    ) as wt:
        node_templates = {node_id: build.node_template(node) for node_id, node in graph.nodes.items()}
        with DAG(name="pipeline"):
            for node_id, node in graph.nodes.items():
                Task(
                    name=names[node_id],
                    template=node_templates[node_id],
                    dependencies=[names[up.id] for up in node.upstream] or None,
                    arguments=[
                        Parameter(
                            name=f"in-{names[up.id]}", value=f"{{{{tasks.{names[up.id]}.outputs.parameters.result}}}}"
                        )
                        for up in node.upstream
                        if up not in node.ordering
                    ],
                )
    return wt


class _ArgoTemplates:
    """The Argo templates of one pipeline's nodes (created inside an open hera WorkflowTemplate):
    a training step as prepare, create its PyTorchJob/TrainJob, collect; a serving step as an
    InferenceService; a memoized step as key, then a memoized run; any other step as one run."""

    def __init__(self, options: ExportOptions, graph: Any):
        from hera.workflows import Parameter
        from hera.workflows import models as m

        self.options, self.m = options, m
        storage = parse_storage(options.storage)
        self.names = names = task_names(graph)
        self.volumes = [
            m.Volume(
                name="workspace", persistent_volume_claim=m.PersistentVolumeClaimVolumeSource(claim_name=storage.claim)
            ),
            m.Volume(name="pipeline-config", config_map=m.ConfigMapVolumeSource(name="distml-pipeline")),
        ]
        self.mounts = [
            m.VolumeMount(name="workspace", mount_path=WORKSPACE_MOUNT, sub_path=storage.path or None),
            m.VolumeMount(name="pipeline-config", mount_path=str(Path(PIPELINE_CONFIG).parent), read_only=True),
        ]
        self.env = [m.EnvVar(**_camel_to_model(e)) for e in _env()]
        self.in_params = {
            nid: [Parameter(name=f"in-{names[u.id]}") for u in n.upstream if u not in n.ordering]
            for nid, n in graph.nodes.items()
        }

    def node_template(self, node: Any) -> Any:
        policy = node.step.policy
        res = policy.resources
        if _is(node, "training"):
            return self.training(node)
        if _is(node, "serving"):
            return self.serving(node)
        step_resources = _resources(res.cpus, res.gpus, res.memory_gb)
        if policy.memoize:
            return self.memoized(node, step_resources)
        return self.runner(self.names[node.id], "run", node, ["result"], step_resources, **self.policy_fields(node))

    def runner(self, tname: str, command: str, node: Any, outputs: list[str], resources: dict | None = None, **extra):
        from hera.workflows import Container, Parameter

        m, names = self.m, self.names
        ups = [up.id for up in node.upstream if up not in node.ordering]
        args = [PIPELINE_CONFIG, command, node.id, "--run-id", "{{workflow.name}}", "--out", OUT_DIR]
        for up in ups:
            args += ["--input", f"{up}={{{{inputs.parameters.in-{names[up]}}}}}"]
        return Container(
            name=tname,
            image=self.options.image,
            command=["python", "-m", "distml.export.steprunner"],
            args=args,
            env=self.env,
            volume_mounts=self.mounts,
            resources=m.ResourceRequirements(**(resources or _resources(0.25, 0, 1.0))),
            inputs=[Parameter(name=f"in-{names[up]}") for up in ups] + list(extra.pop("inputs", [])),
            outputs=[Parameter(name=o, value_from=m.ValueFrom(path=f"{OUT_DIR}/{o}")) for o in outputs],
            labels=_labels(self.options),  # Kueue admits each step pod (its `pod` integration) in the run's queue
            **extra,
        )

    def policy_fields(self, node: Any) -> dict[str, Any]:
        m, policy = self.m, node.step.policy
        fields: dict[str, Any] = {}
        if policy.retries:
            fields["retry_strategy"] = m.RetryStrategy(
                limit=str(policy.retries),
                retry_policy="Always",
                backoff=m.Backoff(
                    duration=_duration(policy.retry_backoff),
                    factor="2",
                    max_duration=_duration(policy.retry_backoff_max),
                ),
            )
        if policy.timeout is not None:
            fields["timeout"] = _duration(policy.timeout)
        return fields

    def memoize(self, node: Any) -> Any:
        m = self.m
        return m.Memoize(
            key="{{inputs.parameters.memo-key}}",
            max_age=_duration(node.step.policy.max_age),
            cache=m.Cache(config_map=m.LocalObjectReference(name=MEMO_CACHE)),
        )

    def pass_inputs(self, node: Any) -> list[Any]:
        from hera.workflows import Parameter

        return [Parameter(name=p.name, value=f"{{{{inputs.parameters.{p.name}}}}}") for p in self.in_params[node.id]]

    def _result_of(self, task: str) -> Any:
        from hera.workflows import Parameter

        value = f"{{{{tasks.{task}.outputs.parameters.result}}}}"
        return Parameter(name="result", value_from=self.m.ValueFrom(parameter=value))

    @staticmethod
    def _output_of(task: str, output: str, name: str) -> Any:
        """Argument `name` of a DAG task: output parameter `output` of the earlier task `task`."""
        from hera.workflows import Parameter

        return Parameter(name=name, value=f"{{{{tasks.{task}.outputs.parameters.{output}}}}}")

    def training(self, node: Any) -> Any:
        from hera.workflows import DAG, Parameter, Resource, Task

        m, tname, policy = self.m, self.names[node.id], node.step.policy
        job_name = f"{{{{workflow.name}}}}-{tname}"[:63]
        success, failure = job_conditions(self.options.trainer)
        prepare = self.runner(f"{tname}-prepare", "prepare", node, ["key", "run-id"])
        job = training_job(self.options, node, job_name, "{{inputs.parameters.run-id}}")
        create = Resource(
            name=f"{tname}-job",
            action="create",
            set_owner_reference=True,
            success_condition=success,
            failure_condition=failure,
            manifest=to_yaml(job),
            inputs=[Parameter(name="memo-key"), Parameter(name="run-id")],
            outputs=[Parameter(name="job", value_from=m.ValueFrom(json_path="{.metadata.name}"))],
            memoize=self.memoize(node) if policy.memoize else None,
            **self.policy_fields(node),
        )
        collect = self.runner(f"{tname}-collect", "collect", node, ["result"])
        with DAG(name=tname, inputs=self.in_params[node.id], outputs=[self._result_of("collect")]) as tmpl:
            t_prep = Task(name="prepare", template=prepare, arguments=self.pass_inputs(node))
            t_job = Task(
                name="job",
                template=create,
                arguments=[
                    self._output_of("prepare", "key", "memo-key"),
                    self._output_of("prepare", "run-id", "run-id"),
                ],
            )
            t_col = Task(name="collect", template=collect, arguments=self.pass_inputs(node))
            t_prep >> t_job >> t_col
        return tmpl

    def serving(self, node: Any) -> Any:
        from hera.workflows import Parameter, Resource

        upstream = self.names[node.upstream[0].id]
        isvc = inference_service(
            self.options, node, f"{{{{=jsonpath(inputs.parameters['in-{upstream}'], '$.model')}}}}"
        )
        return Resource(
            name=self.names[node.id],
            action="apply",
            success_condition='status.conditions.#(type=="Ready").status == True',
            manifest=to_yaml(isvc),
            inputs=self.in_params[node.id],
            outputs=[Parameter(name="result", value_from=self.m.ValueFrom(json_path="{.status.url}"))],
            **self.policy_fields(node),
        )

    def memoized(self, node: Any, step_resources: dict) -> Any:
        from hera.workflows import DAG, Parameter, Task

        tname = self.names[node.id]
        key = self.runner(f"{tname}-key", "key", node, ["key"])
        run = self.runner(
            f"{tname}-run",
            "run",
            node,
            ["result"],
            step_resources,
            inputs=[Parameter(name="memo-key")],
            memoize=self.memoize(node),
            **self.policy_fields(node),
        )
        with DAG(name=tname, inputs=self.in_params[node.id], outputs=[self._result_of("run")]) as tmpl:
            t_key = Task(name="key", template=key, arguments=self.pass_inputs(node))
            t_run = Task(
                name="run",
                template=run,
                arguments=[*self.pass_inputs(node), self._output_of("key", "key", "memo-key")],
            )
            t_key >> t_run
        return tmpl


def _camel_to_model(value: dict[str, Any]) -> dict[str, Any]:
    """A plain EnvVar dict in hera's field names (its models take the API's camelCase by alias)."""
    from hera.workflows import models as m

    return m.EnvVar.model_validate(value).model_dump(exclude_none=True)


class _Dumper(yaml.SafeDumper):
    """YAML without anchors: objects that share a dict are written out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


# -- the folder --------------------------------------------------------------------------------


def _core_objects(options: ExportOptions, spec: PipelineSpec, serve_names: list[str]) -> dict[str, list[dict]]:
    storage = parse_storage(options.storage)
    meta = {"namespace": options.namespace, "labels": {"app.kubernetes.io/part-of": "distml"}}
    files: dict[str, list[dict]] = {}
    files["storage.yaml"] = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": storage.claim, **meta},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": options.storage_size}}},
        }
    ]
    files["metadata-db.yaml"] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": DB_SECRET, **meta},
            "type": "Opaque",
            # Replace before applying: the PostgreSQL database every step, worker and replica records into.
            "stringData": {"DISTML_DB_URL": "postgresql+psycopg://distml:CHANGE-ME@postgres:5432/distml"},
        }
    ]
    configs = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "distml-pipeline", **meta},
            "data": {Path(PIPELINE_CONFIG).name: spec.model_dump_json(indent=1)},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": MEMO_CACHE, **meta}},
    ]
    for name in serve_names[:1]:
        configs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "distml-replica", **meta},
                "data": {Path(REPLICA_CONFIG).name: json.dumps(replica_config(name), indent=1)},
            }
        )
    files["configs.yaml"] = configs
    rules = [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
        {
            "apiGroups": ["kubeflow.org"],
            "resources": ["pytorchjobs"],
            "verbs": ["create", "get", "list", "watch", "patch", "delete"],
        },
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["trainjobs"],
            "verbs": ["create", "get", "list", "watch", "patch", "delete"],
        },
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices"],
            "verbs": ["create", "get", "list", "watch", "patch", "update"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "update", "patch"]},
    ]
    files["rbac.yaml"] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": SERVICE_ACCOUNT, **meta},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": SERVICE_ACCOUNT, **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": options.namespace}],
        },
    ]
    return files


def kueue_objects(options: ExportOptions) -> list[dict[str, Any]]:
    """distml's queue and priority classes as Kueue objects: one ClusterQueue with a flavor, the
    namespace's LocalQueue, and a WorkloadPriorityClass per distml priority class."""
    api = "kueue.x-k8s.io/v1beta1"
    objects: list[dict[str, Any]] = [
        {"apiVersion": api, "kind": "ResourceFlavor", "metadata": {"name": "distml-default"}},
        {
            "apiVersion": api,
            "kind": "ClusterQueue",
            "metadata": {"name": "distml"},
            "spec": {
                "namespaceSelector": {},
                "queueingStrategy": "BestEffortFIFO",
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "fairSharing": {"weight": str(options.queue_weight)},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": "distml-default",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": QUEUE_QUOTA["cpu"]},
                                    {"name": "memory", "nominalQuota": QUEUE_QUOTA["memory"]},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "0"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": api,
            "kind": "LocalQueue",
            "metadata": {"name": options.queue, "namespace": options.namespace},
            "spec": {"clusterQueue": "distml"},
        },
    ]
    for name, value in PRIORITY_CLASSES.items():
        objects.append(
            {
                "apiVersion": api,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": f"distml-{name}"},
                "value": value,
                "description": f"distml priority class {name}",
            }
        )
    return objects


def volcano_objects(options: ExportOptions) -> list[dict[str, Any]]:
    """distml's queue and priority classes for Volcano: the (cluster-scoped) Queue the training
    operator puts each job's PodGroup in, and a PriorityClass per distml priority class, which the
    PodGroups' priorityClassName names. The PodGroups themselves are made by the Training Operator."""
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "scheduling.volcano.sh/v1beta1",
            "kind": "Queue",
            "metadata": {"name": options.queue, "labels": {"app.kubernetes.io/part-of": "distml"}},
            "spec": {
                "weight": options.queue_weight,
                "reclaimable": True,  # lends idle capacity and takes it back, like Kueue's fair sharing
                "capability": dict(QUEUE_QUOTA),
            },
        }
    ]
    for name, value in PRIORITY_CLASSES.items():
        objects.append(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": f"distml-{name}", "labels": {"app.kubernetes.io/part-of": "distml"}},
                "value": value,
                "globalDefault": False,
                "description": f"distml priority class {name}",
            }
        )
    return objects


DOCKERFILE = """\
# The image every exported object runs: Argo steps (python -m distml.export.steprunner), training
# workers (torchrun -m distml.train.worker) and replicas (python -m distml.serve.server).
# Build it from the repository's root: docker build -f {path} -t IMAGE .
FROM {base}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/distml
COPY pyproject.toml README.md ./
COPY src ./src
RUN {install}
WORKDIR /workspace
ENV DISTML_HOME=/workspace
"""


def dockerfiles() -> dict[str, str]:
    return {
        "Dockerfile": DOCKERFILE.format(
            path="DIR/Dockerfile",
            base="python:3.11-slim",
            install="pip install torch --index-url ${TORCH_INDEX:-https://download.pytorch.org/whl/cpu} "
            "&& pip install .",
        ).replace("FROM python:3.11-slim", "FROM python:3.11-slim\nARG TORCH_INDEX"),
        "Dockerfile.cuda": DOCKERFILE.format(
            path="DIR/Dockerfile.cuda", base="pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime", install="pip install ."
        ),
    }


@dataclasses.dataclass
class Export:
    """Everything `distml export k8s` writes, as objects (the tests validate these)."""

    files: dict[str, list[dict[str, Any]]]  # kustomize resources: file name -> objects
    jobs: dict[str, dict[str, Any]]  # node id -> its training job (inside the Workflow's resource template)
    services: dict[str, dict[str, Any]]  # node id -> its InferenceService (inside the Workflow)
    graph: Any
    task_names: dict[str, str]
    extra_files: dict[str, str]

    def objects(self) -> list[dict[str, Any]]:
        return [obj for objs in self.files.values() for obj in objs]


def export_k8s(options: ExportOptions) -> Export:
    """Build every object for the pipeline `options.target` names."""

    options.check()
    graph, target = pipeline_graph(options)
    from distml.workflow.dag import coerce_params

    params = coerce_params(target.function, dict(options.params))
    spec = PipelineSpec(target=options.target, params=params, workspace=WORKSPACE_MOUNT, nnodes=options.nnodes or "1")
    name = k8s_name(f"distml-{target.name}")
    wt = workflow_template(options, graph, name)
    names = task_names(graph)
    jobs = {
        nid: training_job(options, n, f"{name}-{names[nid]}", "RUN-ID")
        for nid, n in graph.nodes.items()
        if _is(n, "training")
    }
    services = {nid: inference_service(options, n, "MODEL") for nid, n in graph.nodes.items() if _is(n, "serving")}
    serve_names = [serving_spec(n)["model"] for n in graph.nodes.values() if _is(n, "serving")]
    files = _core_objects(options, spec, serve_names)
    if options.scheduler == "volcano":
        files["volcano.yaml"] = volcano_objects(options)
    else:
        files["kueue.yaml"] = kueue_objects(options)
    workflow = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "name": f"{name}-1",
            "namespace": options.namespace,
            "labels": {"app.kubernetes.io/part-of": "distml"},
        },
        "spec": {"workflowTemplateRef": {"name": name}},
    }
    files["workflow.yaml"] = [wt.to_dict(), workflow]
    return Export(files, jobs, services, graph, names, dockerfiles())


def write_folder(export: Export, out: str | Path) -> list[Path]:
    """Write the kustomize folder; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, objects in export.files.items():
        path = out / file
        path.write_text(yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False))
        written.append(path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(export.files),
    }
    (out / "kustomization.yaml").write_text(to_yaml(kustomization))
    written.append(out / "kustomization.yaml")
    for file, text in export.extra_files.items():
        (out / file).write_text(text.replace("DIR/", f"{out}/"))
        written.append(out / file)
    return written
