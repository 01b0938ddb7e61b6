"""Test helper: a stand-in replica that keeps the model server's process contract, and a gateway launcher.

Run as `python tests/serve/fake_replica.py REPLICA_CONFIG.json` (the file the gateway writes, read with
`distml.serve.config.load_replica_config`; the bearer token, if any, in DISTML_SERVE_TOKEN) it serves the
V2/V1 routes of `distml.serve.server` with a small FastAPI app whose models return their input times 2:
it binds the config's host:port, writes the bound port atomically to `port_file` once ready, answers
`X-Model-Version: <name>:<version>` on every response, picks a version from the path, else from an
`X-Model-Version: 3` / `echo:3` request header, else the highest loaded, and exits 0 after draining on
SIGTERM. Fake-only knobs travel in the environment (the gateway passes its own to the replicas):
FAKE_REPLICA_DELAY_MS (slow inference), FAKE_REPLICA_DELAYS_MS (per replica, by the id the gateway
names its config file with: "g0-1=300,g0-2=0" overrides FAKE_REPLICA_DELAY_MS for those) and
FAKE_REPLICA_STARTUP_S (slow cold start). A model named "broken" cannot load: the process exits 1.

Imported, it offers `gateway_process()` (a real `python -m distml.serve.gateway` over fake replicas),
`Load` (closed-loop client threads), `replayed_split` (what a seeded traffic split answers) and small
polling helpers for tests.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
FAKE_REPLICA_COMMAND = [sys.executable, str(HERE / "fake_replica.py")]
TOKEN_ENV = "DISTML_SERVE_TOKEN"  # = distml.serve.config.TOKEN_ENV (not imported: keeps the import light)
DELAY_ENV = "FAKE_REPLICA_DELAY_MS"
DELAYS_ENV = "FAKE_REPLICA_DELAYS_MS"  # per replica id: "g0-1=300,g0-0=0"
STARTUP_ENV = "FAKE_REPLICA_STARTUP_S"


# ---------------------------------------------------------------- the fake replica server


def parse_models(refs: list[str]) -> dict[str, list[str]]:
    """`["echo:3", "echo:4", "other"]` -> `{"echo": ["3", "4"], "other": ["1"]}` (an alias counts as 1)."""
    models: dict[str, list[str]] = {}
    for ref in refs:
        name, _, version = ref.split("@", 1)[0].partition(":")
        models.setdefault(name, [])
        if (version or "1") not in models[name]:
            models[name].append(version or "1")
    return models


def _newest(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _times2(value: Any) -> Any:
    if isinstance(value, list):
        return [_times2(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return value * 2


# V2 datatype -> numpy dtype name (little-endian on the wire); decoded here, independently of
# distml.serve.protocol, so a bug there cannot hide behind the same bug in the fake.
DTYPES = {
    "BOOL": "bool",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
HEADER_LENGTH = "inference-header-content-length"


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_v2(body: bytes, header_length: str | None) -> dict:
    """A V2 infer request (JSON, or JSON + binary tensor data) as {"id", "inputs": [(name, datatype,
    array)], "binary_out": callable(output name) -> bool}; BadRequest (400) says what is wrong."""
    import numpy as np

    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(400, f"bad {HEADER_LENGTH} {header_length!r} for a body of {len(body)} bytes")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        obj = json.loads(body)
        items = obj["inputs"]
        assert isinstance(obj, dict) and isinstance(items, list) and items
    except Exception as exc:
        raise BadRequest(400, f"invalid V2 infer request: {type(exc).__name__}: {exc}") from None
    inputs, offset = [], 0
    for i, item in enumerate(items):
        try:
            name, datatype, shape = item["name"], item["datatype"], [int(d) for d in item["shape"]]
            size = (item.get("parameters") or {}).get("binary_data_size")
            if datatype not in DTYPES:
                raise ValueError(f"datatype {datatype!r} is not supported by the fake")
            dtype = np.dtype(DTYPES[datatype])
            if size is not None:
                array = np.frombuffer(binary[offset : offset + size], dtype=dtype)
                offset += size
            else:
                array = np.asarray(item["data"], dtype=dtype).reshape(-1)
            array = array.reshape(shape)
        except Exception as exc:
            raise BadRequest(400, f"inputs[{i}] is not a valid tensor: {type(exc).__name__}: {exc}") from None
        inputs.append((name, datatype, array))
    if offset != len(binary):
        raise BadRequest(400, f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    everything = bool((obj.get("parameters") or {}).get("binary_data_output"))
    per_output = {
        o["name"]: bool(o["parameters"]["binary_data"])
        for o in obj.get("outputs") or []
        if "binary_data" in (o.get("parameters") or {})
    }
    return {"id": obj.get("id"), "inputs": inputs, "binary_out": lambda n: per_output.get(n, everything)}


def encode_v2(model: str, version: str, request_id: str | None, outputs: list, binary_out) -> tuple[bytes, dict]:
    """A V2 infer response body and its headers; outputs named in `binary_out` go as binary data."""
    entries, raws = [], []
    for name, datatype, array in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary_out(name):
            raw = array.astype(DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    obj = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        obj["id"] = request_id
    head = json.dumps(obj).encode()
    if not raws:
        return head, {"content-type": "application/json"}
    return head + b"".join(raws), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def build_app(models: dict[str, list[str]], delay_s: float, token: str | None):
    """The fake replica's ASGI app: V2 infer (JSON or binary tensors), V1 predict, health, metadata."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    if token is not None:  # distml.serve.http imports torch (via the protocol): only when needed
        from distml.serve.http import token_matches

    app = FastAPI()
    state = {"requests": 0, "in_flight": 0, "draining": False}
    default_version = {name: max(versions, key=_newest) for name, versions in models.items()}
    all_tags = ",".join(f"{name}:{v}" for name, versions in models.items() for v in versions)

    def resolve(request: Request, model: str, version: str | None) -> str:
        """The version a request names (path, else the X-Model-Version header, else the default);
        records `model:version` for the response header, as the real server's middleware does."""
        if model not in models:
            raise BadRequest(404, f"unknown model {model!r}; this server serves {', '.join(sorted(models))}")
        asked = version if version is not None else request.headers.get("x-model-version")
        if asked is None:
            chosen = default_version[model]
        else:
            chosen = asked.split(":", 1)[1] if asked.startswith(f"{model}:") else asked
            if chosen not in models[model]:
                raise BadRequest(
                    404, f"model {model!r} has no version {asked!r} on this server; loaded versions: {models[model]}"
                )
        request.scope["fake.tag"] = f"{model}:{chosen}"
        return chosen

    def twice(datatype: str, array):
        return array if datatype == "BOOL" else array * array.dtype.type(2)

    async def work() -> None:
        state["requests"] += 1
        state["in_flight"] += 1
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
        finally:
            state["in_flight"] -= 1

    async def body_of(request: Request) -> bytes:
        body = await request.body()
        if (request.headers.get("content-encoding") or "").lower() == "gzip":
            import gzip

            body = gzip.decompress(body)
        return body

    async def infer(request: Request, model: str, version: str | None) -> Response:
        version = resolve(request, model, version)
        parsed = decode_v2(await body_of(request), request.headers.get(HEADER_LENGTH))
        await work()
        outputs = [
            (f"output{i}", datatype, twice(datatype, array)) for i, (_n, datatype, array) in enumerate(parsed["inputs"])
        ]
        content, headers = encode_v2(model, version, parsed["id"], outputs, parsed["binary_out"])
        return Response(content, 200, headers={**headers, "X-Replica-Pid": str(os.getpid())})

    async def predict(request: Request, model: str, version: str | None) -> Response:
        resolve(request, model, version)
        try:
            instances = json.loads(await body_of(request))["instances"]
            assert isinstance(instances, list) and instances
        except Exception as exc:
            raise BadRequest(400, f"invalid V1 predict request: {type(exc).__name__}: {exc}") from None
        await work()
        return JSONResponse(
            {"predictions": [_times2(x) for x in instances]}, headers={"X-Replica-Pid": str(os.getpid())}
        )

    @app.exception_handler(BadRequest)
    async def _bad_request(_request: Request, exc: BadRequest):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/v2/health/ready")
    async def ready():
        if state["draining"]:
            return JSONResponse({"ready": False, "error": "the server is shutting down"}, 503)
        return JSONResponse({"ready": True})

    @app.get("/v2/health/live")
    async def live():
        return JSONResponse({"live": True})

    @app.get("/v2/models/{model}")
    async def metadata(model: str, request: Request):
        resolve(request, model, None)
        return JSONResponse(
            {
                "name": model,
                "versions": models[model],
                "platform": "fake",
                "inputs": [{"name": "input0", "datatype": "FP32", "shape": [-1, -1]}],
                "outputs": [{"name": "output0", "datatype": "FP32", "shape": [-1, -1]}],
            }
        )

    @app.post("/v2/models/{model}/infer")
    async def infer_default(model: str, request: Request):
        return await infer(request, model, None)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(model: str, version: str, request: Request):
        return await infer(request, model, version)

    @app.post("/v1/models/{model}/versions/{version}:predict")
    async def predict_version(model: str, version: str, request: Request):
        return await predict(request, model, version)

    @app.post("/v1/models/{model}:predict")
    async def predict_default(model: str, request: Request):
        return await predict(request, model, None)

    @app.get("/metrics")
    async def metrics():
        text = f"fake_replica_requests_total {state['requests']}\nfake_replica_in_flight {state['in_flight']}\n"
        return PlainTextResponse(text)

    async def outer(scope, receive, send):
        """Bearer auth (any case of the scheme) on everything but health, and `X-Model-Version` on
        every response: `name:version` once a route resolved one, else every loaded tag."""
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def tagged(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-model-version"]
                headers.append((b"x-model-version", scope.get("fake.tag", all_tags).encode()))
                message = {**message, "headers": headers}
            await send(message)

        if token is not None and not scope["path"].startswith("/v2/health/"):
            header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
            if not token_matches(header, token):
                body = json.dumps({"error": "missing or wrong bearer token"}).encode()
                start = {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
                await tagged(start)
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, tagged)

    outer.state = state
    return outer


def replica_delay_ms(replica_id: str, environ: dict[str, str]) -> float:
    """This replica's inference delay: its entry in FAKE_REPLICA_DELAYS_MS, else FAKE_REPLICA_DELAY_MS, else 0."""
    for item in (environ.get(DELAYS_ENV) or "").split(","):
        rid, sep, ms = item.partition("=")
        if sep and rid.strip() == replica_id:
            return float(ms)
    return float(environ.get(DELAY_ENV) or 0)


def serve(argv: list[str] | None = None) -> int:
    """`python fake_replica.py REPLICA_CONFIG.json`: the replica process contract of distml.serve.server."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: fake_replica.py REPLICA_CONFIG.json", file=sys.stderr)
        return 2
    from distml.core.errors import DistmlError
    from distml.serve.config import load_replica_config

    try:
        config = load_replica_config(args[0])
    except DistmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.port_file:  # never leave a previous run's port for the gateway to read
        with contextlib.suppress(FileNotFoundError):
            Path(config.port_file).unlink()
    models = parse_models(config.models)
    if "broken" in models:  # lets tests see a model that cannot load
        print("error: model 'broken' cannot be loaded: weights file is corrupt", file=sys.stderr)
        return 1
    delay_s = replica_delay_ms(Path(args[0]).stem, os.environ) / 1000.0
    startup_s = float(os.environ.get(STARTUP_ENV) or 0)

    import uvicorn

    app = build_app(models, delay_s, os.environ.get(TOKEN_ENV) or None)
    # uvicorn binds the socket itself: a socket handed to it on the plain asyncio loop misses
    # TCP_NODELAY, and every response then waits ~40 ms for a delayed ACK.
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=config.graceful_timeout,
        )
    )
    # drain and exit 0 on SIGTERM as the contract says (uvicorn itself re-raises the signal after
    # its graceful shutdown, which would end the process with -15)
    server.capture_signals = contextlib.nullcontext

    def stop() -> None:
        app.state["draining"] = True
        server.should_exit = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            await task
            return
        port = server.servers[0].sockets[0].getsockname()[1]
        if startup_s:
            await asyncio.sleep(startup_s)
        if config.port_file and not server.should_exit:
            tmp = Path(config.port_file).with_name(Path(config.port_file).name + ".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, config.port_file)
        await task

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------- test-side helpers


def write_serve_config(tmp_path: Path, models: list[str], **settings: Any) -> tuple[Path, Any]:
    """A ServeConfig file for fake replicas (validated here, so a bad setting fails the test at once)."""
    from distml.core.layout import WorkspaceRef
    from distml.serve.config import ReplicaConfig, ServeConfig

    name = settings.pop("name", f"svc-{time.monotonic_ns()}")
    workspace = WorkspaceRef(root=str(tmp_path / "ws"))
    replica = settings.pop("replica", None) or ReplicaConfig(workspace=workspace, models=list(models))
    values = {
        "replica_command": FAKE_REPLICA_COMMAND,
        "port": 0,
        "port_file": str(tmp_path / f"{name}.port"),
        "health_interval": 0.25,
        **settings,
    }
    config = ServeConfig(name=name, replica=replica, **values)
    path = tmp_path / f"{name}.json"
    path.write_text(config.model_dump_json(indent=1))
    return path, config


def gateway_env(token: str | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without a token or fake knobs, plus the test's choices."""
    base = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, DELAY_ENV, DELAYS_ENV, STARTUP_ENV)}
    if token:
        base[TOKEN_ENV] = token
    return {**base, **(env or {})}


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path,
    models: list[str] = ["echo:1"],  # noqa: B006 - never mutated
    *,
    token: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    **settings: Any,
):
    """Run `python -m distml.serve.gateway SERVE_CONFIG.json` over fake replicas; yield (base_url, Popen).

    `settings` are ServeConfig fields (replicas=2, shards=2, seed=7, autoscale={...}, hold_timeout=...);
    `token` goes to DISTML_SERVE_TOKEN only when given; `env` adds e.g. {"FAKE_REPLICA_DELAY_MS": "50"}
    (replica ids, for FAKE_REPLICA_DELAYS_MS, are g0-0, g0-1, ... in start order: see ReplicaSet._spawn).
    The gateway is stopped with SIGTERM afterwards (SIGKILL if it does not exit).
    """
    path, config = write_serve_config(tmp_path, models, **settings)
    port_file = Path(config.port_file)
    log_path = tmp_path / f"{config.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distml.serve.gateway", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=gateway_env(token, env),
        )
    try:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway wrote no port file in {timeout} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{int(port_file.read_text())}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def v2_body(rows: int = 1, cols: int = 3, start: float = 0.0) -> dict:
    data = [start + i for i in range(rows * cols)]
    return {"inputs": [{"name": "x", "shape": [rows, cols], "datatype": "FP32", "data": data}]}


