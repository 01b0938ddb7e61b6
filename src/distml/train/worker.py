"""The worker process that PyTorch's elastic launcher starts: one obvious training loop.

Reads the run's TrainConfig, joins the process group from the launcher's environment (RANK,
WORLD_SIZE, MASTER_ADDR...), resumes from the latest complete checkpoint, trains on its shard
of the data, checkpoints every K steps, and on SIGTERM checkpoints and exits cleanly. In
parameter-server mode the first `ps_shards` ranks serve parameters and the rest train.
`distml train` forks it from a forkserver through torchrun (launcher.py); a cluster's pods run
`torchrun -m distml.train.worker CONFIG.json` (export/k8s.py).

Pattern: elasticity and fault tolerance on the worker's side (resume at any world size, stop
together on SIGTERM); collective communication or parameter servers through its trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from distml.core import DB_URL_ENV
from distml.core.errors import DiskFullError, DistmlError
from distml.core.liveness import is_running, when_gone
from distml.data.datasets import get_dataset
from distml.data.loader import Loader
from distml.train import checkpoint
from distml.train.config import LAUNCHER_ENV, TrainConfig, load_config

STOP_CHECK_EVERY = 8  # steps between the ranks' agreement on a stop request


class StopFlag:
    """Set by SIGTERM (preemption); the loop checkpoints and leaves at the next agreed point.

    A rank blocked inside a collective whose peer died (a killed parameter server) never returns
    to Python, so its handler cannot run and torchrun would wait 30 s before SIGKILL. A watchdog
    thread sees the signal through the wakeup fd (written by the C-level handler even then) and
    ends the process when the Python handler has not run within `grace_s`: no checkpoint is lost,
    since a rank that cannot run Python cannot write one either."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.requested = False
        self.grace_s = grace_s
        signal.signal(signal.SIGTERM, self._handle)
        reader, writer = os.pipe()
        os.set_blocking(writer, False)
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(reader,), name="distml-sigterm-watchdog", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def _watch(self, reader: int) -> None:
        while True:
            signals = os.read(reader, 64)
            if signal.SIGTERM not in signals:
                continue
            deadline = time.monotonic() + self.grace_s
            while not self.requested and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.requested:  # the main thread is stuck outside Python
                print("[distml] SIGTERM while blocked in a collective: exiting", file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGTERM)


def exit_with_launcher(interval: float = 0.5, grace_s: float = 10.0) -> threading.Thread | None:
    """For a worker of `distml train`: end this process once the launcher is gone, however it died
    (kill -9 included). torchrun's agent runs inside the launcher and stops its workers only when it
    is stopped itself; a worker forked from the launcher's forkserver would outlive it, training on
    (and holding the forkserver and the resource tracker alive). The launcher names itself in
    LAUNCHER_ENV ("PID:START"); without it (torchrun's own agent process, as in a cluster's pod),
    None. A checkpoint write in progress finishes first (at most `grace_s`): the run resumes from its
    last complete checkpoint. A daemon thread; returns it."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return None
    pid, _, started = launcher.partition(":")
    launcher_pid = int(pid)

    def leave() -> None:
        checkpoint.stop_writing(grace_s)
        message = f"[distml rank {os.environ.get('RANK', '?')}] the launcher (pid {pid}) is gone: exiting"
        # stderr may be a pipe that nobody reads any more: the message must not hold up the exit
        say = threading.Thread(target=_say, args=(message,), daemon=True)
        say.start()
        say.join(1.0)
        os._exit(1)

    return when_gone(lambda: is_running(launcher_pid, started or None), leave, "distml-launcher-watch", interval)


def _say(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class Context:
    """What one worker knows about itself and the run."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        self.run_dir = config.run_dir()
        self.servers = config.parallelism.ps_shards if config.parallelism.strategy == "parameter-server" else 0
        self.worker_index = self.rank - self.servers
        self.num_workers = self.world - self.servers
        self.is_server = self.rank < self.servers
        self.is_lead = self.rank == self.servers  # the first worker: checkpoints, evaluates, reports
        self.device = (
            resolve_device(config.training.device, self.local_rank) if not self.is_server else torch.device("cpu")
        )
        self.metrics: Any = None  # this rank's TrainingMetrics, served from main()

    def log(self, message: str) -> None:
        print(f"[distml rank {self.rank}/{self.world} attempt {self.restart}] {message}", file=sys.stderr, flush=True)


MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20), "MALLOC_TRIM_THRESHOLD_": (-1, 128 << 20)}


def tune_malloc() -> bool:
    """Keep a step's freed buffers in the heap for the next step (glibc only; returns whether set).

    glibc hands every freed block above its mmap threshold (128 KiB until a large block is freed)
    back to the kernel, so each step's activations (MBs for the cnn) are page-faulted in again:
    the cnn's 2-worker CPU step took 61 ms instead of 54. An mmap threshold of 32 MiB and a trim
    threshold of 128 MiB keep them, as jemalloc or tcmalloc would. A setting the user made
    through the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) is left alone."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or any(name in os.environ for name in MALLOC_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return all(mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS.values())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    exit_with_launcher()
    config = load_config(argv[0])
    if config.workspace.db_url is None and os.environ.get(DB_URL_ENV):  # a cluster's pod: the URL from a Secret
        config = config.updated({"workspace.db_url": os.environ[DB_URL_ENV]})
    tune_malloc()
    ctx = Context(config)
    threads = config.threads_per_process(ctx.local_world)
    torch.set_num_threads(threads)
    if ctx.num_workers < 1:
        ctx.log(f"parameter-server mode needs at least one worker besides {ctx.servers} servers")
        return 2
    # NCCL needs one GPU per rank ("Duplicate GPU detected" otherwise); with more local ranks
    # than GPUs, gloo moves the CUDA tensors instead. Parameter servers talk gloo on CPU tensors.
    nccl_ok = ctx.device.type == "cuda" and ctx.local_world <= torch.cuda.device_count()
    backend = "nccl" if nccl_ok and config.parallelism.strategy == "allreduce" else "gloo"
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend)
    if ctx.rank == 0:
        ctx.log(f"process group {backend}, device {ctx.device}, {torch.get_num_threads()} threads per rank")
    stop = StopFlag()
    ctx.metrics, endpoint = start_metrics(ctx)
    try:
        if ctx.is_server:
            serve(ctx, stop)
        else:
            train(ctx, stop)
    except DiskFullError as exc:  # the run stays resumable from its last complete checkpoint
        fail_cleanly(ctx, exc)
    finally:
        endpoint.close()
    # Leave together: a rank that exits while the lead still evaluates can make gloo abort peers.
    dist.barrier()
    dist.destroy_process_group()
    if stop.requested:
        # Stopped by SIGTERM: the launcher is shutting down and reads no result, so a worker
        # forked by it leaves now instead of waiting (torch's multiprocessing hands a function's
        # result back to the parent, which would kill it after 30 s).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def fail_cleanly(ctx: Context, exc: DistmlError) -> None:
    """End this rank on an error the user can act on (a full disk): one line on stderr instead of
    a traceback, and the message in torchrun's error file, from which the launcher reports it."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ctx.log(f"error: {exc}")
    with contextlib.suppress(OSError):  # the error file may sit on the full disk too
        ErrorHandler().record_exception(exc)
    raise SystemExit(1) from None


# -- shared pieces ----------------------------------------------------------------------------


def start_metrics(ctx: Context):
    """Every rank serves its Prometheus metrics on a free port (the lead on `metrics_port` when
    set) and records where in RUN/metrics/rank-N.json."""
    from distml.monitoring.metrics import TrainingMetrics

    metrics = TrainingMetrics(ctx.config.resolved_run_id(), ctx.rank)
    metrics.world_size.set(ctx.num_workers)
    metrics.restarts.set(ctx.restart)
    port = ctx.config.job.metrics_port if ctx.is_lead and ctx.config.job.metrics_port is not None else 0
    endpoint = metrics.serve(port, endpoint_file=ctx.run_dir / "metrics" / f"rank-{ctx.rank}.json")
    if ctx.is_lead and ctx.config.job.metrics_port is not None:
        ctx.log(f"Prometheus metrics at {endpoint.url}")
        from distml.core.files import atomic_write

        with atomic_write(ctx.run_dir / "metrics_port", "w") as handle:  # a reader never sees it half written
            handle.write(str(endpoint.port))
    return metrics, endpoint


