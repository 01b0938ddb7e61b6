"""Monitoring with real processes: every training rank and the orchestrator of `distml run` serve
Prometheus metrics that move while they work, the scheduler's metrics follow the store, and
`distml top` shows a live service (and says "unreachable" for a dead endpoint) in a real terminal.

Expositions are parsed with prometheus-client's parser; waits poll with a deadline.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from required import require_tool

from distml.scheduling.admission import pool_state
from distml.train import store as train_store
from distml.workspace import Workspace

DISTML = str(Path(sys.executable).with_name("distml"))


def wait_for(predicate, what: str, timeout: float = 60.0, log: Path | None = None, show=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    detail = f"; log:\n{log.read_text()[-3000:]}" if log else f"; screen:\n{show()}" if show else ""
    raise AssertionError(f"timed out waiting for {what}{detail}")


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} from a Prometheus text exposition."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return parse(response.text) if response.status_code == 200 else None


def value(samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items()))


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- training ranks ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.heavy
def test_every_training_rank_serves_metrics_that_move(tmp_path):
    ws = tmp_path / "ws"
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [DISTML, "--workspace", str(ws), "train", "--dataset", "digits", "--workers", "2", "--epochs", "40"]
            + ["--checkpoint-every", "1000", "--run-id", "mon"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    files = [ws / "runs" / "mon" / "metrics" / f"rank-{rank}.json" for rank in (0, 1)]
    try:
        wait_for(lambda: all(f.exists() for f in files), "both ranks' endpoint files", log=log)
        records = [json.loads(f.read_text()) for f in files]
        assert len({r["port"] for r in records}) == 2 and {r["rank"] for r in records} == {0, 1}
        assert len({r["pid"] for r in records}) == 2, "each rank is its own process with its own endpoint"

        def moving(rank: int, url: str, after: tuple[float, float] | None):
            samples = scrape(url)
            if samples is None:
                return None
            labels = {"run": "mon", "rank": str(rank)}
            step = value(samples, "distml_train_step", **labels)
            seen = value(samples, "distml_train_samples_total", **labels)
            if step < 1 or (after is not None and not (step > after[0] and seen > after[1])):
                return None
            assert value(samples, "distml_train_world_size", **labels) == 2
            assert value(samples, "distml_train_step_seconds_count", **labels) >= 1
            assert value(samples, "distml_train_samples_per_second", **labels) > 0
            assert math.isfinite(value(samples, "distml_train_loss", **labels))
            return step, seen

        for rank, record in enumerate(records):
            url = record["url"]
            first = wait_for(lambda r=rank, u=url: moving(r, u, None), f"rank {rank} training", log=log)
            wait_for(lambda r=rank, u=url, f=first: moving(r, u, f), f"rank {rank}'s step and samples to move", log=log)
    finally:
        stop(proc)
    assert proc.returncode == 143, log.read_text()[-3000:]
    assert not any(f.exists() for f in files), "a rank that exits removes its endpoint file"


# -- the orchestrator of `distml run` ------------------------------------------------------------

PIPELINE = """
import time
from pathlib import Path

from distml.workflow import step


@step(memoize=True)
def length(word: str) -> int:
    return len(word)


@step(retries=1, retry_backoff=0.05, retry_on=(ValueError,))
def hold(gate: str, lengths: list) -> int:
    tried = Path(gate + ".tried")
    if not tried.exists():
        tried.write_text("1")
        raise ValueError("the first attempt fails")
    while not Path(gate).exists():
        time.sleep(0.05)
    return sum(lengths)


def pipeline(gate: str, words: list = ["ab", "cde"]):
    return hold(gate, length.map(words))
"""


def run_held(ws: Path, pipeline: Path, gate: Path, log: Path) -> tuple[subprocess.Popen, dict, str]:
    """Start `distml run`; once the held step runs again after its retry, return the process, the
    orchestrator's metrics then and their URL (from its endpoint file)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [DISTML, "--workspace", str(ws), "run", f"{pipeline}:pipeline", "--param", f"gate={gate}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def endpoint():
        found = list((ws / "workflows").glob("*/metrics.json")) if (ws / "workflows").exists() else []
        return json.loads(found[0].read_text())["url"] if found else None

    url = wait_for(endpoint, "the orchestrator's endpoint file", log=log)

    def holding():
        samples = scrape(url)
        running = samples is not None and value(samples, "distml_workflow_steps", state="running") == 1
        return samples if running and value(samples, "distml_workflow_retries_total", step="hold") == 1 else None

    return proc, wait_for(holding, "the held step to run its second attempt", log=log), url


