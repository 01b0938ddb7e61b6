"""Is a recorded process still running, and is it still the one that was recorded?

Leases and run states store a pid; after a crash that pid may be gone or reused. A process is
identified by its pid together with its start time (from /proc on Linux), and a zombie (exited,
not yet reaped by its parent) counts as gone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def process_identity(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), or None when no such
    process runs. Stored next to the pid, it tells the process from a later one that reused the pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        return fields[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    except OSError:  # no /proc here: fall back to a signal-0 probe
        return "unknown" if pid_alive(pid) else None


def is_running(pid: object, started: str | None) -> bool:
    """Is the process recorded as (`pid`, `started`) still running? With no recorded start time,
    any live process with that pid counts; with one, only the process that started then."""
    identity = process_identity(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None
    return identity is not None and started in (None, identity)


def pid_alive(pid: int) -> bool:
    """True while process `pid` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_of(pid: int) -> int | None:
    """The parent pid of process `pid` (from /proc), or None when it is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def children_of(parent: int) -> list[int]:
    """The running processes whose parent is `parent` (zombies left out)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(name)
            if fields and int(fields[1]) == parent and fields[0] not in ("Z", "X"):
                found.append(int(name))
    return found


def when_gone(
    alive: Callable[[], bool], then: Callable[[], None], name: str, interval: float = 0.5
) -> threading.Thread:
    """Call `then` from a daemon thread once `alive()` turns false (asked every `interval` s): how a
    process ends itself when the one it belongs to died, however it died (kill -9 included, which no
    signal handler of the dead one can pass on). Returns the started thread."""

    def watch() -> None:
        while alive():
            time.sleep(interval)
        then()

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    return thread