def make_loader(ctx: Context, dataset, split: str = "train", **kwargs) -> Loader:
    from distml.workspace import Workspace

    return Loader(
        dataset.splits[split],
        batch_size=ctx.config.data.batch_size,
        shard=(max(ctx.worker_index, 0), ctx.num_workers),
        seed=ctx.config.training.seed,
        preprocess=dataset.preprocess,
        cache="disk",
        workspace=Workspace.open(ctx.config.workspace),
        **kwargs,
    )


def planned_steps(config: TrainConfig, loader: Loader, step: int) -> int:
    """The step at which this attempt ends: the rest of the current epoch plus the remaining
    epochs at the current world size (an elastic resize changes steps per epoch, not epochs)."""
    left = 0
    if loader.epoch < config.training.epochs:
        left = loader.batches_left() + (config.training.epochs - loader.epoch - 1) * len(loader)
    total = step + left
    return min(total, config.training.max_steps) if config.training.max_steps else total


def build(config: TrainConfig) -> torch.nn.Module:
    """The model at step 0: the same random weights on every rank, or `init_from`'s (warm start)."""
    from distml.models.zoo import build_model

    torch.manual_seed(config.training.seed)  # every rank starts from the same weights
    model = build_model(config.model.name, **config.model.args)
    if config.model.init_from is not None:
        from distml.models.artifact import load_model

        source, manifest = load_model(_workspace(config), config.model.init_from)
        check_init_from(config, manifest)
        model.load_state_dict(source.state_dict())
    return model


def check_init_from(config: TrainConfig, manifest: dict[str, Any]) -> None:
    """A warm start needs the same architecture and arguments (the weights must fit)."""
    if manifest["architecture"] != config.model.name or manifest.get("arch_args", {}) != config.model.args:
        raise DistmlError(
            f"init_from {config.model.init_from} is a {manifest['architecture']} {manifest.get('arch_args', {})}; "
            f"it cannot start a {config.model.name} {config.model.args}: use a model of the same architecture"
        )


def build_meta(config: TrainConfig) -> torch.nn.Module:
    """The model on the meta device (shapes only, no memory): a bad name or argument fails here."""
    from distml.models.zoo import build_model

    with torch.device("meta"):
        return build_model(config.model.name, **config.model.args)


# Up to this many parameters the fit check runs on the CPU (milliseconds, a few MB); above, on the
# meta device, whose Python kernels import torch._dynamo and sympy on first use (1.2 s a launch).
FIT_CHECK_CPU_PARAMETERS = 20_000_000


def check_model_fits(config: TrainConfig, model: torch.nn.Module, dataset: Any) -> None:
    """The model (built on the meta device) takes the data set's images and gives one score per
    class: a forward pass of two images, so a model that does not fit fails before any worker
    starts. A small model is built again on the CPU for it."""
    from distml.models.zoo import build_model

    shape, classes = tuple(dataset.image_shape), len(dataset.class_names)
    described = f"model {config.model.name!r}" + (f" with {config.model.args}" if config.model.args else "")
    size = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    device = "cpu" if size <= FIT_CHECK_CPU_PARAMETERS else "meta"
    if device == "cpu":
        model = build_model(config.model.name, **config.model.args)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape, device=device))
    except Exception as exc:  # a factory's own module: any error of its forward means it does not fit
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistmlError(
            f"{described} does not take the {dataset.name} images (shape {list(shape)}): {reason}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DistmlError(
            f"{described} gives outputs of shape {got} for 2 {dataset.name} images; "
            f"training needs [N, {classes}], one score per class (set num_classes={classes})"
        )


def training_data(config: TrainConfig, ws: Any, progress: bool = False) -> Any:
    """The run's data set: the named one, with its train split replaced by `train_files` if given."""
    from distml.data.datasets import with_train_files

    dataset = get_dataset(config.data.dataset, ws, config.data.data_dir, progress=progress)
    return with_train_files(dataset, config.data.train_files) if config.data.train_files else dataset


