"""Admission of gangs onto a pool of resources: every task of a job starts together, or none does.

The one small interface every job runner uses: `try_acquire(job, request)` returns a `Lease`
for the whole gang or None, `release(lease)` gives it back. `LocalPool` caps one process's jobs
(a workflow run's `--cpus`); `SharedPool` admits across every process of a workspace through the
metadata store, with `distml.scheduling.core` deciding, and `acquire` is its blocking form with
a heartbeat that notices preemption. A holder that dies frees its resources: on its own host by
its pid and the pid's start time, elsewhere when its lease expires.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from distml.core.db import StoreUnavailable, in_transaction
from distml.core.errors import DistmlError
from distml.core.liveness import process_identity
from distml.scheduling import metrics
from distml.scheduling import store as md
from distml.scheduling.core import Job, Node, Policy, Resources, Scheduler, parse_priority, priority_name

__all__ = ["Lease", "LocalPool", "Resources", "SharedPool", "count_gpus", "schedule_pass"]

log = logging.getLogger(__name__)

#: Environment variable naming the scheduler job a process runs inside: a `distml train` started
#: by a workflow step runs in the step's gang instead of asking for a second one.
JOB_ENV = "DISTML_SCHED_JOB"
LEASE_SECONDS = 20.0  # a holder on another host that stops renewing this long loses its resources
HEARTBEAT_SECONDS = 1.0
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Lease:
    id: int | str
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


# -- the workspace's pool, shared by every process -------------------------------------------


def machine_node() -> Node:
    """This machine as a pool node: its cores as cpu slots, its gpus, its memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = 0.0
    return Node(socket.gethostname(), cpus=float(os.cpu_count() or 1), gpus=count_gpus(), memory_gb=round(memory, 1))


def ensure_node(engine: sa.Engine, node: Node | None = None) -> Node:
    """This host's node row: created from the machine on first use, then as the store says."""
    node = node or machine_node()
    row = md.get_node(engine, node.name)
    if row is None:
        if md.add_node(engine, node.name, node.cpus, node.gpus, node.memory_gb):
            return node
        row = md.get_node(engine, node.name)  # another process registered this host first: use its row
        assert row is not None
    return Node(row.name, cpus=row.cpus, gpus=row.gpus, memory_gb=row.memory_gb)


def set_node(
    engine: sa.Engine, *, cpus: float | None = None, gpus: int | None = None, memory_gb: float | None = None
) -> Node:
    """Change what this host offers the pool (`distml queue pool --cpus N`)."""
    node = ensure_node(engine)
    values = {k: v for k, v in {"cpus": cpus, "gpus": gpus, "memory_gb": memory_gb}.items() if v is not None}
    if any(v < 0 for v in values.values()) or values.get("cpus", 1) <= 0:
        raise DistmlError(f"a pool needs cpus > 0, gpus >= 0 and memory_gb >= 0, got {values}")
    md.update_node(engine, node.name, **values)
    return ensure_node(engine)


def set_queue(engine: sa.Engine, name: str, weight: float) -> None:
    """Create a queue or change its weight (its nominal share is weight / sum of weights)."""
    if not name or len(name) > 100 or not name.replace("-", "").replace("_", "").isalnum():
        raise DistmlError(f"a queue name is letters, digits, '-' and '_' (at most 100), got {name!r}")
    if not weight > 0:
        raise DistmlError(f"queue {name!r} needs a weight > 0, got {weight}")
    md.set_queue_weight(engine, name, weight)


def check_queue(engine: sa.Engine, queue: str) -> None:
    """Refuse a queue that does not exist, naming those that do."""
    with engine.connect() as conn:
        queues = md.queue_weights(conn)
    if queue not in queues:
        raise DistmlError(
            f"unknown queue {queue!r}; queues: {', '.join(sorted(queues))} "
            f"(create one with: distml queue set {queue} --weight W)"
        )


LIVENESS_TTL_S = 1.0  # a holder seen alive is not looked up again for this long


