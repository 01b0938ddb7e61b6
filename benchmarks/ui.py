"""UI benchmark: server time of `distml ui`'s pages over a workspace of 10,000 pipeline runs (300,000 step
executions), 200 model versions and 10,000 training steps, p50/p99 of 200 requests each, and MLflow's tracking
server over as many runs on its own SQLite store (its runs search API and its UI's page), in the same run.
Run `python benchmarks/ui.py [--quick] [--check]`; the last stdout line is JSON; `--check` exits 1 when a target
is missed.

Server time is the wall time of one request (sent, answered, body read) from one keep-alive httpx client on the
same machine, one request at a time, after 5 untimed ones per figure. Ours: `distml --workspace WS ui --port 0`
as users start it (the URL read from its line `distml ui at http://HOST:PORT`), timed on `GET /runs` (first page
of 50), `GET /runs/{id}` (cycling over the first page's runs), `GET /models/{name}` (50 versions),
`GET /api/runs` (the same list as JSON), and, for information, a deep page of the list and the training run's
page (its 10,000-step loss and speed charts). The peer: `mlflow server` (benchmarks/peers/mlflow_tracking.py)
timed on `POST /api/2.0/mlflow/runs/search` with max_results=50 (the runs table of its UI's experiment page is
that call, made by its JavaScript in the browser) and on `GET /`, the UI's page as its server sends it (a
static HTML shell: the JS app renders everything in the browser, so this is all the server does for the page),
plus `GET /api/2.0/mlflow/runs/get` for one run. The data is written by each side's own functions and client,
untimed (see `results.setup_s`). One server on the machine at a time; the MLflow data (built once and kept
beside the peer venv) is written while ours is, both before any timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from peers import mlflow_tracking

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = 50  # the UI's page of runs; MLflow's search asks for as many
N_RUNS, QUICK_RUNS = 10_000, 2_000
STEPS_PER_RUN = mlflow_tracking.STEPS_PER_RUN  # 30: ingest, 28 trainings fanned out from it, a select
MODEL_NAMES, VERSIONS_PER_MODEL = ("cnn", "mlp", "resnet-small", "digits-cnn"), 50  # 200 versions
TRAIN_STEPS, TRAIN_BATCH = 10_000, 500  # one training run, recorded as its lead rank does: in batches
TRAIN_RUN = "train-bench-10k"
REQUESTS, QUICK_REQUESTS, WARMUP_REQUESTS = 200, 50, 5
READY_TIMEOUT_S = 120
URL_LINE = re.compile(r"distml ui at (https?://\S+)")
TARGET = "pipelines/digits.py:digits"
TARGETS = {
    "runs_page_p99_ms": {"max": 300},
    "ours_runs_page_vs_mlflow_search_p99": {"min": 3},  # MLflow's search p99 / our runs page p99
}


def log(message: str) -> None:
    print(f"[ui] {message}", file=sys.stderr, flush=True)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def distml_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DISTML_HOME", "DISTML_DB_URL")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distml_cli() -> Path:
    beside = Path(sys.executable).with_name("distml")
    return beside if beside.exists() else ROOT / ".venv" / "bin" / "distml"


# -- the data -------------------------------------------------------------------------------------------------


def step_rows(i: int, failed: bool, started: dt.datetime) -> list[dict[str, Any]]:
    """The 30 executions of run `i`, as the orchestrator records them once they ended: ingest, 28 trainings
    fanned out from it, a select over them (a failed run: its select failed)."""
    rows = []
    for k in range(STEPS_PER_RUN):
        if k == 0:
            node, step, upstream = "ingest", "ingest", []
        elif k < STEPS_PER_RUN - 1:
            node, step, upstream = f"train[{k - 1}]", "train", ["ingest"]
        else:
            node, step, upstream = "select", "select", [f"train[{j}]" for j in range(STEPS_PER_RUN - 2)]
        begin = started + dt.timedelta(seconds=k)
        status = "failed" if failed and node == "select" else ("cached" if k == 0 and i % 3 else "succeeded")
        rows.append(
            {
                "node_id": node,
                "generation": 0,
                "step_name": step,
                "status": status,
                "memo_key": f"{i:08x}{k:056x}",
                "cache": "hit" if status == "cached" else "miss",
                "inputs_json": json.dumps({"seed": i, "index": k}),
                "output_json": None if status == "failed" else json.dumps({"accuracy": 0.9 + k / 1000}),
                "error": "ValueError: no model reached the accuracy floor" if status == "failed" else None,
                "resources_json": json.dumps({"cpus": 1.0, "gpus": 0}),
                "upstream_json": json.dumps(upstream),
                "started_at": begin,
                "finished_at": begin + dt.timedelta(seconds=0.5 + k / 100),
            }
        )
    return rows


def make_workspace(root: Path, n_runs: int) -> dict[str, Any]:
    """Write the data through its owners' functions; the seconds each part took and what it names."""
    from distml.models.registry import record_model_version, set_model_alias
    from distml.train.store import record_train_run, record_train_steps
    from distml.workflow.store import add_step_executions, create_workflow_run, update_workflow_run
    from distml.workspace import Workspace

    seconds: dict[str, float] = {}
    ws = Workspace(root)
    try:
        start = time.perf_counter()
        engine = ws.engine  # created and migrated
        seconds["migrate"] = time.perf_counter() - start

        start = time.perf_counter()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        for i in range(n_runs):
            run_id = f"digits-{stamp}-{i:06d}"
            failed = i % 10 == 9
            create_workflow_run(engine, run_id, TARGET, {"epochs": 1 + i % 5, "seed": i}, {}, 4242, "bench-host")
            add_step_executions(engine, run_id, step_rows(i, failed, dt.datetime.now(dt.UTC)))
            update_workflow_run(
                engine,
                run_id,
                status="failed" if failed else "succeeded",
                error="step select failed" if failed else None,
            )
            if (i + 1) % 2000 == 0:
                log(f"ours: {i + 1} runs written in {time.perf_counter() - start:.1f}s")
        seconds["runs"] = time.perf_counter() - start

        start = time.perf_counter()
        for name in MODEL_NAMES:
            for v in range(1, VERSIONS_PER_MODEL + 1):
                version = record_model_version(
                    engine,
                    name=name,
                    manifest_digest=hashlib.sha256(f"{name}:{v}:manifest".encode()).hexdigest(),
                    weights_digest=hashlib.sha256(f"{name}:{v}:weights".encode()).hexdigest(),
                    metrics={"accuracy": 0.9 + v / 1000, "loss": 1 / v, "train_run": TRAIN_RUN},
                )
                if v % 10 == 0:
                    set_model_alias(engine, name, f"checkpoint-{v}", version)
            set_model_alias(engine, name, "production", VERSIONS_PER_MODEL - 10)
            set_model_alias(engine, name, "staging", VERSIONS_PER_MODEL)
        seconds["models"] = time.perf_counter() - start

        start = time.perf_counter()
        record_train_run(engine, TRAIN_RUN, {"model": "cnn", "epochs": 20, "ranks": 2}, status="running")
        for first in range(0, TRAIN_STEPS, TRAIN_BATCH):
            rows = [
                {
                    "step": s,
                    "epoch": s // 500,
                    "loss": 2.3 / (1 + s / 300),
                    "samples_per_s": 900.0 + s % 50,
                    "step_seconds": 0.07,
                }
                for s in range(first, min(first + TRAIN_BATCH, TRAIN_STEPS))
            ]
            record_train_steps(engine, TRAIN_RUN, rows)
        record_train_run(
            engine, TRAIN_RUN, {"model": "cnn", "epochs": 20, "ranks": 2}, status="complete", result={"accuracy": 0.97}
        )
        seconds["train_steps"] = time.perf_counter() - start
    finally:
        ws.close()
    db = root / "distml.db"
    return {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "db_mb": round(db.stat().st_size / 2**20, 1) if db.exists() else None,
    }


