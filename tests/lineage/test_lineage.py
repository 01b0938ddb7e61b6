"""Lineage: `distml lineage` walks what the real producers recorded, and no writer loses a row.

The session's real `distml run` on the offline digits data (tests/digits_pipeline.py: two
candidates, an early server swapped to the better one) gives a model whose lineage must lead back
to the exact data snapshot, training run, parameters, code and workflow steps, and forward to the
live service; `--data` finds it from the snapshot; a roll ends a deployment and a gateway killed
with -9 is not reported as serving. Then training-rank, step-process, scheduler and server writers
run at once on SQLite and PostgreSQL, each through the real recording functions, and every row
they wrote is there afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest.mock import ANY

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import distml
from distml.cli import main
from distml.lineage import record as lineage
from distml.lineage import store as lineage_store
from distml.models import registry as model_registry
from distml.scheduling import store as sched_store
from distml.serve import jobs as serve_jobs
from distml.train import store as train_store
from distml.workflow import store as workflow_store
from distml.workspace import Workspace

DISTML = str(Path(sys.executable).with_name("distml"))
SERVICE = "digits-classifier"


def cli(ws: Workspace, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--workspace", str(ws.root), "lineage", *args])
    return result.exit_code, result.stdout, result.stderr


def lineage_json(ws: Workspace, *args: str) -> dict:
    code, out, err = cli(ws, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def step_outputs(ws: Workspace, run_id: str) -> dict[str, dict]:
    return {
        row.node_id: row.output
        for row in workflow_store.list_step_executions(ws.engine, run_id)
        if row.output_json is not None
    }


# -- through the real producers ------------------------------------------------------------------


@pytest.fixture
def pipeline(digits_pipeline):
    """The session's end-to-end run (tests/digits_pipeline.py): digits ingested, batch_norm and cnn
    trained on two workers each, digits-classifier:1 (batch_norm's) served first and swapped under
    load to digits-classifier:2 (cnn's), the production model."""
    run = digits_pipeline.run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return digits_pipeline.ws, digits_pipeline.run_id


@pytest.mark.slow
@pytest.mark.heavy("pipelines")
def test_a_served_model_leads_back_to_its_data_run_parameters_code_and_steps(pipeline):
    ws, run_id = pipeline
    outputs = step_outputs(ws, run_id)
    splits = outputs["ingest"]["splits"]
    trained = outputs["train[cnn]"]
    view = lineage_json(ws, f"{SERVICE}@production")

    assert view["model"]["ref"] == f"{SERVICE}:2" and view["model"]["aliases"] == ["production"]
    up = view["upstream"]
    assert {(d["split"], d["fingerprint"]) for d in up["data"]} == {(s, splits[s]["fingerprint"]) for s in splits}
    assert {d["dataset_id"] for d in up["data"]} == {s["snapshot_id"] for s in splits.values()}
    [run] = up["training_runs"]  # cnn's alone: batch_norm's run made the other version
    assert run["run_id"] == trained["train_run"] and run["state"] == "complete"
    assert (run["workflow_run"], run["step"]) == (run_id, "train[cnn]")
    assert run["parameters"]["model"] == "cnn" and run["parameters"]["epochs"] == 1
    assert run["parameters"]["workers"] == 2 and run["parameters"]["dataset"] == "digits"
    assert run["code"]["distml"] == distml.__version__
    assert run["last_step"] == trained["steps"] and run["models"] == [trained["model"]]
    assert run["checkpoints"] and Path(run["checkpoints"][-1]["uri"]).is_dir()
    assert [m["ref"] for m in up["models"]] == [trained["model"]]  # the candidate it was registered from
    # registered by whichever of select and the early server (as it swapped) came first
    [registration] = up["registrations"]
    registered_by = registration["step"]
    assert registered_by in ("select", "serve-early"), registration
    assert registration == {
        "model": f"{SERVICE}:2", "from": trained["model"], "workflow_run": run_id, "step": registered_by, "at": ANY
    }  # fmt: skip
    [workflow] = up["workflow_runs"]
    rows = {r.node_id: r for r in workflow_store.list_step_executions(ws.engine, run_id)}
    assert workflow["run_id"] == run_id and workflow["status"] == "succeeded"
    # every step upstream of the model and of the step that registered it: both candidates' trainings
    # (select compares them; the early server's best_of node waits on them), whichever registered it
    upstream = ("ingest", "train[batch_norm]", "train[cnn]", *{"select": ("select",),
                "serve-early": ("best", "serve-early")}[registered_by])  # fmt: skip
    assert {s["node_id"]: (s["status"], s["memo_key"]) for s in workflow["steps"]} == {
        node: (rows[node].status, rows[node].memo_key) for node in upstream
    }

    down = view["downstream"]
    service = json.loads((Path(ws.root) / "services" / SERVICE / "service.json").read_text())
    [deployment] = down["deployments"]
    assert deployment["service"] == SERVICE and deployment["model"] == f"{SERVICE}:2"
    assert deployment["status"] == "serving" and deployment["pid"] == service["pid"]
    assert down["serving_now"] == [{"service": SERVICE, "url": service["url"], "model": f"{SERVICE}:2"}]
    # the first version's deployment: started by the run's early server, ended by the swap
    [first] = lineage_json(ws, f"{SERVICE}:1")["downstream"]["deployments"]
    assert (first["model"], first["status"], first["recorded_state"]) == (f"{SERVICE}:1", "ended", "ended")
    assert first["started_by"]["run_id"] == run_id and first["started_by"]["node_id"] == "serve-early"

    code, text, _ = cli(ws, f"{SERVICE}@production")
    flat = " ".join(text.split())
    assert code == 0 and splits["train"]["fingerprint"] in flat and trained["train_run"] in flat
    assert f"serving now: {SERVICE} at {service['url']}" in flat


@pytest.mark.slow
@pytest.mark.heavy("pipelines")
def test_data_lineage_finds_everything_trained_from_a_snapshot(pipeline):
    ws, run_id = pipeline
    outputs = step_outputs(ws, run_id)
    fingerprint = outputs["ingest"]["splits"]["train"]["fingerprint"]
    view = lineage_json(ws, "--data", fingerprint[:10])  # a unique prefix is enough

    candidates = [outputs[f"train[{arch}]"] for arch in ("batch_norm", "cnn")]
    assert view["fingerprint"] == fingerprint
    assert sorted(r["run_id"] for r in view["training_runs"]) == sorted(c["train_run"] for c in candidates)
    assert {m["ref"] for m in view["models"]} == {c["model"] for c in candidates} | {f"{SERVICE}:1", f"{SERVICE}:2"}
    assert sorted((d["model"], d["status"]) for d in view["deployments"]) == [
        (f"{SERVICE}:1", "ended"), (f"{SERVICE}:2", "serving")
    ]  # fmt: skip
    assert [w["run_id"] for w in view["workflow_runs"]] == [run_id]
    code, text, _ = cli(ws, "--data", fingerprint[:10])
    assert code == 0 and f"{SERVICE}:2" in text and outputs["train[cnn]"]["train_run"] in text


@pytest.mark.slow
@pytest.mark.heavy("pipelines")
def test_a_roll_ends_a_deployment_and_a_killed_gateway_is_not_reported_serving(pipeline):
    """Runs after the two above (it rolls the shared service and kills it; the end-to-end test
    asks nothing of the live service: tests/digits_pipeline.py made its requests)."""
    import torch

    from distml.models.artifact import load_model, save_model
    from distml.serve.admin import GatewayAdmin

    ws, _ = pipeline
    service = json.loads((Path(ws.root) / "services" / SERVICE / "service.json").read_text())
    model, manifest = load_model(ws, f"{SERVICE}:2")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # other weights: a new version
    keys = ("architecture", "arch_args", "input_spec", "preprocessing", "class_names", "training", "data_fingerprint")
    third = save_model(ws, model, name=SERVICE, metrics={}, **{k: manifest[k] for k in keys})
    with GatewayAdmin(service["url"]) as admin:
        admin.swap(third.ref)  # what `distml run` does when a better model is chosen

    second = lineage_json(ws, f"{SERVICE}:2")["downstream"]
    assert [(d["status"], d["recorded_state"]) for d in second["deployments"]] == [("ended", "ended")]
    assert second["serving_now"] == []
    now = lineage_json(ws, third.ref)["downstream"]
    assert [d["status"] for d in now["deployments"]] == ["serving"] and now["serving_now"][0]["service"] == SERVICE

    os.killpg(service["pid"], signal.SIGKILL)  # the service's supervisor and gateway: no chance to record the end
    deadline = time.monotonic() + 30
    while Path(f"/proc/{service['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = lineage_json(ws, third.ref)["downstream"]
    assert [(d["status"], d["recorded_state"]) for d in gone["deployments"]] == [("gone", "running")]
    assert gone["serving_now"] == []
    code, text, _ = cli(ws, third.ref)
    assert code == 0 and "serving now: nothing" in text and "gone" in text


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def registry(workspace):
    """mlp:1 (alias champion) and two data snapshots whose fingerprints share the prefix 'ab'."""
    import torch

    from distml.models.artifact import IMAGE_INPUT_SPEC, save_model, set_alias
    from distml.models.zoo import build_model

    torch.manual_seed(0)
    save_model(
        workspace, build_model("mlp"), name="mlp", architecture="mlp", arch_args={}, input_spec=IMAGE_INPUT_SPEC,
        preprocessing={}, class_names=[str(i) for i in range(10)], metrics={}, training={}, data_fingerprint=None,
    )  # fmt: skip
    set_alias(workspace, "mlp", "champion", 1)
    for split, fingerprint in (("train", "ab12" + "0" * 60), ("test", "ab34" + "0" * 60)):
        lineage.record_data_snapshot(workspace.engine, name="d", split=split, fingerprint=fingerprint, uri="mem:d")
    return workspace


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "no model named 'nope' is registered; registered models: mlp"),
        (["mlp:7"], "model 'mlp' has no version 7; its versions are 1"),
        (["mlp@gone"], "model 'mlp' has no alias 'gone'; its aliases are champion (-> mlp:1)"),
        (["mlp:x"], "model reference 'mlp:x' is not valid (the version must be a positive integer)"),
        (["--data", "ff"], "no data snapshot has a fingerprint starting with 'ff'; recorded snapshots: ab34"),
        (["--data", "ab"], "fingerprint prefix 'ab' is ambiguous: 2 data snapshots match (ab12"),
        ([], "give a model (MODEL, MODEL:VERSION or MODEL@ALIAS) or --data FINGERPRINT"),
        (["mlp", "--data", "ab12"], "give either a model or --data FINGERPRINT, not both"),
    ],
)
def test_bad_input_is_one_error_naming_what_exists(registry, args, message):
    code, out, err = cli(registry, *args)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_what_a_registered_model_and_a_snapshot_show_without_runs(registry):
    view = lineage_json(registry, "mlp@champion")
    assert view["model"]["ref"] == "mlp:1" and view["recorded"]
    assert view["upstream"]["training_runs"] == [] and view["downstream"]["serving_now"] == []
    data = lineage_json(registry, "--data", "ab12")
    assert data["fingerprint"] == "ab12" + "0" * 60 and data["models"] == [] and data["training_runs"] == []


