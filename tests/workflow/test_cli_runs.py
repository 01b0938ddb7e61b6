"""`distml run` and `distml runs` as a user runs them: real processes, output read from a pipe.

A run's id is what every later command needs (`distml run --resume`, `distml runs show`,
`distml logs`): it must be printed when the run starts and never cut in a listing.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from distml.workflow import store as workflow_store
from distml.workspace import Workspace

DISTML = str(Path(sys.executable).with_name("distml"))
# new_run_id keeps 40 characters of the pipeline's name: ids of 61 characters, longer than a
# table of five columns on 80 columns leaves its first one
LONG = "a_pipeline_whose_name_fills_the_forty_characters_of_an_id"

PIPELINES = f"""
import time
from pathlib import Path

from distml.workflow import step


@step
def plus_one(n: int) -> int:
    return n + 1


@step
def wait_for_go(folder: str) -> str:
    while not (Path(folder) / "go").exists():
        time.sleep(0.02)
    return "went"


def {LONG}(n: int = 1):
    return plus_one(n)


def gated(folder: str):
    return wait_for_go(folder)
"""


def distml(workspace: Path, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    """`distml ARGS` with its output in a pipe (not a terminal) and $COLUMNS set."""
    return subprocess.run(
        [DISTML, "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": str(columns)},
    )


@pytest.fixture
def pipelines(tmp_path) -> str:
    path = tmp_path / "pipes.py"
    path.write_text(textwrap.dedent(PIPELINES))
    return str(path)


def test_runs_list_shows_whole_ids_on_80_columns_in_a_pipe_and_both_views_as_json(tmp_path, pipelines):
    ws = tmp_path / "ws"
    done = distml(ws, "run", f"{pipelines}:{LONG}", "--param", "n=4")
    assert done.returncode == 0, done.stderr
    run_id = workflow_store.list_workflow_runs(Workspace(ws).engine)[0].run_id
    assert len(run_id) == 61 and f"run {run_id} succeeded" in done.stdout

    listed = distml(ws, "runs", "list", columns=80)
    assert listed.returncode == 0, listed.stderr
    row = next((line for line in listed.stdout.splitlines() if line.startswith(run_id[:20])), "")
    assert row.split()[:2] == [run_id, "succeeded"], listed.stdout  # whole, on one line, copyable
    assert "…" not in listed.stdout
    assert distml(ws, "runs", columns=40).stdout.count(run_id) == 1  # `distml runs` is `runs list`

    as_json = json.loads(distml(ws, "runs", "list", "--json").stdout)
    assert [run["run_id"] for run in as_json] == [run_id]
    run = as_json[0]
    assert (run["status"], run["params"], run["steps"]) == ("succeeded", {"n": 4}, {"succeeded": 1})
    assert run["target"] == f"{pipelines}:{LONG}" and run["created_at"] <= run["updated_at"]

    shown = distml(ws, "runs", "show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["run"]["run_id"] == run_id and detail["run"]["steps"] == {"succeeded": 1}
    (step,) = detail["steps"]
    assert (step["node_id"], step["step_name"], step["status"]) == ("plus_one", "plus_one", "succeeded")
    assert step["generation"] == step["attempt"] == 0 and step["cache"] is not None and step["error"] is None
    assert step["started_at"] <= step["finished_at"] and Path(step["log_path"]).is_file()

    missing = distml(ws, "runs", "show", "nope-123", "--json")
    assert missing.returncode == 2 and missing.stderr == "error: no workflow run 'nope-123'; `distml runs` lists them\n"
    assert json.loads(distml(tmp_path / "empty", "runs", "list", "--json").stdout) == []


def test_run_prints_its_id_and_resume_command_when_it_starts(tmp_path, pipelines):
    folder = tmp_path / "marks"
    folder.mkdir()
    ws = tmp_path / "ws"
    command = [DISTML, "--workspace", str(ws), "run", f"{pipelines}:gated", "--param", f"folder={folder}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def forward() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=forward, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while not any("distml run --resume" in line for line in seen) and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
        started = next((line for line in seen if "distml run --resume" in line), None)
        assert started is not None, f"no resume command while the run runs; stdout so far: {seen}"
        assert proc.poll() is None and not (folder / "go").exists()  # printed at the start, not at the end
        run_id = started.split()[1]
        assert started.strip() == f"run {run_id} started; if it stops, continue it with: distml run --resume {run_id}"
        run = workflow_store.get_workflow_run(Workspace(ws).engine, run_id)
        assert run is not None and run.status == "running"
    finally:
        (folder / "go").write_text("1")  # whatever happened, the step does not wait forever
        err = proc.stderr.read()
        proc.wait(60)
    assert proc.returncode == 0, err
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    assert f"run {run_id} succeeded\n" in seen  # the end's output is still there
