"""Fetch a caller-given table of files over HTTP, resuming interrupted transfers, verifying size and MD5.

Each file streams into `<name>.part`; retries continue from the bytes on disk with `Range: bytes=N-`, and
only a verified file gets its final name (os.replace). Standard-library urllib.request is used because a
streaming GET with one Range header is all this needs; requests/httpx would add a dependency, not remove code.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distml.core.errors import DistmlError

_CHUNK = 1 << 16
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-\d+/(?:\d+|\*)")


@dataclass(frozen=True)
class RemoteFile:
    """One entry of a download table: name (relative to a base URL and a folder), size in bytes, MD5 hex digest."""

    name: str
    size: int
    md5: str


def _expected(remote: RemoteFile) -> str:
    return f"{remote.name} ({remote.size} bytes, md5 {remote.md5})"


def _md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _problem(path: Path, expected: RemoteFile) -> str | None:
    """What is wrong with `path` as a copy of `expected`, or None when size and MD5 match."""
    try:
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size == expected.size:
            digest = _md5(path)
            if digest == expected.md5.lower():
                return None
        else:
            digest = _md5(path)
    except OSError as exc:
        return f"{path} cannot be read ({exc})"
    return f"{path} has {size} bytes with md5 {digest}, expected {expected.size} bytes with md5 {expected.md5}"


def verify_file(path: Path, expected: RemoteFile) -> None:
    """Raise DistmlError unless `path` has exactly the size and MD5 that `expected` lists."""
    problem = _problem(Path(path), expected)
    if problem is not None:
        raise DistmlError(f"file {expected.name} does not match: {problem}")


def locate_files(files: Sequence[RemoteFile], folder: Path) -> dict[str, Path]:
    """Paths of `files` inside a user-supplied `folder`; one DistmlError lists every missing or bad file."""
    folder = Path(folder)
    wanted = "; ".join(_expected(remote) for remote in files)
    if not folder.is_dir():
        raise DistmlError(
            f"data folder {folder} does not exist or is not a folder; expected a folder holding: {wanted}"
        )
    found: dict[str, Path] = {}
    problems: list[str] = []
    for remote in files:
        path = folder / remote.name
        problem = _problem(path, remote)
        if problem is None:
            found[remote.name] = path
        else:
            problems.append(f"{remote.name}: {problem}")
    if problems:
        raise DistmlError(
            f"data folder {folder} has {len(problems)} of {len(files)} files missing or wrong: "
            f"{'; '.join(problems)}. Expected files: {wanted}"
        )
    return found


class _Transient(Exception):
    """A failure worth retrying against the same URL (network error, truncated body, 5xx)."""


class _Permanent(Exception):
    """A failure that retrying the same URL will not fix (404, bad URL); the next base URL may work."""


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Report:
    """Download progress: a rich bar (bytes, speed, ETA) on a terminal, plain lines on other streams, or nothing."""

    def __init__(self, progress: bool):
        self.mode = ("rich" if _stderr_is_terminal() else "plain") if progress else "off"
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._current: int | None = None

    def __enter__(self) -> _Report:
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, remote: RemoteFile, url: str, have: int) -> None:
        if self._progress is not None:
            task = self._tasks.get(remote.name)
            if task is None:
                task = self._progress.add_task(remote.name, total=remote.size, completed=have)
                self._tasks[remote.name] = task
            else:
                self._progress.update(task, completed=have)
            self._current = task
        elif self.mode == "plain":
            resume = f", resuming at byte {have}" if have else ""
            print(f"downloading {remote.name} ({remote.size} bytes) from {url}{resume}", file=sys.stderr, flush=True)

    def advance(self, count: int) -> None:
        if self._progress is not None and self._current is not None:
            self._progress.advance(self._current, count)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        reason = exc.reason
        return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _transfer(
    opener: urllib.request.OpenerDirector, url: str, part: Path, remote: RemoteFile, timeout: float, report: _Report
) -> None:
    """One GET of `url` into `part`, resuming from its current length; returns when the body ended normally."""
    have = part.stat().st_size if part.is_file() else 0
    if have > remote.size:  # longer than the file can be: not a prefix of it
        part.unlink()
        have = 0
    if have and have == remote.size:
        return  # complete from an earlier attempt; verification decides
    response = _open(opener, url, have, timeout)
    if response is None:
        return  # nothing past what we hold: treat as complete, verification decides
    with response:
        mode, have = _resumed_at(response, part, have)
        length = response.headers.get("Content-Length", "")
        end = have + int(length) if length.strip().isdigit() else None
        report.start(remote, url, have)
        have = _copy_body(response, part, mode, have, remote, report)
    if have > remote.size:
        return  # already longer than the table says; verification reports the mismatch
    if end is not None and have < end:
        raise _Transient(f"connection closed after {have} of {end} bytes (truncated body)")
    if end is None and have < remote.size:
        raise _Transient(f"connection closed after {have} of {remote.size} bytes (truncated body)")


def _open(opener: urllib.request.OpenerDirector, url: str, have: int, timeout: float) -> Any:
    """The response to a GET of `url` from byte `have`; None when the server has nothing past it (416).
    Errors are sorted into _Transient (worth a retry) and _Permanent."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "distml"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            return None
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise _Permanent(f"HTTP {exc.code} {exc.reason}") from exc
    except ValueError as exc:  # malformed URL, unknown scheme
        raise _Permanent(str(exc)) from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, ConnectionError, timeout are OSErrors
        raise _Transient(_reason(exc)) from exc


