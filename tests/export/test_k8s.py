"""`distml export k8s`: every generated object validated strictly offline, and the workflow's meaning
(DAG edges, memo keys and ages, gang sizes, resource requests) checked against the local pipeline."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
import yaml
from conftest import (
    e2e_options,
    embedded_manifests,
    validate_argo,
    validate_core,
    validate_inference_service,
    validate_pod_template,
    validate_pytorchjob,
    validate_trainjob,
)

from distml.errors import DistmlError
from distml.export import steprunner
from distml.export.k8s import export_k8s, parse_nnodes, parse_storage, write_folder
from distml.workflow import memo


def _templates(export) -> dict[str, dict]:
    wt = export.files["workflow.yaml"][0]
    return {t["name"]: t for t in wt["spec"]["templates"]}


def test_every_object_validates_strictly(e2e_export) -> None:
    wt, wf = e2e_export.files["workflow.yaml"]
    validate_argo(wt)
    validate_argo(wf)
    for obj in e2e_export.objects():
        if obj["apiVersion"] in ("v1", "rbac.authorization.k8s.io/v1"):
            validate_core(obj)
    for job in e2e_export.jobs.values():
        validate_pytorchjob(job)
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            validate_pod_template(replica["template"]["spec"], replica["template"]["metadata"])
    for isvc in e2e_export.services.values():
        validate_inference_service(isvc)
        predictor = isvc["spec"]["predictor"]
        validate_pod_template({"containers": predictor["containers"], "volumes": predictor["volumes"]})
    volumes = wt["spec"]["volumes"]
    for template in wt["spec"]["templates"]:
        if "container" in template:
            container = {"name": "main", **template["container"]}
            validate_pod_template({"containers": [container], "volumes": volumes})
    # The Workflow's resource templates create exactly these objects.
    embedded = embedded_manifests(wt)
    for manifest in embedded.values():
        {"PyTorchJob": validate_pytorchjob, "InferenceService": validate_inference_service}[manifest["kind"]](manifest)


def test_trainjob_validates_strictly() -> None:
    export = export_k8s(e2e_options(trainer="trainjob", nnodes="1:3"))
    assert len(export.jobs) == 3
    for job in export.jobs.values():
        validate_trainjob(job)
        assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
        assert job["spec"]["trainer"]["numNodes"] == 3
        assert job["spec"]["trainer"]["resourcesPerNode"]["requests"]["cpu"]
    for manifest in embedded_manifests(export.files["workflow.yaml"][0]).values():
        if manifest["kind"] == "TrainJob":
            validate_trainjob(manifest)


def test_a_misspelt_field_fails_validation(e2e_export) -> None:
    job = copy.deepcopy(next(iter(e2e_export.jobs.values())))
    job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailble"] = 2
    with pytest.raises(AssertionError, match="minAvailble"):
        validate_pytorchjob(job)
    isvc = copy.deepcopy(next(iter(e2e_export.services.values())))
    isvc["spec"]["predictor"]["scaleMetrics"] = "concurrency"
    with pytest.raises(AssertionError, match="scaleMetrics"):
        validate_inference_service(isvc)
    wt = copy.deepcopy(e2e_export.files["workflow.yaml"][0])
    wt["spec"]["templates"][0]["retryStrategey"] = {}
    with pytest.raises(AssertionError, match="retryStrategey"):
        validate_argo(wt)
    pod = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"])
    pod["containers"][0]["resource"] = {}
    with pytest.raises(Exception, match="resource"):
        validate_pod_template(pod)


def test_dag_edges_equal_the_local_pipelines(e2e_export) -> None:
    graph, names = e2e_export.graph, e2e_export.task_names
    local = {(names[up.id], names[n.id]) for n in graph.nodes.values() for up in n.upstream}
    pipeline = _templates(e2e_export)["pipeline"]["dag"]["tasks"]
    exported = {(dep, t["name"]) for t in pipeline for dep in t.get("dependencies", [])}
    assert exported == local
    assert {t["name"] for t in pipeline} == set(names.values())
    assert ("ingest", "train-cnn") in exported and ("train-dropout", "select") in exported  # fan-out, fan-in


def test_memoize_key_and_max_age_follow_the_steps_policy(e2e_export) -> None:
    templates = _templates(e2e_export)
    ingest_run = templates["ingest-run"]
    assert ingest_run["memoize"]["maxAge"] == "3600s"  # @step(memoize=True, max_age=3600)
    assert ingest_run["memoize"]["key"] == "{{inputs.parameters.memo-key}}"
    assert ingest_run["memoize"]["cache"]["configMap"]["name"] == "distml-memo"
    assert templates["train-cnn-job"]["memoize"]["maxAge"] == ""  # no max_age: never expires
    assert templates["train-cnn-job"]["retryStrategy"]["limit"] == "1"  # retries=1
    assert "memoize" not in templates["serve"]  # serve is not memoized
    assert "successCondition" in templates["train-cnn-job"]["resource"]
    assert "failureCondition" in templates["train-cnn-job"]["resource"]


def test_memo_key_in_the_cluster_is_the_local_key(e2e_export, tmp_path) -> None:
    """The key task computes the orchestrator's key for the same node and upstream value."""
    spec_path = tmp_path / "pipeline.json"
    spec = json.loads(e2e_export.files["configs.yaml"][0]["data"]["pipeline.json"])
    spec["workspace"] = str(tmp_path / "ws")
    spec_path.write_text(json.dumps(spec))
    ingest_value = {"dataset": "digits", "data_dir": None, "splits": {"train": {"fingerprint": "f" * 64}}}
    out = tmp_path / "out"
    args = [str(spec_path), "key", "train[cnn]", "--out", str(out), "--input", f"ingest={json.dumps(ingest_value)}"]
    assert steprunner.main(args) == 0
    node = e2e_export.graph.nodes["train[cnn]"]
    resolved = memo.bind(node.step, (node.args[0],), {**node.kwargs, "data": ingest_value})
    expected = memo.memo_key(memo.key_parts(node, resolved, None, {}))
    assert (out / "key").read_text() == expected
    other = dict(ingest_value, dataset="fashion-mnist")
    assert steprunner.main([*args[:-1], f"ingest={json.dumps(other)}"]) == 0
    assert (out / "key").read_text() != expected  # another upstream value, another key


