"""The workspace: one folder that holds everything distml stores, passed around explicitly.

`./.distml/` by default with `distml.db` (the metadata store; `db_url` points it at any
SQLAlchemy URL), `artifacts/` (content-addressed by SHA-256) and `cache/`. The CLI alone maps
`--workspace`/DISTML_HOME and `--db-url`/DISTML_DB_URL onto these arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from distml.core import db as metadata
from distml.core.db import create_engine
from distml.core.errors import DistmlError
from distml.core.files import ArtifactStore
from distml.core.layout import DEFAULT_ROOT, WorkspaceRef

__all__ = ["DEFAULT_ROOT", "Workspace", "WorkspaceRef"]


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
        self.ref = WorkspaceRef.of(self.root, db_url)
        self.cache_dir = self.ref.cache_dir
        self.datasets_dir = self.ref.datasets_dir
        self.artifacts = ArtifactStore(self.ref.artifacts_dir)
        self.db_url = self.ref.url
        self._engine: sa.Engine | None = None
        self._migrate = migrate  # False where a parent process has migrated the store (step processes)

    @classmethod
    def open(cls, ref: WorkspaceRef, migrate: bool = True) -> Workspace:
        """The workspace a process's config names."""
        return cls(ref.root, ref.db_url, migrate=migrate)

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