# -- many writers at once ---------------------------------------------------------------------------

ROUNDS = 15

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from distml.lineage import record as lineage
    from distml.models import registry
    from distml.train import store as train_store
    from distml.workflow import store as workflow_store
    from distml.workspace import Workspace

    kind, index, rounds, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ws = Workspace(os.environ["DISTML_HOME"], os.environ["DISTML_DB_URL"], migrate=False)
    engine = ws.engine
    def snapshot(j):  # every writer records the same snapshots at about the same moment
        return dict(name="digits", split="train", fingerprint=f"{j:064x}", uri="mem:digits", num_records=j)
    open(f"{go}.{kind}{index}", "w").close()  # ready
    while not os.path.exists(go):
        time.sleep(0.005)

    if kind == "trainer":  # the lead training rank: its run, per-step metrics, checkpoints, its model
        run_id = f"train-{index}"
        train_store.record_train_run(engine, run_id, {"index": index}, status="running")
        for j in range(rounds):
            lineage.record_training(engine, run_id, state="running", parameters={"index": index}, data=[snapshot(j)])
            row = dict(step=j, epoch=0, loss=1.0 / (j + 1), samples_per_s=1.0, step_seconds=0.01)
            train_store.record_train_steps(engine, run_id, [row])
            lineage.record_training(engine, run_id, state="running", checkpoint={"uri": f"mem:{run_id}/{j}", "step": j})
        digest = f"{index + 1:064x}"
        version = registry.record_model_version(
            engine, name="trained", manifest_digest=digest, weights_digest=digest, metrics={}
        )
        lineage.record_model(engine, name="trained", version=version, manifest_digest=digest, weights_digest=digest)
        lineage.record_training(engine, run_id, state="complete", model_digest=digest)
        train_store.record_train_run(engine, run_id, {"index": index}, status="complete")

    elif kind == "executor":  # a step process per step: its row, its lineage, what it ingests
        run_id = f"run-{index}"
        workflow_store.create_workflow_run(engine, run_id, "t", {}, {}, os.getpid(), "host")
        for j in range(rounds):
            node = f"ingest[{j}]"
            execution_id = workflow_store.save_step_execution(
                engine, run_id, node, 0, step_name="ingest", status="running", attempt=0
            )
            lineage.enter_step(run_id, node, 0, {"index": index})
            lineage.record_data_snapshot(engine, **snapshot(j))
            workflow_store.finish_step_execution(engine, execution_id, 0, status="succeeded", output_json=str(j))
            lineage.end_step(engine, run_id, node, 0, "complete")

    elif kind == "scheduler":  # gangs admitted and released through the workspace's pool
        from distml.scheduling.admission import Resources, SharedPool

        pool = SharedPool(engine, kind="job")
        for j in range(rounds):
            lease = pool.acquire(f"job-{index}-{j}", Resources(cpus=0.5))
            pool.release(lease)
        pool.close()

    elif kind == "server":  # a gateway's deployments and a replica's asynchronous jobs
        from distml.serve.jobs import create_job

        for j in range(rounds):
            create_job(engine, model="served", version=1, request={"j": j, "index": index})
            version = registry.lookup(engine, "served@live")
            assert version is not None and version.ref == "served:1"
            common = dict(service=f"svc-{index}", model=version.ref, manifest_digest=version.manifest_digest,
                          pid=os.getpid(), host="h", pid_started=str(j))
            lineage.record_deployment(engine, state="running", **common)
            lineage.record_deployment(engine, state="ended", **common)
    print("ok", flush=True)
    """
)

KINDS = ("trainer", "executor", "scheduler", "server")


def count(conn: sa.Connection, table: sa.Table, *where) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar()


@pytest.mark.slow
def test_parallel_writers_lose_nothing(db_url, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTML_DB_URL", raising=False)
    ws = Workspace(tmp_path / "ws", db_url)
    assert ws.engine.dialect.name == ("sqlite" if db_url is None else "postgresql")
    digest = "e" * 64  # the model the servers deploy, registered before they start
    model_registry.record_model_version(
        ws.engine, name="served", manifest_digest=digest, weights_digest=digest, metrics={}
    )
    lineage.record_model(ws.engine, name="served", version=1, manifest_digest=digest, weights_digest=digest)
    model_registry.set_model_alias(ws.engine, "served", "live", 1)
    # No pool node yet: the scheduler writers register this host at once, as first commands do.
    go = tmp_path / "go"
    env = {**os.environ, "DISTML_HOME": str(ws.root), "DISTML_DB_URL": ws.db_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, kind, str(index), str(ROUNDS), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in KINDS
        for index in range(2)
    ]
    try:
        ready = [tmp_path / f"go.{kind}{index}" for kind in KINDS for index in range(2)]
        while not all(path.exists() for path in ready) and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        go.touch()  # all imported and connected: they start writing at once
        results = [(p.args[3:5], *p.communicate(timeout=240), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [
        f"{' '.join(args)} exited {rc}: {' | '.join(err.strip().splitlines()[-3:])}"
        for args, out, err, rc in results
        if rc != 0 or out.strip() != "ok"
    ]
    assert not failed, "\n".join(failed)

    a, e, ev = lineage_store.artifacts, lineage_store.executions, lineage_store.events
    with ws.engine.connect() as conn:
        # training ranks
        assert count(conn, train_store.train_steps) == 2 * ROUNDS
        assert count(conn, train_store.train_runs, train_store.train_runs.c.status == "complete") == 2
        assert count(conn, e, e.c.type == "training_run", e.c.state == "complete") == 2
        assert count(conn, a, a.c.type == "checkpoint") == 2 * ROUNDS
        versions = conn.execute(
            sa.select(model_registry.model_versions.c.version).where(model_registry.model_versions.c.name == "trained")
        )
        assert sorted(v for (v,) in versions) == [1, 2]
        # every writer recorded the same snapshots: one artifact each, read by both runs, written by both executors
        assert count(conn, a, a.c.type == "dataset_snapshot") == ROUNDS
        inputs = ev.c.kind == "input"
        assert count(conn, ev.join(e, ev.c.execution_id == e.c.id), e.c.type == "training_run", inputs) == 2 * ROUNDS
        outputs = ev.c.kind == "output"
        assert count(conn, ev.join(e, ev.c.execution_id == e.c.id), e.c.type == "training_run", outputs) == 2 * (
            ROUNDS + 1
        )
        # step processes
        assert (
            count(conn, workflow_store.step_executions, workflow_store.step_executions.c.status == "succeeded")
            == 2 * ROUNDS
        )
        assert count(conn, e, e.c.type == "step_execution", e.c.state == "complete") == 2 * ROUNDS
        assert count(conn, ev.join(e, ev.c.execution_id == e.c.id), e.c.type == "step_execution", outputs) == 2 * ROUNDS
        assert count(conn, lineage_store.contexts, lineage_store.contexts.c.type == "pipeline_run") == 2
        assert count(conn, lineage_store.associations) == 2 * ROUNDS + 2 * ROUNDS  # steps, then deployments in services
        # the scheduler
        jobs = sched_store.sched_jobs
        assert count(conn, jobs, jobs.c.state == "done", jobs.c.outcome == "finished") == 2 * ROUNDS
        assert count(conn, jobs) == 2 * ROUNDS
        # servers
        assert count(conn, serve_jobs.inference_jobs) == 2 * ROUNDS
        assert count(conn, e, e.c.type == "deployment", e.c.state == "ended") == 2 * ROUNDS
        assert count(conn, ev.join(e, ev.c.execution_id == e.c.id), e.c.type == "deployment", inputs) == 2 * ROUNDS
        assert count(conn, lineage_store.contexts, lineage_store.contexts.c.type == "service") == 2
    ws.close()
