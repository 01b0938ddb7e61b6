"""Keep a service's gateway up: a small parent that owns the listening socket and restarts the gateway.

A service is as available as its gateway process. The supervisor binds the port once and hands the
socket to each gateway it starts, so while a killed gateway is replaced, clients queue in the kernel's
accept backlog instead of being refused; it is the replicas' subreaper, so they outlive a gateway and
the next one adopts them (`ReplicaSet.adopt`), with the split and canary it finds in `state.json`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from distml.core.errors import DistmlError
from distml.core.exposure import check_exposure
from distml.core.layout import ServiceRecord
from distml.core.liveness import children_of, when_gone
from distml.serve.config import SUPERVISOR_ENV

log = logging.getLogger("distml.serve.supervisor")

LISTEN_FD_ENV = "DISTML_GATEWAY_FD"  # the gateway serves this inherited socket instead of binding
STANDBY_FD_ENV = "DISTML_GATEWAY_STANDBY_FD"  # a standby gateway waits for one byte on this pipe
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # more crashes than this in the window: a crash loop, give up
STOP_TIMEOUT_S = 90.0

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
    _prctl = None


def exit_when_orphaned(supervisor_pid: int, interval: float = 0.5) -> threading.Thread:
    """For a replica of a supervised service: SIGTERM ourselves (a graceful stop) once neither the
    gateway that started us nor the supervisor that adopts us when that gateway dies is our parent,
    i.e. once the whole service is gone. A daemon thread; returns it."""
    started_by = os.getppid()

    def stop() -> None:
        log.warning("the service's supervisor (pid %d) is gone; stopping", supervisor_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    return when_gone(lambda: os.getppid() in (started_by, supervisor_pid), stop, "orphan-watch", interval)


class Supervisor:
    """Runs `command` (a gateway reading the inherited socket `sock`) and restarts it when it dies by
    a signal or an error; a clean exit (0, after SIGTERM) ends the service. A standby gateway, started
    and imported ahead, waits beside the active one: a restart only has to tell it to go. Call `run`."""

    def __init__(self, command: Sequence[str], sock, folder: Path, env: dict[str, str] | None = None):
        self.command, self.sock, self.folder = list(command), sock, folder
        self.env = dict(os.environ if env is None else env)
        self.stopping = False
        self.gateway: subprocess.Popen | None = None
        self.standby: tuple[subprocess.Popen, int] | None = None  # the process and its go pipe
        self.restarts = 0
        self._crashes: deque[float] = deque()

    def _spawn(self, standby: bool) -> tuple[subprocess.Popen, int | None]:
        fd = self.sock.fileno()
        env = {**self.env, LISTEN_FD_ENV: str(fd), SUPERVISOR_ENV: str(os.getpid())}
        fds, go = [fd], None
        if standby:
            read, go = os.pipe()
            env[STANDBY_FD_ENV] = str(read)
            fds.append(read)

        def die_with_us() -> None:  # in the child: a supervisor killed outright takes its gateway along
            if _prctl is not None:
                _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

        try:
            process = subprocess.Popen(
                self.command, pass_fds=fds, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_us
            )
        finally:
            if standby:
                os.close(read)
        return process, go

    def _activate(self) -> None:
        """The standby (or, with none, a new process) becomes the gateway; a new standby follows."""
        if self.standby is not None and self.standby[0].poll() is None:
            self.gateway, go = self.standby
            os.write(go, b"g")
            os.close(go)
        else:
            self.gateway = self._spawn(standby=False)[0]
        self.standby = None
        (self.folder / "gateway.pid").write_text(f"{self.gateway.pid}\n")
        if not self.stopping:
            self.standby = self._spawn(standby=True)

    def _drop_standby(self) -> None:
        if self.standby is not None:
            process, go = self.standby
            os.close(go)  # it reads end-of-file and exits
            self.standby = None
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            if process.poll() is None:
                process.kill()

    def _forward(self, signum: int, _frame) -> None:
        self.stopping = True
        if self.gateway is not None and self.gateway.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.gateway.send_signal(signal.SIGTERM)

    def run(self, ready_file: Path) -> int:
        """Supervise until stopped; the exit code of the last gateway (0 after a clean stop)."""
        if _prctl is not None:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        self._activate()
        code = 0
        try:
            while True:
                pid, status = os.waitpid(-1, 0)  # reaps adopted replicas as they exit, too
                if self.standby is not None and pid == self.standby[0].pid:
                    standby, go = self.standby
                    os.close(go)
                    self.standby = None
                    standby.returncode = os.waitstatus_to_exitcode(status)
                    if not self.stopping and self._may_restart(standby.returncode, "standby gateway"):
                        self.standby = self._spawn(standby=True)
                    continue
                if pid != self.gateway.pid:
                    continue
                self.gateway.returncode = code = os.waitstatus_to_exitcode(status)
                if self.stopping or code == 0:
                    break
                if not ready_file.exists():  # never served: a bad config, not a crash to retry
                    log.error("the gateway exited with code %d before it served; not restarting", code)
                    break
                if not self._may_restart(code, "gateway"):
                    break
                self._activate()
        except ChildProcessError:  # pragma: no cover - no children at all
            pass
        finally:
            self._drop_standby()
            self._stop_leftovers()
        return code

    def _may_restart(self, code: int, which: str) -> bool:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > RESTART_WINDOW_S:
            self._crashes.popleft()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if len(self._crashes) > MAX_RESTARTS:
            log.error("the %s %s, the %d-th crash in %g s; giving up", which, how, len(self._crashes), RESTART_WINDOW_S)
            return False
        if which == "gateway":
            self.restarts += 1
            log.warning("the gateway (pid %d) %s; the standby takes over on the same socket", self.gateway.pid, how)
        else:
            log.warning("the %s %s; starting another", which, how)
        return True

    def _stop_leftovers(self) -> None:
        """Replicas adopted from a dead gateway that no gateway retired: SIGTERM, then SIGKILL."""
        left = children_of(os.getpid())
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            left = children_of(os.getpid())
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m distml.serve.supervisor SERVE_CONFIG.json`: bind the config's host/port, then run
    and keep running `python -m distml.serve.gateway SERVE_CONFIG.json` on that socket."""
    from distml.serve import http
    from distml.serve.config import load_serve_config

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m distml.serve.supervisor SERVE_CONFIG.json", file=sys.stderr)
        return 2
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_serve_config(args[0])
        check_exposure(config.host, config.token_value(), config.insecure)  # as the gateway would, before binding
        sock = http.bind(config.host, config.port)
    except DistmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock.set_inheritable(True)
    folder = Path(args[0]).resolve().parent
    # The service is known from here, before its gateway is ready: a `distml services stop`, or the
    # next `ensure_serving` of a step that was stopped while it waited, finds it and does not start another.
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    ServiceRecord.for_this_process(config.name, url, config.replica.models[0]).write(config.replica.workspace.path)
    command = [sys.executable, "-m", "distml.serve.gateway", args[0]]
    ready_file = Path(config.port_file) if config.port_file else folder / "gateway.port"
    return Supervisor(command, sock, folder).run(ready_file)


if __name__ == "__main__":
    sys.exit(main())
