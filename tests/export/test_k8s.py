"""`distml export k8s`: every generated object validated strictly offline, and the workflow's meaning
(DAG edges, memo keys and ages, gang sizes, resource requests) checked against the local pipeline."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import yaml
from conftest import (
    e2e_options,
    embedded_manifests,
    validate_argo,
    validate_core,
    validate_crd,
    validate_inference_service,
    validate_pod_template,
    validate_pytorchjob,
    validate_trainjob,
)
from required import require_tool

from distml.core.errors import DistmlError
from distml.export import steprunner
from distml.export.k8s import export_k8s, parse_nnodes, parse_storage, write_folder
from distml.workflow import memo


def _templates(export) -> dict[str, dict]:
    wt = export.files["workflow.yaml"][0]
    return {t["name"]: t for t in wt["spec"]["templates"]}


def _validate_every_object(export) -> dict[str, dict]:
    """Every object `export` writes, validated strictly; the manifests its Workflow creates, by name."""
    wt, wf = export.files["workflow.yaml"]
    validate_argo(wt)
    validate_argo(wf)
    for obj in export.objects():
        if obj["apiVersion"] in ("v1", "rbac.authorization.k8s.io/v1"):
            validate_core(obj)
    for job in export.jobs.values():
        validate_pytorchjob(job)
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            validate_pod_template(replica["template"]["spec"], replica["template"]["metadata"])
    for isvc in export.services.values():
        validate_inference_service(isvc)
        predictor = isvc["spec"]["predictor"]
        validate_pod_template({"containers": predictor["containers"], "volumes": predictor["volumes"]})
    for template in wt["spec"]["templates"]:
        if "container" in template:
            container = {"name": "main", **template["container"]}
            validate_pod_template({"containers": [container], "volumes": wt["spec"]["volumes"]})
    embedded = embedded_manifests(wt)
    for manifest in embedded.values():
        {"PyTorchJob": validate_pytorchjob, "InferenceService": validate_inference_service}[manifest["kind"]](manifest)
    return embedded


USER_PIPELINE = "examples/digits_mlp.py:pipeline"


def test_a_user_pipelines_own_training_and_serving_steps_become_a_pytorchjob_and_an_inference_service(
    tmp_path,
) -> None:
    export = export_k8s(e2e_options(target=USER_PIPELINE, params={"epochs": 1}))
    embedded = _validate_every_object(export)
    assert sorted(m["kind"] for m in embedded.values()) == ["InferenceService", "PyTorchJob"]
    ((train_node, job),) = export.jobs.items()
    assert train_node == "train"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (
        sum(r["replicas"] for r in replicas.values())
        == 2
        == job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"]
    )
    ((isvc),) = export.services.values()
    assert isvc["metadata"]["name"] == "digits-mlp" and isvc["spec"]["predictor"]["minReplicas"] == 1
    configs = {c["metadata"]["name"]: c for c in export.files["configs.yaml"]}
    replica = json.loads(configs["distml-replica"]["data"]["replica.json"])
    assert replica["models"] == ["digits-mlp@production"]
    # the step runner's `prepare` writes the user's own TrainConfig, one worker per pod
    spec = json.loads(configs["distml-pipeline"]["data"]["pipeline.json"])
    spec_path = tmp_path / "pipeline.json"
    spec_path.write_text(json.dumps({**spec, "workspace": str(tmp_path / "ws")}))
    out = tmp_path / "out"
    assert steprunner.main([str(spec_path), "prepare", "train", "--out", str(out)]) == 0
    run_id = (out / "run-id").read_text()
    config = json.loads((tmp_path / "ws" / "runs" / run_id / "config.json").read_text())
    assert config["model"]["name"] == "mlp" and config["model"]["args"] == {"width": 256, "depth": 2}
    assert config["training"]["epochs"] == 1
    assert (config["parallelism"]["workers"], config["parallelism"]["nnodes"]) == (1, "2")
    assert config["workspace"]["db_url"] is None


def test_every_object_validates_strictly(e2e_export) -> None:
    embedded = _validate_every_object(e2e_export)
    # The Workflow's resource templates create exactly these objects.
    assert len(e2e_export.jobs) == 3 and len(e2e_export.services) == 1  # none of the loops ran empty
    assert sorted(m["kind"] for m in embedded.values()) == [
        "InferenceService",
        "PyTorchJob",
        "PyTorchJob",
        "PyTorchJob",
    ]


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


def test_the_replica_listens_on_0_0_0_0_with_its_token_from_a_secret_not_a_file(e2e_export) -> None:
    (isvc,) = e2e_export.services.values()
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    ref = env["DISTML_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "distml-serve", "key": "DISTML_SERVE_TOKEN"}  # created by hand (README)
    configs = {c["metadata"]["name"]: c for c in e2e_export.files["configs.yaml"]}
    replica = json.loads(configs["distml-replica"]["data"]["replica.json"])
    assert replica["host"] == "0.0.0.0" and replica["insecure"] is False  # no Secret: it refuses to start
    secrets = [o["metadata"]["name"] for o in e2e_export.objects() if o["kind"] == "Secret"]
    assert "distml-serve" not in secrets  # no token (nor a placeholder one) in the folder


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
    """The folder written and rendered by `kubectl kustomize` (skipped without kubectl, a failure
    where DISTML_REQUIRE_TOOLS is set)."""
    kubectl = require_tool("kubectl", "Debian: apt-get install kubernetes-client; needed for kubectl kustomize")
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
    for weight in (0, 65536):
        with pytest.raises(DistmlError, match="--queue-weight must be a whole number from 1 to 65535"):
            export_k8s(e2e_options(queue_weight=weight))


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


# -- Kueue and Volcano objects against their CRDs' schemas (tests/export/crd_schemas) ------------------

KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}


def _validate_any(obj: dict) -> None:
    """Every object the export writes has a strict validator; an unknown apiVersion fails."""
    api_group = obj["apiVersion"].rpartition("/")[0]
    if api_group in ("", "rbac.authorization.k8s.io", "scheduling.k8s.io"):
        validate_core(obj)
    elif api_group in ("kueue.x-k8s.io", "scheduling.volcano.sh"):
        validate_crd(obj)
    elif api_group == "argoproj.io":
        validate_argo(obj)
    else:
        pytest.fail(f"no validator for {obj['apiVersion']} {obj['kind']}")


def test_kueue_objects_validate_against_their_crds(e2e_export) -> None:
    objects = e2e_export.files["kueue.yaml"]
    assert {o["kind"] for o in objects} == KUEUE_KINDS
    for obj in objects:
        assert obj["apiVersion"] == "kueue.x-k8s.io/v1beta1"
        validate_crd(obj)


def test_volcano_objects_validate_against_their_crds(volcano_export) -> None:
    objects = volcano_export.files["volcano.yaml"]
    assert sorted({o["kind"] for o in objects}) == ["PriorityClass", "Queue"]
    for obj in objects:
        if obj["kind"] == "Queue":
            validate_crd(obj)
        else:
            assert obj["apiVersion"] == "scheduling.k8s.io/v1"
            validate_core(obj)


def test_every_written_object_of_either_scheduler_has_a_strict_validator(e2e_export, volcano_export) -> None:
    """Every object either export writes passes the validator of its kind, and that validator is
    strict: the same object with a misspelt metadata field is refused, naming the field."""
    kinds: dict[tuple[str, str], dict] = {}
    for export in (e2e_export, volcano_export):
        for obj in export.objects():
            _validate_any(obj)
            kinds.setdefault((obj["apiVersion"], obj["kind"]), obj)
    written = {kind for _, kind in kinds}
    assert written >= {"Workflow", "WorkflowTemplate", "PersistentVolumeClaim", "Secret", "ConfigMap", "Role"}
    assert written >= KUEUE_KINDS | {"Queue", "PriorityClass"}, "both schedulers' objects are among them"
    for (api_version, kind), obj in sorted(kinds.items()):
        misspelt = copy.deepcopy(obj)
        misspelt["metadata"]["lables"] = {"app": "distml"}
        try:
            _validate_any(misspelt)
        except Exception as exc:  # not pytest.fail's Failed (a BaseException): a kind without a validator fails
            assert "lables" in str(exc), f"{api_version} {kind} was refused, but not for its misspelt field: {exc}"
        else:
            pytest.fail(f"{api_version} {kind} with a misspelt metadata field passed its validator")


def _parent(obj: dict, path: str) -> tuple[dict, str]:
    """The object holding the field at the dotted `path` (`[i]` indexes a list), and the field's name."""
    *parents, last = path.replace("[", ".[").split(".")
    for part in parents:
        obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
    return obj, last


