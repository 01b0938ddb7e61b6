"""Start a training run through PyTorch's elastic launcher (torchrun), never a home-made group.

`launch(config)` prepares the data once (download, verify), writes the run's config, and calls
`torch.distributed.run` in this process with the matching flags: `--standalone` on one machine,
c10d rendezvous (`--nnodes MIN:MAX --rdzv-endpoint HOST:PORT`) across machines, `--max-restarts`
for fault tolerance. The agent restarts all workers when one fails; they resume from the run's
latest checkpoint. Returns the run's result, or None when the run was stopped by a signal.
On one machine the run's gang (a cpu slot, and a gpu on CUDA, per process) is admitted by the
workspace's scheduler first; when it is preempted, the workers checkpoint on SIGTERM, the gang
waits in its queue again and the run resumes where it stopped.

Pattern: elasticity and fault tolerance, with checkpoint.py (state at any world size), worker.py
(resume, agreed stop) and data/loader.py (an epoch resumed on another world size).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from distml.core.errors import FREE_AND_RETRY, DiskFullError, DistmlError
from distml.core.files import atomic_write
from distml.core.liveness import process_identity
from distml.scheduling.admission import JOB_ENV, Lease, Resources, SharedPool, count_gpus, pool_state
from distml.scheduling.metrics import serve_scheduler
from distml.train.config import LAUNCHER_ENV, TrainConfig
from distml.workspace import Workspace


def torchrun_args(config: TrainConfig, config_path: Path) -> list[str]:
    args = [
        "--nnodes",
        config.parallelism.nnodes,
        "--nproc-per-node",
        str(config.procs_per_node),
        "--max-restarts",
        str(config.checkpoint.max_restarts),
        "--monitor-interval",
        "0.1",  # how soon the agent sees a worker exit (or fail): the end of every run waits on it
    ]
    if config.parallelism.rdzv_endpoint:
        args += [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            config.parallelism.rdzv_endpoint,
            "--rdzv-id",
            config.resolved_run_id(),
            "--rdzv-conf",
            f"last_call_timeout={config.parallelism.rdzv_last_call_timeout},join_timeout=120,"
            f"keep_alive_interval={config.parallelism.rdzv_keep_alive},keep_alive_max_attempt=3",
        ]
    else:
        args += ["--standalone"]
    # The workers start as forks of a forkserver that has imported what they need once
    # (start_worker_forkserver), not as new interpreters that import torch each: a run's start,
    # and every restart after a failure, saves about 3 s of CPU a process.
    from distml.train import worker

    return args + ["--start-method", "forkserver", "--run-path", worker.__file__, str(config_path)]


# What the workers' forkserver imports once. torch._dynamo too: DistributedDataParallel and every
# optimizer import it on first use (1.2 s a process), although nothing here compiles.
WORKER_PRELOAD = (
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "distml.train.worker",
    "distml.train.allreduce",
    "distml.train.parameter_server",
    "distml.models.artifact",
)


def start_worker_forkserver() -> None:
    """Start this process's multiprocessing forkserver with WORKER_PRELOAD imported, now, so that
    its imports overlap the launcher's own checks; torchrun's `--start-method forkserver` forks the
    workers from it. One per process, kept for later runs: the workers see the environment this
    process had when it started, plus what torchrun sets for each (RANK, OMP_NUM_THREADS, ...).

    That environment names this process (LAUNCHER_ENV): torchrun's agent runs here, so when this
    process dies without stopping its workers (kill -9), each of them ends itself within a second
    (worker.exit_with_launcher); then the forkserver, whose `alive` pipe the workers held open,
    and the resource tracker, whose pipe they held too, see its end and exit."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(list(WORKER_PRELOAD))
    previous = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = f"{os.getpid()}:{process_identity(os.getpid()) or ''}"
    try:
        forkserver.ensure_running()
    finally:  # the forkserver's environment only, not this process's other children's
        if previous is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = previous


def launch(config: TrainConfig) -> dict[str, Any] | None:
    from distml.models.artifact import resolve_model
    from distml.train.worker import build_meta, check_init_from, check_model_fits, training_data

    ws = Workspace(Path(config.workspace.root).resolve(), config.workspace.db_url)
    # the workers open the same store: its URL, never the environment, goes with their config
    config = config.model_copy(update={"workspace": ws.ref})
    start_worker_forkserver()
    # Bad input fails here, as one error before any process starts: the model's name and arguments,
    # the data set (downloaded and verified once, not per worker), and whether the model fits it.
    model = build_meta(config)
    dataset = training_data(config, ws, progress=True)
    check_model_fits(config, model, dataset)
    if config.model.init_from is not None:  # a wrong warm start fails before any process starts
        check_init_from(config, resolve_model(ws, config.model.init_from).manifest)
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    with atomic_write(config_path, "w") as handle:
        handle.write(config.model_dump_json(indent=1))
    result_path = run_dir / "result.json"
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "already_complete": True}
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    api_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    if not any(isinstance(f, _NoPollingTraceback) for f in api_log.filters):
        api_log.addFilter(_NoPollingTraceback())
    # With the agent's rendezvous store shared with the workers (the default since torch 2.5),
    # restarted workers can read the previous round's gloo/NCCL keys and hang in
    # init_process_group (pytorch/pytorch#135712); each round gets a fresh store without it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if config.parallelism.rdzv_endpoint is not None or os.environ.get(JOB_ENV):
        # Multi-node: the rendezvous gathers the gang across machines (a cluster's scheduler, Kueue,
        # admits it there). Inside a workflow step: the step's gang is already held.
        return _run(config, config_path, result_path)
    return _run_admitted(ws, config, config_path, result_path)


