"""Workflow benchmark: per-step overhead of distml's orchestrator (a process per step) on 100 chained no-op steps and a
fan-out of 100, the wall time of a fully memoized `distml run` rerun, and Prefect on the same shapes (ratios: Prefect's
time / ours, > 1 favours us). Run `python benchmarks/workflow.py [--quick] [--check]`; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
N_STEPS = 100
QUICK_WARMUP_STEPS = 10  # --quick warms up on a 10-step pipeline; the full run on the measured size
FANOUT_CPUS = 0.25  # a light step declares a fraction of a cpu, as k8s millicores do
TARGETS = {
    "ours_vs_prefect_chain": {"min": 1.5},  # Prefect's per-step time / ours, same run
    "ours_vs_prefect_fanout": {"min": 1.5},
    "overhead_ms_per_step_chain": {"max": 50},
    "overhead_ms_per_step_fanout": {"max": 20},
    "memoized_rerun_s": {"max": 0.5},
}
MEMO_COMMAND = ["run", "--dataset", "digits", "--no-serve", "--epochs", "1"]
# --quick: the same pipeline and steps (ingest, train, select) with one candidate on one worker, so
# that its untimed first run fits the quick run; the rerun does what the full one does, once less per candidate
MEMO_QUICK_COMMAND = [*MEMO_COMMAND, "--param", 'models=["cnn"]', "--param", "workers=1"]

# Our pipelines, written into the temporary folder and run as `file.py:chain` / `file.py:fanout`.
OURS_PIPELINE = f"""
from distml.workflow import Resources, step


@step
def noop(previous=None):
    return 0 if previous is None else previous + 1


@step(resources=Resources(cpus={FANOUT_CPUS}))
def light(item):
    return item


@step
def gather(values):
    return len(values)


def chain(n: int = {N_STEPS}):
    result = noop()
    for _ in range(n - 1):
        result = noop(result)
    return result


def fanout(n: int = {N_STEPS}):
    return gather(light.map(range(n)))
"""

# Both contenders run as a subprocess that answers lines `SHAPE N WORKSPACE` on stdin with one JSON line on
# stdout: the wall time of that run, timed inside the contender around the call that runs the pipeline.

# Ours: `python -c OURS_DRIVER PIPELINE_FILE`. A `-c` program leaves the step processes no main module to import
# again (the forkserver's children re-run a main script as __mp_main__, which would time this file's imports and
# compilation, not the executor); `distml run`, with its own main, is timed separately (cli_ms_per_step_chain).
OURS_DRIVER = r"""
import json, os, sys, time, traceback

out = os.fdopen(os.dup(1), "w", buffering=1)  # the reply channel; whatever else prints goes to stderr
os.dup2(2, 1)
sys.stdout = sys.stderr

from distml.workflow.orchestrator import RunOptions, run_pipeline
from distml.workspace import Workspace

pipeline_file, workspaces = sys.argv[1], {}
out.write(json.dumps({"ready": True}) + "\n")
for line in sys.stdin:
    shape, n, ws_path = line.split()
    try:
        if ws_path not in workspaces:  # a fresh workspace; the orchestrator sets both variables for its steps
            os.environ.pop("DISTML_HOME", None)
            os.environ.pop("DISTML_DB_URL", None)
            workspaces[ws_path] = Workspace(ws_path)
            workspaces[ws_path].engine  # create and migrate the metadata store outside the timed run
        start = time.perf_counter()
        run = run_pipeline(workspaces[ws_path], f"{pipeline_file}:{shape}", {"n": int(n)}, RunOptions())
        seconds = time.perf_counter() - start
        if run.status != "succeeded":
            raise RuntimeError(f"run {run.run_id} {run.status}: " + "; ".join(
                f"{k}: {s.status} {s.error}" for k, s in run.states.items() if s.status != "succeeded")[:1500])
        out.write(json.dumps({"seconds": seconds, "result": run.result}) + "\n")
    except Exception:
        out.write(json.dumps({"error": traceback.format_exc()[-2000:]}) + "\n")
"""

# The Prefect peer: .venv-peers/bin/python running this as a file (Prefect reads its tasks' source), timed around
# the flow call. Chained tasks are called directly (they run in the flow's thread); the fan-out submits with
# task.map on Prefect's ThreadPoolTaskRunner and fans in on the futures.
PREFECT_PEER = r"""
import json, os, sys, time, traceback

out = os.fdopen(os.dup(1), "w", buffering=1)  # the reply channel; whatever else prints goes to stderr
os.dup2(2, 1)
sys.stdout = sys.stderr

