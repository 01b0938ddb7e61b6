"""Step processes: each step runs in its own process, forked from a warm server.

A forkserver that has already imported distml forks one process per step execution (a few
milliseconds, not a cold interpreter). The process starts its own process group (so a timeout
or a cancel stops everything the step started, torchrun workers included), sends its
stdout/stderr to the step's log file, runs the function, writes the final state of its own
execution to the metadata store (so the result survives the orchestrator) and reports it on a
pipe. concurrent.futures' pool was considered; it reuses processes and cannot stop one task.
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
from distml.workflow import store
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


def _redirect_output(log_path: str) -> None:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _error_types(exc: BaseException) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]


def run_task(task: Task, conn: Connection | None) -> None:
    """The body of a step process (also callable in-process for debugging)."""

    # for a `distml` command the step starts (the CLI reads these); distml's own code passes them
    os.environ[HOME_ENV] = task.workspace.root
    os.environ[DB_URL_ENV] = task.workspace.url
    if task.sched_job is not None:
        os.environ[JOB_ENV] = task.sched_job  # a `distml train` it starts runs in this gang
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


def _child_main(task: Task, conn: Connection) -> None:
    os.setpgrp()  # one group per step: stopping it stops what it started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the orchestrator, which decides
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _redirect_output(task.log_path)
    try:
        run_task(task, conn)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.close()


class StepProcesses:
    """Starts step processes from a warm forkserver (started on first use)."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        self._context: Any = None
        self.preload = preload

    def _ctx(self) -> Any:
        if self._context is None:
            ctx = multiprocessing.get_context("forkserver")
            # Imported once in the server instead of in every step process: distml's workflow code,
            # SQLAlchemy's SQLite dialect and distml's CLI. Each child runs the main script again
            # (multiprocessing's rule), and preloading "__main__" itself does nothing in Python
            # 3.11 (the forkserver looks for a key the preparation data does not have), so the
            # modules `distml run`'s script imports are preloaded instead.
            # The forkserver is one per process: `preload` counts only when this call starts it.
            ctx.set_forkserver_preload(
                ["distml.workflow.executor", "sqlalchemy.dialects.sqlite", "distml.cli", *self.preload]
            )
            self._context = ctx
        return self._context

    def start(self, task: Task) -> tuple[Any, Connection]:
        ctx = self._ctx()
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child_main, args=(task, writer), name=f"distml-step-{task.node_id}")
        process.start()
        writer.close()
        return process, reader


def stop_group(pid: int, sig: int = signal.SIGTERM) -> None:
    """Signal the process group of a step (its process and everything it started)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