def test_gangs_and_resources(e2e_export) -> None:
    workers = 2  # the pipeline's default
    for job in e2e_export.jobs.values():
        replicas = job["spec"]["pytorchReplicaSpecs"]
        pods = sum(r["replicas"] for r in replicas.values())
        assert pods == workers == job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
        for replica in replicas.values():
            args = replica["template"]["spec"]["containers"][0]["args"]
            assert f"--nnodes={workers}" in args and "--nproc-per-node=1" in args
    kueue = {o["kind"]: o for o in e2e_export.files["kueue.yaml"]}
    assert kueue["LocalQueue"]["metadata"]["name"] == "default"
    assert kueue["LocalQueue"]["spec"]["clusterQueue"] == kueue["ClusterQueue"]["metadata"]["name"]
    priorities = {o["metadata"]["name"] for o in e2e_export.files["kueue.yaml"] if o["kind"] == "WorkloadPriorityClass"}
    # Every container anywhere asks for cpu and memory: Kueue admits nothing without requests.
    containers = [t["container"] for t in e2e_export.files["workflow.yaml"][0]["spec"]["templates"] if "container" in t]
    for job in e2e_export.jobs.values():
        assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] in priorities
        containers += [
            c for r in job["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]
        ]
    for isvc in e2e_export.services.values():
        containers += isvc["spec"]["predictor"]["containers"]
    assert len(containers) >= 10
    for container in containers:
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container.get("name")


def test_elastic_pytorchjob() -> None:
    export = export_k8s(e2e_options(nnodes="2:4"))
    for job in export.jobs.values():
        validate_pytorchjob(job)
        assert job["spec"]["elasticPolicy"]["minReplicas"] == 2 and job["spec"]["elasticPolicy"]["maxReplicas"] == 4
        assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
        assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]