def _set(path: str, value):
    """A change to an object: `value` put at `path`."""

    def change(obj: dict) -> None:
        parent, name = _parent(obj, path)
        parent[name] = value

    change.label = f"{path.rpartition('.')[2]}={value!r}"[:40]
    return change


def _rename(path: str, new: str):
    """A change to an object: the field at `path` renamed to `new` (a misspelling)."""

    def change(obj: dict) -> None:
        parent, name = _parent(obj, path)
        parent[new] = parent.pop(name)

    change.label = new
    return change


def _crd_object(request, kind: str) -> dict:
    """A copy of the export's (valid) object of this kind: Volcano's Queue, or a Kueue object."""
    if kind == "Queue":
        objects = request.getfixturevalue("volcano_export").files["volcano.yaml"]
    else:
        objects = request.getfixturevalue("e2e_export").files["kueue.yaml"]
    obj = copy.deepcopy(next(o for o in objects if o["kind"] == kind))
    validate_crd(obj)  # valid before the change
    return obj


QUOTA = "spec.resourceGroups[0].flavors[0].resources[0]"


# (kind, change, what the error says)
MISSPELT = [
    ("ClusterQueue", _rename(f"{QUOTA}.nominalQuota", "nominalQouta"), r"resources\[0\].nominalQouta: unknown field"),
    ("ClusterQueue", _rename("spec.queueingStrategy", "queuingStrategy"), r"\$.spec.queuingStrategy: unknown field"),
    ("LocalQueue", _rename("spec.clusterQueue", "clusterQueu"), r"\$.spec.clusterQueu: unknown field"),
    ("WorkloadPriorityClass", _rename("value", "valeu"), r"\$.valeu: unknown field"),
    ("ResourceFlavor", _set("spec", {"nodeLabel": {"pool": "cpu"}}), r"\$.spec.nodeLabel: unknown field"),
    ("Queue", _rename("spec.weight", "weigth"), r"\$.spec.weigth: unknown field"),
    ("Queue", _rename("metadata.labels", "lables"), r"\$.metadata.lables: unknown field"),
    ("ClusterQueue", _set("metadata.namespace", "ml"), r"\$.metadata.namespace: unknown field \(.*cluster-scoped\)"),
]
WRONG = [
    ("ClusterQueue", _set("spec.queueingStrategy", "Random"), r"\$.spec.queueingStrategy: 'Random' is not one of"),
    ("ClusterQueue", _set("spec.preemption.withinClusterQueue", "Lower"), r"withinClusterQueue: 'Lower' is not one"),
    ("ClusterQueue", _set(f"{QUOTA}.nominalQuota", "16 cores"), r"nominalQuota: '16 cores' does not match"),
    ("ClusterQueue", _set(f"{QUOTA}.nominalQuota", [16]), r"nominalQuota: \[16\] is not valid"),
    ("ClusterQueue", _set("spec.resourceGroups[0].coveredResources", []), r"coveredResources: \[\] should be non"),
    ("WorkloadPriorityClass", _set("value", "high"), r"\$.value: 'high' is not of type 'integer'"),
    ("WorkloadPriorityClass", _set("value", 2**31), r"\$.value: 2147483648 is greater than the maximum"),
    ("LocalQueue", _set("spec.clusterQueue", "Distml_Queue"), r"\$.spec.clusterQueue: 'Distml_Queue' does not match"),
    ("LocalQueue", _set("metadata.name", "Default"), r"\$.metadata.name: 'Default' does not match"),
    ("LocalQueue", _set("apiVersion", "kueue.x-k8s.io/v1alpha1"), "no CRD schema"),
    ("Queue", _set("spec.weight", "3"), r"\$.spec.weight: '3' is not of type 'integer'"),
    ("Queue", _set("spec.reclaimable", "yes"), r"\$.spec.reclaimable: 'yes' is not of type 'boolean'"),
    ("Queue", _set("spec.capability.cpu", "lots"), r"\$.spec.capability.cpu: 'lots' does not match"),
    ("Queue", _set("metadata.labels.team", 7), r"\$.metadata.labels.team: 7 is not of type 'string'"),
]


