"""One replica's HTTP server: the V2 (Open Inference) and V1 routes over the transport-free core.

A thin FastAPI app over `serve.model` (models, input checks, inference) and `serve.http` (auth,
errors, bodies, binding); a replica process is `python -m distml.serve.server REPLICA_CONFIG.json`.
KServe's and Triton's servers were considered; they need their own model repository layouts
(KServe's PyTorch path pickles).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

import distml
from distml.core.errors import DistmlError
from distml.core.exposure import check_exposure
from distml.monitoring.metrics import ServingMetrics
from distml.scheduling.admission import Lease, Resources, SharedPool
from distml.serve import http, openapi, protocol
from distml.serve.admin_api import RepositoryRequestBody, parse_body
from distml.serve.config import SUPERVISOR_ENV, TOKEN_ENV, ReplicaConfig, load_replica_config, store_from_env
from distml.serve.jobs import JobRunner, create_job, get_job, job_view
from distml.serve.model import ModelRepository, ServedModel
from distml.serve.protocol import ProtocolError
from distml.workspace import Workspace

log = logging.getLogger("distml.serve")

VERSION_HEADER = "X-Model-Version"
EXTENSIONS = ["binary_tensor_data", "async_jobs", "v1_predict", "model_repository"]


class ModelServer:
    """State and handlers of one replica; `create_app` wires them into FastAPI."""

    def __init__(self, config: ReplicaConfig, repository: ModelRepository):
        self.config = config
        self.repository = repository
        self.workspace = repository.workspace
        self.metrics = ServingMetrics()
        self.in_flight = 0  # HTTP requests being handled; the gauge reads it at scrape time (no lock per request)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.ready = False
        self.draining = False
        self.jobs = JobRunner(
            self.workspace.engine,
            repository.run_job,
            {name: set(versions) for name, versions in repository.models.items()},
            on_finish=lambda m, v, s: self.metrics.jobs.labels(m, v, s).inc(),
            concurrency=config.job_concurrency,
        )
        self._jobs_started = False
        repository.listeners.append(self._versions_changed)

    @property
    def load_error(self) -> str | None:
        return self.repository.load_error

    # -- lifecycle --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        load = asyncio.get_running_loop().create_task(self._load())
        try:
            yield
        finally:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
            if self._jobs_started:
                await self.jobs.stop()
            await self.repository.close()
            log.info("event=stopped models=%s", self.repository.tags)

    def _on_batch(self, served: ServedModel):
        labels = (served.name, str(served.version))
        self.metrics.queue_depth.labels(*labels).set_function(
            lambda: served.batcher.queue_depth if served.batcher is not None else 0
        )
        return self.metrics.batch_size.labels(*labels).observe

    def _versions_changed(self) -> None:
        """A version was loaded or unloaded: the job runner claims jobs of exactly the served ones."""
        # a new dict, not the old one changed: the runner reads it from a thread while it claims
        self.jobs.served = {name: set(versions) for name, versions in self.repository.models.items()}

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            await self.repository.load(self.config.max_batch_size, self.config.max_batch_delay_ms, self._on_batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.repository.load_error = f"loading the models failed: {exc}"
            log.error("event=load_failed error=%s", exc)
            return
        # Everything loaded so far lives as long as the server: keep it out of the garbage
        # collector's full passes (measured at c64: 116-353 ms pauses before, 5-11 ms after).
        gc.freeze()
        self.ready = True
        self.metrics.ready.set(1)
        self.jobs.start()
        self._jobs_started = True
        log.info("event=loaded models=%s seconds=%.3f", self.repository.tags, time.perf_counter() - started)

    # -- lookups ----------------------------------------------------------------------------

    def _lookup(self, request: Request, endpoint: str, *, need_ready: bool = True) -> ServedModel:
        """The model version a request names: path `/versions/{v}`, else an `X-Model-Version` header
        ('3' or 'cnn:3'), else the default version."""
        labels = request.scope.get("distml.labels", {})
        labels["endpoint"] = endpoint
        name = request.path_params["model"]
        version = request.path_params.get("version") or request.headers.get(VERSION_HEADER)
        served = self.repository.lookup(name, version, need_ready=False)
        labels["model"], labels["version"] = served.name, str(served.version)
        if need_ready and not served.ready:
            raise ProtocolError(503, self.load_error or f"model {served.tag} is still loading; retry shortly")
        if "distml.served" not in request.scope:  # in use until ServingMiddleware sees the answer sent
            served.in_use += 1
            request.scope["distml.served"] = served
        return served

    # -- handlers ---------------------------------------------------------------------------

    async def health_live(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "health"
        return JSONResponse({"live": True})

    async def health_ready(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "health"
        if self.draining:
            return JSONResponse({"ready": False, "error": "the server is shutting down"}, 503)
        if not self.ready:
            return JSONResponse({"ready": False, "error": self.load_error or "models are still loading"}, 503)
        return JSONResponse({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "server_metadata"
        return JSONResponse({"name": "distml", "version": distml.__version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        served = self._lookup(request, "model_metadata", need_ready=False)
        return JSONResponse(served.metadata(self.repository.versions(served.name)))

    async def model_ready(self, request: Request) -> Response:
        served = self._lookup(request, "model_ready", need_ready=False)
        if not served.ready:
            message = self.load_error or f"model {served.tag} is still loading"
            return JSONResponse({"name": served.name, "ready": False, "error": message}, 503)
        return JSONResponse({"name": served.name, "version": str(served.version), "ready": True})

    async def v2_infer(self, request: Request) -> Response:
        served = self._lookup(request, "infer")
        body = await http.read_body(request, self.config.max_body_bytes)
        infer_request = protocol.parse_infer_request(
            body,
            request.headers.get(protocol.HEADER_LENGTH),
            request.headers.get("content-encoding"),
            max_bytes=self.config.max_body_bytes,
        )
        response = await served.infer(infer_request)
        content, headers = protocol.encode_infer_response(response, infer_request.wants_binary)
        return Response(content, 200, headers=headers)

    async def submit_job(self, request: Request) -> Response:
        served = self._lookup(request, "job_submit")
        if protocol.HEADER_LENGTH.lower() in request.headers:
            raise ProtocolError(
                400,
                "asynchronous jobs take JSON requests only (they are stored as JSON); drop the "
                f"binary tensor data extension ({protocol.HEADER_LENGTH})",
            )
        obj = await http.read_json(
            request, self.config.max_body_bytes, 'a V2 infer request object, optionally with "callback_url"'
        )
        callback_url = obj.pop("callback_url", None)
        parameters = obj.get("parameters")
        if isinstance(parameters, dict) and "callback_url" in parameters:
            parameters = dict(parameters)
            callback_url = callback_url or parameters.pop("callback_url")
            obj["parameters"] = parameters
        if callback_url is not None:
            callback_url = _check_callback_url(callback_url)
        infer_request = protocol.infer_request_from_json(obj)
        if infer_request.wants_any_binary():
            raise ProtocolError(400, "asynchronous jobs store JSON results; drop binary_data / binary_data_output")
        served.check_request(infer_request)
        pinned_by_client = request.path_params.get("version") or request.headers.get(VERSION_HEADER)
        pinned = str(served.version) if pinned_by_client else None  # else: the default when it runs
        row = await asyncio.to_thread(
            create_job,
            self.workspace.engine,
            model=served.name,
            version=served.version if pinned_by_client else None,
            request=obj,
            callback_url=callback_url,
        )
        self.jobs.wake()
        log.info("event=job_queued id=%s model=%s version=%s", row.id, served.name, pinned or "default")
        return JSONResponse(
            {"id": row.id, "status": row.status, "model": served.name, "model_version": pinned},
            202,
            headers={"Location": f"/v2/jobs/{row.id}"},
        )

    async def job_status(self, request: Request) -> Response:
        labels = request.scope["distml.labels"]
        labels["endpoint"] = "job_status"
        job_id = request.path_params["job_id"]
        row = await asyncio.to_thread(get_job, self.workspace.engine, job_id) if len(job_id) <= 64 else None
        if row is None:
            raise ProtocolError(404, f"no inference job with id {job_id!r}")
        if row.version is not None:
            labels["model"], labels["version"] = row.model, str(row.version)
        return JSONResponse(job_view(row))

    async def v1_model(self, request: Request) -> Response:
        served = self._lookup(request, "v1_model", need_ready=False)
        if not served.ready:
            message = self.load_error or f"model {served.tag} is still loading"
            return JSONResponse({"name": served.name, "ready": False, "error": message}, 503)
        return JSONResponse({"name": served.name, "ready": True})

    async def v1_predict(self, request: Request) -> Response:
        served = self._lookup(request, "v1_predict")
        obj = await http.read_json(request, self.config.max_body_bytes, served.v1_example())
        predictions = await served.predict(obj.get("instances"))
        return Response(orjson.dumps({"predictions": predictions}), 200, media_type="application/json")

    # -- model repository extension (Triton's): versions loaded and unloaded while serving ----------

    async def _repository_version(self, request: Request, endpoint: str) -> tuple[str, int]:
        request.scope["distml.labels"]["endpoint"] = endpoint
        name = request.path_params["model"]
        obj = await http.read_json(request, self.config.max_body_bytes, RepositoryRequestBody.expected)
        text = str(parse_body(RepositoryRequestBody, obj, name).parameters.version)  # as the gateway parses it
        if self.draining or not self.ready:
            why = "the server is shutting down" if self.draining else self.load_error or "models are still loading"
            raise ProtocolError(503, f"cannot change the loaded models now: {why}")
        return name, int(text)

    @staticmethod
    def _label(request: Request, name: str, version: int) -> None:
        """Name the model in the metrics and X-Model-Version once it is known to exist: a name from
        the path as sent may hold control characters (no valid header) and grows the label set."""
        labels = request.scope["distml.labels"]
        labels["model"], labels["version"] = name, str(version)

    def _repository_view(self, name: str, version: int, state: str) -> dict[str, Any]:
        return {
            "name": name,
            "version": str(version),
            "state": state,
            "versions": self.repository.versions(name) if name in self.repository.models else [],
            "default_version": str(self.repository.default_version[name]) if name in self.repository.models else None,
        }

    async def repository_load(self, request: Request) -> Response:
        """`POST /v2/repository/models/{model}/load` with `{"parameters": {"version": "3"}}`: load that
        registered version beside the others (200 once it answers; 200 too if it already did)."""
        name, version = await self._repository_version(request, "repository_load")
        _, loaded = await self.repository.load_version(
            name, version, self.config.max_batch_size, self.config.max_batch_delay_ms, self._on_batch
        )
        self._label(request, name, version)
        return JSONResponse(self._repository_view(name, version, "loaded" if loaded else "already_loaded"))

    async def repository_unload(self, request: Request) -> Response:
        """`POST /v2/repository/models/{model}/unload` with `{"parameters": {"version": "3"}}`: stop serving
        that version once its in-flight requests are answered (409 for a model's last version)."""
        name, version = await self._repository_version(request, "repository_unload")
        await self.repository.unload_version(name, version, timeout=self.config.graceful_timeout)
        self._label(request, name, version)
        with contextlib.suppress(KeyError):
            self.metrics.queue_depth.remove(name, str(version))
        return JSONResponse(self._repository_view(name, version, "unloaded"))

    async def repository_index(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "repository_index"
        return JSONResponse(self.repository.index())

    async def metrics_endpoint(self, request: Request) -> Response:
        request.scope["distml.labels"]["endpoint"] = "metrics"
        body, content_type = self.metrics.exposition()
        return Response(body, 200, media_type=content_type)


def _check_callback_url(value: Any) -> str:
    import httpx

    problem = None
    if not isinstance(value, str):
        problem = f"is a {type(value).__name__}"
    else:
        try:
            url = httpx.URL(value)
            if url.scheme not in ("http", "https") or not url.host:
                problem = f"is {value!r}"
        except Exception:
            problem = f"is {value!r}"
    if problem:
        raise ProtocolError(400, f"callback_url {problem}; expected an absolute http:// or https:// URL")
    return value


class ServingMiddleware:
    """Pure ASGI: `X-Model-Version: name:version` on every response, request metrics, JSON 500s."""

    def __init__(self, app, server: ModelServer):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.server
        labels = {"model": "", "version": "", "endpoint": "other"}
        scope["distml.labels"] = labels
        status = 0  # 0: no answer started yet
        started = time.perf_counter()

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 401:
                    labels["endpoint"] = "unauthorized"
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-model-version"]
                tag = f"{labels['model']}:{labels['version']}" if labels["model"] else server.repository.tags
                headers.append((b"x-model-version", tag.encode()))
                message = {**message, "headers": headers}
            await send(message)

        server.in_flight += 1
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            log.exception("event=unhandled_error path=%s", scope["path"])
            if status:
                raise
            response = http.error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
            await response(scope, receive, send_with_headers)
        finally:
            served = scope.get("distml.served")
            if served is not None:
                served.in_use -= 1
            server.in_flight -= 1
            server.metrics.observe_request(
                labels["model"], labels["version"], labels["endpoint"], status or 500, time.perf_counter() - started
            )


class RepositoryBody(openapi.Doc):
    name: str
    version: str
    state: str = Field(description="loaded, already_loaded or unloaded")
    versions: list[str] = Field(description="the versions of the model this replica serves now")
    default_version: str | None = Field(description="what a request that names no version gets: the highest")


def _documented(model: type, status: int = 200) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model}, "4XX": {"model": openapi.ErrorBody}, "503": {"model": openapi.ErrorBody}}