class _NoPollingTraceback(logging.Filter):
    """torchrun logs a worker's non-zero exit with the traceback of its own polling code, which says
    nothing about the worker (its error is in the error file, and the launcher reports it): the
    line stays, that traceback goes (a full disk ends a run with one error, not a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and type(record.exc_info[1]).__name__ == "ProcessExitedException":
            record.exc_info, record.exc_text = None, None
        return True


def gang_request(config: TrainConfig, pool_cpus: float) -> Resources:
    """What a run holds while it trains: a task per process (workers, plus the parameter servers),
    each with the cpu slots of its threads (`threads`; by default the run's processes share the
    pool's slots, as they share the cores), and a gpu per process on CUDA when there is one for
    each (fewer gpus than processes are shared, which the scheduler cannot count per task)."""
    cpus = float(config.training.threads) if config.training.threads else pool_cpus / config.procs_per_node
    cuda = config.training.device == "cuda" or (config.training.device == "auto" and count_gpus() > 0)
    gpus = 1 if cuda and count_gpus() >= config.procs_per_node else 0
    return Resources(cpus=cpus, gpus=gpus, workers=config.procs_per_node)


def _preemptible_pool(ws: Workspace, config: TrainConfig, training: threading.Event) -> SharedPool:
    """The run's handle on the workspace's scheduler: preempted while `training` is set, it sends
    this process SIGTERM, which torchrun passes to the workers, which checkpoint and stop."""

    def stop_for_preemption(lease: Lease) -> None:
        if training.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    return SharedPool(
        ws.engine,
        queue=config.job.queue,
        priority=config.job.priority,
        kind="train",
        preemptible=True,
        on_preempt=stop_for_preemption,
    )


def _run_admitted(ws: Workspace, config: TrainConfig, config_path: Path, result_path: Path) -> dict[str, Any] | None:
    """Run under a lease of the workspace's scheduler; on preemption, requeue and resume."""
    log = logging.getLogger("distml.train")
    training = threading.Event()  # SIGTERM is only ours to send while torchrun's handlers are in place
    pool = _preemptible_pool(ws, config, training)
    run_id = config.resolved_run_id()
    read_pool = functools.partial(pool_state, ws.engine)
    endpoint = serve_scheduler(read_pool, config.run_dir() / "metrics" / "launcher.json", run=run_id)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None

    def stop_waiting(signum: int, _frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    def waiting_handlers() -> None:  # torchrun leaves its own handlers installed after a round
        if main_thread:
            signal.signal(signal.SIGTERM, stop_waiting)

    waiting_handlers()
    try:
        while True:
            lease = pool.acquire(
                run_id, gang_request(config, pool.node.cpus), waiting=lambda why: _say(f"{run_id} waits: {why}")
            )
            try:
                if pool.preempted(lease):  # chosen as a victim before it even started
                    pool.requeue(lease)
                    continue
                training.set()
                result = _run(config, config_path, result_path)
            except Stopped:
                training.clear()
                waiting_handlers()
                if pool.preempted(lease):
                    _say(f"{run_id} was preempted: checkpoint written, waiting in queue {config.job.queue} to resume")
                    pool.requeue(lease)
                    continue
                pool.release(lease, "cancelled")
                raise
            except BaseException:
                training.clear()
                pool.release(lease, "failed")
                raise
            training.clear()
            waiting_handlers()
            pool.release(lease, "finished")
            log.debug("run %s released its gang", run_id)
            return result
    finally:
        pool.close()
        endpoint.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _say(message: str) -> None:
    print(f"[distml] {message}", flush=True)


def _run(config: TrainConfig, config_path: Path, result_path: Path) -> dict[str, Any] | None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The workers set their threads themselves (TrainConfig.threads_per_process); torchrun would
    # otherwise print a banner and set OMP_NUM_THREADS=1 for them, and for this process for good.
    omp_unset = "OMP_NUM_THREADS" not in os.environ
    if omp_unset:
        os.environ["OMP_NUM_THREADS"] = str(config.threads_per_process(config.procs_per_node))
    try:
        run(parse_args(torchrun_args(config, config_path)))
    except ChildFailedError as exc:
        disk_full = _disk_full_message(exc)
        if disk_full is not None:  # the run is resumable once space is free: say so, in one line
            raise DistmlError(
                f"{disk_full.removesuffix(FREE_AND_RETRY)}free space and run the same command "
                f"again to resume run {config.resolved_run_id()} from its last checkpoint"
            ) from None
        raise DistmlError(
            f"training failed after {config.checkpoint.max_restarts} restart(s): {exc.format_msg()}"
            if hasattr(exc, "format_msg")
            else f"training failed: {exc}"
        ) from None
    except SignalException as exc:
        raise Stopped(exc.sigval) from None
    finally:
        if omp_unset:
            os.environ.pop("OMP_NUM_THREADS", None)
    if result_path.exists():
        return json.loads(result_path.read_text())
    return None


def _disk_full_message(exc: Any) -> str | None:
    """The message of a worker that stopped on a full disk (`worker.fail_cleanly` wrote it to
    torchrun's error file), or None when no worker did."""
    prefix = f"{DiskFullError.__name__}: "
    for failure in getattr(exc, "failures", {}).values():
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        if isinstance(message, str) and message.startswith(prefix):
            return message.removeprefix(prefix)
    return None


class Stopped(Exception):
    """The launcher was asked to stop (SIGTERM/SIGINT); the workers checkpointed first."""

    def __init__(self, signal_value: Any):
        super().__init__(f"stopped by {signal_value}")
        self.signal_value = signal_value
