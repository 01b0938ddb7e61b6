"""Scheduling benchmark: FIFO without gangs, FIFO with gangs, weighted DRF and DRF + priority preemption sharing a
contended GPU cluster, each the same core (`distml.scheduling.core`) driven event by event through one seeded synthetic
Philly/Helios-like trace on 32 nodes x 8 GPUs with 3 weighted queues. Run `python benchmarks/scheduling.py [--quick]
[--check] [--plot] [--out DIR]`; the last stdout line is JSON (also written to DIR/scheduling.json).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distml.scheduling.core import Job, Node, Policy, Resources, Scheduler

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out"

# -- the cluster and its queues ------------------------------------------------------------------------------------
N_NODES, NODE_GPUS, NODE_CPUS, NODE_MEM_GB = 32, 8, 64, 512
CAPACITY = (N_NODES * NODE_CPUS, N_NODES * NODE_GPUS, N_NODES * NODE_MEM_GB)
QUEUES = {"prod": 3.0, "research": 2.0, "dev": 1.0}
QUEUE_NAMES = list(QUEUES)
WEIGHT_FRACTION = {q: w / sum(QUEUES.values()) for q, w in QUEUES.items()}

# -- the trace -----------------------------------------------------------------------------------------------------
FULL_JOBS, QUICK_JOBS = 6000, 1500
OFFERED_LOAD = 0.97  # GPU-time submitted / (256 GPUs x the span of the arrivals)
GPU_SIZES = (1, 2, 4, 8, 16, 32, 64)
GPU_P = (0.70, 0.10, 0.08, 0.07, 0.025, 0.015, 0.010)
CPU_ONLY_P = 0.08  # data-processing jobs that ask for cpu slots and memory only
CPUS_PER_GPU, MEM_GB_PER_GPU = 6, 48
DURATION_MEDIAN_S, DURATION_SIGMA = 12 * 60, 2.0  # log-normal: median 12 min, p90 ~2.6 h, p99 ~21 h
DURATION_MIN_S, DURATION_CAP_S = 30.0, 3 * 86400.0  # capped at 3 days, a usual cluster time limit
QUEUE_EVENT_P = {"prod": 0.40, "research": 0.35, "dev": 0.25}  # share of submissions (a sweep is one submission)
SWEEP_P = {"prod": 0.02, "research": 0.05, "dev": 0.10}  # chance a submission is a sweep of same-shaped jobs
SWEEP_SIZE = (4, 32)  # jobs per sweep, uniform; sweep members come 0-60 s apart
DIURNAL_AMPLITUDE = 0.6  # arrival intensity (1 + 0.6 sin(2 pi t / day))
PRIORITY_P = {100: 0.05, 0: 0.75, -100: 0.20}  # high (not preemptible), normal, low
UNKNOWN_ESTIMATE_P = 0.2  # jobs that give no run-time estimate
TIME_LIMITS_H = (0.5, 1, 2, 4, 8, 12, 24, 48, 72, 96)  # estimates are rounded up to one of these
CHECKPOINT_S = 1800.0  # a running job checkpoints every 30 min of its run; preemption loses the work since then
MAX_PREEMPTION_ROUNDS = 10_000  # schedule() calls at one instant while each preempts: more is a livelock

# -- the contenders ------------------------------------------------------------------------------------------------
CONTENDERS: dict[str, tuple[Policy, bool]] = {  # name: (policy, whether jobs carry their priorities)
    "fifo_nogang": (Policy(order="fifo", gang=False, preemption=False, backfill=False), False),
    "fifo_gang": (Policy(order="fifo", gang=True, preemption=False, backfill=True), False),
    "drf_gang": (Policy(order="drf", gang=True, preemption=False, backfill=True), False),
    "drf_priority_preempt": (Policy(order="drf", gang=True, preemption=True, backfill=True), True),
}
GANG_CONTENDERS = ("fifo_gang", "drf_gang", "drf_priority_preempt")
PLOTTED = ("fifo_gang", "drf_gang", "drf_priority_preempt")  # --plot: their queue shares over time
STRESS_QUEUED = 10_000
STRESS_DECISIONS = {"full": 3000, "quick": 1000}
STRESS_LOAD = 8.0  # the stress trace offers 8x the cluster's GPU-time, so the queues pass 10,000 jobs
TARGETS = {
    "gang_deadlocked_jobs": {"max": 0},
    "drf_jain_index": {"min": 0.95},
    "decision_ms_p99_at_10k_queued": {"max": 1},
}


def log(message: str) -> None:
    print(f"[scheduling] {message}", file=sys.stderr, flush=True)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


# -- the synthetic trace -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceJob:
    id: str
    submitted: float
    queue: str
    resources: Resources
    duration: float
    estimate: float | None
    priority: int

    @property
    def gpus(self) -> int:
        return self.resources.total_gpus


def _shape(rng: np.random.Generator, max_gpus: int = 64) -> Resources:
    """One job's resources: cpu-only, a single task of 1-8 GPUs on one node, or a gang of 16-64 GPUs, half as
    one 8-GPU task per node (PyTorchJob style) and half as one task per GPU (MPI/Horovod style)."""
    if rng.random() < CPU_ONLY_P:
        cpus = float(rng.choice((2, 4, 8, 16)))
        workers = 1 if rng.random() < 0.8 else int(rng.integers(2, 9))
        return Resources(cpus=cpus, gpus=0, workers=workers, memory_gb=4.0 * cpus)
    p = np.array([pi for g, pi in zip(GPU_SIZES, GPU_P) if g <= max_gpus])
    gpus = int(rng.choice([g for g in GPU_SIZES if g <= max_gpus], p=p / p.sum()))
    if gpus <= NODE_GPUS:
        per_task, workers = gpus, 1
    elif rng.random() < 0.5:
        per_task, workers = NODE_GPUS, gpus // NODE_GPUS
    else:
        per_task, workers = 1, gpus
    return Resources(cpus=CPUS_PER_GPU * per_task, gpus=per_task, workers=workers, memory_gb=MEM_GB_PER_GPU * per_task)


def _duration(rng: np.random.Generator) -> float:
    value = DURATION_MEDIAN_S * math.exp(DURATION_SIGMA * rng.standard_normal())
    return float(min(max(value, DURATION_MIN_S), DURATION_CAP_S))


def _estimate(rng: np.random.Generator, duration: float) -> float | None:
    """What the user declares: nothing, or the duration times an overestimate factor (log-uniform 1-4), rounded up
    to a usual time limit."""
    if rng.random() < UNKNOWN_ESTIMATE_P:
        return None
    wanted = duration * math.exp(rng.uniform(0.0, math.log(4.0)))
    for hours in TIME_LIMITS_H:
        if hours * 3600 >= wanted:
            return hours * 3600.0
    return TIME_LIMITS_H[-1] * 3600.0


def make_trace(n_jobs: int, seed: int, offered_load: float = OFFERED_LOAD) -> list[TraceJob]:
    """`n_jobs` jobs in submission order. Shapes and durations are drawn first; the arrival span is then set so that
    the GPU-time submitted is `offered_load` of the cluster's over the span, and submissions (single jobs, or sweeps
    of same-shaped jobs 0-60 s apart) are placed in it by a Poisson process with a diurnal intensity."""
    rng = np.random.default_rng(seed)
    groups: list[tuple[str, list[tuple[Resources, float, int]]]] = []
    count = 0
    while count < n_jobs:
        queue = str(rng.choice(QUEUE_NAMES, p=[QUEUE_EVENT_P[q] for q in QUEUE_NAMES]))
        priority = int(rng.choice(list(PRIORITY_P), p=list(PRIORITY_P.values())))
        if rng.random() < SWEEP_P[queue]:  # a sweep: same shape, similar durations, one user's priority
            size = min(int(rng.integers(SWEEP_SIZE[0], SWEEP_SIZE[1] + 1)), n_jobs - count)
            shape, base = _shape(rng, max_gpus=8), _duration(rng)
            members = [
                (shape, float(min(max(base * math.exp(0.3 * rng.standard_normal()), DURATION_MIN_S), DURATION_CAP_S)))
                for _ in range(size)
            ]
        else:
            members = [(_shape(rng), _duration(rng))]
        groups.append((queue, [(r, d, priority) for r, d in members]))
        count += len(members)
    gpu_seconds = sum(r.total_gpus * d for _, members in groups for r, d, _ in members)
    span = gpu_seconds / (CAPACITY[1] * offered_load)
    # Submission instants: i.i.d. from the diurnal intensity on [0, span] (a Poisson process given its count).
    times: list[float] = []
    while len(times) < len(groups):
        t = rng.uniform(0.0, span, size=2 * len(groups))
        keep = rng.random(t.size) * (1 + DIURNAL_AMPLITUDE) < 1 + DIURNAL_AMPLITUDE * np.sin(2 * np.pi * t / 86400)
        times.extend(t[keep].tolist())
    times = sorted(times[: len(groups)])
    jobs: list[TraceJob] = []
    for at, (queue, members) in zip(times, groups):
        offset = 0.0
        for resources, duration, priority in members:
            jobs.append(
                TraceJob(
                    id=f"j{len(jobs):05d}",
                    submitted=float(at + offset),
                    queue=queue,
                    resources=resources,
                    duration=duration,
                    estimate=_estimate(rng, duration),
                    priority=priority,
                )
            )
            offset += float(rng.uniform(0.0, 60.0))
    jobs.sort(key=lambda j: (j.submitted, j.id))
    return jobs


def describe_trace(trace: list[TraceJob]) -> dict[str, Any]:
    gpu_s = np.array([j.gpus * j.duration for j in trace])
    durations = np.array([j.duration for j in trace])
    span = max(j.submitted for j in trace) - min(j.submitted for j in trace)
    by_queue = {q: sum(j.gpus * j.duration for j in trace if j.queue == q) / gpu_s.sum() for q in QUEUE_NAMES}
    sizes: dict[str, int] = {}
    for j in trace:
        key = "cpu_only" if j.gpus == 0 else str(j.gpus)
        sizes[key] = sizes.get(key, 0) + 1
    return {
        "jobs": len(trace),
        "arrival_span_h": round(span / 3600, 1),
        "offered_gpu_load": round(float(gpu_s.sum()) / (CAPACITY[1] * span), 3),
        "gpu_hours": round(float(gpu_s.sum()) / 3600),
        "jobs_by_gpus": {k: sizes[k] for k in [*map(str, GPU_SIZES), "cpu_only"] if k in sizes},
        "gpu_time_share_by_queue": {q: round(v, 3) for q, v in by_queue.items()},
        "jobs_by_queue": {q: sum(j.queue == q for j in trace) for q in QUEUE_NAMES},
        "duration_s_p50_p90_p99_max": [round(float(np.percentile(durations, p))) for p in (50, 90, 99, 100)],
        "high_priority_jobs": sum(j.priority > 0 for j in trace),
        "low_priority_jobs": sum(j.priority < 0 for j in trace),
    }


# -- the simulator -------------------------------------------------------------------------------------------------


@dataclass
class JobRun:
    """What the simulator knows of one job under one contender."""

    trace: TraceJob
    remaining: float
    first_start: float | None = None
    start: float | None = None
    end: float | None = None
    epoch: int = 0  # bumped by each preemption: the completion event of an earlier run is stale
    preemptions: int = 0
    lost_s: float = 0.0
    was_partial: bool = False


def water_fill(demand: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Weighted max-min fair split of a pool of 1.0 among queues demanding `demand` (fractions of the pool)."""
    fair: dict[str, float] = {}
    left, weight_left = 1.0, sum(weights.values())
    for q in sorted(demand, key=lambda q: demand[q] / weights[q]):
        level = left * weights[q] / weight_left
        fair[q] = min(demand[q], level)
        left -= fair[q]
        weight_left -= weights[q]
    return fair


