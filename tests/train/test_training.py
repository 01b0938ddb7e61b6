"""Distributed training end to end: real `distml train` processes under torchrun on loopback.

Parity (DDP vs one process, PS sync vs allreduce), kill -9 of a worker with restarts, kill -9 of
the launcher (no process left behind), elastic membership with two launcher agents, SIGTERM
preemption, and digits accuracy.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from distml.core.errors import DistmlError
from distml.train.config import parse_config
from distml.workspace import Workspace

DIGITS_TRAIN = 1437


def cli(workspace: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "distml.cli", "--workspace", str(workspace), "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def run_cli(workspace: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = cli(workspace, *args)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def weights(workspace: Path, ref: str) -> dict[str, torch.Tensor]:
    from distml.models.artifact import load_model

    model, _ = load_model(Workspace(workspace), ref)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def result(workspace: Path, run_id: str) -> dict:
    return json.loads((workspace / "runs" / run_id / "result.json").read_text())


def sample_logs(workspace: Path, run_id: str) -> dict[tuple[int, int], dict[int, list[int]]]:
    """{(attempt, rank): {step: sample ids}} from the workers' --log-samples files."""
    logs: dict[tuple[int, int], dict[int, list[int]]] = {}
    for path in (workspace / "runs" / run_id / "samples").glob("attempt*-rank*-pid*.log"):
        attempt, rank = int(path.name.split("-")[0][7:]), int(path.name.split("-")[1][4:])
        steps = logs.setdefault((attempt, rank), {})
        for line in path.read_text().splitlines():
            step, ids = line.split(" ")
            steps[int(step)] = [int(i) for i in ids.split(",")]
    return logs


def history_of(segments: list[dict[int, dict[int, list[int]]]]) -> dict[int, list[int]]:
    """{step: ids of all ranks} as the model saw them, from the logs ({rank: {step: ids}}) of the
    attempts in the order they ran: each attempt counts up to where the next one resumed."""
    history: dict[int, list[int]] = {}
    for i, segment in enumerate(segments):
        bound = min(min(steps) for steps in segments[i + 1].values()) - 1 if i + 1 < len(segments) else None
        for steps in segment.values():
            for step, ids in steps.items():
                if bound is None or step <= bound:
                    history.setdefault(step, []).extend(ids)
    return history


def effective_history(logs: dict[tuple[int, int], dict[int, list[int]]]) -> dict[int, list[int]]:
    """{step: ids of all ranks} as the model saw them: each attempt up to where the next resumed."""
    attempts = sorted({a for a, _ in logs if any(logs[(a, r)] for r in range(8) if (a, r) in logs)})
    history: dict[int, list[int]] = {}
    for i, attempt in enumerate(attempts):
        ranks = sorted(r for a, r in logs if a == attempt)
        bound = (
            min(min(logs[(attempts[i + 1], r)]) for r in ranks_of(logs, attempts[i + 1])) - 1
            if i + 1 < len(attempts)
            else None
        )
        for r in ranks:
            for step, ids in logs[(attempt, r)].items():
                if bound is None or step <= bound:
                    history.setdefault(step, []).extend(ids)
    return history


def ranks_of(logs, attempt: int) -> list[int]:
    return sorted(r for a, r in logs if a == attempt and logs[(a, r)])


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(workspace: Path, run_id: str, attempt: int = 0) -> int:
    folder = workspace / "runs" / run_id / "samples"
    files = list(folder.glob(f"attempt{attempt}-rank*-pid*.log")) if folder.exists() else []
    return min((len(f.read_text().splitlines()) for f in files), default=0) if len(files) >= 1 else 0


