"""Step processes: each step runs in its own process, forked from a warm server ahead of its step.

A forkserver that has already imported distml forks each step's process before the step is
ready (a spare: it opens the metadata store and waits on a pipe), so starting a step costs one
message, not a fork. The process starts its own process group (so a timeout or a cancel stops
everything the step started, torchrun workers included), sends its stdout/stderr to the step's
log file, runs the function, writes the final state of its own execution to the metadata store
(so the result survives the orchestrator) and reports it on a pipe. concurrent.futures' pool was
considered; it reuses processes and cannot stop one task.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import importlib.util
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from distml.core import DB_URL_ENV, HOME_ENV
from distml.core.errors import DistmlError
from distml.lineage import record as lineage
from distml.scheduling.admission import JOB_ENV
from distml.workflow import stepserver, store
from distml.workflow.dag import coerce_arguments
from distml.workflow.values import canonical, decode, encode
from distml.workspace import Workspace, WorkspaceRef

_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("distml_step_context", default=None)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything a step process needs, sent to it once (plain values only)."""

    run_id: str
    node_id: str
    generation: int
    execution_id: int
    attempt: int
    module: str
    module_file: str | None
    qualname: str
    path: list[str]  # folders to put on sys.path (the pipeline file's)
    args: list[Any]
    kwargs: dict[str, Any]
    workspace: WorkspaceRef  # always with its URL spelt out (`Workspace.ref`)
    log_path: str
    sched_job: str | None = None  # the scheduler job whose gang this step runs in


class StepContext:
    """What a running step can ask for: `distml.workflow.current()` inside the step function."""

    def __init__(self, run_id: str, node_id: str, attempt: int, workspace: Workspace, conn: Connection | None):
        self.run_id, self.node_id, self.attempt = run_id, node_id, attempt
        self.workspace = workspace
        self._conn = conn
        self._lock = threading.Lock()

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """Record a metric of this step execution in the metadata store."""
        self.log_metrics({name: value}, step)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        rows = [{"name": k, "value": float(v), "step": step} for k, v in values.items()]
        store.record_step_metrics(self.workspace.engine, self.run_id, self.node_id, rows)

    def progress(self, done: float, total: float | None = None, note: str = "") -> None:
        """Report progress to the orchestrator's live view (not stored)."""
        if self._conn is None:
            return
        with self._lock:
            try:
                self._conn.send(("progress", (done, total, note)))
            except OSError:
                pass  # the orchestrator is gone; the step goes on and records its result


@contextlib.contextmanager
def using_context(ctx: StepContext) -> Iterator[StepContext]:
    """Make `ctx` what `current()` returns inside the block (the orchestrator's conditions and fingerprints)."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def current() -> StepContext:
    """The context of the step running in this process."""
    ctx = _current.get()
    if ctx is None:
        raise DistmlError("distml.workflow.current() is only available inside a step run by `distml run`")
    return ctx


def import_file(path: str | os.PathLike, module_name: str) -> Any:
    """Import a Python file as `module_name`, its folder on sys.path (as `python file.py` has it)."""
    path = Path(path).resolve()
    if module_name in sys.modules:
        return sys.modules[module_name]
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DistmlError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_function(module: str, module_file: str | None, qualname: str) -> Any:
    mod = import_file(module_file, module) if module_file else importlib.import_module(module)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__wrapped_step_fn__", obj)


def _redirect_output(log_path: str, before: int | None = None) -> None:
    """stdout and stderr to the step's log; `before`: a file of what the process wrote ahead of
    its step, copied first."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if before is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.lseek(before, 0, os.SEEK_SET)
        while chunk := os.read(before, 1 << 16):
            os.write(fd, chunk)
        os.close(before)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _error_types(exc: BaseException) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]


def run_task(task: Task, conn: Connection | None, ws: Workspace | None = None) -> None:
    """The body of a step process (also callable in-process for debugging); `ws` when the process
    opened the task's workspace already."""

    # for a `distml` command the step starts (the CLI reads these); distml's own code passes them
    os.environ[HOME_ENV] = task.workspace.root
    os.environ[DB_URL_ENV] = task.workspace.url
    if task.sched_job is not None:
        os.environ[JOB_ENV] = task.sched_job  # a `distml train` it starts runs in this gang
    if ws is None:
        ws = Workspace.open(task.workspace, migrate=False)  # the orchestrator migrated it
    ctx = StepContext(task.run_id, task.node_id, task.attempt, ws, conn)
    _current.set(ctx)
    print(f"[distml] step {task.node_id} attempt {task.attempt + 1} (pid {os.getpid()})", flush=True)
    for folder in task.path:
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        _enter_lineage(task)
        fn = load_function(task.module, task.module_file, task.qualname)
        args, kwargs = coerce_arguments(fn, decode(ws, task.args), decode(ws, task.kwargs))
        if conn is not None:
            with contextlib.suppress(OSError):  # the orchestrator is gone; the step goes on
                conn.send(("began", None))  # its timeout counts from here, not from the process's start-up
        result = fn(*args, **kwargs)
        output = encode(ws, result, f"the result of step {task.node_id}")
        text = canonical(output)
    except BaseException as exc:  # report every failure, KeyboardInterrupt and SystemExit included
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        message = f"{type(exc).__name__}: {exc}"
        try:
            store.finish_step_execution(ws.engine, task.execution_id, task.attempt, status="failed", error=message)
        finally:
            if conn is not None:
                conn.send(("failed", {"error": message, "types": _error_types(exc), "traceback": trace[-4000:]}))
        return
    try:
        store.finish_step_execution(ws.engine, task.execution_id, task.attempt, status="succeeded", output_json=text)
    except Exception as exc:  # the result could not be recorded: the step did not succeed
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        if conn is not None:
            message = f"recording the result failed: {type(exc).__name__}: {exc}"
            conn.send(("failed", {"error": message, "types": _error_types(exc), "traceback": ""}))
        return
    if conn is not None:
        with ctx._lock:
            conn.send(("succeeded", output))