import prefect
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner


@task
def noop(previous=None):
    return 0 if previous is None else previous + 1


@task
def light(item):
    return item


@task
def gather(values):
    return len(values)


@flow
def chain(n: int):
    result = noop()
    for _ in range(n - 1):
        result = noop(result)
    return result


@flow(task_runner=ThreadPoolTaskRunner())
def fanout(n: int):
    return gather(light.map(range(n)))


flows = {"chain": chain, "fanout": fanout}
out.write(json.dumps({"ready": True, "version": prefect.__version__}) + "\n")
for line in sys.stdin:
    shape, n, _ = line.split()  # no workspace: Prefect keeps its state in PREFECT_HOME
    try:
        start = time.perf_counter()
        result = flows[shape](int(n))
        out.write(json.dumps({"seconds": time.perf_counter() - start, "result": result}) + "\n")
    except Exception:
        out.write(json.dumps({"error": traceback.format_exc()[-2000:]}) + "\n")
"""

# Local Prefect without any outside service: no API URL (an ephemeral server with SQLite under PREFECT_HOME,
# started by the first flow call, in the warm-up), no telemetry, no UI, warnings only.
PREFECT_ENV = {
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # its 20 s default is too short on 2 busy cores
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}


def log(message: str) -> None:
    print(f"[workflow] {message}", file=sys.stderr, flush=True)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def distml_env() -> dict[str, str]:
    """This environment without a workspace or metadata store chosen from outside (the orchestrator sets both
    in its own process; each measurement picks its own temporary workspace)."""
    return {k: v for k, v in os.environ.items() if k not in ("DISTML_HOME", "DISTML_DB_URL")}


# -- the contenders --------------------------------------------------------------------------------------


class Contender:
    """A subprocess that runs `SHAPE N WORKSPACE` requests and times them (ours and each peer)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path):
        self.name = name
        self.workdir = cwd
        self.started = time.perf_counter()
        self.hello: dict[str, Any] | None = None  # its first line, once it is ready
        self.log_file = open(cwd / f"{name}.log", "w+")
        # its own process group: stopping it stops what it started (Prefect's server, our forkserver)
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.log_file.seek(0)
            raise RuntimeError(f"{self.name} exited (rc {self.proc.wait()}): {self.log_file.read()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} failed: {reply['error']}")
        return reply

    def run(self, shape: str, n: int) -> float:
        """Seconds of one run of `shape` with `n` steps (each shape in its own workspace)."""
        self.proc.stdin.write(f"{shape} {n} {self.workdir / ('ws-' + shape)}\n")
        self.proc.stdin.flush()
        if self.hello is None:
            self.hello = self._read()
        reply = self._read()
        expect = n - 1 if shape == "chain" else n
        if reply["result"] != expect:
            raise RuntimeError(f"{self.name} {shape} n={n} returned {reply['result']!r} (expected {expect})")
        return reply["seconds"]

    def close(self) -> None:
        """Stop it and all it started (every state lives in the temporary folder, removed next)."""
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log_file.close()


def start_ours(tmp: Path) -> Contender:
    home = tmp / "ours"
    home.mkdir()
    pipeline = home / "ours_pipeline.py"
    pipeline.write_text(OURS_PIPELINE)
    return Contender("ours", [sys.executable, "-c", OURS_DRIVER, str(pipeline)], distml_env(), home)


def prefect_template() -> Path | None:
    """The empty database scripts/bench-peers.sh migrated for the installed Prefect, or None."""
    venv = PEERS_PYTHON.parent.parent
    template = venv / "prefect-template"
    installed = [
        d.name[len("prefect-") : -len(".dist-info")] for d in venv.glob("lib/python3*/site-packages/prefect-*")
    ]
    try:
        stamp = (template / "VERSION").read_text().strip()
    except OSError:
        return None
    return template / "prefect.db" if installed == [stamp] and (template / "prefect.db").is_file() else None


def start_prefect(tmp: Path) -> Contender:
    home = tmp / "prefect"
    prefect_home = home / "prefect-home"
    prefect_home.mkdir(parents=True)
    template = prefect_template()
    if template is not None:
        shutil.copyfile(template, prefect_home / "prefect.db")
    else:
        log("prefect: no migrated database from `make bench-peers`; its start migrates one (about 10 s more)")
    script = home / "prefect_peer.py"
    script.write_text(PREFECT_PEER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_ENV, PREFECT_HOME=str(prefect_home))
    return Contender("prefect", [str(PEERS_PYTHON), str(script)], env, home)