def test_config_errors_are_clear():
    with pytest.raises(DistmlError, match="nnodes must be N or MIN:MAX"):
        parse_config({"parallelism": {"nnodes": "2:1", "rdzv_endpoint": "h:1"}})
    with pytest.raises(DistmlError, match="needs rdzv_endpoint"):
        parse_config({"parallelism": {"nnodes": "1:2"}})
    with pytest.raises(DistmlError, match="only to strategy 'parameter-server'"):
        parse_config({"parallelism": {"ps_shards": 2}})
    with pytest.raises(DistmlError, match=r"parallelism\.workers"):
        parse_config({"parallelism": {"workers": 0}})
    with pytest.raises(DistmlError, match=r"parallelism\.strategy"):
        parse_config({"parallelism": {"strategy": "gossip"}})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "mlp", "--model-arg", "width=abc"], "argument width must be an integer >= 1, got 'abc'"),
        (["--model-arg", "depth=2"], "unknown argument(s) 'depth'"),
        (["--dataset", "nope"], "unknown data set 'nope'; expected one of digits, fashion-mnist"),
        (["--model-arg", "in_channels=3"], "does not take the digits images (shape [28, 28])"),
        (["--model-arg", "num_classes=5"], "gives outputs of shape [2, 5] for 2 digits images; training needs [N, 10]"),
        (["--optimizer", "sgd"], "optimizer 'sgd' needs lr"),
        (["--model-arg", "nonsense"], "KEY=VALUE"),
        (["--nnodes", "1:2"], "rdzv_endpoint"),
        (
            ["--model", "nope"],
            "error: unknown model 'nope'; expected one of batch_norm, cnn, dropout, mlp or an import path of the "
            "form 'package.module:factory'",
        ),
    ],
    ids=[
        "model-arg-value",
        "model-arg-name",
        "dataset",
        "input-shape",
        "classes",
        "sgd-without-lr",
        "model-arg-form",
        "nnodes-without-endpoint",
        "model",
    ],
)
def test_bad_training_input_fails_before_any_worker_starts(tmp_path, args, message):
    """One error line and exit status 2 from the CLI, before torchrun (in-process: no interpreter to start)."""
    from click.testing import CliRunner

    from distml.cli import main

    out = CliRunner().invoke(main, ["--workspace", str(tmp_path), "train", *args, "--workers", "1", "--max-steps", "1"])
    assert out.exit_code == 2 and len(out.stderr.splitlines()) == 1, (out.exit_code, out.stderr, out.stdout)
    assert out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists(), "no worker started"


@pytest.mark.slow
@pytest.mark.heavy
def test_allreduce_and_parameter_server_match_one_process(tmp_path):
    """Two DDP workers x 32, and two PS-sync workers x 32 on two servers, see the same global
    batches as one process x 64: with plain SGD, whose step is linear in the gradient, all three
    end with the same weights. A sum of the workers' gradients instead of their mean doubles
    every step (Adam's normalisation would hide it); a lost or a repeated step shows as well.

    Tolerance: 1e-5; summation order (DDP buckets, NHWC convolutions, the servers' sum) moves
    weights by ~1e-7, and the weights move from their initial values by more than 1e-2."""
    from distml.models.zoo import build_model

    lr, steps = 0.1, 6
    common = ["--dataset", "digits", "--max-steps", str(steps), "--optimizer", "sgd", "--lr", str(lr)]
    common += ["--checkpoint-every", "3"]
    one = run_cli(tmp_path, *common, "--workers", "1", "--batch-size", "64", "--run-id", "single")
    two = run_cli(tmp_path, *common, "--workers", "2", "--batch-size", "32", "--run-id", "ddp")
    ps = run_cli(
        tmp_path, *common, "--workers", "2", "--batch-size", "32", "--strategy", "parameter-server",
        "--ps-shards", "2", "--run-id", "ps",
    )  # fmt: skip
    for out in (one, two, ps):
        assert out.returncode == 0, out.stderr[-3000:]
    # the workers use the threads distml chose, and torchrun's OMP_NUM_THREADS banner is not shown
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert "OMP_NUM_THREADS" not in two.stderr and f"{threads} threads per rank" in two.stderr, two.stderr[-3000:]
    assert result(tmp_path, "ddp")["world_size"] == 2
    assert result(tmp_path, "ps")["world_size"] == 4  # 2 servers + 2 workers
    single = weights(tmp_path, result(tmp_path, "single")["model"])
    torch.manual_seed(0)
    initial = build_model("cnn").state_dict()
    assert max(float((single[k] - initial[k]).abs().max()) for k in single) > 1e-2, "training moved the weights"
    for run in ("ddp", "ps"):
        other = weights(tmp_path, result(tmp_path, run)["model"])
        for name in single:
            torch.testing.assert_close(other[name], single[name], atol=1e-5, rtol=0, msg=f"{run}: parameter {name}")
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "ps" / "checkpoints" / "step-00000006").iterdir())
    assert checkpoints == ["ps-shard-0.pt", "ps-shard-1.pt", "trainer.pt"]


