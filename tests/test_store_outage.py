"""The metadata store goes away while a pipeline runs: PostgreSQL stopped for a few seconds and
started again, every connection of its clients dropped by the server. The run waits, says so once,
and finishes as it would have, each step and metric recorded once; a store away past the wait
ends the run with one error saying how to resume it, and resuming it once the store is back finishes it."""

from __future__ import annotations

import logging
import sys
import textwrap
import threading
import time

import psutil
import pytest
import sqlalchemy as sa
from load import Load
from pg_server import PostgresServer, find_pg_bin
from waiting import wait_for

from distml.core import HOME_ENV, db
from distml.core.db import StoreUnavailable
from distml.workflow import store as workflow_store
from distml.workflow.orchestrator import RunOptions, resume_run, run_pipeline
from distml.workflow.target import file_module_name
from distml.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.heavy("outage")]

AWAY_S = 10.0  # how long PostgreSQL stays stopped in each outage
WIDTH, METRICS = 3, 25  # writer steps, and the metrics each logs (one transaction each, 0.2 s apart)

PIPELINE = textwrap.dedent(
    f"""
    import time

    from distml.workflow import Resources, current, step


    @step(resources=Resources(cpus=0.25))
    def writer(index: int) -> int:
        ctx = current()
        for j in range({METRICS}):
            ctx.log_metric(f"m{{j:02d}}", index * 1000 + j, step=j)
            time.sleep(0.2)
        return index


    @step
    def total(values: list[int]) -> int:
        return sum(values)


    def pipeline():
        return total(writer.map(range({WIDTH})))
    """
)


@pytest.fixture
def server():
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not found")
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def pipeline_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the pipeline file's folder is put on it
    path = tmp_path / "outage_pipeline.py"
    path.write_text(PIPELINE)
    yield path
    sys.modules.pop(file_module_name(path), None)


def _workspace(tmp_path, url: str, monkeypatch) -> Workspace:
    ws = Workspace(tmp_path / "ws", url)
    monkeypatch.setenv(HOME_ENV, str(ws.root.resolve()))  # as the CLI would for its steps
    monkeypatch.setenv("DISTML_DB_URL", ws.db_url)
    return ws


def _drop_every_connection(url: str) -> int:
    """What `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE ...` does to the store's clients."""
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        dropped = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    admin.dispose()
    return int(dropped or 0)


def test_a_run_outlives_a_store_restart_and_dropped_connections(server, pipeline_file, tmp_path, monkeypatch, caplog):
    ws = _workspace(tmp_path, server.url, monkeypatch)
    dropped: list[int] = []

    def outage() -> None:
        time.sleep(2.5)  # the writers are logging
        server.halt()
        time.sleep(AWAY_S)
        server.restart()
        time.sleep(1.5)
        dropped.append(_drop_every_connection(server.url))

    trouble = threading.Thread(target=outage)
    trouble.start()
    try:
        with caplog.at_level("WARNING", logger="distml.store"):
            result = run_pipeline(ws, f"{pipeline_file}:pipeline", {}, RunOptions(cpus=2))
        trouble.join()
        errors = {n: s.error for n, s in result.states.items() if s.status != "succeeded"}
        assert result.status == "succeeded", errors
        assert result.result == sum(range(WIDTH))
        assert dropped and dropped[0] > 0, "the server dropped the clients' connections"
        assert trouble_lines(caplog) == ["unreachable", "back"], [r.getMessage() for r in caplog.records]

        run = workflow_store.get_workflow_run(ws.engine, result.run_id)
        assert run.status == "succeeded" and run.error is None
        executions = workflow_store.list_step_executions(ws.engine, result.run_id)
        assert sorted(r.node_id for r in executions) == sorted([*(f"writer[{i}]" for i in range(WIDTH)), "total"])
        assert all((r.status, r.generation, r.attempt) == ("succeeded", 0, 0) for r in executions), executions
        got = [(m.node_id, m.name, m.step) for m in workflow_store.list_step_metrics(ws.engine, result.run_id)]
        want = {(f"writer[{i}]", f"m{j:02d}", j) for i in range(WIDTH) for j in range(METRICS)}
        assert len(got) == len(set(got)), "a metric was recorded twice"
        assert set(got) == want, f"lost: {sorted(want - set(got))[:5]}"
    finally:
        trouble.join()
        ws.close()


def trouble_lines(caplog) -> list[str]:
    """The orchestrator's own store lines (steps log theirs in their processes), as what they say."""
    said = [r.getMessage() for r in caplog.records if r.name == "distml.store"]
    return ["unreachable" if "unreachable" in s else "back" if "is back" in s else s for s in said]


