"""A named service in the workspace that outlives the command that started it.

`distml serve` runs a gateway in the foreground; a pipeline instead needs its model served
after it exits. `ensure_serving` starts the same gateway under a supervisor that restarts it if it
dies (`python -m distml.serve.supervisor`), detached in its own session, remembers it in
`WORKSPACE/services/NAME/service.json` (pid, url, model), and on later calls leaves it alone when
it already serves the model, or hot-swaps the model through the gateway's admin API (rolling
replicas: no request fails).

`list_services`, `find_service` and `service_logs` are what `distml services` shows: every
service of the workspace with its process state and, from its live gateway, the versions,
traffic split and replicas it serves; and the gateway's or a replica's log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from distml.core.errors import DistmlError
from distml.core.files import atomic_write
from distml.core.layout import ServiceRecord, services_dir
from distml.core.liveness import pid_alive, process_identity
from distml.serve.admin import GatewayAdmin
from distml.serve.config import STATE_FILE, TOKEN_ENV, ServeConfig, parse_serve_config
from distml.workspace import Workspace

START_TIMEOUT_S = 180.0
STATUS_TIMEOUT_S = 2.0  # `distml services` asks each live gateway; one that hangs is shown as such
RUNNING, GONE = "running", "gone"


def build_serve_config(ws: Workspace, model: str, options: dict[str, Any]) -> tuple[ServeConfig, str]:
    """The ServeConfig for serving `model` with the CLI's option names; returns it and the pinned ref."""
    from distml.models.artifact import resolve_model
    from distml.serve.model import ServedModel

    record = resolve_model(ws, model)  # fails here, before any process starts, on an unknown model
    if record.version is None:
        raise DistmlError(f"{model!r} names a manifest that is not registered; serve a registered name:version")
    pinned = f"{record.name}:{record.version}"  # replicas started later must load the same version
    ServedModel(record.name, record.version, record.manifest)  # refuses a manifest without its preprocessing
    given = {key: value for key, value in options.items() if value is not None}
    replica: dict[str, Any] = {"workspace": ws.ref, "models": [pinned]}
    for key in ("max_batch_size", "max_batch_delay_ms", "queue"):
        if key in given:
            replica[key] = given.pop(key)
    if "replica_cpus" in given:
        replica["cpus"] = given.pop("replica_cpus")
    if "queue" in replica:
        from distml.scheduling.admission import check_queue

        check_queue(ws.engine, replica["queue"])
    autoscale = given.pop("autoscale", None)
    policy = {
        key: given.pop(key)
        for key in ("target_concurrency", "stable_window", "panic_window", "scale_to_zero_after")
        if key in given
    }
    if autoscale is not None:
        low, sep, high = autoscale.partition(":")
        if not sep or not low.isdigit() or not high.isdigit():
            raise DistmlError(f"--autoscale expects MIN:MAX replica counts such as 0:4, got {autoscale!r}")
        policy.update(min_replicas=int(low), max_replicas=int(high))
    elif policy:
        raise DistmlError(f"--{next(iter(policy)).replace('_', '-')} applies to autoscaling; add --autoscale MIN:MAX")
    values = {"name": f"{record.name[:80]}-{os.getpid()}", **given, "replica": replica}
    if autoscale is not None:
        values["autoscale"] = policy
    return parse_serve_config(values), pinned


def service_record(ws: Workspace, name: str) -> ServiceRecord | None:
    """The running service `name`, or None when its gateway is gone or does not answer."""
    record = ServiceRecord.read(ws.root, name)
    if record is None:
        return None
    try:
        httpx.get(record.url + "/v2/health/live", timeout=5).raise_for_status()
    except httpx.HTTPError:
        return None
    return record


def _still_starting(ws: Workspace, name: str) -> ServiceRecord | None:
    """A service whose supervisor runs but whose gateway does not answer yet (the step that started
    it was stopped before it was ready, and this is its retry): wait until it answers, then it is
    the running service; if it never does, stop it so that a new one can take its address."""
    record = ServiceRecord.read(ws.root, name)
    if record is None:
        return None
    deadline = time.monotonic() + START_TIMEOUT_S
    while record.alive() and time.monotonic() < deadline:
        if service_record(ws, name) is not None:
            return record
        time.sleep(0.1)
    stop_service(ws, name)
    return None


