"""Serving benchmark: closed-loop req/s, p50/p99 latency at concurrency 1/16/64, `cnn`, one 28x28 image per V1 request,
for a distml replica with batching off and on, the distml gateway over 2 replicas, KServe's model server and Ray Serve
on the same weights. Run `python benchmarks/serving.py [--quick] [--check]`; the last stdout line is JSON; `--check`
exits 1 when a target is missed.

Three comparisons in one run. Two against the same KServe peer (the pinned KSERVE_VERSION, the same model
preparation as a distml replica: `optimize_for_serving`'s channels_last weights, the manifest's `Preprocessing`,
the same torch thread count): like for like, `ours_batching_off` (one request per forward pass: per-request
overhead only) vs KServe; and our defaults (`ours_batching_on`: ReplicaConfig's batching defaults) vs KServe's
defaults (its Python ModelServer has no server-side batching). Our replicas and gateway start as
`distml serve` starts them: from ReplicaConfig / ServeConfig JSON files, never argv flags. The third: our
batching replica vs Ray Serve (benchmarks/peers/rayserve.py, run from `.venv-peers`; skipped with a message
naming `make bench-peers` when that venv or ray is missing) with `@serve.batch` at the same max batch size and
delay, one replica behind Serve's HTTP proxy, both sent the same V2 infer JSON body (`ours_batching_on_v2` vs
`rayserve`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from peers import rayserve as serving_rayserve

from distml.serve.config import TOKEN_ENV, ReplicaConfig, ServeConfig

MODEL = "cnn"
KSERVE_VERSION = "0.21.0"  # the KServe peer is pinned to this version (the one the results report)
# label -> (server, request protocol); the V2 levels send the V2 infer JSON body, the others V1 predict
CONTENDERS = {
    "ours_batching_off": ("ours_batching_off", "v1"),
    "ours_batching_on": ("ours_batching_on", "v1"),
    "ours_batching_on_v2": ("ours_batching_on", "v2"),
    "ours_gateway2": ("ours_gateway2", "v1"),
    "kserve": ("kserve", "v1"),
    "rayserve": ("rayserve", "v2"),
}
# label -> concurrencies; quick mode keeps c64 for every label and c1 for ours/kserve
CONCURRENCY = {name: (1, 16, 64) for name in CONTENDERS}
QUICK_CONCURRENCY = {name: (64,) for name in CONTENDERS} | {"ours_batching_on": (1, 64), "kserve": (1, 64)}
TARGETS = {
    "ours_nobatch_vs_kserve_rps_c64": {"min": 1.5},  # like for like: per-request overhead
    "ours_vs_kserve_rps_c64": {"min": 3.0},  # our defaults vs KServe's defaults
    "ours_vs_kserve_p99_c64": {"max": 0.5},
    "ours_vs_rayserve_rps_c64": {"min": 2.0},  # both batching, same V2 body
    "ours_vs_rayserve_p99_c64": {"max": 0.5},
}
# The Ray Serve peer (benchmarks/peers/rayserve.py, run by .venv-peers): a local Ray sized to the machine's
# cores, one replica holding one of them, room for every request of the c64 level at the replica.
RAY_MAX_ONGOING_REQUESTS = 256
RAY_REPLICA_NUM_CPUS = 1
RAY_OBJECT_STORE_BYTES = 256 * 2**20  # the smallest sensible store: requests never go through it
DEFAULT_BATCH_SIZE = ReplicaConfig.model_fields["max_batch_size"].default
DEFAULT_BATCH_DELAY_MS = ReplicaConfig.model_fields["max_batch_delay_ms"].default
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
REQUEST_TIMEOUT_S = 30.0
N_IMAGES = 16  # distinct request bodies, cycled by every worker

# KServe's Python model server around the same artifact, prepared as a distml replica prepares it
# (run with `python -c`): `optimize_for_serving` (channels_last conv weights), the manifest's
# `Preprocessing`, the same torch thread count (argv threads, 0: library default; the OMP/MKL
# variables are inherited as by our replicas). argv: workspace, model ref, model name, http port,
# threads. gRPC and every per-request log line (latency logging, the timing middleware's trace
# lines, uvicorn's access log) are off: distml's replica writes no line per request either.
KSERVE_SERVER = r"""
import logging, sys
import numpy as np, torch, kserve
from distml.models.artifact import load_model
from distml.serve.model import Preprocessing, optimize_for_serving
from distml.workspace import Workspace