@pytest.mark.slow
def test_orchestrator_metrics_move_while_a_pipeline_runs(tmp_path):
    ws = tmp_path / "ws"
    Workspace(ws).engine  # noqa: B018 - migrate before the orchestrator opens the store
    pipeline = tmp_path / "held.py"
    pipeline.write_text(textwrap.dedent(PIPELINE))
    procs = []
    try:
        gate = tmp_path / "gate-1"
        proc, samples, url = run_held(ws, pipeline, gate, tmp_path / "run1.log")
        procs.append(proc)
        run = {"run": next(labels["run"] for labels, _ in samples["distml_workflow_steps"])}
        assert value(samples, "distml_workflow_steps", state="succeeded", **run) == 2
        assert value(samples, "distml_workflow_cache_lookups_total", result="miss", step="length", **run) == 2
        assert value(samples, "distml_workflow_cache_lookups_total", result="hit", **run) == 0
        assert value(samples, "distml_workflow_step_seconds_count", step="length", outcome="succeeded", **run) == 2
        assert value(samples, "distml_workflow_step_seconds_count", step="hold", outcome="retried", **run) == 1
        # the pool's state, read from the store when scraped: the held step's gang runs in queue default
        assert value(samples, "distml_scheduler_store_up") == 1
        assert value(samples, "distml_scheduler_jobs", queue="default", state="running") == 1
        assert value(samples, "distml_scheduler_pool_used", resource="cpus") == 1
        assert value(samples, "distml_scheduler_queue_weight", queue="default") == 1
        assert value(samples, "distml_scheduler_passes_total") > 0
        gate.touch()
        assert proc.wait(60) == 0, (tmp_path / "run1.log").read_text()[-3000:]
        assert scrape(url) is None and not list((ws / "workflows").glob("*/metrics.json")), "closed at the end"

        # the same words again: both lengths come from the memo cache
        proc, samples, _ = run_held(ws, pipeline, tmp_path / "gate-2", tmp_path / "run2.log")
        procs.append(proc)
        assert value(samples, "distml_workflow_cache_lookups_total", result="hit", step="length") == 2
        assert value(samples, "distml_workflow_steps", state="cached") == 2
        assert value(samples, "distml_workflow_step_seconds_count", step="length") == 0
        (tmp_path / "gate-2").touch()
        assert proc.wait(60) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    finally:
        for proc in procs:
            stop(proc)


# -- the scheduler -------------------------------------------------------------------------------


def test_scheduler_metrics_follow_passes_and_the_store(workspace, tmp_path):
    """What `distml train`'s launcher serves: this process's passes, and the pool read from the store."""
    from distml.scheduling import metrics
    from distml.scheduling.admission import Resources, SharedPool, set_node

    set_node(workspace.engine, cpus=2)
    where = tmp_path / "launcher.json"
    endpoint = metrics.serve_scheduler(functools.partial(pool_state, workspace.engine), where, run="r")
    pool = SharedPool(workspace.engine)
    try:
        url = json.loads(where.read_text())["url"]
        before = scrape(url)
        metrics.observe_pass(0.002, {"a": "running", "b": "running", "c": "preempting", "d": "lost", "e": "failed"})
        passed = scrape(url)

        def moved(name: str) -> float:
            return value(passed, name) - value(before, name)

        assert moved("distml_scheduler_pass_seconds_count") == 1
        assert moved("distml_scheduler_jobs_admitted_total") == 2
        assert moved("distml_scheduler_jobs_preempted_total") == 1
        assert moved("distml_scheduler_jobs_reclaimed_total") == 1
        assert moved("distml_scheduler_jobs_rejected_total") == 1

        assert pool.try_acquire("first", Resources(cpus=1.5)) is not None
        assert pool.try_acquire("second", Resources(cpus=1)) is None  # 0.5 cpu left: it waits
        after = scrape(url)
    finally:
        pool.close()
        endpoint.close()
    assert value(after, "distml_scheduler_passes_total") - value(passed, "distml_scheduler_passes_total") >= 2
    # the passes SharedPool ran in this process are observed: timed, and the one admission counted
    assert (
        value(after, "distml_scheduler_pass_seconds_count") - value(passed, "distml_scheduler_pass_seconds_count") >= 2
    )
    assert (
        value(after, "distml_scheduler_jobs_admitted_total") - value(passed, "distml_scheduler_jobs_admitted_total")
        == 1
    )
    assert value(after, "distml_scheduler_store_up") == 1
    assert value(after, "distml_scheduler_jobs", queue="default", state="running") == 1
    assert value(after, "distml_scheduler_jobs", queue="default", state="waiting") == 1
    assert value(after, "distml_scheduler_pool_capacity", resource="cpus") == 2
    assert value(after, "distml_scheduler_pool_used", resource="cpus") == 1.5
    assert value(after, "distml_scheduler_queue_share", queue="default") == pytest.approx(0.75)
    assert not where.exists() and scrape(url) is None, "closing stops the server and removes its file"


# -- distml top ----------------------------------------------------------------------------------


