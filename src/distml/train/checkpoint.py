"""Checkpoints of a run: written atomically, found again by the next attempt of the same run.

`runs/<id>/checkpoints/step-<N>/` holds one file per part (the trainer's state, and one per
parameter-server shard); the `LATEST` file names the newest complete checkpoint and is only
replaced after every part is on disk, so a crash mid-write leaves the previous one in force.
Files are written with torch.save (into memory, then through `atomic_write`, so a full disk
raises `DiskFullError` with the previous checkpoint intact) and read with
`torch.load(weights_only=True)`, which restores tensors and plain containers only and never
runs pickled code. Older checkpoints are removed only after `LATEST` names the new one. A
process about to end abruptly (a worker whose launcher died) waits for the write in progress
(`stop_writing`), so that it leaves no temp file behind either.

Pattern: fault tolerance (a restarted or resized run resumes here; see launcher.py).
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distml.core.errors import DiskFullError, DistmlError
from distml.core.files import atomic_write

LATEST = "LATEST"

# Held while this process writes a checkpoint file or commits one; `stop_writing` takes it for good.
_writing = threading.Lock()


def stop_writing(timeout: float) -> bool:
    """Wait (at most `timeout` s) for this process's checkpoint write in progress to finish, and let
    no other start: for a process that is about to end abruptly. True when no write was left."""
    return _writing.acquire(timeout=timeout)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_part(run_dir: Path, step: int, part: str, state: dict[str, Any]) -> Path:
    """Write one part of the checkpoint for `step` (atomic: temp file + rename)."""
    path = step_dir(run_dir, step) / f"{part}.pt"
    # torch.save writes into memory first: its own file writer reports a full disk as a bare
    # RuntimeError, while atomic_write names the path and leaves no temp file behind
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    try:
        with _writing, atomic_write(path, size=data.nbytes) as handle:
            handle.write(data)
    except DiskFullError:
        with contextlib.suppress(OSError):  # an incomplete checkpoint's folder, if nothing is in it
            path.parent.rmdir()
        raise
    return path


def commit(run_dir: Path, step: int, keep: int = 2) -> None:
    """Mark the checkpoint of `step` complete, then drop all but the newest `keep` up to it (a
    failed write of `LATEST` leaves every checkpoint, the previous complete one in force)."""
    with _writing:
        with atomic_write(Path(run_dir) / "checkpoints" / LATEST, "w") as handle:
            handle.write(str(step))
        current = step_dir(run_dir, step)
        done = sorted(p for p in current.parent.glob("step-*") if p.is_dir() and p.name <= current.name)
        for old in done[:-keep]:
            if old != current:
                shutil.rmtree(old, ignore_errors=True)


def latest_step(run_dir: Path) -> int | None:
    path = Path(run_dir) / "checkpoints" / LATEST
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise DistmlError(f"{path} should hold a step number, found {text[:40]!r}; delete it to start the run over")
    return int(text)


def load_part(run_dir: Path, step: int, part: str) -> dict[str, Any]:
    path = step_dir(run_dir, step) / f"{part}.pt"
    if not path.exists():
        raise DistmlError(f"checkpoint part {path} is missing; the checkpoint of step {step} is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: name it
        raise DistmlError(f"checkpoint part {path} cannot be read ({exc.__class__.__name__}: {exc})") from None


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
