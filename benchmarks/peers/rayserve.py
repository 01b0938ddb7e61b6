"""The Ray Serve peer of benchmarks/serving.py: the same `cnn` weights in a Ray Serve deployment behind Ray
Serve's HTTP proxy, batched with `@serve.batch`.

Two halves in one file. The benchmark (distml's venv) imports it for `peer_python`, `write_spec` and
`start`; the peer itself runs as `.venv-peers/bin/python benchmarks/peers/rayserve.py SPEC.json` (ray is a
peer dependency, never distml's), so nothing at module level imports ray, torch or distml.

The peer process starts a local Ray instance (`ray.init(num_cpus=...)`, dashboard off, worker logs not
forwarded to the driver, usage stats off), Serve's HTTP proxy on a free port, and one deployment with one
replica: the zoo's `cnn` architecture (copied below: the peer venv has no distml) loaded strictly from the
distml artifact's safetensors file, channels_last weights as `optimize_for_serving` prepares them for our
replicas, the manifest's normalisation with the same float32 arithmetic as `Preprocessing.apply`. Every
request is a V2 infer JSON body, parsed and normalised per request in the replica, batched by
`@serve.batch` with our replica's max batch size and delay, and answered with the same V2 outputs
(`probabilities` FP32 [n, classes], `label` INT64 [n]). Access logs are off (our replica writes no line per
request either). Serve runs in its throughput-optimized mode with its HTTP proxy kept (SERVE_ENV). The port is
written to the spec's port file once `serve.run` returned (the app is running); SIGTERM shuts Ray down, and the
benchmark kills the process group (Ray's processes share it) if anything is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"
ROUTE = "/v2/models/{model}/infer"
# Serve's documented throughput-optimized mode (user code on the replica's own event loop, gRPC from proxy to
# replica, buffered request-path logs, GC frozen after start-up), minus its direct ingress, which would take the
# HTTP proxy out of the path; measured on 2 cores: ~10.5 ms of Ray CPU per request at c64 instead of ~14.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
NEEDED = ("ray", "torch", "safetensors", "numpy", "starlette", "fastapi", "uvicorn")  # ray[serve] brings the last 3


def peer_python() -> tuple[Path | None, dict[str, str] | str]:
    """The peers venv's python and its ray and torch versions (read from the installed metadata, no
    import), or (None, why not: a message naming `make bench-peers`)."""
    from importlib.metadata import distributions

    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        return None, f"{PEERS_VENV} does not exist; run `make bench-peers` to create it"
    sites = [str(p) for p in sorted(PEERS_VENV.glob("lib/python*/site-packages"))]
    found = {(d.metadata["Name"] or "").lower(): d.version for d in distributions(path=sites)}
    missing = [name for name in NEEDED if name not in found]
    if missing:
        return (
            None,
            f"{', '.join(missing)} not installed in {PEERS_VENV} (ray[serve] is needed); run `make bench-peers`",
        )
    return python, {name: found[name] for name in ("ray", "torch")}


def write_spec(path: Path, **spec: Any) -> Path:
    path.write_text(json.dumps(spec, indent=2))
    return path


def start(python: Path, spec_path: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """The peer in a session of its own, so `stop` can reach Ray's processes through its process group."""
    env = {k: v for k, v in env.items() if not k.startswith("RAY_ADDRESS")}  # a new local Ray, never a shared one
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    for name, value in SERVE_ENV.items():  # a value set by the caller wins
        env.setdefault(name, value)
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the peer's process group (Ray's gcs, raylet and workers included)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# -- the peer process (runs in .venv-peers) ------------------------------------------------------------


