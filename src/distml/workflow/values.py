"""What flows between steps: JSON values and artifacts, with content fingerprints.

A step returns JSON-compatible values (dicts, lists, strings, numbers, booleans, None) and
`Artifact`s: files or folders it wrote, stored content-addressed in the workspace, so a value's
fingerprint (SHA-256 of its canonical JSON, artifacts by digest) says exactly what it holds.
Pickle is never used: nothing loads untrusted pickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from distml.core.errors import DistmlError
from distml.workspace import Workspace

_TAG = "__artifact__"


class Artifact:
    """A file or folder a step produced (`Artifact(path)`) or received (`.path` to read it)."""

    def __init__(self, path: str | os.PathLike, *, digest: str | None = None, kind: str | None = None):
        self.path = Path(path)
        self.digest = digest
        self.kind = kind or ("dir" if self.path.is_dir() else "file")

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, digest={self.digest and self.digest[:12]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Artifact) and self.digest is not None and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)


def _store(ws: Workspace, artifact: Artifact) -> dict[str, Any]:
    path = artifact.path
    if path.is_file():
        return {_TAG: ws.artifacts.put_file(path), "kind": "file", "name": path.name}
    if path.is_dir():
        index = {
            str(file.relative_to(path)): ws.artifacts.put_file(file)
            for file in sorted(path.rglob("*"))
            if file.is_file()
        }
        digest = ws.artifacts.put_bytes(json.dumps(index, sort_keys=True).encode())
        return {_TAG: digest, "kind": "dir", "name": path.name}
    raise DistmlError(f"the step returned Artifact({str(path)!r}) but no file or folder exists there")


def encode(ws: Workspace, value: Any, where: str = "result") -> Any:
    """A step's return value as plain JSON, its artifacts stored; refuses what JSON cannot hold."""
    if isinstance(value, Artifact):
        if value.digest is not None:  # received from upstream and passed on unchanged
            return {_TAG: value.digest, "kind": value.kind, "name": value.path.name}
        return _store(ws, value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DistmlError(f"{where} is {value}; step results must be finite numbers (JSON)")
        return value
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return encode(ws, value.item(), where)  # numpy / torch scalars
    if isinstance(value, (list, tuple)):
        return [encode(ws, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise DistmlError(f"{where} has non-string keys; step results are JSON objects with string keys")
        if _TAG in value:
            raise DistmlError(f"{where} uses the reserved key {_TAG!r}")
        return {k: encode(ws, v, f"{where}[{k!r}]") for k, v in value.items()}
    raise DistmlError(
        f"{where} is a {type(value).__name__}; a step returns JSON values (dict, list, str, number, bool, None) "
        "or distml.workflow.Artifact for files and folders"
    )


def decode(ws: Workspace, value: Any) -> Any:
    """The value a downstream step receives: artifacts become `Artifact`s with a readable path."""
    if isinstance(value, list):
        return [decode(ws, v) for v in value]
    if isinstance(value, dict):
        if _TAG in value:
            return Artifact(_materialize(ws, value), digest=value[_TAG], kind=value["kind"])
        return {k: decode(ws, v) for k, v in value.items()}
    return value


def _materialize(ws: Workspace, ref: dict[str, Any]) -> Path:
    digest = ref[_TAG]
    if ref["kind"] == "file":
        path = ws.artifacts.path(digest)
        if not path.exists():
            raise DistmlError(f"artifact {digest} ({ref.get('name')}) is missing from the artifact store")
        return path
    target = ws.cache_dir / "artifacts" / digest / ref.get("name", "data")
    if not target.exists():
        index = json.loads(ws.artifacts.get_bytes(digest))
        staging = target.parent / f".staging-{os.getpid()}"
        for rel, file_digest in index.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(ws.artifacts.path(file_digest), dest)
            except OSError:
                shutil.copyfile(ws.artifacts.path(file_digest), dest)
        staging.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process materialised it first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def artifacts_in(value: Any) -> list[str]:
    """Digests of the artifacts a stored value refers to."""
    if isinstance(value, list):
        return [d for v in value for d in artifacts_in(v)]
    if isinstance(value, dict):
        if _TAG in value:
            return [value[_TAG]]
        return [d for v in value.values() for d in artifacts_in(v)]
    return []


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint(value: Any) -> str:
    """SHA-256 of a stored value's canonical JSON (artifacts count by their content digest)."""
    return hashlib.sha256(canonical(value).encode()).hexdigest()