def test_a_store_away_past_the_wait_ends_the_run_resumable(server, pipeline_file, tmp_path, monkeypatch):
    monkeypatch.setattr(db, "STORE_WAIT_S", 2.0)  # the orchestrator's engine (its steps keep the default)
    ws = _workspace(tmp_path, server.url, monkeypatch)
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    def away_for_good() -> None:  # and the steps die with it: the orchestrator has to record that
        server.halt()
        for child in psutil.Process().children(recursive=True):
            if child.pid not in before:
                child.kill()

    threading.Timer(3.0, away_for_good).start()
    try:
        with pytest.raises(StoreUnavailable) as stopped:
            run_pipeline(ws, f"{pipeline_file}:pipeline", {}, RunOptions(cpus=2))
        message = str(stopped.value)
        assert "unreachable for 2 s" in message, message
        assert "resume it with distml run --resume " in message, message
        run_id = message.rsplit("distml run --resume ", 1)[1].split()[0].rstrip(";.,)")
        server.restart()  # the store is back: what the message says works
        result = resume_run(ws, run_id)
        assert (result.status, result.result) == ("succeeded", sum(range(WIDTH))), result.states
        executions = workflow_store.list_step_executions(ws.engine, run_id)
        done = sorted(r.node_id for r in executions if r.status == "succeeded")
        assert done == sorted([*(f"writer[{i}]" for i in range(WIDTH)), "total"]), executions
    finally:
        for child in psutil.Process().children(recursive=True):  # the steps still waiting for the store
            if child.pid not in before:
                child.kill()
        ws.close()


# -- a service under load while its store goes away -------------------------------------------


def _save_cnn(ws: Workspace, seed: int) -> None:
    """A tiny untrained cnn registered in the workspace's store (as tests/serve/conftest.py saves them)."""
    import torch

    from distml.data import datasets
    from distml.models.artifact import IMAGE_INPUT_SPEC, save_model
    from distml.models.zoo import build_model

    torch.manual_seed(seed)
    save_model(
        ws, build_model("cnn"), name="cnn", architecture="cnn", arch_args={}, input_spec=IMAGE_INPUT_SPEC,
        preprocessing={
            **datasets.pixel_serving((28, 28), datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD),
            "dataset": "fashion-mnist",
        },
        class_names=[str(i) for i in range(10)], metrics={}, training={"seed": seed}, data_fingerprint=None,
    )  # fmt: skip


def _clients(url: str) -> int:
    """How many connections other than this one the store has."""
    admin = sa.create_engine(url)
    with admin.connect() as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        count = conn.execute(sa.text(query)).scalar()
    admin.dispose()
    return int(count or 0)


def _deployments(ws: Workspace) -> list[str]:
    from distml.lineage import store as lineage_store

    t = lineage_store.executions
    with ws.engine.connect() as conn:
        return list(conn.execute(sa.select(t.c.name).where(t.c.type == lineage_store.DEPLOYMENT)).scalars())