def agree_stop(local: bool, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


# -- parameter server ranks ------------------------------------------------------------------


def serve(ctx: Context, stop: StopFlag) -> None:
    from distml.train.parameter_server import PSServer, ShardLayout

    config = ctx.config
    dataset = training_data(config, _workspace(config))
    loader = make_loader(ctx, dataset)
    model = build(config)
    params = list(model.parameters())
    layout = ShardLayout.balanced(params, ctx.servers)
    worker_ranks = list(range(ctx.servers, ctx.world))
    staleness_log = (
        _StalenessLog(ctx) if config.training.log_samples and config.parallelism.ps_mode == "async" else None
    )
    server = PSServer(
        ctx.rank,
        layout.flat(params, ctx.rank),
        worker_ranks,
        config.learning_rate(ctx.num_workers),
        config.parallelism.ps_mode,
        config.parallelism.ps_staleness,
        config.optimizer.name,
        record=staleness_log.record if staleness_log is not None else None,
    )
    step = checkpoint.latest_step(ctx.run_dir) or 0
    if step:
        server.load_state_dict(checkpoint.load_part(ctx.run_dir, step, f"ps-shard-{ctx.rank}"))
        loader.load_state_dict(checkpoint.load_part(ctx.run_dir, step, "trainer")["loader"])
    total = planned_steps(config, loader, step)
    ctx.metrics.step.set(step)
    ctx.log(
        f"serving shard {ctx.rank} ({layout.numels[ctx.rank]:,} parameters) to {len(worker_ranks)} workers, "
        f"{config.parallelism.ps_mode}, from step {step} of {total}"
    )
    server.broadcast()
    try:
        _serve_segments(ctx, stop, server, step, total, worker_ranks)
    finally:
        if staleness_log is not None:
            staleness_log.close()


def _serve_segments(ctx: Context, stop: StopFlag, server: Any, step: int, total: int, worker_ranks: list[int]) -> None:
    config = ctx.config
    while step < total:
        boundary = min(total, (step // config.checkpoint.every + 1) * config.checkpoint.every)
        if config.parallelism.ps_mode == "sync":
            for _ in range(boundary - step):
                server.serve_sync_step()
        else:
            clocks = {rank: step for rank in worker_ranks}
            server.serve_async(len(worker_ranks) * (boundary - step), clocks, boundary)
        step = boundary
        ctx.metrics.step.set(step)
        checkpoint.save_part(ctx.run_dir, step, f"ps-shard-{ctx.rank}", server.state_dict())
        if agree_stop(stop.requested, torch.device("cpu")):
            ctx.log(f"stopping at step {step} (SIGTERM), checkpoint written")
            return


class _StalenessLog:
    """RUN/staleness/attemptA-rankR-pidP.log (with `log_samples`): a line per async gradient
    applied, `worker step w1:c1,w2:c2...`, the workers' steps its parameters held (tests)."""

    def __init__(self, ctx: Context):
        folder = ctx.run_dir / "staleness"
        folder.mkdir(parents=True, exist_ok=True)
        self.handle = open(folder / f"attempt{ctx.restart}-rank{ctx.rank}-pid{os.getpid()}.log", "a")

    def record(self, src: int, clock: int, based_on: dict[int, int]) -> None:
        self.handle.write(f"{src} {clock} {','.join(f'{r}:{c}' for r, c in sorted(based_on.items()))}\n")

    def close(self) -> None:
        self.handle.close()


def _workspace(config: TrainConfig):
    from distml.workspace import Workspace

    return Workspace.open(config.workspace)


# -- training ranks ---------------------------------------------------------------------------


def train(ctx: Context, stop: StopFlag) -> None:
    """The rank's loop: resume from the last checkpoint, then step, report and checkpoint until the
    planned steps are done or every rank agreed to stop (SIGTERM)."""
    from distml.train.progress import Reporter

    config = ctx.config
    ws = _workspace(config)
    dataset = training_data(config, ws)
    loader = make_loader(ctx, dataset, with_index=config.training.log_samples)
    loader.fill_cache()
    model = build(config)
    trainer = _make_trainer(ctx, model)
    step = _resume(ctx, trainer, loader)
    total = planned_steps(config, loader, step)

    metrics = ctx.metrics
    metrics.step.set(step)
    reporter = None
    if ctx.is_lead:  # every rank updates its own metrics below, the reporter only the store and the bar
        reporter = Reporter(ws, config, total, step, ctx.num_workers * config.data.batch_size)
        record_lineage(ctx, ws, dataset, "running")
    sample_log = _sample_log(ctx) if config.training.log_samples else None

    stopped = False
    while step < total and not stopped:
        for batch in loader:
            started = time.perf_counter()
            x = batch["image"].to(ctx.device, non_blocking=True)
            y = batch["label"].to(ctx.device, non_blocking=True).long()
            loss = trainer.train_step(x, y)
            step += 1
            if sample_log is not None:
                sample_log.write(f"{step} {','.join(map(str, batch['index'].tolist()))}\n")
                sample_log.flush()
            seconds = time.perf_counter() - started
            metrics.observe_step(step, loss, seconds, len(y))
            if reporter is not None:
                reporter.step(step, float(loss), seconds, loader.epoch)
            stopped = _checkpoint_or_stop(ctx, stop, step, total, trainer, loader, reporter)
            if stopped or step >= total:
                break
    if stopped:
        ctx.log(f"stopping at step {step} (SIGTERM), checkpoint written; run the same command to resume")
        return
    if ctx.is_lead:
        finish(ctx, dataset, trainer, model, step, reporter)


def _make_trainer(ctx: Context, model: torch.nn.Module) -> Any:
    """The strategy's trainer: DDP allreduce, or a worker of the parameter servers."""
    config = ctx.config
    if config.parallelism.strategy == "allreduce":
        from distml.train.allreduce import AllReduceTrainer

        lr = config.learning_rate(ctx.num_workers)
        return AllReduceTrainer(model, lr, ctx.device, ctx.world, config.optimizer.name)
    from distml.train.parameter_server import PSWorker

    return PSWorker(model.to(ctx.device), list(range(ctx.servers)), config.parallelism.ps_mode, ctx.device)


def _resume(ctx: Context, trainer: Any, loader: Loader) -> int:
    """Restore the trainer, the loader's position and the RNGs from the run's last checkpoint
    (written at any world size); the step to go on from, 0 for a new run."""
    step = checkpoint.latest_step(ctx.run_dir) or 0
    if step:
        state = checkpoint.load_part(ctx.run_dir, step, "trainer")
        trainer.load_state_dict(state["trainer"])
        loader.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])
        ctx.log(f"resumed from the checkpoint of step {step} (epoch {loader.epoch}, world size {ctx.world})")
    if ctx.config.parallelism.strategy == "parameter-server":
        trainer.pull()
    return step


def _checkpoint_or_stop(
    ctx: Context, stop: StopFlag, step: int, total: int, trainer: Any, loader: Loader, reporter: Any
) -> bool:
    """After `step`: write a checkpoint at each boundary (every checkpoint_every steps, and the
    last), and tell whether every rank agreed to stop; a stopping run checkpoints first."""
    config = ctx.config
    boundary = step % config.checkpoint.every == 0 or step >= total
    if config.parallelism.strategy == "allreduce":
        # ranks agree on a SIGTERM every few steps (and at checkpoints): one collective per
        # step cost 3% of a cnn step and more on large models
        stopped = False
        if ctx.world == 1:
            stopped = stop.requested
        elif boundary or step % STOP_CHECK_EVERY == 0:
            stopped = agree_stop(stop.requested, ctx.device)
        if (boundary or stopped) and ctx.is_lead:
            save_checkpoint(ctx, step, trainer, loader, reporter)
        return stopped
    if not boundary:
        return False
    if ctx.is_lead:
        checkpoint.save_part(ctx.run_dir, step, "trainer", _trainer_state(step, trainer, loader))
    stopped = agree_stop(stop.requested, torch.device("cpu"))  # all parts are on disk now
    if ctx.is_lead:
        checkpoint.commit(ctx.run_dir, step)
        if reporter is not None:
            reporter.flush()
    return stopped


def _trainer_state(step: int, trainer: Any, loader: Loader) -> dict[str, Any]:
    return {"step": step, "trainer": trainer.state_dict(), "loader": loader.state_dict(), "rng": checkpoint.rng_state()}


def save_checkpoint(ctx: Context, step: int, trainer: Any, loader: Loader, reporter: Any) -> None:
    checkpoint.save_part(ctx.run_dir, step, "trainer", _trainer_state(step, trainer, loader))
    checkpoint.commit(ctx.run_dir, step)
    if reporter is not None:
        reporter.flush()


def _sample_log(ctx: Context):
    folder = ctx.run_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"attempt{ctx.restart}-rank{ctx.rank}-pid{os.getpid()}.log", "a")


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, device: torch.device, workspace) -> float:
    loader = Loader(
        dataset.splits["test"],
        batch_size=512,
        shuffle=False,
        preprocess=dataset.preprocess,
        cache="disk",
        workspace=workspace,
    )
    model.eval()
    correct = seen = 0
    for batch in loader:
        logits = model(batch["image"].to(device))
        correct += int((logits.argmax(1).cpu() == batch["label"].long()).sum())
        seen += len(batch["label"])
    model.train()
    return correct / max(seen, 1)


