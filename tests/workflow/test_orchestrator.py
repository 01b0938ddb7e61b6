"""The orchestrator with real step processes: fan-out/fan-in, retries, timeouts, fail-fast,
conditions, asynchronous fan-in, gang admission, kill -9 and resume, and the errors users see.

Each test writes a small pipeline file and runs it in a fresh workspace; waits are on files
and metadata rows, never on elapsed time.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from distml.cli import main
from distml.core.errors import DistmlError
from distml.core.liveness import children_of, parent_of, pid_alive
from distml.workflow import store as workflow_store
from distml.workflow.orchestrator import RunOptions, resume_run, run_pipeline
from distml.workspace import Workspace

DISTML = str(Path(sys.executable).with_name("distml"))


def write(tmp_path: Path, code: str, name: str = "pipe.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def rows_by_node(ws: Workspace, run_id: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in workflow_store.list_step_executions(ws.engine, run_id):
        out.setdefault(row.node_id, []).append(row)
    return out


def wait_for(predicate, what: str, limit: float = 120.0, log: Path | None = None):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"; log:\n{log.read_text()[-3000:]}" if log else ""))


def start_orchestrator(tmp_path: Path, path: str, **popen: object) -> tuple[Workspace, subprocess.Popen]:
    """`distml run PATH:pipeline` as its own process, on a store migrated first."""
    ws = Workspace(tmp_path / "ws")
    ws.engine  # noqa: B018 - migrate before the orchestrator opens the store
    command = [DISTML, "--workspace", str(ws.root), "run", f"{path}:pipeline"]
    return ws, subprocess.Popen(command, **popen)


def test_fan_out_fan_in_logs_and_metrics(tmp_path, workspace):
    path = write(
        tmp_path,
        """
        from distml.workflow import step, current, Resources

        @step(resources=Resources(cpus=0.5))
        def square(x: int) -> int:
            print(f"squaring {x}")
            current().log_metric("x", x)
            return x * x

        @step
        def total(values: list) -> dict:
            return {"sum": sum(values), "n": len(values)}

        def pipeline(n: int = 4):
            return total(square.map(range(n)))
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline", {"n": 5})
    assert result.status == "succeeded"
    assert result.result == {"sum": 0 + 1 + 4 + 9 + 16, "n": 5}
    rows = rows_by_node(workspace, result.run_id)
    assert sorted(rows) == ["square[0]", "square[1]", "square[2]", "square[3]", "square[4]", "total"]
    assert {r[0].status for r in rows.values()} == {"succeeded"}
    assert json.loads(rows["total"][0].upstream_json) == [f"square[{i}]" for i in range(5)]
    metrics = workflow_store.list_step_metrics(workspace.engine, result.run_id)
    assert sorted((m.node_id, m.value) for m in metrics) == [(f"square[{i}]", float(i)) for i in range(5)]
    out = CliRunner().invoke(main, ["--workspace", str(workspace.root), "logs", result.run_id, "square[3]"])
    assert out.exit_code == 0, out.output
    assert "squaring 3" in out.output
    shown = CliRunner().invoke(main, ["--workspace", str(workspace.root), "runs", "show", result.run_id])
    assert shown.exit_code == 0 and "total" in shown.output and "square[4]" in shown.output


RETRIES = """
from pathlib import Path
from distml.workflow import step

COUNTER = Path({counter!r})

@step(retries=2, retry_backoff=0.05, retry_on=(ValueError,))
def flaky(fail_times: int, error: str) -> int:
    n = int(COUNTER.read_text()) if COUNTER.exists() else 0
    COUNTER.write_text(str(n + 1))
    if n < fail_times:
        raise {{"value": ValueError, "type": TypeError}}[error](f"attempt {{n + 1}} fails")
    return n + 1

def pipeline(fail_times: int = 2, error: str = "value"):
    return flaky(fail_times, error)
"""


