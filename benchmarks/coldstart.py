"""Cold-start benchmark: `distml serve cnn --autoscale 0:2`, idle until its last replica has stopped, then one V2
request timed to its answer (p50/p99 over 20 cold starts, quick 5), beside KServe's ModelServer timed from process
start to its first answer. Run `python benchmarks/coldstart.py [--quick] [--check]`; the last stdout line is JSON.
"Idle" includes the service's warm interpreter (`serve.warmpool`) having finished its imports, as it has after any
idle period longer than the 1 s windows used here; `warm_wait_max_s` reports how long that took at most.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import serving  # the KServe peer (KSERVE_SERVER, its version pin) and the process helpers
from serving import Server, check_kserve_version, free_port, spawn, stop_all

from distml.core.liveness import pid_alive

MODEL = "cnn"
TARGETS = {"ours_p99_s": {"max": 1.0}}
SCALE_TO_ZERO_AFTER_S = 1.0  # how long the service idles before its last replica stops (not part of the timing)
STABLE_WINDOW_S = 1.0  # the autoscaler's windows, short so that it scales down within the benchmark
PANIC_WINDOW_S = 1.0
REQUEST_TIMEOUT_S = 60.0
POLL_S = 0.02  # KServe: the first-answer poll interval
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log(message: str) -> None:
    print(f"[coldstart] {message}", file=sys.stderr, flush=True)


def post(url: str, body: bytes, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.read()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def summary(times: list[float], failed: int, n: int) -> dict[str, Any]:
    ok = np.asarray(times)
    return {
        "p50_s": float(np.percentile(ok, 50)) if len(ok) else None,
        "p99_s": float(np.percentile(ok, 99)) if len(ok) else None,
        "max_s": float(ok.max()) if len(ok) else None,
        "failed": failed,
        "n": n,
    }


# -- ours: a scale-to-zero service ------------------------------------------------------------------


def start_service(ws: Path, tmp: Path) -> tuple[Server, str]:
    """`distml serve cnn --autoscale 0:2 --port 0`; its URL from the line it prints when ready."""
    cmd = [
        sys.executable,
        "-m",
        "distml.cli",
        "--workspace",
        str(ws),
        "serve",
        MODEL,
        "--autoscale",
        "0:2",
        "--scale-to-zero-after",
        str(SCALE_TO_ZERO_AFTER_S),
        "--stable-window",
        str(STABLE_WINDOW_S),
        "--panic-window",
        str(PANIC_WINDOW_S),
        "--port",
        "0",
        "--name",
        f"bench-coldstart-{os.getpid()}",
    ]
    server = spawn("ours", cmd, tmp)
    server.service_dir = ws / "services" / f"bench-coldstart-{os.getpid()}"
    deadline = time.monotonic() + 120
    while True:
        text = server.log_path.read_text(errors="replace")
        found = re.search(r"serving \S+ at (http://\S+)", text)
        if found:
            return server, found.group(1)
        if server.proc.poll() is not None:
            raise RuntimeError(f"distml serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"distml serve printed no URL in time:\n{server.log_tail()}")
        time.sleep(0.05)


def wait_zero(server: Server, url: str, deadline: float) -> float:
    """Until /admin/replicas lists no replica (none ready, none starting) and every replica process seen has exited,
    then until each group's warm interpreter, if it has one, is ready (imported): at rest, as after an idle period
    longer than this benchmark's short windows. Returns the seconds of that second wait."""
    seen: set[int] = set()
    zero_at = None
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"distml serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        snap = get_json(f"{url}/admin/replicas")
        replicas = [r for g in snap["groups"] for r in g["replicas"]]
        seen.update(r["pid"] for r in replicas if r.get("pid"))
        ready = sum(g["ready"] for g in snap["groups"])
        if not replicas and ready == 0 and not any(pid_alive(pid) for pid in seen):
            zero_at = zero_at or time.monotonic()
            if all(g.get("warm_pid") is None or g.get("warm_ready") for g in snap["groups"]):
                return time.monotonic() - zero_at
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not scale to zero in time: {snap}")
        time.sleep(0.1)


