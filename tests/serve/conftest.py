"""Serving fixtures: a workspace with tiny real model artifacts and model-server replicas as processes.

Nothing is trained: `cnn` (versions 1 and 2, alias champion -> 1) and `mlp` are built from the
zoo with fixed seeds and saved with `save_model`; servers start through the replica contract
(`python -m distml.serve.server ... --port 0 --port-file P`) and are found through the port file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _save(workspace, arch: str, seed: int):
    import torch

    from distml.data import datasets
    from distml.data.preprocess import Normalize
    from distml.models.artifact import IMAGE_INPUT_SPEC, save_model
    from distml.models.zoo import build_model

    torch.manual_seed(seed)
    model = build_model(arch)
    normalize = Normalize("image", mean=datasets.FASHION_MNIST_MEAN, std=datasets.FASHION_MNIST_STD, scale=1 / 255)
    return save_model(
        workspace,
        model,
        name=arch,
        architecture=arch,
        arch_args={},
        input_spec=IMAGE_INPUT_SPEC,
        # what distml.train.worker records for a Fashion-MNIST run
        preprocessing={
            **datasets.pixel_serving((28, 28), datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD),
            "dataset": "fashion-mnist",
            "steps": normalize.params(),
            "key": normalize.key,
        },
        class_names=CLASSES,
        metrics={"test_accuracy": 0.1},
        training={"seed": seed},
        data_fingerprint=None,
    )


@pytest.fixture(scope="session")
def serve_workspace(tmp_path_factory) -> Path:
    """A workspace holding cnn:1 (alias champion), cnn:2 and mlp:1."""
    from distml.models.artifact import set_alias
    from distml.workspace import Workspace

    root = tmp_path_factory.mktemp("serve") / "ws"
    ws = Workspace(root)
    _save(ws, "cnn", 0)
    _save(ws, "cnn", 1)
    _save(ws, "mlp", 2)
    set_alias(ws, "cnn", "champion", 1)
    ws.close()
    return root


class Reference:
    """The served models run in this process, to check the server's answers."""

    def __init__(self, root: Path):
        from distml.workspace import Workspace

        self.workspace = Workspace(root)
        self._models = {}

    def model(self, ref: str):
        from distml.models.artifact import load_model

        if ref not in self._models:
            self._models[ref] = load_model(self.workspace, ref)
        return self._models[ref]

    def probabilities(self, ref: str, pixels: np.ndarray) -> np.ndarray:
        """Softmax of the model on raw 0..255 pixels (n, 28, 28), normalised as in training."""
        import torch

        from distml.data import datasets

        model, manifest = self.model(ref)
        assert manifest["preprocessing"]["dataset"] == "fashion-mnist"
        x = np.asarray(pixels, dtype=np.float32).reshape(-1, 28, 28)
        x = x * np.float32((1 / 255) / datasets.FASHION_MNIST_STD) - np.float32(
            datasets.FASHION_MNIST_MEAN / datasets.FASHION_MNIST_STD
        )
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


@pytest.fixture
def service_ws(serve_workspace, tmp_path) -> Path:
    """A copy of `serve_workspace` whose services are the test's own (a service writes its folder there)."""
    root = tmp_path / "ws"
    shutil.copytree(serve_workspace, root)
    return root


@pytest.fixture(scope="session")
def reference(serve_workspace) -> Reference:
    ref = Reference(serve_workspace)
    yield ref
    ref.workspace.close()


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        return stop_server(self, timeout)


def write_replica_config(path: Path, workspace: Path, models: list[str], **settings) -> Path:
    """A replica config file, as the gateway writes one per replica (settings: ReplicaConfig fields)."""
    from distml.core.layout import WorkspaceRef
    from distml.serve.config import ReplicaConfig

    config = ReplicaConfig(workspace=WorkspaceRef(root=str(workspace)), models=models, **settings)
    path.write_text(config.model_dump_json())
    return path


def start_server(
    workspace: Path,
    models: list[str],
    tmp: Path,
    *,
    timeout: float = 60.0,
    env: dict | None = None,
    token: str | None = None,
    **settings,
) -> ServerProcess:
    """Start a replica through its process contract (`python -m distml.serve.server CONFIG`; the token
    in DISTML_SERVE_TOKEN) and wait for its port file."""
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    port_file, log_path = tmp / f"server-{stamp}.port", tmp / f"server-{stamp}.log"
    config = write_replica_config(tmp / f"server-{stamp}.json", workspace, models, port_file=str(port_file), **settings)
    cmd = [sys.executable, "-m", "distml.serve.server", str(config)]
    env = {**os.environ, **(env or {})}
    env.pop("DISTML_SERVE_TOKEN", None)
    if token:
        env["DISTML_SERVE_TOKEN"] = token
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"server wrote no port file in {timeout} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.02)
    return ServerProcess(proc, int(port_file.read_text()), log_path)


def stop_server(server: ServerProcess, timeout: float = 20.0) -> int:
    """SIGTERM (graceful drain), then SIGKILL after `timeout`; returns the exit status."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def server(serve_workspace, tmp_path_factory):
    """The shared replica: cnn@champion (v1), cnn:2 and mlp; 20 ms batch window, batches up to 32."""
    proc = start_server(
        serve_workspace,
        ["cnn@champion", "cnn:2", "mlp"],
        tmp_path_factory.mktemp("server"),
        max_batch_size=32,
        max_batch_delay_ms=20,
    )
    yield proc
    stop_server(proc)


@pytest.fixture
def launch(serve_workspace, tmp_path):
    """launch(models, workspace=serve_workspace, **settings) starts a replica, stopped after the test."""
    started: list[ServerProcess] = []

    def _launch(models: list[str], workspace: Path | None = None, **kwargs) -> ServerProcess:
        proc = start_server(workspace or serve_workspace, models, tmp_path / "servers", **kwargs)
        started.append(proc)
        return proc

    yield _launch
    for proc in started:
        stop_server(proc)


@pytest.fixture
def make_pixels():
    return pixels


def pixels(n: int, seed: int = 0) -> np.ndarray:
    """n random 28x28 images of raw 0..255 pixel values (float32, whole numbers)."""
    return np.random.RandomState(seed).randint(0, 256, size=(n, 28, 28)).astype(np.float32)