def create_app(config: ReplicaConfig, token: str | None = None, workspace: Workspace | None = None) -> FastAPI:
    """The FastAPI app of one replica.

    The model references in `config.models` ('cnn' = latest, 'cnn:3', 'cnn@champion') are resolved
    and their manifests checked now (a bad one raises DistmlError); weights load in the background
    once the app starts, and /v2/health/ready answers 503 until they are in.
    """
    ws = workspace or Workspace.open(config.workspace)
    server = ModelServer(config, ModelRepository(ws, config.models))
    app = http.FrontedApp(title="distml model server", version=distml.__version__, lifespan=server.lifespan)
    app.state.server = server
    http.install_error_handlers(app)
    p = openapi
    infer_body = http.request_body(p.InferRequestBody)
    routes: list[tuple[str, str, Any, dict[str, Any]]] = [
        ("GET", "/v2/health/live", server.health_live, {"responses": _documented(p.LiveBody)}),
        ("GET", "/v2/health/ready", server.health_ready, {"responses": _documented(p.ReadyBody)}),
        ("GET", "/v2", server.server_metadata, {"responses": _documented(p.ServerMetadataBody)}),
        ("GET", "/v2/models/{model}", server.model_metadata, {"responses": _documented(p.ModelMetadataBody)}),
        ("GET", "/v2/models/{model}/versions/{version}", server.model_metadata,
         {"responses": _documented(p.ModelMetadataBody)}),
        ("GET", "/v2/models/{model}/ready", server.model_ready, {"responses": _documented(p.ModelReadyBody)}),
        ("GET", "/v2/models/{model}/versions/{version}/ready", server.model_ready,
         {"responses": _documented(p.ModelReadyBody)}),
        ("POST", "/v2/models/{model}/infer", server.v2_infer,
         {"responses": _documented(p.InferResponseBody), "openapi_extra": infer_body}),
        ("POST", "/v2/models/{model}/versions/{version}/infer", server.v2_infer,
         {"responses": _documented(p.InferResponseBody), "openapi_extra": infer_body}),
        ("POST", "/v2/models/{model}/jobs", server.submit_job,
         {"responses": _documented(p.JobBody, 202), "openapi_extra": infer_body}),
        ("POST", "/v2/models/{model}/versions/{version}/jobs", server.submit_job,
         {"responses": _documented(p.JobBody, 202), "openapi_extra": infer_body}),
        ("GET", "/v2/jobs/{job_id}", server.job_status, {"responses": _documented(p.JobBody)}),
        ("GET", "/v1/models/{model}", server.v1_model, {"responses": _documented(p.V1ModelBody)}),
        ("POST", "/v1/models/{model}:predict", server.v1_predict,
         {"responses": _documented(p.PredictResponseBody), "openapi_extra": http.request_body(p.PredictRequestBody)}),
        ("POST", "/v1/models/{model}/versions/{version}:predict", server.v1_predict,
         {"responses": _documented(p.PredictResponseBody), "openapi_extra": http.request_body(p.PredictRequestBody)}),
        ("POST", "/v2/repository/index", server.repository_index, {}),
        ("POST", "/v2/repository/models/{model}/load", server.repository_load,
         {"responses": _documented(RepositoryBody), "openapi_extra": http.request_body(RepositoryRequestBody)}),
        ("POST", "/v2/repository/models/{model}/unload", server.repository_unload,
         {"responses": _documented(RepositoryBody), "openapi_extra": http.request_body(RepositoryRequestBody)}),
        ("GET", "/metrics", server.metrics_endpoint, {}),
    ]  # fmt: skip
    for method, path, endpoint, docs in routes:
        app.add_api_route(path, endpoint, methods=[method], **docs)
    http.document_bodies(app, [p.InferRequestBody, p.PredictRequestBody, RepositoryRequestBody])
    app.front = [
        (ServingMiddleware, {"server": server}),  # outermost: 401s are counted and named too
        (http.BearerAuth, {"token": token}),
        (
            http.FastRoutes,
            {"routes": [(m, path, e) for m, path, e, _ in routes if e in (server.v2_infer, server.v1_predict)]},
        ),
    ]
    return app


