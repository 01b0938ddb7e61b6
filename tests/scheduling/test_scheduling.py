"""The workspace's scheduler with real processes: gangs wait for each other, a dead holder's gang
is reclaimed, weighted fair shares hold under contention, and a high-priority `distml train`
preempts a running one that later finishes every step exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from distml.scheduling import store as sched_store
from distml.scheduling.admission import set_node, set_queue
from distml.train import store as train_store
from distml.workspace import Workspace

HOLDER = Path(__file__).with_name("gang_holder.py")


def holder(ws: Workspace, name: str, *args: str, lines: queue.Queue | None = None) -> subprocess.Popen:
    """A gang_holder process named `name`. A thread forwards each line it prints, as (name, line),
    to `lines` (a queue of its own unless given; (name, None) once it closes its stdout), so a test
    waits for a line with a timeout (`read_line`, `next_line`) instead of blocking on the pipe."""
    proc = subprocess.Popen(
        [sys.executable, str(HOLDER), str(ws.root), name, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.holder_name = name
    proc.lines = queue.Queue() if lines is None else lines

    def forward() -> None:
        for line in proc.stdout:
            proc.lines.put((name, line))
        proc.lines.put((name, None))

    threading.Thread(target=forward, name=f"lines of {name}", daemon=True).start()
    return proc


def _stderr_of(procs: list[subprocess.Popen]) -> str:
    """What `procs` wrote to stderr (each is killed first, so reading cannot block)."""
    parts = []
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        parts.append(f"--- {proc.holder_name} (exit code {proc.returncode}) stderr:\n{proc.stderr.read()[-3000:]}")
    return "\n".join(parts)


def next_line(lines: queue.Queue, procs: list[subprocess.Popen], timeout: float = 60) -> tuple[str, str]:
    """The next (holder name, line) any of `procs` (which share `lines`) prints; fails with their
    stderr when none comes within `timeout` s or one exits first."""
    try:
        name, line = lines.get(timeout=timeout)
    except queue.Empty:
        names = ", ".join(p.holder_name for p in procs)
        raise AssertionError(f"no line from {names} within {timeout:g} s\n{_stderr_of(procs)}") from None
    if line is None:
        raise AssertionError(f"{name} closed its stdout before printing the line awaited\n{_stderr_of(procs)}")
    return name, line


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The next line one holder prints (see `next_line`)."""
    return next_line(proc.lines, [proc], timeout)[1]


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def jobs(ws: Workspace, prefix: str = "") -> dict[str, dict]:
    with ws.engine.connect() as conn:
        rows = conn.execute(
            sa.select(sched_store.sched_jobs).where(sched_store.sched_jobs.c.name.like(f"{prefix}%"))
        ).all()
    return {row.name: dict(row._mapping) for row in rows}


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: a launcher's forkserver and the workers forked from it."""
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_two_gangs_that_do_not_fit_together_run_one_after_the_other(workspace, tmp_path):
    set_node(workspace.engine, cpus=3)
    release = tmp_path / "release-first"
    first = holder(workspace, "first", "--workers", "2", "--until", str(release))
    second = None
    try:
        assert read_line(first).startswith("admitted first")
        second = holder(workspace, "second", "--workers", "2")
        waiting = wait_for(
            lambda: (row := jobs(workspace).get("second-0")) and row["reason"] and row,
            what="the second gang to be told why it waits",
        )
        assert waiting["state"] == "waiting"
        assert "needs gang of 2 x 1 cpu" in waiting["reason"] and "free now: 1 cpu slots" in waiting["reason"]
        release.touch()
        assert read_line(second).startswith("admitted second")
        assert first.wait(30) == 0 and second.wait(30) == 0
        rows = jobs(workspace)
        assert rows["second-0"]["started_at"] >= rows["first-0"]["ended_at"]
        assert {r["outcome"] for r in rows.values()} == {"finished"}
    finally:
        release.touch()
        stop(first, *([second] if second else []))


def test_a_killed_holders_gang_is_reclaimed(workspace, tmp_path):
    set_node(workspace.engine, cpus=2)
    never = tmp_path / "never"
    victim = holder(workspace, "victim", "--workers", "2", "--until", str(never))
    waiter = None
    try:
        assert read_line(victim).startswith("admitted victim")
        waiter = holder(workspace, "waiter", "--workers", "2")
        wait_for(lambda: (row := jobs(workspace).get("waiter-0")) and row["reason"], what="the waiter to queue")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert read_line(waiter).startswith("admitted waiter")
        assert waiter.wait(30) == 0
        lost = jobs(workspace)["victim-0"]
        assert (lost["state"], lost["outcome"]) == ("done", "lost")
        assert "died" in lost["reason"]
    finally:
        never.touch()
        stop(victim, *([waiter] if waiter else []))


