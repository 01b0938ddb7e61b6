"""Replica processes of the model server: start, health-check, replace, drain, roll, pick the least busy.

Each replica is a child reading its own ReplicaConfig file (port 0, a port file; ready on GET
/v2/health/ready) with PR_SET_PDEATHSIG
so none outlives us; dead or N-times-unhealthy ones are ejected and replaced, retired ones drain first.
With a `warm_command` a set keeps one pre-started, pre-imported interpreter (`serve.warmpool`) and the next
replica it starts is that process, handed its config: a cold start skips Python's start and torch's import.
supervisord and circus were considered: neither checks HTTP readiness nor counts in-flight requests.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from distml.core.errors import DistmlError
from distml.core.files import atomic_write
from distml.core.liveness import is_running, parent_of, process_identity
from distml.core.refs import ModelRef
from distml.serve.admin_api import RepositoryRequestBody, parse_body, to_json
from distml.serve.config import SUPERVISOR_ENV, TOKEN_ENV, ReplicaConfig
from distml.serve.warmpool import WarmPool

log = logging.getLogger("distml.serve.replicas")

STARTING, READY, DRAINING, STOPPED = "starting", "ready", "draining", "stopped"
# A warm interpreter's imports take a CPU for seconds: none starts beside a starting replica, nor in this
# long after one got ready (its first requests, the ones that woke it, are answered meanwhile).
WARM_AFTER_READY_S = 1.0

# ---------------------------------------------------------------- children never outlive us

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
    _prctl = None

_LIVE: set[subprocess.Popen] = set()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    # Linux sends the signal when the *thread* that forked exits, so spawn from the thread that
    # lives as long as the gateway (the event loop's), never from a pool thread.
    def setup() -> None:  # runs in the child between fork and exec
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return setup


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
    _LIVE.clear()


class AdoptedProcess:
    """A replica process that an earlier gateway of this service started: since that gateway died it is
    the supervisor's child, so it is watched by pid and start time (`process_identity`), not waited for
    (the supervisor reaps it). The part of `subprocess.Popen` that `ReplicaSet` uses."""

    def __init__(self, pid: int, identity: str | None):
        self.pid, self.identity = pid, identity
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not is_running(self.pid, self.identity):
            self.returncode = -1  # its status went to the supervisor, which reaped it
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.02)
        return self.returncode


def _log_tail(path: Path, limit: int = 1500) -> str:
    try:
        text = path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f"; its log ({path}) ends with: {text}" if text else f"; its log ({path}) is empty"


class NoReplicaAvailable(DistmlError):
    """No replica became ready before the caller's deadline; `state` says what the set was doing."""

    def __init__(self, message: str, state: str = ""):
        super().__init__(message)
        self.state = state or message


