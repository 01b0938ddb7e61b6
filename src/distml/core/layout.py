"""Where things live in a workspace, and the record of a running service.

`WorkspaceRef(root, db_url)` names a workspace in every process's config file and knows its
folders (`run_dir`, `workflow_dir`, `service_dir`, caches) so that no path is rebuilt by hand;
`ServiceRecord` is the one reader and writer of `services/NAME/service.json`, which tells
`distml top`, the pipelines and `distml serve` which gateway serves a service now.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from distml.core.files import atomic_write
from distml.core.liveness import is_running, process_identity

PathLike = str | os.PathLike

DEFAULT_ROOT = ".distml"
DB_FILE = "distml.db"


class WorkspaceRef(BaseModel):
    """A workspace by value: its folder and its metadata store's URL (None: the SQLite file
    `distml.db` in the folder). It crosses every process boundary inside the process's config
    file, so a store chosen in Python reaches the training ranks, step processes and replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: str = DEFAULT_ROOT
    db_url: str | None = None

    @classmethod
    def of(cls, root: PathLike, db_url: str | None = None) -> WorkspaceRef:
        """An absolute reference (a process started elsewhere finds the same folder) whose URL is
        always spelt out (a process started for it opens the same store)."""
        root = Path(root).resolve()
        return cls(root=str(root), db_url=db_url or f"sqlite:///{root / DB_FILE}")

    @property
    def url(self) -> str:
        """The metadata store's URL."""
        return self.db_url or f"sqlite:///{Path(self.root).resolve() / DB_FILE}"

    @property
    def path(self) -> Path:
        return Path(self.root)

    def run_dir(self, run_id: str) -> Path:
        return run_dir(self.root, run_id)

    def workflow_dir(self, run_id: str) -> Path:
        return workflow_dir(self.root, run_id)

    def service_dir(self, name: str) -> Path:
        return service_dir(self.root, name)

    @property
    def cache_dir(self) -> Path:
        """Cached, preprocessed data sets (`data/cache.py`)."""
        return Path(self.root) / "cache"

    @property
    def datasets_dir(self) -> Path:
        """Downloaded data sets."""
        return Path(self.root) / "datasets"

    @property
    def artifacts_dir(self) -> Path:
        """The content-addressed artifact store."""
        return Path(self.root) / "artifacts"


def run_dir(root: PathLike, run_id: str) -> Path:
    """A training run's folder: its config, checkpoints, metrics endpoints and result."""
    return Path(root) / "runs" / run_id


def workflow_dir(root: PathLike, run_id: str) -> Path:
    """A workflow run's folder: its step logs and metrics endpoint."""
    return Path(root) / "workflows" / run_id


def services_dir(root: PathLike) -> Path:
    """The folder of every service's folder."""
    return Path(root) / "services"


def service_dir(root: PathLike, name: str) -> Path:
    """A service's folder: its config, gateway log and port, and its `service.json`."""
    return services_dir(root) / name


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
