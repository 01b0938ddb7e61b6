"""What the lead worker reports while training: a progress line and the metadata store.

A rich progress bar (loss, samples/s) on a terminal, one log line per ~5% otherwise; per-step
metrics are buffered and written to the metadata store at each checkpoint, in one transaction.
(Prometheus metrics are each rank's own, served by the worker.)
"""

from __future__ import annotations

import sys
import time
from typing import Any

from distml.train import store


class Reporter:
    def __init__(self, workspace: Any, config: Any, total: int, start_step: int, global_batch: int):
        self.workspace, self.config, self.total, self.global_batch = workspace, config, total, global_batch
        self.run_id = config.resolved_run_id()
        self.rows: list[dict[str, Any]] = []
        self.last: float | None = None
        self.samples_per_s = 0.0
        self.every = max(1, total // 20)
        self.bar = None
        store.record_train_run(workspace.engine, self.run_id, config.flat(), status="running")
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training {task.fields[model]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:,.0f} samples/s"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task(
                "train", total=total, completed=start_step, model=config.model.name, loss=float("nan"), speed=0.0
            )

    def step(self, step: int, loss: float, seconds: float, epoch: int) -> None:
        """Record one step; `seconds` is its compute time, throughput counts the data wait too."""
        now = time.perf_counter()
        wall = now - self.last if self.last is not None else seconds
        self.last = now
        instant = self.global_batch / max(wall, 1e-9)
        # exponential moving average for the display, the step's own figure for the store
        self.samples_per_s = instant if self.samples_per_s == 0 else 0.9 * self.samples_per_s + 0.1 * instant
        self.rows.append(
            {"step": step, "epoch": epoch, "loss": loss, "step_seconds": seconds, "samples_per_s": instant}
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, speed=self.samples_per_s)
        elif step % self.every == 0 or step == self.total:
            print(
                f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} {self.samples_per_s:,.0f} samples/s",
                file=sys.stderr,
                flush=True,
            )

    def flush(self) -> None:
        if self.rows:
            store.record_train_steps(self.workspace.engine, self.run_id, self.rows)
            self.rows = []

    def finish(self, accuracy: float, model_ref: str) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.stop()
        store.record_train_run(
            self.workspace.engine,
            self.run_id,
            self.config.flat(),
            status="complete",
            result={"test_accuracy": accuracy, "model": model_ref},
        )