# --- the replica process ---------------------------------------------------------------------


#: Imported lazily on a replica's start-up path; `warm_up` imports them ahead.
WARM_MODULES = (
    "torch",
    "safetensors.torch",
    "sqlalchemy.dialects.sqlite",
    "pydantic.v1",  # FastAPI's checks of route annotations
    "httpcore",  # the job runner's callback client
    "uvicorn.lifespan.on",
    "uvicorn.protocols.http.httptools_impl",
    "distml.models.artifact",
    "distml.models.zoo",
)


def warm_up() -> None:
    """What a replica process does before it knows its models (`serve.warmpool` runs it ahead of a
    cold start): import `WARM_MODULES` (and uvicorn's uvloop loop when uvloop is installed), and run
    one small convolution so that oneDNN's one-time setup is not paid by the first request."""
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    with contextlib.suppress(ImportError):
        importlib.import_module("uvicorn.loops.uvloop")
    import torch

    with torch.inference_mode():
        conv = torch.nn.Conv2d(1, 2, 3).to(memory_format=torch.channels_last)
        conv(torch.zeros(1, 1, 8, 8).to(memory_format=torch.channels_last)).sum()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one replica: `python -m distml.serve.server REPLICA_CONFIG.json`. Contract (the gateway
    relies on it): binds the config's host/port (0 = a free port), loads every model, then writes
    the bound port to `port_file` atomically; on SIGTERM/SIGINT it turns not-ready, finishes
    in-flight requests and exits 0. Exit 2: a bad config or model reference; 1: loading failed.
    The bearer token, if any, comes from the DISTML_SERVE_TOKEN environment variable.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m distml.serve.server REPLICA_CONFIG.json (written by `distml serve`)", file=sys.stderr)
        return 2
    workspace: Workspace | None = None
    pool: SharedPool | None = None
    lease: Lease | None = None
    try:
        config = store_from_env(load_replica_config(args[0]))
        token = os.environ.get(TOKEN_ENV) or None
        check_exposure(  # before the workspace, the scheduler's lease or the models
            config.host,
            token,
            config.insecure,
            remedy="set DISTML_SERVE_TOKEN",
            override='set "insecure": true in the replica config',
        )
        logging.basicConfig(
            level=config.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        )
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per callback POST is noise
        if os.environ.get(SUPERVISOR_ENV):  # a supervised service's replica outlives its gateway, not the service
            from distml.serve.supervisor import exit_when_orphaned

            exit_when_orphaned(int(os.environ[SUPERVISOR_ENV]))
        http.clear_port_file(config.port_file)
        workspace = Workspace.open(config.workspace)
        # The replica's own place in the workspace's scheduler, held by this process (freed if it dies).
        pool = SharedPool(workspace.engine, queue=config.queue, priority="serving", kind="serve")
        lease = pool.acquire(
            f"replica {Path(args[0]).stem}",
            Resources(cpus=config.cpus),
            waiting=lambda why: log.info("event=waiting reason=%r", why),
        )
        app = create_app(config, token=token, workspace=workspace)
        sock = http.bind(config.host, config.port)
    except DistmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if lease is not None:
            pool.release(lease, "failed")
        return 2
    server: ModelServer = app.state.server

    def ready(port: int) -> None:
        log.info("event=ready port=%d models=%s", port, server.repository.tags)

    def stop() -> None:
        server.draining = True  # readiness turns 503 while in-flight requests finish

    try:
        return http.run(
            lambda: http.serve(
                app,
                sock,
                ready=lambda: server.ready,
                failed=lambda: server.load_error,
                port_file=config.port_file,
                on_ready=ready,
                on_stop=stop,
                graceful_timeout=config.graceful_timeout,
                log_level=config.log_level,
            )
        )
    finally:
        if pool is not None:
            if lease is not None:
                pool.release(lease)
            pool.close()
        workspace.close()


if __name__ == "__main__":
    sys.exit(main())