def test_a_service_answers_every_request_while_its_store_restarts_and_drops_it(server, tmp_path, monkeypatch):
    from distml.serve.admin import GatewayAdmin
    from distml.serve.service import ensure_serving, stop_service

    started = time.monotonic()
    ws = _workspace(tmp_path, server.url, monkeypatch)
    _save_cnn(ws, 0)
    _save_cnn(ws, 1)
    print(f"timeline: models saved in {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    served = ensure_serving(ws, "web", "cnn:1", {"port": 0})
    print(f"timeline: serving after {time.monotonic() - started:.1f} s")
    load = None
    try:
        load = Load(served["url"], clients=3)
        wait_for(lambda: len(load.versions_since(0)) >= 30, "answers before the outage")
        server.halt()
        halted = time.monotonic()
        wait_for(lambda: len(load.versions_since(halted)) >= 30, "answers while the store is away")
        time.sleep(max(0.0, halted + AWAY_S - time.monotonic()))
        server.restart()
        back = time.monotonic()
        wait_for(lambda: len(load.versions_since(back)) >= 20, "answers after the restart")
        wait_for(lambda: _clients(server.url) > 0, "the service to connect again (its scheduler heartbeat)")
        print(f"timeline: away {back - halted:.1f} s, back and reconnected after {time.monotonic() - back:.1f} s")
        assert _drop_every_connection(server.url) > 0, "the service held connections to the store"
        dropped = time.monotonic()
        wait_for(lambda: len(load.versions_since(dropped)) >= 20, "answers after the dropped connections")

        with GatewayAdmin(served["url"]) as admin:  # a hot deploy on the store just back: cnn:2 beside cnn:1
            admin.deploy("cnn", 2, canary_percent=30)
            deployed = time.monotonic()
            print(f"timeline: deployed in {deployed - dropped:.1f} s")
            assert sorted(admin.loaded_models()) == ["cnn:1", "cnn:2"]
            assert admin.snapshot()["traffic"] == {"cnn": {"1": 70.0, "2": 30.0}}
        wait_for(lambda: {"1", "2"} <= set(load.versions_since(deployed)), "answers of both versions")
        load.close()
        assert load.failed == [], f"{len(load.failed)} failed of {len(load.answers)}: {load.failed[:3]}"
        print(f"answered {len(load.answers)}, failed {len(load.failed)}, until {time.monotonic() - started:.1f} s")
        # the gateway still records what it serves: cnn:2's deployment, written after the outage
        wait_for(lambda: "web serves cnn:2" in _deployments(ws), "cnn:2's deployment in the store", 30)
    finally:
        if load is not None:
            load.close()
        stop_service(ws, "web")
        ws.close()


# -- a watch's cycle while its store goes away ------------------------------------------------

TRAINED = "trained.log"  # one line per run of the stand-in training step

CYCLE = textwrap.dedent(
    """
    import os
    import time

    from distml.workflow import current, step  # noqa: E402 (TRAINED_LOG comes first)


    @step
    def train_candidate(watch: dict, train_files: list[str]) -> dict:
        started = time.time()
        with open(TRAINED_LOG, "a") as log:
            log.write(f"{os.getpid()} {len(train_files)}\\n")
        for epoch in range(20):  # the store stops meanwhile: each metric is a transaction
            current().log_metric("loss", 1.0 / (epoch + 1), step=epoch)
            time.sleep(0.25)
        return {"model": f"{watch['name']}:1", "started": started}


    @step
    def judge(candidate: dict) -> dict:
        evaluation = {"started": time.time(), "candidate": {"holdout": 0.5}, "production": None}
        return {"action": "kept", "model": candidate["model"], "reason": "a stand-in", "evaluation": evaluation}


    def cycle(watch, cycle, train_files, newest_files, production=None):
        return judge(train_candidate(watch, train_files))
    """
)


def test_a_watch_cycle_outlives_a_store_restart_and_trains_its_arrival_once(server, tmp_path, monkeypatch, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distml.data.datasets import _read_bundled_digits
    from distml.pipelines import continuous
    from distml.pipelines import watches as watch_store

    ws = _workspace(tmp_path, server.url, monkeypatch)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images, labels = _read_bundled_digits()
    flat = pa.array(list(images[:200].reshape(200, 64)), type=pa.list_(pa.uint8()))
    pq.write_table(pa.table({"image": flat, "label": labels[:200]}), inbox / "wave1.parquet")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cycle file's folder is put on it
    trained = tmp_path / TRAINED  # named in the file: a forkserver started earlier has an older environment
    (tmp_path / "outage_cycle.py").write_text(f"TRAINED_LOG = {str(trained)!r}\n{CYCLE}")
    monkeypatch.setattr(continuous, "CYCLE_TARGET", f"{tmp_path / 'outage_cycle.py'}:cycle")
    monkeypatch.setattr(continuous, "CYCLE_MODULE", "json")  # its forkserver preloads torch only
    config = continuous.parse_watch_config(
        {"name": "w", "source": str(inbox), "dataset": "digits", "workspace": str(ws.root), "max_cycles": 1}
    )
    said: list[str] = []
    watcher = continuous.Watcher(ws, config, say=said.append)

    def outage() -> None:
        wait_for(lambda: trained.exists(), "the training step to start", 60)
        time.sleep(1.0)  # it is logging its metrics
        server.halt()
        time.sleep(AWAY_S)
        server.restart()

    trouble = threading.Thread(target=outage)
    trouble.start()
    try:
        with caplog.at_level("WARNING", logger="distml.store"):
            watcher.run()
        trouble.join()
        store_log = logging.getLogger("distml.store")
        assert trouble_lines(caplog) == ["unreachable", "back"], (caplog.records, store_log.disabled, said)
        assert [line.split()[1] for line in trained.read_text().splitlines()] == ["1"], "trained once, on one file"
        [row] = watch_store.list_cycles(ws.engine, "w")
        assert (row.cycle, row.status, row.candidate) == (1, "kept", "w:1"), (row, said)
        assert [(a.key, a.status, a.cycle) for a in watch_store.list_arrivals(ws.engine, "w")] == [
            ("wave1.parquet", "trained", 1)
        ]
        executions = workflow_store.list_step_executions(ws.engine, row.run_id)
        assert sorted((r.node_id, r.status, r.attempt) for r in executions) == [
            ("judge", "succeeded", 0),
            ("train_candidate", "succeeded", 0),
        ]
        got = [m.step for m in workflow_store.list_step_metrics(ws.engine, row.run_id)]
        assert sorted(got) == list(range(20)), "each metric once"
        assert not [line for line in said if "failed" in line], said
    finally:
        trouble.join()
        sys.modules.pop(file_module_name(tmp_path / "outage_cycle.py"), None)
        ws.close()