@pytest.mark.slow
@pytest.mark.heavy
def test_parameter_server_async_with_staleness_trains(tmp_path):
    out = run_cli(
        tmp_path,
        "--dataset",
        "digits",
        "--epochs",
        "6",
        "--workers",
        "2",
        "--strategy",
        "parameter-server",
        "--ps-mode",
        "async",
        "--ps-staleness",
        "1",
        "--checkpoint-every",
        "10",
        "--log-samples",
        "--run-id",
        "async",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = result(tmp_path, "async")
    assert res["steps"] == 6 * 12 and res["test_accuracy"] > 0.9
    # the bound itself: the server records, per gradient applied, the workers' steps whose updates
    # the parameters it was computed on held; none misses more than 1 step of any worker
    (log,) = (tmp_path / "runs" / "async" / "staleness").glob("attempt0-rank0-pid*.log")
    applied: dict[int, list[int]] = {1: [], 2: []}
    for line in log.read_text().splitlines():
        worker, step, held = line.split(" ")
        based_on = {int(w): int(c) for w, c in (item.split(":") for item in held.split(","))}
        assert based_on[int(worker)] == int(step) - 1, f"its own last update is missing: {line}"
        assert int(step) - 1 - min(based_on.values()) <= 1, f"a gradient staler than the bound: {line}"
        applied[int(worker)].append(int(step))
    assert applied == {1: list(range(1, 73)), 2: list(range(1, 73))}, "every gradient applied once, in order"


@pytest.mark.slow
@pytest.mark.heavy("training-faults")  # beside the training group: kills, restarts
def test_kill_9_of_a_worker_is_survived(tmp_path):
    """kill -9 one worker mid-run: torchrun restarts the workers, they resume from the latest
    checkpoint, and the run ends with the requested steps; samples lost or repeated are at
    most those since that checkpoint."""
    k, epochs = 5, 3
    proc = cli(
        tmp_path,
        "--dataset",
        "digits",
        "--workers",
        "2",
        "--batch-size",
        "32",
        "--epochs",
        str(epochs),
        "--checkpoint-every",
        str(k),
        "--max-restarts",
        "2",
        "--log-samples",
        "--run-id",
        "kill",
    )
    samples = tmp_path / "runs" / "kill" / "samples"
    wait_for(lambda: logged_steps(tmp_path, "kill") >= 37, what="37 steps")
    victim = next(samples.glob("attempt0-rank1-pid*.log"))
    os.kill(int(victim.name.split("pid")[1][:-4]), signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    steps_per_epoch = math.ceil(math.ceil(DIGITS_TRAIN / 2) / 32)
    total = epochs * steps_per_epoch
    res = result(tmp_path, "kill")
    assert res["steps"] == total
    weights(tmp_path, res["model"])  # a valid model artifact
    logs = sample_logs(tmp_path, "kill")
    assert {a for a, _ in logs} == {0, 1}, "exactly one restart"
    resumed_from = min(logs[(1, 0)]) - 1
    assert resumed_from % k == 0 and resumed_from >= 35 - k
    repeated_steps = [s for s in logs[(0, 0)] if s > resumed_from]
    assert len(repeated_steps) <= k, "only the steps since the last checkpoint are repeated"
    effective = effective_history(logs)
    assert sorted(effective) == list(range(1, total + 1)), "every step happened exactly once in the history"
    for epoch in range(epochs):
        ids = [i for s in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1) for i in effective[s]]
        counts = Counter(ids)
        assert set(counts) == set(range(DIGITS_TRAIN)), f"epoch {epoch} lost samples"
        assert sum(c - 1 for c in counts.values()) == (-DIGITS_TRAIN) % 2, "only padding repeats inside an epoch"
    # the killed rank may die between its step and its log line: count what each rank logged
    repeated_samples = sum(len(logs[(0, r)].get(s, ())) for r in (0, 1) for s in repeated_steps)
    assert repeated_samples <= k * 64


@pytest.mark.slow
@pytest.mark.heavy("training-faults")  # beside the training group: kills, restarts
def test_kill_9_of_the_launcher_leaves_no_process_behind(tmp_path):
    """kill -9 of `distml train` itself (torchrun's agent runs inside it): its ranks, forked from
    its forkserver, end themselves, and then the forkserver and the resource tracker, whose pipes
    the ranks held open, exit too: nothing of the run is left within seconds."""
    import psutil

    args = ["--dataset", "digits", "--workers", "2", "--batch-size", "32", "--epochs", "40"]
    proc = cli(tmp_path, *args, "--log-samples", "--run-id", "orphans", start_new_session=True)
    config_path = str(tmp_path / "runs" / "orphans" / "config.json")

    def of_the_run() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if config_path in " ".join(p.info["cmdline"] or ())]

    def training() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"distml train ended before training: {proc.communicate()[1][-3000:]}")
        return logged_steps(tmp_path, "orphans") >= 1

    started: list[psutil.Process] = []
    try:
        wait_for(training, 90, "a step of both ranks")
        started = psutil.Process(proc.pid).children(recursive=True) + of_the_run()
        forked = [p for p in started if "multiprocessing.forkserver" in " ".join(p.cmdline())]
        assert len(forked) >= 3, "the forkserver and the two ranks it forked"
        proc.kill()
        proc.wait(10)

        def left() -> list[psutil.Process]:
            alive = []
            for p in started + of_the_run():
                with contextlib.suppress(psutil.Error):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
            return alive

        try:
            wait_for(lambda: not left(), 10, "every process of the run to end")
        except AssertionError:
            raise AssertionError(f"left behind: {[(p.pid, p.ppid(), p.name()) for p in left()]}") from None
    finally:
        for p in started + of_the_run():
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.slow
@pytest.mark.heavy("training-faults")  # beside the training group: kills, restarts
def test_parameter_server_survives_kill_9_of_a_worker_and_a_server_then_sigterm(tmp_path):
    """Parameter servers (sync): kill -9 a worker, then (after the restart) the server; the agent
    restarts all ranks from the latest checkpoint each time. Then SIGTERM the launcher: it stops
    at a checkpoint, and the same command finishes the run. Across the three attempts and the
    second launch every step was trained exactly once and every epoch saw every sample."""
    k, epochs, steps_per_epoch = 5, 3, math.ceil(math.ceil(DIGITS_TRAIN / 2) / 32)
    total = epochs * steps_per_epoch
    args = ["--dataset", "digits", "--workers", "2", "--batch-size", "32", "--epochs", str(epochs)]
    args += ["--strategy", "parameter-server", "--checkpoint-every", str(k), "--max-restarts", "2"]
    args += ["--log-samples", "--run-id", "psfault"]
    run_dir = tmp_path / "runs" / "psfault"
    proc = cli(tmp_path, *args)  # rank 0 serves, ranks 1 and 2 train
    wait_for(lambda: logged_steps(tmp_path, "psfault") >= 12, what="12 steps")
    victim = next((run_dir / "samples").glob("attempt0-rank2-pid*.log"))
    os.kill(int(victim.name.split("pid")[1][:-4]), signal.SIGKILL)  # a worker
    wait_for(lambda: logged_steps(tmp_path, "psfault", attempt=1) >= 8, what="8 steps after the first restart")
    server = json.loads((run_dir / "metrics" / "rank-0.json").read_text())["pid"]  # attempt 1's server
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: logged_steps(tmp_path, "psfault", attempt=2) >= 8, what="8 steps after the second restart")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    from distml.train.checkpoint import latest_step

    stopped_at = latest_step(run_dir)
    first_launch = set((run_dir / "samples").iterdir())
    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert result(tmp_path, "psfault")["steps"] == total
    # the processes' logs in the order they ran: attempts 0, 1, 2 of the first launch, then the second
    segments: list[dict[int, dict[int, list[int]]]] = []
    second_launch = set((run_dir / "samples").iterdir()) - first_launch
    for attempt, files in [(0, first_launch), (1, first_launch), (2, first_launch), (0, second_launch)]:
        segment: dict[int, dict[int, list[int]]] = {}
        for path in files:
            if path.name.startswith(f"attempt{attempt}-"):
                rank = int(path.name.split("-")[1][4:])
                for line in path.read_text().splitlines():
                    step, ids = line.split(" ")
                    segment.setdefault(rank, {})[int(step)] = [int(i) for i in ids.split(",")]
        assert sorted(segment) == [1, 2], f"attempt {attempt}: both workers trained"
        segments.append(segment)
    for before, after in itertools.pairwise(segments):
        resumed_from = min(min(steps) for steps in after.values()) - 1
        last = max(max(steps) for steps in before.values())
        assert resumed_from % k == 0 and 0 <= last - resumed_from <= k, "only the steps since the checkpoint repeat"
    assert max(max(steps) for steps in segments[2].values()) == stopped_at, "SIGTERM: a checkpoint at the stop"
    assert min(min(steps) for steps in segments[3].values()) == stopped_at + 1, "SIGTERM: nothing repeated"
    history = history_of(segments)
    assert sorted(history) == list(range(1, total + 1)), "every step happened exactly once in the history"
    for epoch in range(epochs):
        span = range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
        counts = Counter(i for s in span for i in history[s])
        assert set(counts) == set(range(DIGITS_TRAIN)), f"epoch {epoch} lost samples"
        assert sum(c - 1 for c in counts.values()) == (-DIGITS_TRAIN) % 2, "only padding repeats inside an epoch"


