"""Start a training run through PyTorch's elastic launcher (torchrun), never a home-made group.

`launch(config)` prepares the data once (download, verify), writes the run's config, and calls
`torch.distributed.run` in this process with the matching flags: `--standalone` on one machine,
c10d rendezvous (`--nnodes MIN:MAX --rdzv-endpoint HOST:PORT`) across machines, `--max-restarts`
for fault tolerance. The agent restarts all workers when one fails; they resume from the run's
latest checkpoint. Returns the run's result, or None when the run was stopped by a signal.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from distml.errors import DistmlError
from distml.train.config import TrainConfig
from distml.workspace import Workspace, atomic_write


def torchrun_args(config: TrainConfig, config_path: Path) -> list[str]:
    args = [
        "--nnodes",
        config.nnodes,
        "--nproc-per-node",
        str(config.procs_per_node),
        "--max-restarts",
        str(config.max_restarts),
        "--monitor-interval",
        "0.5",
    ]
    if config.rdzv_endpoint:
        args += [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            config.rdzv_endpoint,
            "--rdzv-id",
            config.resolved_run_id(),
            "--rdzv-conf",
            f"last_call_timeout={config.rdzv_last_call_timeout},join_timeout=120",
        ]
    else:
        args += ["--standalone"]
    return args + ["-m", "distml.train.worker", str(config_path)]


def launch(config: TrainConfig) -> dict[str, Any] | None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from distml.data.datasets import get_dataset

    config = config.model_copy(update={"workspace": str(Path(config.workspace).resolve())})
    ws = Workspace(config.workspace)
    get_dataset(config.dataset, ws, config.data_dir, progress=True)  # download/verify once, not per worker
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    with atomic_write(config_path, "w") as handle:
        handle.write(config.model_dump_json(indent=1))
    result_path = run_dir / "result.json"
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "already_complete": True}
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    # With the agent's rendezvous store shared with the workers (the default since torch 2.5),
    # restarted workers can read the previous round's gloo/NCCL keys and hang in
    # init_process_group (pytorch/pytorch#135712); each round gets a fresh store without it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(parse_args(torchrun_args(config, config_path)))
    except ChildFailedError as exc:
        raise DistmlError(
            f"training failed after {config.max_restarts} restart(s): {exc.format_msg()}"
            if hasattr(exc, "format_msg")
            else f"training failed: {exc}"
        ) from None
    except SignalException as exc:
        raise Stopped(exc.sigval) from None
    if result_path.exists():
        return json.loads(result_path.read_text())
    return None


class Stopped(Exception):
    """The launcher was asked to stop (SIGTERM/SIGINT); the workers checkpointed first."""

    def __init__(self, signal_value: Any):
        super().__init__(f"stopped by {signal_value}")
        self.signal_value = signal_value
