"""A full disk under each kind of write: a checkpoint, an artifact, the data cache, a service
record, a step's result and a real training run. Each gets one `DiskFullError` naming the path,
leaves what was stored before intact and no temp file behind, and works again once space is free.

The full filesystem is a small tmpfs mounted for the test (root only; skipped otherwise).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from distml.core.errors import DiskFullError
from distml.core.files import ArtifactStore
from distml.core.layout import ServiceRecord
from distml.train import checkpoint

NO_SPACE = "no space left on device writing"


class SmallDisk:
    """A tmpfs of `size` bytes mounted at `path`; `fill()` takes all its free space, `free()` gives
    it back."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = Path(path), size
        self.filler = self.path / f"filler-{uuid.uuid4().hex[:6]}"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 16, 1 << 12, 1):  # then whatever part of a page is left
                chunk = b"\0" * size
                try:
                    while True:
                        os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_disk():
    """Mount a tmpfs at a folder the test names (`small_disk(path, MiB)`); unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    mounted: list[Path] = []

    def mount(path: Path, mib: int = 4) -> SmallDisk:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)], capture_output=True, text=True
        )
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        mounted.append(path)
        return SmallDisk(path, mib << 20)

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not p.name.startswith("filler-")
    }


def check_error(exc: DiskFullError, path: Path, disk: SmallDisk) -> None:
    message = str(exc)
    assert message.startswith(f"{NO_SPACE} {path} ("), message
    assert f"the filesystem at {disk.path} has " in message and "free" in message, message
    assert exc.path == str(path)


def test_service_record(tmp_path, small_disk):
    disk = small_disk(tmp_path / "ws", 2)
    before = ServiceRecord("digits", "http://127.0.0.1:8000", "cnn:1", 123, "s1")
    before.write(disk.path)
    path = disk.path / "services" / "digits" / "service.json"
    stored = path.read_bytes()
    disk.fill()
    after = before.serving("cnn:2")
    with pytest.raises(DiskFullError) as info:
        after.write(disk.path)
    check_error(info.value, path, disk)
    assert path.read_bytes() == stored and ServiceRecord.read(disk.path, "digits", alive=False) == before
    assert temp_files(disk.path) == []
    disk.free()
    after.write(disk.path)
    assert ServiceRecord.read(disk.path, "digits", alive=False) == after


def test_checkpoint_keeps_the_previous_one(tmp_path, small_disk):
    """A part that does not fit, and a `LATEST` that does not fit after its parts did: either way
    the previous checkpoint stays complete and in force (nothing rotated away before the new one
    is committed), and the next attempt writes the same step."""
    disk = small_disk(tmp_path / "run", 4)
    state = {"w": torch.arange(100_000, dtype=torch.float32)}  # 400 KB a part
    checkpoint.save_part(disk.path, 1, "trainer", state)
    checkpoint.commit(disk.path, 1, keep=1)
    before = digests(disk.path)
    disk.fill()
    part = checkpoint.step_dir(disk.path, 2) / "trainer.pt"
    with pytest.raises(DiskFullError) as info:
        checkpoint.save_part(disk.path, 2, "trainer", {"w": state["w"] * 2})
    check_error(info.value, part, disk)
    assert "needed" in str(info.value)
    assert digests(disk.path) == before and checkpoint.latest_step(disk.path) == 1
    assert not checkpoint.step_dir(disk.path, 2).exists(), "the failed checkpoint's empty folder is gone"
    assert temp_files(disk.path) == []
    disk.free()
    checkpoint.save_part(disk.path, 2, "trainer", {"w": state["w"] * 2})
    disk.fill()  # the part is on disk, the commit finds no room
    with pytest.raises(DiskFullError) as info:
        checkpoint.commit(disk.path, 2, keep=1)
    check_error(info.value, disk.path / "checkpoints" / "LATEST", disk)
    assert checkpoint.latest_step(disk.path) == 1
    torch.testing.assert_close(checkpoint.load_part(disk.path, 1, "trainer")["w"], state["w"])
    assert temp_files(disk.path) == []
    disk.free()
    checkpoint.commit(disk.path, 2, keep=1)
    assert checkpoint.latest_step(disk.path) == 2 and not checkpoint.step_dir(disk.path, 1).exists()
    torch.testing.assert_close(checkpoint.load_part(disk.path, 2, "trainer")["w"], state["w"] * 2)


MLP = {"width": 64, "depth": 1}  # 200 KB of weights


def save_mlp(ws, model):
    from distml.models.artifact import IMAGE_INPUT_SPEC, save_model

    return save_model(
        ws, model, name="m", architecture="mlp", arch_args=MLP, input_spec=IMAGE_INPUT_SPEC, preprocessing={},
        class_names=[str(i) for i in range(10)], metrics={}, training={}, data_fingerprint=None,
    )  # fmt: skip


def test_artifacts_and_a_model(tmp_path, small_disk):
    from distml.models import zoo
    from distml.models.artifact import load_model
    from distml.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    try:
        disk = small_disk(ws.artifacts.root, 2)
        store = ArtifactStore(disk.path)
        stored = [store.put_bytes(os.urandom(50_000)) for _ in range(3)]
        model = zoo.build_model("mlp", **MLP)
        first = save_mlp(ws, model)
        before = digests(disk.path)
        disk.fill()
        blob = os.urandom(60_000)
        with pytest.raises(DiskFullError) as info:
            store.put_bytes(blob)
        check_error(info.value, store.path(hashlib.sha256(blob).hexdigest()), disk)
        assert "58.6 KiB needed" in str(info.value)
        with torch.no_grad():
            next(model.parameters()).add_(1)  # new weights: a blob the store does not hold
        with pytest.raises(DiskFullError, match=f"{NO_SPACE} {disk.path}/"):
            save_mlp(ws, model)
        assert digests(disk.path) == before, "every stored blob intact"
        assert all(hashlib.sha256(store.get_bytes(d)).hexdigest() == d for d in stored)
        assert temp_files(disk.path) == []
        disk.free()
        assert store.get_bytes(store.put_bytes(blob)) == blob
        second = save_mlp(ws, model)
        assert (first.version, second.version) == (1, 2)
        load_model(ws, "m:1")
        load_model(ws, "m:2")
    finally:
        ws.close()


def test_data_cache(tmp_path, small_disk):
    from distml.data.cache import build_disk, cache_key
    from distml.data.sources import ArraySource

    disk = small_disk(tmp_path / "cache", 2)
    rng = np.random.default_rng(0)
    small = ArraySource({"x": rng.random((100, 8), dtype=np.float32)}, name="small")
    kept = build_disk(small, lambda c: c, cache_key(small, "id"), disk.path)
    before = digests(disk.path)
    big = ArraySource({"x": rng.random((1000, 1000), dtype=np.float32)}, chunk_rows=100, name="big")  # 4 MB
    key = cache_key(big, "id")
    with pytest.raises(DiskFullError) as info:
        build_disk(big, lambda c: c, key, disk.path)
    check_error(info.value, disk.path / key, disk)
    after = {name: digest for name, digest in digests(disk.path).items() if name != f"{key}.lock"}  # empty
    assert after == before and temp_files(disk.path) == [] and not (disk.path / key).exists()
    np.testing.assert_array_equal(np.asarray(kept.columns["x"]), small.columns["x"])
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk.path)], check=True)  # "space freed"
    built = build_disk(big, lambda c: c, key, disk.path)
    np.testing.assert_array_equal(np.asarray(built.columns["x"]), big.columns["x"])


STEP_PIPELINE = """
from pathlib import Path
from distml.workflow import Artifact, step

