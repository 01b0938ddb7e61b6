"""The end-to-end pipeline through `distml run` on the offline digits data, in one run that CI can
afford: train two candidates, serve the first, swap to the better one under load with no failed
request, select and register it with lineage to the run and the data, and a memoized re-run.
"""

from __future__ import annotations

import json

import pytest

from distml.lineage import store as lineage_store
from distml.models.artifact import resolve_model
from distml.train import store as train_store
from distml.workflow import store as workflow_store
from distml.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.heavy("pipelines")]


def steps(ws: Workspace, run_id: str) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for row in workflow_store.list_step_executions(ws.engine, run_id):
        latest[row.node_id] = row
    return latest


def check_selection_and_lineage(ws: Workspace, run_id: str) -> None:
    """The best candidate by select's own evaluation is digits-classifier@production, and its manifest
    leads back to this run, the candidate's training run and the data snapshots it was trained on."""
    rows = steps(ws, run_id)
    assert json.loads(rows["train[cnn]"].resources_json)["workers"] == 2  # a training step's gang
    selected = json.loads(rows["select"].output_json)
    scores = selected["scores"]
    assert selected["candidate"] == max(scores, key=scores.get)
    production = resolve_model(ws, "digits-classifier@production")
    assert production.ref == selected["model"]
    recorded = {m.name: m.value for m in workflow_store.list_step_metrics(ws.engine, run_id, "select")}
    assert recorded == {f"{ref}.test_accuracy": value for ref, value in scores.items()}
    lineage = production.manifest["lineage"]
    assert lineage["workflow_run"] == run_id and lineage["step"] in ("select", "serve-early")
    trained = {json.loads(r.output_json)["model"]: json.loads(r.output_json) for r in rows.values()
               if r.node_id.startswith("train[")}  # fmt: skip
    candidate = trained[lineage["candidate"]]
    assert resolve_model(ws, lineage["candidate"]).manifest["lineage"]["run_id"] == candidate["train_run"]
    assert train_store.train_history(ws.engine, candidate["train_run"])  # the training run's recorded steps
    ingest = json.loads(rows["ingest"].output_json)
    snapshots = {d.id: d for d in lineage_store.list_datasets(ws.engine, "digits")}
    for split in ingest["splits"].values():
        assert snapshots[split["snapshot_id"]].fingerprint == split["fingerprint"]
    assert lineage["data_snapshots"] == sorted(s["snapshot_id"] for s in ingest["splits"].values())
    assert production.manifest["data_fingerprint"] == ingest["splits"]["train"]["fingerprint"]


def test_async_selection_serves_the_first_model_and_swaps_to_a_better_one_under_load(digits_pipeline):
    """batch_norm trains first and is far worse after one epoch than cnn: the service starts on
    batch_norm's weights, then swaps to cnn's while clients keep sending, and none fails. The run
    (`distml run --async-selection`), its memoized re-run and the answers are tests/digits_pipeline.py's."""
    pipeline = digits_pipeline
    ws, run, load = pipeline.ws, pipeline.run, pipeline.load
    assert run.returncode == 0, run.stdout + run.stderr
    assert "curl -s http://127.0.0.1:" in run.stdout and "/v2/models/digits-classifier/infer" in run.stdout
    run_id = pipeline.run_id
    rows = workflow_store.list_step_executions(ws.engine, run_id)
    early = [json.loads(r.output_json) for r in rows if r.node_id == "serve-early"]
    scores = json.loads(next(r for r in rows if r.node_id == "select").output_json)["scores"]
    assert scores["cnn:1"] > scores["batch_norm:1"]  # the premise of this test
    assert [e["action"] for e in early] == ["started", "swapped from digits-classifier:1"]
    assert load.failures == []
    versions = [v for _, v in load.answers]
    assert versions[0] == "1" and versions[-1] == "2"  # batch_norm's weights first, then cnn's
    assert resolve_model(ws, "digits-classifier@production").version == 2
    final = json.loads(next(r for r in rows if r.node_id == "serve").output_json)
    assert final["action"] == "unchanged"
    check_selection_and_lineage(ws, run_id)
    table = pipeline.table  # what `distml demo` prints, asked of the live service after the run
    assert table.row_count == 4 and table.caption.endswith("/4 right")
    assert table.title.startswith(f"digits-classifier version 2 at {final['url']}")

    rerun = pipeline.rerun
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    second = steps(ws, pipeline.rerun_id)
    assert pipeline.rerun_id != run_id
    assert {k: r.status for k, r in second.items() if k != "serve"} == {
        "ingest": "cached", "train[batch_norm]": "cached", "train[cnn]": "cached", "select": "cached"
    }  # fmt: skip
    assert json.loads(second["serve"].output_json)["action"] == "unchanged"  # a deployment is never memoized
    shown = pipeline.shown
    assert shown.returncode == 0 and shown.stdout.count("cache hit") == 4, shown.stdout
