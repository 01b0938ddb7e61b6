"""Files written whole or not at all, and blobs named by their content.

`atomic_write` writes through a temp file in the same folder and renames it into place, so a
reader or a crash never sees half a file; `ArtifactStore` keeps blobs under their SHA-256 digest.
A full filesystem (ENOSPC, EDQUOT) becomes one `DiskFullError` naming the path and the free space,
and leaves the previous file and no temp file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from distml.core.errors import DiskFullError, DistmlError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """`exc` says the filesystem is full or the quota spent."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def disk_full(path: Path, exc: BaseException | None = None, needed: int | None = None) -> DiskFullError:
    """The error for a write of `path` that found no space: its filesystem's mount point and free
    bytes (read now, after the failed write's temp files are gone), and `needed` when known."""
    mount, free = _filesystem(Path(path))
    quota = isinstance(exc, OSError) and exc.errno == errno.EDQUOT
    return DiskFullError(str(path), mount=mount, free=free, needed=needed, quota=quota)


def _filesystem(path: Path) -> tuple[str | None, int | None]:
    """The mount point holding `path` and the bytes free there for this user (None: unknown)."""
    try:
        existing = Path(os.path.abspath(path))
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        stat = os.statvfs(existing)
        mount = existing
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        return str(mount), stat.f_bavail * stat.f_frsize
    except OSError:
        return None, None


@contextlib.contextmanager
def reporting_disk_full(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full filesystem met inside the block into `DiskFullError` naming `path` (for writes
    that clean up after themselves but are not one `atomic_write`, such as a cache folder)."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(path, exc, needed) from exc
        raise


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", size: int | None = None) -> Iterator[IO]:
    """Write `path` through a temp file in the same folder, renamed into place on success.

    On failure the temp file is removed and the previous `path` stays as it was; a full filesystem
    raises `DiskFullError` naming `path` (`size`: the bytes the write needs, for the message)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full(path, exc, size) from exc
        raise


class ArtifactStore:
    """Content-addressed blobs: `put` returns the SHA-256 hex digest that names the content."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise DistmlError(f"artifact id {digest!r} is not a 64-character SHA-256 hex digest")
        return self.root / digest[:2] / digest

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            with atomic_write(target, size=len(data)) as handle:
                handle.write(data)
        return digest

    def put_file(self, source: Path) -> str:
        with open(source, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        target = self.path(digest)
        if not target.exists():
            with atomic_write(target, size=os.path.getsize(source)) as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        return digest

    def get_bytes(self, digest: str) -> bytes:
        target = self.path(digest)
        if not target.exists():
            raise DistmlError(f"artifact {digest} is not in the artifact store at {self.root}")
        return target.read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()
