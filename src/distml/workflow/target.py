"""Find the pipeline function a `distml run` target names: `path/to/file.py:fn` or `package.module:fn`.

A file is imported under a name derived from its absolute path, with its folder on sys.path
(as `python file.py` would have it), so step processes can import the same module again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from pathlib import Path
from typing import Any

from distml.core.errors import DistmlError
from distml.workflow.executor import import_file

DEFAULT_TARGET = "distml.pipelines.end_to_end:pipeline"


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # as given, stored with the run so --resume finds it again
    module: str
    module_file: str | None
    function: Any

    @property
    def name(self) -> str:
        return self.function.__name__


def file_module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"distml_pipeline_{stem}_{digest}"


def load_target(spec: str) -> Target:
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise DistmlError(f"pipeline target {spec!r} must be path/to/file.py:function or package.module:function")
    module_file: str | None = None
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise DistmlError(f"pipeline file {where} does not exist")
            module_file = str(path.resolve())
            module_name = file_module_name(path)
            module = import_file(path, module_name)
        else:
            module_name = where
            module = importlib.import_module(where)
    except DistmlError:
        raise
    except ImportError as exc:
        raise DistmlError(f"cannot import the pipeline module {where!r}: {exc}") from None
    except Exception as exc:
        raise DistmlError(f"importing {where} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, attr, None)
    if function is None or not callable(function):
        raise DistmlError(f"{where} has no function {attr!r}; pass path/to/file.py:function")
    return Target(spec, module_name, module_file, function)
