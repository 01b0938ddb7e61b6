"""The orchestrator: runs a pipeline's DAG to the end, durably, one process per step.

One loop in one thread: it starts every step whose inputs are ready (after its condition, a
memo lookup and gang admission through `distml.scheduling.admission`), waits on the step processes'
pipes, and applies the step's policy to failures (retries with exponential backoff, timeouts,
fail-fast or continue). Every state change is written to the metadata store first, so a run
killed with `kill -9` resumes (`resume_run`) with its finished steps' outputs; steps that were
running are adopted when their process still runs and re-run when it is gone. An asynchronous
fan-in (`best_of`) re-triggers its downstream whenever a better input arrives.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

from distml.core.db import StoreUnavailable
from distml.core.errors import DistmlError
from distml.core.layout import workflow_dir
from distml.core.liveness import pid_alive, process_identity
from distml.lineage import record as lineage
from distml.scheduling.admission import Lease, LocalPool, SharedPool
from distml.workflow import memo, store
from distml.workflow.codehash import SourceDigests
from distml.workflow.dag import Node, build, substitute
from distml.workflow.executor import StepContext, StepProcesses, Task, stop_group, using_context
from distml.workflow.target import Target, load_target
from distml.workflow.values import artifacts_in, canonical, decode, fingerprint
from distml.workspace import Workspace

FINAL_OK = ("succeeded", "cached", "skipped")
FINAL_BAD = ("failed", "upstream_failed", "cancelled")
TERMINATE_GRACE_S = 10.0
ADOPT_POLL_S = 0.5
POLL_QUEUED_S = 0.25  # queued steps ask the scheduler again this often (others may have freed room)
# A step's timeout counts from when its function begins; its process gets this long on top to get there.
START_GRACE_S = 60.0
SPARES = 2  # step processes forked ahead of their steps, at most


@dataclass
class RunOptions:
    refresh: bool | frozenset[str] = False  # True: every step; a set: those step names
    fail_fast: bool = True
    cpus: float | None = None  # at most this many cpu slots for this run's steps at once
    queue: str = "default"  # the scheduler queue its steps wait in
    priority: str = "normal"
    # modules the step processes' forkserver imports once (when this process first starts it), e.g.
    # torch for a long-lived caller whose steps all need it: each step then starts in milliseconds
    preload: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        refresh = self.refresh if isinstance(self.refresh, bool) else sorted(self.refresh)
        return {
            "refresh": refresh,
            "fail_fast": self.fail_fast,
            "cpus": self.cpus,
            "queue": self.queue,
            "priority": self.priority,
            "preload": list(self.preload),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunOptions:
        refresh = data.get("refresh", False)
        return cls(
            refresh if isinstance(refresh, bool) else frozenset(refresh),
            data.get("fail_fast", True),
            data.get("cpus"),
            data.get("queue", "default"),
            data.get("priority", "normal"),
            tuple(data.get("preload", ())),
        )


@dataclass
class NodeState:
    node: Node
    status: str = "waiting"  # + queued, running, retrying and the final states
    value: Any = None  # the stored (JSON) result
    has_result: bool = False
    final: bool = False
    consumed: str | None = None  # fingerprint of the inputs of the latest execution
    generation: int = 0  # executions started so far in this run
    attempt: int = 0
    execution_id: int | None = None
    process: Any = None
    conn: Any = None
    pid: int | None = None
    adopted: bool = False  # running in a process this orchestrator did not start (resume)
    lease: Lease | None = None
    cap_lease: Lease | None = None
    started: float | None = None  # wall clock
    ended: float | None = None
    deadline: float | None = None  # monotonic
    began: bool = False  # its process has begun the step's function (the timeout counts from then)
    retry_at: float | None = None  # monotonic
    error: str | None = None
    cache: str | None = None
    cache_reason: str | None = None
    progress: tuple[float, float | None, str] | None = None
    history: list[str] = field(default_factory=list)
    decided: str | None = None  # inputs fingerprint the condition and memo lookup were decided for
    memo_parts: dict[str, Any] | None = None
    memo_key: str | None = None
    inputs_seen: tuple | None = None  # upstream (generation, has_result) the cached inputs were resolved for
    inputs: tuple = ()  # (args, kwargs, fingerprint) as stored values


@dataclass
class RunResult:
    run_id: str
    status: str
    states: dict[str, NodeState]
    result: Any

    def value(self, node_id: str) -> Any:
        return self.states[node_id].value


def new_run_id(name: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{name[:40]}-{stamp}-{secrets.token_hex(2)}"


def _type_names(classes: tuple[type, ...]) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in classes}


class Orchestrator:
    def __init__(
        self,
        workspace: Workspace,
        target: Target,
        params: dict[str, Any],
        run_id: str,
        options: RunOptions,
        on_change: Callable[[Orchestrator], None] | None = None,
    ):
        self.ws = workspace
        self.engine = workspace.engine
        self.target = target
        self.params = params
        self.run_id = run_id
        self.options = options
        self.on_change = on_change
        try:
            self.graph, self.returned = build(target.function, params)
        except DistmlError:
            raise
        except Exception as exc:  # the user's pipeline function itself raised
            raise DistmlError(f"building pipeline {target.spec} failed: {type(exc).__name__}: {exc}") from exc
        self._check_importable()
        self.states = {node_id: NodeState(node) for node_id, node in self.graph.nodes.items()}
        self.downstream = self.graph.downstream()
        # Steps are admitted by the workspace's scheduler (shared with every other distml process);
        # --cpus caps this run's share of it on top.
        self.cap = LocalPool(cpus=options.cpus) if options.cpus is not None else None
        self.pool = SharedPool(workspace.engine, queue=options.queue, priority=options.priority, kind="step")
        for state in self.states.values():
            if state.node.step is not None:
                for pool in (self.cap, self.pool):
                    if pool is not None:
                        pool.check(state.node.id, state.node.step.policy.resources)
        ahead = (target.module, target.module_file) if target.module_file else None
        self.processes = StepProcesses(workspace.ref, options.preload, ahead)
        self.ending: list[tuple[Any, float]] = []  # step processes that reported, and when to stop waiting
        self.lineage_ends: list[tuple[str, int]] = []  # (node, generation) that succeeded, not yet recorded
        self.code_cache: dict[int, Any] = {}
        self.source_digests = SourceDigests(workspace.ref.cache_dir / "codehash.json")  # across runs
        self.logs_dir = workflow_dir(workspace.root, run_id) / "logs"
        self.stopping = False
        self.metrics = _workflow_metrics(self)

    # -- set-up ------------------------------------------------------------------------

    def _check_importable(self) -> None:
        import sys

        for node in self.graph.nodes.values():
            if node.step is None:
                continue
            fn = node.step.fn
            module = sys.modules.get(fn.__module__)
            obj: Any = module
            for part in fn.__qualname__.split("."):
                obj = getattr(obj, part, None)
            if getattr(obj, "__wrapped_step_fn__", obj) is not fn:
                raise DistmlError(
                    f"step {node.step.name} ({fn.__qualname__}) must be defined at the top level of its module, "
                    "so that its step process can import it"
                )

    def start_new(self) -> None:
        store.create_workflow_run(
            self.engine,
            self.run_id,
            self.target.spec,
            self.params,
            self.options.to_json(),
            os.getpid(),
            socket.gethostname(),
        )
        rows = [
            {
                "node_id": s.node.id,
                "generation": 0,
                "step_name": s.node.step.name if s.node.step else s.node.id,
                "status": "pending",
                "resources_json": _resources_json(s.node),
                "upstream_json": json.dumps([u.id for u in s.node.upstream]),
            }
            for s in self.states.values()
        ]
        store.add_step_executions(self.engine, self.run_id, rows)

    def load_existing(self) -> None:
        """Resume: take over finished outputs, adopt live step processes, re-run the rest."""
        by_node: dict[str, list[dict[str, Any]]] = {}
        for row in store.list_step_executions(self.engine, self.run_id):
            if row.node_id in self.states:
                by_node.setdefault(row.node_id, []).append(row)
        for node_id, rows in by_node.items():
            state = self.states[node_id]
            rows.sort(key=lambda r: r.generation)
            last = rows[-1]
            done = [r for r in rows if r.status in ("succeeded", "cached")]
            if done:
                row = done[-1]
                state.value = json.loads(row.output_json) if row.output_json is not None else None
                state.has_result, state.status = True, row.status
                state.consumed = json.loads(row.inputs_json)["fingerprint"] if row.inputs_json else None
                state.cache, state.cache_reason = row.cache, row.cache_reason
            if last.status in ("succeeded", "cached"):
                state.generation = last.generation + 1
                continue
            state.generation = last.generation  # the unfinished execution's row is reused
            if last.status == "running" and state.node.step is not None:
                state.execution_id = last.id
                if last.pid and process_identity(last.pid) == last.pid_started:
                    state.status, state.adopted, state.pid, state.began = "running", True, last.pid, True
                    state.attempt, state.started = last.attempt, time.time()
                    state.consumed = json.loads(last.inputs_json)["fingerprint"] if last.inputs_json else None
                    # Its gang is still held in the scheduler, bound to its process; take it over.
                    state.lease = self.pool.adopt(self._job_name(node_id), state.node.step.policy.resources)
                    if self.cap is not None:
                        state.cap_lease = self.cap.try_acquire(node_id, state.node.step.policy.resources)
                    timeout = state.node.step.policy.timeout
                    if timeout is not None and last.started_at is not None:
                        left = timeout - (_now() - last.started_at).total_seconds()
                        state.deadline = time.monotonic() + max(left, 0.0)  # its timeout still holds
                    state.history.append("adopted its running process after the orchestrator restarted")
                else:
                    # A later attempt number: a stray copy of the old attempt can no longer record its result.
                    state.attempt = last.attempt + 1
                    state.history.append("its process was gone when the run resumed: re-run")
                    state.cache_reason = "re-run: its process was gone when the run resumed"
            # failed, cancelled, upstream_failed, skipped or pending: decided again by the loop
        store.update_workflow_run(
            self.engine, self.run_id, status="running", pid=os.getpid(), host=socket.gethostname(), error=None
        )

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> RunResult:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        endpoint = self.metrics.serve(workflow_dir(self.ws.root, self.run_id) / "metrics.json")
        try:
            while not all(s.final for s in self.states.values()):
                if self._schedule():
                    self._notify()
                    continue  # decide again until nothing changes (cache hits finish at once)
                self.processes.top_up(self._spares_wanted())  # forked while the running steps run
                self._wait()
        except StoreUnavailable as exc:  # nothing more can be recorded: the run stays as the store has it
            message = f"run {self.run_id} stopped: {exc}; resume it with distml run --resume {self.run_id}"
            raise StoreUnavailable(message) from exc
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: resumable
            self._cancel_all("the orchestrator was stopped")
            store.update_workflow_run(self.engine, self.run_id, status="stopped", error="stopped by a signal")
            raise
        except Exception as exc:  # e.g. a data fingerprint or a condition that raised
            message = str(exc) if isinstance(exc, DistmlError) else f"{type(exc).__name__}: {exc}"
            self._cancel_all(f"the orchestrator failed: {message}")
            store.update_workflow_run(self.engine, self.run_id, status="failed", error=message[:2000], pid=None)
            if isinstance(exc, DistmlError):
                raise
            raise DistmlError(f"run {self.run_id} failed: {message}") from exc
        finally:
            signal.signal(signal.SIGTERM, previous)
            with contextlib.suppress(Exception):  # (on the way out of an error: that error is the one to see)
                self._end_lineage()
            self.source_digests.save()
            self.processes.close()
            self._reap(wait=True)
            endpoint.close()
            with contextlib.suppress(StoreUnavailable):  # (then its waiting steps end with this process)
                self.pool.close()  # withdraws steps still waiting; running ones stay with their processes
        ok = all(s.status in FINAL_OK for s in self.states.values())
        failed = [s for s in self.states.values() if s.status == "failed"]
        error = "; ".join(f"{s.node.id}: {s.error}" for s in failed)[:2000] or None
        store.update_workflow_run(
            self.engine, self.run_id, status="succeeded" if ok else "failed", error=error, pid=None
        )
        self._notify()
        result = substitute(self.returned, lambda n: self.states[n.id].value)
        return RunResult(self.run_id, "succeeded" if ok else "failed", self.states, result)

    def _spares_wanted(self) -> int:
        """Step processes to fork ahead: one per step still to start, at most `SPARES` (a chain needs
        one; a fan-out's steps start as slots free up, a few at a time)."""
        if self.stopping:
            return 0
        to_start = sum(
            1 for s in self.states.values() if s.node.step is not None and not s.final and s.status != "running"
        )
        return min(SPARES, to_start)

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _schedule(self) -> bool:
        changed = False
        for state in self.states.values():
            if state.final or state.status == "running" or self.stopping:
                continue
            node = state.node
            ups = [self.states[u.id] for u in node.upstream]
            if node.streaming:
                changed |= self._update_best(state, ups)
                continue
            if any(u.status in FINAL_BAD and not u.has_result for u in ups):
                self._finish_without_running(state, "upstream_failed", "an upstream step failed")
                changed = True
                continue
            if any(u.status == "skipped" for u in ups):
                self._finish_without_running(state, "skipped", "an upstream step was skipped")
                changed = True
                continue
            if not all(u.has_result for u in ups):
                continue
            if not all(self.states[o.id].final for o in node.ordering):
                continue  # an ordering edge waits for every run of its node (a best_of's downstream runs again)
            seen = tuple((u.generation, u.has_result) for u in ups)
            if state.inputs_seen != seen:  # resolve and hash the inputs only when an upstream changed
                args = substitute(list(node.args), lambda n: self.states[n.id].value)
                kwargs = substitute(dict(node.kwargs), lambda n: self.states[n.id].value)
                state.inputs_seen, state.inputs = seen, (args, kwargs, fingerprint([args, kwargs]))
            args, kwargs, inputs = state.inputs
            if state.has_result and state.consumed == inputs:
                if all(u.final for u in ups):
                    state.final = True
                    changed = True
                continue
            if state.retry_at is not None and time.monotonic() < state.retry_at:
                continue
            changed |= self._start(state, args, kwargs, inputs)
        self.pool.flush()  # one scheduling pass for this round's new steps and released gangs
        return changed

    def _update_best(self, state: NodeState, ups: list[NodeState]) -> bool:
        node = state.node
        assert node.best_key is not None
        candidates = [u for u in ups if u.has_result]
        changed = False
        if candidates:
            sign = -1 if node.minimize else 1
            scored = [(sign * node.best_key(decode(self.ws, u.value)), -i, u) for i, u in enumerate(candidates)]
            score, _, pick = max(scored, key=lambda t: (t[0], t[1]))  # the earliest of equals
            current = sign * node.best_key(decode(self.ws, state.value)) if state.has_result else None
            if current is None or score > current:
                state.value, state.has_result, state.status = pick.value, True, "succeeded"
                state.history.append(f"best so far: {pick.node.id}")
                store.save_step_execution(
                    self.engine,
                    self.run_id,
                    node.id,
                    state.generation,
                    step_name=node.id,
                    status="succeeded",
                    output_json=canonical(pick.value),
                    cache_reason=f"best so far: {pick.node.id}",
                    started_at=_now(),
                    finished_at=_now(),
                )
                state.generation += 1
                changed = True
        if all(u.final for u in ups):
            if not candidates:
                self._finish_without_running(state, "upstream_failed", "no input succeeded")
            else:
                state.final = True
            changed = True
        return changed

    def _finish_without_running(self, state: NodeState, status: str, reason: str) -> None:
        state.status, state.final, state.error = status, True, reason if status != "skipped" else None
        state.cache_reason = reason if status == "skipped" else state.cache_reason
        store.save_step_execution(
            self.engine,
            self.run_id,
            state.node.id,
            state.generation,  # a new row when earlier generations succeeded: they stay as they were
            step_name=_step_name(state.node),
            status=status,
            error=reason if status != "skipped" else None,
            cache_reason=reason if status == "skipped" else None,
            finished_at=_now(),
        )

    def _refreshed(self, name: str) -> bool:
        refresh = self.options.refresh
        return refresh is True or (not isinstance(refresh, bool) and name in refresh)

    def _start(self, state: NodeState, args: list, kwargs: dict, inputs: str) -> bool:
        node = state.node
        step = node.step
        assert step is not None
        policy = step.policy
        if state.decided != inputs:  # condition and memo lookup: once per set of inputs, not per retry
            if not self._decide(state, args, kwargs, inputs):
                return True
            state.decided = inputs
        if not self._acquire(state):
            if state.status != "queued":
                state.status = "queued"
                return True
            return False
        log_path = self.logs_dir / (f"{node.id}.log" if state.generation == 0 else f"{node.id}.{state.generation}.log")
        values = dict(
            step_name=step.name,
            status="running",
            attempt=state.attempt,
            memo_key=state.memo_key,
            memo_parts_json=canonical(state.memo_parts) if state.memo_parts is not None else None,
            cache=state.cache,
            cache_reason=state.cache_reason,
            inputs_json=json.dumps({"fingerprint": inputs}),
            log_path=str(log_path),
            resources_json=_resources_json(node),
            started_at=_now(),
            finished_at=None,
            error=None,
            output_json=None,
        )
        process = self.processes.take()  # started ahead: its pid is recorded with the step's start
        values.update(pid=process.pid, pid_started=process_identity(process.pid))
        state.execution_id = store.save_step_execution(self.engine, self.run_id, node.id, state.generation, **values)
        task = Task(
            run_id=self.run_id,
            node_id=node.id,
            generation=state.generation,
            execution_id=state.execution_id,
            attempt=state.attempt,
            module=step.fn.__module__,
            module_file=self.target.module_file if step.fn.__module__ == self.target.module else None,
            path=[str(Path(self.target.module_file).parent)] if self.target.module_file else [],
            qualname=step.fn.__qualname__,
            args=args,
            kwargs=kwargs,
            workspace=self.ws.ref,
            log_path=str(log_path),
            sched_job=str(state.lease.id) if state.lease is not None else None,
        )
        process.give(task)
        state.process, state.conn, state.pid = process.process, process.conn, process.pid
        if state.lease is not None:
            self.pool.bind(state.lease, state.pid, defer=True)  # held while it runs, even if we die
        state.status, state.consumed, state.retry_at, state.progress = "running", inputs, None, None
        state.started, state.ended, state.began = time.time(), None, False
        # Until its process reports that the function began (then the timeout proper starts).
        state.deadline = time.monotonic() + START_GRACE_S + policy.timeout if policy.timeout else None
        return True

    def _decide(self, state: NodeState, args: list, kwargs: dict, inputs: str) -> bool:
        """Evaluate the step's condition and memo key; False when it finished without running."""
        node = state.node
        step = node.step
        assert step is not None
        policy = step.policy
        decoded_args, decoded_kwargs = [], {}
        if policy.when is not None or policy.fingerprint is not None:
            decoded_args, decoded_kwargs = decode(self.ws, args), decode(self.ws, kwargs)
        # Conditions and data fingerprints run here, with `current()` giving the run's workspace.
        context = StepContext(self.run_id, node.id, state.attempt, self.ws, None)
        if policy.when is not None:
            with using_context(context):
                run_it = policy.when(*decoded_args, **decoded_kwargs)
            if not run_it:
                self._finish_without_running(state, "skipped", "its condition (when=) was false")
                return False
        state.memo_parts = state.memo_key = None
        if not policy.memoize:
            state.cache, state.cache_reason = "off", None
            return True
        data = None
        if policy.fingerprint is not None:
            with using_context(context):
                data = policy.fingerprint(*decoded_args, **decoded_kwargs)
        parts = memo.key_parts(node, memo.bind(step, tuple(args), kwargs), data, self.code_cache, self.source_digests)
        key = memo.memo_key(parts)
        state.memo_parts, state.memo_key = parts, key
        if self._refreshed(step.name):
            state.cache, state.cache_reason = "miss", "--refresh"
            self.metrics.cache_lookup(step.name, False)
            return True
        hit = self._memo_hit(step.name, key, policy.max_age)
        self.metrics.cache_lookup(step.name, hit is not None)
        if hit is not None:
            self._take_hit(state, hit, parts, key, inputs)
            return False
        previous = store.last_memoized_execution(self.engine, step.name, self.run_id)
        state.cache, state.cache_reason = "miss", memo.explain_miss(parts, previous, policy.max_age)
        return True

    def _memo_hit(self, name: str, key: str, max_age: float | None) -> dict[str, Any] | None:
        not_before = _now() - dt.timedelta(seconds=max_age) if max_age is not None else None
        hit = store.find_memo_hit(self.engine, name, key, not_before)
        if hit is None:
            return None
        output = json.loads(hit.output_json) if hit.output_json is not None else None
        if not all(self.ws.artifacts.exists(d) for d in artifacts_in(output)):
            return None  # its artifacts were removed: run again
        return hit

    def _take_hit(self, state: NodeState, hit: dict[str, Any], parts: dict, key: str, inputs: str) -> None:
        reason = f"same key as {hit.run_id} {hit.node_id}"
        store.save_step_execution(
            self.engine,
            self.run_id,
            state.node.id,
            state.generation,
            step_name=state.node.step.name,
            status="cached",
            memo_key=key,
            memo_parts_json=canonical(parts),
            cache="hit",
            cache_reason=reason,
            cached_from=hit.id,
            inputs_json=json.dumps({"fingerprint": inputs}),
            output_json=hit.output_json,
            log_path=hit.log_path,
            started_at=_now(),
            finished_at=_now(),
        )
        state.generation += 1
        state.value = json.loads(hit.output_json) if hit.output_json is not None else None
        state.has_result, state.status, state.consumed = True, "cached", inputs
        state.cache, state.cache_reason = "hit", reason

    # -- waiting and outcomes ------------------------------------------------------------

    def _end_lineage(self) -> None:
        """Record the end of the lineage executions of the steps that succeeded since the last call."""
        ends, self.lineage_ends = self.lineage_ends, []
        for node_id, generation in ends:
            lineage.end_step(self.engine, self.run_id, node_id, generation, "complete")

    def _wait(self) -> None:
        self._end_lineage()
        self._reap()
        now = time.monotonic()
        running = [s for s in self.states.values() if s.status == "running"]
        timeouts = [s.deadline - now for s in running if s.deadline is not None]
        retries = [s.retry_at - now for s in self.states.values() if s.retry_at is not None and not s.final]
        queued = any(s.status == "queued" for s in self.states.values())
        limit = min([POLL_QUEUED_S if queued else 1.0, *timeouts, *retries])
        if any(s.adopted for s in running):
            limit = min(limit, ADOPT_POLL_S)
        conns = {s.conn: s for s in running if s.conn is not None}
        if not conns and not running and not retries:
            queued = [s.node.id for s in self.states.values() if s.status == "queued"]
            if not queued:
                raise DistmlError("the workflow cannot make progress (no step is running or ready); this is a bug")
        ready = wait_connections(list(conns), timeout=max(limit, 0.0)) if conns else time.sleep(max(limit, 0.0))
        for conn in ready or []:
            self._receive(conns[conn])
        now = time.monotonic()
        for state in running:
            if state.status == "running" and state.deadline is not None and now >= state.deadline:
                timeout = state.node.step.policy.timeout
                self._terminate(state)
                error = (
                    f"timed out after {timeout:g} s"
                    if state.began
                    else f"timed out: its process did not begin the step within {START_GRACE_S + timeout:g} s"
                )
                self._failed(state, error, ["builtins.TimeoutError", "builtins.Exception"])
            elif state.status == "running" and state.adopted:
                self._poll_adopted(state)

    def _receive(self, state: NodeState) -> None:
        try:
            kind, payload = state.conn.recv()
        except (EOFError, OSError):
            state.process.join(5)
            code = state.process.exitcode
            self._failed(state, f"the step process exited with code {code} before reporting a result", [])
            return
        if kind == "began":
            state.began = True
            timeout = state.node.step.policy.timeout
            if timeout:
                state.deadline = time.monotonic() + timeout
        elif kind == "progress":
            state.progress = tuple(payload)
            self._notify()
        elif kind == "succeeded":
            self._succeeded(state, payload)
        else:
            self._failed(state, payload["error"], payload["types"])

    def _job_name(self, node_id: str) -> str:
        return f"{self.run_id}/{node_id}"

    def _acquire(self, state: NodeState) -> bool:
        """The step's gang from this run's cap (if any), then from the workspace's scheduler."""
        resources = state.node.step.policy.resources
        if self.cap is not None and state.cap_lease is None:
            state.cap_lease = self.cap.try_acquire(state.node.id, resources)
            if state.cap_lease is None:
                return False
        state.lease = self.pool.try_acquire(self._job_name(state.node.id), resources, defer=True)
        if state.lease is None and state.cap_lease is not None:
            self.cap.release(state.cap_lease)
            state.cap_lease = None
        return state.lease is not None

    def _release(self, state: NodeState) -> None:
        if state.lease is not None:
            self.pool.release(state.lease, defer=True)  # flushed with the next decisions, one pass for all
            state.lease = None
        if state.cap_lease is not None:
            self.cap.release(state.cap_lease)
            state.cap_lease = None
        if state.conn is not None:
            state.conn.close()
            state.conn = None
        if state.process is not None:  # it reported; its exit is awaited off the next step's path (`_reap`)
            self.ending.append((state.process, time.monotonic() + TERMINATE_GRACE_S))
            state.process = None
        state.ended = time.time()

    def _reap(self, wait: bool = False) -> None:
        """Collect the step processes that reported and exited; stop the group of one still alive
        `TERMINATE_GRACE_S` after its report (something it started keeps it alive). With `wait`,
        until each has ended."""
        still = []
        for process, deadline in self.ending:
            if wait:
                process.join(max(deadline - time.monotonic(), 0.0))
            if process.is_alive() and time.monotonic() >= deadline:
                stop_group(process.pid, signal.SIGKILL)
                process.join(5)
            if process.is_alive():
                still.append((process, deadline))
        self.ending = still

    def _succeeded(self, state: NodeState, output: Any) -> None:
        self._release(state)
        self._observe_attempt(state, "succeeded")
        # recorded once the steps this result lets start have started (`_wait`), off their path
        self.lineage_ends.append((state.node.id, state.generation))
        state.value, state.has_result, state.status, state.error = output, True, "succeeded", None
        state.generation += 1
        state.attempt = 0
        self._notify()

    def _failed(self, state: NodeState, error: str, types: list[str]) -> None:
        """Apply the step's retry policy to a failed attempt (`types`: the error's class names)."""
        self._release(state)
        lineage.end_step(self.engine, self.run_id, state.node.id, state.generation, "failed")
        policy = state.node.step.policy
        retryable = not self.stopping and (not types or bool(_type_names(policy.retry_on) & set(types)))
        state.error = error
        state.history.append(f"attempt {state.attempt + 1}: {error}")
        self._observe_attempt(state, "retried" if retryable and state.attempt < policy.retries else "failed")
        if retryable and state.attempt < policy.retries:
            self.metrics.retried(state.node.step.name)
            delay = min(policy.retry_backoff * 2**state.attempt, policy.retry_backoff_max)
            state.attempt += 1
            state.status, state.retry_at = "retrying", time.monotonic() + delay
            state.consumed = None
            store.save_step_execution(
                self.engine,
                self.run_id,
                state.node.id,
                state.generation,
                status="pending",
                attempt=state.attempt,
                error=f"attempt {state.attempt} failed: {error}",
            )
            self._notify()
            return
        state.status, state.final = "failed", True
        store.save_step_execution(
            self.engine, self.run_id, state.node.id, state.generation, status="failed", error=error, finished_at=_now()
        )
        state.generation += 1
        self._notify()
        if self.options.fail_fast:
            self._cancel_all(f"cancelled: {state.node.id} failed (fail-fast)")

    def _poll_adopted(self, state: NodeState) -> None:
        gone = process_identity(state.pid) is None  # checked before the row: a result written meanwhile counts
        row = next(
            (r for r in store.list_step_executions(self.engine, self.run_id) if r.id == state.execution_id), None
        )
        if row is not None and row.status == "succeeded":
            state.adopted = False
            self._succeeded(state, json.loads(row.output_json) if row.output_json is not None else None)
        elif row is not None and row.status == "failed":
            state.adopted = False
            self._failed(state, row.error or "failed", [])
        elif gone:
            state.adopted = False
            self._failed(state, "its process ended without recording a result", [])

    def _observe_attempt(self, state: NodeState, outcome: str) -> None:
        if state.started is not None and state.ended is not None and state.node.step is not None:
            self.metrics.step_finished(state.node.step.name, outcome, state.ended - state.started)

    def _terminate(self, state: NodeState) -> None:
        pid = state.pid
        if pid is None:
            return
        stop_group(pid, signal.SIGTERM)
        if state.process is not None:
            state.process.join(TERMINATE_GRACE_S)
            if state.process.exitcode is None:
                stop_group(pid, signal.SIGKILL)
                state.process.join(5)
        else:  # adopted: not our child, poll for its end
            deadline = time.monotonic() + TERMINATE_GRACE_S
            while process_identity(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            stop_group(pid, signal.SIGKILL)

    def _cancel_all(self, reason: str) -> None:
        self.stopping = True
        for state in self.states.values():
            if state.final:
                continue
            if state.status == "running":
                self._terminate(state)
                self._release(state)
                self._observe_attempt(state, "cancelled")
            state.status, state.final, state.error = "cancelled", True, reason
            store.save_step_execution(
                self.engine,
                self.run_id,
                state.node.id,
                state.generation,
                step_name=_step_name(state.node),
                status="cancelled",
                error=reason,
                finished_at=_now(),
            )


def _workflow_metrics(orchestrator: Orchestrator) -> Any:
    """The run's Prometheus metrics (steps by state read at scrape time, durations, cache, retries)
    and the workspace pool's scheduler metrics, served while `run()` runs."""
    from distml.monitoring.metrics import WorkflowMetrics
    from distml.scheduling.admission import pool_state
    from distml.scheduling.metrics import expose_scheduler

    metrics = WorkflowMetrics(orchestrator.run_id, lambda: [s.status for s in orchestrator.states.values()])
    expose_scheduler(metrics.registry, functools.partial(pool_state, orchestrator.engine))
    return metrics


def _step_name(node: Node) -> str:
    return node.step.name if node.step is not None else node.id


def _resources_json(node: Node) -> str | None:
    if node.step is None:
        return None
    r = node.step.policy.resources
    return json.dumps({"cpus": r.cpus, "gpus": r.gpus, "workers": r.workers})


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def run_pipeline(
    workspace: Workspace,
    target: Target | str,
    params: dict[str, Any] | None = None,
    options: RunOptions | None = None,
    run_id: str | None = None,
    on_start: Callable[[Orchestrator], None] | None = None,
    on_change: Callable[[Orchestrator], None] | None = None,
) -> RunResult:
    """Run a pipeline to the end in this process; return its states and result."""
    target = load_target(target) if isinstance(target, str) else target
    options = options or RunOptions()
    run_id = run_id or new_run_id(target.name)
    orchestrator = Orchestrator(workspace, target, dict(params or {}), run_id, options, on_change)
    orchestrator.start_new()
    if on_start is not None:
        on_start(orchestrator)
    return orchestrator.run()


def stop_run(workspace: Workspace, run_id: str, timeout: float = 30.0) -> str:
    """Stop run `run_id` as Ctrl-C does: SIGTERM to its orchestrator (on this host), which cancels
    its steps and records the run stopped, resumable with `distml run --resume`."""
    run = store.get_workflow_run(workspace.engine, run_id)
    if run is None:
        raise DistmlError(f"no workflow run {run_id!r} in {workspace.root}; `distml runs` lists them")
    if run.status != "running":
        raise DistmlError(f"run {run_id} is not running (it {run.status}); nothing to stop")
    if run.host != socket.gethostname():
        raise DistmlError(f"run {run_id} is orchestrated on {run.host}; stop it there")
    if not run.pid or not pid_alive(run.pid):
        raise DistmlError(f"run {run_id}'s orchestrator (pid {run.pid}) is gone; `distml run --resume {run_id}`")
    os.kill(run.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return f"run {run_id} stopped; resume it with distml run --resume {run_id}"


def resume_run(
    workspace: Workspace,
    run_id: str,
    on_start: Callable[[Orchestrator], None] | None = None,
    on_change: Callable[[Orchestrator], None] | None = None,
) -> RunResult:
    """Continue run `run_id` after its orchestrator died or was stopped."""
    run = store.get_workflow_run(workspace.engine, run_id)
    if run is None:
        raise DistmlError(f"no workflow run {run_id!r} in {workspace.root}; `distml runs` lists them")
    still = run.status == "running" and run.pid and run.pid != os.getpid() and pid_alive(run.pid)
    if still and run.host == socket.gethostname():
        raise DistmlError(f"run {run_id} is still running (orchestrator pid {run.pid}); stop it first")
    target = load_target(run.target)
    orchestrator = Orchestrator(workspace, target, run.params, run_id, RunOptions.from_json(run.options))
    orchestrator.on_change = on_change
    orchestrator.load_existing()
    if on_start is not None:
        on_start(orchestrator)
    return orchestrator.run()