def _enter_lineage(task: Task) -> None:
    """The step execution in the lineage graph, entered before the step's code so that what this
    process and its children record is linked to it (the orchestrator records its end)."""
    properties = dict(attempt=task.attempt, pid=os.getpid(), function=f"{task.module}:{task.qualname}")
    lineage.enter_step(task.run_id, task.node_id, task.generation, properties)


def _spare_main(workspace: WorkspaceRef, ahead: tuple[str, str] | None, tasks: Connection, conn: Connection) -> None:
    """A step process before its step: its own process group, the store opened and connected,
    the pipeline's file imported (`ahead`: module name and file), then the step's `Task` from
    `tasks` (it ends quietly when the orchestrator closes the pipe unused: a spare nobody needed,
    or an orchestrator that died)."""
    os.setpgrp()  # one group per step: stopping it stops what it started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the orchestrator, which decides
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # What it prints before its step is known (importing the pipeline) is kept for the step's log,
    # never written to the orchestrator's stdout (a pipe another program may be reading).
    before = os.memfd_create("distml-step-output")
    os.dup2(before, 1)
    os.dup2(before, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    ws = stepserver.workspace_for(workspace)  # the orchestrator migrated it
    # Ahead of the step, off its path; a failure here shows again, in the step's log, when the step does it.
    with contextlib.suppress(Exception):
        store.prepare_finish(ws.engine)  # connected, its pragmas applied, its last write compiled (or inherited)
    if ahead is not None:
        with contextlib.suppress(BaseException):
            import_file(ahead[1], ahead[0])
    try:
        task = tasks.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        return
    finally:
        tasks.close()
    _redirect_output(task.log_path, before)
    try:
        run_task(task, conn, ws)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.close()


@dataclasses.dataclass
class StepProcess:
    """A started step process: `pid`, `process` (join it), `conn` (its reports) and `tasks` (its task)."""

    process: Any
    conn: Connection
    tasks: Connection

    @property
    def pid(self) -> int:
        return self.process.pid

    def give(self, task: Task) -> None:
        """Send the process its step (once)."""
        self.tasks.send(task)
        self.tasks.close()


class StepProcesses:
    """Step processes for one workspace, forked ahead from a warm forkserver (started on first use).

    `take()` hands out a started process (a spare when one is ready, else a new one); `give(task)`
    on it starts the step; `top_up(n)` forks spares for the steps to come; `close()` ends the
    spares nobody took."""

    def __init__(
        self, workspace: WorkspaceRef, preload: tuple[str, ...] = (), ahead: tuple[str, str] | None = None
    ) -> None:
        self.workspace = workspace
        self.ahead = ahead  # (module name, file) of the pipeline, imported by each process ahead of its step
        self._context: Any = None
        self.preload = preload
        self._spares: list[StepProcess] = []

    def _ctx(self) -> Any:
        if self._context is None:
            ctx = multiprocessing.get_context("forkserver")
            # Imported once in the server instead of in every step process: distml's workflow code,
            # SQLAlchemy's SQLite dialect, its driver and distml's CLI. Each child runs the main script
            # again (multiprocessing's rule), and preloading "__main__" itself does nothing in Python
            # 3.11 (the forkserver looks for a key the preparation data does not have), so the
            # modules `distml run`'s script imports are preloaded instead.
            # The forkserver is one per process: `preload` counts only when this call starts it.
            # The forkserver also opens this workspace (`stepserver`), for the step processes to inherit.
            ctx.set_forkserver_preload(
                [
                    "distml.workflow.executor",
                    "sqlalchemy.dialects.sqlite",
                    "sqlite3",
                    "distml.cli",
                    *self.preload,
                    "distml.workflow.stepserver",
                ]
            )
            self._context = ctx
        return self._context

    def _fork(self) -> StepProcess:
        ctx = self._ctx()
        reader, writer = ctx.Pipe(duplex=False)
        task_reader, task_writer = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_spare_main, args=(self.workspace, self.ahead, task_reader, writer), name="distml-step", daemon=False
        )
        # read by the forkserver if this start spawns it (its environment is fixed then), never by a step
        os.environ[stepserver.WORKSPACE_ENV] = self.workspace.model_dump_json()
        try:
            process.start()
        finally:
            os.environ.pop(stepserver.WORKSPACE_ENV, None)
        writer.close()
        task_reader.close()
        return StepProcess(process, reader, task_writer)

    def take(self) -> StepProcess:
        """A step process waiting for its task: a spare forked ahead, or a new one."""
        while self._spares:
            spare = self._spares.pop(0)
            if spare.process.is_alive():
                return spare
            self._discard(spare)
        return self._fork()

    def top_up(self, n: int) -> None:
        """Fork spares until `n` wait (for the steps about to be ready: the fork is off their path)."""
        while len(self._spares) < n:
            self._spares.append(self._fork())

    def close(self) -> None:
        """End the spares nobody took (each exits when its task pipe closes)."""
        spares, self._spares = self._spares, []
        for spare in spares:
            self._discard(spare)

    @staticmethod
    def _discard(spare: StepProcess) -> None:
        spare.tasks.close()
        spare.conn.close()
        spare.process.join(5)
        if spare.process.exitcode is None:
            stop_group(spare.process.pid, signal.SIGKILL)
            spare.process.join(5)


def stop_group(pid: int, sig: int = signal.SIGTERM) -> None:
    """Signal the process group of a step (its process and everything it started)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
