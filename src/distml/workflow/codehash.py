"""The code version of a step: a hash of what its function means, not of how its text looks.

The function's syntax tree (without docstrings, decorators or positions, so comments and
formatting do not count) is hashed together with every project-local function, class,
module and constant it names, followed transitively through the modules' globals. Names that
resolve into the standard library or installed packages stop the walk. Flyte and Prefect hash
only the decorated function; a helper two calls deep is part of the result, so it counts here.
Calls through objects (`obj.method()`) cannot be resolved statically; name such helpers or
give the step an explicit `version=`. What parsing an object's source gives (its digest and the
names it reads) is kept in `SourceDigests` by file size and modification time, as ccache's direct
mode does, so a run whose files did not change reads and parses none of them again.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import site
import sys
import sysconfig
import textwrap
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CONSTANT_TYPES = (int, float, str, bytes, bool, type(None), complex)
RECENT_S = 2.0  # a file modified this recently is parsed again on each run until it is older


def _constant_text(value: Any, depth: int = 0) -> str | None:
    """A rendering of a constant, the same in every process; None when `value` is not one.

    Tuples, lists, dicts, sets and frozensets of constants count (module-level settings
    tables). Set elements are sorted: `repr` of a set of strings follows their hashes, which
    differ from process to process (PYTHONHASHSEED), and would make every run a cache miss.
    """
    if isinstance(value, _CONSTANT_TYPES):
        return repr(value)
    if depth > 20 or not isinstance(value, (tuple, list, dict, set, frozenset)):
        return None
    if isinstance(value, dict):
        pairs = [(_constant_text(k, depth + 1), _constant_text(v, depth + 1)) for k, v in value.items()]
        if any(k is None or v is None for k, v in pairs):
            return None
        return "dict(" + ", ".join(f"{k}: {v}" for k, v in pairs) + ")"
    items = [text for text in (_constant_text(v, depth + 1) for v in value) if text is not None]
    if len(items) != len(value):
        return None
    if isinstance(value, (set, frozenset)):
        items.sort()
    return f"{type(value).__name__}(" + ", ".join(items) + ")"


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    paths.add(os.path.join(sys.base_prefix, "lib"))
    return tuple(os.path.realpath(p) + os.sep for p in paths)


def is_local(module: types.ModuleType | None) -> bool:
    """A module of the user's project: it has a source file outside the interpreter's libraries."""
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return False
    return not os.path.realpath(path).startswith(_library_roots())


def _strip(node: ast.AST) -> ast.AST:
    """Remove docstrings and decorators: neither changes what the code computes."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = sub.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                sub.body = body[1:] or [ast.Pass()]
            if not isinstance(sub, ast.Module):
                sub.decorator_list = []
    return node


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _code_object_text(code: types.CodeType) -> str:
    """A position-free rendering of compiled code (for lambdas, whose source is not one node)."""
    consts = [_code_object_text(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return repr((code.co_code, consts, code.co_names, code.co_varnames))


def _referenced_names(tree: ast.AST) -> set[str]:
    """Dotted names the code reads (`helper`, `module.func`, `pkg.mod.CONSTANT`).

    Only the whole chain counts: `helpers.transform` names the function, not the module
    `helpers` as well (that would hash all of helpers.py and everything it uses).
    """
    names: set[str] = set()
    inner: set[int] = set()  # the `a.b` and `a` inside `a.b.c`; ast.walk yields parents first
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        if isinstance(node, ast.Attribute):
            parts: list[str] = []
            current: ast.AST = node
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
                inner.add(id(current))
            if isinstance(current, ast.Name):
                names.add(".".join([current.id, *reversed(parts)]))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
    return names


@dataclass
class CodeVersion:
    """The digest of a step's code and the digest of each part that went into it."""

    digest: str
    parts: dict[str, str] = field(default_factory=dict)


class SourceDigests:
    """The digest and the names read of each parsed object, by its file's path, size and
    modification time and the object's name: loaded from `path` (a JSON file; missing or unreadable
    counts as empty), written back by `save` with the entries still valid."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path is not None:
            try:
                loaded = json.loads(self.path.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                pass

    @staticmethod
    def key(obj: Any, name: str) -> str | None:
        """`name` in the file that defines `obj` as it is now, or None when it has no source file."""
        try:
            file = inspect.getsourcefile(obj)
            stat = os.stat(file) if file else None
        except (OSError, TypeError):
            return None
        return f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0{name}" if stat else None

    def get(self, key: str | None) -> tuple[str, set[str]] | None:
        entry = self.entries.get(key) if key is not None else None
        if not (isinstance(entry, list) and len(entry) == 2):
            return None
        return entry[0], set(entry[1])

    def put(self, key: str | None, digest: str, names: set[str]) -> None:
        """Keep what parsing gave, unless the file changed within `RECENT_S` (a same-size edit
        within the clock's granularity would keep its modification time: ccache's rule too)."""
        if key is None or time.time() - int(key.split("\0")[2]) / 1e9 < RECENT_S:
            return
        self.entries[key] = [digest, sorted(names)]
        self.changed = True

    def save(self) -> None:
        """Write the entries whose files are unchanged (a best effort: it is only a cache)."""
        if self.path is None or not self.changed:
            return
        from distml.core.files import atomic_write

        valid: dict[str, list] = {}
        stats: dict[str, str | None] = {}
        for key, entry in self.entries.items():
            file, size, mtime, _ = key.split("\0", 3)
            if file not in stats:
                try:
                    stat = os.stat(file)
                    stats[file] = f"{stat.st_size}\0{stat.st_mtime_ns}"
                except OSError:
                    stats[file] = None
            if stats[file] == f"{size}\0{mtime}":
                valid[key] = entry
        try:
            with atomic_write(self.path, "w") as handle:
                json.dump(valid, handle)
            self.changed = False
        except OSError:
            pass


class _Walker:
    def __init__(self, digests: SourceDigests | None = None) -> None:
        self.parts: dict[str, str] = {}
        self.digests = digests or SourceDigests()

    def add_object(self, obj: Any) -> None:
        obj = getattr(obj, "__wrapped_step_fn__", obj)  # a Step: hash its function
        if isinstance(obj, functools.partial):
            self.add_object(obj.func)
            return
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        if isinstance(obj, types.ModuleType):
            if is_local(obj):
                self._add_module(obj)
            return
        if not isinstance(obj, (types.FunctionType, type)):
            return
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        if not is_local(module):
            return
        name = f"{obj.__module__}.{obj.__qualname__}"
        if name in self.parts:
            return
        self.parts[name] = ""  # mark before recursing: cycles end here
        known = self._parsed(obj, obj.__qualname__, textwrap.dedent)
        if known is None:  # a lambda inside a larger line: use its bytecode
            if not isinstance(obj, types.FunctionType):
                return
            known = _digest(_code_object_text(obj.__code__)), set(obj.__code__.co_names)
        self.parts[name], names = known
        namespace = dict(vars(module)) if module is not None else {}
        if isinstance(obj, types.FunctionType):
            namespace.update(inspect.getclosurevars(obj).nonlocals)
        self._follow(names, namespace, local_globals=module is not None and is_local(module), owner=name)

    def _add_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        if name in self.parts:
            return
        self.parts[name] = ""
        known = self._parsed(module, "", lambda source: source)
        if known is None:
            return
        self.parts[name], names = known
        self._follow(names, dict(vars(module)), local_globals=True, owner=name)

    def _parsed(self, obj: Any, name: str, prepare: Callable[[str], str]) -> tuple[str, set[str]] | None:
        """The digest of `obj`'s source (`prepare`d, `_strip`ped) and the names it reads,
        from `digests` when its file is unchanged, else parsed and kept there; None without a source."""
        key = self.digests.key(obj, name)
        known = self.digests.get(key)
        if known is None:
            try:
                tree = _strip(ast.parse(prepare(inspect.getsource(obj))))
            except (OSError, TypeError, SyntaxError):
                return None
            known = _digest(ast.dump(tree, annotate_fields=False, include_attributes=False)), _referenced_names(tree)
            self.digests.put(key, *known)
        return known

    def _follow(self, names: set[str], namespace: dict[str, Any], local_globals: bool, owner: str) -> None:
        for dotted in sorted(names):
            root, *rest = dotted.split(".")
            if root not in namespace:
                continue
            obj = namespace[root]
            for attr in rest:
                if not isinstance(obj, (types.ModuleType, type)) or not hasattr(obj, attr):
                    break
                obj = getattr(obj, attr)
            text = _constant_text(obj)
            if text is not None:
                if local_globals or rest:
                    self.parts[f"{owner}:{dotted}"] = _digest(text)
                continue
            self.add_object(obj)


def code_version(fn: Any, digests: SourceDigests | None = None) -> CodeVersion:
    """Hash `fn` and the project-local code it reaches (see the module docstring); `digests`: what
    earlier runs parsed, looked up and added to."""
    walker = _Walker(digests)
    walker.add_object(fn)
    parts = {k: v for k, v in sorted(walker.parts.items()) if v}
    import distml

    parts["distml"] = distml.__version__
    return CodeVersion(_digest(repr(sorted(parts.items()))), parts)