def _resumed_at(response: Any, part: Path, have: int) -> tuple[str, int]:
    """(file mode, offset) the body is written at: appended after `have` bytes for a 206 that starts
    there, from byte 0 for a 200 (or another 2xx: the whole file, Range or not)."""
    status = response.status or 200  # file:// responses carry no status
    if status != 206:
        return "wb", 0
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is None or int(match.group(1)) != have:
        part.unlink(missing_ok=True)
        raise _Transient(
            f"asked for bytes {have}- and got Content-Range {response.headers.get('Content-Range')!r}; starting over"
        )
    return "ab", have


def _copy_body(response: Any, part: Path, mode: str, have: int, remote: RemoteFile, report: _Report) -> int:
    """Copy the body into `part` (durably); the bytes `part` holds after it."""
    try:
        out = open(part, mode)
    except OSError as exc:
        raise DistmlError(f"cannot write {part}: {exc}; pass a writable download folder") from exc
    with out:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                raise _Transient(f"{_reason(exc)} after {have} bytes") from exc
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                raise DistmlError(f"cannot write {part}: {exc}; free space or pass another folder") from exc
            have += len(chunk)
            report.advance(len(chunk))
            if have > remote.size:
                return have  # already longer than the table says; verification reports the mismatch
        out.flush()
        os.fsync(out.fileno())
    return have


def _fetch_one(
    opener: urllib.request.OpenerDirector,
    remote: RemoteFile,
    dest: Path,
    base_urls: Sequence[str],
    retries: int,
    timeout: float,
    backoff: float,
    report: _Report,
) -> tuple[str, BaseException | None] | None:
    """Download one file to dest/name; None on success, else (last error, its exception)."""
    final = dest / remote.name
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    # A .part left by an earlier run may hold bytes of another version; if the result fails to verify,
    # start over once from byte 0 before blaming the server.
    stale = part.is_file() and part.stat().st_size > 0
    last: tuple[str, BaseException | None] = ("no base URL was given", None)
    for base in base_urls:
        url = (base if base.endswith("/") else base + "/") + remote.name
        attempt = 0
        while attempt < retries:
            if attempt and backoff > 0:
                time.sleep(backoff * 2 ** (attempt - 1))
            attempt += 1
            try:
                _transfer(opener, url, part, remote, timeout, report)
            except _Transient as exc:
                last = (f"{url}: {exc}", exc.__cause__ or exc)
                continue
            except _Permanent as exc:
                last = (f"{url}: {exc}", exc.__cause__ or exc)
                break
            problem = _problem(part, remote)
            if problem is None:
                os.replace(part, final)
                return None
            part.unlink(missing_ok=True)
            last = (f"{url} served content that does not match: {problem} (partial download deleted)", None)
            if stale:
                stale = False
                attempt = 0
                continue
            break  # the same URL would serve the same bytes; try the next one
    return last


def fetch_files(
    files: Sequence[RemoteFile],
    dest: Path,
    base_urls: Sequence[str],
    *,
    retries: int = 3,
    timeout: float = 30.0,
    progress: bool = True,
    backoff: float = 0.5,
) -> dict[str, Path]:
    """Make every file of `files` present and verified in `dest`, downloading `base_url + name` where needed.

    Files already in `dest` that verify are kept without any request. Base URLs are tried in order, each up
    to `retries` times with exponential backoff (`backoff`, 2*backoff, ...), every retry resuming from the
    bytes on disk. Returns name -> path; raises one DistmlError listing what is still missing otherwise.
    """
    if retries < 1:
        raise DistmlError(f"retries must be at least 1, got {retries}")
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistmlError(f"cannot create download folder {dest}: {exc}; pass a writable folder") from exc
    result: dict[str, Path] = {}
    missing: list[RemoteFile] = []
    for remote in files:
        if _problem(dest / remote.name, remote) is None:
            result[remote.name] = dest / remote.name
        else:
            missing.append(remote)
    if missing:
        opener = urllib.request.build_opener()  # proxies from the environment at call time
        with _Report(progress) as report:
            for index, remote in enumerate(missing):
                failure = _fetch_one(opener, remote, dest, base_urls, retries, timeout, backoff, report)
                if failure is not None:
                    message, cause = failure
                    still = "; ".join(_expected(r) for r in missing[index:])
                    raise DistmlError(
                        f"download of {remote.name} failed: {message}. Still missing: {still}. "
                        f"Fetch them another way and put them into {dest} or into any folder passed with "
                        "--data-dir; each is checked against the size and md5 listed here."
                    ) from cause
                result[remote.name] = dest / remote.name
    return {remote.name: result[remote.name] for remote in files}