def test_top_once_says_unreachable_for_a_dead_endpoint(tmp_path):
    """Endpoint files of live processes whose ports do not answer: one frame, no crash."""
    import socket

    from distml.core.liveness import process_identity

    ws = tmp_path / "ws"
    # Bound for the whole test but never listening: connections to it are refused, and no other
    # process (another xdist worker) can take the port meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        dead = held.getsockname()[1]
        alive = {"pid": os.getpid(), "started": process_identity(os.getpid()), "host": socket.gethostname()}
        service = ws / "services" / "ghost" / "service.json"
        service.parent.mkdir(parents=True)
        service.write_text(json.dumps({**alive, "url": f"http://127.0.0.1:{dead}", "model": "cnn:1", "name": "ghost"}))
        rank = ws / "runs" / "lost" / "metrics" / "rank-0.json"
        rank.parent.mkdir(parents=True)
        rank.write_text(json.dumps({**alive, "url": f"http://127.0.0.1:{dead}/metrics", "port": dead}))
        store = Workspace(ws)  # what the lead rank stored before its endpoint stopped answering
        train_store.record_train_run(store.engine, "lost", {"model": "cnn", "dataset": "digits"}, status="running")
        step = {"epoch": 0, "loss": 0.5, "samples_per_s": 700.0, "step_seconds": 0.01}
        train_store.record_train_steps(store.engine, "lost", [{**step, "step": 6}, {**step, "step": 7, "loss": 0.25}])
        store.close()
        out = subprocess.run(
            [DISTML, "--workspace", str(ws), "top", "--once", "--interval", "0.1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("ghost" in line and "unreachable" in line for line in lines), out.stdout
    lost = [line for line in lines if "lost" in line and "unreachable" in line]
    assert lost and "cnn/digits" in lost[0] and "0.2500" in lost[0] and "700 (stored)" in lost[0], out.stdout
    assert "Pipeline runs: none yet" in out.stdout and "default" in out.stdout


def save_model(ws: Workspace):
    """A tiny untrained `mlp` artifact with the manifest serving needs (nothing is trained)."""
    import torch

    from distml.data import datasets
    from distml.data.preprocess import Normalize
    from distml.models.artifact import IMAGE_INPUT_SPEC, save_model
    from distml.models.zoo import build_model

    torch.manual_seed(0)
    normalize = Normalize("image", mean=datasets.FASHION_MNIST_MEAN, std=datasets.FASHION_MNIST_STD, scale=1 / 255)
    return save_model(
        ws,
        build_model("mlp"),
        name="mlp",
        architecture="mlp",
        arch_args={},
        input_spec=IMAGE_INPUT_SPEC,
        preprocessing={
            **datasets.pixel_serving((28, 28), datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD),
            "dataset": "fashion-mnist",
            "steps": normalize.params(),
            "key": normalize.key,
        },
        class_names=[str(i) for i in range(10)],
        metrics={"test_accuracy": 0.1},
        training={"seed": 0},
        data_fingerprint=None,
    )


@pytest.mark.slow
def test_top_shows_a_live_service_in_a_terminal(tmp_path):
    from distml.serve.service import ensure_serving, stop_service

    require_tool("tmux", "Debian: apt-get install tmux; the test runs distml top in a real terminal")
    ws = Workspace(tmp_path / "ws")
    save_model(ws)
    tmux = ["tmux", "-L", f"distml-test-{os.getpid()}"]  # a server of its own, killed at the end
    stop_load = threading.Event()
    try:
        service = ensure_serving(ws, "web", "mlp:1", {"port": 0})
        pixels = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}

        def load() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop_load.is_set():
                    client.post(f"{service['url']}/v2/models/mlp/infer", json=pixels).raise_for_status()

        # a crash stays on the screen for the failure message
        command = f"{DISTML} --workspace {ws.root} top --interval 0.5; echo distml top exited $?; sleep 600"
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "200", "-y", "50", command], check=True)

        def pane() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True).stdout

        def row(name: str) -> list[str] | None:
            services = pane().partition("Services")[2]
            line = next((line for line in services.splitlines() if f"│ {name} " in line), None)
            return [cell.strip() for cell in line.split("│")[1:-1]] if line else None

        def service_row() -> list[str] | None:
            cells = row("web")
            return cells if cells and cells[2] == "1/1" else None

        cells = wait_for(service_row, "the service with its replica ready in the pane", show=pane)
        screen = pane()
        assert cells[1] == "mlp:1" and cells[7] == service["url"], screen
        assert "Queues" in screen and "default" in screen and "Training: no run in progress" in screen, screen
        threading.Thread(target=load, daemon=True).start()

        def serving() -> list[str] | None:
            cells = row("web")
            if not cells or cells[3] in ("-", "") or float(cells[3].replace(",", "")) <= 0 or cells[4] == "-":
                return None
            return cells

        cells = wait_for(serving, "a request rate and latency under load", show=pane)
        assert float(cells[5]) >= float(cells[4]) > 0, cells  # p99 >= p50
    finally:
        stop_load.set()
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        stop_service(ws, "web")
        ws.close()