def test_retries_until_success_and_only_on_listed_errors(tmp_path, workspace):
    counter = tmp_path / "count"
    path = write(tmp_path, RETRIES.format(counter=str(counter)))
    result = run_pipeline(workspace, f"{path}:pipeline", {"fail_times": 2})
    assert result.status == "succeeded" and result.result == 3
    row = rows_by_node(workspace, result.run_id)["flaky"][0]
    assert row.status == "succeeded" and row.attempt == 2
    assert len(result.states["flaky"].history) == 2

    counter.unlink()
    failed = run_pipeline(workspace, f"{path}:pipeline", {"fail_times": 5})  # more failures than retries
    assert failed.status == "failed" and counter.read_text() == "3"
    assert "attempt 3 fails" in rows_by_node(workspace, failed.run_id)["flaky"][0].error

    counter.unlink()
    other = run_pipeline(workspace, f"{path}:pipeline", {"fail_times": 1, "error": "type"})  # not in retry_on
    assert other.status == "failed" and counter.read_text() == "1"
    assert "TypeError: attempt 1 fails" in rows_by_node(workspace, other.run_id)["flaky"][0].error


def test_timeout_stops_the_step_and_everything_it_started(tmp_path, workspace):
    """The timeout counts from the moment the step's function begins, not from its process's
    start-up: the step process here imports the pipeline file more slowly than the timeout (as a
    busy machine may), and its function still starts a child and writes its pid before it is stopped."""
    pidfile = tmp_path / "child.pid"
    path = write(
        tmp_path,
        f"""
        import multiprocessing, subprocess, time
        from pathlib import Path
        from distml.workflow import step

        if multiprocessing.current_process().name.startswith("distml-step-"):
            time.sleep(2.5)  # a slow start-up, longer than the timeout: not part of the step's time

        @step(timeout=1.5)
        def slow() -> int:
            child = subprocess.Popen(["sleep", "300"])
            Path({str(pidfile)!r}).write_text(str(child.pid))
            time.sleep(300)
            return 1

        def pipeline():
            return slow()
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline", {})
    assert result.status == "failed"
    row = rows_by_node(workspace, result.run_id)["slow"][0]
    assert row.status == "failed" and "timed out after 1.5 s" in row.error
    assert pidfile.exists(), "the step was stopped before its function wrote the pid file: its start-up counted"
    child = int(pidfile.read_text())
    wait_for(lambda: not pid_alive(child), "the step's own child process to be stopped", 30)


FAILING = """
import time
from pathlib import Path
from distml.workflow import step

DONE = Path({done!r})

@step
def broken() -> int:
    raise RuntimeError("broken on purpose")

@step
def after_broken(x: int) -> int:
    return x

@step
def independent() -> str:
    Path({started!r}).write_text("1")
    deadline = time.monotonic() + 30  # bounded, so a broken fail-fast shows as a failure, not a hang
    while not Path({release!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    DONE.write_text("done")
    return "ok"

@step
def gate() -> int:
    while not Path({started!r}).exists():
        time.sleep(0.02)
    return 0

def pipeline():
    g = gate()
    b = broken().after(g)
    return {{"a": after_broken(b), "i": independent()}}
"""


@pytest.mark.parametrize("fail_fast", [True, False])
def test_fail_fast_cancels_running_steps_continue_runs_the_independent_ones(tmp_path, workspace, fail_fast):
    started, release, done = tmp_path / "started", tmp_path / "release", tmp_path / "done"
    path = write(tmp_path, FAILING.format(started=str(started), release=str(release), done=str(done)))
    if not fail_fast:
        release.write_text("1")
    result = run_pipeline(workspace, f"{path}:pipeline", {}, RunOptions(fail_fast=fail_fast, cpus=4))
    assert result.status == "failed"
    states = {k: s.status for k, s in result.states.items()}
    assert states["broken"] == "failed" and states["after_broken"] in ("upstream_failed", "cancelled")
    if fail_fast:
        assert states["independent"] == "cancelled" and not done.exists()
    else:
        assert states["independent"] == "succeeded" and done.read_text() == "done"
        assert states["after_broken"] == "upstream_failed"
    shown = CliRunner().invoke(main, ["--workspace", str(workspace.root), "runs", "show", result.run_id])
    assert "broken on purpose" in shown.output  # the error and the log tail


def test_condition_skips_the_step_and_its_downstream(tmp_path, workspace):
    path = write(
        tmp_path,
        """
        from distml.workflow import step

        @step
        def score(x: float) -> float:
            return x

        @step(when=lambda s: s >= 0.9)
        def deploy(s: float) -> str:
            return "deployed"

        @step
        def announce(message: str) -> str:
            return message + "!"

        def pipeline(x: float = 0.5):
            return announce(deploy(score(x)))
        """,
    )
    low = run_pipeline(workspace, f"{path}:pipeline", {"x": 0.5})
    assert low.status == "succeeded" and low.result is None
    assert {k: s.status for k, s in low.states.items()} == {
        "score": "succeeded",
        "deploy": "skipped",
        "announce": "skipped",
    }
    high = run_pipeline(workspace, f"{path}:pipeline", {"x": 0.95})
    assert high.result == "deployed!"


def test_async_fan_in_runs_downstream_on_first_result_and_on_each_better_one(tmp_path, workspace):
    seen = tmp_path / "seen"
    seen.mkdir()
    path = write(
        tmp_path,
        f"""
        import time
        from pathlib import Path
        from distml.workflow import best_of, step, Resources

        SEEN = Path({str(seen)!r})

        @step(resources=Resources(cpus=0.25))
        def candidate(name: str, score: float, wait_for: str) -> dict:
            while wait_for and not (SEEN / wait_for).exists():  # finish only after that one was deployed
                time.sleep(0.02)
            return {{"name": name, "score": score}}

        @step
        def deploy(best: dict) -> str:
            (SEEN / best["name"]).write_text(str(best["score"]))
            with open(SEEN / "order", "a") as f:
                f.write(best["name"] + "\\n")
            return best["name"]

        @step
        def announce() -> None:  # ordered after deploy: it must see deploy's last run
            (SEEN / "announced").write_text((SEEN / "order").read_text())

        def pipeline():
            a = candidate("a", 0.5, "")
            b = candidate("b", 0.9, "a")
            c = candidate("c", 0.7, "b")
            deployed = deploy(best_of([a, b, c], key=lambda r: r["score"]))
            announce().after(deployed)
            return deployed
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline", {}, RunOptions(cpus=2))
    assert result.status == "succeeded" and result.result == "b"
    assert (seen / "order").read_text().split() == ["a", "b"]  # c arrived later and was worse: no re-run
    assert (seen / "announced").read_text().split() == ["a", "b"]  # after() waited for every run of deploy
    nodes = rows_by_node(workspace, result.run_id)
    rows = nodes["deploy"]
    assert sorted(r.generation for r in rows) == [0, 1]
    # every run of deploy and of its best_of node records its name and what it waits for, as lineage reads them
    [best] = json.loads(rows[0].upstream_json)
    assert [(r.step_name, json.loads(r.upstream_json)) for r in rows] == [("deploy", [best])] * 2
    assert {tuple(json.loads(r.upstream_json)) for r in nodes[best]} == {("candidate", "candidate-2", "candidate-3")}


def test_gangs_that_do_not_fit_together_run_one_after_the_other(tmp_path, workspace):
    spans = tmp_path / "spans"
    spans.mkdir()
    path = write(
        tmp_path,
        f"""
        import os, time
        from pathlib import Path
        from distml.workflow import step, Resources

        @step(resources=Resources(cpus=1, workers=2))
        def gang(i: int) -> int:
            Path({str(spans)!r}, f"{{i}}.start").write_text(str(time.time_ns()))
            time.sleep(0.3)
            Path({str(spans)!r}, f"{{i}}.end").write_text(str(time.time_ns()))
            return i

        def pipeline():
            return gang.map(range(3))
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline", {}, RunOptions(cpus=2))
    assert result.status == "succeeded"
    intervals = sorted(
        (int((spans / f"{i}.start").read_text()), int((spans / f"{i}.end").read_text())) for i in range(3)
    )
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end <= start  # never two gangs of 2 on 2 slots at once

    too_big = CliRunner().invoke(main, ["--workspace", str(workspace.root), "run", f"{path}:pipeline", "--cpus", "1"])
    assert too_big.exit_code == 2
    assert "gang of 2 x 1 cpu" in too_big.output and "pool has 1 cpu slots" in too_big.output


RESUMABLE = """
import os, time
from pathlib import Path
from distml.workflow import step

DIR = Path({folder!r})

def count(name):
    with open(DIR / name, "a") as f:
        f.write(f"{{os.getpid()}}\\n")

@step
def first() -> int:
    count("first")
    return 1

@step
def second(x: int) -> int:
    count("second")
    while not (DIR / "go").exists():
        time.sleep(0.02)
    return x + 1

@step
def third(y: int) -> int:
    count("third")
    return y * 10

def pipeline():
    return third(second(first()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("step_survives", [False, True])
def test_kill_9_of_the_orchestrator_then_resume(tmp_path, step_survives):
    """Killed with the step it was running: resume re-runs that step and reuses `first`. Killed
    alone: the step process lives on, resume adopts it and it runs once."""
    folder = tmp_path / "marks"
    folder.mkdir()
    path = write(tmp_path, RESUMABLE.format(folder=str(folder)))
    log = open(tmp_path / "orchestrator.log", "w")
    ws, orchestrator = start_orchestrator(tmp_path, path, stdout=log, stderr=subprocess.STDOUT)
    try:
        runs = wait_for(lambda: workflow_store.list_workflow_runs(ws.engine), "the run to be recorded")
        run_id = runs[0].run_id

        def second_running():
            rows = rows_by_node(ws, run_id).get("second", [])
            return rows and rows[-1].status == "running" and rows[-1].pid and (folder / "second").exists()

        wait_for(second_running, "step `second` to run", log=tmp_path / "orchestrator.log")
        step_pid = rows_by_node(ws, run_id)["second"][-1].pid
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait()
        if not step_survives:
            os.killpg(step_pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(step_pid), "the step process to die")
        assert workflow_store.get_workflow_run(ws.engine, run_id).status == "running"  # nobody recorded an end
        # the step may end once the resumed orchestrator has taken the run over (adopted it or not)
        result = resume_run(ws, run_id, on_start=lambda _: (folder / "go").write_text("1"))
    finally:
        (folder / "go").write_text("1")  # whatever happened, no step process waits forever
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert result.status == "succeeded" and result.result == 20
    assert len((folder / "first").read_text().split()) == 1  # finished before the kill: reused
    assert len((folder / "second").read_text().split()) == (1 if step_survives else 2)
    assert len((folder / "third").read_text().split()) == 1
    history = " ".join(result.states["second"].history)
    assert ("adopted" in history) if step_survives else ("gone" in history)
    assert workflow_store.get_workflow_run(ws.engine, run_id).status == "succeeded"


AHEAD = """
import os, time
from pathlib import Path
from distml.workflow import step

print("imported the pipeline in", os.getpid(), flush=True)
DIR = Path({folder!r})

@step
def hop(previous: list) -> list:
    while not (DIR / "go").exists():
        time.sleep(0.02)
    return [*previous, os.getpid()]

def pipeline():
    return hop(hop(hop([])))
"""


def test_step_processes_forked_ahead_log_what_they_print_before_their_step_and_never_outlive_the_run(tmp_path):
    """Each step's process is forked ahead of its step (it imports the pipeline while the step
    before runs): what it prints then goes to its step's log, not to the orchestrator's stdout; the
    processes nobody took end with the run, and with an orchestrator killed with SIGKILL."""
    folder = tmp_path / "marks"
    folder.mkdir()
    path = write(tmp_path, AHEAD.format(folder=str(folder)))
    # its output to a file: a step that outlives the orchestrator keeps its forkserver (and the
    # forkserver the orchestrator's stdout) open until the step ends
    output = tmp_path / "orchestrator.out"
    with open(output, "w") as out:
        ws, orchestrator = start_orchestrator(tmp_path, path, stdout=out, stderr=subprocess.STDOUT)
    try:
        run_id = wait_for(lambda: workflow_store.list_workflow_runs(ws.engine), "the run to be recorded")[0].run_id

        def first_running():
            rows = rows_by_node(ws, run_id).get("hop", [])
            return rows and rows[0].status == "running" and rows[0].pid

        step_pid = wait_for(first_running, "the first step to run")
        forkserver = parent_of(step_pid)
        # the next steps' processes, forked ahead while the first one waits
        spares = wait_for(lambda: set(children_of(forkserver)) - {step_pid}, "processes forked ahead")
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(60)
        wait_for(lambda: not any(pid_alive(pid) for pid in spares), f"the processes forked ahead ({spares}) to end")
        assert pid_alive(step_pid)  # the step itself lives on, to be adopted by `distml run --resume`
    finally:
        (folder / "go").write_text("1")
        if orchestrator.poll() is None:
            orchestrator.kill()
    printed = output.read_text()  # the orchestrator imports the pipeline too: its own line only
    assert printed.count("imported the pipeline") == 1 and f"in {orchestrator.pid}" in printed, printed

    result = resume_run(ws, run_id)
    assert result.status == "succeeded"
    pids = result.result
    assert len(set(pids)) == 3 and step_pid == pids[0]  # one process per step, the first adopted
    for node_id, rows in rows_by_node(ws, run_id).items():
        log = Path(rows[-1].log_path).read_text()
        assert f"imported the pipeline in {rows[-1].pid}" in log, (node_id, log)


def forkserver_children() -> list[int]:
    """The processes this process's forkserver started and that still run (its step processes)."""
    ours = [pid for pid in children_of(os.getpid()) if "forkserver" in Path(f"/proc/{pid}/cmdline").read_text()]
    return [child for server in ours for child in children_of(server)]


def test_a_failed_run_leaves_none_of_the_processes_it_forked_ahead(tmp_path, workspace):
    path = write(
        tmp_path,
        """
        from distml.workflow import step

        @step
        def fails() -> int:
            raise ValueError("no")

        @step
        def after(x: int) -> int:
            return x

        def pipeline():
            return after(after(after(fails())))
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline")
    assert result.status == "failed"
    assert forkserver_children() == []


def test_stopping_with_sigterm_records_a_resumable_run(tmp_path):
    folder = tmp_path / "marks"
    folder.mkdir()
    path = write(tmp_path, RESUMABLE.format(folder=str(folder)))
    ws, orchestrator = start_orchestrator(tmp_path, path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (folder / "second").exists(), "step `second` to start")
        orchestrator.send_signal(signal.SIGTERM)
        _, err = orchestrator.communicate(timeout=60)
    finally:
        (folder / "go").write_text("1")  # whatever happened, no step process waits forever
        if orchestrator.poll() is None:
            orchestrator.kill()
            (folder / "go").write_text("1")  # no step process waits forever
    assert orchestrator.returncode == 130
    run_id = workflow_store.list_workflow_runs(ws.engine)[0].run_id
    assert f"distml run --resume {run_id}" in err
    assert workflow_store.get_workflow_run(ws.engine, run_id).status == "stopped"
    assert rows_by_node(ws, run_id)["second"][-1].status == "cancelled"
    (folder / "go").write_text("1")
    resumed = CliRunner().invoke(main, ["--workspace", str(ws.root), "run", "--resume", run_id])
    assert resumed.exit_code == 0, resumed.output
    assert len((folder / "first").read_text().split()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{path}:pipeline", "--param", "n=abc"], "pipeline parameter n='abc'"),
        (["{path}:pipeline", "--param", "m=1"], "unknown pipeline parameter(s) m; pipeline accepts: n"),
        (["{path}:pipeline", "--param", "novalue"], "--param expects KEY=VALUE"),
        (
            ["{path}:pipeline", "--epochs", "2"],
            "--epochs sets a pipeline's `epochs` parameter, which {path}:pipeline does not have; it takes n "
            "(set those with --param KEY=VALUE)",
        ),
        (["{path}:pipeline", "--no-serve"], "--no-serve sets a pipeline's `serve_model` parameter"),
        (["{path}:nothing"], "has no function 'nothing'"),
        (["{tmp}/missing.py:pipeline"], "pipeline file {tmp}/missing.py does not exist"),
        (["nocolon"], "must be path/to/file.py:function"),
        (["--resume", "nope-123"], "no workflow run 'nope-123'"),
        (["{path}:nested"], "must be defined at the top level of its module"),
        (["{path}:empty"], "called no steps"),
    ],
)
def test_bad_input_gets_one_clear_error(tmp_path, args, message):
    path = write(
        tmp_path,
        """
        from distml.workflow import step

        @step
        def add(n: int) -> int:
            return n + 1

        def pipeline(n: int = 1):
            return add(n)

        def nested():
            @step
            def inner() -> int:
                return 1
            return inner()

        def empty():
            return 1
        """,
    )
    argv = [a.format(path=path, tmp=tmp_path) for a in args]
    out = CliRunner().invoke(main, ["--workspace", str(tmp_path / "ws"), "run", *argv])
    assert out.exit_code == 2, out.output
    assert message.format(tmp=tmp_path, path=path) in out.output
    assert out.output.count("error:") == 1


def test_a_result_that_is_not_json_fails_the_step_with_a_clear_error(tmp_path, workspace):
    path = write(
        tmp_path,
        """
        from distml.workflow import step

        @step
        def bad() -> object:
            return object()

        def pipeline():
            return bad()
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline", {})
    assert result.status == "failed"
    error = rows_by_node(workspace, result.run_id)["bad"][0].error
    assert "the result of step bad is a object" in error and "Artifact" in error


def test_artifacts_flow_between_steps_by_content(tmp_path, workspace, monkeypatch):
    path = write(
        tmp_path,
        """
        from pathlib import Path
        from distml.workflow import Artifact, step

        @step
        def produce(text: str) -> Artifact:
            folder = Path("out-" + text)
            folder.mkdir(exist_ok=True)
            (folder / "a.txt").write_text(text)
            (folder / "sub").mkdir(exist_ok=True)
            (folder / "sub" / "b.txt").write_text(text * 2)
            return Artifact(folder)

        @step
        def consume(data: Artifact) -> dict:
            return {"a": (data.path / "a.txt").read_text(), "b": (data.path / "sub" / "b.txt").read_text(),
                    "digest": data.digest}

        def pipeline(text: str = "x"):
            return consume(produce(text))
        """,
    )
    monkeypatch.chdir(tmp_path)  # the steps write relative paths; restored after the test
    result = run_pipeline(workspace, f"{path}:pipeline", {"text": "hi"})
    assert result.status == "succeeded"
    assert result.result["a"] == "hi" and result.result["b"] == "hihi"
    assert workspace.artifacts.exists(result.result["digest"])


def test_a_step_that_records_lineage_has_its_execution_ended_in_the_graph(tmp_path, workspace):
    """A step's execution enters the lineage graph with the first thing it records (here a data
    snapshot); the orchestrator ends it once the step succeeded, also for the last step of a run."""
    path = write(
        tmp_path,
        """
        from distml.lineage import record
        from distml.workflow import current, step

        @step
        def snapshot(split: str, after: str = "") -> str:
            record.record_data_snapshot(current().workspace.engine, name="d", split=split, fingerprint="f" + split)
            return split

        def pipeline():
            return snapshot("test", after=snapshot("train"))
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline")
    assert result.status == "succeeded"
    from distml.lineage.record import STEP, step_key
    from distml.lineage.store import find_execution

    with workspace.engine.connect() as conn:
        for node_id in result.states:
            execution = find_execution(conn, STEP, step_key(result.run_id, node_id, 0))
            assert execution is not None and execution.state == "complete", (node_id, execution)


def test_the_example_user_pipeline_runs_and_its_memoized_step_hits_the_cache_again(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "word_lengths.py"
    argv = ["--workspace", str(tmp_path / "ws"), "run", f"{example}:pipeline", "--param", 'words=["Data", "ml "]']
    first = CliRunner().invoke(main, argv)
    assert first.exit_code == 0, first.output
    assert '"letters": 6' in first.output and '"report": "2 words, 6 letters"' in first.output
    second = CliRunner().invoke(main, argv)
    assert second.exit_code == 0, second.output
    ws = Workspace(tmp_path / "ws")
    latest = workflow_store.list_workflow_runs(ws.engine)[0].run_id
    states = {k: rows[-1].status for k, rows in rows_by_node(ws, latest).items()}
    assert states == {"measure[Data]": "cached", "measure[1]": "cached", "total": "succeeded", "report": "succeeded"}
    log = CliRunner().invoke(main, ["--workspace", str(tmp_path / "ws"), "logs", latest, "measure[Data]"])
    assert log.exit_code == 0 and "was a cache hit" in log.output and "step measure[Data] attempt 1" in log.output
    short = CliRunner().invoke(main, [*argv[:-1], 'words=["a"]'])
    assert short.exit_code == 0 and '"report": null' in short.output  # fewer letters than at_least: skipped


def test_a_data_fingerprint_that_fails_ends_the_run_as_failed_with_its_message(tmp_path):
    path = write(
        tmp_path,
        """
        from distml.core.errors import DistmlError
        from distml.workflow import step

        def missing(path: str) -> str:
            raise DistmlError(f"data file {path} is missing; put it there or pass another path")

        @step(memoize=True, fingerprint=missing)
        def load(path: str) -> int:
            return 1

        def pipeline():
            return load("nowhere.csv")
        """,
    )
    out = CliRunner().invoke(main, ["--workspace", str(tmp_path / "ws"), "run", f"{path}:pipeline"])
    assert out.exit_code == 2 and "error: data file nowhere.csv is missing" in out.output
    ws = Workspace(tmp_path / "ws")
    run = workflow_store.list_workflow_runs(ws.engine)[0]
    assert run.status == "failed" and "nowhere.csv is missing" in run.error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_on": "ValueError"}, "retry_on takes exception classes (one or a tuple), got 'ValueError'"),
        ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
        ({"retries": -1}, "retries and retry_backoff must be >= 0"),
        ({"max_age": -5}, "max_age must be a positive number of seconds, got -5"),
        ({"resources": {"cpus": 2}}, "resources must be a distml.workflow.Resources"),
        ({"memoise": True}, "@step got unknown option(s) memoise; it takes name, memoize, max_age"),
        ({"kind": "train"}, "kind must be one of task, training, serving, got 'train'"),
        ({"kind": "training"}, 'a step of kind "training" needs spec=, a function of its arguments returning the'),
        ({"kind": "serving", "spec": 3}, 'a step of kind "serving" needs spec='),
        ({"spec": len}, 'spec= and collect= describe a "training" or "serving" step; set kind= too'),
        ({"kind": "serving", "spec": len, "collect": len}, "collect= is a function (config, result"),
    ],
)
def test_bad_step_options_are_refused_where_the_step_is_declared(options, message):
    from distml.core.errors import DistmlError
    from distml.workflow import step

    def work(x: int) -> int:
        return x

    with pytest.raises(DistmlError) as info:
        step(**options)(work)
    assert message in str(info.value)


def test_retry_on_accepts_one_exception_class():
    from distml.workflow import step

    def work(x: int) -> int:
        return x

    assert step(retry_on=KeyError)(work).policy.retry_on == (KeyError,)


def test_a_condition_that_raises_is_one_clear_error_and_a_failed_run(tmp_path):
    path = write(
        tmp_path,
        """
        from distml.workflow import step

        @step
        def score() -> float:
            return 0.5

        @step(when=lambda s: s["missing"] > 1)
        def deploy(s: float) -> str:
            return "deployed"

        def pipeline():
            return deploy(score())
        """,
    )
    out = CliRunner().invoke(main, ["--workspace", str(tmp_path / "ws"), "run", f"{path}:pipeline"])
    assert out.exit_code == 2 and out.output.count("error:") == 1, out.output
    assert "TypeError: 'float' object is not subscriptable" in out.output and "Traceback" not in out.output
    run = workflow_store.list_workflow_runs(Workspace(tmp_path / "ws").engine)[0]
    assert run.status == "failed" and "not subscriptable" in run.error


@pytest.mark.slow
def test_an_adopted_step_keeps_its_timeout_after_resume(tmp_path):
    folder = tmp_path / "marks"
    folder.mkdir()
    path = write(
        tmp_path,
        f"""
        import time
        from pathlib import Path
        from distml.workflow import step

        @step(timeout=4)
        def hang() -> int:
            Path({str(folder)!r}, "started").write_text("1")
            deadline = time.monotonic() + 40  # bounded: without the timeout the run succeeds, and fails the test
            while not Path({str(folder)!r}, "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return 1

        def pipeline():
            return hang()
        """,
    )
    ws, orchestrator = start_orchestrator(tmp_path, path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (folder / "started").exists(), "the step to start")
        run_id = workflow_store.list_workflow_runs(ws.engine)[0].run_id
        wait_for(lambda: rows_by_node(ws, run_id)["hang"][-1].pid, "the step's pid to be recorded")
        pid = rows_by_node(ws, run_id)["hang"][-1].pid
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait()
        result = resume_run(ws, run_id)  # adopts the live step; its 4 s still run out
        assert result.status == "failed"
        assert "adopted" in " ".join(result.states["hang"].history)
        assert "timed out after 4 s" in rows_by_node(ws, run_id)["hang"][-1].error
        wait_for(lambda: not pid_alive(pid), "the adopted step to be stopped", 30)
    finally:
        (folder / "go").write_text("1")
        if orchestrator.poll() is None:
            orchestrator.kill()


def test_the_logs_of_a_step_and_each_way_of_asking_for_one_that_is_not_there(tmp_path, workspace):
    from distml.workflow.logs import step_logs

    path = write(
        tmp_path,
        """
        from distml.workflow import step

        @step
        def hello() -> int:
            print("hello from the step")
            return 1

        def pipeline():
            return hello()
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline", {})
    logs = step_logs(workspace.engine, result.run_id, "hello")
    assert not logs.cached and "hello from the step" in logs.read()
    with pytest.raises(DistmlError, match="no workflow run 'nope'; `distml runs` lists them"):
        step_logs(workspace.engine, "nope", "hello")
    with pytest.raises(DistmlError, match=rf"run {result.run_id} has no step 'bye'; its steps are: hello"):
        step_logs(workspace.engine, result.run_id, "bye")
    logs.paths[0].unlink()
    out = CliRunner().invoke(main, ["--workspace", str(workspace.root), "logs", result.run_id, "hello"])
    assert out.exit_code == 2 and "was removed from the workspace" in out.output, out.output


def test_a_step_receives_its_settings_as_the_pydantic_model_it_declares(tmp_path, workspace):
    """Typed settings cross the process boundary as JSON and arrive validated, as the model."""
    path = write(
        tmp_path,
        """
        from pydantic import BaseModel, Field
        from distml.workflow import step

        class Settings(BaseModel):
            name: str
            epochs: int = Field(3, ge=1)

        @step(memoize=True)
        def train(settings: Settings, scale: int) -> dict:
            assert isinstance(settings, Settings), type(settings)
            return {"name": settings.name, "epochs": settings.epochs * scale}

        @step
        def broken(settings: Settings) -> int:
            return 1

        def pipeline(settings: Settings, bad: bool = False):
            if bad:
                return broken({"name": "x", "epochs": 0})
            return train(settings, 2)
        """,
    )
    result = run_pipeline(workspace, f"{path}:pipeline", {"settings": {"name": "cnn", "epochs": 4}})
    assert result.status == "succeeded" and result.result == {"name": "cnn", "epochs": 8}
    again = run_pipeline(workspace, f"{path}:pipeline", {"settings": {"name": "cnn", "epochs": 4}})
    assert again.states["train"].status == "cached"  # the model's JSON is its memo key
    failed = run_pipeline(workspace, f"{path}:pipeline", {"settings": {"name": "cnn"}, "bad": True})
    assert failed.status == "failed"
    error = rows_by_node(workspace, failed.run_id)["broken"][0].error
    assert "step argument settings is not a valid Settings: epochs: Input should be greater than or equal to 1" in error


def test_steps_of_a_second_workspace_in_one_process_record_into_their_own_store(tmp_path):
    """The step processes' forkserver opens the first workspace it serves ahead (its step processes
    inherit that store's engine); steps run later for another workspace from the same process
    open and write their own store, never the first one's."""
    path = write(
        tmp_path,
        """
        import os
        from distml.workflow import current, step

        @step
        def where() -> str:
            return str(current().workspace.root)

        def pipeline():
            return where()
        """,
    )
    first, second = Workspace(tmp_path / "first"), Workspace(tmp_path / "second")
    for ws in (first, second, first):
        result = run_pipeline(ws, f"{path}:pipeline")
        assert result.status == "succeeded" and result.result == str(ws.root)
        [row] = workflow_store.list_step_executions(ws.engine, result.run_id)
        assert row.status == "succeeded" and row.output_json == json.dumps(str(ws.root))