workspace, ref, name, port, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if threads > 0:
    torch.set_num_threads(threads)


class DistmlModel(kserve.Model):
    def __init__(self):
        super().__init__(name)
        ws = Workspace(workspace)
        model, manifest = load_model(ws, ref)
        ws.close()
        self.preprocessing = Preprocessing.from_manifest(manifest, ref)  # the replica's own normalisation
        self.shape = self.preprocessing.input_shape
        self.model = optimize_for_serving(model, self.shape, ref)  # the replica's own model preparation
        self.class_names = list(manifest["class_names"])
        self.ready = True

    def predict(self, payload, headers=None):
        raw = np.asarray(payload["instances"], dtype=np.float32).reshape(-1, *self.shape)
        x = self.preprocessing.apply(raw)
        with torch.inference_mode():
            p = torch.softmax(self.model(torch.from_numpy(x)), dim=1).numpy()
        return {"predictions": [{"label": int(k), "class": self.class_names[int(k)], "probabilities": row.tolist()}
                                for k, row in zip(p.argmax(axis=1), p.astype(np.float64))]}


server = kserve.ModelServer(http_port=port, workers=1, enable_grpc=False, enable_latency_logging=False)
for quiet in ("uvicorn.access", "kserve.trace"):
    logging.getLogger(quiet).disabled = True
print(f"torch threads {torch.get_num_threads()}", file=sys.stderr, flush=True)
server.start([DistmlModel()])
"""


def log(message: str) -> None:
    print(f"[serving] {message}", file=sys.stderr, flush=True)


def check_kserve_version() -> str:
    """The installed kserve version; refuses to run unless it is KSERVE_VERSION."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("kserve")
    except PackageNotFoundError:
        installed = None
    if installed != KSERVE_VERSION:
        found = "kserve is not installed" if installed is None else f"kserve {installed} is installed"
        raise SystemExit(
            f"[serving] error: this benchmark compares against kserve {KSERVE_VERSION}, the version its results "
            f"report, but {found}. Install it (`pip install kserve=={KSERVE_VERSION}`), or re-check the KServe "
            "peer on the new version and update KSERVE_VERSION in benchmarks/serving.py."
        )
    return installed


# -- the model artifact and the requests ---------------------------------------------------------


def make_workspace(root: Path, dataset: str = "fashion-mnist") -> None:
    """`cnn` v1: zoo weights (seed 0), untrained, with the serving preprocessing a training run on
    `dataset` (fashion-mnist or digits) records."""
    import torch

    from distml.data import datasets
    from distml.models.artifact import IMAGE_INPUT_SPEC, save_model
    from distml.models.zoo import build_model
    from distml.workspace import Workspace

    mean, std, classes = {
        "fashion-mnist": (datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD, CLASSES),
        "digits": (datasets.DIGITS_MEAN, datasets.DIGITS_STD, [str(d) for d in range(10)]),
    }[dataset]
    ws = Workspace(root)
    try:
        torch.manual_seed(0)
        serving = datasets.pixel_serving((28, 28), mean, std)
        save_model(
            ws,
            build_model(MODEL),
            name=MODEL,
            architecture=MODEL,
            arch_args={},
            input_spec=IMAGE_INPUT_SPEC,
            preprocessing={**serving, "dataset": dataset},
            class_names=classes,
            metrics={},
            training={"seed": 0},
            data_fingerprint=None,
        )
    finally:
        ws.close()


