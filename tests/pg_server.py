"""Throwaway private PostgreSQL clusters for tests.

`PostgresServer` runs initdb + pg_ctl in a fresh temp dir (as the `postgres` user when root);
`halt` and `restart` take it away and bring it back on the same port (a store outage).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

DB_USER = "distml"
DB_NAME = "distml_test"
_START_ATTEMPTS = 5  # each a new port: another process may take the one chosen before the server binds it
_LOG_TAIL_LINES = 40


def _version_key(path: Path) -> tuple[int, ...]:
    # "/usr/lib/postgresql/15/bin" -> (15,); "9.6" -> (9, 6); non-numeric sorts last.
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_pg_bin() -> Path | None:
    """Return the directory holding initdb/pg_ctl, or None if PostgreSQL is absent."""
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()]
    if candidates:
        return max(candidates, key=_version_key)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    return None


def _free_port() -> int:
    """A port free now; another process may take it before the server binds it (then `start` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """Context manager: a private cluster with database `distml_test`, URL in `.url`."""

    def __init__(self, bin_dir: Path | None = None, start_timeout: int = 30) -> None:
        self.bin_dir = bin_dir or find_pg_bin()
        if self.bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.start_timeout = start_timeout
        self.tmpdir: Path | None = None
        self.port: int | None = None
        self.ports_tried: list[int] = []  # the ports `start` tried, in order; the last is the server's
        self._running = False
        self._run_as: str | None = None

    # -- helpers ---------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "sock"

    @property
    def log_file(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "postgres.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("PostgresServer is not running")
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def _cmd(self, *args: str) -> list[str]:
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(
            self._cmd(*args),
            cwd=self.tmpdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        """What the server logged after `offset` bytes (one start attempt's messages)."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(server log empty)"

    def _fail(self, what: str, proc: subprocess.CompletedProcess[str] | None) -> RuntimeError:
        parts = [f"PostgresServer: {what} failed"]
        if proc is not None:
            parts.append(f"exit code {proc.returncode}")
            if proc.stdout.strip():
                parts.append("stdout:\n" + proc.stdout.strip())
            if proc.stderr.strip():
                parts.append("stderr:\n" + proc.stderr.strip())
        parts.append(f"log tail ({self.log_file}):\n" + self._log_tail())
        return RuntimeError("\n".join(parts))

    # -- lifecycle -------------------------------------------------------
    def start(self) -> PostgresServer:
        assert self.bin_dir is not None
        if os.geteuid() == 0:
            try:
                import pwd

                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root but no 'postgres' user exists; PostgreSQL refuses "
                    "to run as root (install the postgresql package or run as non-root)"
                ) from None
            self._run_as = "postgres"
        self.tmpdir = Path(tempfile.mkdtemp(prefix="distml-pg-"))
        try:
            self.socket_dir.mkdir()
            if self._run_as:
                for p in (self.tmpdir, self.socket_dir):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            proc = self._run(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                DB_USER,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
            if proc.returncode != 0:
                raise self._fail("initdb", proc)

            for attempt in range(_START_ATTEMPTS):
                self.port = _free_port()
                self.ports_tried.append(self.port)
                logged = self._log_size()
                opts = (
                    f"-k {self.socket_dir} -p {self.port} -c listen_addresses=127.0.0.1"
                    " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
                )
                proc = self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    str(self.start_timeout),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-o",
                    opts,
                    timeout=self.start_timeout + 30,
                )
                if proc.returncode == 0:
                    self._running = True
                    break
                # Lost the race for the port to another process (this attempt's log says so): another port.
                if "Address already in use" in self._log_since(logged) and attempt + 1 < _START_ATTEMPTS:
                    continue
                raise self._fail("pg_ctl start", proc)

            proc = self._run(
                str(self.bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                DB_USER,
                DB_NAME,
            )
            if proc.returncode != 0:
                raise self._fail("createdb", proc)
        except BaseException:
            self.stop()
            raise
        return self

    def halt(self) -> None:
        """Stop the server as an administrator would (its clients are disconnected), keeping its data
        and port for `restart`."""
        assert self.bin_dir is not None and self._running
        proc = self._run(str(self.bin_dir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data_dir))
        if proc.returncode != 0:
            raise self._fail("pg_ctl stop", proc)

    def restart(self) -> None:
        """Start the halted server again: the same data, on the same port."""
        assert self.bin_dir is not None and self._running and self.port is not None
        opts = f"-k {self.socket_dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        proc = self._run(
            str(self.bin_dir / "pg_ctl"), "start", "-w", "-t", str(self.start_timeout), "-D", str(self.data_dir),
            "-l", str(self.log_file), "-o", opts, timeout=self.start_timeout + 30,
        )  # fmt: skip
        if proc.returncode != 0:
            raise self._fail("pg_ctl start (again)", proc)

    def stop(self) -> None:
        try:
            if self._running and self.bin_dir is not None:
                self._running = False
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "stop",
                    "-w",
                    "-m",
                    "immediate",
                    "-D",
                    str(self.data_dir),
                    timeout=60,
                )
        finally:
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