def record_lineage(ctx: Context, ws: Any, dataset: Any, state: str, model_digest: str | None = None) -> None:
    """The run in the lineage graph: its parameters, code and data snapshots (train and test splits)
    as it starts, and its last checkpoint and saved model as it completes."""
    from distml.lineage import record as lineage

    config = ctx.config
    data = []
    for split, source in dataset.splits.items():
        if split == "train" and config.data.train_files:  # one snapshot per file (continuous training's arrivals)
            for path, member in zip(config.data.train_files, source.members, strict=True):
                data.append(
                    dict(
                        name=dataset.name,
                        split=split,
                        fingerprint=member.fingerprint(),
                        uri=f"file:{path}",
                        num_records=len(member),
                    )
                )
            continue
        data.append(
            dict(
                name=dataset.name,
                split=split,
                fingerprint=source.fingerprint(),
                uri=dataset.uri,
                num_records=len(source),
            )
        )
    last = checkpoint.latest_step(ctx.run_dir) if model_digest is not None else None
    lineage.record_training(
        ws.engine,
        config.resolved_run_id(),
        state=state,
        parameters=config.flat(),  # the records keep the flat form of the settings
        data=data,
        checkpoint={"uri": str(checkpoint.step_dir(ctx.run_dir, last)), "step": last} if last else None,
        model_digest=model_digest,
    )


