"""Test helper: a stand-in replica that keeps the model server's contract, and a gateway launcher.

Run as `python tests/serve/fake_replica.py --workspace W --model echo:3 [...]` it serves the V2/V1
routes of `distml.serve.server` with a FastAPI app whose model "echo" returns its input times 2
(an optional `--delay-ms`/`FAKE_REPLICA_DELAY_MS` and `--startup-delay-s`/`FAKE_REPLICA_STARTUP_S`
simulate slow inference and slow cold starts). Imported, it offers `gateway_process()` for tests.
"""

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKE_REPLICA_COMMAND = [sys.executable, str(HERE / "fake_replica.py")]


# ---------------------------------------------------------------- the fake replica server


def _times2(value):
    if isinstance(value, list):
        return [_times2(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return value * 2


def build_app(models: dict[str, list[str]], delay_s: float, token: str | None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    state = {"requests": 0, "in_flight": 0}
    newest = lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v)  # noqa: E731
    default_version = {name: max(versions, key=newest) for name, versions in models.items()}
    first_version = next(iter(default_version.values()), "")

    def error(status: int, message: str, version: str = first_version) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={"X-Model-Version": version})

    def resolve(model: str, version: str | None):
        if model not in models:
            return None, error(404, f"model {model!r} is not loaded (loaded: {sorted(models)})")
        if version is None:
            return default_version[model], None
        if version not in models[model]:
            return None, error(404, f"model {model!r} has no version {version!r} (loaded: {models[model]})")
        return version, None

    def authorized(request: Request) -> bool:
        return token is None or request.headers.get("authorization") == f"Bearer {token}"

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": True}, headers={"X-Model-Version": first_version})

    @app.get("/v2/health/live")
    async def live():
        return JSONResponse({"live": True}, headers={"X-Model-Version": first_version})

    @app.get("/v2/models/{model}")
    async def metadata(model: str):
        version, err = resolve(model, None)
        if err:
            return err
        return JSONResponse(
            {
                "name": model,
                "versions": models[model],
                "platform": "fake",
                "inputs": [{"name": "input0", "datatype": "FP32", "shape": [-1, -1]}],
                "outputs": [{"name": "output0", "datatype": "FP32", "shape": [-1, -1]}],
            },
            headers={"X-Model-Version": version},
        )

    async def infer(request: Request, model: str, version: str | None):
        if not authorized(request):
            return error(401, "missing or wrong bearer token")
        version, err = resolve(model, version)
        if err:
            return err
        try:
            body = await request.json()
            inputs = body["inputs"]
            outputs = [
                {
                    "name": f"output{i}",
                    "shape": item["shape"],
                    "datatype": item["datatype"],
                    "data": _times2(item["data"]),
                }
                for i, item in enumerate(inputs)
            ]
        except Exception as exc:
            return error(400, f"invalid V2 infer request: {exc!r}", version)
        state["requests"] += 1
        state["in_flight"] += 1
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
        finally:
            state["in_flight"] -= 1
        response = {"model_name": model, "model_version": version, "outputs": outputs}
        if "id" in body:
            response["id"] = body["id"]
        return JSONResponse(response, headers={"X-Model-Version": version, "X-Replica-Pid": str(os.getpid())})

    @app.post("/v2/models/{model}/infer")
    async def infer_default(model: str, request: Request):
        return await infer(request, model, None)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(model: str, version: str, request: Request):
        return await infer(request, model, version)

    @app.post("/v1/models/{model}:predict")
    async def predict(model: str, request: Request):
        if not authorized(request):
            return error(401, "missing or wrong bearer token")
        version, err = resolve(model, None)
        if err:
            return err
        try:
            instances = (await request.json())["instances"]
        except Exception as exc:
            return error(400, f"invalid V1 predict request: {exc!r}", version)
        state["requests"] += 1
        if delay_s:
            await asyncio.sleep(delay_s)
        return JSONResponse(
            {"predictions": [_times2(x) for x in instances]},
            headers={"X-Model-Version": version, "X-Replica-Pid": str(os.getpid())},
        )

    @app.get("/metrics")
    async def metrics():
        text = f"fake_replica_requests_total {state['requests']}\nfake_replica_in_flight {state['in_flight']}\n"
        return PlainTextResponse(text, headers={"X-Model-Version": first_version})

    return app


def parse_models(refs: list[str]) -> dict[str, list[str]]:
    models: dict[str, list[str]] = {}
    for ref in refs:
        name, _, version = ref.partition(":")
        models.setdefault(name, []).append(version or "1")
    return models


def serve(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fake distml replica for tests")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--max-batch-delay-ms", type=float, default=0.0)
    parser.add_argument("--token")
    parser.add_argument("--delay-ms", type=float, default=float(os.environ.get("FAKE_REPLICA_DELAY_MS", "0")))
    parser.add_argument("--startup-delay-s", type=float, default=float(os.environ.get("FAKE_REPLICA_STARTUP_S", "0")))
    args = parser.parse_args(argv)

    models = parse_models(args.model)
    if "broken" in models:  # lets tests see a model that cannot load
        print("error: model 'broken' cannot be loaded: weights file is corrupt", file=sys.stderr)
        return 1

    import uvicorn

    app = build_app(models, args.delay_ms / 1000.0, args.token)
    # uvicorn binds the socket itself: a socket handed to it on the plain asyncio loop misses
    # TCP_NODELAY, and every response then waits ~40 ms for a delayed ACK.
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")
    )

    # drain and exit 0 on SIGTERM as the contract says (uvicorn itself re-raises the signal after
    # its graceful shutdown, which would end the process with -15)
    server.capture_signals = contextlib.nullcontext

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            await task
            return
        port = server.servers[0].sockets[0].getsockname()[1]
        if args.startup_delay_s:
            await asyncio.sleep(args.startup_delay_s)
        if args.port_file:
            tmp = Path(args.port_file).with_suffix(".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, args.port_file)
        await task

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------- test-side helpers


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path, *extra: str, replica_args: str = "", env: dict | None = None, timeout: float = 30.0
):
    """Start `python -m distml.serve.gateway` on fake replicas; yield (base_url, Popen); stop it after."""
    port_file = tmp_path / f"gateway-{time.monotonic_ns()}.port"
    cmd = [
        sys.executable,
        "-m",
        "distml.serve.gateway",
        "--workspace",
        str(tmp_path / "ws"),
        "--port-file",
        str(port_file),
        "--replica-command",
        shlex.join(FAKE_REPLICA_COMMAND),
        "--run-dir",
        str(tmp_path / f"run-{port_file.stem}"),
        "--health-interval",
        "0.25",
        *extra,
    ]
    if replica_args:
        cmd.append(f"--replica-args={replica_args}")
    log = open(tmp_path / f"gateway-{port_file.stem}.log", "wb")
    base_env = {k: v for k, v in os.environ.items() if k != "DISTML_SERVE_TOKEN"}  # tests choose tokens
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**base_env, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {proc.returncode}: "
                    f"{(tmp_path / f'gateway-{port_file.stem}.log').read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not write its port file in time")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{int(port_file.read_text())}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def v2_body(rows: int = 1, cols: int = 3, start: float = 0.0) -> dict:
    data = [start + i for i in range(rows * cols)]
    return {"inputs": [{"name": "x", "shape": [rows, cols], "datatype": "FP32", "data": data}]}