def waiting_by_queue(ws: Workspace, queues: tuple[str, ...]) -> dict[str, int]:
    """Jobs waiting in each of `queues` (0 for a queue with none)."""
    with ws.engine.connect() as conn:
        query = sa.select(sched_store.sched_jobs.c.queue, sa.func.count()).where(
            sched_store.sched_jobs.c.state == "waiting"
        )
        counts = dict(conn.execute(query.group_by(sched_store.sched_jobs.c.queue)).all())
    return {q: counts.get(q, 0) for q in queues}


@pytest.mark.slow
def test_weighted_fair_shares_hold_under_contention(workspace, tmp_path):
    """Four slots, queue `wide` (weight 2) and `narrow` (weight 1), four holders each submitting
    one-slot jobs back to back, every job held until the test releases it, the oldest first. While
    both queues have jobs waiting, each freed slot goes to the queue furthest below its weighted
    share (2.67 and 1.33 slots): wide holds 3 or 2 slots and gets 3 of every 4 admissions. Counted,
    not timed: the test frees one slot at a time, once every holder not running has its next job
    waiting. With the weights ignored each queue holds 2 slots and gets every other one (on 3 slots
    the two cannot be told apart: the core breaks equal shares by weight); FIFO ignores the queues."""
    slots = 4
    set_node(workspace.engine, cpus=slots)
    set_queue(workspace.engine, "wide", 2.0)
    set_queue(workspace.engine, "narrow", 1.0)
    repeat, measured = 8, 24
    release = tmp_path / "release"
    release.mkdir()
    lines: queue.Queue = queue.Queue()
    procs: list[subprocess.Popen] = []

    def start(name: str) -> None:
        until = str(release / f"{name}-{{index}}")
        queue_name = name.rstrip("0123456789")
        procs.append(
            holder(workspace, name, "--queue", queue_name, "--repeat", str(repeat), "--until", until, lines=lines)
        )

    running: list[str] = []  # holders whose gang runs, the first admitted first
    released = {f"{q}{i}": 0 for q in ("wide", "narrow") for i in range(4)}  # jobs each holder was told to give back

    def admitted() -> str:
        name, line = next_line(lines, procs)
        assert line.startswith(f"admitted {name} "), line
        running.append(name)
        return name

    try:
        # The slots fill two and two, one holder at a time (started together, whichever interpreters
        # came up first would take every slot, and the other queue would have nothing waiting); the
        # other holders then queue their first job behind them.
        for name in ("wide0", "narrow0", "wide1", "narrow1"):
            start(name)
            assert admitted() == name
        for name in ("wide2", "wide3", "narrow2", "narrow3"):
            start(name)
        for _ in range(measured):
            # Every holder not running has its next job in line: the pass that follows chooses between both queues.
            want = {
                q: sum(1 for p in procs if p.holder_name.startswith(q)) - sum(r.startswith(q) for r in running)
                for q in ("wide", "narrow")
            }
            wait_for(lambda want=want: waiting_by_queue(workspace, tuple(want)) == want, what=f"{want} jobs waiting")
            oldest = running.pop(0)
            (release / f"{oldest}-{released[oldest]}").touch()
            released[oldest] += 1
            admitted()
        rows = list(jobs(workspace).values())
        for name in released:  # let every holder run out of jobs
            for index in range(repeat):
                (release / f"{name}-{index}").touch()
        for proc in procs:
            assert proc.wait(120) == 0, _stderr_of([proc])
    finally:
        stop(*procs)

    # The admissions from the store's record, in order; each counts if, when its pass chose it,
    # both queues had a job waiting (submitted by then and not started before).
    started = sorted((r for r in rows if r["started_at"] is not None), key=lambda r: r["started_at"])
    assert len(started) == slots + measured
    counted = {"wide": 0, "narrow": 0}
    for admission in started[slots:]:
        t = admission["started_at"]
        waiting = {
            r["queue"] for r in rows if r["submitted_at"] <= t and (r["started_at"] is None or r["started_at"] >= t)
        }
        assert waiting == {"wide", "narrow"}, f"only {waiting} had jobs waiting when {admission['name']} started"
        counted[admission["queue"]] += 1
    share = counted["wide"] / measured
    assert 0.7 <= share <= 0.8, f"admissions while both queues waited: {counted}; weights 2:1 give wide 3 of every 4"
    done = list(jobs(workspace).values())
    assert len(done) == 8 * repeat and all(r["outcome"] == "finished" for r in done)