def test_inference_service_scaling(e2e_export) -> None:
    (isvc,) = e2e_export.services.values()
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
    assert predictor["minReplicas"] == 1 and predictor["maxReplicas"] >= 1
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["containers"][0]["command"] == [
        "python",
        "-m",
        "distml.serve.server",
        "/etc/distml/replica/replica.json",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": "distml.pipelines.nope:pipeline"}, "cannot import"),
        ({"storage": "s3://bucket/x"}, "--storage"),
        ({"storage": "pvc://Bad_Name/x"}, "--storage"),
        ({"nnodes": "4:2"}, "--nnodes"),
        ({"nnodes": "two"}, "--nnodes"),
        ({"trainer": "tfjob"}, "--trainer"),
        ({"params": {"async_selection": True}}, "best_of"),
        ({"params": {"nope": 1}}, "unknown pipeline parameter"),
    ],
)
def test_bad_input_gives_one_clear_error(change, message) -> None:
    with pytest.raises(DistmlError, match=message):
        export_k8s(e2e_options(**change))


def test_storage_and_nnodes_parsing() -> None:
    assert parse_storage("pvc://data/distml/ws").path == "distml/ws"
    assert parse_storage("pvc://data").path == ""
    assert parse_nnodes("3") == (3, 3) and parse_nnodes(None) is None


