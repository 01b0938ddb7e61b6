"""The step processes' forkserver opens the run's workspace once, so each step process it forks
inherits the store's engine with its statements compiled instead of building them again.

`distml.workflow.executor` preloads this module in the forkserver it starts and passes the
workspace in `WORKSPACE_ENV` for the forkserver alone (a preload is a module name, nothing more).
"""

from __future__ import annotations

import os

from distml.workflow import store
from distml.workspace import Workspace, WorkspaceRef

WORKSPACE_ENV = "DISTML_STEPSERVER_WORKSPACE"

_opened: Workspace | None = None  # in the forkserver: its first workspace, opened at import


def _open_ahead() -> None:
    global _opened
    text = os.environ.pop(WORKSPACE_ENV, None)
    if text is None:
        return
    try:
        workspace = Workspace.open(WorkspaceRef.model_validate_json(text), migrate=False)
        store.prepare_finish(workspace.engine)
        workspace.engine.dispose()  # no connection crosses a fork; the compiled statements stay
    except Exception:  # each step process opens the workspace itself, and says what fails
        return
    _opened = workspace


def workspace_for(ref: WorkspaceRef) -> Workspace:
    """`ref`'s workspace: the one this process inherited from the forkserver when it is `ref`'s (its
    pool emptied for this process, its statements compiled), else a new one."""
    if _opened is not None and _opened.ref == ref:
        _opened.engine.dispose(close=False)  # SQLAlchemy's rule for an engine that crossed a fork
        return _opened
    return Workspace.open(ref, migrate=False)


_open_ahead()
