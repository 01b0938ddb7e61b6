"""The serving gateway: one address in front of replica groups, with retries, canary and sharding.

Proxies V2/V1 inference to the least busy replica, retries on another when one fails, holds requests
through cold starts, splits traffic between versions (canary, promote, rollback; on V1 and V2 alike,
a client may pin one with `X-Model-Version`; a canary is loaded into the running replicas and judged
by `serve.canary`) and shards by consistent hashing or scatter-gather. A thin
FastAPI app (`create_app`) over `Gateway`; settings come from one `ServeConfig`. aiohttp proxies, not
httpx: side by side (8 concurrent small V2 requests, one replica, 2 cores) aiohttp 3.14 did ~2,700 req/s
at ~145 us client CPU per request, httpx 0.28 ~510 req/s at ~1,250 us.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from distml.core.errors import DistmlError
from distml.core.exposure import check_exposure
from distml.core.files import atomic_write
from distml.monitoring.metrics import GatewayMetrics
from distml.serve import admin_api, http, openapi, protocol, sharding
from distml.serve.admin_api import (
    CanaryRequestBody,
    PromoteRequestBody,
    RepositoryRequestBody,
    RollRequestBody,
    ScaleRequestBody,
    TrafficRequestBody,
)
from distml.serve.autoscaler import Autoscaler, AutoscalerLoop
from distml.serve.canary import CANARY_STATES, CanaryController, CanaryRun
from distml.serve.config import STATE_FILE, SUPERVISOR_ENV, ServeConfig, load_serve_config, store_from_env
from distml.serve.model import parse_version
from distml.serve.protocol import ProtocolError
from distml.serve.replicas import NoReplicaAvailable, ReplicaSet
from distml.serve.warmpool import warm_command

log = logging.getLogger("distml.serve.gateway")

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
SHARD_KEY_HEADER = "x-shard-key"
VERSION_HEADER = "x-model-version"
BINARY_HEADER = protocol.HEADER_LENGTH.lower()


@dataclass
class Upstream:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replica: str | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Deployments:
    """What this gateway serves, in the lineage graph of its workspace's metadata store: a deployment
    per model version, from when its replicas serve it until a roll drops it or the gateway stops.
    Best effort: serving never fails for the store (a problem is logged). Nothing is recorded for
    a workspace without a metadata store (fake replicas); real ones load registered models from it."""

    def __init__(self, config: ServeConfig, url: str, pid: int | None = None):
        # the service's process: the supervisor when one runs the gateway (a deployment outlives a
        # gateway it replaces), else this gateway
        self.config, self.url, self.pid = config, url, pid or os.getpid()
        self.serving: dict[str, str | None] = {}  # model ref as configured -> NAME:VERSION recorded
        self._workspace: Any = None

    def update(self, models: Sequence[str]) -> None:
        """Record the move from what was served to `models`: new ones start, dropped ones end."""
        import socket

        from distml.core.layout import DB_FILE, WorkspaceRef
        from distml.core.liveness import process_identity
        from distml.lineage import record as lineage
        from distml.models import registry

        pid, before = self.pid, self.serving
        self.serving = {ref: before.get(ref) for ref in models}
        changes = [(ref, before[ref] or ref, "ended") for ref in before if ref not in self.serving]
        changes += [(ref, ref, "running") for ref in self.serving if ref not in before]
        ref = self.config.replica.workspace
        try:
            own_store = ref.url != WorkspaceRef(root=ref.root).url  # not the folder's distml.db
            if self._workspace is None and (own_store or (ref.path / DB_FILE).exists()):
                from distml.workspace import Workspace

                self._workspace = Workspace.open(ref)
            if self._workspace is None:
                return
            engine, host, started = self._workspace.engine, socket.gethostname(), process_identity(pid)
            origin = {"started_by": lineage.enclosing_step()} if not before else {}  # e.g. a pipeline's serve step
            for ref, recorded, state in changes:
                version = registry.lookup(engine, recorded)  # pinned as it starts: an alias may move later
                if version is None:
                    continue
                lineage.record_deployment(
                    engine, service=self.config.name, model=version.ref, manifest_digest=version.manifest_digest,
                    state=state, url=self.url, pid=pid, host=host, pid_started=started, properties=origin,
                )  # fmt: skip
                if state == "running":
                    self.serving[ref] = version.ref
        except Exception as exc:
            log.warning("the lineage graph misses what %s serves (%s): %s", self.config.name, list(models), exc)
        if not self.serving and self._workspace is not None:
            self._workspace.close()
            self._workspace = None


def _error(status: int, message: str) -> Upstream:
    return Upstream(status, [("content-type", "application/json")], http.error_body(message))


class Gateway:
    """Replica groups, the routing state and the proxy; `create_app` wires it into FastAPI."""

    def __init__(self, config: ServeConfig, metrics: GatewayMetrics | None = None, supervisor_pid: int | None = None):
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.groups: list[ReplicaSet] = []
        run_root = config.service_dir()
        # Under a supervisor the routing state (replicas, split, canaries) is kept in this file, so that
        # the gateway it starts after this one dies takes the service over as it was.
        self.supervisor_pid = supervisor_pid
        self.state_path = run_root / STATE_FILE
        for g in range(config.shards):
            rs = ReplicaSet(
                config.replica_command,
                config.replica,
                run_dir=run_root / f"g{g}",
                replicas=config.replicas,
                name=f"g{g}",
                token=config.token_value(),
                health_interval=config.health_interval,
                health_timeout=config.health_timeout,
                max_health_failures=config.max_health_failures,
                start_timeout=config.start_timeout,
                drain_timeout=config.drain_timeout,
                supervisor_pid=supervisor_pid,
                # autoscaled: a warm, pre-imported interpreter waits for the next replica (cold starts)
                warm_command=warm_command(config.replica_command) if config.autoscale is not None else None,
            )
            rs.on_eject = lambda _r, _why, g=g: self.metrics.ejections.labels(group=str(g)).inc()
            self.groups.append(rs)
            label = str(g)
            self.metrics.desired.labels(group=label).set_function(lambda rs=rs: rs.desired)
            self.metrics.ready.labels(group=label).set_function(lambda rs=rs: rs.ready_count)
            self.metrics.queue.labels(group=label).set_function(lambda rs=rs: rs.waiting)
            self.metrics.in_flight.labels(group=label).set_function(lambda rs=rs: rs.in_flight)
        self.ring = sharding.HashRing(range(config.shards))
        self.autoscalers: list[AutoscalerLoop] = []
        self.traffic: dict[str, dict[str, float]] = {}
        self.canary = CanaryController(
            self.traffic, self.groups, self._stable_version, self._drain_version, self._canary_metric
        )
        self._version_in_flight: dict[tuple[str, str], int] = {}  # (model, version or ""): requests in flight
        self._rng = random.Random(config.seed)
        self._rr = 0
        self._session: aiohttp.ClientSession | None = None
        self.started = False
        self.deployments: Deployments | None = None  # set by `serve_gateway` once it serves
        self._keeper: asyncio.Task | None = None
        self._written = b""
        self.took_over = False  # from a gateway of this service that died (see `serve.supervisor`)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),  # < uvicorn's 5 s idle close
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout),
        )
        saved = self._read_state() if self.supervisor_pid is not None else None
        adopt = [None] * len(self.groups)
        if saved and len(saved.get("groups", ())) == len(self.groups):
            adopt = saved["groups"]
        await asyncio.gather(*(rs.start(wait=True, adopt=a) for rs, a in zip(self.groups, adopt)))
        if saved:
            self.took_over = True
            await self._restore_routing(saved)
        if self.supervisor_pid is not None:
            self._keeper = asyncio.create_task(self._keep_state(), name="keep-state")
        if self.config.autoscale is not None:
            for g, rs in enumerate(self.groups):
                loop = AutoscalerLoop(Autoscaler(self.config.autoscale), rs, tick=self.config.autoscale_tick)
                self.metrics.panic.labels(group=str(g)).set_function(
                    lambda loop=loop: 1 if loop.autoscaler.panicking else 0
                )
                loop.start()
                self.autoscalers.append(loop)
        self.started = True

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self.state_path.unlink(missing_ok=True)  # a clean stop: the next start is a new service
        await self.canary.close()
        for loop in self.autoscalers:
            await loop.stop()
        await asyncio.gather(*(rs.close(graceful=True) for rs in self.groups), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------ the state a restarted gateway takes over

    def saved(self) -> dict[str, Any]:
        return {
            "gateway_pid": os.getpid(),
            "traffic": self.traffic,
            "canaries": self.canary.saved(),
            "groups": [rs.saved() for rs in self.groups],
        }

    def _read_state(self) -> dict[str, Any] | None:
        try:
            saved = orjson.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:  # written atomically, so only a foreign edit
            log.error("cannot read %s (%s); starting the service afresh", self.state_path, exc)
            return None
        log.warning("taking over from the gateway (pid %s) that died", saved.get("gateway_pid"))
        return saved

    async def _restore_routing(self, saved: dict[str, Any]) -> None:
        self.traffic.update(saved.get("traffic", {}))
        for model, version in self.canary.restore(saved.get("canaries", {})):
            ref = f"{model}:{version}"
            results = await asyncio.gather(*(rs.unload_version(ref) for rs in self.groups), return_exceptions=True)
            for res in results:
                if isinstance(res, BaseException):
                    log.warning("unloading %s after the gateway restart failed: %s", ref, res)

    async def persist(self) -> None:
        """Write `saved()` to the state file if it changed (atomically: never half written); admin
        routes call it before they answer, so an acknowledged change outlives this process."""
        if self.supervisor_pid is None:
            return
        data = orjson.dumps(self.saved())
        if data != self._written:
            await asyncio.to_thread(_write_state, self.state_path, data)
            self._written = data

    async def _keep_state(self, interval: float = 0.05) -> None:
        """`persist` every `interval`: what changes by itself (replicas replaced, autoscaling, a
        canary's verdict) is in the file within that time."""
        while True:
            try:
                await self.persist()
            except asyncio.CancelledError:
                raise
            except Exception:  # a full disk, say: keep serving, retry at the next tick
                log.exception("cannot write the gateway's state to %s", self.state_path)
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ routing

    def ready(self) -> bool:
        if not self.started:
            return False
        can_cold_start = self.config.autoscale is not None and self.config.autoscale.min_replicas == 0
        return all(rs.ready_count > 0 or (can_cold_start and rs.desired == 0) for rs in self.groups)

    def pick_group(self) -> int:
        loads = [(rs.in_flight + rs.waiting) / max(rs.ready_count, 1) for rs in self.groups]
        least = min(loads)
        ties = [g for g, load in enumerate(loads) if load == least]
        self._rr += 1
        return ties[self._rr % len(ties)]

    def choose_version(self, model: str, pinned: str | None = None) -> str | None:
        """The version a request goes to: the one it pins, else a draw from the model's traffic split."""
        if pinned is not None:
            try:
                return str(parse_version(model, pinned))
            except ProtocolError:  # as a replica answers a version it does not have
                raise ProtocolError(404, f"model {model!r} has no version {pinned!r}") from None
        split = self.traffic.get(model)
        if not split:
            return None
        versions = list(split)
        return self._rng.choices(versions, weights=[split[v] for v in versions])[0]

    async def forward(
        self,
        group: int,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        retry: bool,
        deadline: float,
    ) -> Upstream:
        """Send to the least busy ready replica of `group`; retry elsewhere on connection failure or
        502/503 (idempotent requests only), holding while no replica is ready until `deadline`."""
        rs = self.groups[group]
        if rs.token:
            headers = {**headers, "authorization": f"Bearer {rs.token}"}
        url_tail = path + (f"?{query}" if query else "")
        exclude: set[str] = set()
        last: Upstream | None = None
        attempts = self.config.max_attempts if retry else 1
        for attempt in range(attempts):
            if attempt:
                self.metrics.retries.inc()
            try:
                replica = await rs.acquire(exclude, timeout=max(0.0, deadline - time.monotonic()))
            except NoReplicaAvailable as exc:
                if last is not None:
                    return last
                return _error(
                    503,
                    f"no replica became ready within the hold timeout of {self.config.hold_timeout:g} s "
                    f"(--hold-timeout); {rs.name}: {exc.state}",
                )
            try:
                async with self._session.request(
                    method, replica.url + url_tail, data=body or None, headers=headers
                ) as resp:
                    content = await resp.read()
                    result = Upstream(resp.status, list(resp.headers.items()), content, replica.id)
            except TimeoutError:
                rs.release(replica, ok=False)
                return _error(504, f"replica {replica.id} did not answer within {self.config.request_timeout:g} s")
            except (aiohttp.ClientError, OSError) as exc:
                rs.release(replica, ok=False)
                rs.report_failure(replica)
                exclude.add(replica.id)
                last = _error(502, f"replica {replica.id} failed: {type(exc).__name__}: {exc}")
                log.info("request to %s failed (%s), attempt %d/%d", replica.id, exc, attempt + 1, attempts)
                continue
            except BaseException:  # cancelled (client gone, shutdown): keep the in-flight count right
                rs.release(replica, ok=False)
                raise
            rs.release(replica, ok=result.status < 500)
            if result.status in (502, 503) and attempt + 1 < attempts:
                rs.report_failure(replica)
                exclude.add(replica.id)
                last = result
                continue
            result.headers.append(("x-distml-replica", replica.id))
            return result
        return last if last is not None else _error(502, "no attempt was made")

    async def infer(self, request: Request, model: str, version: str | None, kind: str) -> Response:
        """V2 infer (`kind` "v2") or V1 predict ("v1"): pick the version, then a group, then a replica."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.config.hold_timeout
        body = await http.read_body(request, self.config.replica.max_body_bytes)
        version = self.choose_version(model, version or request.headers.get(VERSION_HEADER))
        key = (model, version or "")  # counted until answered: a version is unloaded only once this is 0
        self._version_in_flight[key] = self._version_in_flight.get(key, 0) + 1
        try:
            result = await self._infer(request, model, version, kind, body, deadline)
        finally:
            left = self._version_in_flight[key] - 1
            if left:
                self._version_in_flight[key] = left
            else:
                del self._version_in_flight[key]
        label = self.metrics.model_label(model)
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(model=label, status=str(result.status)).inc()
        self.metrics.latency.labels(model=label).observe(elapsed)
        ok = result.status < 500  # a 4xx is the client's error; 5xx, failed or timed out upstreams count
        if self.canary.observe(model, version, ok, elapsed):
            self.metrics.canary_requests.labels(model=label, version=version, outcome="ok" if ok else "error").inc()
        return to_response(result)

    async def _infer(
        self, request: Request, model: str, version: str | None, kind: str, body: bytes, deadline: float
    ) -> Upstream:
        name = quote(model, safe="")
        at = f"/versions/{quote(version, safe='')}" if version is not None else ""
        path = f"/v2/models/{name}{at}/infer" if kind == "v2" else f"/v1/models/{name}{at}:predict"
        headers = forward_headers(request)
        key = request.headers.get(SHARD_KEY_HEADER)
        result: Upstream | None = None
        if len(self.groups) > 1 and key is None:
            result = await self.scatter(kind, request, body, path, headers, deadline)
        if result is None:
            if len(self.groups) == 1:
                group = 0
            else:
                group = self.ring.node_for(key) if key is not None else self.pick_group()
            result = await self.forward(group, "POST", path, request.url.query, headers, body, True, deadline)
            result.headers.append(("x-distml-group", str(group)))
        return result

    async def scatter(
        self, kind: str, request: Request, body: bytes, path: str, headers: dict[str, str], deadline: float
    ) -> Upstream | None:
        """Split a multi-item batch over the shard groups and gather it back in order, through the
        protocol's types (JSON or binary tensors alike); None when the request is not a batch."""
        try:
            if kind == "v2":
                parsed = protocol.parse_infer_request(
                    body,
                    request.headers.get(BINARY_HEADER),
                    request.headers.get("content-encoding"),
                    max_bytes=self.config.replica.max_body_bytes,
                )
                parts = sharding.split_v2(parsed, len(self.groups))
            else:
                body = protocol.decompress_body(
                    body, request.headers.get("content-encoding"), self.config.replica.max_body_bytes
                )
                parts = sharding.split_v1(protocol.parse_predict_request(body), len(self.groups))
        except ProtocolError:
            return None  # not a splittable batch: one replica answers (and explains what is wrong)
        if len(parts) < 2:
            return None
        headers = {k: v for k, v in headers.items() if k.lower() not in (BINARY_HEADER, "content-encoding")}
        encoded = []
        for part in parts:
            part_headers = dict(headers)
            if kind == "v2":
                content, json_length = sharding.encode_part(part)
                if json_length is not None:
                    part_headers[protocol.HEADER_LENGTH] = str(json_length)
                    part_headers["content-type"] = "application/octet-stream"
                else:
                    part_headers["content-type"] = "application/json"
            else:
                content = protocol.encode_predict_request(part)
                part_headers["content-type"] = "application/json"
            encoded.append((content, part_headers))
        results = await asyncio.gather(
            *(
                self.forward(g, "POST", path, request.url.query, part_headers, content, True, deadline)
                for g, (content, part_headers) in enumerate(encoded)
            )
        )
        for g, res in enumerate(results):
            if res.status != 200:
                res.headers.append(("x-distml-group", str(g)))
                return res
        try:
            if kind == "v2":
                merged = sharding.merge_v2(
                    [protocol.parse_infer_response(r.body, r.header(BINARY_HEADER)) for r in results]
                )
                content, out = protocol.encode_infer_response(merged, parts[0].wants_binary)
                out_headers = list(out.items())
            else:
                merged_v1 = sharding.merge_v1([protocol.parse_predict_response(r.body) for r in results])
                content, out_headers = (
                    protocol.encode_predict_response(merged_v1),
                    [("content-type", "application/json")],
                )
        except DistmlError as exc:
            return _error(502, f"cannot gather the shard groups' responses: {exc}")
        out_headers += [
            ("x-distml-group", ",".join(str(g) for g in range(len(parts)))),
            ("x-distml-replica", ",".join(res.replica or "" for res in results)),
        ]
        version = results[0].header(VERSION_HEADER)
        if version is not None:
            out_headers.append((VERSION_HEADER, version))
        return Upstream(200, out_headers, content)

    async def proxy(self, request: Request, retry: bool) -> Response:
        if any(part in (".", "..") for part in request.url.path.split("/")):
            raise ProtocolError(400, f"path {request.url.path!r} has '.' or '..' segments; send a normalised path")
        deadline = time.monotonic() + self.config.hold_timeout
        body = await http.read_body(request, self.config.replica.max_body_bytes)
        group = self.pick_group() if len(self.groups) > 1 else 0
        result = await self.forward(
            group, request.method, request.url.path, request.url.query, forward_headers(request), body, retry, deadline
        )
        return to_response(result)

    # ------------------------------------------------------------ admin

    def set_traffic(self, model: str, split: TrafficRequestBody) -> dict[str, float]:
        """Split `model`'s traffic as `split` says (versions without weight get none)."""
        self.traffic[model] = {str(v): w for v, w in split.versions.items() if w > 0}
        log.info("traffic for %s: %s", model, self.traffic[model])
        return self.traffic[model]

    async def roll(self, models: list[str]) -> None:
        await asyncio.gather(*(rs.roll(models) for rs in self.groups))
        if self.deployments is not None:
            await asyncio.to_thread(self.deployments.update, self.groups[0].models)

    # ------------------------------------------------------------ canary with automatic analysis

    async def _stable_version(self, model: str) -> str:
        """The version taking all of `model`'s traffic: the one in its split, else the highest the
        replicas serve (what a request that names no version gets)."""
        split = self.traffic.get(model)
        if split:
            if len(split) == 1:
                return next(iter(split))
            raise ProtocolError(
                409,
                f"model {model!r} already splits its traffic {split}; promote one version "
                f"(POST /admin/models/{model}/promote) before starting a canary",
            )
        deadline = time.monotonic() + self.config.hold_timeout
        result = await self.forward(0, "GET", f"/v2/models/{quote(model, safe='')}", "", {}, b"", True, deadline)
        try:
            versions = [int(v) for v in orjson.loads(result.body)["versions"]] if result.status == 200 else []
        except (ValueError, KeyError, TypeError):
            versions = []
        if not versions:
            raise ProtocolError(
                404 if result.status == 404 else 502,
                f"cannot tell which version of {model!r} the replicas serve ({result.status}): "
                f"{result.body[:300].decode(errors='replace')}",
            )
        return str(max(versions))

    async def _drain_version(self, model: str, version: str) -> None:
        """Wait (up to drain_timeout) until no request to `model` chose `version` ("": none) and is unanswered."""
        deadline = time.monotonic() + self.config.drain_timeout
        while self._version_in_flight.get((model, version), 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def repository(self, model: str, version: str, action: str) -> None:
        """Load or unload `model:version` on every replica; an unload of a version that the traffic
        split still sends requests to, or that a running canary uses, is refused (409)."""
        if self.canary.uses(model, version):
            raise ProtocolError(409, f"version {version} of {model!r} is in a running canary; abort it first")
        if action == "unload" and self.traffic.get(model, {}).get(version):
            raise ProtocolError(
                409,
                f"the traffic split of {model!r} sends requests to version {version} ({self.traffic[model]}); "
                f"move its traffic away (POST /admin/models/{model}/promote) before unloading it",
            )
        ref = f"{model}:{version}"
        if action == "load":
            await asyncio.gather(*(rs.load_version(ref) for rs in self.groups))
        else:
            await self._drain_version(model, version)
            await asyncio.gather(*(rs.unload_version(ref) for rs in self.groups))

    def _canary_metric(self, run: CanaryRun) -> None:
        for state in CANARY_STATES:
            self.metrics.canary_state.labels(model=self.metrics.model_label(run.model), state=state).set(
                1 if run.state == state else 0
            )

    def snapshot(self) -> dict:
        out: dict[str, Any] = {"groups": [rs.snapshot() for rs in self.groups], "traffic": self.traffic}
        if self.canary.runs:
            out["canaries"] = {model: run.view() for model, run in self.canary.runs.items()}
        if self.autoscalers:
            out["autoscaler"] = [
                None
                if loop.last is None
                else {
                    "desired": loop.last.desired,
                    "panicking": loop.last.panicking,
                    "stable_concurrency": loop.last.stable_concurrency,
                    "panic_concurrency": loop.last.panic_concurrency,
                }
                for loop in self.autoscalers
            ]
        return out


def _write_state(path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def forward_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


def to_response(result: Upstream) -> Response:
    headers = {}
    media_type = None
    for key, value in result.headers:
        low = key.lower()
        if low in RESPONSE_DROP:
            continue
        if low == "content-type":
            media_type = value
            continue
        headers[key] = value
    return Response(result.body, status_code=result.status, headers=headers, media_type=media_type)


def create_app(gateway: Gateway) -> FastAPI:
    """The FastAPI app of `gateway`; its lifespan starts (and stops) the replicas unless they already
    run, as when `serve_gateway` started them before binding the port."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        owner = not gateway.started
        if owner:
            try:
                await gateway.start()
            except BaseException:
                await gateway.close()
                raise
        try:
            yield
        finally:
            if owner:
                await gateway.close()

    app = http.FrontedApp(title="distml gateway", lifespan=lifespan)
    http.install_error_handlers(app)
    _health_routes(app, gateway)
    hot = _inference_routes(app, gateway)
    _admin_routes(app, gateway)
    _repository_routes(app, gateway)

    # everything else under /v2 and /v1 (metadata, model readiness, jobs) goes to a replica, whose
    # own /docs describe those routes (a catch-all here would only repeat one operation per method)
    @app.api_route("/v2", methods=["GET"], include_in_schema=False)
    @app.api_route("/v2/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def passthrough(request: Request, rest: str = ""):
        return await gateway.proxy(request, retry=request.method == "GET")

    http.document_bodies(app, [openapi.InferRequestBody, openapi.PredictRequestBody, *admin_api.BODIES])
    app.front = [
        (http.BearerAuth, {"token": gateway.config.token_value()}),
        (http.FastRoutes, {"routes": [(method, path, endpoint) for method, path, endpoint, _ in hot]}),
    ]
    return app


def _health_routes(app: FastAPI, gateway: Gateway) -> None:
    """Liveness, readiness (some replica of every group ready) and the gateway's /metrics."""

    @app.get("/v2/health/live", responses={200: {"model": openapi.LiveBody}})
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", responses={200: {"model": openapi.ReadyBody}})
    async def ready():
        ok = gateway.ready()
        return Response(f'{{"ready": {str(ok).lower()}}}', 200 if ok else 503, media_type="application/json")

    @app.get("/metrics")
    async def metrics():
        body, content_type = gateway.metrics.exposition()
        return Response(body, media_type=content_type)


def _inference_routes(app: FastAPI, gateway: Gateway) -> list[tuple[str, str, Callable, dict]]:
    """The V2 and V1 inference routes, documented here and answered by `http.FastRoutes`, which
    skips FastAPI's routing on the hot path; returns them as (method, path, endpoint, docs)."""

    infer_docs = {
        "responses": {200: {"model": openapi.InferResponseBody}, "4XX": {"model": openapi.ErrorBody}},
        "openapi_extra": http.request_body(openapi.InferRequestBody),
    }
    predict_docs = {
        "responses": {200: {"model": openapi.PredictResponseBody}, "4XX": {"model": openapi.ErrorBody}},
        "openapi_extra": http.request_body(openapi.PredictRequestBody),
    }

    async def infer_v2(request: Request):
        return await gateway.infer(request, request.path_params["model"], request.path_params.get("version"), "v2")

    async def predict_v1(request: Request):
        return await gateway.infer(request, request.path_params["model"], request.path_params.get("version"), "v1")

    hot = [
        ("POST", "/v2/models/{model}/infer", infer_v2, infer_docs),
        ("POST", "/v2/models/{model}/versions/{version}/infer", infer_v2, infer_docs),
        ("POST", "/v1/models/{model}:predict", predict_v1, predict_docs),
        ("POST", "/v1/models/{model}/versions/{version}:predict", predict_v1, predict_docs),
    ]
    for method, path, endpoint, docs in hot:
        app.add_api_route(path, endpoint, methods=[method], **docs)  # documented; FastRoutes answers them
    return hot


async def _read_body(
    request: Request, limit: int, body: type[admin_api.BodyT], model: str | None = None
) -> admin_api.BodyT:
    """The request's JSON body as an admin `body` (`admin_api`), or one 400 saying what is wrong."""
    return admin_api.parse_body(body, await http.read_json(request, limit, body.expected), model)


def _admin_routes(app: FastAPI, gateway: Gateway) -> None:
    """/admin: replicas (list, scale, roll), traffic splits, canaries and promotion; each body is
    parsed by its model in `admin_api` (documented as such in /docs)."""
    limit = gateway.config.replica.max_body_bytes

    def documented(body: type) -> dict[str, Any]:
        return {"openapi_extra": http.request_body(body), "responses": {"4XX": {"model": openapi.ErrorBody}}}

    @app.get("/admin/replicas")
    async def replicas():
        return gateway.snapshot()

    async def done(answer: Any) -> Any:  # what an admin call changed outlives this process once answered
        await gateway.persist()
        return answer

    @app.post("/admin/replicas/scale", **documented(ScaleRequestBody))
    async def scale(request: Request):
        n = (await _read_body(request, limit, ScaleRequestBody)).replicas
        if gateway.autoscalers:
            return http.error_response(
                409,
                "autoscaling is on, it sets the replica count; restart `distml serve` with another "
                "--autoscale MIN:MAX, or without it to scale by hand",
            )
        for rs in gateway.groups:
            rs.scale_to(n)
        return await done(gateway.snapshot())

    @app.post("/admin/replicas/roll", **documented(RollRequestBody))
    async def roll(request: Request):
        await gateway.roll((await _read_body(request, limit, RollRequestBody)).models)
        return await done(gateway.snapshot())

    @app.get("/admin/models/{model}/traffic")
    async def get_traffic(model: str):
        return {"model": model, "versions": gateway.traffic.get(model, {})}

    @app.post("/admin/models/{model}/traffic", **documented(TrafficRequestBody))
    async def set_traffic(model: str, request: Request):
        split = await _read_body(request, limit, TrafficRequestBody, model)
        return await done({"model": model, "versions": gateway.set_traffic(model, split)})

    @app.delete("/admin/models/{model}/traffic")
    async def clear_traffic(model: str):
        gateway.traffic.pop(model, None)
        return await done({"model": model, "versions": {}})

    @app.post("/admin/models/{model}/canary", **documented(CanaryRequestBody))
    async def start_canary(model: str, request: Request):
        body = await _read_body(request, limit, CanaryRequestBody, model)
        run = await gateway.canary.start(model, body.version, body.policy)
        return await done(run.view())

    @app.get("/admin/models/{model}/canary")
    async def canary_status(model: str):
        return gateway.canary.view(model)

    @app.delete("/admin/models/{model}/canary")
    async def abort_canary(model: str):
        return await done((await gateway.canary.abort(model)).view())

    @app.post("/admin/models/{model}/promote", **documented(PromoteRequestBody))
    async def promote(model: str, request: Request):
        version = (await _read_body(request, limit, PromoteRequestBody, model)).version
        split = gateway.set_traffic(model, TrafficRequestBody(versions={version: 100.0}))
        return await done({"model": model, "versions": split})


def _repository_routes(app: FastAPI, gateway: Gateway) -> None:
    limit = gateway.config.replica.max_body_bytes

    @app.post(
        "/v2/repository/models/{model}/{action}",
        openapi_extra=http.request_body(RepositoryRequestBody),
        responses={"4XX": {"model": openapi.ErrorBody}},
    )
    async def repository(model: str, action: str, request: Request):
        """The model-repository extension on the whole service: every replica of every group loads (or
        unloads) the version, and replicas started later do too; traffic is not changed (see canary)."""
        if action not in ("load", "unload"):
            raise ProtocolError(404, f"no route POST {request.url.path}; expected .../load or .../unload")
        version = str((await _read_body(request, limit, RepositoryRequestBody, model)).parameters.version)
        await gateway.repository(model, version, action)
        await gateway.persist()
        return {"name": model, "version": version, "state": f"{action}ed"}


async def serve_gateway(
    config: ServeConfig,
    on_ready: Callable[[str], None] | None = None,
    sock: socket.socket | None = None,
    supervisor_pid: int | None = None,
) -> int:
    """Start the replicas, then serve until SIGTERM/SIGINT (drain, retire the replicas, return 0).
    Raises DistmlError if the port cannot be bound or the replicas never start. Under a supervisor
    (`serve.supervisor`), `sock` is the service's socket it holds and the gateway takes over the
    replicas and routing of the one before it, if one died."""
    check_exposure(config.host, config.token_value(), config.insecure)  # before any replica starts
    gateway = Gateway(config, supervisor_pid=supervisor_pid)
    if sock is None:
        sock = http.bind(config.host, config.port)
    else:
        sock.setblocking(False)
    try:
        with http.stop_on_signal() as stopping:
            await gateway.start()
    except BaseException as exc:
        await gateway.close()
        sock.close()
        if stopping.is_set():  # SIGTERM/SIGINT while the replicas started: they are retired, exit 0
            return 0
        if isinstance(exc, DistmlError):
            raise DistmlError(f"gateway did not start: {exc}") from None
        raise

    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    gateway.deployments = Deployments(config, f"http://{host}:{sock.getsockname()[1]}", supervisor_pid)
    recording = asyncio.to_thread(gateway.deployments.update, gateway.groups[0].models)
    if gateway.took_over:  # answer first: clients wait in the socket's backlog, the store may be slow
        recorded = asyncio.create_task(recording)
    else:
        await recording  # before the port file

    def ready(port: int) -> None:
        url = f"http://{config.host}:{port}"
        log.warning("gateway ready on %s", url)
        if on_ready is not None:
            on_ready(url)

    try:
        return await http.serve(
            create_app(gateway),
            sock,
            port_file=config.port_file,
            on_ready=ready,
            graceful_timeout=config.drain_timeout,
            log_level=config.log_level,
        )
    finally:
        await gateway.close()
        if gateway.took_over:
            await recorded
        await asyncio.to_thread(gateway.deployments.update, ())


def run_gateway(config: ServeConfig, on_ready: Callable[[str], None] | None = None, **kwargs: Any) -> int:
    """`serve_gateway` on its own event loop (uvloop when installed), as `distml serve` runs it."""
    return http.run(lambda: serve_gateway(config, on_ready, **kwargs))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m distml.serve.gateway SERVE_CONFIG.json`: a gateway from a ServeConfig file (as
    `distml serve` writes it); the token comes from DISTML_SERVE_TOKEN."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m distml.serve.gateway SERVE_CONFIG.json (see `distml serve`)", file=sys.stderr)
        return 2
    try:
        config = load_serve_config(args[0])
        config = config.model_copy(update={"replica": store_from_env(config.replica)})
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        from distml.serve.supervisor import LISTEN_FD_ENV, STANDBY_FD_ENV

        supervised: dict[str, Any] = {}
        if os.environ.get(SUPERVISOR_ENV) and os.environ.get(LISTEN_FD_ENV):  # started by serve.supervisor
            if os.environ.get(STANDBY_FD_ENV):  # a standby: imported and warmed ahead, it waits for its turn
                import uvicorn  # noqa: F401  (what `http.serve` imports when it runs)

                create_app(Gateway(config))  # builds (and caches) what every app's routes need

                if not os.read(int(os.environ[STANDBY_FD_ENV]), 1):
                    return 0  # the supervisor stopped, or no longer needs a standby
            supervised = {
                "sock": socket.socket(fileno=int(os.environ[LISTEN_FD_ENV])),
                "supervisor_pid": int(os.environ[SUPERVISOR_ENV]),
            }
        return run_gateway(config, **supervised)
    except DistmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