def make_bodies(seed: int) -> tuple[np.ndarray, list[bytes], list[bytes]]:
    """Raw 0..255 pixel images and their V1 ({"instances": [image]}) and V2 request bodies."""
    images = np.random.default_rng(seed).integers(0, 256, size=(N_IMAGES, 28, 28))
    v1 = [json.dumps({"instances": [img.tolist()]}).encode() for img in images]
    v2 = [
        json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": img.reshape(-1).tolist()}]}
        ).encode()
        for img in images
    ]
    return images, v1, v2


# -- server processes -------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int | None = None
    v1_url: str = ""
    v2_url: str = ""
    service_dir: Path | None = None  # a gateway's: its replicas' logs are shown on failure too

    def log_tail(self, limit: int = 3000) -> str:
        replica_logs = sorted(self.service_dir.glob("*/*.log")) if self.service_dir else []
        tails = []
        for path in [self.log_path, *replica_logs]:
            with contextlib.suppress(OSError):
                text = path.read_bytes()[-limit:].decode("utf-8", "replace")
                tails.append(text if path == self.log_path else f"--- replica log {path.name}:\n{text}")
        return "\n".join(tails)


def spawn(name: str, cmd: list[str], tmp: Path) -> Server:
    """Start a server process, its output to tmp/NAME.log; no bearer token (TOKEN_ENV) reaches it, so
    every contender answers unauthenticated requests."""
    log_path = tmp / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(name, proc, log_path)


def start_replica(name: str, workspace: Path, tmp: Path, **settings: Any) -> tuple[Server, Path]:
    """A replica from its own ReplicaConfig file: `python -m distml.serve.server CONFIG.json`."""
    port_file = tmp / f"{name}.port"
    config = ReplicaConfig(
        workspace=str(workspace), models=[MODEL], port=0, port_file=str(port_file), log_level="warning", **settings
    )
    config_path = tmp / f"{name}.json"
    config_path.write_text(config.model_dump_json(indent=2))
    return spawn(name, [sys.executable, "-m", "distml.serve.server", str(config_path)], tmp), port_file


def start_gateway(name: str, workspace: Path, tmp: Path, replicas: int) -> tuple[Server, Path]:
    """A gateway from a ServeConfig file (`python -m distml.serve.gateway CONFIG.json`), as `distml serve`
    writes it: the replica template at its defaults (batching included), a service name of its own."""
    port_file = tmp / f"{name}.port"
    config = ServeConfig(
        name=f"bench-serving-{os.getpid()}-{name}",
        replica=ReplicaConfig(workspace=str(workspace), models=[MODEL], port=0, log_level="warning"),
        replicas=replicas,
        port=0,
        port_file=str(port_file),
        log_level="warning",
    )
    config_path = tmp / f"{name}.json"
    config_path.write_text(config.model_dump_json(indent=2))
    server = spawn(name, [sys.executable, "-m", "distml.serve.gateway", str(config_path)], tmp)
    server.service_dir = config.service_dir()
    return server, port_file


def start_rayserve(workspace: Path, tmp: Path, args: argparse.Namespace) -> tuple[Server | None, Path | None, str]:
    """The Ray Serve peer (benchmarks/peers/rayserve.py) on the artifact's own safetensors file and manifest
    normalisation, `@serve.batch` with the batching-on replica's size and delay; (None, None, why) when the
    peers venv or ray is missing."""
    from distml.models.artifact import resolve_model
    from distml.serve.model import Preprocessing
    from distml.workspace import Workspace

    python, versions = serving_rayserve.peer_python()
    if python is None:
        return None, None, str(versions)
    ws = Workspace(workspace)
    try:
        record = resolve_model(ws, MODEL)
        weights = ws.artifacts.path(record.weights_digest)
    finally:
        ws.close()
    pre = Preprocessing.from_manifest(record.manifest, MODEL).describe()
    port_file = tmp / "rayserve.port"
    spec = serving_rayserve.write_spec(
        tmp / "rayserve.json",
        model_name=MODEL,
        model_version=record.version,
        weights=str(weights),
        class_names=record.manifest["class_names"],
        input_shape=pre["input_shape"],
        scale=pre["scale"],
        mean=pre["mean"],
        std=pre["std"],
        torch_threads=args.torch_threads,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.max_batch_delay_ms / 1000.0,
        max_ongoing_requests=RAY_MAX_ONGOING_REQUESTS,
        replica_num_cpus=RAY_REPLICA_NUM_CPUS,
        ray_num_cpus=os.cpu_count() or 1,
        object_store_bytes=RAY_OBJECT_STORE_BYTES,
        port=free_port(),
        port_file=str(port_file),
    )
    log_path = tmp / "rayserve.log"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    proc = serving_rayserve.start(python, spec, log_path, env)
    return Server("rayserve", proc, log_path), port_file, ", ".join(f"{k} {v}" for k, v in versions.items())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def wait_port_file(server: Server, port_file: Path, deadline: float) -> None:
    while not port_file.exists():
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} wrote no port file in time:\n{server.log_tail()}")
        time.sleep(0.05)
    server.port = int(port_file.read_text())


