"""The end-to-end pipeline through `distml run` on the offline digits data, in one run that CI can
afford: train two candidates, serve the first, swap to the better one under load with no failed
request, select and register it with lineage to the run and the data, and a memoized re-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from distml.models.artifact import resolve_model
from distml.ops import metadata
from distml.pipelines.demo import answer_table
from distml.pipelines.end_to_end import client_images, v2_request
from distml.serve.service import stop_service
from distml.workspace import Workspace

DISTML = str(Path(sys.executable).with_name("distml"))
pytestmark = pytest.mark.slow


def distml(ws_root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([DISTML, "--workspace", str(ws_root), *args], capture_output=True, text=True, timeout=timeout)


def steps(ws: Workspace, run_id: str) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for row in metadata.list_step_executions(ws.engine, run_id):
        latest[row["node_id"]] = row
    return latest


class Load:
    """Clients sending V2 requests with real digit images while the pipeline runs; every answer kept."""

    def __init__(self, ws: Workspace, service: str):
        self.ws, self.service = ws, service
        self.images, self.labels, _ = client_images(ws, "digits", None, 4)
        self.answers: list[tuple[int, str | None]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        record = Path(self.ws.root) / "services" / self.service / "service.json"
        while not self.stop.is_set() and not record.exists():
            time.sleep(0.05)
        if self.stop.is_set():
            return
        url = json.loads(record.read_text())["url"]
        body = v2_request(self.images)
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{url}/v2/models/{self.service}/infer", json=body)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        self.answers.append((r.status_code, r.json().get("model_version")))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def finish(self) -> None:
        time.sleep(0.5)  # a few more answers from the final version
        self.stop.set()
        self.thread.join(60)


def check_selection_and_lineage(ws: Workspace, run_id: str) -> None:
    """The best candidate by select's own evaluation is digits-classifier@production, and its manifest
    leads back to this run, the candidate's training run and the data snapshots it was trained on."""
    rows = steps(ws, run_id)
    assert json.loads(rows["train[cnn]"]["resources_json"])["workers"] == 2  # a training step's gang
    selected = json.loads(rows["select"]["output_json"])
    scores = selected["scores"]
    assert selected["candidate"] == max(scores, key=scores.get)
    production = resolve_model(ws, "digits-classifier@production")
    assert production.ref == selected["model"]
    recorded = {m["name"]: m["value"] for m in metadata.list_step_metrics(ws.engine, run_id, "select")}
    assert recorded == {f"{ref}.test_accuracy": value for ref, value in scores.items()}
    lineage = production.manifest["lineage"]
    assert lineage["workflow_run"] == run_id and lineage["step"] in ("select", "serve-early")
    trained = {json.loads(r["output_json"])["model"]: json.loads(r["output_json"]) for r in rows.values()
               if r["node_id"].startswith("train[")}  # fmt: skip
    candidate = trained[lineage["candidate"]]
    assert resolve_model(ws, lineage["candidate"]).manifest["lineage"]["run_id"] == candidate["train_run"]
    assert metadata.train_history(ws.engine, candidate["train_run"])  # the training run's recorded steps
    ingest = json.loads(rows["ingest"]["output_json"])
    snapshots = {d["id"]: d for d in metadata.list_datasets(ws.engine, "digits")}
    for split in ingest["splits"].values():
        assert snapshots[split["snapshot_id"]]["fingerprint"] == split["fingerprint"]
    assert lineage["data_snapshots"] == sorted(s["snapshot_id"] for s in ingest["splits"].values())
    assert production.manifest["data_fingerprint"] == ingest["splits"]["train"]["fingerprint"]


def test_async_selection_serves_the_first_model_and_swaps_to_a_better_one_under_load(tmp_path):
    """batch_norm trains first and is far worse after one epoch than cnn: the service starts on
    batch_norm's weights, then swaps to cnn's while clients keep sending, and none fails."""
    ws_root = tmp_path / "ws"
    ws = Workspace(ws_root)
    ws.engine  # noqa: B018 - migrate before the run and the load thread open the store
    load = Load(ws, "digits-classifier")
    try:
        run = distml(
            ws_root, "run", "--dataset", "digits", "--epochs", "1", "--async-selection",
            "--param", 'models=["batch_norm", "cnn"]',
        )  # fmt: skip
        load.finish()
        assert run.returncode == 0, run.stdout + run.stderr
        assert "curl -s http://127.0.0.1:" in run.stdout and "/v2/models/digits-classifier/infer" in run.stdout
        run_id = metadata.list_workflow_runs(ws.engine)[0]["run_id"]
        rows = metadata.list_step_executions(ws.engine, run_id)
        early = [json.loads(r["output_json"]) for r in rows if r["node_id"] == "serve-early"]
        scores = json.loads(next(r for r in rows if r["node_id"] == "select")["output_json"])["scores"]
        assert scores["cnn:1"] > scores["batch_norm:1"]  # the premise of this test
        assert [e["action"] for e in early] == ["started", "swapped from digits-classifier:1"]
        assert load.failures == []
        versions = [v for _, v in load.answers]
        assert versions[0] == "1" and versions[-1] == "2"  # batch_norm's weights first, then cnn's
        assert resolve_model(ws, "digits-classifier@production").version == 2
        final = json.loads(next(r for r in rows if r["node_id"] == "serve")["output_json"])
        assert final["action"] == "unchanged"
        check_selection_and_lineage(ws, run_id)
        table = answer_table(ws, final["url"], final["model"], "digits", None, 4)  # what `distml demo` prints
        assert table.row_count == 4 and table.caption.endswith("/4 right")
        assert table.title.startswith("digits-classifier version 2 at http://127.0.0.1:")

        rerun = distml(
            ws_root, "run", "--dataset", "digits", "--epochs", "1", "--param", 'models=["batch_norm", "cnn"]'
        )
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        second = steps(ws, metadata.list_workflow_runs(ws.engine)[0]["run_id"])
        assert {k: r["status"] for k, r in second.items() if k != "serve"} == {
            "ingest": "cached", "train[batch_norm]": "cached", "train[cnn]": "cached", "select": "cached"
        }  # fmt: skip
        assert json.loads(second["serve"]["output_json"])["action"] == "unchanged"  # a deployment is never memoized
        shown = distml(ws_root, "runs", "show", metadata.list_workflow_runs(ws.engine)[0]["run_id"])
        assert shown.returncode == 0 and shown.stdout.count("cache hit") == 4, shown.stdout
    finally:
        load.stop.set()
        stop_service(ws, "digits-classifier")
