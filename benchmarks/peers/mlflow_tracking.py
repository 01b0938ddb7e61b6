"""The MLflow peer of benchmarks/ui.py: MLflow's tracking server over its own SQLite store, holding as many runs
as the distml workspace the benchmark serves, each run of a comparable shape.

Two halves in one file. The benchmark (distml's venv) imports it for `peer_python`, `template`, `generate` and
`server_command`; the peer's data is written by `PEERS_VENV/bin/python benchmarks/peers/mlflow_tracking.py
generate DB ARTIFACTS N` (mlflow is a peer dependency, never distml's), so nothing at module level imports mlflow.

The shape of one run, against one distml pipeline run of 30 step executions: one MLflow run in one experiment,
its run name, a `target` tag (the pipeline's target), 2 params (the pipeline's parameters), 30 metrics (one
value each: a step's duration, as each of our 30 step executions has its own start and end), status FINISHED
(every 10th FAILED, as every 10th of ours), written through MLflow's own client (`MlflowClient.create_run`,
`log_batch` of the params and metrics, `set_terminated`) straight into the SQLite file, not through the server.
Setting it up is untimed: the client's writes run with `PRAGMA synchronous=OFF` and an in-memory journal (per
connection: the file the server later opens keeps MLflow's default rollback journal), about 15 ms a run on 2
cores, so the benchmark builds the database once per MLflow version and run count and keeps it beside the peer
venv (`template`), as scripts/bench-peers.sh keeps Prefect's migrated database.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"
EXPERIMENT = "distml-bench-ui"
STEPS_PER_RUN = 30
SHAPE = "v1: name, target tag, 2 params, 30 metrics, every 10th FAILED"  # a new shape makes new templates


def installed_version(venv: Path) -> str | None:
    """MLflow's version in `venv`, from its metadata folder (no interpreter started), or None."""
    found = sorted(venv.glob("lib/python3*/site-packages/mlflow-*.dist-info"))
    return found[0].name[len("mlflow-") : -len(".dist-info")] if found else None


def peer_python(venv: Path = PEERS_VENV) -> tuple[Path | None, str]:
    """The venv's python and MLflow's version, or (None, why not: a message naming `make bench-peers`)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None, f"{venv} does not exist; run `make bench-peers` to create it"
    version = installed_version(venv)
    if version is None or not (venv / "bin" / "mlflow").exists():
        return None, f"mlflow is not installed in {venv}; run `make bench-peers`"
    return python, version


def template(venv: Path, version: str, runs: int) -> tuple[Path, Path]:
    """Where the database of `runs` runs for MLflow `version` is kept, and its description (JSON)."""
    folder = venv / "mlflow-template"
    stem = f"mlflow-{version}-runs{runs}"
    return folder / f"{stem}.db", folder / f"{stem}.json"


def template_ok(db: Path, about: Path, version: str, runs: int) -> bool:
    try:
        info = json.loads(about.read_text())
    except (OSError, ValueError):
        return False
    return db.is_file() and info.get("version") == version and info.get("runs") == runs and info.get("shape") == SHAPE


def server_command(venv: Path, db: Path, artifacts: Path, port: int) -> list[str]:
    """`mlflow server` over the SQLite file, one worker process (as `distml ui` is one process), on 127.0.0.1."""
    return [
        str(venv / "bin" / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--default-artifact-root",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


# -- the peer half: runs under PEERS_VENV/bin/python -------------------------------------------------------------


def generate(db: Path, artifacts: Path, runs: int) -> dict:
    """Write `runs` runs into a new SQLite store at `db` with MLflow's client; what was written, and how long."""
    import mlflow
    import sqlalchemy as sa
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    store = client._tracking_client.store  # its SqlAlchemyStore: the database is created and migrated here

    def fast_setup(dbapi_conn, _record):  # untimed set-up only: nothing of it persists in the file
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("PRAGMA journal_mode=MEMORY")
        cursor.close()

    sa.event.listen(store.engine, "connect", fast_setup)
    store.engine.dispose()
    experiment = client.create_experiment(EXPERIMENT, artifact_location=str(artifacts))
    migrated = time.perf_counter() - start
    target = "pipelines/digits.py:digits"
    for i in range(runs):
        ms = int(time.time() * 1000)
        run = client.create_run(experiment, start_time=ms, tags={"target": target}, run_name=f"digits-{i:06d}")
        metrics = [Metric(f"step_{k:02d}_seconds", 0.5 + 0.01 * k, ms, 0) for k in range(STEPS_PER_RUN)]
        params = [Param("epochs", str(1 + i % 5)), Param("seed", str(i))]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id, "FAILED" if i % 10 == 9 else "FINISHED", end_time=ms + 1000)
    store.engine.dispose()
    return {
        "version": mlflow.__version__,
        "runs": runs,
        "shape": SHAPE,
        "experiment_id": experiment,
        "migrate_s": round(migrated, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "generate":
        sys.exit("usage: mlflow_tracking.py generate DB ARTIFACTS RUNS")
    print(json.dumps(generate(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))), flush=True)
