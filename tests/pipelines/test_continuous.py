"""Continuous training with real processes: `distml watch` on a folder, a real service under load.

Waves of digits arrive as Parquet files; the watch trains, evaluates and promotes through the
gateway's canary while clients keep sending requests (none may fail); data arriving during a
cycle is coalesced into the next; bad batches are rejected with a reason; after `kill -9` a
restarted watch finishes the interrupted cycle and trains every arrival as new exactly once.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distml.data.datasets import _read_bundled_digits, stratified_split
from distml.models import registry
from distml.pipelines import watches as watch_store
from distml.pipelines.end_to_end import client_images, v2_request
from distml.serve.service import stop_service
from distml.views import lineage
from distml.workflow import store as workflow_store
from distml.workspace import Workspace

DISTML = str(Path(sys.executable).with_name("distml"))
NAME = "digits-continuous"
# Between one client's requests: a steady stream of about 60 a second, dozens in each canary
# window, without the client and the service taking both cores from the training they wait on.
PAUSE_S = 0.01
pytestmark = [pytest.mark.slow, pytest.mark.heavy("watch")]  # its own watch: beside the session's digits run


def write_waves(folder: Path, bounds: list[int]) -> list[Path]:
    """The digits train split cut at `bounds` into Parquet files (flat 64-pixel lists, labels)."""
    images, labels = _read_bundled_digits()
    train, _ = stratified_split(labels, 0.2, 0)
    images, labels = images[train], labels[train]
    paths = []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        flat = images[lo:hi].reshape(hi - lo, 64)
        table = pa.table({"image": pa.array(list(flat), type=pa.list_(pa.uint8())), "label": labels[lo:hi]})
        paths.append(folder / f"wave{i + 1}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def drop(path: Path, inbox: Path, name: str | None = None) -> None:
    """Arrive atomically, as a producer should: written under a hidden name, then renamed."""
    tmp = inbox / f".{name or path.name}.tmp"
    tmp.write_bytes(path.read_bytes())
    os.replace(tmp, inbox / (name or path.name))


def start_watch(ws_root: Path, inbox: Path, log: Path, *extra: str) -> subprocess.Popen:
    command = [DISTML, "--workspace", str(ws_root), "watch", "--source", str(inbox), "--name", NAME]
    command += ["--epochs", "1", "--poll", "0.1", "--canary-window", "2", "--canary-min-requests", "5"]
    # Judged on errors: a p99 of a few requests on two shared cores is noise. The latency rule has
    # its own tests (tests/serve/test_canary.py); the gateway's analysis under load, tests/serve/test_cli_serve.py.
    command += ["--max-p99-ratio", "1000", *extra]
    return subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, what: str, log: Path, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-4000:]}")


def cycles(ws: Workspace) -> list[dict]:
    return watch_store.list_cycles(ws.engine, NAME)


def finished(ws: Workspace, n: int) -> bool:
    rows = cycles(ws)
    return len(rows) >= n and all(r.status != "running" for r in rows[:n])


class Load:
    """Clients sending V2 requests to the watch's service all along; every answer's version kept."""

    def __init__(self, ws: Workspace):
        images, _, _ = client_images(ws, "digits", None, 4)
        self.body = v2_request(images)
        self.url = json.loads((Path(ws.root) / "services" / NAME / "service.json").read_text())["url"]
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v2/models/{NAME}/infer", json=self.body)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        self.versions.append(r.json()["model_version"])
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.stop.wait(PAUSE_S)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.fixture
def env(tmp_path):
    ws_root, inbox = tmp_path / "ws", tmp_path / "inbox"
    inbox.mkdir()
    ws = Workspace(ws_root)
    ws.engine  # noqa: B018 - migrate before the watch and the test open the store
    procs: list[subprocess.Popen] = []
    yield ws, inbox, tmp_path / "watch.log", procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    stop_service(ws, NAME)
    ws.close()


def test_watch_coalesces_rejects_bad_batches_and_swaps_under_load_with_no_failed_request(env, tmp_path):
    ws, inbox, log, procs = env
    waves = write_waves(tmp_path, [0, 300, 700, 1000, 1437])
    procs.append(start_watch(ws.root, inbox, log, "--warm-start"))
    drop(waves[0], inbox)
    wait_for(lambda: finished(ws, 1), "cycle 1", log)
    assert cycles(ws)[0].status == "promoted"  # the first model starts the service
    load = Load(ws)
    try:
        wait_for(lambda: len(load.versions) >= 5, "answers from the first model", log)
        drop(waves[1], inbox)
        wait_for(lambda: len(cycles(ws)) >= 2, "cycle 2 to start", log)
        # arriving while cycle 2 runs: two more waves, labels out of range, a damaged file
        bad = pq.read_table(waves[2]).to_pandas()
        bad.loc[3, "label"] = 12
        pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), tmp_path / "bad.parquet")
        (tmp_path / "damaged.parquet").write_bytes(waves[2].read_bytes()[:500])
        for path in (waves[2], tmp_path / "bad.parquet", waves[3], tmp_path / "damaged.parquet"):
            drop(path, inbox)
        wait_for(lambda: finished(ws, 3), "cycle 3", log)
        assert [r.status for r in cycles(ws)] == ["promoted"] * 3, log.read_text()[-3000:]
        wait_for(lambda: len(load.versions) > 20 and "3" in load.versions[-5:], "answers from version 3", log)
    finally:
        load.finish()
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(60) == 0, log.read_text()[-3000:]

    rows = cycles(ws)
    arrivals = watch_store.list_arrivals(ws.engine, NAME)
    new_in = {r.cycle: [a.key for a in arrivals if a.cycle == r.cycle] for r in rows}
    coalesced = ["wave3.parquet", "wave4.parquet"]  # one cycle for both, not a run each
    assert new_in == {1: ["wave1.parquet"], 2: ["wave2.parquet"], 3: coalesced}, log.read_text()[-3000:]
    rejected = {a.key: a.reason for a in arrivals if a.status == "rejected"}
    assert "1 label(s) out of range (e.g. 12 at row 3)" in rejected["bad.parquet"]
    assert "cannot read damaged.parquet" in rejected["damaged.parquet"]
    decisions = [json.loads(r.decision_json) for r in rows]
    assert decisions[0]["action"] == "started"
    # each later candidate, trained on more data from production's weights, beat production on the
    # holdout and went through a canary under load, which the gateway promoted on its analysis
    for decision in decisions[1:]:
        assert decision["action"] == "promoted", decision
        assert decision["canary"]["state"] == "promoted", decision["canary"]
        assert decision["canary"]["stats"][str(decision["version"])]["requests"] >= 5, decision["canary"]
    assert [r.status for r in rows] == ["promoted"] * 3, rows

    # no request failed; every answer named a version that was served at the time, and each
    # promoted version answered the clients
    assert load.failures == []
    promoted = [d["version"] for d in decisions]
    assert promoted == [1, 2, 3]
    assert set(load.versions) == {"1", "2", "3"} and load.versions[0] == "1" and load.versions[-1] == "3"
    assert len(load.versions) > 20
    production = registry.get_model_alias(ws.engine, NAME, "production")
    assert production == 3

    # the served version leads back to the snapshots of the waves it was trained on
    view = lineage.model_lineage(ws.engine, f"{NAME}@production")
    upstream = {s["fingerprint"] for s in _snapshots(view)}
    cycle = next(r.cycle for r in rows if json.loads(r.decision_json)["version"] == production)
    trained_on = {a.fingerprint for a in arrivals if a.cycle is not None and a.cycle <= cycle}
    assert len(trained_on) == sum(len(new_in[c]) for c in range(1, cycle + 1))
    assert trained_on <= upstream


def _snapshots(view: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "fingerprint" in node and node.get("split") == "train":
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(view)
    return found


def test_a_watch_killed_mid_cycle_resumes_it_and_trains_each_arrival_as_new_once(env, tmp_path):
    ws, inbox, log, procs = env
    waves = write_waves(tmp_path, [0, 400, 800])
    procs.append(start_watch(ws.root, inbox, log))
    drop(waves[0], inbox)

    def training() -> bool:
        rows = cycles(ws)
        if not rows or not rows[0].run_id:
            return False
        steps = workflow_store.list_step_executions(ws.engine, rows[0].run_id)
        return any(s.node_id == "train_candidate" and s.status == "running" for s in steps)

    wait_for(training, "cycle 1 to train", log)
    os.kill(procs[0].pid, signal.SIGKILL)  # the watch only: its step processes live on
    procs[0].wait(30)
    drop(waves[1], inbox)  # arrives while no watch runs
    procs.append(start_watch(ws.root, inbox, log, "--max-cycles", "2"))
    assert procs[1].wait(240) == 0, log.read_text()[-4000:]
    assert "resuming cycle 1" in log.read_text()

    rows = cycles(ws)
    assert [(r.cycle, r.status) for r in rows] == [(1, "promoted"), (2, rows[1].status)]
    assert rows[1].status in ("promoted", "kept")
    arrivals = watch_store.list_arrivals(ws.engine, NAME)
    assert [(a.key, a.cycle, a.status) for a in arrivals] == [
        ("wave1.parquet", 1, "trained"),
        ("wave2.parquet", 2, "trained"),
    ]
    runs = {r.cycle: workflow_store.list_step_executions(ws.engine, r.run_id) for r in rows}
    trained = [s for s in runs[1] if s.node_id == "train_candidate"]
    assert len(trained) == 1 and trained[0].status == "succeeded"  # adopted, not trained again
    decision = json.loads(rows[1].decision_json)
    assert decision["evaluation"]["production"] is not None  # cycle 2 was compared with cycle 1's model
