"""A local stand-in for the cluster: run the exported manifests' own commands as local processes.

The Argo steps' container args (ingest, prepare, collect, select), the PyTorchJob's two pods'
command and environment (with MASTER_ADDR/PET_* set as the training operator sets them) and the
InferenceService's replica command are taken from the generated objects and run here; the only
changes are the cluster's paths (the workspace volume, the ConfigMaps) and the replica's port."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import e2e_options, embedded_manifests

from distml.export import steprunner
from distml.export.k8s import PIPELINE_CONFIG, REPLICA_CONFIG, WORKSPACE_MOUNT, export_k8s

pytestmark = [pytest.mark.slow, pytest.mark.heavy("serving")]  # it trains, then serves: with the serving tests


def _reserve_port() -> socket.socket:
    """A socket holding a free port for the rendezvous, bound but not listening, with SO_REUSEADDR.

    torchrun's master binds the port itself (its TCPStore, also with SO_REUSEADDR, which Linux
    allows beside a socket that does not listen) and the worker must know the number beforehand,
    so the port cannot be 0. Held until the pods end, it cannot be handed to another process
    meanwhile (the kernel skips ports in use when it picks one for port 0; an explicit bind fails)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    return sock


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def test_exported_commands_train_and_serve(tmp_path, monkeypatch) -> None:
    export = export_k8s(e2e_options(params={"dataset": "digits", "epochs": 1, "batch_size": 64, "models": ["cnn"]}))
    ws = tmp_path / "ws"
    ws.mkdir()
    configs = {c["metadata"]["name"]: c for c in export.files["configs.yaml"]}
    spec = json.loads(configs["distml-pipeline"]["data"]["pipeline.json"])
    spec["workspace"] = str(ws)  # the workspace volume, mounted here
    spec_path = tmp_path / "pipeline.json"
    spec_path.write_text(json.dumps(spec))
    monkeypatch.setenv("DISTML_HOME", str(ws))
    monkeypatch.delenv("DISTML_DB_URL", raising=False)  # the Secret's PostgreSQL: the workspace's SQLite here
    templates = {t["name"]: t for t in export.files["workflow.yaml"][0]["spec"]["templates"]}
    values: dict[str, str] = {}

    def step(template: str, inputs: dict[str, str]) -> Path:
        out = tmp_path / template
        args = []
        for arg in templates[template]["container"]["args"]:
            arg = arg.replace(PIPELINE_CONFIG, str(spec_path)).replace("{{workflow.name}}", "standin")
            arg = arg.replace("/tmp/distml-out", str(out))
            for name, value in inputs.items():
                arg = arg.replace(f"{{{{inputs.parameters.in-{name}}}}}", value)
            assert "{{" not in arg, arg
            args.append(arg)
        assert templates[template]["container"]["command"] == ["python", "-m", "distml.export.steprunner"]
        assert steprunner.main(args) == 0, template
        return out

    values["ingest"] = (step("ingest-run", {}) / "result").read_text()
    prepared = step("train-cnn-prepare", {"ingest": values["ingest"]})
    run_id = (prepared / "run-id").read_text()

    # The PyTorchJob's pods: Master (node rank 0) and Worker (node rank 1), as the operator starts them.
    job = embedded_manifests(export.files["workflow.yaml"][0])["train-cnn-job"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
    reserved = _reserve_port()
    port = reserved.getsockname()[1]
    procs = []
    pods = [("Master", 0)] + [("Worker", 1 + i) for i in range(replicas.get("Worker", {}).get("replicas", 0))]
    for kind, rank in pods:
        container = replicas[kind]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env["DISTML_HOME"] = str(ws)
        operator = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)}
        operator |= {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank)}
        operator |= {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        env |= operator
        argv = [
            _expand(a.replace("{{inputs.parameters.run-id}}", run_id), env)
            for a in container["command"] + container["args"]
        ]
        full_env = {
            **os.environ,
            **env,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        reserved.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    collected = step("train-cnn-collect", {"ingest": values["ingest"]})
    trained = json.loads((collected / "result").read_text())
    assert trained["train_run"] == run_id and trained["steps"] > 0
    assert trained["test_accuracy"] > 0.3  # one epoch on digits; chance is 0.1

    # select registers the best as digits-classifier@production, which the replica serves.
    values["train-cnn"] = (collected / "result").read_text()
    selected = json.loads(
        (step("select-run", {"train-cnn": values["train-cnn"], "ingest": values["ingest"]}) / "result").read_text()
    )
    assert selected["alias"] == "digits-classifier@production"

    (isvc,) = export.services.values()
    container = isvc["spec"]["predictor"]["containers"][0]
    replica = json.loads(configs["distml-replica"]["data"]["replica.json"])
    assert (
        replica["workspace"] == {"root": WORKSPACE_MOUNT, "db_url": None}
        and replica["port"] == container["ports"][0]["containerPort"]
    )
    replica |= {
        "workspace": {"root": str(ws), "db_url": None},
        "host": "127.0.0.1",
        "port": 0,
        "port_file": str(tmp_path / "port"),
    }
    replica_path = tmp_path / "replica.json"
    replica_path.write_text(json.dumps(replica))
    argv = [a.replace(REPLICA_CONFIG, str(replica_path)) for a in container["command"]]
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    server = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a guard against a hang, not a speed check
        while not (tmp_path / "port").exists():
            assert server.poll() is None, server.stderr.read()[-3000:]
            if time.monotonic() > deadline:
                pytest.fail("the replica wrote no port file within 120 s")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{(tmp_path / 'port').read_text().strip()}"
        probe = container["readinessProbe"]["httpGet"]["path"]
        assert httpx.get(url + probe).json() == {"ready": True}
        from distml.pipelines.end_to_end import client_images, v2_request
        from distml.workspace import Workspace

        images, labels, _ = client_images(Workspace(ws), "digits", None, 2)
        reply = httpx.post(f"{url}/v2/models/digits-classifier/infer", json=v2_request(images), timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_name"] == "digits-classifier"
        assert reply.json()["outputs"][0]["shape"][0] == 2
    finally:
        server.terminate()
        server.wait(timeout=30)