def prefect_missing() -> str | None:
    """Why the Prefect peer cannot run here, or None (looked up without starting an interpreter)."""
    venv = PEERS_PYTHON.parent.parent
    if not PEERS_PYTHON.exists():
        return f"{venv} does not exist"
    if not list(venv.glob("lib/python3*/site-packages/prefect/__init__.py")):
        return f"prefect is not installed in {venv}"
    return None


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


def settle(contender: Contender, window: float = 0.5, busy: float = 0.05, limit: float = 30.0) -> float:
    """Wait until the contender's processes use under `busy` of a core over `window` seconds (at most `limit`);
    return the seconds waited. Prefect's server records a run's events in the background after the flow
    returns: the next timed run starts once that is done, as ours starts with its processes idle."""
    start = time.perf_counter()
    before = group_cpu_seconds(contender.proc.pid)
    while before is not None and time.perf_counter() - start < limit:
        time.sleep(window)
        now = group_cpu_seconds(contender.proc.pid)
        if now is None or now - before < busy * window:
            break
        before = now
    return time.perf_counter() - start


def bench(contender: Contender, repeats: int, warmup_n: int) -> tuple[dict[str, list[float]], float, list[float]]:
    """Seconds of each timed run per shape, each shape warmed up once first (untimed), the seconds from the
    contender's start to the end of its first warm-up (interpreter, imports, servers), and the seconds waited
    for it to be idle before each timed run."""
    times: dict[str, list[float]] = {}
    waits: list[float] = []
    startup = 0.0
    for shape in ("chain", "fanout"):
        contender.run(shape, warmup_n)
        if not times:
            startup = time.perf_counter() - contender.started
            log(f"{contender.name}: started and warmed up in {startup:.1f}s (untimed), load {load()}")
        times[shape] = []
        for r in range(repeats):
            waited = settle(contender)
            waits.append(round(waited, 1))
            seconds = contender.run(shape, N_STEPS)
            times[shape].append(seconds)
            per_step = seconds * 1000 / N_STEPS
            log(
                f"{contender.name} {shape} #{r + 1}: {seconds:.2f}s = {per_step:.1f} ms/step "
                f"(after {waited:.1f}s for it to be idle), load {load()}"
            )
    return times, startup, waits


# -- the memoized rerun of the end-to-end pipeline ------------------------------------------------------


def distml_cli() -> Path:
    beside = Path(sys.executable).with_name("distml")
    return beside if beside.exists() else ROOT / ".venv" / "bin" / "distml"