def wait_http_ready(server: Server, url: str, deadline: float) -> None:
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} not ready at {url} in time:\n{server.log_tail()}")
        time.sleep(0.1)


def stop_all(servers: list[Server], timeout: float = 15.0) -> None:
    """SIGTERM every server (the gateway retires its replicas), SIGKILL what is left after `timeout`."""
    for server in servers:
        if server.proc.poll() is None:
            with contextlib.suppress(OSError):
                server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for server in servers:
        try:
            server.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"{server.name} ignored SIGTERM for {timeout:g} s; killing it")
            server.proc.kill()
            server.proc.wait()


# -- the load generator --------------------------------------------------------------------------


@dataclass
class Tally:
    """One contender at one concurrency, summed over its interleaved slices."""

    latencies: list[float] = field(default_factory=list)  # seconds, answered inside a measured window
    window_s: float = 0.0
    answered: int = 0  # every 200, warm-up and tail included (for CPU per request)
    failures: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        self.first_error = self.first_error or detail[:300]

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000.0
        ok = len(lat)
        out = {
            "rps": ok / self.window_s if self.window_s else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if ok else None,
            "p99_ms": float(np.percentile(lat, 99)) if ok else None,
            "requests": ok,
            "failures": sum(self.failures.values()),
            "server_cpu_ms_per_req": 1000 * self.server_cpu_s / self.answered if self.answered else None,
            "client_cpu_ms_per_req": 1000 * self.client_cpu_s / self.answered if self.answered else None,
        }
        if self.failures:
            out.update(failure_kinds=self.failures, first_error=self.first_error)
        return out


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its live descendants (the gateway's replicas), from /proc."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


async def closed_loop(
    session, url: str, bodies: list[bytes], concurrency: int, warmup: float, duration: float, tally: Tally, pid: int
) -> None:
    """`concurrency` workers, each sending its next request as soon as the previous one answered.

    Requests answered inside [warmup, warmup + duration] count towards req/s and the latency
    percentiles; failures and CPU per request are counted over the whole slice (warm-up and tail too).
    """
    import aiohttp

    headers = {"content-type": "application/json"}
    now = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    cpu0, client0 = tree_cpu_seconds(pid), time.process_time()
    start = now()
    window_start, window_end = start + warmup, start + warmup + duration

    async def worker(index: int) -> None:
        i = index
        while now() < window_end:
            body = bodies[i % len(bodies)]
            i += 1
            sent = now()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                tally.fail(type(exc).__name__, f"{type(exc).__name__}: {exc}")
                continue
            done = now()
            if status != 200:
                tally.fail(f"http_{status}", f"HTTP {status}: {payload[:200]!r}")
                continue
            tally.answered += 1
            if window_start <= done <= window_end:
                tally.latencies.append(done - sent)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    tally.window_s += duration
    tally.server_cpu_s += tree_cpu_seconds(pid) - cpu0
    tally.client_cpu_s += time.process_time() - client0


async def check_answers(session, servers: dict[str, Server], body_v1: bytes, body_v2: bytes) -> dict[str, float]:
    """Every contender answers the same image with the same probabilities (same weights, same normalisation):
    max |p - p_kserve| per server and protocol (the Ray Serve peer answers the V2 request only)."""
    headers = {"content-type": "application/json"}
    probabilities = {}
    for name, server in servers.items():
        if server.v1_url:
            async with session.post(server.v1_url, data=body_v1, headers=headers) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"{name}: V1 predict answered {resp.status}: {text[:500]}")
                probabilities[name] = np.asarray(json.loads(text)["predictions"][0]["probabilities"])
        if server.v2_url:
            async with session.post(server.v2_url, data=body_v2, headers=headers) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"{name}: V2 infer answered {resp.status}: {text[:500]}")
                out = {o["name"]: o for o in json.loads(text)["outputs"]}
                probabilities[f"{name}_v2"] = np.asarray(out["probabilities"]["data"])
    reference = probabilities["kserve"]
    return {name: float(np.abs(p - reference).max()) for name, p in probabilities.items() if name != "kserve"}