def _kustomize(export, tmp_path) -> list[dict]:
    """The folder written and rendered by `kubectl kustomize` (skipped without kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed (Debian: apt-get install kubernetes-client); cannot run kubectl kustomize"
        )
    write_folder(export, tmp_path)
    rendered = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [o for o in yaml.safe_load_all(rendered.stdout) if o]


def test_kustomize_renders_offline(e2e_export, tmp_path) -> None:
    kinds = sorted(o["kind"] for o in _kustomize(e2e_export, tmp_path))
    assert kinds.count("WorkflowTemplate") == 1 and kinds.count("Workflow") == 1
    assert {"ClusterQueue", "LocalQueue", "ResourceFlavor", "PersistentVolumeClaim", "Secret"} <= set(kinds)
    assert (tmp_path / "Dockerfile").is_file() and (tmp_path / "Dockerfile.cuda").is_file()


def test_cli_writes_the_folder_and_refuses_bad_flags(tmp_path) -> None:
    from click.testing import CliRunner

    from distml.cli import main

    base = ["export", "k8s", "--image", "r/distml:1", "--namespace", "ml", "--out", str(tmp_path / "k8s")]
    result = CliRunner().invoke(main, [*base, "--param", "dataset=digits", "--trainer", "trainjob"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k8s" / "kustomization.yaml").is_file()
    assert "kind: TrainJob" in (tmp_path / "k8s" / "workflow.yaml").read_text()
    bad = CliRunner().invoke(main, [*base, "--storage", "nfs://x"])
    assert bad.exit_code != 0 and "--storage must be pvc://NAME/PATH" in bad.output


@pytest.fixture(scope="module")
def volcano_export():
    return export_k8s(e2e_options(scheduler="volcano", queue_weight=3, priority="high"))


def test_volcano_has_no_kueue_objects_or_labels(volcano_export) -> None:
    assert "kueue.yaml" not in volcano_export.files
    assert not [o for o in volcano_export.objects() if o["apiVersion"].startswith("kueue.x-k8s.io")]
    wt = volcano_export.files["workflow.yaml"][0]
    everything = json.dumps([volcano_export.objects(), list(volcano_export.jobs.values())])
    assert "kueue.x-k8s.io" not in everything
    assert "kueue.x-k8s.io" not in json.dumps(embedded_manifests(wt))


def test_volcano_gangs_queue_and_priorities(volcano_export) -> None:
    workers = 2  # the pipeline's default
    objects = volcano_export.files["volcano.yaml"]
    (queue,) = [o for o in objects if o["kind"] == "Queue"]
    assert queue["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert queue["metadata"]["name"] == "default" and "namespace" not in queue["metadata"]  # cluster-scoped
    assert queue["spec"]["weight"] == 3  # distml's queue weight
    priorities = {o["metadata"]["name"]: o["value"] for o in objects if o["kind"] == "PriorityClass"}
    for obj in objects:
        if obj["kind"] == "PriorityClass":
            validate_core(obj)
    # The Training Operator makes each job's PodGroup from runPolicy.schedulingPolicy; none is written here.
    assert not [o for o in volcano_export.objects() if o["kind"] == "PodGroup"]
    jobs = list(volcano_export.jobs.values()) + [
        m for m in embedded_manifests(volcano_export.files["workflow.yaml"][0]).values() if m["kind"] == "PyTorchJob"
    ]
    assert len(jobs) == 6
    for job in jobs:
        validate_pytorchjob(job)
        policy = job["spec"]["runPolicy"]["schedulingPolicy"]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert policy["minAvailable"] == workers == sum(r["replicas"] for r in replicas.values())
        assert policy["queue"] == queue["metadata"]["name"]
        assert policy["priorityClass"] == "distml-high" and priorities["distml-high"] == 100
        requests = replicas["Master"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert requests == {"cpu": "1000m", "memory": "2Gi"}
        assert policy["minResources"] == {"cpu": f"{workers * 1000}m", "memory": f"{workers * 2048}Mi"}
        for replica in replicas.values():
            assert replica["template"]["spec"]["schedulerName"] == "volcano"
            validate_pod_template(replica["template"]["spec"], replica["template"]["metadata"])


def test_volcano_elastic_gang_is_the_minimum() -> None:
    export = export_k8s(e2e_options(scheduler="volcano", nnodes="2:4"))
    for job in export.jobs.values():
        assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
        assert job["spec"]["runPolicy"]["schedulingPolicy"]["minResources"]["cpu"] == "2000m"


def test_volcano_refuses_trainjob_and_bad_weights() -> None:
    with pytest.raises(DistmlError, match="--trainer trainjob cannot use --scheduler volcano"):
        export_k8s(e2e_options(trainer="trainjob", scheduler="volcano"))
    with pytest.raises(DistmlError, match="--scheduler"):
        export_k8s(e2e_options(scheduler="yunikorn"))
    with pytest.raises(DistmlError, match="--queue-weight"):
        export_k8s(e2e_options(queue_weight=0))


def test_volcano_kustomize_renders_offline(volcano_export, tmp_path) -> None:
    kinds = [o["kind"] for o in _kustomize(volcano_export, tmp_path)]
    assert kinds.count("Queue") == 1 and kinds.count("PriorityClass") == 4
    assert not {"ClusterQueue", "LocalQueue", "ResourceFlavor", "WorkloadPriorityClass"} & set(kinds)


def test_cli_scheduler_flag(tmp_path) -> None:
    from click.testing import CliRunner

    from distml.cli import main

    base = ["export", "k8s", "--image", "r/distml:1", "--namespace", "ml", "--param", "dataset=digits"]
    out = tmp_path / "k8s"
    result = CliRunner().invoke(main, [*base, "--out", str(out), "--scheduler", "volcano", "--queue-weight", "2"])
    assert result.exit_code == 0, result.output
    assert "volcano.yaml" in (out / "kustomization.yaml").read_text()
    assert "schedulerName: volcano" in (out / "workflow.yaml").read_text()
    bad = CliRunner().invoke(main, [*base, "--out", str(out), "--scheduler", "volcano", "--trainer", "trainjob"])
    assert bad.exit_code != 0 and "cannot use --scheduler volcano" in bad.output