class Liveness:
    """Has a job's holder died? On this host by pid and start time (read from /proc, remembered
    for `LIVENESS_TTL_S` once seen alive, so a pass over many jobs of a few processes stays
    cheap); on another host, by its lease."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str | None], float] = {}

    def gone(self, row: Any, host: str, now: float) -> bool:
        if row.node != host:
            return row.lease_expires < now
        key = (row.pid, row.pid_started)
        clock = time.monotonic()
        if self._seen.get(key, -1.0) > clock:
            return False
        if process_identity(row.pid) != row.pid_started:
            self._seen.pop(key, None)
            return True
        self._seen[key] = clock + LIVENESS_TTL_S
        return False


def schedule_pass(
    engine: sa.Engine,
    now: float | None = None,
    policy: Policy | None = None,
    *,
    node: Node | None = None,
    first: Callable[[sa.Connection, float], None] | None = None,
    liveness: Liveness | None = None,
) -> dict[str, str]:
    """One scheduling decision for this host's node, in one transaction: reclaim the resources of
    dead holders, admit what may start, mark victims for preemption, record why the others wait.
    `first(conn, now)` runs inside the transaction before the decision (a submission or a release, so
    it costs no transaction of its own). Returns {job id: state after the pass} for every job
    the pass looked at: waiting, running, preempting, or lost/failed for those it ended."""
    node = node or ensure_node(engine)
    liveness = liveness or Liveness()
    started, given = time.perf_counter(), now
    changed: dict[str, str] = {}  # what this pass did: running, preempting, lost, failed
    states: dict[str, str] = {}

    def decide(conn: sa.Connection) -> None:  # run again from the start if the store went away meanwhile
        nonlocal now, changed, states
        changed, states = {}, {}
        md.begin_pass(conn)
        now = time.time() if given is None else given  # read under the lock: passes' times never go back
        if first is not None:
            first(conn, now)
        rows = md.pass_rows(conn, node.name, (policy or Policy()).lookahead + 1)
        # Jobs further back in their queue cannot start in this pass: only their ids are read.
        loaded = {row.id for row in rows}
        for job_id in md.waiting_ids(conn, node.name):
            if job_id not in loaded:
                states[job_id] = "waiting"
        scheduler = Scheduler([node], md.queue_weights(conn), policy)
        alive = []
        for row in rows:
            if liveness.gone(row, node.name, now):
                md.end_job(conn, row.id, "lost", now, "its process died; resources reclaimed")
                changed[row.id] = "lost"
                continue
            alive.append(row)
        jobs = {}
        for row in alive:
            job = Job(
                row.id,
                Resources(cpus=row.cpus, gpus=row.gpus, workers=row.tasks, memory_gb=row.memory_gb),
                queue=row.queue,
                priority=row.priority,
                submitted=row.submitted_at,
                estimate=row.estimate_s,
                preemptible=row.preemptible,
            )
            jobs[row.id] = (job, row)
            if row.state in ("running", "preempting"):
                scheduler.restore(job, [0] * row.tasks, row.started_at, preempting=row.state == "preempting")
            else:
                try:
                    scheduler.submit(job)
                except DistmlError as exc:  # the pool shrank or the queue went away under it
                    md.end_job(conn, row.id, "failed", now, str(exc))
                    changed[row.id] = "failed"
                    del jobs[row.id]
        decision = scheduler.schedule(now)
        for job in decision.started:
            md.start_job(conn, job.id, now, [node.name] * len(job.placement))
            changed[job.id] = "running"
        for job in decision.preempt:
            md.preempt_job(conn, job.id, job.reason)
            changed[job.id] = "preempting"
        for job_id, (job, row) in jobs.items():
            if job.running:
                states[job_id] = "preempting" if job.preempting else "running"
                continue
            states[job_id] = "waiting"
            # What this pass decided about the job, if it looked at it; a job merely in line gets
            # no text (its position is shown when asked), so a pass writes O(decisions), not O(queue).
            reason = job.reason or None
            if reason != row.reason:
                md.set_reason(conn, job_id, reason)

    in_transaction(engine, decide)
    metrics.observe_pass(time.perf_counter() - started, changed)
    return {**states, **changed}


class SharedPool:
    """The workspace's pool across processes: `try_acquire`/`release` like `LocalPool`, and
    `acquire` that blocks. Jobs go to `queue` with `priority`; a background heartbeat renews
    this process's leases and calls `on_preempt(lease)` when a pass chose one of them as a victim."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        queue: str = "default",
        priority: str | int = "normal",
        kind: str = "job",
        preemptible: bool = False,
        on_preempt: Callable[[Lease], None] | None = None,
    ):
        self.engine = engine
        self.queue = queue
        self.priority = parse_priority(priority)
        self.kind = kind
        self.preemptible = preemptible
        self.on_preempt = on_preempt
        self.node = ensure_node(engine)
        check_queue(engine, queue)
        self._pending: dict[str, tuple[str, Resources]] = {}  # job name -> (job id, request)
        self._held: dict[str, Lease] = {}  # job id -> lease
        self._preempted: set[str] = set()
        self._states: dict[str, str] = {}  # the last pass's decision, and when it ran
        self._passed_at = -1e9
        self._liveness = Liveness()
        self._deferred: list[Callable[[sa.Connection, float], None]] = []  # applied by the next pass
        self._binds: list[Callable[[sa.Connection, float], None]] = []  # written by the next flush or pass
        self._identity = process_identity(os.getpid())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the LocalPool interface ------------------------------------------------------------

    def check(self, job: str, request: Resources) -> None:
        Scheduler([self.node], {"default": 1.0}).submit(Job(job, request))

    def try_acquire(
        self, job: str, request: Resources, *, estimate: float | None = None, defer: bool = False
    ) -> Lease | None:
        """Submit `job` once, run a pass, and return its lease if it was admitted. With `defer`, a
        new job is only queued for the next pass this process runs (`flush`, or the next call
        without `defer`): a caller starting many jobs at once pays one pass for all of them."""
        if job not in self._pending:
            self.check(job, request)
            job_id, insert = self._submission(job, request, estimate)
            self._pending[job] = (job_id, request)
            self._deferred.append(insert)
            self._start_heartbeat()
            if defer:
                return None
        job_id, _ = self._pending[job]
        if not self._deferred and time.monotonic() - self._passed_at < POLL_SECONDS and job_id in self._states:
            state = self._states[job_id]  # a pass this process just ran decided for every job at once
        else:
            state = self._pass().get(job_id, "done")
        if state in ("running", "preempting"):
            del self._pending[job]
            lease = Lease(job_id, job, request)
            with self._lock:
                self._held[job_id] = lease
            return lease
        if state != "waiting":
            del self._pending[job]
            raise DistmlError(f"{job} was not admitted: {self._state(job_id).reason}")
        return None

    def release(self, lease: Lease, outcome: str = "finished", *, defer: bool = False) -> None:
        """Give the gang back; the next pass (now, or this process's next with `defer`) starts
        the next in line."""
        if not isinstance(lease.id, str):
            return
        with self._lock:
            self._held.pop(lease.id, None)
            self._preempted.discard(lease.id)

        def finish(conn: sa.Connection, now: float) -> None:
            md.end_job(conn, lease.id, outcome, now)

        self._deferred.append(finish)
        if not defer:
            self._pass()

    def flush(self) -> None:
        """Run one pass for the submissions and releases deferred so far, if any; deferred binds
        alone change no decision and are written without a pass."""
        if self._deferred:
            self._pass()
        elif self._binds:
            binds, self._binds = self._binds, []
            try:
                in_transaction(self.engine, lambda conn: [bind(conn, time.time()) for bind in binds])
            except BaseException:
                self._binds = binds + self._binds
                raise

    # -- blocking form, and what a preempted holder does ---------------------------------------

    def acquire(
        self,
        job: str,
        request: Resources,
        *,
        estimate: float | None = None,
        waiting: Callable[[str], None] | None = None,
    ) -> Lease:
        """Block until `job`'s gang is admitted; `waiting(reason)` is told each new reason."""
        said = None
        while True:
            lease = self.try_acquire(job, request, estimate=estimate)
            if lease is not None:
                return lease
            if waiting is not None:
                reason = self._state(self._pending[job][0]).reason or "waiting"
                if reason != said:
                    waiting(reason)
                    said = reason
            time.sleep(POLL_SECONDS)

    def requeue(self, lease: Lease) -> None:
        """A preempted holder stopped: give the resources back and wait in line again (same age)."""
        with self._lock:
            self._held.pop(lease.id, None)
            self._preempted.discard(lease.id)
        md.requeue_job(self.engine, lease.id, time.time() + LEASE_SECONDS)
        self._pending[lease.job] = (str(lease.id), lease.resources)

    def adopt(self, job: str, request: Resources) -> Lease | None:
        """Take over the running gang named `job` that a previous holder bound to a process
        still alive (a workflow step after `distml run --resume`); submit it anew if it is gone."""
        job_id = md.running_job_id(self.engine, job, self.node.name)
        if job_id is None:
            return self.try_acquire(job, request)
        lease = Lease(job_id, job, request)
        with self._lock:
            self._held[job_id] = lease
        self._start_heartbeat()
        return lease

    def preempted(self, lease: Lease) -> bool:
        return lease.id in self._preempted

    def bind(self, lease: Lease, pid: int, *, defer: bool = False) -> None:
        """Hand the lease to process `pid` (a step process): it stays held while that process
        lives, even when this one dies. With `defer`, written by this process's next pass."""
        if not isinstance(lease.id, str):
            return
        started = process_identity(pid)

        def rebind(conn: sa.Connection, _now: float) -> None:
            md.bind_job(conn, lease.id, pid, started)

        if defer:
            self._binds.append(rebind)
        else:
            in_transaction(self.engine, lambda conn: rebind(conn, time.time()))

    def close(self) -> None:
        """Stop the heartbeat and withdraw jobs still waiting (held leases stay with their holders)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        for job_id, _ in self._pending.values():
            in_transaction(
                self.engine,
                lambda conn, job_id=job_id: md.end_job(conn, job_id, "cancelled", time.time(), only="waiting"),
            )
        self._pending.clear()

    # -- internals ------------------------------------------------------------------------

    def _submission(
        self, name: str, request: Resources, estimate: float | None
    ) -> tuple[str, Callable[[sa.Connection, float], None]]:
        """A new job's id, and the insert of its row for the pass that first considers it."""
        job_id = f"{name[:90]}~{uuid.uuid4().hex[:6]}"  # readable in the reasons other jobs show
        pid = os.getpid()

        def insert(conn: sa.Connection, now: float) -> None:
            md.submit_job(
                conn,
                id=job_id,
                name=name,
                kind=self.kind,
                queue=self.queue,
                priority=self.priority,
                preemptible=self.preemptible,
                tasks=request.workers,
                cpus=request.cpus,
                gpus=request.gpus,
                memory_gb=request.memory_gb,
                estimate_s=estimate,
                node=self.node.name,
                pid=pid,
                pid_started=self._identity,
                lease_expires=now + LEASE_SECONDS,
                submitted_at=now,
            )

        return job_id, insert

    def _pass(self) -> dict[str, str]:
        """One pass that first applies this process's deferred submissions, releases and binds."""
        deferred, self._deferred = self._binds + self._deferred, []
        self._binds = []

        def first(conn: sa.Connection, now: float) -> None:
            for change in deferred:
                change(conn, now)

        try:
            self._states = schedule_pass(self.engine, node=self.node, first=first, liveness=self._liveness)
        except BaseException:  # the transaction rolled back: those changes go with the next pass
            self._deferred = deferred + self._deferred
            raise
        self._passed_at = time.monotonic()
        return self._states

    def _state(self, job_id: str) -> md.SchedJob:
        return md.get_job(self.engine, job_id)

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="distml-scheduler-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                held = dict(self._held)
            ids = list(held) + [job_id for job_id, _ in self._pending.values()]
            if not ids:
                continue
            try:
                stopping = md.renew_leases(self.engine, ids, list(held), time.time() + LEASE_SECONDS)
            except (sa.exc.OperationalError, StoreUnavailable) as exc:  # a busy or absent store: the next beat
                log.debug("scheduler heartbeat skipped: %s", exc)
                continue
            for job_id in stopping - self._preempted:
                self._preempted.add(job_id)
                if self.on_preempt is not None:
                    self.on_preempt(held[job_id])


