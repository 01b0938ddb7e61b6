"""One real `distml run` of the end-to-end pipeline on digits, shared by the tests that read it.

The run (batch_norm and cnn, async selection, clients sending all along), its memoized re-run,
`distml runs show` and an answer table from the live service happen once per session
(`digits_pipeline` in tests/conftest.py); tests/pipelines/test_end_to_end.py asserts on what they
gave, tests/lineage/test_lineage.py walks the lineage the run recorded (its last test rolls and kills
the service, after the end-to-end test's live requests were made here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

DISTML = str(Path(sys.executable).with_name("distml"))
SERVICE = "digits-classifier"
PAUSE_S = 0.01  # between the client's requests: a steady stream, not a load that starves the trainings
RUN_ARGS = ("run", "--dataset", "digits", "--epochs", "1", "--param", 'models=["batch_norm", "cnn"]')


def distml(ws_root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([DISTML, "--workspace", str(ws_root), *args], capture_output=True, text=True, timeout=timeout)


class Load:
    """Clients sending V2 requests with real digit images while the pipeline runs; every answer kept."""

    def __init__(self, ws, service: str):
        from distml.pipelines.end_to_end import client_images

        self.ws, self.service = ws, service
        self.images, self.labels, _ = client_images(ws, "digits", None, 4)
        self.answers: list[tuple[int, str | None]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        from distml.pipelines.end_to_end import v2_request

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
                self.stop.wait(PAUSE_S)

    def finish(self, final_version: str | None) -> None:
        """Stop once the version the run ended with answered a few times (at most 30 s more)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.thread.is_alive():
            if final_version is None or [v for _, v in self.answers[-3:]] == [final_version] * 3:
                break
            time.sleep(0.05)
        self.stop.set()
        self.thread.join(60)


@dataclass
class PipelineRun:
    ws: object  # distml.workspace.Workspace
    run_id: str  # the first run's
    run: subprocess.CompletedProcess
    load: Load
    rerun: subprocess.CompletedProcess
    rerun_id: str
    shown: subprocess.CompletedProcess  # `distml runs show RERUN_ID`
    table: object | None  # what `distml demo` prints from the live service after the run (rich Table)


def run_digits_pipeline(ws_root: Path) -> PipelineRun:
    """`distml run --async-selection` under load, then the memoized re-run; the service stays up."""
    from distml.pipelines.demo import answer_table
    from distml.workflow import store as workflow_store
    from distml.workspace import Workspace

    ws = Workspace(ws_root)
    ws.engine  # noqa: B018 - migrate before the run and the load thread open the store
    load = Load(ws, SERVICE)
    try:
        run = distml(ws_root, *RUN_ARGS, "--async-selection")
    finally:
        production = _production_version(ws)
        load.finish(production)
    run_id = workflow_store.list_workflow_runs(ws.engine)[0].run_id if run.returncode == 0 else ""
    table = rerun = shown = None
    rerun_id = ""
    if run.returncode == 0:
        final = json.loads(next(r for r in workflow_store.list_step_executions(ws.engine, run_id)
                                if r.node_id == "serve").output_json)  # fmt: skip
        table = answer_table(ws, final["url"], final["model"], "digits", None, 4)
        rerun = distml(ws_root, *RUN_ARGS)
        rerun_id = workflow_store.list_workflow_runs(ws.engine)[0].run_id
        shown = distml(ws_root, "runs", "show", rerun_id)
    return PipelineRun(ws, run_id, run, load, rerun, rerun_id, shown, table)


def _production_version(ws) -> str | None:
    from distml.core.errors import DistmlError
    from distml.models.artifact import resolve_model

    try:
        return str(resolve_model(ws, f"{SERVICE}@production").version)
    except DistmlError:  # no production model: the run failed, and the test says why
        return None
