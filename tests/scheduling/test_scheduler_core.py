"""The pure scheduling core (`distml.scheduling.core`) without processes: gangs start whole or not at all, weighted
DRF holds the weights under contention, borrowed capacity is reclaimed by preemption, priority preemption stops the
fewest lowest-priority jobs, a job that can never fit is refused, EASY backfill, and the benchmark's contract."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from distml.core.errors import DistmlError
from distml.scheduling.core import Job, Node, Policy, Resources, Scheduler

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "scheduling.py"


def gpu_nodes(count: int, gpus: int) -> list[Node]:
    return [Node(f"n{i}", cpus=64, gpus=gpus, memory_gb=512) for i in range(count)]


def gpu_job(name: str, gpus: int, workers: int = 1, **fields) -> Job:
    """A gang of `workers` tasks of `gpus` GPUs each (1 cpu slot per task, no memory)."""
    return Job(name, Resources(cpus=1, gpus=gpus, workers=workers), **fields)


def settle(sched: Scheduler, now: float) -> tuple[list[str], list[str]]:
    """What a simulator does at one instant: schedule, stop every preempted job at once and requeue it, schedule
    again until nothing more is preempted. Returns the ids started and preempted."""
    started: list[str] = []
    preempted: list[str] = []
    for _ in range(100):
        decision = sched.schedule(now)
        started += [j.id for j in decision.started]
        if not decision.preempt:
            return started, preempted
        for victim in decision.preempt:
            preempted.append(victim.id)
            started = [s for s in started if s != victim.id]
            sched.requeue(victim.id)
    raise AssertionError("the core kept preempting at one instant")


def gpus_by_queue(sched: Scheduler) -> dict[str, int]:
    return {q: round(used[1]) for q, used in sched.used.items()}


# -- gangs ---------------------------------------------------------------------------------------------------------


def test_a_gang_starts_whole_or_not_at_all():
    sched = Scheduler(gpu_nodes(2, 4), {"default": 1.0})
    sched.submit(gpu_job("holder", 1, workers=5))  # 4 GPUs on one node, 1 on the other
    assert [j.id for j in sched.schedule(0).started] == ["holder"]
    sched.submit(gpu_job("gang", 1, workers=4))  # 3 GPUs are free: not enough for all 4 tasks
    assert sched.schedule(1).started == []
    gang = sched.jobs["gang"]
    assert gang.placement == [] and not gang.running and sched.partial == {}
    assert gpus_by_queue(sched) == {"default": 5}  # nothing held for the waiting gang
    assert "gang of 4" in sched.explain("gang")
    sched.release("holder")
    assert [j.id for j in sched.schedule(2).started] == ["gang"]
    assert len(gang.placement) == 4 and gpus_by_queue(sched) == {"default": 4}


def test_two_gangs_that_do_not_fit_together_run_one_after_the_other():
    sched = Scheduler(gpu_nodes(2, 4), {"default": 1.0})
    sched.submit(gpu_job("first", 1, workers=6, submitted=0))
    sched.submit(gpu_job("second", 1, workers=6, submitted=1))
    assert [j.id for j in sched.schedule(0).started] == ["first"]
    assert sched.schedule(1).started == [] and list(sched.running) == ["first"]
    assert sched.jobs["second"].placement == []
    sched.release("first")
    assert [j.id for j in sched.schedule(2).started] == ["second"]
    assert list(sched.running) == ["second"]


def deadlock_input(sched: Scheduler) -> None:
    """Two nodes of 4 GPUs: a 1-GPU job runs on one; a gang of two 4-GPU tasks (one per node) and a gang of five
    1-GPU tasks wait behind it."""
    sched.submit(gpu_job("small", 1, submitted=0))
    sched.submit(gpu_job("per-node", 4, workers=2, submitted=1))
    sched.submit(gpu_job("per-gpu", 1, workers=5, submitted=2))


def test_task_by_task_placement_deadlocks_where_gangs_do_not():
    # gang=False: each job takes the tasks that fit and holds them; once "small" ends, each gang holds one node and
    # waits for what the other holds, and nothing runs that could ever free anything.
    tasks = Scheduler(gpu_nodes(2, 4), {"default": 1.0}, Policy(order="fifo", gang=False, preemption=False))
    deadlock_input(tasks)
    assert [j.id for j in tasks.schedule(0).started] == ["small"]
    assert sorted(tasks.partial) == ["per-gpu", "per-node"]
    tasks.release("small")
    assert tasks.schedule(1).started == []
    assert tasks.running == {} and sorted(tasks.partial) == ["per-gpu", "per-node"]
    assert sum(node[1] for node in tasks.free) == 0  # every GPU held, none used
    assert tasks.explain("per-node") == "holds 1 of 2 tasks"
    assert tasks.explain("per-gpu") == "holds 4 of 5 tasks"

    # The same input with gangs: every job runs, one after the other.
    gangs = Scheduler(gpu_nodes(2, 4), {"default": 1.0}, Policy(order="fifo", gang=True, preemption=False))
    deadlock_input(gangs)
    ran = []
    for now in range(10):
        ran += [j.id for j in gangs.schedule(now).started]
        assert gangs.partial == {}
        if not gangs.running:
            break
        gangs.release(next(iter(gangs.running)))
    assert ran == ["small", "per-node", "per-gpu"] and gangs.jobs == {}


# -- fair shares ---------------------------------------------------------------------------------------------------


def test_weighted_drf_shares_converge_to_the_weights_under_contention():
    # 24 GPUs, weights 3:2:1. The light queue submits first: in arrival order it would take everything.
    sched = Scheduler(gpu_nodes(6, 4), {"heavy": 3.0, "middle": 2.0, "light": 1.0})
    order = ("light", "middle", "heavy")
    for rank, queue in enumerate(order):
        for i in range(60):
            sched.submit(gpu_job(f"{queue}-{i}", 1, queue=queue, submitted=rank * 100 + i))
    sched.schedule(0)
    for now in range(1, 61):  # churn: the oldest running job ends, the freed GPU is given again
        oldest = min(sched.running.values(), key=lambda j: (j.started, j.id))
        sched.release(oldest.id)
        sched.schedule(now)
        assert gpus_by_queue(sched) == {"heavy": 12, "middle": 8, "light": 4}, f"at {now}"
        assert sched.shares() == pytest.approx({"heavy": 1.0, "middle": 1.0, "light": 1.0})

    fifo = Scheduler(gpu_nodes(6, 4), {"heavy": 3.0, "middle": 2.0, "light": 1.0}, Policy(order="fifo"))
    for rank, queue in enumerate(order):
        for i in range(60):
            fifo.submit(gpu_job(f"{queue}-{i}", 1, queue=queue, submitted=rank * 100 + i))
    fifo.schedule(0)
    assert gpus_by_queue(fifo) == {"heavy": 0, "middle": 0, "light": 24}  # what DRF corrects


def test_idle_capacity_is_borrowed_and_reclaimed_by_preemption_when_its_owner_needs_it():
    queues = {"owner": 1.0, "borrower": 1.0}
    sched = Scheduler(gpu_nodes(2, 4), queues)
    for i in range(8):
        sched.submit(gpu_job(f"b{i}", 1, queue="borrower", submitted=i))
        settle(sched, i)
    assert gpus_by_queue(sched) == {"owner": 0, "borrower": 8}  # borrows the owner's idle half
    assert sched.shares()["borrower"] == pytest.approx(2.0)
    for i in range(4):
        sched.submit(gpu_job(f"o{i}", 1, queue="owner", submitted=10 + i))
    started, preempted = settle(sched, 10)
    assert sorted(started) == ["o0", "o1", "o2", "o3"]
    assert sorted(preempted) == ["b4", "b5", "b6", "b7"]  # exactly what the owner needs, the latest started first
    assert gpus_by_queue(sched) == {"owner": 4, "borrower": 4}
    assert sched.shares() == pytest.approx({"owner": 1.0, "borrower": 1.0})
    # Within its nominal share nothing more is taken from the borrower.
    sched.submit(gpu_job("o4", 1, queue="owner", submitted=20))
    assert settle(sched, 20) == ([], [])
    assert "o4" not in sched.running

    # A queue does not preempt to grow beyond its own nominal share, even from one that borrows.
    three = Scheduler(gpu_nodes(3, 2), {"a": 1.0, "b": 1.0, "c": 1.0})  # 2 GPUs each; c is idle
    for i in range(4):
        three.submit(gpu_job(f"b{i}", 1, queue="b", submitted=i))
        settle(three, i)
    for i in range(2):
        three.submit(gpu_job(f"a{i}", 1, queue="a", submitted=10 + i))
    settle(three, 10)
    assert gpus_by_queue(three) == {"a": 2, "b": 4, "c": 0}
    three.submit(gpu_job("a2", 1, queue="a", submitted=20))
    assert settle(three, 20) == ([], [])  # a would hold 3 of 6 GPUs, more than its third

    # Without preemption the owner waits for the borrower's jobs to end.
    patient = Scheduler(gpu_nodes(2, 4), queues, Policy(preemption=False))
    for i in range(8):
        patient.submit(gpu_job(f"b{i}", 1, queue="borrower", submitted=i))
    patient.schedule(0)
    patient.submit(gpu_job("o0", 1, queue="owner", submitted=10))
    assert settle(patient, 10) == ([], [])


def test_reclaim_leaves_the_borrowing_queue_its_nominal_share_and_does_not_thrash():
    # 8 GPUs, two queues of 4 nominal GPUs. The borrower holds 5: a 1-GPU job and, started last, a 4-GPU gang.
    sched = Scheduler(gpu_nodes(2, 4), {"owner": 1.0, "borrower": 1.0})
    for at, (name, queue, workers) in enumerate(
        [
            ("o1", "owner", 1),
            ("o2", "owner", 1),
            ("o3", "owner", 1),
            ("b-small", "borrower", 1),
            ("b-gang", "borrower", 4),
        ],
        start=1,
    ):
        sched.submit(gpu_job(name, 1, workers=workers, queue=queue, submitted=at))
        assert settle(sched, at) == ([name], [])
    assert gpus_by_queue(sched) == {"owner": 3, "borrower": 5}
    sched.submit(gpu_job("o4", 1, queue="owner", submitted=10))
    # Stopping the gang would leave the borrower 1 GPU: below the owner, its line would come first and start the
    # gang again, to be preempted again. The 1-GPU job is enough and leaves it its nominal 4.
    assert settle(sched, 10) == (["o4"], ["b-small"])
    assert gpus_by_queue(sched) == {"owner": 4, "borrower": 4}


def running_on_one_node(jobs: list[tuple[str, int, int]]) -> Scheduler:
    """One queue, one node of 8 GPUs, each (name, gpus, priority) started in turn at time 1, 2, ..."""
    sched = Scheduler(gpu_nodes(1, 8), {"default": 1.0})
    for at, (name, gpus, priority) in enumerate(jobs, start=1):
        sched.submit(gpu_job(name, gpus, priority=priority, submitted=at))
        assert [j.id for j in sched.schedule(at).started] == [name]
    return sched


def test_priority_preemption_stops_the_fewest_lowest_priority_jobs_and_no_more():
    # Two of the three low-priority jobs make room: the two started last; nothing of normal priority.
    sched = running_on_one_node([("low-a", 2, -100), ("normal", 2, 0), ("low-b", 2, -100), ("low-c", 2, -100)])
    sched.submit(gpu_job("urgent", 4, priority=100, submitted=10))
    decision = sched.schedule(10)
    assert sorted(j.id for j in decision.preempt) == ["low-b", "low-c"]
    assert all(j.preempting for j in decision.preempt) and decision.started == []
    assert sched.explain("urgent") == "preempting low-c, low-b"
    assert sched.explain("low-b") == "preempted: stopping to give its resources back"
    assert sched.jobs["low-b"].reason == "preempted for urgent (priority 100, queue default)"
    assert sched.schedule(10).preempt == []  # it waits for those two to stop, it does not take more
    for victim in decision.preempt:
        sched.requeue(victim.id)
    assert [j.id for j in sched.schedule(10).started] == ["urgent"]

    # One larger low-priority job is stopped rather than two smaller ones started later.
    sched = running_on_one_node([("low-big", 4, -100), ("low-1", 2, -100), ("low-2", 2, -100)])
    sched.submit(gpu_job("urgent", 4, priority=100, submitted=10))
    assert [j.id for j in sched.schedule(10).preempt] == ["low-big"]

    # A victim the others make unnecessary is not stopped: low-x and low-y (the lowest priority) cannot make room on
    # one node; with normal-z, low-x and normal-z do, and low-y is spared.
    sched = Scheduler(gpu_nodes(2, 4), {"default": 1.0})
    for at, (name, gpus, priority) in enumerate(
        [("normal-n", 2, 0), ("low-y", 2, -100), ("low-x", 3, -100), ("normal-z", 1, 0)], start=1
    ):
        sched.submit(gpu_job(name, gpus, priority=priority, submitted=at))
        sched.schedule(at)
    assert {j.id: j.placement for j in sched.running.values()} == {
        "normal-n": [0],
        "low-y": [0],
        "low-x": [1],
        "normal-z": [1],
    }
    sched.submit(gpu_job("urgent", 4, priority=100, submitted=10))
    assert sorted(j.id for j in sched.schedule(10).preempt) == ["low-x", "normal-z"]

    # Lower priority first, even where one job of a higher priority would be fewer.
    sched = running_on_one_node([("normal-big", 4, 0), ("low-1", 2, -100), ("low-2", 2, -100)])
    sched.submit(gpu_job("urgent", 4, priority=100, submitted=10))
    assert sorted(j.id for j in sched.schedule(10).preempt) == ["low-1", "low-2"]

    # A job of the same priority is never preempted, nor one that is not preemptible.
    sched = running_on_one_node([("peer", 8, 100)])
    sched.submit(gpu_job("urgent", 4, priority=100, submitted=10))
    assert sched.schedule(10).preempt == []
    sched = Scheduler(gpu_nodes(1, 8), {"default": 1.0})
    sched.submit(gpu_job("serving", 8, priority=-100, preemptible=False))
    sched.schedule(0)
    sched.submit(gpu_job("urgent", 4, priority=100, submitted=10))
    assert sched.schedule(10).preempt == []


def test_a_job_that_can_never_fit_is_refused_with_a_clear_error():
    sched = Scheduler(gpu_nodes(2, 8), {"default": 1.0})
    with pytest.raises(DistmlError, match=r"job too-wide asks for gang of 3 x 1 cpu \+ 8 gpu.*can never hold it"):
        sched.submit(gpu_job("too-wide", 8, workers=3))
    with pytest.raises(DistmlError, match=r"job too-tall asks for 1 cpu \+ 16 gpu.*2 node\(s\).*16 gpus"):
        sched.submit(gpu_job("too-tall", 16))  # 16 GPUs in all, but no node has them in one task
    with pytest.raises(DistmlError, match="unknown queue 'nope'"):
        sched.submit(gpu_job("lost", 1, queue="nope"))
    assert sched.jobs == {}
    sched.submit(gpu_job("fits", 8, workers=2))  # the largest gang the pool holds is accepted
    assert [j.id for j in sched.schedule(0).started] == ["fits"]


# -- backfill ------------------------------------------------------------------------------------------------------


def test_backfill_runs_a_short_job_ahead_of_a_blocked_one_but_nothing_that_would_delay_it():
    sched = Scheduler(gpu_nodes(1, 8), {"default": 1.0})
    sched.submit(gpu_job("running", 6, estimate=100, submitted=0))
    sched.schedule(0)
    sched.submit(gpu_job("big", 8, submitted=1))  # can start when "running" ends, at 100
    sched.submit(gpu_job("unknown", 2, submitted=2))  # no estimate: may run past 100
    sched.submit(gpu_job("long", 2, estimate=500, submitted=3))  # would still run at 100
    sched.submit(gpu_job("short", 2, estimate=50, submitted=4))  # ends at 60, before 100
    assert [j.id for j in sched.schedule(10).started] == ["short"]
    for name in ("unknown", "long"):
        assert not sched.jobs[name].running
        assert sched.explain(name) == "backfill would delay big"
    sched.release("short")
    assert sched.schedule(60).started == []  # the 2 GPUs are free, but "big" needs them at 100
    sched.release("running")
    assert [j.id for j in sched.schedule(100).started] == ["big"]

    # Without backfill the short job waits behind the blocked one as well.
    strict = Scheduler(gpu_nodes(1, 8), {"default": 1.0}, Policy(backfill=False))
    strict.submit(gpu_job("running", 6, estimate=100, submitted=0))
    strict.schedule(0)
    strict.submit(gpu_job("big", 8, submitted=1))
    strict.submit(gpu_job("short", 2, estimate=50, submitted=4))
    assert strict.schedule(10).started == []


def test_backfill_protects_a_blocked_gang_whose_start_is_unknown():
    # The blocked job waits for a job that gave no estimate: its start is unknown, so a job with an estimate does
    # not "end before it" and may only use what the blocked job will not need.
    sched = Scheduler(gpu_nodes(2, 4), {"default": 1.0})
    sched.submit(gpu_job("open-ended", 4, submitted=0))  # node 0, no estimate
    sched.submit(gpu_job("short", 2, estimate=10, submitted=1))  # node 1
    sched.schedule(0)
    sched.submit(gpu_job("big", 4, workers=2, submitted=2))  # needs both whole nodes
    sched.submit(gpu_job("next", 2, estimate=50, submitted=3))
    sched.release("short")
    assert sched.schedule(10).started == []  # node 1 stays free for "big"
    assert sched.explain("next") == "backfill would delay big"
    sched.release("open-ended")
    assert [j.id for j in sched.schedule(20).started] == ["big"]


# -- the benchmark's contract --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scheduling_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_benchmark_reports_its_contract_on_a_small_trace(bench):
    trace = bench.make_trace(300, seed=1, offered_load=2.0)  # contended: every queue waits at times
    assert len(trace) == 300 and trace == bench.make_trace(300, seed=1, offered_load=2.0)  # seeded
    results, series = bench.compare(trace, series_of=("drf_gang",))
    timing = bench.stress(seed=1, decisions=20, queued=200)
    report = bench.summarize(results, timing)
    assert report["benchmark"] == "scheduling"
    res = report["results"]
    for key in ("gang_deadlocked_jobs", "drf_jain_index", "decision_ms_p99_at_10k_queued"):
        assert key in res and key in report["targets"] and key in report["targets_met"]
    assert set(report["ratios"]) >= {"drf_vs_fifo_gang_avg_jct", "drf_vs_fifo_gang_utilisation"}
    assert res["gang_deadlocked_jobs"] == 0
    assert res["nogang_partially_allocated_jobs"] > 0  # the baseline holds parts of gangs; gangs never do
    for name in bench.GANG_CONTENDERS:
        assert res[name]["deadlocked_jobs"] == 0 and res[name]["completed_jobs"] == 300
        assert res[name]["partially_allocated_jobs"] == 0 and res[name]["makespan_h"] > 0
    assert res["drf_priority_preempt"]["preemption_livelocks"] == 0
    assert 0 < res["drf_gang"]["utilisation"] <= 1 and 0 < res["drf_jain_index"] <= 1
    assert timing["decisions_timed"] >= 20  # the last event may add a preemption round
    assert list(series) == ["drf_gang"] and series["drf_gang"]