class ReplicaRefused(DistmlError):
    """A replica refused or failed a model-repository call; `status` is what the gateway answers."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _split_ref(ref: str) -> tuple[str, int]:
    pinned = ModelRef.pinned(ref)
    return pinned.name, pinned.version


def _serves(models: Iterable[str], name: str, version: int) -> bool:
    """Is `name:version` among the model references `models`? ('cnn' or 'cnn@champion' cannot be
    told apart without the registry, so they never match.)"""
    return f"{name}:{version}" in models


@dataclass(eq=False)
class Replica:
    id: str
    models: tuple[str, ...]
    process: subprocess.Popen | AdoptedProcess
    port_file: Path
    log_path: Path
    host: str
    started_at: float
    port: int | None = None
    state: str = STARTING
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    ready_at: float | None = None
    error: str | None = None
    identity: str | None = None  # its start time: tells it from a later process with its pid
    warm: bool = False  # started from the set's warm interpreter
    _reaped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def info(self) -> dict:
        return {
            "id": self.id,
            "pid": self.pid,
            "port": self.port,
            "state": self.state,
            "models": list(self.models),
            "outstanding": self.outstanding,
            "served": self.served,
            "error": self.error,
            "warm": self.warm,
        }


class ReplicaSet:
    """Replica processes serving the same models; call every method from one asyncio loop."""

    def __init__(
        self,
        command: Sequence[str],
        template: ReplicaConfig,
        *,
        run_dir: str | os.PathLike | None = None,
        replicas: int = 1,
        name: str = "replicas",
        token: str | None = None,
        health_interval: float = 0.5,
        health_timeout: float = 2.0,
        max_health_failures: int = 3,
        start_timeout: float = 60.0,
        drain_timeout: float = 30.0,
        retry_grace: float = 0.5,
        env: dict[str, str] | None = None,
        supervisor_pid: int | None = None,
        warm_command: Sequence[str] | None = None,
    ):
        self.command = list(command)
        if not self.command:
            raise DistmlError("replica command is empty; expected e.g. [python, -m, distml.serve.server]")
        ws = template.workspace  # its db_url stays as given: None lets a replica take DISTML_DB_URL
        self.template = template.model_copy(
            update={"workspace": ws.model_copy(update={"root": str(ws.path.resolve())})}
        )
        self.models = tuple(template.models)
        if replicas < 0:
            raise DistmlError(f"replica count must be >= 0, got {replicas}")
        if max_health_failures < 1 or health_interval <= 0:
            raise DistmlError("health_interval must be > 0 and max_health_failures >= 1")
        self.name = name
        self.host = template.host
        self.token = token
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.max_health_failures = max_health_failures
        self.start_timeout = start_timeout
        self.drain_timeout = drain_timeout
        self.retry_grace = retry_grace
        self.env = env
        # Under a service's supervisor, replicas outlive a killed gateway (the supervisor adopts them,
        # the next gateway takes them over) instead of dying with it.
        self.supervisor_pid = supervisor_pid
        # `serve.warmpool.warm_command(command)`: one such interpreter is kept started (when no replica is
        # starting) and becomes the next replica; it is no replica itself (not counted, listed, nor adopted).
        self.warm = WarmPool(warm_command, self._popen) if warm_command else None
        self.desired = replicas
        self._own_run_dir, self._run_dir_arg = run_dir is None, run_dir
        self.run_dir: Path | None = None
        self._replicas: list[Replica] = []
        self._retiring: set[asyncio.Task] = set()
        self._retire_tasks: dict[str, asyncio.Task] = {}
        self._reaping: list[subprocess.Popen] = []
        self._seq, self._next_id = itertools.count(), 0  # replica ids; the next, kept for a gateway taking over
        self._rr = 0
        self._in_flight = 0
        self._waiting = 0
        self._area = 0.0
        self._area_t = time.monotonic()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._health_due = False
        self._rolling = False
        self._roll_lock = asyncio.Lock()
        self._start_failures = 0
        self._ready_once = False
        self._next_spawn_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task | None = None
        self._closed = False
        self.last_error: str | None = None
        self.ejections = 0
        self.on_demand: Callable[[], None] | None = None  # called when a request waits and nothing runs
        self.on_eject: Callable[[Replica, str], None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self, wait: bool = True, adopt: dict | None = None) -> None:
        """Start the supervisor and the initial replicas; with `wait`, return once all are ready.
        `adopt` is the `saved()` state of this set in a gateway that died: its live replicas are taken
        over (not restarted) and only the missing ones are started."""
        if self._supervisor is not None:
            return
        if self._own_run_dir:
            self.run_dir = Path(tempfile.mkdtemp(prefix=f"distml-{self.name}-"))
        else:
            self.run_dir = Path(self._run_dir_arg)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        adopted = self._adopt(adopt) if adopt else []
        initial = adopted + [self._spawn() for _ in range(self.desired - len(adopted))]
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")
        if wait and initial:  # fail fast: the first replica that dies or times out ends the start
            await asyncio.gather(*(self._wait_replica(r, self.start_timeout) for r in initial))

    async def close(self, graceful: bool = True) -> None:
        """Retire every replica (drain first when `graceful`) and stop supervising."""
        self._closed = True
        self.desired = 0
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self.warm is not None:
            _LIVE.discard(await asyncio.to_thread(self.warm.stop))
        for replica in list(self._replicas):
            self._retire(replica, graceful)
        await asyncio.gather(*list(self._retiring), return_exceptions=True)
        for proc in self._reaping:
            with contextlib.suppress(Exception):
                proc.wait(5)
            _LIVE.discard(proc)
        if self._session is not None:
            await self._session.close()
        if self._own_run_dir and self.run_dir is not None and (self.last_error is None or self._ready_once):
            shutil.rmtree(self.run_dir, ignore_errors=True)  # kept if nothing ever started: errors name its logs

    def saved(self) -> dict:
        """What a gateway taking over from this one needs (`start(adopt=...)`): the desired count, the
        models replicas start with, and each replica's process, port and models."""
        return {
            "desired": self.desired,
            "models": list(self.models),
            "next_id": self._next_id,
            "replicas": [
                {"id": r.id, "pid": r.pid, "identity": r.identity, "port": r.port, "models": list(r.models),
                 "state": r.state}
                for r in self._replicas
            ],
        }  # fmt: skip

    def _adopt(self, saved: dict) -> list[Replica]:
        """Take over the replicas in `saved` that still run as the supervisor's children (their gateway
        died); retire those that were draining. Each is probed before it takes requests."""
        self.desired = int(saved.get("desired", self.desired))
        self.models = tuple(saved.get("models", self.models))
        self._next_id = max(self._next_id, int(saved.get("next_id", 0)))
        self._seq = itertools.count(self._next_id)
        adopted = []
        for entry in saved.get("replicas", []):
            pid, identity = int(entry["pid"]), entry.get("identity")
            if not is_running(pid, identity) or parent_of(pid) != self.supervisor_pid:
                continue
            process = AdoptedProcess(pid, identity)
            if entry.get("state") not in (STARTING, READY) or entry.get("port") is None:
                process.send_signal(signal.SIGTERM)  # was being retired, or never told us its port
                continue
            assert self.run_dir is not None
            replica = Replica(
                entry["id"], tuple(entry["models"]), process, self.run_dir / f"{entry['id']}.port",
                self.run_dir / f"{entry['id']}.log", self.host, time.monotonic(), port=int(entry["port"]),
                identity=identity,
            )  # fmt: skip
            _LIVE.add(process)
            self._replicas.append(replica)
            adopted.append(replica)
            log.warning("replica %s (pid %d) adopted from the previous gateway", replica.id, pid)
        self._wake.set()
        return adopted

    # ------------------------------------------------------------ views

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    @property
    def ready(self) -> list[Replica]:
        return [r for r in self._replicas if r.state == READY]

    @property
    def ready_count(self) -> int:
        return sum(1 for r in self._replicas if r.state == READY)

    @property
    def live_count(self) -> int:
        return sum(1 for r in self._replicas if r.state in (STARTING, READY))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

    def load_integral(self) -> float:
        """Integral over time of (in-flight + waiting requests): its slope is the mean concurrency."""
        self._account()
        return self._area

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "desired": self.desired,
            "ready": self.ready_count,
            "models": list(self.models),
            "in_flight": self._in_flight,
            "waiting": self._waiting,
            "last_error": self.last_error,
            "warm_pid": self.warm.pid if self.warm is not None else None,  # a warm interpreter waiting
            "warm_ready": self.warm is not None and self.warm.ready,  # its imports done
            "warm_starts": self.warm.starts if self.warm is not None else 0,
            "replicas": [r.info() for r in self._replicas],
        }

    # ------------------------------------------------------------ scaling

    def scale_to(self, n: int) -> None:
        """Set the desired replica count; the supervisor starts or gracefully retires replicas."""
        if n < 0:
            raise DistmlError(f"replica count must be >= 0, got {n}")
        self.desired = n
        self._wake.set()

    async def add(self, models: Iterable[str] | None = None, wait: bool = True) -> Replica:
        self.desired += 1
        replica = self._spawn(tuple(models) if models is not None else None)
        if wait:
            await self._wait_replica(replica, self.start_timeout)
        return replica

    async def remove(self, replica: Replica | None = None, graceful: bool = True) -> Replica | None:
        """Retire one replica (the given one, else a starting one, else the least busy); wait for it."""
        candidates = [r for r in self._replicas if r.state in (STARTING, READY)]
        if replica is None:
            if not candidates:
                return None
            replica = min(candidates, key=lambda r: (r.state == READY, r.outstanding))
        self.desired = max(0, self.desired - 1)
        await self._retire(replica, graceful)
        return replica

    async def roll(self, models: Iterable[str], timeout: float | None = None) -> None:
        """Replace every replica by one serving `models`: start the new ones, wait until they are
        all ready, then retire the old ones gracefully. On failure the old ones keep serving."""
        models = tuple(models)
        if not models:
            raise DistmlError("roll needs at least one model reference")
        async with self._roll_lock:
            self._rolling = True
            previous = self.models
            try:
                old = [r for r in self._replicas if r.state in (STARTING, READY)]
                self.models = models
                new = [self._spawn() for _ in range(max(self.desired, 0))]
                results = await asyncio.gather(
                    *(self._wait_replica(r, timeout or self.start_timeout) for r in new), return_exceptions=True
                )
                failed = [res for res in results if isinstance(res, BaseException)]
                if failed:
                    self.models = previous
                    for r in new:
                        self._eject(r, "roll aborted", count=False)
                    raise DistmlError(f"roll to {list(models)} failed, old replicas kept: {failed[0]}")
                await asyncio.gather(*(self._retire(r, True) for r in old if r in self._replicas))
            finally:
                self._rolling = False
                self._wake.set()

    async def load_version(self, ref: str, timeout: float | None = None) -> None:
        """Make every replica serve `ref` ("name:version") beside its models, without new processes.

        `ref` joins `models` first, so a replica started from now on (autoscaling, replacements) loads
        it at start; replicas still starting from before wait until ready; then every ready replica
        loads it in place (`POST /v2/repository/models/{name}/load`, in parallel). On a failure
        (DistmlError naming the replica, with the replica's status when it answered one) `models` is
        as before and the replicas that loaded it unload it again. Holds the roll lock.
        """
        name, version = _split_ref(ref)
        ref = f"{name}:{version}"
        async with self._roll_lock:
            previous = self.models
            if not _serves(self.models, name, version):
                self.models = (*self.models, ref)
            try:
                await self._settle_starting(lambda r: not _serves(r.models, name, version), timeout)
                ready = [r for r in self._replicas if r.state == READY]
                results = await asyncio.gather(
                    *(self._repository_call(r, name, version, "load") for r in ready), return_exceptions=True
                )
                failed = [
                    (r, res)
                    for r, res in zip(ready, results)
                    if isinstance(res, BaseException) and r.state == READY and r.alive()  # a dead one is replaced
                ]
                if failed:
                    raise failed[0][1]
                for replica in ready:
                    if not _serves(replica.models, name, version):
                        replica.models = (*replica.models, ref)
            except BaseException:
                if self.models != previous:
                    self.models = previous
                    done = [r for r in self._replicas if r.state == READY]
                    await asyncio.gather(
                        *(self._repository_call(r, name, version, "unload") for r in done), return_exceptions=True
                    )
                raise
            log.info("%s: every replica serves %s too", self.name, ref)

    async def unload_version(self, ref: str, timeout: float | None = None) -> None:
        """Stop serving `ref` ("name:version") on every replica (each answers its in-flight requests
        for it first) and leave it out of the replicas started later. A replica that does not serve it
        is fine; one that refuses (its last version of the model: 409) raises DistmlError. Route no
        traffic to `ref` before calling this. Holds the roll lock."""
        name, version = _split_ref(ref)
        ref = f"{name}:{version}"
        async with self._roll_lock:
            self.models = tuple(m for m in self.models if m != ref)
            await self._settle_starting(lambda r: _serves(r.models, name, version), timeout)
            ready = [r for r in self._replicas if r.state == READY]
            results = await asyncio.gather(
                *(self._repository_call(r, name, version, "unload", missing_ok=True) for r in ready),
                return_exceptions=True,
            )
            for replica in ready:
                replica.models = tuple(m for m in replica.models if m != ref)
            for replica, res in zip(ready, results):
                if isinstance(res, BaseException) and replica.state == READY and replica.alive():
                    raise res
            log.info("%s: %s unloaded from every replica", self.name, ref)

    async def _settle_starting(self, stale: Callable[[Replica], bool], timeout: float | None) -> None:
        """Wait until no replica that `stale` picks is still starting (ready, or gone)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        while any(r.state == STARTING and stale(r) for r in self._replicas):
            if time.monotonic() > deadline:
                starting = [r.id for r in self._replicas if r.state == STARTING and stale(r)]
                raise DistmlError(f"replica(s) {', '.join(starting)} of {self.name} still starting after {timeout} s")
            await self._wait_change(0.25)

    async def _repository_call(
        self, replica: Replica, name: str, version: int, action: str, missing_ok: bool = False
    ) -> None:
        from urllib.parse import quote

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        url = f"{replica.url}/v2/repository/models/{quote(name, safe='')}/{action}"
        body = to_json(parse_body(RepositoryRequestBody, {"parameters": {"version": version}}, name))
        try:
            async with self._session.post(
                url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.start_timeout)
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ReplicaRefused(
                502, f"replica {replica.id} could not {action} {name}:{version}: {type(exc).__name__}: {exc}"
            ) from None
        if status == 200 or (missing_ok and status == 404):
            return
        try:
            message = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            message = text[:300]
        raise ReplicaRefused(
            status if 400 <= status < 500 else 502,
            f"replica {replica.id} could not {action} {name}:{version} ({status}): {message}",
        )

    async def wait_ready(self, n: int = 1, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        while self.ready_count < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoReplicaAvailable(
                    f"{self.ready_count} of {n} replica(s) of {self.name} ready after "
                    f"{timeout if timeout is not None else self.start_timeout:g} s"
                    + (f"; last failure: {self.last_error}" if self.last_error else "")
                )
            await self._wait_change(min(remaining, 0.25))

    # ------------------------------------------------------------ request routing

    async def acquire(self, exclude: Iterable[str] = (), timeout: float = 60.0) -> Replica:
        """The ready replica with the fewest outstanding requests (ties round-robin), not in
        `exclude` unless nothing else is ready for `retry_grace` s; waits (cold start) up to `timeout`."""
        exclude = set(exclude)
        start = time.monotonic()
        deadline = start + timeout
        self._account()
        self._waiting += 1
        try:
            while True:
                ready = [r for r in self._replicas if r.state == READY]
                candidates = [r for r in ready if r.id not in exclude]
                if not candidates and ready and time.monotonic() - start >= self.retry_grace:
                    candidates = ready
                if candidates:
                    least = min(r.outstanding for r in candidates)
                    start = self._rr % len(candidates)  # ties: the first after the last pick
                    at = next(
                        i % len(candidates)
                        for i in range(start, start + len(candidates))
                        if candidates[i % len(candidates)].outstanding == least
                    )
                    replica = candidates[at]
                    self._rr = at + 1
                    self._account()
                    replica.outstanding += 1
                    self._in_flight += 1
                    return replica
                if self.live_count == 0 and self.on_demand is not None:
                    self.on_demand()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = f"desired {self.desired}, starting {self.live_count - self.ready_count}" + (
                        f"; last failure: {self.last_error}" if self.last_error else ""
                    )
                    raise NoReplicaAvailable(
                        f"no replica of {self.name} was ready within {timeout:.3g} s ({state})", state
                    )
                await self._wait_change(min(remaining, self.retry_grace / 2 if ready else 0.25))
        finally:
            self._account()
            self._waiting -= 1

    def release(self, replica: Replica, ok: bool = True) -> None:
        self._account()
        replica.outstanding -= 1
        self._in_flight -= 1
        if ok:
            replica.served += 1

    def report_failure(self, replica: Replica) -> None:
        """A request to `replica` failed at the connection level: check it now, not at the next tick."""
        if replica.state in (STARTING, READY) and not replica.alive():
            self._eject(replica, f"exited with status {replica.process.returncode}")
        else:
            self._health_due = True
            self._wake.set()

    # ------------------------------------------------------------ internals

    def _account(self) -> None:
        now = time.monotonic()
        self._area += (self._in_flight + self._waiting) * (now - self._area_t)
        self._area_t = now

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        event = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _spawn(self, models: tuple[str, ...] | None = None) -> Replica:
        models = models or self.models
        seq = next(self._seq)
        self._next_id = seq + 1
        rid = f"{self.name}-{seq}"
        assert self.run_dir is not None, "ReplicaSet.start() first"
        port_file = self.run_dir / f"{rid}.port"
        log_path = self.run_dir / f"{rid}.log"
        config_path = self.run_dir / f"{rid}.json"
        port_file.unlink(missing_ok=True)  # an earlier run's port must never be read as this replica's
        config = self.template.model_copy(update={"models": list(models), "port": 0, "port_file": str(port_file)})
        with atomic_write(config_path, "w") as handle:
            handle.write(config.model_dump_json(indent=1))
        proc = self.warm.take(config_path, log_path) if self.warm is not None else None
        warm = proc is not None
        if proc is None:
            proc = self._popen([*self.command, str(config_path)], log_path)
        replica = Replica(rid, tuple(models), proc, port_file, log_path, self.host, time.monotonic(), warm=warm)
        replica.identity = process_identity(proc.pid)
        self._replicas.append(replica)
        how = "from the warm interpreter" if warm else "cold"
        log.info("replica %s starting %s (pid %d, models %s)", rid, how, proc.pid, list(models))
        self._wake.set()
        return replica

    def _popen(
        self, cmd: list[str], log_path: Path, stdin: int = subprocess.DEVNULL, pass_fds: Sequence[int] = ()
    ) -> subprocess.Popen:
        """Start `cmd` as a replica process (or a warm interpreter that becomes one) logging to `log_path`."""
        env = {**os.environ, **(self.env or {})}
        env.pop(TOKEN_ENV, None)
        if self.token:
            env[TOKEN_ENV] = self.token  # never on disk or in argv
        if self.supervisor_pid is not None:
            env[SUPERVISOR_ENV] = str(self.supervisor_pid)  # it stops itself once the whole service is gone
        with open(log_path, "ab") as log_file:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=stdin,
                    pass_fds=pass_fds,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=None if self.supervisor_pid is not None else _die_with_parent(os.getpid()),
                )
            except OSError as exc:
                raise DistmlError(f"cannot start replica process {cmd}: {exc}") from exc
        _LIVE.add(proc)
        return proc

    async def _wait_replica(self, replica: Replica, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while replica.state != READY:
            if replica.state == STOPPED or replica not in self._replicas:
                raise DistmlError(f"replica {replica.id} failed to start: {replica.error}")
            if time.monotonic() > deadline:
                raise DistmlError(f"replica {replica.id} not ready within {timeout:g} s{_log_tail(replica.log_path)}")
            await self._wait_change(0.25)

    def _eject(self, replica: Replica, reason: str, count: bool = True) -> None:
        if replica in self._replicas:
            self._replicas.remove(replica)
        was_starting = replica.state == STARTING
        replica.state = STOPPED
        replica.error = reason + (_log_tail(replica.log_path) if count else "")
        if replica.alive():
            with contextlib.suppress(OSError):
                replica.process.kill()
        self._reaping.append(replica.process)
        if count:
            self.ejections += 1
            self.last_error = f"replica {replica.id} (pid {replica.pid}) {replica.error}"
            log.warning("ejected %s", self.last_error)
            if was_starting:
                self._start_failures += 1
                self._next_spawn_at = time.monotonic() + min(0.25 * 2 ** (self._start_failures - 1), 10.0)
            if self.on_eject is not None:
                self.on_eject(replica, reason)
        self._notify()
        self._wake.set()

    def _retire(self, replica: Replica, graceful: bool) -> asyncio.Task:
        """Start retiring `replica` (once); the returned task ends when its process has exited."""
        task = self._retire_tasks.get(replica.id)
        if task is None:
            task = asyncio.create_task(self._drain_and_stop(replica, graceful), name=f"retire-{replica.id}")
            self._retire_tasks[replica.id] = task
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return task

    async def _drain_and_stop(self, replica: Replica, graceful: bool) -> None:
        if replica.state == STOPPED:
            return
        replica.state = DRAINING
        self._notify()
        try:
            deadline = time.monotonic() + self.drain_timeout
            if graceful:
                while replica.outstanding > 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                if replica.alive():
                    with contextlib.suppress(OSError):
                        replica.process.send_signal(signal.SIGTERM)
                while replica.alive() and time.monotonic() < deadline + self.drain_timeout:
                    await asyncio.sleep(0.05)
            if replica.alive():
                with contextlib.suppress(OSError):
                    replica.process.kill()
                while replica.alive():
                    await asyncio.sleep(0.02)
            log.info("replica %s retired (exit %s)", replica.id, replica.process.returncode)
        finally:
            _LIVE.discard(replica.process)
            replica.state = STOPPED
            if replica in self._replicas:
                self._replicas.remove(replica)
            self._retire_tasks.pop(replica.id, None)
            self._notify()

    async def _probe(self, replica: Replica, timeout: float) -> bool:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            async with self._session.get(
                f"{replica.url}/v2/health/ready", headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _check_starting(self) -> None:
        now = time.monotonic()
        for replica in [r for r in self._replicas if r.state == STARTING]:
            if replica.port is None and replica.port_file.exists():
                with contextlib.suppress(ValueError, OSError):
                    replica.port = int(replica.port_file.read_text().strip())
            if replica.port is not None and await self._probe(replica, min(self.health_timeout, 1.0)):
                if replica.state != STARTING:
                    continue
                replica.state = READY
                replica.ready_at = time.monotonic()
                self._start_failures = 0
                self._ready_once = True
                log.info(
                    "replica %s ready on port %d after %.2f s",
                    replica.id,
                    replica.port,
                    replica.ready_at - replica.started_at,
                )
                self._notify()
            elif now - replica.started_at > self.start_timeout:
                self._eject(replica, f"was not ready within {self.start_timeout:g} s")

    async def _check_ready(self) -> None:
        ready = [r for r in self._replicas if r.state == READY]
        results = await asyncio.gather(*(self._probe(r, self.health_timeout) for r in ready))
        for replica, ok in zip(ready, results):
            if replica.state != READY:
                continue
            if ok:
                replica.failures = 0
                continue
            replica.failures += 1
            if not replica.alive():
                self._eject(replica, f"exited with status {replica.process.returncode}")
            elif replica.failures >= self.max_health_failures:
                self._eject(replica, f"failed {replica.failures} health checks in a row")

    def _check_processes(self) -> None:
        for replica in list(self._replicas):
            if replica.state in (STARTING, READY) and not replica.alive():
                self._eject(replica, f"exited with status {replica.process.returncode}")
        for proc in list(self._reaping):
            if proc.poll() is not None:
                self._reaping.remove(proc)
                _LIVE.discard(proc)

    def _reconcile(self) -> None:
        live = [r for r in self._replicas if r.state in (STARTING, READY)]
        if len(live) < self.desired:
            if time.monotonic() < self._next_spawn_at:
                return
            for _ in range(self.desired - len(live)):
                try:
                    self._spawn()
                except DistmlError as exc:
                    self.last_error = str(exc)
                    self._start_failures += 1
                    self._next_spawn_at = time.monotonic() + min(0.25 * 2**self._start_failures, 10.0)
                    return
        elif len(live) > self.desired:
            extra = sorted(live, key=lambda r: (r.state == READY, r.outstanding, -r.started_at))
            for replica in extra[: len(live) - self.desired]:
                self._retire(replica, True)

    def _warm_due(self) -> bool:
        now = time.monotonic()
        return not any(
            r.state == STARTING or (r.ready_at is not None and now - r.ready_at < WARM_AFTER_READY_S)
            for r in self._replicas
        )

    async def _supervise(self) -> None:
        last_health = time.monotonic()
        while not self._closed:
            try:
                self._check_processes()
                await self._check_starting()
                now = time.monotonic()
                if self._health_due or now - last_health >= self.health_interval:
                    self._health_due = False
                    last_health = now
                    await self._check_ready()
                if not self._rolling and not self._closed:
                    self._reconcile()
                if self.warm is not None and not self._closed and self._warm_due():
                    self.warm.refill(self.run_dir)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replica supervisor of %s", self.name)
            starting = any(r.state == STARTING for r in self._replicas)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.05 if starting else self.health_interval / 2)
            self._wake.clear()