def jain(values: list[float]) -> float:
    total, squares = sum(values), sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares > 0 else 1.0


def dominant(vector: list[float] | tuple[float, ...]) -> float:
    return max(v / c for v, c in zip(vector, CAPACITY))


def percentile(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if values else None


def simulate(
    trace: list[TraceJob],
    policy: Policy,
    use_priority: bool,
    *,
    stress_queued: int | None = None,
    stress_decisions: int = 0,
    record_series: bool = False,
) -> dict[str, Any]:
    """Drive one Scheduler through `trace`: an event per arrival and per completion, one `schedule(now)` per event
    (repeated while it preempts: victims stop at once, lose the work since their last checkpoint and are requeued).
    With `stress_queued`, only time the decisions made while at least that many jobs wait, and stop after
    `stress_decisions` of them."""
    nodes = [Node(f"n{i:02d}", NODE_CPUS, NODE_GPUS, NODE_MEM_GB) for i in range(N_NODES)]
    sched = Scheduler(nodes, QUEUES, policy)
    runs = {t.id: JobRun(t, t.duration) for t in trace}
    heap: list[tuple[float, int, str, int]] = [(t.submitted, 1, t.id, 0) for t in trace]  # completions (0) first
    heapq.heapify(heap)
    waiting_n = dict.fromkeys(QUEUE_NAMES, 0)
    waiting_demand = {q: [0.0, 0.0, 0.0] for q in QUEUE_NAMES}

    def count_waiting(job: Job, sign: int) -> None:
        waiting_n[job.queue] += sign
        r = job.resources
        for d, need in enumerate((r.total_cpus, float(r.total_gpus), r.memory_gb * r.workers)):
            waiting_demand[job.queue][d] += sign * need

    decision_s: list[float] = []
    timed_s: list[float] = []
    timed_cpu_s: list[float] = []
    events = preemptions = livelocks = max_rounds = 0
    lost_gpu_s = busy_gpu_s = busy_gpu_s_arrivals = partial_gpu_s = 0.0
    jain_weighted = contended_s = deficit = deficit_big_gang = 0.0
    share_time = dict.fromkeys(QUEUE_NAMES, 0.0)
    x_time = dict.fromkeys(QUEUE_NAMES, 0.0)
    last_arrival = trace[-1].submitted
    first_arrival = trace[0].submitted
    last_t = first_arrival
    state = {"running_gpus": 0.0, "partial_gpus": 0.0, "jain": None, "gpu_share": dict.fromkeys(QUEUE_NAMES, 0.0)}
    series: list[tuple[float, list[float]]] = []
    partial_peak = 0
    deadlock: dict[str, Any] | None = None
    stopped_early = False

    def observe() -> None:
        """The state that holds from now until the next event."""
        partial_held = {q: [0.0, 0.0, 0.0] for q in QUEUE_NAMES}
        partial_gpus = 0.0
        for job in sched.partial.values():
            held = len(job.placement)
            partial_gpus += held * job.resources.gpus
            for d, need in enumerate(job.demand()):
                partial_held[job.queue][d] += need * held
        used_gpus = sum(sched.used[q][1] for q in QUEUE_NAMES)
        state["running_gpus"], state["partial_gpus"] = used_gpus - partial_gpus, partial_gpus
        state["gpu_share"] = {q: sched.used[q][1] / CAPACITY[1] for q in QUEUE_NAMES}
        state["jain"] = state["x"] = state["big_gang_blocked"] = None
        if all(waiting_n[q] > 0 for q in QUEUE_NAMES):  # contention: every queue has work waiting
            held = {q: dominant(sched.used[q]) for q in QUEUE_NAMES}
            demand = {
                q: min(1.0, dominant([u + w - p for u, w, p in zip(sched.used[q], waiting_demand[q], partial_held[q])]))
                for q in QUEUE_NAMES
            }
            fair = water_fill(demand, QUEUES)
            state["x"] = {q: held[q] / fair[q] for q in QUEUE_NAMES if fair[q] > 0}
            state["jain"] = jain(list(state["x"].values()))
            if policy.order == "drf":  # why the least served queue waits: its first job a gang that does not fit?
                least = min(state["x"], key=state["x"].get)
                head = sched._waiting[least][0][-1]  # the first of its line (DRF keeps a line per queue)
                free_gpus = sum(node[1] for node in sched.free)
                state["big_gang_blocked"] = head.resources.total_gpus >= 16 and head.resources.total_gpus > free_gpus
        if record_series:
            series.append((now, [state["gpu_share"][q] for q in QUEUE_NAMES]))

    def deadlocked() -> bool:
        """gang=False: no job holding part of its gang could take one more task even if every running job ended
        now; nothing they hold is ever released again."""
        if not sched.partial:
            return False
        free = [list(node) for node in sched.free]
        for job in sched.running.values():
            for index in job.placement:
                for d, need in enumerate(job.demand()):
                    free[index][d] += need
        fits = Scheduler._tasks_fitting
        return not any(fits(job.demand(), node) >= 1 for job in sched.partial.values() for node in free)

    now = first_arrival
    while heap:
        now, kind, job_id, epoch = heapq.heappop(heap)
        span = now - last_t
        if span > 0:
            busy_gpu_s += state["running_gpus"] * span
            if last_t < last_arrival:
                busy_gpu_s_arrivals += state["running_gpus"] * (min(now, last_arrival) - last_t)
            partial_gpu_s += state["partial_gpus"] * span
            for q in QUEUE_NAMES:
                share_time[q] += state["gpu_share"][q] * span
            if state["jain"] is not None:
                jain_weighted += state["jain"] * span
                contended_s += span
                deficit += (1 - state["jain"]) * span
                if state["big_gang_blocked"]:
                    deficit_big_gang += (1 - state["jain"]) * span
                for q, x in state["x"].items():
                    x_time[q] += x * span
        last_t = now
        run = runs[job_id]
        if kind == 0:
            if epoch != run.epoch:
                continue  # the run this completion belonged to was preempted
            sched.release(job_id)
            run.end, run.start = now, None
        else:
            t = run.trace
            job = Job(
                t.id, t.resources, t.queue, t.priority if use_priority else 0, t.submitted, t.estimate, t.priority <= 0
            )
            sched.submit(job)
            count_waiting(job, +1)
        events += 1
        rounds = 0
        while True:
            queued = len(sched.jobs) - len(sched.running)
            began, began_cpu = time.perf_counter(), time.thread_time()
            decision = sched.schedule(now)
            took, took_cpu = time.perf_counter() - began, time.thread_time() - began_cpu
            decision_s.append(took)
            if stress_queued is not None and queued >= stress_queued:
                timed_s.append(took)
                timed_cpu_s.append(took_cpu)
            for job in decision.started:
                started = runs[job.id]
                started.start = now
                if started.first_start is None:
                    started.first_start = now
                count_waiting(job, -1)
                heapq.heappush(heap, (now + started.remaining, 0, job.id, started.epoch))
            if not decision.preempt:
                break
            for victim in decision.preempt:
                stopped = runs[victim.id]
                elapsed = now - stopped.start
                saved = math.floor(elapsed / CHECKPOINT_S) * CHECKPOINT_S
                stopped.remaining -= saved
                stopped.lost_s += elapsed - saved
                lost_gpu_s += (elapsed - saved) * victim.resources.total_gpus
                stopped.preemptions += 1
                stopped.epoch += 1
                stopped.start = None
                preemptions += 1
                sched.requeue(victim.id)
                count_waiting(victim, +1)
            rounds += 1
            max_rounds = max(max_rounds, rounds)
            if rounds >= MAX_PREEMPTION_ROUNDS:  # a preemption livelock in the core: report it, do not hang
                livelocks += 1
                break
        for job in sched.partial.values():
            runs[job.id].was_partial = True
        partial_peak = max(partial_peak, len(sched.partial))
        observe()
        if stress_queued is not None and len(timed_s) >= stress_decisions:
            stopped_early = True
            break
        if not policy.gang and deadlocked():
            held = sum(len(j.placement) * j.resources.gpus for j in sched.partial.values())
            deadlock = {"at_h": now / 3600, "jobs": len(sched.partial), "gpus_held": held}
            stopped_early = True
            break
    if not stopped_early and (len(sched.jobs) > 0):  # nothing left to happen and jobs still wait: stuck for good
        held = sum(len(j.placement) * j.resources.gpus for j in sched.partial.values())
        deadlock = {"at_h": now / 3600, "jobs": len(sched.jobs), "gpus_held": held}

    done = [r for r in runs.values() if r.end is not None]
    jct = [r.end - r.trace.submitted for r in done]
    delay = [r.first_start - r.trace.submitted for r in done]
    makespan = (max(r.end for r in done) - first_arrival) if done and deadlock is None and not stopped_early else None
    work_gpu_s = sum(r.trace.gpus * r.trace.duration for r in runs.values())
    hours = 1 / 3600
    out: dict[str, Any] = {
        "jobs": len(trace),
        "completed_jobs": len(done),
        "utilisation": busy_gpu_s_arrivals / (CAPACITY[1] * (min(now, last_arrival) - first_arrival)),
        "utilisation_to_makespan": busy_gpu_s / (CAPACITY[1] * (now - first_arrival)) if makespan else None,
        "jct_avg_h": float(np.mean(jct)) * hours if jct else None,
        "jct_p95_h": percentile(jct, 95) * hours if jct else None,
        "queue_delay_avg_h": float(np.mean(delay)) * hours if delay else None,
        "queue_delay_p95_h": percentile(delay, 95) * hours if delay else None,
        "makespan_h": makespan * hours if makespan is not None else None,
        "jain_index": jain_weighted / contended_s if contended_s else None,
        "contended_time_fraction": contended_s / (now - first_arrival) if now > first_arrival else None,
        "held_over_fair_by_queue": {q: x_time[q] / contended_s for q in QUEUE_NAMES} if contended_s else None,
        "jain_index_of_time_averaged_shares": jain([x_time[q] / contended_s for q in QUEUE_NAMES])
        if contended_s
        else None,
        "jain_deficit_share_big_gang_blocked": deficit_big_gang / deficit
        if deficit and policy.order == "drf"
        else None,
        "avg_gpu_share_by_queue": {q: share_time[q] / (now - first_arrival) for q in QUEUE_NAMES},
        "partially_allocated_jobs": sum(r.was_partial for r in runs.values()),
        "partially_allocated_peak": partial_peak,
        "gpu_hours_held_idle_by_partial_jobs": partial_gpu_s * hours,
        "deadlocked_jobs": deadlock["jobs"] if deadlock else 0,
        "deadlock": deadlock,
        "preemptions": preemptions,
        "preempted_jobs": sum(r.preemptions > 0 for r in runs.values()),
        "lost_gpu_hours": lost_gpu_s * hours,
        "lost_work_fraction": lost_gpu_s / work_gpu_s,
        "preemption_rounds_max_per_event": max_rounds,
        "preemption_livelocks": livelocks,
        "decisions": len(decision_s),
        "decision_ms_p50": percentile(decision_s, 50) * 1e3,
        "decision_ms_p99": percentile(decision_s, 99) * 1e3,
        "events": events,
    }
    if use_priority:
        for name, test in (("high", lambda p: p > 0), ("normal", lambda p: p == 0), ("low", lambda p: p < 0)):
            cls = [r for r in done if test(r.trace.priority)]
            out[f"queue_delay_avg_h_{name}_priority"] = (
                float(np.mean([r.first_start - r.trace.submitted for r in cls])) * hours if cls else None
            )
    if stress_queued is not None:
        out["timed_ms"] = [s * 1e3 for s in timed_s]
        out["timed_cpu_ms"] = [s * 1e3 for s in timed_cpu_s]
    if record_series:
        out["series"] = series
    return out


# -- the decision time with 10,000 jobs queued ---------------------------------------------------------------------


def stress(seed: int, decisions: int, queued: int = STRESS_QUEUED) -> dict[str, Any]:
    """Time `schedule()` per event on a busy cluster with >= `queued` jobs waiting: the trace generator at 8x the
    cluster's capacity fills the queues; every decision made while that many wait is timed, until `decisions`."""
    trace = make_trace(int(1.3 * queued) + 4 * decisions + 1000, seed + 1, offered_load=STRESS_LOAD)
    policy, use_priority = CONTENDERS["drf_priority_preempt"]
    gc.collect()
    gc.freeze()  # as long-running services do: full collections skip the trace's objects
    try:
        result = simulate(trace, policy, use_priority, stress_queued=queued, stress_decisions=decisions)
    finally:
        gc.unfreeze()
    timed = result["timed_ms"]
    return {
        "contender": "drf_priority_preempt (the most work per decision: DRF order, preemption search, backfill)",
        "decisions_timed": len(timed),
        "decision_ms_p50": percentile(timed, 50),
        "decision_ms_p99": percentile(timed, 99),
        "decision_ms_max": max(timed) if timed else None,
        "decision_cpu_ms_p50": percentile(result["timed_cpu_ms"], 50),
        "decision_cpu_ms_p99": percentile(result["timed_cpu_ms"], 99),
        "queued_when_timed": f">= {queued}",
    }


# -- the plot ------------------------------------------------------------------------------------------------------


def plot(series: dict[str, list[tuple[float, list[float]]]], path: Path, until_s: float, bin_s: float = 1800.0) -> None:
    """Each queue's share of the GPUs over time (time-weighted 30-min bins) while the trace submits jobs and a little
    after, one panel per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(11, 3.2 * len(series)), sharex=True, squeeze=False)
    for ax, (name, points) in zip(axes[:, 0], series.items()):
        end = points[-1][0]
        edges = np.arange(0.0, end + bin_s, bin_s)
        binned = np.zeros((len(edges) - 1, len(QUEUE_NAMES)))
        for (t0, shares), (t1, _) in itertools.pairwise(points):
            a = t0
            while a < t1:
                k = int(a // bin_s)
                b = min(t1, (k + 1) * bin_s)
                if k < len(binned):
                    binned[k] += np.array(shares) * (b - a) / bin_s
                a = b
        hours = edges[:-1] / 3600
        ax.stackplot(hours, binned.T, labels=[f"{q} (weight {QUEUES[q]:g})" for q in QUEUE_NAMES], alpha=0.85)
        cumulative = 0.0
        for q in QUEUE_NAMES:
            cumulative += WEIGHT_FRACTION[q]
            ax.axhline(cumulative, color="black", linewidth=0.6, linestyle="--")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of 256 GPUs")
        ax.set_title(f"{name}: GPU share per queue (dashed: nominal shares 3:2:1)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    for ax in axes[:, 0]:
        ax.axvline(until_s / 3600, color="grey", linewidth=1, linestyle=":")
    axes[-1, 0].set_xlim(0, 1.1 * until_s / 3600)
    axes[-1, 0].set_xlabel("hours since the first submission (dotted: the last submission)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"end within 60 s on 2 cores: a trace of {QUICK_JOBS} jobs instead of {FULL_JOBS}, and "
        f"{STRESS_DECISIONS['quick']} decisions timed at >= {STRESS_QUEUED} queued instead of "
        f"{STRESS_DECISIONS['full']}",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--plot", action="store_true", help="write scheduling_shares.png next to the JSON")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for the JSON and plot ({DEFAULT_OUT})")
    parser.add_argument(
        "--jobs", type=int, default=None, help=f"jobs in the trace (default {FULL_JOBS}, quick {QUICK_JOBS})"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if abs(value) < 10 else round(value, 1)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def compare(trace: list[TraceJob], series_of: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every contender on `trace`: its figures, and the queue shares over time of those in `series_of`."""
    results: dict[str, Any] = {}
    series: dict[str, Any] = {}
    for name, (policy, use_priority) in CONTENDERS.items():
        began = time.perf_counter()
        result = simulate(trace, policy, use_priority, record_series=name in series_of)
        if "series" in result:
            series[name] = result.pop("series")
        result["simulated_in_s"] = time.perf_counter() - began
        results[name] = rounded(result)
        log(
            f"{name}: {result['completed_jobs']}/{result['jobs']} done, utilisation {result['utilisation']:.3f}, "
            f"avg JCT {result['jct_avg_h'] or 0:.2f} h, Jain {result['jain_index'] or float('nan'):.3f}, deadlocked "
            f"{result['deadlocked_jobs']}, partial {result['partially_allocated_jobs']}, preemptions "
            f"{result['preemptions']}, decision p99 {result['decision_ms_p99']:.3f} ms, in "
            f"{result['simulated_in_s']:.1f} s"
        )
    return results, series


def summarize(results: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """The contract: headline results next to each contender's, ratios, targets and whether each is met."""
    results = dict(results)
    results["gang_deadlocked_jobs"] = sum(results[n]["deadlocked_jobs"] for n in GANG_CONTENDERS)
    results["nogang_deadlocked_jobs"] = results["fifo_nogang"]["deadlocked_jobs"]
    results["nogang_partially_allocated_jobs"] = results["fifo_nogang"]["partially_allocated_jobs"]
    for name in CONTENDERS:
        key = "drf_jain_index" if name == "drf_gang" else f"{name}_jain_index"
        results[key] = results[name]["jain_index"]
    results["decision_ms_p99_at_10k_queued"] = rounded(timing["decision_ms_p99"])
    results["decision_ms_p50_at_10k_queued"] = rounded(timing["decision_ms_p50"])
    results["decisions_timed_at_10k_queued"] = timing["decisions_timed"]
    results["decision_timing"] = rounded(timing)
    fifo, drf, pre = results["fifo_gang"], results["drf_gang"], results["drf_priority_preempt"]
    ratios = {
        "drf_vs_fifo_gang_avg_jct": drf["jct_avg_h"] / fifo["jct_avg_h"],
        "drf_vs_fifo_gang_utilisation": drf["utilisation"] / fifo["utilisation"],
        "drf_vs_fifo_gang_p95_jct": drf["jct_p95_h"] / fifo["jct_p95_h"],
        "drf_vs_fifo_gang_avg_queue_delay": drf["queue_delay_avg_h"] / fifo["queue_delay_avg_h"],
        "drf_preempt_vs_fifo_gang_avg_jct": pre["jct_avg_h"] / fifo["jct_avg_h"],
        "drf_preempt_vs_fifo_gang_utilisation": pre["utilisation"] / fifo["utilisation"],
    }
    met: dict[str, bool] = {}
    for name, target in TARGETS.items():
        value = results[name]
        met[name] = value is not None and (value >= target["min"] if "min" in target else value <= target["max"])
        bound = f">= {target['min']:g}" if "min" in target else f"<= {target['max']:g}"
        log(f"{name}: {value} (target {bound}: {'met' if met[name] else 'MISSED'})")
    for name, value in ratios.items():
        log(f"{name}: {value:.3f}")
    return {
        "benchmark": "scheduling",
        "results": results,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "targets_met": met,
    }


def config(args: argparse.Namespace, shape: dict[str, Any], decisions: int) -> dict[str, Any]:
    quick_note = f"quick run: {shape['jobs']} jobs instead of {FULL_JOBS}, the same model; " if args.quick else ""
    return {
        "quick": args.quick,
        "seed": args.seed,
        "cluster": f"{N_NODES} nodes x ({NODE_GPUS} GPUs, {NODE_CPUS} cpu slots, {NODE_MEM_GB} GiB) = "
        f"{CAPACITY[1]} GPUs",
        "queues": {q: f"weight {w:g} (nominal share {WEIGHT_FRACTION[q]:.3f})" for q, w in QUEUES.items()},
        "trace": shape,
        "trace_model": (
            f"seeded numpy trace shaped like Philly/Helios ({quick_note}{1 - CPU_ONLY_P:.0%} GPU jobs of "
            + "/".join(f"{g}" for g in GPU_SIZES)
            + " GPUs with probabilities "
            + "/".join(f"{p:g}" for p in GPU_P)
            + f"; 1-8 GPUs are one task on one node, 16-64 a gang of 8-GPU tasks (one per node) or of 1-GPU tasks "
            f"(one per GPU), half each; per task {CPUS_PER_GPU} cpu slots and {MEM_GB_PER_GPU} GiB per GPU; "
            f"{CPU_ONLY_P:.0%} cpu-only jobs (2-16 cpu slots, 4 GiB each, 1-8 tasks); durations log-normal "
            f"(median {DURATION_MEDIAN_S / 60:g} min, sigma {DURATION_SIGMA:g}) clamped to "
            f"[{DURATION_MIN_S:g} s, {DURATION_CAP_S / 86400:g} days]; submissions per queue "
            f"{QUEUE_EVENT_P}, each a sweep of {SWEEP_SIZE[0]}-{SWEEP_SIZE[1]} same-shaped jobs (<= 8 GPUs, "
            f"durations x lognormal(0, 0.3), 0-60 s apart) with probability {SWEEP_P}; submission instants Poisson "
            f"with intensity 1 + {DIURNAL_AMPLITUDE:g} sin(2 pi t / 1 day) over a span chosen so the offered GPU "
            f"load is {OFFERED_LOAD:g}; priorities high/normal/low (100/0/-100) with p "
            f"{list(PRIORITY_P.values())}, high not preemptible; estimates: none for {UNKNOWN_ESTIMATE_P:.0%}, "
            f"else duration x log-uniform(1, 4) rounded up to a limit of "
            f"{'/'.join(f'{h:g}' for h in TIME_LIMITS_H)} h)"
        ),
        "contenders": {
            "fifo_nogang": "Policy(order=fifo, gang=False, preemption=False): one line in submission order; every "
            "waiting job takes whatever tasks fit and holds them until it has all (pod-by-pod); the contender would "
            "stop at the first deadlock",
            "fifo_gang": "Policy(order=fifo, gang=True, preemption=False, backfill=True): one line in submission "
            "order, all-or-nothing gangs, EASY backfill (lookahead 32); priorities ignored",
            "drf_gang": "Policy(order=drf, gang=True, preemption=False, backfill=True): weighted DRF across the 3 "
            "queues, age inside one, EASY backfill (lookahead 32 per queue); every job at normal priority",
            "drf_priority_preempt": "Policy(order=drf, gang=True, preemption=True, backfill=True): drf_gang with "
            "the trace's priorities (priority then age orders a queue; the first blocked job of a pass preempts "
            "lower priorities of its own queue, and reclaims from queues above their nominal share, never taking "
            "one below it, while its own stays within its nominal share; victims: the fewest of the lowest "
            "priority, the most recently started first)",
        },
        "simulator": "events: arrivals and completions (completions first at equal times); after each, one "
        "Scheduler.schedule(now); a started job ends at now + its remaining work; preempted jobs stop at once, keep "
        f"the work up to their last checkpoint (every {CHECKPOINT_S / 60:g} min of a run), lose the rest (re-run it) "
        "and are requeued at their original age, then schedule(now) again until nothing more is preempted "
        f"(>= {MAX_PREEMPTION_ROUNDS} rounds at one instant would count as a livelock)",
        "utilisation": "GPU-seconds allocated to running jobs (work later lost included; GPUs held by partial "
        "gangs excluded) / (256 x the time from the first to the last submission, while the trace offers load); "
        "utilisation_to_makespan: the same up to the last completion (the drain of the heavy tail included)",
        "jct_and_delay": "over completed jobs, hours: JCT = completion - submission, queueing delay = first start - "
        "submission",
        "jain_index": "time-weighted mean over the instants when every queue has a job waiting (the state between "
        "events): Jain's index (sum x)^2 / (n sum x^2) of x_q = held_q / fair_q, held_q the queue's dominant share "
        "of the pool (max over cpu slots, GPUs, memory of its allocation / capacity), fair_q its weighted max-min "
        "fair share (water-filling, weights 3:2:1) given its demand = held_q + the requests of all its waiting "
        "jobs, capped at the whole pool. contended_time_fraction: the part of the run those instants cover; "
        "held_over_fair_by_queue: each x_q averaged over them; jain_index_of_time_averaged_shares: Jain's index "
        "of those averages (informational, long-run fairness); jain_deficit_share_big_gang_blocked (DRF): the "
        "share of the integral of (1 - index) during which the least-served queue's first waiting job is a gang "
        "of >= 16 GPUs that does not fit in the free GPUs",
        "deadlock": "gang=False: deadlocked when no job holding part of its gang could take one more task even if "
        "every running job ended (what they hold is never released again): the contender stops there, "
        "deadlocked_jobs = the jobs holding partial allocations, makespan null; any policy: jobs still waiting "
        "when no event is left count as deadlocked",
        "partially_allocated": "partially_allocated_jobs: jobs that ever held part of their gang while waiting; "
        "partially_allocated_peak: most at once; gpu_hours_held_idle_by_partial_jobs: GPU-time so held",
        "preemption": f"work lost = time since the victim's last checkpoint (every {CHECKPOINT_S / 60:g} min of its "
        "run), lost_gpu_hours = that x its GPUs, lost_work_fraction = / the trace's GPU-hours; the victim re-runs it",
        "decision_ms": "time.perf_counter around each Scheduler.schedule(now), one per event (plus one per "
        f"preemption round); _at_10k_queued: a separate run of drf_priority_preempt on the same trace model "
        f"offered at {STRESS_LOAD:g}x capacity (seed + 1), timing only the decisions made while >= "
        f"{STRESS_QUEUED} jobs wait, {decisions} of them, after gc.freeze() (as long-running services do: full "
        f"collections skip the trace's objects); decision_cpu_ms_*: time.thread_time of the same calls (this "
        f"process's CPU, less sensitive to other load); {os.cpu_count()} cpus, shared",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    n_jobs = args.jobs or (QUICK_JOBS if args.quick else FULL_JOBS)
    trace = make_trace(n_jobs, args.seed)
    shape = describe_trace(trace)
    mode = "quick" if args.quick else "full"
    log(f"{mode} run: {shape['jobs']} jobs over {shape['arrival_span_h']} h, load {load()}")
    results, series = compare(trace, PLOTTED if args.plot else ())
    decisions = STRESS_DECISIONS[mode]
    timing = stress(args.seed, decisions)
    log(f"decisions at >= {STRESS_QUEUED} queued: {rounded(timing)}")
    report = summarize(results, timing)
    report["results"]["config"] = config(args, shape, decisions)
    report["results"]["load_average_1m_5m"] = load()
    report["results"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        path = args.out / "scheduling_shares.png"
        plot(series, path, until_s=trace[-1].submitted - trace[0].submitted)
        log(f"plot written to {path}")
    log(f"done in {report['results']['wall_seconds']}s")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    line = json.dumps(report)
    (args.out / "scheduling.json").write_text(line + "\n")
    print(line)
    if args.check and not all(report["targets_met"].values()):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