def replica_phases(log_path: Path, sent_wall: float) -> dict[str, float] | None:
    """From a replica's log: seconds from the request to its uvicorn start (process start and imports), its model
    load (the `loaded ... seconds=` line) and from the request to `ready`; None when the lines are missing."""
    stamps: dict[str, float] = {}
    load_s = None
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            m = LOG_TIME.match(line)
            if not m:
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if "Started server process" in line:
                stamps.setdefault("started", t)
            elif "event=loaded " in line:
                stamps.setdefault("loaded", t)
                found = re.search(r"seconds=([\d.]+)", line)
                load_s = float(found.group(1)) if found else None
            elif "event=ready " in line:
                stamps.setdefault("ready", t)
    if not {"started", "ready"} <= stamps.keys():
        return None
    return {
        "to_uvicorn_started_s": stamps["started"] - sent_wall,
        "model_load_s": load_s if load_s is not None else float("nan"),
        "to_ready_s": stamps["ready"] - sent_wall,
    }


def replica_logs(server: Server) -> set[Path]:
    """The service's replica logs; a warm interpreter's log (warm-N.log) is renamed to its replica's when it
    becomes one."""
    return {p for p in server.service_dir.glob("*/*.log") if not p.name.startswith("warm-")}


def warm_replicas(url: str) -> int:
    """How many of the service's replicas started from a warm interpreter."""
    snap = get_json(f"{url}/admin/replicas")
    return sum(1 for g in snap["groups"] for r in g["replicas"] if r.get("warm"))


