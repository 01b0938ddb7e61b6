"""The workspace's scheduler with real processes: gangs wait for each other, a dead holder's gang
is reclaimed, weighted fair shares hold under contention, and a high-priority `distml train`
preempts a running one that later finishes every step exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from distml.ops import metadata as md
from distml.ops.admission import set_node, set_queue
from distml.workspace import Workspace

HOLDER = Path(__file__).with_name("gang_holder.py")


def holder(ws: Workspace, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HOLDER), str(ws.root), name, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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
        rows = conn.execute(sa.select(md.sched_jobs).where(md.sched_jobs.c.name.like(f"{prefix}%"))).all()
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
        assert first.stdout.readline().startswith("admitted first")
        second = holder(workspace, "second", "--workers", "2")
        waiting = wait_for(
            lambda: (row := jobs(workspace).get("second-0")) and row["reason"] and row,
            what="the second gang to be told why it waits",
        )
        assert waiting["state"] == "waiting"
        assert "needs gang of 2 x 1 cpu" in waiting["reason"] and "free now: 1 cpu slots" in waiting["reason"]
        release.touch()
        assert second.stdout.readline().startswith("admitted second")
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
        assert victim.stdout.readline().startswith("admitted victim")
        waiter = holder(workspace, "waiter", "--workers", "2")
        wait_for(lambda: (row := jobs(workspace).get("waiter-0")) and row["reason"], what="the waiter to queue")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert waiter.stdout.readline().startswith("admitted waiter")
        assert waiter.wait(30) == 0
        lost = jobs(workspace)["victim-0"]
        assert (lost["state"], lost["outcome"]) == ("done", "lost")
        assert "died" in lost["reason"]
    finally:
        never.touch()
        stop(victim, *([waiter] if waiter else []))


def test_weighted_fair_shares_hold_under_contention(workspace):
    """Three slots, queue `big` (weight 2) and `small` (weight 1), four processes each submitting
    one-slot jobs back to back: while both queues wait, big holds two slots and small one."""
    set_node(workspace.engine, cpus=3)
    set_queue(workspace.engine, "big", 2.0)
    set_queue(workspace.engine, "small", 1.0)
    procs = [
        holder(workspace, f"{queue}{i}", "--queue", queue, "--repeat", "6", "--hold", "0.3")
        for queue in ("big", "small")
        for i in range(4)
    ]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    finally:
        stop(*procs)
    rows = list(jobs(workspace).values())
    assert len(rows) == 48 and all(r["outcome"] == "finished" for r in rows)
    # Contention lasts until the first queue runs out of jobs to submit.
    end = min(max(r["ended_at"] for r in rows if r["queue"] == q) for q in ("big", "small"))
    begin = sorted(r["started_at"] for r in rows)[2]  # all three slots taken
    held = {q: 0.0 for q in ("big", "small")}
    for r in rows:
        overlap = min(r["ended_at"], end) - max(r["started_at"], begin)
        if overlap > 0:
            held[r["queue"]] += overlap
    ratio = held["big"] / held["small"]
    assert 1.6 <= ratio <= 2.5, f"slot-seconds big/small under contention {ratio:.2f}, weights say 2.0 ({held})"


@pytest.mark.slow
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
    steps = [row["step"] for row in md.train_history(workspace.engine, "low")]
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
        assert other.stdout.readline().startswith("admitted other")
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