@pytest.mark.slow
@pytest.mark.heavy
def test_high_priority_train_preempts_and_the_victim_loses_no_step(workspace):
    set_node(workspace.engine, cpus=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = ["--dataset", "digits", "--workers", "2", "--checkpoint-every", "100000"]

    def train(run_id: str, *args: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "distml.cli", "--workspace", str(workspace.root), "train", "--run-id", run_id]
        return subprocess.Popen(
            [*command, *common, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )

    low = train("low", "--epochs", "100", "--max-steps", "40", "--batch-size", "128", "--priority", "low")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(low.stdout), daemon=True)
    reader.start()
    high = None
    paused: list[int] = []
    try:
        wait_for(lambda: any(line.startswith("step ") for line in lines), 120, "low's first steps")
        # Hold low's workers still (its launcher keeps its heartbeat) so it cannot finish before
        # high asks; they go on, and see the SIGTERM, once high has chosen low as its victim.
        paused = descendants(low.pid)
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        high = train("high", "--max-steps", "3", "--priority", "high")
        wait_for(lambda: jobs(workspace)["low"]["state"] == "preempting", 120, "high to preempt low")
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        high_out, _ = high.communicate(timeout=180)
        assert high.returncode == 0, high_out
        low.wait(240)
        reader.join(10)
        low_out = "".join(lines)
        assert low.returncode == 0, low_out
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop(low, *([high] if high else []))
    assert "low was preempted: checkpoint written" in low_out
    assert "resumed from the checkpoint of step" in low_out
    assert "high waits: preempting low" in high_out
    steps = [row.step for row in train_store.train_history(workspace.engine, "low")]
    assert steps == list(range(1, 41)), "every step of the preempted run recorded exactly once"
    rows = jobs(workspace)
    assert rows["low"]["preemptions"] == 1 and rows["low"]["outcome"] == "finished"
    assert rows["low"]["started_at"] >= rows["high"]["ended_at"], "low resumed only after high gave its gang back"


def test_a_pipeline_step_waits_for_a_gang_another_process_holds(workspace, tmp_path):
    """`distml run` asks the same scheduler: its step starts only once the other gang is gone,
    and `distml queue` says why it waits meanwhile."""
    set_node(workspace.engine, cpus=2)
    started = tmp_path / "step-started"
    pipeline = tmp_path / "pipe.py"
    pipeline.write_text(
        "from pathlib import Path\n"
        "from distml.workflow import Resources, step\n\n"
        "@step(resources=Resources(cpus=1, workers=2))\n"
        "def gang() -> int:\n"
        f"    Path({str(started)!r}).write_text('yes')\n"
        "    return 1\n\n"
        "def pipeline():\n"
        "    return gang()\n"
    )
    release = tmp_path / "release"
    other = holder(workspace, "other", "--workers", "2", "--until", str(release))
    run = None
    try:
        assert read_line(other).startswith("admitted other")
        command = [sys.executable, "-m", "distml.cli", "--workspace", str(workspace.root), "run"]
        run = subprocess.Popen(
            [*command, f"{pipeline}:pipeline", "--queue", "default", "--priority", "high"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(
            lambda: any(n.endswith("/gang") and r["reason"] for n, r in jobs(workspace).items()),
            what="the step to queue",
        )
        shown = subprocess.run(
            [*command[:-1], "queue", "--json"], capture_output=True, text=True, timeout=60, check=True
        )
        waiting = [j for j in json.loads(shown.stdout)["jobs"] if j["name"].endswith("/gang")]
        assert waiting and waiting[0]["state"] == "waiting" and "needs gang of 2 x 1 cpu" in waiting[0]["reason"]
        assert not started.exists()
        release.touch()
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0, out
        assert started.exists()
        rows = jobs(workspace)
        step_row = next(r for n, r in rows.items() if n.endswith("/gang"))
        assert step_row["started_at"] >= rows["other-0"]["ended_at"] and step_row["outcome"] == "finished"
    finally:
        release.touch()
        stop(other, *([run] if run else []))