class Load:
    """`clients` threads posting V2 infer requests through httpx until `stop()`; every answer is
    checked (status 200 and output = 2 x input) and recorded as (time, status, version, error)."""

    def __init__(
        self,
        base: str,
        clients: int = 4,
        path: str = "/v2/models/echo/infer",
        headers: dict | None = None,
        timeout: float = 60.0,
    ):
        import threading

        self.base, self.path, self.headers, self.timeout = base, path, headers or {}, timeout
        self.records: list[tuple[float, int, str | None, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        import httpx

        with httpx.Client(base_url=self.base, timeout=self.timeout) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = v2_body(start=index * 1000 + n)
                status, version, err = 0, None, None
                try:
                    resp = client.post(self.path, json=body, headers=self.headers)
                    status, version = resp.status_code, resp.headers.get("x-model-version")
                    if status != 200:
                        err = resp.text[:300]
                    elif resp.json()["outputs"][0]["data"] != [2 * v for v in body["inputs"][0]["data"]]:
                        err = f"wrong output {resp.text[:200]}"
                except Exception as exc:
                    err = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.records.append((time.monotonic(), status, version, err))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    @property
    def failures(self) -> list:
        with self._lock:
            return [r for r in self.records if r[3] is not None]

    def count(self) -> int:
        with self._lock:
            return len(self.records)


def admin(base: str, method: str, path: str, token: str | None = None, **kwargs):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, base + path, headers=headers, timeout=60, **kwargs)


def wait_for(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout} s")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a parent that is gone or slow) counts as dead
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(serve())