def finish(ctx: Context, dataset, trainer: Any, model: torch.nn.Module, step: int, reporter: Any) -> None:
    from distml.models.artifact import save_model

    config = ctx.config
    ws = _workspace(config)
    accuracy = evaluate(model, dataset, ctx.device, ws)
    source = dataset.splits["train"]
    record = save_model(
        ws,
        model.cpu(),
        name=config.model.name,
        architecture=config.model.name,
        arch_args=config.model.args,
        input_spec={"name": "image", "shape": list(dataset.image_shape), "datatype": "FP32"},
        preprocessing={
            **dataset.serving,
            "dataset": dataset.name,
            "steps": dataset.preprocess.params(),
            "key": dataset.preprocess.key,
        },
        class_names=list(dataset.class_names),
        metrics={"test_accuracy": accuracy, "steps": step},
        training=config.flat(),
        data_fingerprint=source.fingerprint(),
        lineage={"run_id": config.resolved_run_id()},
    )
    record_lineage(ctx, ws, dataset, "complete", record.manifest_digest)
    if reporter is not None:
        reporter.finish(accuracy, f"{record.name}:{record.version}")
    result = {
        "run_id": config.resolved_run_id(),
        "steps": step,
        "test_accuracy": accuracy,
        "model": f"{record.name}:{record.version}",
        "manifest": record.manifest_digest,
        "world_size": ctx.world,
        "workers": ctx.num_workers,
    }
    from distml.core.files import atomic_write

    with atomic_write(ctx.run_dir / "result.json", "w") as handle:  # its presence says the run is complete
        handle.write(json.dumps(result, indent=1))
    ctx.log(f"done: {step} steps, test accuracy {accuracy:.4f}, model {record.name}:{record.version}")


if __name__ == "__main__":
    sys.exit(main())