def pool_state(engine: sa.Engine) -> dict[str, Any]:
    """`snapshot` with the pass count: what the scheduler's metrics endpoint reports at each scrape."""
    return {**snapshot(engine), "passes": md.passes(engine)}


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """The pool as `distml queue` and `distml top` show it: this host's node with what is used,
    each queue's weight, nominal share, current share and jobs, and every job not done."""
    node = ensure_node(engine)
    jobs = [
        {**dataclasses.asdict(job), "priority_class": priority_name(job.priority)}
        for job in md.list_jobs(engine)
        if job.node == node.name
    ]
    lines: dict[str, list[dict[str, Any]]] = {}
    for job in sorted(jobs, key=lambda j: (-j["priority"], j["submitted_at"])):
        if job["state"] == "waiting":
            lines.setdefault(job["queue"], []).append(job)
    for queue, line in lines.items():
        for position, job in enumerate(line[1:], start=2):
            job["reason"] = job["reason"] or f"position {position} in queue {queue}, behind {line[0]['name']}"
    with engine.connect() as conn:
        weights = md.queue_weights(conn)
    scheduler = Scheduler([node], {**weights, **{j["queue"]: 1.0 for j in jobs if j["queue"] not in weights}})
    for job in jobs:
        if job["state"] in ("running", "preempting"):
            request = Resources(cpus=job["cpus"], gpus=job["gpus"], workers=job["tasks"], memory_gb=job["memory_gb"])
            scheduler.restore(Job(job["id"], request, queue=job["queue"]), [0] * job["tasks"], job["started_at"] or 0.0)
    shares = scheduler.shares()
    used = [sum(q[d] for q in scheduler.used.values()) for d in range(3)]
    queues = [
        {
            "name": name,
            "weight": weights.get(name, 1.0),
            "nominal_share": scheduler.quota[name],
            "share": shares[name],
            "running": sum(1 for j in jobs if j["queue"] == name and j["state"] != "waiting"),
            "waiting": sum(1 for j in jobs if j["queue"] == name and j["state"] == "waiting"),
        }
        for name in sorted(scheduler.weights)
    ]
    return {
        "node": {"name": node.name, "cpus": node.cpus, "gpus": node.gpus, "memory_gb": node.memory_gb},
        "used": {"cpus": used[0], "gpus": used[1], "memory_gb": used[2]},
        "queues": queues,
        "jobs": jobs,
    }
