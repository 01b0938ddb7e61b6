"""Admission of gangs onto a pool of resources: every task of a job starts together, or none does.

The one small interface every job runner uses: `try_acquire(job, request)` returns a `Lease`
for the whole gang or None, `release(lease)` gives it back. `LocalPool` admits against this
machine's cpu slots and gpus inside one process (the workflow orchestrator); the scheduler of
the operations layer implements the same two calls across processes.
"""

from __future__ import annotations

import glob
import itertools
import os
from dataclasses import dataclass, field

from distml.errors import DistmlError


@dataclass(frozen=True)
class Resources:
    """What one job asks for: `workers` tasks (its gang), each needing `cpus` slots and `gpus`."""

    cpus: float = 1.0
    gpus: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if not (self.cpus >= 0 and self.gpus >= 0 and self.workers >= 1):
            raise DistmlError(f"resources need cpus >= 0, gpus >= 0 and workers >= 1, got {self}")

    @property
    def total_cpus(self) -> float:
        return self.cpus * self.workers

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.workers

    def describe(self) -> str:
        each = f"{self.cpus:g} cpu" + (f" + {self.gpus} gpu" if self.gpus else "")
        return each if self.workers == 1 else f"gang of {self.workers} x {each}"


@dataclass(frozen=True)
class Lease:
    id: int
    job: str
    resources: Resources


def count_gpus() -> int:
    """NVIDIA devices visible to this machine (without importing torch), honouring CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


@dataclass
class LocalPool:
    """Cpu slots and gpus of one machine, handed out gang by gang (all or nothing)."""

    cpus: float = field(default_factory=lambda: float(os.cpu_count() or 1))
    gpus: int = field(default_factory=lambda: count_gpus())
    _used_cpus: float = 0.0
    _used_gpus: int = 0
    _leases: dict[int, Lease] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def check(self, job: str, request: Resources) -> None:
        """Refuse a request that could never fit this pool, instead of letting it wait forever."""
        if request.total_cpus > self.cpus or request.total_gpus > self.gpus:
            raise DistmlError(
                f"{job} asks for {request.describe()} ({request.total_cpus:g} cpu slots, {request.total_gpus} gpus) "
                f"but the pool has {self.cpus:g} cpu slots and {self.gpus} gpus; lower its resources or "
                "give the pool more slots (distml run --cpus N)"
            )

    def try_acquire(self, job: str, request: Resources) -> Lease | None:
        self.check(job, request)
        if self._used_cpus + request.total_cpus > self.cpus + 1e-9 or self._used_gpus + request.total_gpus > self.gpus:
            return None
        self._used_cpus += request.total_cpus
        self._used_gpus += request.total_gpus
        lease = Lease(next(self._ids), job, request)
        self._leases[lease.id] = lease
        return lease

    def release(self, lease: Lease) -> None:
        if self._leases.pop(lease.id, None) is None:
            return  # released twice: nothing more to give back
        self._used_cpus -= lease.resources.total_cpus
        self._used_gpus -= lease.resources.total_gpus

    @property
    def free_cpus(self) -> float:
        return self.cpus - self._used_cpus