def cli_run(ws_path: Path, command: list[str] = MEMO_COMMAND) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time and outcome of one whole `distml --workspace WS COMMAND...` process."""
    command = [str(distml_cli()), "--workspace", str(ws_path), *command]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=distml_env(), cwd=ws_path.parent)
    return time.perf_counter() - start, done


def run_id_of(done: subprocess.CompletedProcess) -> str | None:
    for line in (done.stdout + done.stderr).splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "run" and words[-1] in ("succeeded", "failed"):
            return words[1]
    return None


def tail(done: subprocess.CompletedProcess) -> str:
    return (done.stdout + done.stderr).strip()[-800:]


def bench_memoized(tmp: Path, repeats: int, command: list[str] = MEMO_COMMAND) -> dict[str, Any]:
    """Populate the cache with one `distml run` (untimed), then time `repeats` identical reruns, each of
    which must succeed with every step a cache hit (read back from the metadata store)."""
    from distml.workflow import store as workflow_store
    from distml.workspace import Workspace

    ws_path = tmp / "ws-memo"
    ws_path.mkdir()
    first, done = cli_run(ws_path, command)
    log(f"memoized: first run {first:.1f}s (untimed, rc {done.returncode}), load {load()}")
    if done.returncode != 0:
        return {"error": f"the first run failed (rc {done.returncode}): {tail(done)}", "first_run_s": round(first, 1)}
    ws = Workspace(ws_path, f"sqlite:///{(ws_path / 'distml.db').resolve()}")
    times: list[float] = []
    failures: list[dict[str, Any]] = []
    try:
        n_steps = len(workflow_store.list_step_executions(ws.engine, run_id_of(done) or ""))
        for r in range(repeats):
            seconds, done = cli_run(ws_path, command)
            rows = workflow_store.list_workflow_runs(ws.engine, limit=1)
            run = rows[0] if rows else None
            steps = workflow_store.list_step_executions(ws.engine, run.run_id) if run else []
            statuses = sorted({row.status for row in steps})
            cached = [row for row in steps if row.status == "cached"]
            ok = done.returncode == 0 and run is not None and statuses == ["cached"] and len(cached) == n_steps > 0
            log(
                f"memoized rerun #{r + 1}: {seconds:.2f}s rc {done.returncode}, run "
                f"{run.run_id if run else None} {run.status if run else ''}, steps {statuses} "
                f"({len(cached)}/{n_steps} cached), load {load()}"
            )
            if ok:
                times.append(seconds)
            else:
                failures.append(
                    {
                        "seconds": round(seconds, 2),
                        "rc": done.returncode,
                        "run_status": run.status if run else None,
                        "steps": [f"{row.node_id} #{row.generation}: {row.status}" for row in steps],
                        "output_tail": tail(done),
                    }
                )
    finally:
        ws.close()
    out: dict[str, Any] = {"first_run_s": round(first, 1), "times_s": [round(t, 3) for t in times]}
    if failures:
        out["failed_reruns_s"] = [f["seconds"] for f in failures]
        out["error"] = (
            f"{len(failures)} of {repeats} reruns did not end with every step a cache hit; first: {failures[0]}"
        )
    return out


def bench_cli_chain(tmp: Path) -> float:
    """Seconds of one whole `distml run ours_pipeline.py:chain` process (the CLI as users start it)."""
    ws_path = tmp / "ws-cli"
    ws_path.mkdir()
    seconds, done = cli_run(ws_path, ["run", f"{tmp / 'ours' / 'ours_pipeline.py'}:chain", "--param", f"n={N_STEPS}"])
    if done.returncode != 0:
        raise RuntimeError(f"`distml run` of the chain failed (rc {done.returncode}): {tail(done)}")
    log(f"cli chain: {seconds:.2f}s = {seconds * 1000 / N_STEPS:.1f} ms/step, load {load()}")
    return seconds


# -- main ----------------------------------------------------------------------------------------------


def per_step_ms(times: list[float]) -> float:
    return min(times) * 1000 / N_STEPS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about 90 s on 2 cores: one timed run per figure instead of best of 3, warm-ups on 10 steps, the "
        "memoized rerun of the main job with one candidate on one worker (its untimed first run trains one CNN "
        "instead of three) and no `distml run` chain",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per figure, best kept (default 3, quick 1)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    warmup_n = QUICK_WARMUP_STEPS if args.quick else N_STEPS
    t0 = time.perf_counter()
    log(
        f"{'quick' if args.quick else 'full'} run: {N_STEPS} steps per pipeline, best of {repeats}, "
        f"cores {os.cpu_count()}, load {load()}"
    )

    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    skipped: list[str] = []
    peers: dict[str, str] = {}
    memo: dict[str, Any] = {}
    idle_waits: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="distml-bench-workflow-") as tmpdir:
        tmp = Path(tmpdir)
        # One contender at a time on the machine: ours, then Prefect (started after ours has stopped).
        ours = None
        try:
            ours = start_ours(tmp)
            times, _, idle_waits["ours"] = bench(ours, repeats, warmup_n)
            for shape, runs in times.items():
                results[f"overhead_ms_per_step_{shape}"] = per_step_ms(runs)
        except RuntimeError as exc:
            errors["ours"] = str(exc)
            log(f"ours failed: {exc}")
        finally:
            if ours is not None:
                ours.close()

        why = prefect_missing()
        if why is not None:
            skipped.append(f"prefect: {why}; add it with `make bench-peers` (scripts/bench-peers.sh)")
            log(f"peer prefect skipped: {why}; add it with `make bench-peers` (runs scripts/bench-peers.sh)")
        else:
            prefect = None
            try:
                prefect = start_prefect(tmp)
                times, startup, idle_waits["prefect"] = bench(prefect, repeats, warmup_n)
                results["prefect_startup_and_warmup_s"] = startup
                peers["prefect"] = prefect.hello["version"]
                for shape, runs in times.items():
                    results[f"prefect_ms_per_step_{shape}"] = per_step_ms(runs)
            except RuntimeError as exc:
                errors["prefect"] = str(exc)
                log(f"peer prefect failed: {exc}")
            finally:
                if prefect is not None:
                    prefect.close()

        if args.quick:
            skipped.append("cli_ms_per_step_chain: measured by the full run")
        else:
            try:
                results["cli_ms_per_step_chain"] = bench_cli_chain(tmp) * 1000 / N_STEPS
            except RuntimeError as exc:
                errors["cli_ms_per_step_chain"] = str(exc)
                log(str(exc))
        memo = bench_memoized(tmp, max(repeats, 3), MEMO_QUICK_COMMAND if args.quick else MEMO_COMMAND)
        if memo.get("times_s"):
            results["memoized_rerun_s"] = min(memo["times_s"])
        if "error" in memo:
            errors["memoized_rerun_s"] = memo["error"]
            log(f"memoized rerun: {memo['error']}")

    ratios: dict[str, float] = {}
    for shape in ("chain", "fanout"):
        theirs = results.get(f"prefect_ms_per_step_{shape}")
        if theirs is not None and f"overhead_ms_per_step_{shape}" in results:
            ratios[f"ours_vs_prefect_{shape}"] = theirs / results[f"overhead_ms_per_step_{shape}"]
    met: dict[str, bool] = {}
    for name, target in TARGETS.items():
        value = results.get(name, ratios.get(name))
        if value is None:
            failed = errors.get(name) or (errors.get("ours") if name.startswith("overhead_") else None)
            if failed:
                met[name] = False  # measured but failed
                log(f"{name}: FAILED ({failed[:200]})")
            continue
        met[name] = value >= target["min"] if "min" in target else value <= target["max"]
        bound = f">= {target['min']:g}" if "min" in target else f"<= {target['max']:g}"
        log(f"{name}: {value:.3g} (target {bound}: {'met' if met[name] else 'MISSED'})")
    for name, value in ratios.items():
        log(f"{name}: {value:.2f} (Prefect's time / ours: > 1 favours us)")

    rounded: dict[str, Any] = {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}
    rounded["config"] = {
        "steps": N_STEPS,
        "repeats": repeats,
        "figure": "best (min) of the timed runs, after one untimed warm-up per contender and shape; each timed run "
        "starts once the contender's processes are idle (under 5% of a core over 0.5 s, at most 30 s: Prefect's "
        "server records the previous run's events in the background after the flow returns)",
        "warmup_steps": warmup_n,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "chain": f"{N_STEPS} no-op steps, each taking the previous step's result; ms per step = wall / {N_STEPS}",
        "fanout": f"step.map over range({N_STEPS}) of a no-op step declaring Resources(cpus={FANOUT_CPUS}) (a light "
        "step declares a fraction of a cpu, as k8s millicores do), then one fan-in step; ms per step = wall / "
        f"{N_STEPS}",
        "ours": "distml.workflow.orchestrator.run_pipeline in a `python -c` subprocess (no main module for the "
        "step processes to import again), timed around run_pipeline; a fresh temporary workspace per shape (SQLite "
        "metadata store); every step in its own process forked from the forkserver, its state and JSON result "
        "written to the metadata store; admission pool: this machine's cores",
        "cli_chain": f"informational, full run only, one run: the whole `distml --workspace WS run "
        f"pipeline.py:chain --param n={N_STEPS}` process / {N_STEPS} (CLI start, live view, and each step process "
        "importing the `distml` script again as its __mp_main__)",
        "memoized_rerun": f"best of 3: wall time of the whole `distml --workspace WS "
        f"{' '.join(MEMO_QUICK_COMMAND if args.quick else MEMO_COMMAND)}` process after one untimed run filled the "
        f"cache (ingest, {'1' if args.quick else '3'} x train, select); every rerun must record each of its steps as "
        "cached in the metadata store",
        "note": "Prefect runs tasks as threads in one process (chained tasks inline in the flow's thread, the "
        "fan-out on its ThreadPoolTaskRunner) and keeps results in memory (results not persisted by default); "
        "ours runs a process per step and persists every result",
    }
    if peers:
        rounded["config"]["prefect"] = (
            f"prefect {peers['prefect']} in .venv-peers, a subprocess; @flow of direct @task calls (chain) and "
            "task.map on ThreadPoolTaskRunner() + a fan-in task on the futures (fanout); ephemeral local API "
            "server with SQLite in a temporary PREFECT_HOME (seeded with the empty migrated database "
            "scripts/bench-peers.sh prepares, when present), started during the untimed warm-up; PREFECT_API_URL "
            "unset; " + ", ".join(f"{k}={v}" for k, v in PREFECT_ENV.items())
        )
    rounded["idle_wait_s_before_each_timed_run"] = idle_waits
    if memo:
        rounded["memoized_rerun_detail"] = memo
    if skipped:
        rounded["skipped"] = skipped
    if errors:
        rounded["errors"] = errors
    rounded["load_average_1m_5m"] = load()
    rounded["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"done in {rounded['wall_seconds']}s")
    return {
        "benchmark": "workflow",
        "results": rounded,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "targets_met": met,
    }


if __name__ == "__main__":
    report = main()
    print(json.dumps(report))
    if parse_args().check and not all(report["targets_met"].values()):
        sys.exit(1)
