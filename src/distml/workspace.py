"""The workspace: one folder that holds everything distml stores, passed around explicitly.

`./.distml/` by default (`DISTML_HOME` or an explicit path overrides it) with `distml.db`
(the metadata store; `DISTML_DB_URL` points it at any SQLAlchemy URL), `artifacts/`
(content-addressed by SHA-256) and `cache/`. Every write is atomic: temp file + rename.
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

import sqlalchemy as sa

from distml.core.db import create_engine
from distml.core.errors import DistmlError
from distml.ops import metadata

DEFAULT_ROOT = ".distml"


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


class Workspace:
    """Root folder, metadata store and artifact store of one distml installation."""

    def __init__(self, root: str | os.PathLike | None = None, db_url: str | None = None, migrate: bool = True):
        """`db_url` None: the SQLite file `distml.db` in `root`. The environment is not read here
        (the CLI reads DISTML_HOME and DISTML_DB_URL); a process started for this workspace gets
        `root` and `db_url` (always a full URL) in its config file."""
        self.root = Path(root if root is not None else DEFAULT_ROOT)
        if self.root.exists() and not self.root.is_dir():
            raise DistmlError(f"workspace path {self.root} exists and is not a folder; pass a folder path")
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache_dir = self.root / "cache"
        self.datasets_dir = self.root / "datasets"
        self.artifacts = ArtifactStore(self.root / "artifacts")
        self.db_url = db_url or f"sqlite:///{(self.root / 'distml.db').resolve()}"
        self._engine: sa.Engine | None = None
        self._migrate = migrate  # False where a parent process has migrated the store (step processes)

    @property
    def engine(self) -> sa.Engine:
        """The metadata store's engine, migrated to the current schema on first use."""
        if self._engine is None:
            engine = create_engine(self.db_url)
            if self._migrate:
                metadata.migrate(engine)
            self._engine = engine
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"
