"""Where things live in a workspace folder, and the record of a running service.

One function per folder (`run_dir`, `workflow_dir`, `service_dir`) instead of paths rebuilt by
hand, and `ServiceRecord`: the one reader and writer of `services/NAME/service.json`, which
tells `distml top`, the pipelines and `distml serve` which gateway serves a service now.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from distml.core.files import atomic_write
from distml.core.liveness import is_running, process_identity

PathLike = str | os.PathLike


def run_dir(root: PathLike, run_id: str) -> Path:
    """A training run's folder: its config, checkpoints, metrics endpoints and result."""
    return Path(root) / "runs" / run_id


def workflow_dir(root: PathLike, run_id: str) -> Path:
    """A workflow run's folder: its step logs and metrics endpoint."""
    return Path(root) / "workflows" / run_id


def service_dir(root: PathLike, name: str) -> Path:
    """A service's folder: its config, gateway log and port, and its `service.json`."""
    return Path(root) / "services" / name


@dataclass(frozen=True)
class ServiceRecord:
    """The gateway that serves service `name` now: its process (pid and start time, so that a
    later process that reuses the pid is not taken for it), its URL and the model it serves."""

    name: str
    url: str
    model: str
    pid: int
    started: str | None = None

    @classmethod
    def for_this_process(cls, name: str, url: str, model: str) -> ServiceRecord:
        pid = os.getpid()
        return cls(name, url.replace("://0.0.0.0:", "://127.0.0.1:"), model, pid, process_identity(pid))

    def serving(self, model: str) -> ServiceRecord:
        return replace(self, model=model)

    def alive(self) -> bool:
        """Its gateway still runs: the same pid with the same start time."""
        return is_running(self.pid, self.started)

    def write(self, root: PathLike) -> None:
        with atomic_write(service_dir(root, self.name) / "service.json", "w") as handle:
            json.dump(asdict(self), handle)

    @classmethod
    def read(cls, root: PathLike, name: str, alive: bool = True) -> ServiceRecord | None:
        """Service `name`'s record; None when there is none, it is unreadable, or (with `alive`)
        its gateway no longer runs."""
        return _read(service_dir(root, name) / "service.json", alive)

    @classmethod
    def all(cls, root: PathLike, alive: bool = True) -> list[ServiceRecord]:
        """Every service's record, by name (with `alive`, only those whose gateway runs)."""
        paths = sorted(Path(root).glob("services/*/service.json"))
        return [record for record in (_read(path, alive) for path in paths) if record is not None]

    def forget(self, root: PathLike) -> bool:
        """Remove the record if it is still this one's (not a later gateway's); True if removed."""
        path = service_dir(root, self.name) / "service.json"
        current = _read(path, alive=False)
        if current is None or (current.pid, current.started) != (self.pid, self.started):
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True


def _read(path: Path, alive: bool) -> ServiceRecord | None:
    try:
        data = json.loads(path.read_text())
        record = ServiceRecord(
            name=str(data.get("name") or path.parent.name),
            url=str(data["url"]),
            model=str(data["model"]),
            pid=int(data["pid"]),
            started=data.get("started"),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if alive and not record.alive():
        return None
    return record