class Record(NamedTuple):
    """One answer of a `Load` client: when it was sent and received, its status, version and error."""

    sent: float
    received: float
    status: int
    version: str | None
    error: str | None


class Load:
    """`clients` threads posting V2 infer requests through httpx until `stop()`; every answer is
    checked (status 200 and output = 2 x input) and recorded as a `Record`."""

    def __init__(
        self,
        base: str,
        clients: int = 4,
        path: str = "/v2/models/echo/infer",
        headers: dict | None = None,
        timeout: float = 60.0,
    ):
        self.base, self.path, self.headers, self.timeout = base, path, headers or {}, timeout
        self.records: list[Record] = []
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
                sent = time.monotonic()
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
                    self.records.append(Record(sent, time.monotonic(), status, version, err))

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
    def failures(self) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.error is not None]

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def sent_after(self, moment: float) -> list[Record]:
        """The answers to requests sent after `moment` (a time.monotonic() reading)."""
        with self._lock:
            return [r for r in self.records if r.sent > moment]


_admin_client = None


def admin(base: str, method: str, path: str, token: str | None = None, **kwargs):
    """One admin request, through one client for the whole test process: tests poll these routes,
    and each new httpx client costs 40 ms of CPU (its TLS context loads the CA bundle)."""
    global _admin_client
    import httpx

    if _admin_client is None:
        _admin_client = httpx.Client(timeout=60)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _admin_client.request(method, base + path, headers=headers, **kwargs)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout} s")
        time.sleep(interval)


def replayed_split(seed: int, split: dict[str, float], n: int) -> list[str]:
    """The versions the first `n` requests that pin none get from a gateway seeded with `seed`
    (ServeConfig.seed, `distml serve --seed`), replayed as `Gateway.choose_version` draws them: one
    `random.Random(seed).choices` per unpinned request of the model, over its split's versions in the
    split's order, weighted. Only such requests draw, so a test that sends them one at a time knows
    which version answers each."""
    import random

    rng = random.Random(seed)
    versions = list(split)
    return [rng.choices(versions, weights=[split[v] for v in versions])[0] for _ in range(n)]


def metric(text: str, name: str) -> float:
    """The value of the Prometheus sample `name` (with its labels, e.g. `x_total{group="0"}`); 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


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
