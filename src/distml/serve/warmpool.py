"""Warm replica interpreters: a scale from zero must not wait for Python to start and import torch.

`python -m distml.serve.warmpool MODULE` imports MODULE (a replica: `distml.serve.server`) and runs its
`warm_up()` before any model is known, then blocks on stdin for one line, the replica's config file, and
becomes that replica (`MODULE.main([config])`, as `python -m MODULE config` would); end of file (its
gateway stopped it or died) exits 0. `WarmPool` is the gateway's side: a ReplicaSet keeps one started (a
`WarmSpare`) and hands it the next replica it starts, so that replica is the same managed child process a
cold one is (its pid, process group, log file, orphan watch, adoption). Forking replicas from one imported
zygote was considered and not used: they would be the zygote's children, not the gateway's (no Popen to
wait on, no adoption by the service's supervisor), and the fork is safe only while no torch thread pool
has started.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MODULE = "distml.serve.warmpool"
READY_BYTE = b"w"

log = logging.getLogger("distml.serve.warmpool")


def warm_command(command: Sequence[str]) -> list[str] | None:
    """The warm-interpreter form of a `PYTHON -m MODULE` replica command; None for any other form (a
    script path, a wrapper), which then starts cold."""
    if len(command) == 3 and command[1] == "-m" and command[2] != MODULE:
        return [command[0], "-m", MODULE, command[2]]
    return None


class WarmSpare:
    """A started warm interpreter (`process`, its stdin a pipe) logging to `log_path` until handed over;
    it writes one byte to the pipe `ready_fd` reads once its imports are done."""

    def __init__(self, process: subprocess.Popen, log_path: Path, ready_fd: int):
        self.process, self.log_path, self.ready_fd = process, log_path, ready_fd
        self._ready = False
        os.set_blocking(ready_fd, False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def ready(self) -> bool:
        """Has it imported everything (and waits for its config)?"""
        if not self._ready and self.ready_fd >= 0:
            with contextlib.suppress(BlockingIOError):
                self._ready = os.read(self.ready_fd, 1) == READY_BYTE
        return self._ready

    def _close_ready_fd(self) -> None:
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1

    def hand_over(self, config_path: Path, log_path: Path) -> bool:
        """Make it the replica of `config_path`: its log file becomes `log_path` (renamed: the process
        keeps writing to it), then it reads the config's path. False when it is gone (start a cold one)."""
        if not self.alive():
            self.stop()  # reaped already; closes its pipe
            return False
        try:
            os.replace(self.log_path, log_path)
            self.log_path = log_path
            self.process.stdin.write(os.fsencode(config_path) + b"\n")
            self.process.stdin.close()
        except OSError:  # it exited meanwhile (a broken pipe)
            self.stop()
            return False
        self._close_ready_fd()
        return True

    def stop(self) -> None:
        """Kill it (nothing of a user's runs in it yet) and reap it."""
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self._close_ready_fd()


class WarmPool:
    """One warm interpreter kept started for a ReplicaSet. `popen(command, log_path, stdin)` starts a
    process exactly as the set starts a replica (environment, session, parent-death signal, bookkeeping);
    `refill` starts the next one, `take` hands a replica's config to the current one."""

    def __init__(self, command: Sequence[str], popen: Callable[..., subprocess.Popen]):
        self.command, self.popen = list(command), popen
        self.spare: WarmSpare | None = None
        self.starts = 0  # replicas that started warm
        self._seq, self._failures, self._next_at = itertools.count(), 0, 0.0

    @property
    def pid(self) -> int | None:
        return self.spare.pid if self.spare is not None else None

    @property
    def ready(self) -> bool:
        return self.spare is not None and self.spare.ready

    def take(self, config_path: Path, log_path: Path) -> subprocess.Popen | None:
        """The current warm interpreter, now the replica of `config_path` logging to `log_path`; None when
        there is none (or it died): start that replica cold."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if not spare.hand_over(config_path, log_path):
            log.warning("warm interpreter (pid %d) gone (status %s); see %s", spare.pid, spare.process.returncode,
                        spare.log_path)  # fmt: skip
            return None
        self.starts += 1
        self._failures = 0
        return spare.process

    def refill(self, run_dir: Path) -> None:
        """Start a warm interpreter if none runs (logging to `run_dir`/warm-N.log); one that exited by
        itself (an import failed) is logged and replaced later, backing off."""
        spare = self.spare
        if spare is not None:
            if spare.alive():
                return
            self.spare = None
            spare.stop()  # reaps it, closes its pipe
            self._failed(f"warm interpreter (pid {spare.pid}) exited with status {spare.process.returncode}; "
                         f"see {spare.log_path}")  # fmt: skip
        if time.monotonic() < self._next_at:
            return
        log_path = run_dir / f"warm-{next(self._seq)}.log"
        log_path.unlink(missing_ok=True)
        read_fd, write_fd = os.pipe()
        try:
            process = self.popen([*self.command, str(write_fd)], log_path, stdin=subprocess.PIPE, pass_fds=(write_fd,))
        except Exception as exc:  # the set's popen raises DistmlError; keep serving cold
            os.close(read_fd)
            self._failed(f"cannot start a warm interpreter: {exc}")
            return
        finally:
            os.close(write_fd)
        self.spare = WarmSpare(process, log_path, read_fd)
        log.info("warm interpreter started (pid %d)", process.pid)

    def _failed(self, message: str) -> None:
        self._failures += 1
        self._next_at = time.monotonic() + min(0.5 * 2 ** (self._failures - 1), 30.0)
        log.warning(message)

    def stop(self) -> subprocess.Popen | None:
        """Stop the warm interpreter (killed: nothing of a user's runs in it) and reap it; the process."""
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.stop()
            return spare.process
        return None


# ---------------------------------------------------------------- the warm interpreter itself


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m distml.serve.warmpool MODULE READY_FD`: import and warm MODULE, write one byte to the
    inherited pipe READY_FD, wait for a config path on stdin, then run `MODULE.main([path])`. Started by a
    ReplicaSet, not by hand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0].startswith("-") or not args[1].isdigit():
        print("usage: python -m distml.serve.warmpool MODULE READY_FD (started by a ReplicaSet)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    module = importlib.import_module(args[0])
    warm_up = getattr(module, "warm_up", None)
    if warm_up is not None:
        warm_up()
    with contextlib.suppress(OSError):  # its set may be gone already: stdin then reads end of file
        os.write(int(args[1]), READY_BYTE)
    os.close(int(args[1]))
    print(f"warm interpreter: {args[0]} imported in {time.perf_counter() - started:.2f} s", file=sys.stderr, flush=True)
    line = sys.stdin.buffer.readline()
    config = os.fsdecode(line.rstrip(b"\n"))
    if not config:
        return 0  # end of file: no replica to become
    devnull = os.open(os.devnull, os.O_RDONLY)  # a replica's stdin is /dev/null, as a cold one's
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.argv = [getattr(module, "__file__", None) or args[0], config]
    return module.main([config])


if __name__ == "__main__":
    sys.exit(main())
