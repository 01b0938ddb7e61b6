"""Files written whole or not at all, and blobs named by their content.

`atomic_write` writes through a temp file in the same folder and renames it into place, so a
reader or a crash never sees half a file; `ArtifactStore` keeps blobs under their SHA-256 digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from distml.core.errors import DistmlError


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write `path` through a temp file in the same folder, renamed into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
            with atomic_write(target) as handle:
                handle.write(data)
        return digest

    def put_file(self, source: Path) -> str:
        with open(source, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        target = self.path(digest)
        if not target.exists():
            with atomic_write(target) as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        return digest

    def get_bytes(self, digest: str) -> bytes:
        target = self.path(digest)
        if not target.exists():
            raise DistmlError(f"artifact {digest} is not in the artifact store at {self.root}")
        return target.read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()