# -- the servers ------------------------------------------------------------------------------------------------


class Server:
    """A server process in its own process group; its stdout lines kept (the URL line) and logged to a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.lines: list[str] = []
        self.started = time.perf_counter()
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def url_line(self) -> str | None:
        for line in self.lines:
            found = URL_LINE.search(line)
            if found:
                return found.group(1).rstrip("/")
        return None

    def tail(self, limit: int = 2000) -> str:
        self._log.flush()
        text = "\n".join(self.lines[-20:]) + "\n" + self.log_path.read_text(errors="replace")
        return text[-limit:]

    def wait_ready(self, probe: str, url: str | None = None) -> str:
        """The server's base URL (`url`, or the one it prints) once `probe` answers 200 there."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
                base = url or self.url_line()
                if base:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(base + probe).status_code == 200:
                            return base
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready at {base}{probe} in {READY_TIMEOUT_S}s:\n{self.tail()}")
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM its process group (MLflow's server starts a job runner and huey consumers), SIGKILL what is
        left after 10 s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                self.proc.poll()  # reaps it: a zombie would keep the group alive
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                continue
            break
        self._log.close()

    def settle(self, window: float = 1.0, busy: float = 0.05, limit: float = 90.0) -> float:
        """Wait until its processes use under `busy` of a core over `window` seconds (at most `limit`); the
        seconds waited. MLflow's job runner and its huey consumers are still importing when /health answers."""
        start = time.perf_counter()
        before = group_cpu_seconds(self.proc.pid)
        while before is not None and time.perf_counter() - start < limit:
            time.sleep(window)
            now = group_cpu_seconds(self.proc.pid)
            if now is None or now - before < busy * window:
                break
            before = now
        return time.perf_counter() - start


def group_cpu_seconds(pgid: int) -> float | None:
    """CPU seconds used so far by the live processes of process group `pgid` (Linux /proc; None elsewhere)."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def huey_stores() -> set[Path]:
    """The folders MLflow's server makes in /dev/shm for its job queues (`tempfile.mkdtemp(dir="/dev/shm")`,
    never removed by it)."""
    shm = Path("/dev/shm")
    try:
        return {d for d in shm.glob("tmp*") if d.is_dir() and any(d.glob("*.mlflow-huey-store"))}
    except OSError:
        return set()


def ours_missing() -> str | None:
    """Why `distml ui` cannot be started here, or None."""
    done = subprocess.run(
        [str(distml_cli()), "ui", "--help"], capture_output=True, text=True, env=distml_env(), timeout=120
    )
    if done.returncode != 0:
        return f"distml ui not available (`distml ui --help` exited {done.returncode}: {done.stderr.strip()[-300:]})"
    return None


def start_ours(root: Path, tmp: Path) -> tuple[Server, str]:
    """`distml ui` on a free port (`--port 0`), its URL read from the line it prints."""
    command = [str(distml_cli()), "--workspace", str(root), "ui", "--host", "127.0.0.1", "--port", "0"]
    server = Server("ours", command, distml_env(), tmp, tmp / "ours.log")
    return server, server.wait_ready("/api/runs")


# -- timing -----------------------------------------------------------------------------------------------------


def quantiles_ms(times: list[float]) -> dict[str, float]:
    """p50 and p99 (linear interpolation between the closest ranks) and the mean, in ms."""
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000, "mean_ms": statistics.fmean(times) * 1000}


def timed(client: httpx.Client, name: str, requests: list[tuple[str, str, Any]], n: int) -> dict[str, float]:
    """Send `n` requests one at a time, cycling over `requests` (method, path, JSON body), after WARMUP_REQUESTS
    untimed ones; each must answer 200."""
    times = []
    for i in range(WARMUP_REQUESTS + n):
        method, path, body = requests[i % len(requests)]
        start = time.perf_counter()
        response = client.request(method, path, json=body)
        seconds = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{name}: {method} {path} answered {response.status_code}: {response.text[:500]}")
        if i >= WARMUP_REQUESTS:
            times.append(seconds)
    figures = quantiles_ms(times)
    log(f"{name}: p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms over {n}, load {load()}")
    return figures


def bench_ours(base: str, n_runs: int, n: int) -> dict[str, dict[str, float]]:
    with httpx.Client(base_url=base, timeout=60) as client:
        listing = client.get("/api/runs").json()
        run_ids = [run["run_id"] for run in listing["runs"]]
        if len(run_ids) != PAGE_SIZE or listing.get("total") != n_runs:
            raise RuntimeError(
                f"/api/runs listed {len(run_ids)} runs of {listing.get('total')}, not {PAGE_SIZE} of {n_runs}"
            )
        page = client.get("/runs").text
        if run_ids[0] not in page:
            raise RuntimeError(f"/runs does not show the newest run {run_ids[0]}")
        if "production" not in client.get(f"/models/{MODEL_NAMES[0]}").text:
            raise RuntimeError(f"/models/{MODEL_NAMES[0]} does not show its production alias")
        middle = max(1, n_runs // PAGE_SIZE // 2)
        return {
            "runs_page": timed(client, "ours GET /runs", [("GET", "/runs", None)], n),
            "run_page": timed(client, "ours GET /runs/{id}", [("GET", f"/runs/{r}", None) for r in run_ids], n),
            "model_page": timed(
                client, f"ours GET /models/{MODEL_NAMES[0]}", [("GET", f"/models/{MODEL_NAMES[0]}", None)], n
            ),
            "api_runs": timed(client, "ours GET /api/runs", [("GET", "/api/runs", None)], n),
            "runs_page_deep": timed(
                client, f"ours GET /runs?page={middle}", [("GET", f"/runs?page={middle}", None)], n
            ),
            "training_page": timed(
                client, f"ours GET /training/{TRAIN_RUN}", [("GET", f"/training/{TRAIN_RUN}", None)], n
            ),
        }


def bench_mlflow(base: str, experiment_id: str, n_runs: int, n: int) -> dict[str, dict[str, float]]:
    search = {"experiment_ids": [experiment_id], "max_results": PAGE_SIZE, "order_by": ["attributes.start_time DESC"]}
    with httpx.Client(base_url=base, timeout=60) as client:
        found = client.post("/api/2.0/mlflow/runs/search", json=search).json()
        runs = found.get("runs", [])
        if len(runs) != PAGE_SIZE or not found.get("next_page_token"):
            raise RuntimeError(f"MLflow's search gave {len(runs)} runs, not a first page of {PAGE_SIZE} of {n_runs}")
        if len(runs[0]["data"].get("metrics", [])) != STEPS_PER_RUN:
            raise RuntimeError(
                f"MLflow's run has {len(runs[0]['data'].get('metrics', []))} metrics, not {STEPS_PER_RUN}"
            )
        if "<html" not in client.get("/").text.lower():
            raise RuntimeError("MLflow's GET / is not its UI's page")
        run_ids = [run["info"]["run_id"] for run in runs]
        return {
            "search": timed(client, "mlflow POST runs/search", [("POST", "/api/2.0/mlflow/runs/search", search)], n),
            "ui_page": timed(client, "mlflow GET /", [("GET", "/", None)], n),
            "run_get": timed(
                client,
                "mlflow GET runs/get",
                [("GET", f"/api/2.0/mlflow/runs/get?run_id={r}", None) for r in run_ids],
                n,
            ),
        }


class MlflowData:
    """The peer's database: its template when one was built for this MLflow version and run count (nothing to
    run), else a generator process started now, writing into tmp; `finish` keeps what it wrote as the template."""

    def __init__(self, venv: Path, python: Path, version: str, n_runs: int, tmp: Path):
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.db, self.about = mlflow_tracking.template(venv, version, n_runs)
        if mlflow_tracking.template_ok(self.db, self.about, version, n_runs):
            log(f"mlflow: the {n_runs}-run database of MLflow {version} is kept from an earlier run ({self.db})")
            return
        (tmp / "mlflow-build").mkdir()
        self.building = tmp / "mlflow-build" / "mlflow.db"
        log(f"mlflow: writing {n_runs} runs with MLflow {version}'s client (kept in {self.db.parent} for next runs)")
        script = Path(mlflow_tracking.__file__)
        command = [str(python), str(script), "generate", str(self.building), str(tmp / "mlflow-artifacts"), str(n_runs)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.log_path = tmp / "mlflow-generate.log"
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=tmp, env=env)

    def finish(self) -> dict[str, Any]:
        """Wait for the generator (if any) and keep its database as the template; the template's description."""
        if self.proc is None:
            return json.loads(self.about.read_text()) | {"built_now": False}
        out, _ = self.proc.communicate()
        if self.proc.returncode != 0:
            text = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"writing MLflow's runs failed (rc {self.proc.returncode}): {text}")
        info = json.loads(out.strip().splitlines()[-1])
        self.db.parent.mkdir(parents=True, exist_ok=True)
        partial = self.db.with_suffix(".partial")
        shutil.copyfile(self.building, partial)
        partial.replace(self.db)
        self.about.write_text(json.dumps(info) + "\n")
        return info | {"built_now": True}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_RUNS} runs instead of {N_RUNS}, {QUICK_REQUESTS} timed requests per figure instead of {REQUESTS}",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--runs", type=int, default=None, help="pipeline runs on each side (overrides --quick's)")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per figure")
    parser.add_argument(
        "--peers-venv",
        type=Path,
        default=mlflow_tracking.PEERS_VENV,
        help="the environment holding mlflow (default .venv-peers, made by `make bench-peers`)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    n_runs = args.runs or (QUICK_RUNS if args.quick else N_RUNS)
    n = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    t0 = time.perf_counter()
    log(f"{'quick' if args.quick else 'full'} run: {n_runs} runs, {n} requests per figure, cores {os.cpu_count()}")

    figures: dict[str, dict[str, float]] = {}
    setup: dict[str, Any] = {}
    errors: dict[str, str] = {}
    skipped: list[str] = []
    config: dict[str, Any] = {}
    why_not_ours = ours_missing()
    ours_ok = why_not_ours is None
    python, mlflow_version = mlflow_tracking.peer_python(args.peers_venv)
    if why_not_ours:
        skipped.append(f"ours: {why_not_ours}")
        log(f"ours skipped: {why_not_ours}")
    if python is None:
        skipped.append(f"mlflow: {mlflow_version}")
        log(f"peer mlflow skipped: {mlflow_version}")

    with tempfile.TemporaryDirectory(prefix="distml-bench-ui-") as tmpdir:
        tmp = Path(tmpdir)
        # Untimed set-up: MLflow's runs written (or its kept database found) while ours are written.
        mlflow_data = None
        if python is not None:
            try:
                mlflow_data = MlflowData(args.peers_venv, python, mlflow_version, n_runs, tmp)
            except OSError as exc:
                errors["mlflow"] = f"could not start writing its runs: {exc}"
        root = tmp / "ws"
        start = time.perf_counter()
        try:
            if ours_ok:
                setup["ours"] = make_workspace(root, n_runs)
                setup["ours"]["total"] = round(time.perf_counter() - start, 1)
                log(f"ours: data written in {setup['ours']['total']}s {setup['ours']['seconds']}, load {load()}")
        except Exception as exc:  # the workspace is the setup of ours: report, go on with the peer
            errors["ours"] = f"writing the workspace failed: {exc!r}"
            ours_ok = False
        mlflow_info: dict[str, Any] | None = None
        if mlflow_data is not None:
            try:
                waited = time.perf_counter()
                mlflow_info = mlflow_data.finish()
                setup["mlflow"] = {
                    "built_now": mlflow_info["built_now"],
                    "seconds": mlflow_info["seconds"],
                    "waited_after_ours_s": round(time.perf_counter() - waited, 1),
                }
                log(f"mlflow: data ready ({setup['mlflow']})")
            except (RuntimeError, OSError, ValueError) as exc:
                errors["mlflow"] = str(exc)
                log(f"peer mlflow failed: {exc}")
            finally:
                mlflow_data.stop()

        if ours_ok:
            server = None
            try:
                server, base = start_ours(root, tmp)
                setup["ours_server_start_s"] = round(time.perf_counter() - server.started, 1)
                log(f"ours: `distml ui` ready at {base} in {setup['ours_server_start_s']}s, load {load()}")
                setup["ours_idle_wait_s"] = round(server.settle(), 1)
                figures |= bench_ours(base, n_runs, n)
            except (RuntimeError, httpx.HTTPError, ValueError, KeyError) as exc:
                errors["ours"] = str(exc)[:3000]
                log(f"ours failed: {exc}")
            finally:
                if server is not None:
                    server.stop()
            config["ours"] = (
                "`distml --workspace WS ui --host 127.0.0.1 --port 0` (its URL read from its line `distml ui at "
                "http://HOST:PORT`) over the workspace's SQLite metadata store"
            )

        if mlflow_info is not None:
            server = None
            try:
                db = tmp / "mlflow.db"
                shutil.copyfile(mlflow_data.db, db)  # the kept database stays as it was
                port = free_port()
                command = mlflow_tracking.server_command(args.peers_venv, db, tmp / "mlflow-artifacts", port)
                env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
                shm_before = huey_stores()
                server = Server("mlflow", command, env, tmp, tmp / "mlflow.log")
                base = server.wait_ready("/health", f"http://127.0.0.1:{port}")
                setup["mlflow_server_start_s"] = round(time.perf_counter() - server.started, 1)
                setup["mlflow_idle_wait_s"] = round(server.settle(), 1)
                log(
                    f"mlflow: server ready at {base} in {setup['mlflow_server_start_s']}s, its processes idle "
                    f"{setup['mlflow_idle_wait_s']}s later, load {load()}"
                )
                peer = bench_mlflow(base, mlflow_info["experiment_id"], n_runs, n)
                figures |= {f"mlflow_{k}": v for k, v in peer.items()}
            except (RuntimeError, httpx.HTTPError, OSError, ValueError, KeyError) as exc:
                errors["mlflow"] = str(exc)[:3000]
                log(f"peer mlflow failed: {exc}")
            finally:
                if server is not None:
                    server.stop()
                    for folder in huey_stores() - shm_before:  # its job queues' folder, left behind
                        shutil.rmtree(folder, ignore_errors=True)
            config["mlflow"] = (
                f"mlflow {mlflow_version} from {args.peers_venv}: "
                + " ".join(mlflow_tracking.server_command(args.peers_venv, Path("DB"), Path("ARTIFACTS"), 0)[1:])
                + " (uvicorn, its default server; one worker as ours is one process; its default job execution on:"
                " a job runner and 7 huey consumer processes beside it, whose start-up is waited out before timing)."
                f" Data: {mlflow_tracking.SHAPE}; "
                "search: POST /api/2.0/mlflow/runs/search {experiment_ids, max_results: 50, order_by: start_time "
                "DESC}, "
                "the call its experiment page's runs table makes from the browser; ui_page: GET /, the static HTML "
                "shell of its JS app (it renders the runs in the browser); run_get: GET /api/2.0/mlflow/runs/get, "
                "cycling over the first page's runs"
            )

    results: dict[str, Any] = {}
    for name, values in figures.items():
        for key, value in values.items():
            results[f"{name}_{key}"] = value
    ratios: dict[str, float] = {}
    for ours, theirs, label in (
        ("runs_page", "mlflow_search", "ours_runs_page_vs_mlflow_search"),
        ("api_runs", "mlflow_search", "ours_api_runs_vs_mlflow_search"),
        ("run_page", "mlflow_run_get", "ours_run_page_vs_mlflow_run_get"),
    ):
        for q in ("p50", "p99"):
            a, b = results.get(f"{ours}_{q}_ms"), results.get(f"{theirs}_{q}_ms")
            if a and b:
                ratios[f"{label}_{q}"] = b / a
    met: dict[str, bool] = {}
    for name, target in TARGETS.items():
        value = results.get(name, ratios.get(name))
        if value is None:
            if "ours" in errors or (name.startswith("ours_") and "mlflow" in errors):
                met[name] = False  # measured, but failed
            continue
        met[name] = value >= target["min"] if "min" in target else value <= target["max"]
        bound = f">= {target['min']:g}" if "min" in target else f"<= {target['max']:g}"
        log(f"{name}: {value:.3g} (target {bound}: {'met' if met[name] else 'MISSED'})")
    for name, value in ratios.items():
        log(f"{name}: {value:.2f} (MLflow's time / ours: > 1 favours us)")

    rounded: dict[str, Any] = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}
    rounded["setup_s"] = setup
    rounded["config"] = {
        "runs": n_runs,
        "steps_per_run": STEPS_PER_RUN,
        "step_executions": n_runs * STEPS_PER_RUN,
        "model_versions": f"{len(MODEL_NAMES)} names x {VERSIONS_PER_MODEL} (aliases: production, staging, every "
        "10th checkpoint-N)",
        "train_steps": f"{TRAIN_STEPS} steps of one training run ({TRAIN_RUN}), recorded {TRAIN_BATCH} at a time",
        "requests_per_figure": n,
        "warmup_requests": WARMUP_REQUESTS,
        "figure": "wall time of each request (sent, answered, body read) from one keep-alive httpx client on the "
        "same machine, one at a time; p50/p99 by linear interpolation between closest ranks (with 50 requests "
        "p99 sits between the two slowest)",
        "data": "ours written through the owners' functions (create_workflow_run, add_step_executions in one "
        "transaction per run, update_workflow_run; record_model_version, set_model_alias; record_train_run, "
        "record_train_steps); MLflow's through MlflowClient (create_run, log_batch, set_terminated)",
        "cpus": os.cpu_count(),
        "quick": args.quick,
        **config,
    }
    if skipped:
        rounded["skipped"] = skipped
    if errors:
        rounded["errors"] = errors
    rounded["load_average_1m_5m"] = load()
    rounded["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"done in {rounded['wall_seconds']}s")
    return {
        "benchmark": "ui",
        "results": rounded,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "targets_met": met,
    }


if __name__ == "__main__":
    report = main()
    print(json.dumps(report))
    if parse_args().check and not all(report["targets_met"].values()):
        missed = [name for name, ok in report["targets_met"].items() if not ok]
        print(f"[ui] targets missed: {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)