def ensure_serving(ws: Workspace, name: str, model: str, options: dict[str, Any]) -> dict[str, Any]:
    """Serve `model` as service `name`: a no-op if it already does, a hot swap if it serves
    another model, a detached start otherwise. Returns {url, model, pid, action}."""
    config, pinned = build_serve_config(ws, model, {**options, "name": name})
    token = config.token_value() or os.environ.get(TOKEN_ENV) or None  # a step's: from its environment
    running = service_record(ws, name) or _still_starting(ws, name)
    if running is not None:
        if running.model == pinned:
            return {**asdict(running), "action": "unchanged"}
        with GatewayAdmin(running.url, token) as admin:
            admin.swap(pinned)
        record = running.serving(pinned)
        record.write(ws.root)
        return {**asdict(record), "action": f"swapped from {running.model}"}
    folder = config.service_dir()
    folder.mkdir(parents=True, exist_ok=True)
    port_file = folder / "gateway.port"
    port_file.unlink(missing_ok=True)
    (folder / STATE_FILE).unlink(missing_ok=True)  # a service killed outright: nothing to take over
    config = config.model_copy(update={"port_file": str(port_file)})
    config_path = folder / "config.json"
    with atomic_write(config_path, "w") as handle:
        handle.write(config.model_dump_json(indent=1))
    env = dict(os.environ)
    if token:
        env["DISTML_SERVE_TOKEN"] = token
    with open(folder / "gateway.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "distml.serve.supervisor", str(config_path)],  # restarts a killed gateway
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the step and the pipeline; stopped by stop_service
            env=env,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not port_file.exists():
            if process.poll() is not None:
                tail = (folder / "gateway.log").read_text(errors="replace")[-1500:]
                raise DistmlError(f"the gateway for {pinned} exited with code {process.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise DistmlError(f"the gateway for {pinned} was not ready after {START_TIMEOUT_S:g} s")
            time.sleep(0.1)
    except BaseException:  # not ready, timed out, or this step was stopped: leave no untracked gateway
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        raise
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"http://{host}:{int(port_file.read_text().strip())}"
    record = ServiceRecord(name, url, pinned, process.pid, process_identity(process.pid))
    record.write(ws.root)
    return {**asdict(record), "action": "started"}


def stop_service(ws: Workspace, name: str, timeout: float = 60.0) -> bool:
    """Stop service `name` (SIGTERM: the gateway drains and stops its replicas); False if not running."""
    record = ServiceRecord.read(ws.root, name, alive=False)
    if record is None:
        return False
    pid = record.pid
    # The same process, not a later one that reused its pid (a stale record after a reboot).
    if not record.alive():
        record.forget(ws.root)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    record.forget(ws.root)
    return True


@dataclass(frozen=True)
class ServiceStatus:
    """A service as `distml services` shows it: its record (name, URL, the model it was started or
    swapped to, its gateway's pid), its process `state` (`running`, or `gone` when the gateway's
    process died) and, asked from the live gateway, the model references its replicas load, the
    traffic split per model ({model: {version: percent}}) and its replicas, ready and desired
    (None when the gateway is gone or did not answer: `error` says why)."""

    name: str
    url: str
    model: str
    pid: int
    state: str
    models: list[str] = field(default_factory=list)
    traffic: dict[str, dict[str, float]] = field(default_factory=dict)
    ready: int | None = None
    desired: int | None = None
    error: str | None = None

    @property
    def versions_label(self) -> str:
        """What it serves, for a table: "cnn:1, cnn:2 (cnn v1 70%, v2 30%)"; its recorded model
        when the gateway is gone, the error when it did not answer."""
        if self.state == GONE:
            return f"{self.model} (when it ran)"
        if self.error is not None:
            return f"{self.model} ({self.error})"
        split = "; ".join(
            f"{model} " + ", ".join(f"v{version} {weight:g}%" for version, weight in versions.items())
            for model, versions in self.traffic.items()
        )
        return ", ".join(self.models) + (f" ({split})" if split else "")

    @property
    def replicas_label(self) -> str:
        """`ready/desired`, or `-` when unknown."""
        return f"{self.ready}/{self.desired}" if self.ready is not None else "-"


def list_services(ws: Workspace, token: str | None = None, timeout: float = STATUS_TIMEOUT_S) -> list[ServiceStatus]:
    """Every service recorded in the workspace, by name, whether its gateway runs or not."""
    return [service_status(record, token, timeout) for record in ServiceRecord.all(ws.root, alive=False)]


def service_status(record: ServiceRecord, token: str | None = None, timeout: float = STATUS_TIMEOUT_S) -> ServiceStatus:
    """The state of `record`'s service: `gone` without asking anything when its process died, else
    what its gateway answers on /admin/replicas within `timeout` seconds."""
    if not record.alive():
        return ServiceStatus(record.name, record.url, record.model, record.pid, GONE)
    status = ServiceStatus(record.name, record.url, record.model, record.pid, RUNNING)
    try:
        with GatewayAdmin(record.url, token, timeout=timeout) as admin:
            snapshot = admin.snapshot()
        groups = snapshot["groups"]
        models: list[str] = []
        for group in groups:
            for replica in group["replicas"] or [{"models": group["models"]}]:
                models.extend(ref for ref in replica["models"] if ref not in models)
        traffic = {str(m): {str(v): float(w) for v, w in split.items()} for m, split in snapshot["traffic"].items()}
        ready, desired = sum(int(g["ready"]) for g in groups), sum(int(g["desired"]) for g in groups)
    except DistmlError as exc:
        return replace(status, error=str(exc))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # not a distml gateway's answer
        return replace(status, error=f"unexpected answer from {record.url}/admin/replicas: {exc!r}")
    return replace(status, models=models, traffic={m: s for m, s in traffic.items() if s}, ready=ready, desired=desired)


def _service_folders(ws: Workspace) -> list[str]:
    """The names of the service folders (a stopped service's folder stays, with its logs)."""
    root = services_dir(ws.root)
    return sorted(path.name for path in root.iterdir() if path.is_dir()) if root.is_dir() else []


def find_service(ws: Workspace, name: str) -> ServiceRecord:
    """Service `name`'s record, running or gone; one DistmlError naming the services there are."""
    records = {record.name: record for record in ServiceRecord.all(ws.root, alive=False)}
    if name in records:
        return records[name]
    known = f"services: {', '.join(records)}" if records else "there are no services"
    stopped = f" (it is stopped; its logs remain: distml services logs {name})" if name in _service_folders(ws) else ""
    raise DistmlError(f"no service {name!r} in {ws.root}{stopped}; {known}")


def service_logs(ws: Workspace, name: str, replica: str | None = None) -> Path:
    """The log file of service `name`'s gateway, or of its replica `replica`: a number N (replica
    N of the first shard group, `g0-N`) or a replica id such as `g1-0`. The logs of a stopped
    service remain until its folder is removed. One DistmlError, naming what exists, otherwise."""
    folders = _service_folders(ws)
    if name not in folders:
        known = f"services: {', '.join(folders)}" if folders else "there are no services"
        raise DistmlError(f"no service {name!r} in {ws.root}; {known}")
    folder = ws.ref.service_dir(name)
    replicas = sorted((p.stem for p in folder.glob("g*/g*-*.log")), key=_replica_order)
    path: Path | None = folder / "gateway.log"
    what = "gateway log"
    if replica is not None:
        rid = f"g0-{replica}" if replica.isdigit() else replica
        what = f"log of replica {rid}"
        path = folder / rid.partition("-")[0] / f"{rid}.log" if re.fullmatch(r"g\d+-\d+", rid) else None
    if path is not None and path.is_file():
        return path
    there = ["the gateway's (no --replica)"] if (folder / "gateway.log").is_file() else []
    there += [f"--replica {r.removeprefix('g0-')}" for r in replicas]
    foreground = (
        " (a service run by `distml serve` in the foreground logs its gateway to that terminal)"
        if replica is None
        else ""
    )
    logs = f"its logs: {', '.join(there)}" if there else "it has no logs"
    raise DistmlError(f"no {what} for service {name!r} in {folder}{foreground}; {logs}")


def _replica_order(rid: str) -> tuple[str, int]:
    group, _, number = rid.partition("-")
    return group, int(number) if number.isdigit() else -1
