"""Gang, fair-share and priority scheduling of jobs onto pools of nodes: one pure decision core.

`Scheduler` holds nodes, weighted queues, running and waiting jobs, and `schedule(now)` decides
which jobs start (a node for every task of a gang, or nothing) and which running jobs to preempt.
No clock, no I/O, no threads: the simulator (`benchmarks/scheduling.py`) drives it from a trace,
and `distml.scheduling.admission.SharedPool` drives it from the metadata store across processes.

The design follows Kueue and Volcano (weighted dominant-resource-fair ordering of queues, nominal
shares a queue may exceed while capacity is idle and is made to give back, minimal preemption
sets, EASY backfill); neither runs outside Kubernetes, so the core is written here.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Literal

from distml.core.errors import DistmlError

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

    @functools.cached_property
    def per_task(self) -> tuple[float, float, float]:
        """What one task needs: (cpu slots, gpus, GiB)."""
        return (self.cpus, float(self.gpus), self.memory_gb)

    @functools.cached_property
    def totals(self) -> tuple[float, float, float]:
        """What the whole gang needs: (cpu slots, gpus, GiB)."""
        return tuple(need * self.workers for need in self.per_task)

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
        return self.resources.per_task


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


def _cost(victims: list[Job]) -> tuple[int, int]:
    """What preempting `victims` costs: the highest priority among them, then how many."""
    return max(v.priority for v in victims), len(victims)


@dataclass
class _Reservation:
    """EASY backfill's reservation for the job a pass could not start: when it can start
    (`shadow`), and what of the pool is left over for others at that time once it is placed."""

    head: Job
    shadow: float
    extra: list[list[float]]
    # Backfill shapes (demand, tasks, ends in time) that did not fit: for the rest of the pass the
    # pool only fills up, so neither they nor any larger shape ever will.
    failed: set = field(default_factory=set)
    failed_minimal: list = field(default_factory=list)
    # What a job running past `shadow` may use (free now and left over then), its totals, and the
    # pool's free totals; None until needed and again after a job starts.
    bounded: list[list[float]] | None = None
    bounded_total: list[float] | None = None
    free_total: list[float] | None = None
    # Per line, where its next backfill scan starts: the jobs before it did not fit, and will not.
    resume: dict[str, int] = field(default_factory=dict)

    def dominated(self, shape: tuple) -> bool:
        """Whether a shape that failed is no larger (then this one fails too; remembered)."""
        (cpus, gpus, memory), tasks, in_time = shape
        for (f_cpus, f_gpus, f_memory), f_tasks, f_in_time in self.failed_minimal:
            # as large a gang of as large tasks, in no more room (a job ending in time may use
            # the whole pool, one running past the shadow only what the reservation leaves)
            if tasks >= f_tasks and cpus >= f_cpus and gpus >= f_gpus and memory >= f_memory and f_in_time >= in_time:
                self.failed.add(shape)
                return True
        return False

    def failing(self, shape: tuple) -> None:
        self.failed.add(shape)
        self.failed_minimal.append(shape)


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
        shares = {line: self._share(line) for line in lines if line != "*"}  # kept up to date as jobs start
        exhausted: set[str] = set()
        reserved: _Reservation | None = None
        counted = 0
        while True:
            for job in decision.started[counted:]:
                if job.queue in shares:
                    shares[job.queue] = self._share(job.queue)
            counted = len(decision.started)
            line = self._next_line(lines, exhausted, shares)
            if line is None:
                break
            if reserved is None:
                head = self._waiting[line][0][-1]
                fits = self._fits_per_node(head.demand(), self.free)
                placement = self._placement(fits, head.resources.workers)
                if placement is not None:
                    self._start(head, placement, now, decision)
                    continue
                fits = [f if f > 0 else 0 for f in fits]  # counted once, updated by what follows
                preempting = self.policy.preemption and self._preempt_for(head, decision, fits)
                if not preempting:
                    head.reason = self._blocked_reason(head)
                if not self.policy.backfill:
                    break  # strict order: nothing passes the blocked head
                reserved = self._reservation(head, fits)
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
        return self._share_of(queue, self.used[queue])

    def _share_with(self, queue: str, demand: tuple[float, float, float], tasks: int) -> float:
        used = [u + d * tasks for u, d in zip(self.used[queue], demand, strict=True)]
        return self._share_of(queue, used)

    def _share_of(self, queue: str, used: list[float]) -> float:
        """The dominant share of the pool `used` amounts to, over the queue's nominal share."""
        dominant = max([used[d] / c for d, c in enumerate(self.capacity) if c > 0], default=0.0)
        return dominant / self.quota[queue]

    def _next_line(self, lines: list[str], blocked: set[str], shares: dict[str, float]) -> str | None:
        best, best_key = None, None
        for line in lines:
            if line in blocked or not self._waiting.get(line):
                continue
            key = (shares[line], -self.weights[line], line) if line != "*" else (0.0, 0.0, line)
            if best_key is None or key < best_key:
                best, best_key = line, key
        return best

    @staticmethod
    def _tasks_fitting(demand: tuple[float, float, float], free: list[float]) -> float:
        """How many tasks of `demand` fit in `free` (inf when it asks for nothing). The three
        dimensions are unrolled: this is the innermost call of every decision."""
        cpus, gpus, memory = demand
        fits = math.inf
        if cpus > 0:
            fits = math.floor((free[0] + 1e-9) / cpus)
        if gpus > 0:
            by_gpus = math.floor((free[1] + 1e-9) / gpus)
            if by_gpus < fits:
                fits = by_gpus
        if memory > 0:
            by_memory = math.floor((free[2] + 1e-9) / memory)
            if by_memory < fits:
                fits = by_memory
        return fits

    def _fits_per_node(self, demand: tuple[float, float, float], free: list[list[float]]) -> list[float]:
        """`_tasks_fitting` on every node (0 where it is not positive); inlined for the usual demand
        of all three dimensions, nodes without the gpus for one task skipped first."""
        cpus, gpus, memory = demand
        if cpus > 0 and gpus > 0 and memory > 0:
            floor = math.floor
            return [
                0
                if node[1] + 1e-9 < gpus
                else min(
                    floor((node[0] + 1e-9) / cpus), floor((node[1] + 1e-9) / gpus), floor((node[2] + 1e-9) / memory)
                )
                for node in free
            ]
        return [self._tasks_fitting(demand, node) for node in free]

    def _refit(self, demand, free: list[list[float]], fits: list[float], nodes) -> float:
        """Recount `fits` (tasks of `demand` per node, none below 0) on `nodes` after `free` changed
        there; return the change of their total. A placement exists exactly when the total reaches
        the gang's size. Only for a demand of something (finite counts)."""
        change = 0
        for index in set(nodes):
            now = max(self._tasks_fitting(demand, free[index]), 0)
            change += now - fits[index]
            fits[index] = now
        return change

    def _place(self, demand, tasks: int, free: list[list[float]]) -> list[int] | None:
        """A node per task (best fit: the fullest nodes first, so whole nodes stay free for big
        gangs), or None when the gang does not fit."""
        return self._placement(self._fits_per_node(demand, free), tasks)

    @staticmethod
    def _placement(fits_per_node: list[float], tasks: int) -> list[int] | None:
        """`_place` given the tasks each node holds."""
        counts = [(fits, index) for index, fits in enumerate(fits_per_node) if fits > 0]
        if sum(fits for fits, _ in counts) < tasks:
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
        free = [sum(column) for column in zip(*self.free, strict=True)]
        running = list(self.running.values())
        tasks = [len(j.placement) for j in running]  # the 3 largest, the first started among equals
        holders = [running[i] for i in heapq.nlargest(3, range(len(running)), key=tasks.__getitem__)]
        held = ", ".join(j.id for j in holders)
        return (
            f"needs {job.resources.describe()}; free now: {free[0]:g} cpu slots, {free[1]:g} gpus, "
            f"{free[2]:g} GiB" + (f" (held by {held})" if held else "")
        )

    def _reservation(self, head: Job, fits: list[float]) -> _Reservation:
        """EASY backfill's reservation for a blocked job: the time it can start if running jobs
        end when they expect to (`math.inf` when some end is unknown), and what of the pool is
        left over for others at that time once the job is placed. `fits`: its tasks per node now."""
        free = [list(node) for node in self.free]
        ending = [
            (-math.inf if j.preempting else (j.started + j.estimate if j.estimate is not None else math.inf), j)
            for j in self.running.values()
        ]
        ending.sort(key=operator.itemgetter(0))
        shadow = -math.inf
        demand, tasks = head.demand(), head.resources.workers
        fits = list(fits)  # counted again only where jobs end
        total = sum(fits)
        for end, job in ending:
            if total >= tasks:
                break
            self._give(free, job)
            total += self._refit(demand, free, fits, job.placement)
            shadow = max(shadow, end)
        placement = self._placement(fits, tasks) if total >= tasks else None
        if placement is None:  # cannot happen for a job submit() accepted
            return _Reservation(head, math.inf, [[0.0, 0.0, 0.0] for _ in free])
        extra = [list(node) for node in free]
        for index in placement:
            for dim in range(3):
                extra[index][dim] -= demand[dim]
        return _Reservation(head, shadow, extra)

    def _place_in_leftover(self, reserved: _Reservation, resources: Resources, slack: float) -> list[int] | None:
        """A placement in what the reservation leaves over (free now and not promised to its head),
        taken out of that leftover; None when the job does not fit there."""
        extra = reserved.extra
        if reserved.bounded is None:
            reserved.bounded = [list(map(min, f, e)) for f, e in zip(self.free, extra, strict=True)]
        if reserved.bounded_total is None:
            reserved.bounded_total = [sum(column) + slack for column in zip(*reserved.bounded, strict=True)]
        need_cpus, need_gpus, need_memory = resources.totals
        room_cpus, room_gpus, room_memory = reserved.bounded_total
        if need_cpus > room_cpus or need_gpus > room_gpus or need_memory > room_memory:
            return None
        demand = resources.per_task
        placement = self._place(demand, resources.workers, reserved.bounded)
        for index in placement or ():
            for dim in range(3):
                extra[index][dim] -= demand[dim]
        return placement

    def _backfill_line(self, line: str, reserved: _Reservation, now: float, decision: Decision) -> bool:
        """Start the first job among the next `lookahead` of `line` that fits now and cannot delay
        the reserved job: it ends before the reservation's start, or it fits in what the
        reservation leaves over. Return whether one started."""
        head, shadow, extra = reserved.head, reserved.shadow, reserved.extra
        if reserved.free_total is None:
            reserved.free_total = [sum(column) + 1e-9 for column in zip(*self.free, strict=True)]
        free_cpus, free_gpus, free_memory = reserved.free_total
        slack = 1e-9 * len(self.free)  # _place's rounding slack, summed over the nodes
        entries, failed, blocked = self._waiting[line], reserved.failed, f"backfill would delay {head.id}"
        for position in range(reserved.resume.get(line, 0), min(len(entries), self.policy.lookahead + 1)):
            job = entries[position][-1]
            if job is head:
                continue
            resources = job.resources
            need_cpus, need_gpus, need_memory = resources.totals
            if need_cpus > free_cpus or need_gpus > free_gpus or need_memory > free_memory:
                continue
            demand, tasks = resources.per_task, resources.workers
            # An unknown start (some job it waits for gave no estimate) is not a deadline any job
            # meets: the head would starve while every job with an estimate backfills.
            ends_in_time = job.estimate is not None and shadow < math.inf and now + job.estimate <= shadow
            shape = (demand, tasks, ends_in_time)
            if shape in failed or reserved.dominated(shape):
                job.reason = blocked
                continue
            if ends_in_time:
                placement = self._place(demand, tasks, self.free)
            else:
                placement = self._place_in_leftover(reserved, resources, slack)
            if placement is not None:
                self._start(job, placement, now, decision)
                reserved.free_total = reserved.bounded_total = None
                if reserved.bounded is not None:  # only the nodes it took changed
                    for index in set(placement):
                        reserved.bounded[index] = list(map(min, self.free[index], extra[index]))
                reserved.resume[line] = position  # where the next job now stands
                return True
            reserved.failing(shape)
            job.reason = blocked
        return False

    def _preempt_for(self, job: Job, decision: Decision, fits: list[float]) -> bool:
        """Choose the fewest, lowest-priority running jobs whose stopping lets `job` start: jobs
        of its own queue with a lower priority, and jobs of queues using more than their nominal
        share (as far as they keep it) while `job`'s queue (with `job`) stays within its own.
        Marks them preempting; returns whether `job` now waits on preempted jobs. `fits`: its
        tasks per node now."""
        demand, tasks = job.demand(), job.resources.workers
        free = [list(node) for node in self.free]
        fits = list(fits)  # once the jobs already preempted have stopped
        total = sum(fits)
        stopping = [j for j in self.running.values() if j.preempting]
        for victim in stopping:
            self._give(free, victim)
            total += self._refit(demand, free, fits, victim.placement)
        if stopping and total >= tasks:
            job.reason = f"waiting for {len(stopping)} preempted job(s) to stop"
            return True
        reclaim = self._share_with(job.queue, demand, tasks) <= 1.0 + 1e-9
        borrowing = {q for q in self.weights if q != job.queue and self._share(q) > 1.0 + 1e-9} if reclaim else ()
        candidates = []
        for other in self.running.values():
            if other.preempting or not other.preemptible:
                continue
            if other.queue == job.queue:
                if other.priority < job.priority:
                    candidates.append(other)
            elif other.queue in borrowing:
                candidates.append(other)
        if not candidates:
            return False
        ceiling, touched = [list(node) for node in free], set()  # even stopping all may not make room
        for other in candidates:
            self._give(ceiling, other)
            touched.update(other.placement)
        if total + self._refit(demand, ceiling, list(fits), touched) < tasks:
            return False
        # Lowest priority first; inside a priority, the most recently started (the least work lost).
        chosen = self._victims(job, sorted(candidates, key=lambda j: (j.priority, -(j.started or 0.0))), free, fits)
        if chosen is None:
            return False
        if len(chosen) > 1:  # several small jobs may have been taken where one larger one would do
            by_size = sorted(candidates, key=lambda j: (j.priority, -self._size(j), -(j.started or 0.0)))
            fewer = self._victims(job, by_size, free, fits)
            if fewer is not None and _cost(fewer) < _cost(chosen):
                chosen = fewer
        for victim in chosen:
            victim.preempting = True
            victim.reason = f"preempted for {job.id} (priority {job.priority}, queue {job.queue})"
            decision.preempt.append(victim)
        job.reason = f"preempting {', '.join(v.id for v in chosen)}"
        return True

    def _victims(self, job: Job, candidates: list[Job], free: list[list[float]], fits: list[float]) -> list[Job] | None:
        """Running jobs to stop so that `job` fits: `candidates` taken in order until it does
        (from another queue only while that queue keeps at least its nominal share), then each one
        the others make unnecessary dropped again; None if they never make room. `free` and
        `fits` (its tasks per node there) are left as they are."""
        demand, tasks = job.demand(), job.resources.workers
        free, fits = [list(node) for node in free], list(fits)
        total = sum(fits)
        chosen: list[Job] = []
        left = {q: list(used) for q, used in self.used.items()}  # each queue's use once the chosen stop
        for victim in candidates:
            if victim.queue != job.queue:
                used = [u - need * len(victim.placement) for u, need in zip(left[victim.queue], victim.demand())]
                if self._share_of(victim.queue, used) < 1.0 - 1e-9:
                    # Below its nominal share its queue would come before `job`'s in the next pass
                    # and take the room back: each pass would preempt the same job again.
                    continue
                left[victim.queue] = used
            chosen.append(victim)
            self._give(free, victim)
            total += self._refit(demand, free, fits, victim.placement)
            if total >= tasks:
                break
        else:
            return None
        for victim in list(reversed(chosen[:-1])):  # drop any victim the others make unnecessary
            trial, trial_fits = [list(node) for node in free], list(fits)
            self._take(trial, victim)
            change = self._refit(demand, trial, trial_fits, victim.placement)
            if total + change >= tasks:
                chosen.remove(victim)
                free, fits, total = trial, trial_fits, total + change
        return chosen

    def _size(self, job: Job) -> float:
        """The dominant share of the pool a running job holds."""
        return len(job.placement) * max([d / c for d, c in zip(job.demand(), self.capacity) if c > 0], default=0.0)

    @staticmethod
    def _give(free: list[list[float]], job: Job) -> None:
        cpus, gpus, memory = job.demand()
        for index in job.placement:
            node = free[index]
            node[0] += cpus
            node[1] += gpus
            node[2] += memory

    @staticmethod
    def _take(free: list[list[float]], job: Job) -> None:
        cpus, gpus, memory = job.demand()
        for index in job.placement:
            node = free[index]
            node[0] -= cpus
            node[1] -= gpus
            node[2] -= memory

    def _schedule_tasks(self, now: float, decision: Decision) -> None:
        """gang=False: every waiting job, oldest first, takes whatever tasks fit now and holds
        them; it starts when it holds all of them. Jobs holding part of a gang can deadlock."""
        total_free = [sum(node[d] for node in self.free) for d in range(3)]
        nowhere = set()  # task demands no node held in this pass: as the pool fills, none will
        took = True  # whether the last job took tasks (then the pool may be full)
        for line in list(self._waiting):
            for entry in list(self._waiting[line]):
                if took and all(f <= 1e-9 for f, c in zip(total_free, self.capacity, strict=True) if c > 0):
                    return
                took = False
                job = entry[-1]
                demand = job.demand()
                cpus, gpus, memory = demand
                if (
                    demand in nowhere
                    or cpus > total_free[0] + 1e-9
                    or gpus > total_free[1] + 1e-9
                    or memory > total_free[2] + 1e-9
                ):
                    continue  # not one task fits anywhere
                if not any(self._tasks_fitting(demand, node) > 0 for node in self.free):
                    nowhere.add(demand)
                    continue
                took = True
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