@pytest.mark.slow
@pytest.mark.heavy("training-faults")  # beside the training group: kills, restarts
def test_elastic_agents_continue_alone_after_one_is_killed(tmp_path):
    """Two launcher agents (--nnodes 1:2, c10d on loopback) train together; killing one agent
    and its worker makes the other re-rendezvous and finish alone on the resharded data. The
    rendezvous store is the test's (bound to port 0, its port read back): both agents are its
    clients, as on a cluster whose store outlives any one node. Heartbeats every 2 s drop the
    killed node after 6 s instead of torchrun's 15 (every second could drop a live agent starved
    of CPU for 3 s on a busy machine). The rendezvous' last call stays 5 s: both agents, started
    together, must make its first round, however unequally a busy machine starts them."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    epochs = 3
    args = ["--dataset", "digits", "--workers", "1", "--batch-size", "32", "--epochs", str(epochs)]
    args += ["--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{store.port}"]
    args += ["--rdzv-keep-alive", "2"]
    args += ["--max-restarts", "3", "--checkpoint-every", "5", "--log-samples", "--run-id", "elastic"]
    first, second = cli(tmp_path, *args), cli(tmp_path, *args)

    def second_node_steps() -> int:
        if first.poll() is not None:
            raise AssertionError(f"the first agent ended before the second joined: {first.communicate()[1][-3000:]}")
        folder = tmp_path / "runs" / "elastic" / "samples"
        return sum(len(f.read_text().splitlines()) for f in folder.glob("attempt0-rank1-pid*.log"))

    wait_for(lambda: second_node_steps() >= 20, what="20 steps of the second node's worker")
    logs = sample_logs(tmp_path, "elastic")
    assert {r for _, r in logs} == {0, 1}, "both agents' workers trained together"
    import psutil

    agent = psutil.Process(second.pid)  # the agent and its worker (torchrun gives workers their own session)
    for proc in [agent, *agent.children(recursive=True)]:
        proc.kill()
    second.communicate(timeout=30)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-4000:]
    res = result(tmp_path, "elastic")
    assert res["world_size"] == 1 and res["workers"] == 1
    logs = sample_logs(tmp_path, "elastic")
    later = [key for key in logs if key[0] > 0]
    assert later and all(rank == 0 for _, rank in later), "after the loss, one worker trains alone"
    alone = logs[max(later)]
    assert max(len(ids) for ids in alone.values()) == 32, "alone, the worker takes the whole global batch"
    # the resharded run saw every sample in every epoch: nothing lost at the resize
    counts = Counter(i for ids in effective_history(logs).values() for i in ids)
    assert set(counts) == set(range(DIGITS_TRAIN)) and min(counts.values()) == epochs
    assert sum(c - epochs for c in counts.values()) <= epochs, "only the padding for equal batch counts repeats"


@pytest.mark.slow
@pytest.mark.heavy("training-faults")  # beside the training group: kills, restarts
def test_sigterm_checkpoints_and_a_restart_loses_nothing(tmp_path):
    epochs = 3
    args = [
        "--dataset",
        "digits",
        "--workers",
        "2",
        "--batch-size",
        "32",
        "--epochs",
        str(epochs),
        "--checkpoint-every",
        "50",
        "--log-samples",
        "--run-id",
        "preempt",
    ]
    proc = cli(tmp_path, *args)
    wait_for(lambda: logged_steps(tmp_path, "preempt") >= 20, what="20 steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "resume" in err
    from distml.train.checkpoint import latest_step

    stopped_at = latest_step(tmp_path / "runs" / "preempt")
    assert stopped_at is not None and stopped_at >= 20 and stopped_at % 50 != 0, "checkpoint taken at the stop"
    first = sample_logs(tmp_path, "preempt")
    assert max(max(steps) for steps in first.values()) == stopped_at, "no step after the checkpoint was lost"
    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    total = result(tmp_path, "preempt")["steps"]
    assert total == epochs * 23
    for rank in (0, 1):  # both launches together trained every step exactly once: nothing lost or repeated
        files = sorted((tmp_path / "runs" / "preempt" / "samples").glob(f"attempt0-rank{rank}-pid*.log"))
        assert len(files) == 2
        steps = [int(line.split()[0]) for f in files for line in f.read_text().splitlines()]
        assert sorted(steps) == list(range(1, total + 1))


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(120)
def test_digits_default_settings_reach_95_percent(tmp_path):
    out = run_cli(tmp_path, "--dataset", "digits")
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("test accuracy"))
    accuracy = float(line.split()[2])
    assert accuracy >= 0.95, line
    from distml.train.store import train_history

    run_id = next(p.name for p in (tmp_path / "runs").iterdir())
    history = train_history(Workspace(tmp_path).engine, run_id)
    assert len(history) == result(tmp_path, run_id)["steps"] and history[-1].loss < history[0].loss


@pytest.mark.slow
@pytest.mark.heavy
def test_lead_worker_serves_prometheus_metrics(tmp_path):
    import urllib.request

    proc = cli(
        tmp_path,
        "--dataset",
        "digits",
        "--workers",
        "2",
        "--epochs",
        "40",  # stopped by SIGTERM long before the end
        "--metrics-port",
        "0",
        "--run-id",
        "metrics",
    )
    port_file = tmp_path / "runs" / "metrics" / "metrics_port"
    wait_for(port_file.exists, what="the metrics port")
    url = f"http://127.0.0.1:{int(port_file.read_text())}/metrics"
    scrapes: list[str] = []

    def scraped_steps() -> float:
        scrapes.append(urllib.request.urlopen(url, timeout=5).read().decode())
        line = next((l for l in scrapes[-1].splitlines() if l.startswith("distml_train_step{")), None)
        return float(line.split()[-1]) if line else 0.0

    try:
        wait_for(lambda: scraped_steps() >= 10, what="10 steps visible in /metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]  # stopped at a checkpoint, as a SIGTERM asks
    body = scrapes[-1]
    step = next(l for l in body.splitlines() if l.startswith("distml_train_step{"))
    assert 'run="metrics"' in step and 'rank="0"' in step, step
    rate = [l for l in body.splitlines() if l.startswith("distml_train_samples_per_second{")]
    assert rate and float(rate[0].split()[-1]) > 0, rate
    samples = next(l for l in body.splitlines() if l.startswith("distml_train_samples_total{"))
    assert float(samples.split()[-1]) >= 10 * 64, samples  # this rank's 64 a step
    steps = [float(l.split()[-1]) for b in scrapes for l in b.splitlines() if l.startswith("distml_train_step{")]
    assert steps == sorted(steps) and steps[-1] >= 10, "the step gauge only moves forward"