def run_ours(ws: Path, tmp: Path, body: bytes, n: int) -> tuple[dict[str, Any], list[dict[str, float]], Server]:
    server, url = start_service(ws, tmp)
    log(f"distml serve up at {url} (pid {server.proc.pid}); {n} cold starts")
    infer = f"{url}/v2/models/{MODEL}/infer"
    times: list[float] = []
    phases: list[dict[str, float]] = []
    failed = warm = 0
    warm_waits: list[float] = []
    try:
        for i in range(n):
            warm_waits.append(wait_zero(server, url, time.monotonic() + 120))
            logs_before = replica_logs(server)
            sent_wall, t0 = time.time(), time.perf_counter()
            try:
                answer = json.loads(post(infer, body))
                assert answer["outputs"][0]["shape"] == [1, 10], answer
            except (OSError, urllib.error.URLError, ValueError, KeyError, AssertionError) as exc:
                failed += 1
                log(f"ours cold start {i + 1}/{n}: FAILED {type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - t0
            times.append(elapsed)
            warm += warm_replicas(url)
            new_logs = sorted(replica_logs(server) - logs_before)
            phase = replica_phases(new_logs[0], sent_wall) if len(new_logs) == 1 else None
            if phase:
                phases.append(phase)
            detail = (
                f" (replica uvicorn up +{phase['to_uvicorn_started_s']:.2f} s,"
                f" model load {phase['model_load_s']:.2f} s, ready +{phase['to_ready_s']:.2f} s)"
                if phase
                else ""
            )
            log(f"ours cold start {i + 1}/{n}: {elapsed:.3f} s{detail}")
    except BaseException:
        stop_all([server])
        raise
    # warm_starts: answered by a replica that was the warm interpreter; warm_wait_max_s: the longest wait, after
    # the last replica had stopped, for the warm interpreter to finish its imports
    extra = {"warm_starts": warm, "warm_wait_max_s": max(warm_waits, default=0.0)}
    return {**summary(times, failed, n), **extra}, phases, server


# -- KServe: process start to first answer ---------------------------------------------------------


def run_kserve(ws: Path, tmp: Path, body: bytes, n: int, threads: int) -> dict[str, Any]:
    """Each of n KServe ModelServer processes (serving.py's peer) timed from Popen to the first 200 of a V1 predict
    request sent every POLL_S until one is answered (no readiness wait in between), then stopped."""
    times: list[float] = []
    failed = 0
    for i in range(n):
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict"
        t0 = time.perf_counter()
        server = spawn(
            f"kserve-{i}",
            [sys.executable, "-c", serving.KSERVE_SERVER, str(ws), MODEL, MODEL, str(port), str(threads)],
            tmp,
        )
        try:
            deadline = t0 + REQUEST_TIMEOUT_S
            while True:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"exited with {server.proc.returncode}:\n{server.log_tail()}")
                with contextlib.suppress(OSError, urllib.error.URLError):
                    answer = json.loads(post(url, body, timeout=REQUEST_TIMEOUT_S))
                    assert len(answer["predictions"]) == 1, answer
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"no answer in {REQUEST_TIMEOUT_S:g} s:\n{server.log_tail()}")
                time.sleep(POLL_S)
            elapsed = time.perf_counter() - t0
            times.append(elapsed)
            log(f"kserve cold start {i + 1}/{n}: {elapsed:.3f} s")
        except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
            failed += 1
            log(f"kserve cold start {i + 1}/{n}: FAILED {exc}")
        finally:
            stop_all([server], timeout=10)
    return summary(times, failed, n)


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 cold starts per contender instead of 20")
    parser.add_argument("--n", type=int, default=None, help="cold starts per contender (default 20, quick 5)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="OMP/MKL threads of every server process, the same for both, as in serving.py (default 1; 0: default)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target in TARGETS is missed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kserve_version = check_kserve_version()
    n = args.n or (5 if args.quick else 20)
    if args.torch_threads > 0:  # inherited by the gateway's replicas and the KServe processes
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.torch_threads)
    signal.signal(signal.SIGTERM, serving.interrupted)  # a SIGTERM still stops the servers
    t_start = time.perf_counter()
    image = np.random.default_rng(0).integers(0, 256, size=(28, 28))
    v2 = json.dumps(
        {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": image.reshape(-1).tolist()}]}
    ).encode()
    v1 = json.dumps({"instances": [image.tolist()]}).encode()

    with tempfile.TemporaryDirectory(prefix="distml-bench-coldstart-") as tmpdir:
        tmp = Path(tmpdir)
        ws = tmp / "ws"
        serving.make_workspace(ws, dataset="digits")
        ours, phases, service = run_ours(ws, tmp, v2, n)
        stop_all([service])
        log(f"kserve {kserve_version}: {n} process starts")
        kserve = run_kserve(ws, tmp, v1, n, args.torch_threads)

    def mean(key: str) -> float | None:
        values = [p[key] for p in phases if p.get(key) == p.get(key)]
        return float(np.mean(values)) if values else None

    ratio = kserve["p50_s"] / ours["p50_s"] if ours["p50_s"] and kserve["p50_s"] else None
    met = {"ours_p99_s": ours["p99_s"] is not None and ours["p99_s"] <= TARGETS["ours_p99_s"]["max"]}
    met["ours_p99_s"] = met["ours_p99_s"] and ours["failed"] == 0
    report = {
        "benchmark": "coldstart",
        "model": MODEL,
        "quick": args.quick,
        "kserve_version": kserve_version,
        "torch_threads": args.torch_threads,
        "results": {"ours": ours, "kserve": kserve, "ours_p99_s": ours["p99_s"], "ours_p50_s": ours["p50_s"]},
        # ours, mean over the cold starts, from the replica logs: request -> replica's uvicorn started (spawn and
        # imports), its model load, request -> its ready line; the rest of the time is the gateway noticing it
        # and the forwarded request
        "ours_phases_mean_s": {k: mean(k) for k in ("to_uvicorn_started_s", "model_load_s", "to_ready_s")},
        "ratios": {"ours_vs_kserve_p50": ratio},
        "targets": TARGETS,
        "targets_met": met,
        "wall_s": time.perf_counter() - t_start,
    }
    return report


if __name__ == "__main__":
    report = main()
    print(json.dumps(report))
    if parse_args().check and not all(report["targets_met"].values()):
        missed = [name for name, ok in report["targets_met"].items() if not ok]
        print(f"[coldstart] targets missed: {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)