async def run_load(
    servers: dict[str, Server],
    plan: list[tuple[str, str, int]],
    bodies: dict[str, list[bytes]],
    rounds: int,
    warmup: float,
    duration: float,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Each (label, server, concurrency) level of `plan` gets `rounds` slices of `duration / rounds`
    seconds; the slices of one concurrency run round-robin across contenders, so a noisy spell on a
    shared machine lands on all of them rather than on one."""
    import aiohttp

    tallies: dict[tuple[str, int], Tally] = {}
    # keepalive below every server's idle close (uvicorn default 5 s: the gateway) so no request
    # meets a connection the server just closed.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        diffs = await check_answers(session, servers, bodies["v1"][0], bodies["v2"][0])
        log("max |p - p_kserve| for image 0: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        if max(diffs.values()) > 1e-4:
            raise RuntimeError(f"contenders disagree with KServe on the same image: {diffs}")
        for c in sorted({c for _, _, c in plan}):
            level = [(label, contender) for label, contender, cc in plan if cc == c]
            for _ in range(rounds):
                for label, contender in level:
                    server = servers[contender]
                    v2 = CONTENDERS[label][1] == "v2"
                    tally = tallies.setdefault((label, c), Tally())
                    await closed_loop(
                        session,
                        server.v2_url if v2 else server.v1_url,
                        bodies["v2" if v2 else "v1"],
                        c,
                        warmup,
                        duration / rounds,
                        tally,
                        server.proc.pid,
                    )
            for label, _ in level:
                r = tallies[(label, c)].summary()
                p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
                p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
                cpu = "-" if r["server_cpu_ms_per_req"] is None else f"{r['server_cpu_ms_per_req']:.2f}"
                log(
                    f"{label:<20} c{c:<3} {r['rps']:8.1f} req/s  p50 {p50:>7} ms  p99 {p99:>7} ms  "
                    f"server CPU {cpu:>5} ms/req  failures {r['failures']}"
                    + (f" ({r['first_error']})" if r["failures"] else "")
                )
    results: dict[str, dict[str, Any]] = {}
    for (label, c), tally in tallies.items():
        results.setdefault(label, {})[f"c{c}"] = tally.summary()
    return results, diffs


def event_loop_factory():
    try:
        import uvloop

        return uvloop.new_event_loop, "uvloop"
    except ImportError:  # pragma: no cover
        return None, "asyncio"


def interrupted(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="end within about 60 s on 2 cores (Ray Serve's start-up is most of it): 2 s per load level in 2 "
        "slices instead of 10 s in 5, and only c64 (every contender) and c1 (ours_batching_on, kserve) instead "
        "of c1/c16/c64 for all",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds measured per contender and concurrency (default 10, quick 2)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="slices each duration is cut into, run round-robin across contenders (default 5, quick 2)",
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="untimed seconds before each slice (default 0.5, quick 0.2)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="OMP/MKL threads of every server process, the same for all (default 1; 0: library "
        "default, one per core, which oversubscribes 2 cores shared with the load generator)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"batching-on replica (default: ReplicaConfig's default, {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=DEFAULT_BATCH_DELAY_MS,
        help=f"batching-on replica (default: ReplicaConfig's default, {DEFAULT_BATCH_DELAY_MS:g} ms)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target in TARGETS is missed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kserve_version = check_kserve_version()
    duration = args.duration or (2.0 if args.quick else 10.0)
    rounds = args.rounds or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0.2 if args.quick else 0.5)
    if args.torch_threads > 0:  # inherited by every server process (and the gateway's replicas)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.torch_threads)
    t0 = time.perf_counter()

    # A SIGTERM to the benchmark still runs the `finally` that stops every server.
    signal.signal(signal.SIGTERM, interrupted)

    servers: dict[str, Server] = {}
    rayserve: Server | None = None
    rayserve_note = ""
    with tempfile.TemporaryDirectory(prefix="distml-bench-serving-") as tmpdir:
        tmp = Path(tmpdir)
        ws = tmp / "ws"
        try:
            make_workspace(ws)
            _, v1, v2 = make_bodies(args.seed)
            started = time.perf_counter()
            # Ray first: its start-up (Ray, the Serve controller and proxy, the replica) is the longest
            rayserve, ray_port_file, rayserve_note = start_rayserve(ws, tmp, args)
            if rayserve is None:
                log(f"skipping the Ray Serve peer: {rayserve_note}")
            else:
                servers["rayserve"] = rayserve
            pending: list[tuple[Server, Path]] = [
                start_replica("ours_batching_off", ws, tmp, max_batch_size=1),
                start_replica(
                    "ours_batching_on",
                    ws,
                    tmp,
                    max_batch_size=args.max_batch_size,
                    max_batch_delay_ms=args.max_batch_delay_ms,
                ),
                start_gateway("ours_gateway2", ws, tmp, replicas=2),
            ]
            servers.update({s.name: s for s, _ in pending})
            kport = free_port()
            servers["kserve"] = spawn(
                "kserve",
                [sys.executable, "-c", KSERVE_SERVER, str(ws), MODEL, MODEL, str(kport), str(args.torch_threads)],
                tmp,
            )
            deadline = time.monotonic() + 120
            for server, port_file in pending:
                wait_port_file(server, port_file, deadline)
            servers["kserve"].port = kport
            wait_http_ready(servers["kserve"], f"http://127.0.0.1:{kport}/v1/models/{MODEL}", deadline)
            if rayserve is not None:  # Ray, Serve and a replica worker take long to start on 2 busy cores
                try:
                    wait_port_file(rayserve, ray_port_file, deadline + 120)
                except RuntimeError as exc:  # a broken peer costs its own figures only
                    log(f"the Ray Serve peer did not start; going on without it: {exc}")
                    stop_all([rayserve], timeout=5)
                    serving_rayserve.kill_group(rayserve.proc)
                    del servers["rayserve"]
                    rayserve, rayserve_note = None, f"failed to start ({str(exc).splitlines()[0]})"
            for server in servers.values():
                base = f"http://127.0.0.1:{server.port}"
                server.v1_url = "" if server.name == "rayserve" else f"{base}/v1/models/{MODEL}:predict"
                server.v2_url = "" if server.name == "kserve" else f"{base}/v2/models/{MODEL}/infer"
            startup_s = time.perf_counter() - started
            log(
                f"servers up in {startup_s:.1f}s (untimed): "
                + ", ".join(f"{s.name} pid {s.proc.pid} port {s.port}" for s in servers.values())
            )

            levels = QUICK_CONCURRENCY if args.quick else CONCURRENCY
            plan = [
                (name, server, c) for name, (server, _) in CONTENDERS.items() if server in servers for c in levels[name]
            ]
            factory, loop_name = event_loop_factory()
            log(
                f"{'quick' if args.quick else 'full'} run: {duration:g} s per contender and concurrency in "
                f"{rounds} slices, each after {warmup:g} s warm-up; {len(plan)} levels, client loop {loop_name}, "
                f"server torch threads {args.torch_threads or 'default'}"
            )
            with asyncio.Runner(loop_factory=factory) as runner:
                results, diffs = runner.run(run_load(servers, plan, {"v1": v1, "v2": v2}, rounds, warmup, duration))
        finally:
            stop_all(list(servers.values()))
            if rayserve is not None:  # whatever of Ray outlived its driver (gcs, raylet, workers)
                serving_rayserve.kill_group(rayserve.proc)
        exit_codes = {s.name: s.proc.returncode for s in servers.values()}

    from importlib.metadata import version

    def ratio(a: str, b: str, level: str, key: str = "rps") -> float | None:
        """results[a][level][key] / results[b][level][key]; None where a level was not run (quick mode)
        or a figure is missing."""
        x = results.get(a, {}).get(level, {}).get(key)
        y = results.get(b, {}).get(level, {}).get(key)
        return x / y if x is not None and y else None

    cpu = "server_cpu_ms_per_req"  # the gateway's includes its replicas; less noisy than req/s
    ratios = {
        # like for like: batching off, one request per forward pass, as KServe's ModelServer runs it
        "ours_nobatch_vs_kserve_rps_c64": ratio("ours_batching_off", "kserve", "c64"),
        "ours_nobatch_vs_kserve_p99_c64": ratio("ours_batching_off", "kserve", "c64", "p99_ms"),
        "ours_nobatch_vs_kserve_cpu_per_req_c64": ratio("ours_batching_off", "kserve", "c64", cpu),
        # our defaults (ReplicaConfig's batching) vs KServe's defaults
        "ours_vs_kserve_rps_c64": ratio("ours_batching_on", "kserve", "c64"),
        "ours_vs_kserve_p99_c64": ratio("ours_batching_on", "kserve", "c64", "p99_ms"),
        "ours_vs_kserve_cpu_per_req_c64": ratio("ours_batching_on", "kserve", "c64", cpu),
        "batching_on_vs_off_rps_c64": ratio("ours_batching_on", "ours_batching_off", "c64"),
        "gateway2_vs_single_rps_c64": ratio("ours_gateway2", "ours_batching_on", "c64"),
        "ours_vs_kserve_rps_c1": ratio("ours_batching_on", "kserve", "c1"),
        "ours_nobatch_vs_kserve_rps_c1": ratio("ours_batching_off", "kserve", "c1"),
        "ours_vs_kserve_rps_c16": ratio("ours_batching_on", "kserve", "c16"),
        "ours_nobatch_vs_kserve_rps_c16": ratio("ours_batching_off", "kserve", "c16"),
        "ours_v2_vs_v1_rps_c64": ratio("ours_batching_on_v2", "ours_batching_on", "c64"),
        # our defaults vs Ray Serve with @serve.batch at the same batch size and delay, same V2 request
        "ours_vs_rayserve_rps_c64": ratio("ours_batching_on_v2", "rayserve", "c64"),
        "ours_vs_rayserve_p99_c64": ratio("ours_batching_on_v2", "rayserve", "c64", "p99_ms"),
        "ours_vs_rayserve_cpu_per_req_c64": ratio("ours_batching_on_v2", "rayserve", "c64", cpu),
        "ours_vs_rayserve_rps_c1": ratio("ours_batching_on_v2", "rayserve", "c1"),
        "ours_vs_rayserve_p99_c1": ratio("ours_batching_on_v2", "rayserve", "c1", "p99_ms"),
        "ours_vs_rayserve_rps_c16": ratio("ours_batching_on_v2", "rayserve", "c16"),
        "ours_vs_rayserve_p99_c16": ratio("ours_batching_on_v2", "rayserve", "c16", "p99_ms"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    met = {}
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            met[name] = value >= target["min"] if "min" in target else value <= target["max"]
            bound = f">= {target['min']:g}" if "min" in target else f"<= {target['max']:g}"
            verdict = f" (target {bound}: {'met' if met[name] else 'MISSED'})"
        log(f"{name}: {value:.2f}{verdict}")

    rounded = {
        label: {c: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for c, r in levels.items()}
        for label, levels in results.items()
    }
    rounded["config"] = {
        "model": MODEL,
        "request": "V1 predict, one 28x28 image of raw pixels per request (ours_batching_on_v2 and rayserve: "
        "V2 infer JSON, FP32 [1,28,28])",
        "duration_s": duration,
        "rounds": rounds,
        "warmup_s_per_slice": warmup,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "torch_threads": args.torch_threads or "library default",
        "concurrency": {name: [f"c{c}" for c in cs] for name, cs in levels.items() if name in results},
        "comparisons": {
            "like_for_like": "ours_batching_off vs kserve: one request per forward pass on both sides, "
            "per-request overhead only (ours_nobatch_vs_kserve_*)",
            "defaults": "ours_batching_on (ReplicaConfig's batching defaults) vs kserve (ModelServer's defaults: "
            "no server-side batching) (ours_vs_kserve_*)",
            "rayserve": "ours_batching_on_v2 vs rayserve: both batching (ours: ReplicaConfig; Ray: @serve.batch "
            "with the same max batch size and delay), one replica each, the same V2 infer body "
            "(ours_vs_rayserve_*)",
        },
        "ours_batching_off": "ReplicaConfig max_batch_size 1, port 0, port_file, log_level warning",
        "ours_batching_on": f"ReplicaConfig max_batch_size {args.max_batch_size}, max_batch_delay_ms "
        f"{args.max_batch_delay_ms:g}"
        + (
            " (ReplicaConfig defaults)"
            if (args.max_batch_size, args.max_batch_delay_ms) == (DEFAULT_BATCH_SIZE, DEFAULT_BATCH_DELAY_MS)
            else " (tuned)"
        ),
        "ours_gateway2": "gateway from a ServeConfig: 2 replicas, ReplicaConfig defaults (batching included)",
        "kserve": f"kserve {kserve_version} (pinned: {KSERVE_VERSION}) ModelServer, 1 worker, gRPC off, "
        "per-request logging off, sync predict(); model prepared as ours (optimize_for_serving: channels_last "
        "weights; manifest Preprocessing; same torch threads)",
        "rayserve": (
            f"skipped: {rayserve_note}"
            if rayserve is None
            else f"{rayserve_note} (.venv-peers); local ray.init(num_cpus={os.cpu_count()}, dashboard off, "
            f"log_to_driver off, object store {RAY_OBJECT_STORE_BYTES // 2**20} MiB, usage stats off); Serve's "
            "HTTP proxy in front, Serve's throughput-optimized mode without its direct ingress ("
            + ", ".join(f"{k}={os.environ.get(k, v)}" for k, v in serving_rayserve.SERVE_ENV.items())
            + "), access log off, log level WARNING; one deployment, "
            f"num_replicas 1, ray_actor_options num_cpus {RAY_REPLICA_NUM_CPUS}, max_ongoing_requests "
            f"{RAY_MAX_ONGOING_REQUESTS}, @serve.batch(max_batch_size={args.max_batch_size}, "
            f"batch_wait_timeout_s={args.max_batch_delay_ms / 1000:g}) on an async method that runs the forward "
            "pass (as Ray's docs do); the request parsed and normalised per request in the replica; the same "
            "artifact's safetensors weights in the zoo's cnn module, channels_last as optimize_for_serving; same "
            "torch threads; its server CPU counts the whole Ray tree (driver, gcs, raylet, controller, proxy, "
            "replica)"
        ),
        "client": f"aiohttp {version('aiohttp')} closed loop, one session, limit=0, {loop_name} loop, same 2 cores",
        "max_abs_diff_vs_kserve": {k: float(f"{v:.2e}") for k, v in diffs.items()},
        "server_exit_codes": exit_codes,
    }
    rounded["wall_seconds"] = round(time.perf_counter() - t0, 1)
    rounded["startup_seconds"] = round(startup_s, 1)
    log(f"done in {rounded['wall_seconds']}s")
    return {
        "benchmark": "serving",
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
        print(f"[serving] targets missed: {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)
