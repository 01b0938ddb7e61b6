"""Gang, fair-share and priority scheduling of jobs onto pools of nodes: one pure decision core.

`Scheduler` holds nodes, weighted queues, running and waiting jobs, and `schedule(now)` decides
which jobs start (a node for every task of a gang, or nothing) and which running jobs to preempt.
No clock, no I/O, no threads: the simulator (`benchmarks/scheduling.py`) drives it from a trace,
and `distml.ops.admission.SharedPool` drives it from the metadata store across processes.

The design follows Kueue and Volcano (weighted dominant-resource-fair ordering of queues, nominal
shares a queue may exceed while capacity is idle and is made to give back, minimal preemption
sets, EASY backfill); neither runs outside Kubernetes, so the core is written here.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

from distml.errors import DistmlError

#: Priority classes by name; `--priority` takes a name or an integer. Higher runs first.
PRIORITY_CLASSES = {"low": -100, "normal": 0, "high": 100, "serving": 1000}

_DIMS = ("cpus", "gpus", "memory_gb")


@dataclass(frozen=True)
class Resources:
    """What one job asks for: `workers` tasks (its gang), each needing `cpus` slots, `gpus` and
    `memory_gb` of memory."""

    cpus: float = 1.0
    gpus: int = 0
    workers: int = 1
    memory_gb: float = 0.0

    def __post_init__(self) -> None:
        if not (self.cpus >= 0 and self.gpus >= 0 and self.workers >= 1 and self.memory_gb >= 0):
            raise DistmlError(f"resources need cpus >= 0, gpus >= 0, memory_gb >= 0 and workers >= 1, got {self}")

    @property
    def total_cpus(self) -> float:
        return self.cpus * self.workers

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.workers

    def describe(self) -> str:
        each = (
            f"{self.cpus:g} cpu"
            + (f" + {self.gpus} gpu" if self.gpus else "")
            + (f" + {self.memory_gb:g} GiB" if self.memory_gb else "")
        )
        return each if self.workers == 1 else f"gang of {self.workers} x {each}"


def parse_priority(value: str | int) -> int:
    """A priority class name or an integer, as `--priority` accepts it."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text in PRIORITY_CLASSES:
        return PRIORITY_CLASSES[text]
    try:
        return int(text)
    except ValueError:
        raise DistmlError(
            f"priority must be one of {', '.join(PRIORITY_CLASSES)} or an integer, got {value!r}"
        ) from None


def priority_name(value: int) -> str:
    for name, number in PRIORITY_CLASSES.items():
        if number == value:
            return name
    return str(value)


@dataclass
class Node:
    """One machine of a pool: its capacity in cpu slots, gpus and memory (GiB)."""

    name: str
    cpus: float
    gpus: int = 0
    memory_gb: float = 0.0


@dataclass(eq=False)
class Job:
    """A gang of `resources.workers` tasks, each needing `resources`' cpus, gpus and memory.

    `estimate` (seconds) is what the job expects to run; it lets smaller jobs backfill ahead of
    a blocked one, and None means unknown. The scheduler sets `placement` (a node per task),
    `started`, `preempting` and `reason`.
    """

    id: str
    resources: Resources
    queue: str = "default"
    priority: int = 0
    submitted: float = 0.0
    estimate: float | None = None
    preemptible: bool = True
    placement: list[int] = field(default_factory=list)
    started: float | None = None
    preempting: bool = False
    reason: str = ""
    _key: tuple = ()

    @property
    def running(self) -> bool:
        return self.started is not None

    def demand(self) -> tuple[float, float, float]:
        r = self.resources
        return (r.cpus, float(r.gpus), r.memory_gb)


@dataclass(frozen=True)
class Policy:
    """How the core orders and admits. `order`: "drf" (weighted dominant resource fairness
    between queues, priority then age inside one) or "fifo" (arrival order, one line for all).
    `gang=False` places tasks one by one as they fit and holds partial allocations (what a
    pod-by-pod scheduler does), the baseline gang admission exists to beat."""

    order: Literal["drf", "fifo"] = "drf"
    gang: bool = True
    preemption: bool = True
    backfill: bool = True
    lookahead: int = 32  # waiting jobs per queue a pass considers for backfill