def _ids(cases: list[tuple]) -> list[str]:
    return [f"{kind}-{change.label}" for kind, change, _ in cases]


@pytest.mark.parametrize(("kind", "change", "message"), MISSPELT + WRONG, ids=_ids(MISSPELT + WRONG))
def test_crd_validation_refuses_a_misspelt_field_a_wrong_type_or_value(request, kind, change, message) -> None:
    obj = _crd_object(request, kind)
    change(obj)
    with pytest.raises(AssertionError, match=message):
        validate_crd(obj)


def test_crd_validation_checks_the_cluster_queues_rules(e2e_export) -> None:
    """The ClusterQueue's CEL rules (and Kueue's webhook order check) that bear on distml's queue."""
    cq = next(o for o in e2e_export.files["kueue.yaml"] if o["kind"] == "ClusterQueue")
    resources = cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"]
    fewer = copy.deepcopy(cq)
    fewer["spec"]["resourceGroups"][0]["flavors"][0]["resources"] = resources[:-1]
    with pytest.raises(AssertionError, match="same number of resources as the coveredResources"):
        validate_crd(fewer)
    reordered = copy.deepcopy(cq)
    reordered["spec"]["resourceGroups"][0]["flavors"][0]["resources"] = resources[::-1]
    with pytest.raises(AssertionError, match="must match coveredResources"):
        validate_crd(reordered)
    borrowing = copy.deepcopy(cq)
    borrowing["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["borrowingLimit"] = "2"
    with pytest.raises(AssertionError, match="borrowingLimit must be nil when cohort is empty"):
        validate_crd(borrowing)
    borrowing["spec"]["cohort"] = "distml"
    validate_crd(borrowing)
    twice = copy.deepcopy(cq)
    twice["spec"]["resourceGroups"][0]["coveredResources"].append("cpu")
    twice["spec"]["resourceGroups"][0]["flavors"][0]["resources"].append(dict(resources[0]))
    with pytest.raises(AssertionError, match=r"items 0 and 3 have the same name"):  # a list-map key repeated
        validate_crd(twice)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"queue": "team-a", "namespace": "research", "priority": "high", "trainer": "trainjob"}],
    ids=["default", "team-a-trainjob"],
)
def test_kueue_labels_name_the_exported_queues(e2e_export, overrides) -> None:
    """Every object labelled for Kueue names a LocalQueue of the export in its own namespace and a
    WorkloadPriorityClass it defines; the LocalQueue names the ClusterQueue, whose flavors exist."""
    export = export_k8s(e2e_options(**overrides)) if overrides else e2e_export
    kueue = export.files["kueue.yaml"]
    local_queues = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in kueue if o["kind"] == "LocalQueue"}
    cluster_queues = {o["metadata"]["name"]: o for o in kueue if o["kind"] == "ClusterQueue"}
    flavors = {o["metadata"]["name"] for o in kueue if o["kind"] == "ResourceFlavor"}
    priorities = {o["metadata"]["name"] for o in kueue if o["kind"] == "WorkloadPriorityClass"}
    embedded = embedded_manifests(export.files["workflow.yaml"][0]).values()
    jobs = [*export.jobs.values(), *(m for m in embedded if m["kind"] != "InferenceService")]
    assert len(jobs) == 6 and {j["kind"] for j in jobs} == {"TrainJob" if overrides else "PyTorchJob"}
    labelled = [o for o in [*jobs, *export.services.values(), *export.objects()] if "labels" in o["metadata"]]
    labelled = [o for o in labelled if "kueue.x-k8s.io/queue-name" in o["metadata"]["labels"]]
    for job in jobs:  # every training job is queued by Kueue
        assert job in labelled, f"{job['kind']} {job['metadata']['name']} has no kueue.x-k8s.io/queue-name label"
    for obj in labelled:
        labels = obj["metadata"]["labels"]
        key = (obj["metadata"]["namespace"], labels["kueue.x-k8s.io/queue-name"])
        assert key in local_queues, f"{obj['kind']} {obj['metadata']['name']} names no exported LocalQueue: {key}"
        priority = labels.get("kueue.x-k8s.io/priority-class")
        assert priority in priorities, f"{obj['kind']} {obj['metadata']['name']}: no WorkloadPriorityClass {priority!r}"
        assert priority == f"distml-{overrides.get('priority', 'normal')}"
    assert {k[1] for k in local_queues} == {overrides.get("queue", "default")}
    for local_queue in local_queues.values():
        assert local_queue["spec"]["clusterQueue"] in cluster_queues, f"{local_queue['spec']} names no ClusterQueue"
    for cluster_queue in cluster_queues.values():
        named = {f["name"] for group in cluster_queue["spec"]["resourceGroups"] for f in group["flavors"]}
        assert named <= flavors, f"ClusterQueue flavors {named - flavors} are not exported ResourceFlavors"


def test_step_pods_are_admitted_in_the_runs_queue(e2e_export, volcano_export) -> None:
    """Kueue's pod integration admits each container step in the run's LocalQueue; a resource
    step's pod only creates a job, which carries the label itself (no double counting)."""
    for export, queued in ((e2e_export, True), (volcano_export, False)):
        for template in _templates(export).values():
            labels = template.get("metadata", {}).get("labels", {})
            if "container" in template:
                assert labels.get("app.kubernetes.io/part-of") == "distml"
                assert ("kueue.x-k8s.io/queue-name" in labels) == queued, template["name"]
                assert template["container"]["resources"]["requests"], "Kueue needs requests"
            else:
                assert "kueue.x-k8s.io/queue-name" not in labels, template["name"]
