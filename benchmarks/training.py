"""Training benchmark: steady-state global samples/s of distml's training against the book's stack and a raw ceiling.

Run `python benchmarks/training.py [--quick] [--check]`; the last stdout line is JSON; `--check` exits 1 when a
target is missed. Every figure is measured in this run, side by side, on the same generated Fashion-MNIST-shaped
data (uint8 28x28 images, labels 0..9, one .npz, normalised the same way everywhere), batch 64 per worker, the same
intra-op thread budget per worker in every 2-worker configuration (cores // 2):

- `distml_train_2w`: `distml train` itself (the CLI, its launcher, the worker loop with its Loader, metrics,
  progress reporting and checkpoints every 50 steps), allreduce on 2 workers; samples/s read from the per-step
  history the run records in its workspace's metadata store (`train_steps`), warm-up steps excluded.
- `raw_ddp_2w`: the ceiling, a plain torchrun script (this file re-invoked with --ddp-worker): torch DDP + Adam on
  the same model and tensors, no distml code (same kernel choices as distml's trainer: channels_last, fused Adam).
- `tf_mwms_2w`: the book's reference, the same CNN in TF/Keras 2 (`tf_keras`) under MultiWorkerMirroredStrategy,
  2 worker processes of `.venv-peers/bin/python` (this file re-invoked with --tf-worker) on free localhost ports,
  fed by a tf.data pipeline (distribute_datasets_from_function: shard, batch 64 per replica, prefetch) and trained
  with `model.fit`, as the book's project does; a Keras callback stamps each step's end. Skipped, with a message
  naming `make bench-peers`, when that venv or TensorFlow is missing.
- Context, in worker processes that call distml's strategy classes directly (--worker): `single`,
  `allreduce_2w` (AllReduceTrainer only), `ps_sync_2w_1s` (cnn on a parameter server).
- The parameter bottleneck (full run only): the 20M-parameter `mlp` on 2 workers with 1, 2 and 4 parameter servers
  and with allreduce, every process in its own network namespace with its own rate-limited link (veth pair into
  one bridge, tbf on both directions), as on separate machines; and the PS cases over plain loopback, where every
  server shares the same link, for contrast. Skipped with a message when namespaces cannot be made (needs root and
  `ip`/`tc`). The namespace set-up lives in this file (class `Links`), not in a module of its own, because `make
  bench` runs every benchmarks/*.py as a benchmark.

Timing: each case runs W warm-up steps then S timed steps; its figure is the median over windows of the timed steps
(the cnn window is 50 steps, distml's checkpoint period, so every window holds one checkpoint), the slowest worker's
time per window (workers run in lock-step). Full runs keep the best of 2 rounds for the cnn cases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
BATCH = 64
WORKERS = 2
CNN_WINDOW = 50  # = distml train's default checkpoint_every: every timed window holds one checkpoint
MLP_ARGS = {"width": 2450, "depth": 4}  # 19,962,610 parameters (zoo docstring)
TARGETS = {"allreduce2_vs_tf_mwms": 1.0, "allreduce2_vs_raw_ddp": 0.95, "ps2_vs_ps1_mlp": 1.6}
POOL = 8  # distinct pre-generated batches per worker, cycled (the --worker cases)
DATA_RECORDS = 12_800  # generated .npz: 100 steps per epoch on 2 workers x 64
# the `digits` data set's preprocessing, which `distml train --train-file` applies: (x * scale - mean) / std
NORM = {"scale": 1 / 16, "mean": 0.3051, "std": 0.4009}
LINK_RATE = "250mbit"  # 80 MB per worker per step each way: 2.6 s on one link, well above the compute (see link_model)
NET_PREFIX = "dmlbench"  # namespaces dmlbench0.., bridge dmlbenchbr, veths dmlbenchh<i> (root) / dmlbenchn<i> (ns)
NET_SUBNET = "10.213.77"


def log(message: str) -> None:
    print(f"[training] {message}", file=sys.stderr, flush=True)


# == distml strategy workers (started by torchrun or in a namespace) ==============================


class _TimedWork:
    def __init__(self, work: Any, sink: list[float]):
        self.work, self.sink = work, sink

    def wait(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.work.wait(*args)
        finally:
            self.sink[0] += time.perf_counter() - start


class _TimedDist:
    """Stands in for `torch.distributed` inside distml.train.parameter_server only: every isend/irecv
    request's wait() adds its blocking time to `wait_s` (the strategy code itself is unchanged)."""

    def __init__(self, real: Any):
        self.real, self.wait_s = real, [0.0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def isend(self, *args: Any, **kwargs: Any) -> _TimedWork:
        return _TimedWork(self.real.isend(*args, **kwargs), self.wait_s)

    def irecv(self, *args: Any, **kwargs: Any) -> _TimedWork:
        return _TimedWork(self.real.irecv(*args, **kwargs), self.wait_s)


def _timed_method(obj: Any, name: str, sink: list[float]) -> None:
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink[0] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import torch.distributed as dist

    from distml.models.zoo import build_model, count_parameters
    from distml.train import parameter_server
    from distml.train.allreduce import AllReduceTrainer
    from distml.train.config import DataSection, ModelSection, ParallelismSection, TrainConfig
    from distml.train.worker import STOP_CHECK_EVERY, agree_stop

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    servers = spec["servers"]
    is_server = rank < servers
    timed_dist = _TimedDist(dist)
    parameter_server.dist = timed_dist  # this process only: time waits on isend/irecv
    dist.init_process_group("gloo")
    cpu = torch.device("cpu")
    torch.manual_seed(0)  # every rank starts from the same weights, as worker.build does
    model = build_model(spec["model"], **spec["model_args"])
    n_workers = world - servers
    config = TrainConfig(
        model=ModelSection(name=spec["model"], args=spec["model_args"]),
        data=DataSection(batch_size=spec["batch"]),
        parallelism=ParallelismSection(
            workers=n_workers, strategy="parameter-server" if servers else "allreduce", ps_shards=max(servers, 1)
        ),
    )
    lr = config.learning_rate(n_workers)
    total = spec["warmup"] + spec["steps"]
    out: dict[str, Any] = {"rank": rank, "threads": torch.get_num_threads(), "parameters": count_parameters(model)}

    if is_server:
        params = list(model.parameters())
        layout = parameter_server.ShardLayout.balanced(params, servers)
        server = parameter_server.PSServer(rank, layout.flat(params, rank), list(range(servers, world)), lr, "sync")
        apply_s = [0.0]
        _timed_method(server, "_apply", apply_s)  # gradient assignment + Adam step on this shard
        server.broadcast()
        marks, waits, applies = [], [], []
        for _ in range(total):
            server.serve_sync_step()
            marks.append(time.perf_counter())
            waits.append(timed_dist.wait_s[0])
            applies.append(apply_s[0])
        w = spec["warmup"]
        steps = spec["steps"]
        span = marks[-1] - marks[w - 1]
        out.update(
            role="server",
            shard_numel=layout.numels[rank],
            ms_per_step=1e3 * span / steps,
            comm_wait_ms=1e3 * (waits[-1] - waits[w - 1]) / steps,  # recv from workers + send back
            apply_ms=1e3 * (applies[-1] - applies[w - 1]) / steps,
        )
        out["other_ms"] = out["ms_per_step"] - out["comm_wait_ms"] - out["apply_ms"]  # stack + mean, Python
    else:
        gen = torch.Generator().manual_seed(1000 + rank)
        pool = [
            (torch.randn(spec["batch"], 28, 28, generator=gen), torch.randint(0, 10, (spec["batch"],), generator=gen))
            for _ in range(POOL)
        ]
        if servers:
            trainer: Any = parameter_server.PSWorker(model.to(cpu), list(range(servers)), "sync", cpu)
            trainer.pull()
        else:
            trainer = AllReduceTrainer(model, lr, cpu, world)
        stop_flag = servers == 0 and world > 1
        marks, waits, stop_s = [], [], 0.0
        for i in range(total):
            x, y = pool[i % POOL]
            trainer.train_step(x, y.long())
            if stop_flag and (i + 1) % STOP_CHECK_EVERY == 0:  # as worker.py agrees on a SIGTERM
                t = time.perf_counter()
                agree_stop(False, cpu)
                stop_s += time.perf_counter() - t if i >= spec["warmup"] else 0.0
            marks.append(time.perf_counter())
            waits.append(timed_dist.wait_s[0])
        w, steps = spec["warmup"], spec["steps"]
        out.update(role="worker", marks=[m - marks[w - 1] for m in marks[w - 1 :]])
        out["ms_per_step"] = 1e3 * out["marks"][-1] / steps
        if servers:
            out["comm_wait_ms"] = 1e3 * (waits[-1] - waits[w - 1]) / steps  # push + pull incl. server time
            out["compute_ms"] = out["ms_per_step"] - out["comm_wait_ms"]
        else:
            out["stop_flag_ms"] = 1e3 * stop_s / steps
            out.update(_allreduce_breakdown(trainer, pool, spec["profile_steps"]))
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _allreduce_breakdown(trainer: Any, pool: list, steps: int) -> dict[str, float]:
    """Untimed extra steps: forward+backward without gradient sync (DDP no_sync) and the Adam step alone,
    so that train_step minus both is the cost of DDP's gradient allreduce (not hidden by backward)."""
    import contextlib

    import torch.nn.functional as F

    if steps <= 0:
        return {}
    sync_off = getattr(trainer.wrapped, "no_sync", contextlib.nullcontext)
    fb = opt = 0.0
    for i in range(steps):
        x, y = pool[i % POOL]
        t0 = time.perf_counter()
        with sync_off():
            trainer.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(trainer.wrapped(x), y.long()).backward()
        t1 = time.perf_counter()
        trainer.optimizer.step()
        t2 = time.perf_counter()
        fb, opt = fb + t1 - t0, opt + t2 - t1
    return {"fwd_bwd_no_sync_ms": 1e3 * fb / steps, "optimizer_ms": 1e3 * opt / steps}


# == raw torch DDP ceiling (started by torchrun; no distml code) ===================================


def _normalised_shard(spec: dict[str, Any], rank: int, world: int):
    import numpy as np

    data = np.load(spec["data"])
    n = spec["norm"]
    images = (data["image"][rank::world].astype(np.float32) * n["scale"] - n["mean"]) / n["std"]
    return images, data["label"][rank::world].astype(np.int64)


def ddp_worker_main(spec_path: str) -> int:
    """What a competent PyTorch user writes for CPU data parallelism: DDP + Adam on preloaded tensors."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, labels = _normalised_shard(spec, rank, world)
    x_all, y_all = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, 10),
    ).to(memory_format=torch.channels_last)  # fmt: skip
    ddp = DDP(model, gradient_as_bucket_view=True)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=spec["lr"], fused=True)
    batch, total = spec["batch"], spec["warmup"] + spec["steps"]
    per_epoch = len(x_all) // batch
    gen = torch.Generator().manual_seed(spec["seed"] + rank)
    marks: list[float] = []
    order = torch.randperm(len(x_all), generator=gen)
    for i in range(total):
        if i % per_epoch == 0 and i:
            order = torch.randperm(len(x_all), generator=gen)
        idx = order[(i % per_epoch) * batch : (i % per_epoch + 1) * batch]
        x = x_all[idx].contiguous(memory_format=torch.channels_last)
        y = y_all[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        optimizer.step()
        marks.append(time.perf_counter())
    w = spec["warmup"]
    out = {
        "rank": rank,
        "role": "worker",
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "marks": [m - marks[w - 1] for m in marks[w - 1 :]],
        "last_loss": loss.item(),
    }
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# == TF/Keras 2 MultiWorkerMirroredStrategy peer (run by .venv-peers/bin/python; no torch) ========


def tf_worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(spec["threads"])
    import tf_keras as keras

    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = strategy.num_replicas_in_sync
    data = np.load(spec["data"])
    n = spec["norm"]
    images = ((data["image"].astype(np.float32) * n["scale"] - n["mean"]) / n["std"])[..., None]
    labels = data["label"].astype(np.int64)
    global_batch = spec["batch"] * workers

    def dataset_fn(ctx: Any) -> Any:  # the TF guide's input pipeline for MWMS: shard, shuffle, batch, prefetch
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id).shuffle(4096, seed=spec["seed"]).repeat()
        return ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    dist_ds = strategy.distribute_datasets_from_function(dataset_fn)
    layers = keras.layers
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                layers.Conv2D(32, 3, activation="relu"),
                layers.MaxPooling2D(2),
                layers.Conv2D(64, 3, activation="relu"),
                layers.MaxPooling2D(2),
                layers.Conv2D(64, 3, activation="relu"),
                layers.Flatten(),
                layers.Dense(64, activation="relu"),
                layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(spec["lr"]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    marks: list[float] = []

    class StepTimes(keras.callbacks.Callback):  # logs arrive as numbers: each stamp follows a finished step
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            marks.append(time.perf_counter())

    total = spec["warmup"] + spec["steps"]
    history = model.fit(dist_ds, epochs=1, steps_per_epoch=total, verbose=0, callbacks=[StepTimes()])
    w = spec["warmup"]
    out = {
        "rank": index,
        "role": "worker",
        "threads": spec["threads"],
        "parameters": int(model.count_params()),
        "marks": [m - marks[w - 1] for m in marks[w - 1 :]],
        "last_loss": float(history.history["loss"][-1]),
        "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__},
    }
    Path(spec["out"], f"rank{index}.json").write_text(json.dumps(out))
    return 0


# == per-process network namespaces with rate-limited links =======================================


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Links:
    """`count` network namespaces, each with one veth into a bridge in the root namespace; both directions of
    every veth are shaped by tbf at `rate`, so each process has a link of its own as on separate machines.
    pyroute2 was considered; `ip`/`tc` are on every Linux machine that can do this at all, so they are run directly.
    """

    def __init__(self, count: int, rate: str):
        self.count, self.rate = count, rate
        self.bridge = f"{NET_PREFIX}br"

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return f"the {tool!r} tool (iproute2) is missing"
        probe = f"{NET_PREFIX}probe"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    @staticmethod
    def clean() -> None:
        """Remove everything this benchmark creates, also what a killed earlier run left behind."""
        listed = _ip("netns", "list", check=False).stdout.split("\n")
        for line in listed:
            name = line.split(" ")[0]
            if name.startswith(NET_PREFIX):
                _ip("netns", "del", name, check=False)
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(NET_PREFIX):
                _ip("link", "del", name, check=False)

    def ns(self, i: int) -> str:
        return f"{NET_PREFIX}{i}"

    def ifname(self, i: int) -> str:
        return f"{NET_PREFIX}n{i}"

    def addr(self, i: int) -> str:
        return f"{NET_SUBNET}.{10 + i}"

    def __enter__(self) -> Links:
        self.clean()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for i in range(self.count):
                ns, host, inner = self.ns(i), f"{NET_PREFIX}h{i}", self.ifname(i)
                _ip("netns", "add", ns)
                _ip("link", "add", host, "type", "veth", "peer", "name", inner, "netns", ns)
                _ip("link", "set", host, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                # tbf on both ends: `inner` egress = what the process sends, `host` egress = what it receives
                shape = ["root", "tbf", "rate", self.rate, "burst", "256kb", "latency", "100ms"]
                subprocess.run(["tc", "qdisc", "add", "dev", host, *shape], check=True, capture_output=True)
                subprocess.run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, *shape],
                    check=True,
                    capture_output=True,
                )
        except subprocess.CalledProcessError as exc:
            self.clean()
            raise RuntimeError(f"could not set up the namespaces: {' '.join(exc.cmd)}: {exc.stderr.strip()}") from None
        except BaseException:
            self.clean()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.clean()


def run_in_namespaces(name: str, spec: dict[str, Any], tmp: Path, links: Links, timeout: float) -> dict[str, Any]:
    """Start one distml strategy case with every rank in its own namespace (env:// rendezvous at rank 0's address)."""
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(folder)}
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    nproc = spec["workers"] + spec["servers"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_", "GLOO_"))}
    procs = []
    start = time.perf_counter()
    try:
        for rank in range(nproc):
            env = {
                **base,
                "RANK": str(rank),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": links.addr(0),
                "MASTER_PORT": "29500",  # rank 0's namespace is new: the port is free there
                "GLOO_SOCKET_IFNAME": links.ifname(rank),
                "OMP_NUM_THREADS": "1",
                "TORCH_CPP_LOG_LEVEL": "ERROR",  # no hostname inside a namespace: c10d warns on every connect
            }
            command = ["ip", "netns", "exec", links.ns(rank), sys.executable, str(Path(__file__).resolve())]
            procs.append(subprocess.Popen([*command, "--worker", str(spec_path)], env=env))
        deadline = time.monotonic() + timeout
        for proc in procs:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise SystemExit(f"benchmark case {name!r} failed in a namespaced process (exit {code})")
    except subprocess.TimeoutExpired:
        raise SystemExit(f"benchmark case {name!r} did not finish within {timeout:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return summarize(name, spec, folder, nproc, time.perf_counter() - start)


# == parent side ===================================================================================


def summarize(name: str, spec: dict[str, Any], folder: Path, nproc: int, wall: float) -> dict[str, Any]:
    """Read the ranks' files; workers run in lock-step (DDP / sync PS / MWMS): a window's time is the slowest's."""
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(nproc)]
    workers = [r for r in ranks if r["role"] == "worker"]
    steps, window = spec["steps"], spec["window"]
    rates = []
    for lo in range(0, steps - window + 1, window):
        span = max(w["marks"][lo + window] - w["marks"][lo] for w in workers)
        rates.append(len(workers) * spec["batch"] * window / span)
    whole = len(workers) * spec["batch"] * steps / max(w["marks"][-1] for w in workers)
    summary: dict[str, Any] = {
        "samples_per_s": statistics.median(rates),
        "whole_window_samples_per_s": round(whole, 1),
        "window_rates": [round(r) for r in rates],
        "wall_s": round(wall, 1),
        "threads": [r["threads"] for r in ranks],
        "parameters": ranks[0]["parameters"],
    }
    if "versions" in ranks[0]:
        summary["versions"] = ranks[0]["versions"]
    for role in ("worker", "server"):
        keys = sorted({k for r in ranks if r["role"] == role for k in r if k.endswith("_ms")})
        if keys:
            summary[f"{role}_ms"] = {
                k: round(statistics.mean(r[k] for r in ranks if r["role"] == role and k in r), 2) for k in keys
            }
    log(
        f"{name}: {summary['samples_per_s']:,.0f} samples/s (median of {len(rates)} windows of {window} steps; "
        f"whole {whole:,.0f}; threads {summary['threads']}; {wall:.1f}s wall) "
        + " ".join(f"{role}={summary[role]}" for role in ("worker_ms", "server_ms") if role in summary)
    )
    return summary


def _write_spec(name: str, spec: dict[str, Any], tmp: Path) -> tuple[Path, dict[str, Any], Path]:
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(folder)}
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    return folder, spec, spec_path


def run_torchrun(name: str, spec: dict[str, Any], tmp: Path, flag: str = "--worker") -> dict[str, Any]:
    """Launch one case through torchrun (in this process, as distml.train.launcher does) and read the ranks' files."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    folder, spec, spec_path = _write_spec(name, spec, tmp)
    nproc = spec["workers"] + spec.get("servers", 0)
    start = time.perf_counter()
    script = str(Path(__file__).resolve())
    try:
        run(
            parse_args(
                [
                    "--standalone",
                    "--nproc-per-node",
                    str(nproc),
                    "--monitor-interval",
                    "0.1",
                    script,
                    flag,
                    str(spec_path),
                ]
            )
        )
    except ChildFailedError as exc:
        raise SystemExit(f"benchmark case {name!r} failed in a worker process (traceback above): {exc}") from None
    return summarize(name, spec, folder, nproc, time.perf_counter() - start)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_unavailable() -> str | None:
    if not PEERS_PYTHON.exists():
        return f"{PEERS_PYTHON.relative_to(ROOT)} is missing; run `make bench-peers`"
    probe = subprocess.run(
        [
            str(PEERS_PYTHON),
            "-c",
            "import importlib.util as u, sys; sys.exit(not (u.find_spec('tensorflow') and u.find_spec('tf_keras')))",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        return "tensorflow or tf_keras is missing from .venv-peers; run `make bench-peers`"
    return None


def run_tf(name: str, spec: dict[str, Any], tmp: Path, timeout: float = 600) -> dict[str, Any]:
    """2 TF workers as subprocesses of .venv-peers/bin/python, TF_CONFIG naming both on free localhost ports."""
    folder, spec, spec_path = _write_spec(name, spec, tmp)
    ports = _free_ports(spec["workers"])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    base = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "OMP_NUM_THREADS": str(spec["threads"]),
        "PYTHONPATH": "",
    }
    start = time.perf_counter()
    procs = []
    try:
        for index in range(spec["workers"]):
            env = {**base, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
            procs.append(
                subprocess.Popen(
                    [str(PEERS_PYTHON), str(Path(__file__).resolve()), "--tf-worker", str(spec_path)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(folder / f"worker{index}.log", "w"),
                )
            )
        deadline = time.monotonic() + timeout
        for index, proc in enumerate(procs):
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                tail = (folder / f"worker{index}.log").read_text()[-3000:]
                raise SystemExit(f"TF case {name!r}: worker {index} exited with {code}:\n{tail}")
    except subprocess.TimeoutExpired:
        raise SystemExit(f"TF case {name!r} did not finish within {timeout:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return summarize(name, spec, folder, spec["workers"], time.perf_counter() - start)


def run_distml_train(name: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """`distml train` as a user runs it; samples/s from the per-step history its lead records in the workspace."""
    from distml.train.store import train_history
    from distml.workspace import Workspace

    folder = tmp / name
    workspace = folder / "workspace"
    total = spec["warmup"] + spec["steps"]
    command = [
        sys.executable, "-m", "distml.cli", "--workspace", str(workspace), "train",
        "--model", "cnn", "--dataset", "digits", "--train-file", spec["data"],
        "--workers", str(spec["workers"]), "--batch-size", str(spec["batch"]), "--threads", str(spec["threads"]),
        "--max-steps", str(total), "--device", "cpu", "--run-id", "bench",
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(folder / "train.log", "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder, timeout=900)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (folder / "train.log").read_text()[-3000:]
        raise SystemExit(f"`distml train` failed (exit {done.returncode}):\n{tail}")
    rows = train_history(Workspace(workspace).engine, "bench")
    if len(rows) != total:
        raise SystemExit(f"`distml train` recorded {len(rows)} steps, expected {total}")
    global_batch = spec["workers"] * spec["batch"]
    # each row's samples_per_s is global batch / wall time since the previous step (data wait, metrics,
    # checkpoint writes included); the first row after start-up is the warm-up's
    walls = [global_batch / r.samples_per_s for r in rows[spec["warmup"] :]]
    window = spec["window"]
    rates = [global_batch * window / sum(walls[lo : lo + window]) for lo in range(0, len(walls) - window + 1, window)]
    summary = {
        "samples_per_s": statistics.median(rates),
        "whole_window_samples_per_s": round(global_batch * len(walls) / sum(walls), 1),
        "window_rates": [round(r) for r in rates],
        "wall_s": round(wall, 1),
        "threads": [spec["threads"]] * spec["workers"],
        "source": "train_steps rows of the run's metadata store (lead worker, wall time between steps)",
        "checkpoints_in_timed_steps": sum(1 for r in rows[spec["warmup"] :] if r.step % 50 == 0),
        "step_compute_ms": round(1e3 * statistics.mean(r.step_seconds for r in rows[spec["warmup"] :]), 2),
    }
    log(
        f"{name}: {summary['samples_per_s']:,.0f} samples/s (median of {len(rates)} windows of {window} steps; "
        f"whole {summary['whole_window_samples_per_s']:,.0f}; compute {summary['step_compute_ms']} ms/step; "
        f"{wall:.1f}s wall incl. start-up and evaluation)"
    )
    return summary


def make_data(path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (DATA_RECORDS, 28, 28), dtype=np.uint8)
    np.savez(path, image=images, label=rng.integers(0, 10, DATA_RECORDS).astype(np.int64))


def plan(args: argparse.Namespace, data: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The cases: name -> spec (with "kind": torchrun, ddp, tf, train or links), and what is skipped and why."""
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // WORKERS)  # one budget for every 2-worker configuration: cores // workers
    rule = lambda n: max(1, cpus // n)  # noqa: E731  worker.py's default: cores // local processes
    lr = 1e-3 * (WORKERS * BATCH / 64) ** 0.5  # distml's default rule, given to the peers as is
    cw, cs, mw, ms = args.cnn_warmup, args.cnn_steps, args.mlp_warmup, args.mlp_steps
    cnn = {"model": "cnn", "model_args": {}, "batch": BATCH, "warmup": cw, "steps": cs, "window": min(cs, CNN_WINDOW)}
    mlp = {"model": "mlp", "model_args": MLP_ARGS, "batch": BATCH, "warmup": mw, "steps": ms, "window": max(1, ms // 3)}
    two = {"workers": WORKERS, "servers": 0, "threads": threads}
    shared = {"data": data, "norm": NORM, "lr": lr, "seed": 0}
    table: dict[str, dict[str, Any]] = {
        "distml_train_2w": {**cnn, **two, **shared, "kind": "train"},
        "raw_ddp_2w": {**cnn, **two, **shared, "kind": "ddp"},
        "tf_mwms_2w": {**cnn, **two, **shared, "kind": "tf"},
    }
    skipped = []
    once = {"rounds": 1, "profile_steps": 0}  # context cases: one round
    if not args.quick:
        table.update(
            {
                "allreduce_2w": {**cnn, **two, "kind": "torchrun", **once, "profile_steps": args.profile_steps},
                "single": {**cnn, "workers": 1, "servers": 0, "threads": rule(1), "kind": "torchrun", **once},
                "ps_sync_2w_1s": {**cnn, "workers": 2, "servers": 1, "threads": rule(3), "kind": "torchrun", **once},
            }
        )
        for servers in (1, 2):
            table[f"ps_{servers}s_mlp_loopback"] = {
                **mlp, "workers": 2, "servers": servers, "threads": rule(2 + servers), "kind": "torchrun", "rounds": 1
            }  # fmt: skip
        links = {**mlp, "kind": "links", "rounds": 1, "profile_steps": 0, "threads": threads}
        for servers in (1, 2, 4):
            table[f"ps_{servers}s_mlp"] = {**links, "workers": 2, "servers": servers}
        table["allreduce_2w_mlp"] = {**links, "workers": 2, "servers": 0}
    else:
        skipped.append(
            "quick: the namespace/link cases (mlp with 1, 2, 4 servers and allreduce on rate-limited links; "
            "ps2_vs_ps1_mlp) and the context cases take minutes; run without --quick"
        )
    if any(s["kind"] == "links" for s in table.values()):
        reason = Links.unavailable()
        if reason:
            skipped.append(f"namespace/link cases: {reason} (they need root and iproute2)")
            table = {k: v for k, v in table.items() if v["kind"] != "links"}
    if "tf_mwms_2w" in table:
        reason = tf_unavailable()
        if reason:
            skipped.append(f"tf_mwms_2w (TensorFlow MultiWorkerMirroredStrategy): {reason}")
            del table["tf_mwms_2w"]
    if args.cases:
        table = {k: v for k, v in table.items() if k in args.cases.split(",")}
    return table, skipped


def link_model(rate: str, parameters: int, workers: int) -> dict[str, Any]:
    """Seconds per step the links alone need (BytePS's bound), to show the link, not the cores, is the bottleneck."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    unit = next(u for u in units if rate.endswith(u))
    bytes_per_s = float(rate[: -len(unit)]) * units[unit] / 8
    m = parameters * 4  # float32 gradients up, parameters down
    per_link = m / bytes_per_s
    from distml.models.zoo import build_model
    from distml.train.parameter_server import ShardLayout

    params = list(build_model("mlp", **MLP_ARGS).parameters())
    largest = {k: max(ShardLayout.balanced(params, k).numels) / parameters for k in (1, 2, 4)}
    return {
        "link_rate": rate,
        "link_bytes_per_s": bytes_per_s,
        "bytes_per_worker_per_step_each_way": m,
        "push_plus_pull_s_per_step": {
            f"ps_{k}s": round(2 * per_link * max(1, workers / k), 3) for k in (1, 2, 4)
        },  # max(M/B, nM/(kB)) each way
        "largest_shard_fraction": {f"ps_{k}s": round(f, 3) for k, f in largest.items()},
        "push_plus_pull_s_per_step_with_this_layout": {
            f"ps_{k}s": round(2 * per_link * max(1, workers * f), 3) for k, f in largest.items()
        },  # the largest shard's server link sets the pace (ShardLayout.balanced: equal ranges)
        "allreduce_s_per_step": round(
            2 * (workers - 1) * per_link / workers, 3
        ),  # ring: 2(n-1)M/(nB), both ways at once
        "shaping": "tbf rate R burst 256kb latency 100ms on both ends of each process's veth (its send and its "
        "receive direction); all veths in one bridge in the root namespace",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="end within ~60 s on 2 cores: the 3 cnn cases only")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the cnn cases, best kept (default 2, quick 1)"
    )
    parser.add_argument("--cnn-steps", type=int, default=None)
    parser.add_argument("--mlp-steps", type=int, default=None)
    parser.add_argument("--cnn-warmup", type=int, default=None)
    parser.add_argument("--mlp-warmup", type=int, default=None)
    parser.add_argument(
        "--link-rate", default=LINK_RATE, help=f"tbf rate of every namespace's link (default {LINK_RATE})"
    )
    parser.add_argument("--profile-steps", type=int, default=None, help="extra untimed DDP breakdown steps")
    parser.add_argument("--cases", default=None, help="comma-separated subset of cases (for profiling)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tf-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    q = args.quick
    args.cnn_steps = args.cnn_steps or (50 if q else 200)
    args.mlp_steps = args.mlp_steps or 6
    args.cnn_warmup = args.cnn_warmup or (5 if q else 20)
    args.mlp_warmup = args.mlp_warmup or 2
    args.profile_steps = args.profile_steps if args.profile_steps is not None else 20
    rounds = args.rounds or (1 if q else 2)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # as distml.train.launcher does
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers set their own intra-op threads (spec "threads")
    t0 = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="distml-bench-training-") as tmpdir:
        tmp = Path(tmpdir)
        data = tmp / "fashion-shaped.npz"
        make_data(data)
        table, skipped = plan(args, str(data))
        for reason in skipped:
            log(f"skipped: {reason}")
        log(
            f"{'quick' if q else 'full'} run: {len(table)} cases, cnn cases x {rounds} round(s); cnn "
            f"{args.cnn_warmup}+{args.cnn_steps} steps, mlp {args.mlp_warmup}+{args.mlp_steps} steps, "
            f"batch {BATCH} per worker"
        )
        if any(s["kind"] == "links" for s in table.values()):
            Links.clean()  # leftovers of a killed earlier run
        for r in range(rounds):
            for name, spec in table.items():
                if r >= spec.get("rounds", rounds):
                    continue
                kind, label = spec["kind"], f"{name}-r{r}"
                if kind == "train":
                    summary = run_distml_train(label, spec, tmp)
                elif kind == "ddp":
                    summary = run_torchrun(label, spec, tmp, "--ddp-worker")
                elif kind == "tf":
                    summary = run_tf(label, spec, tmp)
                elif kind == "links":
                    with Links(spec["workers"] + spec["servers"], args.link_rate) as links:
                        summary = run_in_namespaces(label, spec, tmp, links, timeout=600)
                else:
                    summary = run_torchrun(label, spec, tmp)
                if name not in best or summary["samples_per_s"] > best[name]["samples_per_s"]:
                    best[name] = summary

    rate = {name: s["samples_per_s"] for name, s in best.items()}
    results: dict[str, Any] = {f"{name}_samples_per_s": round(v, 1) for name, v in rate.items()}
    results["detail"] = {name: {k: v for k, v in s.items() if k != "samples_per_s"} for name, s in best.items()}
    results["skipped"] = skipped
    import torch

    config: dict[str, Any] = {
        "quick": q,
        "cpus": os.cpu_count(),
        "load_average_1m_5m_15m": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "threads_per_worker": max(1, (os.cpu_count() or 1) // WORKERS),
        "thread_note": "every 2-worker configuration (distml train, raw DDP, TF MWMS intra- and inter-op, "
        "AllReduceTrainer, the link cases) gets cores // 2 threads per worker; PS loopback cases cores // processes",
        "batch_per_worker": BATCH,
        "workers": WORKERS,
        "cnn_steps": {"warmup": args.cnn_warmup, "timed": args.cnn_steps, "window": min(args.cnn_steps, CNN_WINDOW)},
        "mlp_steps": {"warmup": args.mlp_warmup, "timed": args.mlp_steps, "window": max(1, args.mlp_steps // 3)},
        "rounds_cnn": f"{rounds} for distml_train_2w, raw_ddp_2w, tf_mwms_2w; 1 for the context cases",
        "rounds_mlp": 1,
        "data": f"generated Fashion-MNIST-shaped .npz: {DATA_RECORDS} uint8 28x28 images, labels 0..9 (seed 0), "
        f"normalised (x * {NORM['scale']:g} - {NORM['mean']}) / {NORM['std']} (the `digits` preprocessing "
        "`distml train --train-file` applies) for every case; --worker cases: 8 random batches per worker",
        "learning_rate": 1e-3 * (WORKERS * BATCH / 64) ** 0.5,
        "optimizer": "Adam everywhere (torch fused; Keras Adam)",
        "timing": "median over windows of the timed steps after warm-up, slowest worker per window; best round",
        "distml_train": "`python -m distml.cli train --dataset digits --train-file DATA --workers 2 --threads T "
        "--max-steps W+S --device cpu` (allreduce, checkpoint every 50 steps), steps from its train_steps history",
        "raw_ddp": "torchrun --standalone, DDP(gradient_as_bucket_view) + Adam(fused), channels_last, preloaded "
        "normalised tensors indexed by a per-epoch permutation; no distml code",
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    if "tf_mwms_2w" in best:
        config["tf_mwms"] = (
            "tf_keras Sequential (same layers and sizes as distml's cnn, channels_last), "
            "MultiWorkerMirroredStrategy (TF_CONFIG, 2 workers on localhost, ring collectives over gRPC), "
            "distribute_datasets_from_function (shard, shuffle, repeat, batch 64 per replica, prefetch AUTOTUNE), "
            "model.fit(steps_per_epoch=W+S, default steps_per_execution=1), per-step stamps from a Keras callback"
        )
        config["versions"].update(best["tf_mwms_2w"].get("versions", {}))
    if any(name.endswith("_mlp") and best[name].get("parameters") for name in best):
        params = next(best[n]["parameters"] for n in best if n.endswith("_mlp"))
        config["links"] = link_model(args.link_rate, params, WORKERS)
        config["links"]["namespaces"] = "each server and each worker in its own network namespace"
    results["config"] = config
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)

    def ratio(a: str, b: str) -> float | None:
        return rate[a] / rate[b] if a in rate and b in rate else None

    ratios = {
        "allreduce2_vs_tf_mwms": ratio("distml_train_2w", "tf_mwms_2w"),
        "allreduce2_vs_raw_ddp": ratio("distml_train_2w", "raw_ddp_2w"),
        "ps2_vs_ps1_mlp": ratio("ps_2s_mlp", "ps_1s_mlp"),
        "ps4_vs_ps2_mlp": ratio("ps_4s_mlp", "ps_2s_mlp"),
        "allreduce_vs_ps2_mlp": ratio("allreduce_2w_mlp", "ps_2s_mlp"),
        "ps2_vs_ps1_mlp_loopback": ratio("ps_2s_mlp_loopback", "ps_1s_mlp_loopback"),
        "raw_ddp_vs_tf_mwms": ratio("raw_ddp_2w", "tf_mwms_2w"),
        "trainer_allreduce2_vs_raw_ddp": ratio("allreduce_2w", "raw_ddp_2w"),
        "allreduce2_vs_single": ratio("allreduce_2w", "single"),
        "ps_sync_vs_allreduce_cnn": ratio("ps_sync_2w_1s", "allreduce_2w"),
    }
    ratios = {k: round(v, 3) for k, v in ratios.items() if v is not None}
    met = {name: (ratios[name] >= target if name in ratios else None) for name, target in TARGETS.items()}
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (" (target %g: %s)" % (target, "met" if value >= target else "MISSED"))
        log(f"{name}: {value:.3f}{verdict}")
    for name, ok in met.items():
        if ok is None:
            log(f"{name}: not measured in this run (see skipped)")
    log(f"done in {results['wall_seconds']}s")
    return {"benchmark": "training", "results": results, "ratios": ratios, "targets": TARGETS, "targets_met": met}


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[sys.argv.index("--worker") + 1]))
    if "--ddp-worker" in sys.argv:
        sys.exit(ddp_worker_main(sys.argv[sys.argv.index("--ddp-worker") + 1]))
    if "--tf-worker" in sys.argv:
        sys.exit(tf_worker_main(sys.argv[sys.argv.index("--tf-worker") + 1]))
    report = main()
    print(json.dumps(report))
    if "--check" in sys.argv and any(ok is False for ok in report["targets_met"].values()):
        missed = [name for name, ok in report["targets_met"].items() if ok is False]
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)