def serve_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import logging
    import threading

    import numpy as np
    import ray
    import torch
    from ray import serve
    from safetensors.torch import load_file
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from torch import nn

    threads = int(spec["torch_threads"])
    shape = tuple(spec["input_shape"])
    factor = np.float32(spec["scale"] / spec["std"])  # Preprocessing.apply's float32 arithmetic
    offset = np.float32(spec["mean"] / spec["std"])
    model_name, model_version = spec["model_name"], str(spec["model_version"])

    class ImageClassifier(nn.Sequential):  # distml.models.zoo.ImageClassifier
        def forward(self, x):
            if x.dim() == 3:
                x = x.unsqueeze(1)
            return super().forward(x)

    def build_cnn(num_classes: int):  # distml.models.zoo.cnn: the same layers, so the same state-dict keys
        return ImageClassifier(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    @serve.deployment(
        name=model_name,
        num_replicas=1,
        max_ongoing_requests=spec["max_ongoing_requests"],
        ray_actor_options={"num_cpus": spec["replica_num_cpus"]},
    )
    class DistmlCnn:
        def __init__(self) -> None:
            if threads > 0:
                torch.set_num_threads(threads)
            model = build_cnn(len(spec["class_names"]))
            model.load_state_dict(load_file(spec["weights"]), strict=True)
            model.eval()
            with torch.no_grad():  # optimize_for_serving: channels_last conv weights where outputs match
                probe = torch.rand(3, *shape) * 3 - 1.5
                expected = model(probe)
                fast = model.to(memory_format=torch.channels_last)
                ok = torch.allclose(fast(probe), expected, rtol=1e-4, atol=1e-4)
            self.model = fast if ok else model.to(memory_format=torch.contiguous_format)

        @serve.batch(max_batch_size=spec["max_batch_size"], batch_wait_timeout_s=spec["batch_wait_timeout_s"])
        async def forward(self, batch: list[np.ndarray]) -> list[np.ndarray]:
            x = torch.from_numpy(np.ascontiguousarray(np.concatenate(batch), dtype=np.float32))
            with torch.inference_mode():
                p = torch.softmax(self.model(x).float(), dim=1).numpy()
            out, start = [], 0
            for item in batch:
                out.append(p[start : start + len(item)])
                start += len(item)
            return out

        async def __call__(self, request: Request):
            try:
                body = await request.json()
                (tensor,) = body["inputs"]
                dims = tuple(int(d) for d in tensor["shape"])
                if tensor["datatype"] != "FP32" or dims[1:] != shape:
                    raise ValueError(
                        f"expected FP32 [n, {', '.join(map(str, shape))}], got {tensor['datatype']} {dims}"
                    )
                raw = np.asarray(tensor["data"], dtype=np.float32).reshape(dims)
                if not np.isfinite(raw).all():
                    raise ValueError("input holds NaN or infinite values")
            except (ValueError, KeyError, TypeError) as exc:
                return JSONResponse({"error": f"bad V2 infer request: {exc}"}, status_code=400)
            x = np.array(raw, dtype=np.float32)
            x *= factor
            x -= offset
            p = await self.forward(x)
            response = {
                "model_name": model_name,
                "model_version": model_version,
                "outputs": [
                    {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": list(p.shape),
                        "data": p.reshape(-1).tolist(),
                    },
                    {"name": "label", "datatype": "INT64", "shape": [len(p)], "data": p.argmax(axis=1).tolist()},
                ],
            }
            if "id" in body:
                response["id"] = body["id"]
            return response

    ray.init(
        num_cpus=spec["ray_num_cpus"],
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=spec["object_store_bytes"],
    )
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]}, logging_config=quiet)
    serve.run(DistmlCnn.bind(), name="bench", route_prefix=ROUTE.format(model=model_name), logging_config=quiet)
    print(f"ray {ray.__version__}, torch {torch.__version__}: {model_name} served on port {spec['port']}", flush=True)
    Path(spec["port_file"]).write_text(str(spec["port"]))

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    ray.shutdown()  # this driver started the local Ray: its shutdown ends gcs, raylet and every actor


if __name__ == "__main__":
    serve_main(sys.argv[1])