@step
def report(size: int) -> Artifact:
    path = Path({folder!r}) / f"report-{{size}}.bin"
    path.write_bytes(bytes(range(256)) * (size // 256))
    return Artifact(path)

def pipeline():
    return report(200_000)
"""


def test_step_result(tmp_path, small_disk):
    from distml.workflow.orchestrator import resume_run, run_pipeline
    from distml.workspace import Workspace

    out = tmp_path / "out"
    out.mkdir()
    path = tmp_path / "pipeline_full.py"
    path.write_text(textwrap.dedent(STEP_PIPELINE.format(folder=str(out))))
    ws = Workspace(tmp_path / "ws")
    try:
        disk = small_disk(ws.artifacts.root, 2)
        stored = ArtifactStore(disk.path).put_bytes(b"an earlier artifact")
        before = digests(disk.path)
        disk.fill()
        failed = run_pipeline(ws, f"{path}:pipeline")
        assert failed.status == "failed"
        error = str(failed.states["report"].error)
        assert f"DiskFullError: {NO_SPACE} {disk.path}/" in error and "free" in error, error
        assert digests(disk.path) == before and temp_files(disk.path) == []
        disk.free()
        resumed = resume_run(ws, failed.run_id)
        assert resumed.status == "succeeded", resumed.states["report"].error
        digest = resumed.result["__artifact__"]
        assert ArtifactStore(disk.path).get_bytes(digest) == (out / "report-200000.bin").read_bytes()
        assert ArtifactStore(disk.path).get_bytes(stored) == b"an earlier artifact"
    finally:
        ws.close()


@pytest.mark.slow
@pytest.mark.heavy("training-faults")
@pytest.mark.timeout(120)
def test_training_run_fills_the_disk_then_resumes(tmp_path, small_disk):
    """The runs folder fills after the first checkpoint: the run ends with the one error (no
    traceback), the last checkpoint complete; with space freed the same command finishes it."""
    disk = small_disk(tmp_path / "ws" / "runs", 8)
    run = disk.path / "full"
    args = ["--dataset", "digits", "--workers", "1", "--batch-size", "32", "--threads", "1", "--max-steps", "100"]
    args += ["--checkpoint-every", "5", "--run-id", "full"]
    command = [sys.executable, "-m", "distml.cli", "--workspace", str(tmp_path / "ws"), "train", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (run / "checkpoints" / checkpoint.LATEST).exists() and proc.poll() is None:
            time.sleep(0.005)  # a hang ends at the test's timeout
        assert proc.poll() is None, "the run ended before its first checkpoint"
        disk.fill()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert f"error: {NO_SPACE} {run}/checkpoints/step-" in err, err[-3000:]
    assert "free space and run the same command again to resume run full" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped_at = checkpoint.latest_step(run)
    assert stopped_at is not None and 5 <= stopped_at < 100
    assert checkpoint.load_part(run, stopped_at, "trainer")["step"] == stopped_at
    assert temp_files(run) == [] and not (run / "result.json").exists()
    disk.free()
    again = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from the checkpoint of step {stopped_at}" in again.stderr
    assert json.loads((run / "result.json").read_text())["steps"] == 100