@dataclass
class Decision:
    started: list[Job] = field(default_factory=list)
    preempt: list[Job] = field(default_factory=list)


class Scheduler:
    """The state of one pool and the decisions on it. Not thread-safe; one owner drives it."""

    def __init__(self, nodes: list[Node], queues: dict[str, float], policy: Policy | None = None):
        if not nodes:
            raise DistmlError("a pool needs at least one node")
        if not queues:
            raise DistmlError("a pool needs at least one queue")
        for name, weight in queues.items():
            if not weight > 0:
                raise DistmlError(f"queue {name!r} needs a weight > 0, got {weight}")
        self.nodes = nodes
        self.policy = policy or Policy()
        self.weights = dict(queues)
        total_weight = sum(self.weights.values())
        self.quota = {q: w / total_weight for q, w in self.weights.items()}  # nominal fraction of the pool
        self.capacity = [sum(getattr(n, d) for n in nodes) for d in _DIMS]
        self.free = [[float(n.cpus), float(n.gpus), float(n.memory_gb)] for n in nodes]
        self.used = {q: [0.0, 0.0, 0.0] for q in self.weights}
        self.jobs: dict[str, Job] = {}
        self.running: dict[str, Job] = {}
        self.partial: dict[str, Job] = {}  # gang=False only: jobs holding some of their tasks
        self._waiting: dict[str, list[tuple]] = {q: [] for q in self.weights}
        self._seq = itertools.count()

    # -- state changes -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; refuse one that could never fit the pool instead of letting it wait forever."""
        if job.queue not in self.weights:
            raise DistmlError(f"unknown queue {job.queue!r}; queues: {', '.join(sorted(self.weights))}")
        if job.id in self.jobs:
            raise DistmlError(f"job {job.id!r} is already known to the scheduler")
        per_node = sum(self._tasks_fitting(job.demand(), [n.cpus, n.gpus, n.memory_gb]) for n in self.nodes)
        if per_node < job.resources.workers:
            raise DistmlError(
                f"job {job.id} asks for {job.resources.describe()} but the pool "
                f"({len(self.nodes)} node(s), {self.capacity[0]:g} cpu slots, {self.capacity[1]:g} gpus, "
                f"{self.capacity[2]:g} GiB) can never hold it; lower its resources or enlarge the pool"
            )
        self.jobs[job.id] = job
        self._enqueue(job)

    def restore(self, job: Job, placement: list[int], started: float, preempting: bool = False) -> None:
        """Put back a job that already runs (state loaded from the metadata store)."""
        if job.queue not in self.weights:
            self.weights[job.queue] = 1.0  # a queue deleted while its jobs run still counts
            self.quota = {q: w / sum(self.weights.values()) for q, w in self.weights.items()}
            self.used[job.queue] = [0.0, 0.0, 0.0]
            self._waiting[job.queue] = []
        self.jobs[job.id] = job
        self._allocate(job, placement)
        job.started = started
        job.preempting = preempting
        self.running[job.id] = job

    def release(self, job_id: str) -> Job:
        """A job ended (finished, failed, killed): give its resources back and forget it."""
        job = self.jobs.pop(job_id)
        if job.id in self.running or job.id in self.partial:
            self._free(job)
            self.running.pop(job.id, None)
            self.partial.pop(job.id, None)
        else:
            self._dequeue(job)
        return job

    def requeue(self, job_id: str) -> Job:
        """A preempted job stopped: free its resources and put it back in line (same age)."""
        job = self.jobs[job_id]
        if job.id in self.running:
            self._free(job)
            del self.running[job.id]
        job.started, job.preempting = None, False
        self._enqueue(job)
        return job

    # -- the decision ------------------------------------------------------------------

    def schedule(self, now: float) -> Decision:
        """Start what may start now; choose victims for a blocked job that may preempt."""
        decision = Decision()
        if not self.policy.gang:
            self._schedule_tasks(now, decision)
            return decision
        lines = list(self._waiting) if self.policy.order == "drf" else ["*"]
        exhausted: set[str] = set()
        reserved: tuple[Job, float, list[list[float]]] | None = None
        while True:
            line = self._next_line(lines, exhausted)
            if line is None:
                break
            if reserved is None:
                head = self._waiting[line][0][-1]
                placement = self._place(head.demand(), head.resources.workers, self.free)
                if placement is not None:
                    self._start(head, placement, now, decision)
                    continue
                preempting = self.policy.preemption and self._preempt_for(head, decision)
                if not preempting:
                    head.reason = self._blocked_reason(head)
                if not self.policy.backfill:
                    break  # strict order: nothing passes the blocked head
                reserved = self._reservation(head)
                continue  # from now on every line, this one included, only backfills
            if not self._backfill_line(line, reserved, now, decision):
                exhausted.add(line)
        return decision

    # -- what a reader asks ---------------------------------------------------------------

    def shares(self) -> dict[str, float]:
        """Each queue's dominant share of the pool divided by its nominal share (1.0 = its fair
        share; above 1 it borrows idle capacity)."""
        return {q: self._share(q) for q in self.weights}

    def waiting(self, queue: str | None = None) -> list[Job]:
        lines = [queue] if queue else list(self._waiting)
        jobs = [entry for line in lines for entry in self._waiting.get(line, [])]
        return [entry[-1] for entry in sorted(jobs)]

    def explain(self, job_id: str) -> str:
        """Why a waiting job waits, in words."""
        job = self.jobs[job_id]
        if job.running:
            return "preempted: stopping to give its resources back" if job.preempting else "running"
        line = self._line_of(job)
        position = self._waiting[line].index(job._key)
        if position and not job.reason:
            ahead = self._waiting[line][0][-1]
            return f"position {position + 1} in queue {line}, behind {ahead.id}"
        return job.reason or "about to be scheduled"

    # -- internals ------------------------------------------------------------------------

    def _line_of(self, job: Job) -> str:
        return job.queue if self.policy.order == "drf" else "*"

    def _enqueue(self, job: Job) -> None:
        line = self._line_of(job)
        self._waiting.setdefault(line, [])
        order = -job.priority if self.policy.order == "drf" else 0
        job._key = (order, job.submitted, next(self._seq), job)
        job.reason = ""
        bisect.insort(self._waiting[line], job._key)  # seq is unique: tuples never compare jobs

    def _dequeue(self, job: Job) -> None:
        entries = self._waiting[self._line_of(job)]
        index = bisect.bisect_left(entries, job._key)
        del entries[index]

    def _share(self, queue: str) -> float:
        used = self.used[queue]
        dominant = max((u / c for u, c in zip(used, self.capacity, strict=True) if c > 0), default=0.0)
        return dominant / self.quota[queue]

    def _share_with(self, queue: str, demand: tuple[float, float, float], tasks: int) -> float:
        used = [u + d * tasks for u, d in zip(self.used[queue], demand, strict=True)]
        dominant = max((u / c for u, c in zip(used, self.capacity, strict=True) if c > 0), default=0.0)
        return dominant / self.quota[queue]

    def _next_line(self, lines: list[str], blocked: set[str]) -> str | None:
        best, best_key = None, None
        for line in lines:
            if line in blocked or not self._waiting.get(line):
                continue
            key = (self._share(line), -self.weights[line], line) if line != "*" else (0.0, 0.0, line)
            if best_key is None or key < best_key:
                best, best_key = line, key
        return best

    @staticmethod
    def _tasks_fitting(demand: tuple[float, float, float], free: list[float]) -> float:
        fits = math.inf
        for need, have in zip(demand, free, strict=True):
            if need > 0:
                fits = min(fits, math.floor((have + 1e-9) / need))
        return fits

    def _place(self, demand, tasks: int, free: list[list[float]], exclude: frozenset = frozenset()) -> list[int] | None:
        """A node per task (best fit: the fullest nodes first, so whole nodes stay free for big
        gangs), or None when the gang does not fit."""
        total = 0.0
        counts = []
        for index, node_free in enumerate(free):
            if index in exclude:
                continue
            fits = self._tasks_fitting(demand, node_free)
            if fits > 0:
                counts.append((fits, index))
                total += fits
        if total < tasks:
            return None
        counts.sort()
        placement: list[int] = []
        # Prefer one node that holds the whole gang, else fill the fullest nodes first.
        for fits, index in counts:
            if fits >= tasks:
                return [index] * tasks
        for fits, index in reversed(counts):
            take = int(min(fits, tasks - len(placement)))
            placement += [index] * take
            if len(placement) == tasks:
                break
        return placement

    def _allocate(self, job: Job, placement: list[int]) -> None:
        demand = job.demand()
        used = self.used[job.queue]
        for index in placement:
            node = self.free[index]
            for dim in range(3):
                node[dim] -= demand[dim]
                used[dim] += demand[dim]
        job.placement = list(placement)

    def _free(self, job: Job) -> None:
        demand = job.demand()
        used = self.used[job.queue]
        for index in job.placement:
            node = self.free[index]
            for dim in range(3):
                node[dim] += demand[dim]
                used[dim] -= demand[dim]
        job.placement = []

    def _start(self, job: Job, placement: list[int], now: float, decision: Decision) -> None:
        self._dequeue(job)
        self._allocate(job, placement)
        job.started, job.reason = now, ""
        self.running[job.id] = job
        decision.started.append(job)

    def _blocked_reason(self, job: Job) -> str:
        free = [sum(node[d] for node in self.free) for d in range(3)]
        holders = sorted(self.running.values(), key=lambda j: -len(j.placement))[:3]
        held = ", ".join(j.id for j in holders)
        return (
            f"needs {job.resources.describe()}; free now: {free[0]:g} cpu slots, {free[1]:g} gpus, "
            f"{free[2]:g} GiB" + (f" (held by {held})" if held else "")
        )

    def _reservation(self, head: Job) -> tuple[Job, float, list[list[float]]]:
        """EASY backfill's reservation for a blocked job: the time it can start if running jobs
        end when they expect to (`math.inf` when some end is unknown), and what of the pool is
        left over for others at that time once the job is placed."""
        free = [list(node) for node in self.free]
        ending = sorted(
            self.running.values(),
            key=lambda j: (
                -math.inf if j.preempting else (j.started + j.estimate if j.estimate is not None else math.inf)
            ),
        )
        shadow = -math.inf
        demand, tasks = head.demand(), head.resources.workers
        placement = self._place(demand, tasks, free)
        for job in ending:
            if placement is not None:
                break
            end = (
                -math.inf if job.preempting else (job.started + job.estimate if job.estimate is not None else math.inf)
            )
            job_demand = job.demand()
            for index in job.placement:
                for dim in range(3):
                    free[index][dim] += job_demand[dim]
            shadow = max(shadow, end)
            placement = self._place(demand, tasks, free)
        if placement is None:  # cannot happen for a job submit() accepted
            return head, math.inf, [[0.0, 0.0, 0.0] for _ in free]
        extra = [list(node) for node in free]
        for index in placement:
            for dim in range(3):
                extra[index][dim] -= demand[dim]
        return head, shadow, extra

    def _backfill_line(self, line: str, reserved, now: float, decision: Decision) -> bool:
        """Start the first job among the next `lookahead` of `line` that fits now and cannot delay
        the reserved job: it ends before the reservation's start, or it fits in what the
        reservation leaves over. Return whether one started."""
        head, shadow, extra = reserved
        total_free = [sum(node[d] for node in self.free) for d in range(3)]
        for entry in self._waiting[line][: self.policy.lookahead + 1]:
            job = entry[-1]
            if job is head:
                continue
            demand, tasks = job.demand(), job.resources.workers
            if any(d * tasks > f + 1e-9 for d, f in zip(demand, total_free, strict=True)):
                continue
            ends_in_time = job.estimate is not None and now + job.estimate <= shadow
            if ends_in_time:
                placement = self._place(demand, tasks, self.free)
            else:
                bounded = [
                    [min(a, b) for a, b in zip(f, e, strict=True)] for f, e in zip(self.free, extra, strict=True)
                ]
                placement = self._place(demand, tasks, bounded)
                if placement is not None:
                    for index in placement:
                        for dim in range(3):
                            extra[index][dim] -= demand[dim]
            if placement is not None:
                self._start(job, placement, now, decision)
                return True
            job.reason = f"backfill would delay {head.id}"
        return False

    def _preempt_for(self, job: Job, decision: Decision) -> bool:
        """Choose the fewest, lowest-priority running jobs whose stopping lets `job` start: jobs
        of its own queue with a lower priority, and jobs of queues using more than their nominal
        share while `job`'s queue (with `job`) stays within its own. Marks them preempting;
        returns whether `job` now waits on preempted jobs."""
        demand, tasks = job.demand(), job.resources.workers
        free = [list(node) for node in self.free]
        stopping = [j for j in self.running.values() if j.preempting]
        for victim in stopping:
            self._give(free, victim)
        if stopping and self._place(demand, tasks, free) is not None:
            job.reason = f"waiting for {len(stopping)} preempted job(s) to stop"
            return True
        reclaim = self._share_with(job.queue, demand, tasks) <= 1.0 + 1e-9
        candidates = []
        for other in self.running.values():
            if other.preempting or not other.preemptible:
                continue
            if other.queue == job.queue:
                if other.priority < job.priority:
                    candidates.append(other)
            elif reclaim and self._share(other.queue) > 1.0 + 1e-9:
                candidates.append(other)
        if not candidates:
            return False
        candidates.sort(key=lambda j: (j.priority, -(j.started or 0.0)))
        chosen: list[Job] = []
        borrowed = {q: self._share(q) for q in self.weights}
        for victim in candidates:
            if victim.queue != job.queue and borrowed[victim.queue] <= 1.0 + 1e-9:
                continue  # that queue has given back what it borrowed
            chosen.append(victim)
            self._give(free, victim)
            if victim.queue != job.queue:
                borrowed[victim.queue] = self._share_after(victim.queue, chosen)
            if self._place(demand, tasks, free) is not None:
                break
        else:
            return False
        for victim in list(reversed(chosen[:-1])):  # drop any victim the others make unnecessary
            trial = [list(node) for node in free]
            self._take(trial, victim)
            if self._place(demand, tasks, trial) is not None:
                chosen.remove(victim)
                free = trial
        for victim in chosen:
            victim.preempting = True
            victim.reason = f"preempted for {job.id} (priority {job.priority}, queue {job.queue})"
            decision.preempt.append(victim)
        job.reason = f"preempting {', '.join(v.id for v in chosen)}"
        return True

    def _share_after(self, queue: str, removed: list[Job]) -> float:
        used = list(self.used[queue])
        for job in removed:
            if job.queue == queue:
                for dim, need in enumerate(job.demand()):
                    used[dim] -= need * len(job.placement)
        dominant = max((u / c for u, c in zip(used, self.capacity, strict=True) if c > 0), default=0.0)
        return dominant / self.quota[queue]

    @staticmethod
    def _give(free: list[list[float]], job: Job) -> None:
        demand = job.demand()
        for index in job.placement:
            for dim in range(3):
                free[index][dim] += demand[dim]

    @staticmethod
    def _take(free: list[list[float]], job: Job) -> None:
        demand = job.demand()
        for index in job.placement:
            for dim in range(3):
                free[index][dim] -= demand[dim]

    def _schedule_tasks(self, now: float, decision: Decision) -> None:
        """gang=False: every waiting job, oldest first, takes whatever tasks fit now and holds
        them; it starts when it holds all of them. Jobs holding part of a gang can deadlock."""
        total_free = [sum(node[d] for node in self.free) for d in range(3)]
        for line in list(self._waiting):
            for entry in list(self._waiting[line]):
                if all(f <= 1e-9 for f, c in zip(total_free, self.capacity, strict=True) if c > 0):
                    return
                job = entry[-1]
                demand = job.demand()
                missing = job.resources.workers - len(job.placement)
                for index, node in enumerate(self.free):
                    fits = int(min(self._tasks_fitting(demand, node), missing))
                    if fits <= 0:
                        continue
                    for dim in range(3):
                        node[dim] -= demand[dim] * fits
                        self.used[job.queue][dim] += demand[dim] * fits
                        total_free[dim] -= demand[dim] * fits
                    job.placement += [index] * fits
                    missing -= fits
                    if not missing:
                        break
                if job.placement:
                    self.partial[job.id] = job
                if not missing:
                    self._dequeue(job)
                    del self.partial[job.id]
                    job.started, job.reason = now, ""
                    self.running[job.id] = job
                    decision.started.append(job)
                elif job.placement:
                    job.reason = f"holds {len(job.placement)} of {job.resources.workers} tasks"
