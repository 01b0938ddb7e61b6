"""Memoization through real runs of a small project in a temporary folder, each run in a fresh process.

Each test copies one shared first run's workspace, changes one thing, runs again and reads hit or miss, and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distml.workflow.store import get_workflow_run, list_step_executions
from distml.workflow.target import file_module_name
from distml.workspace import Workspace

PIPELINE = '''\
import hashlib
import time
from pathlib import Path

import helpers
import unrelated

from distml.workflow import step

HERE = Path(__file__).parent


def data_fingerprint(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@step(memoize=True, fingerprint=data_fingerprint)
def load(path):
    return sum(int(line) for line in Path(path).read_text().split())


@step(memoize=True, max_age=3600)
def compute(total, scale, offset=0):
    """Scale the total."""
    return helpers.transform(total * scale) + offset


@step(memoize=True, max_age=0.5)
def stamp(total):
    return [total, time.time()]


@step(memoize=True)
def boom(log):
    with open(log, "a") as handle:
        handle.write("ran\\n")
    raise RuntimeError("boom")


def pipeline(scale: int = 1, offset: int = 0):
    total = load(str(HERE / "data.csv"))
    stamp(total)
    return {"value": compute(total, scale=scale, offset=offset), "label": unrelated.LABEL}


def failing(log: str):
    return boom(log)


def steady(scale: int = 1):
    return compute(load(str(HERE / "data.csv")), scale=scale)  # offset: its default, as in pipeline()
'''

HELPERS = """\
import helpers2
import unrelated


def transform(x):
    return helpers2.deep(x) + 1


def describe(x):
    return unrelated.shout(f"value {x}")
"""

HELPERS2 = """\
def deep(x):
    return x * 3
"""

UNRELATED = """\
LABEL = "unrelated"


def shout(text):
    return text.upper()
"""

FILES = {
    "pipeline.py": PIPELINE,
    "helpers.py": HELPERS,
    "helpers2.py": HELPERS2,
    "unrelated.py": UNRELATED,
    "data.csv": "1\n2\n3\n",
}

# One run of the pipeline in a fresh interpreter (the project's modules are imported anew).
# `-c`, not a script: the step processes' forkserver then has no main module to import again.
DRIVER = """
import json, sys
from distml.workflow.orchestrator import run_pipeline
from distml.workspace import Workspace
result = run_pipeline(Workspace(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))
print(json.dumps({"run_id": result.run_id, "status": result.status, "result": result.result}))
"""

MEMOIZED = ("load", "compute")  # stamp's max_age (0.5 s) has always passed by the next run


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISTML_DB_URL", "DISTML_HOME")}
    # No .pyc files: a file edited within the same second at the same size would run stale bytecode.
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "250"}


def _write_project(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in FILES.items():
        (folder / name).write_text(text)


def _steps(ws: Path, run_id: str) -> dict[str, dict]:
    """The latest execution row of each node of `run_id`."""
    workspace = Workspace(ws, f"sqlite:///{(ws / 'distml.db').resolve()}")
    try:
        assert get_workflow_run(workspace.engine, run_id) is not None
        rows = list_step_executions(workspace.engine, run_id)
    finally:
        workspace.close()
    return {row.node_id: row for row in sorted(rows, key=lambda r: r.generation)}


def _drive(project: Path, ws: Path, target: str, params: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ws), f"{project / 'pipeline.py'}:{target}", json.dumps(params)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclasses.dataclass
class Base:
    project: Path
    ws: Path
    run_id: str


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    """The first run, shared: every memoized step misses because nothing ran before."""
    root = tmp_path_factory.mktemp("memo")
    project, ws = root / "project", root / "ws"
    _write_project(project)
    out = _drive(project, ws, "pipeline", {"scale": 1})
    assert out["status"] == "succeeded" and out["result"] == {"value": 19, "label": "unrelated"}
    steps = _steps(ws, out["run_id"])
    for name in (*MEMOIZED, "stamp"):
        assert (steps[name].status, steps[name].cache) == ("succeeded", "miss")
        assert steps[name].cache_reason == "no earlier successful execution"
    return Base(project, ws, out["run_id"])


@dataclasses.dataclass
class Project:
    base: Base
    ws: Path

    @property
    def folder(self) -> Path:
        return self.base.project

    def edit(self, name: str, old: str, new: str) -> None:
        path = self.folder / name
        text = path.read_text()
        assert text.count(old) == 1, f"{old!r} is not in {name} exactly once"
        path.write_text(text.replace(old, new))

    def run(self, target: str = "pipeline", **params) -> tuple[dict, dict[str, dict]]:
        out = _drive(self.folder, self.ws, target, params)
        return out, _steps(self.ws, out["run_id"])

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "distml.cli", "--workspace", str(self.ws), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )


@pytest.fixture
def project(base, tmp_path) -> Project:
    """The project as the first run saw it, and a copy of the workspace that run left."""
    _write_project(base.project)  # the project stays where it is: its path names its module
    ws = tmp_path / "ws"
    shutil.copytree(base.ws, ws)
    return Project(base, ws)


def _hit(row: dict, base: Base) -> bool:
    assert row.cache in ("hit", "miss"), row
    if row.cache == "hit":
        assert row.status == "cached"
        assert row.cache_reason == f"same key as {base.run_id} {row.node_id}"
        return True
    assert row.status == "succeeded"
    return False


# -- changes that must not invalidate ----------------------------------------------------------

COSMETIC = {
    "comments": [
        (
            "pipeline.py",
            "    return helpers.transform(total * scale) + offset\n",
            "    # scale first, then the helpers\n    return helpers.transform(total * scale) + offset  # and offset\n",
        ),
        (
            "helpers.py",
            "    return helpers2.deep(x) + 1\n",
            "    # two calls deep\n    return helpers2.deep(x) + 1  # +1\n",
        ),
        ("helpers2.py", "    return x * 3\n", "    # the bottom of the chain\n    return x * 3  # three\n"),
    ],
    "docstrings": [
        ("pipeline.py", '"""Scale the total."""', '"""Scale the total, then transform it.\n\n    At length.\n    """'),
        ("helpers.py", "def transform(x):\n", 'def transform(x):\n    """Through the deep helper."""\n'),
        ("helpers2.py", "def deep(x):\n", "def deep(x):\n    '''Two calls deep.'''\n"),
    ],
    "formatting": [
        (
            "pipeline.py",
            "def compute(total, scale, offset=0):",
            "def compute(\n    total,\n    scale,\n    offset = 0,\n):",
        ),
        (
            "pipeline.py",
            "    return helpers.transform(total * scale) + offset\n",
            "\n    return (\n        helpers.transform(total*scale)\n        +offset\n    )\n",
        ),
        ("helpers.py", "    return helpers2.deep(x) + 1\n", "    return helpers2.deep( x )+1\n"),
        ("helpers2.py", "    return x * 3\n", "\n    return (x\n            * 3)\n"),
    ],
}


@pytest.mark.parametrize("change", sorted(COSMETIC))
def test_comments_docstrings_and_formatting_of_a_step_and_its_helpers_keep_the_cache(project, change):
    for name, old, new in COSMETIC[change]:
        project.edit(name, old, new)
    out, steps = project.run()
    assert out["result"]["value"] == 19
    assert [name for name in MEMOIZED if _hit(steps[name], project.base)] == list(MEMOIZED)


def test_a_change_in_a_module_no_step_calls_keeps_the_cache(project):
    # helpers.py imports unrelated and one of its functions uses it, but no step calls that one.
    (project.folder / "unrelated.py").write_text(
        'LABEL = "renamed"\n\n\ndef shout(text):\n    return text.lower() + "!"\n\n\ndef more():\n    return 1\n'
    )
    out, steps = project.run()
    assert out["result"] == {"value": 19, "label": "renamed"}  # the new module did run
    assert [name for name in MEMOIZED if _hit(steps[name], project.base)] == list(MEMOIZED)


def test_the_order_of_keyword_arguments_at_the_call_keeps_the_cache(project):
    project.edit(
        "pipeline.py", "compute(total, scale=scale, offset=offset)", "compute(total, offset=offset, scale=scale)"
    )
    out, steps = project.run()
    assert out["result"]["value"] == 19
    assert _hit(steps["compute"], project.base)


def test_a_run_in_which_every_step_is_a_cache_hit_succeeds(project):
    out, steps = project.run("steady")
    assert out["status"] == "succeeded" and out["result"] == 19
    assert [name for name in MEMOIZED if _hit(steps[name], project.base)] == list(MEMOIZED)


def test_an_expired_result_runs_again_and_says_so(project):
    time.sleep(0.6)  # past stamp's max_age of 0.5 s; compute's max_age of an hour has not passed
    _, steps = project.run()
    assert [name for name in MEMOIZED if _hit(steps[name], project.base)] == list(MEMOIZED)
    assert not _hit(steps["stamp"], project.base)
    assert re.fullmatch(r"expired: the last result is \d+ s old, max_age is 0.5 s", steps["stamp"].cache_reason)


# -- changes that must invalidate --------------------------------------------------------------


def test_changed_data_invalidates_the_step_that_fingerprints_it_and_its_consumers(project):
    (project.folder / "data.csv").write_text("1\n2\n4\n")
    out, steps = project.run()
    assert out["result"]["value"] == 22
    assert not _hit(steps["load"], project.base) and steps["load"].cache_reason == "data changed"
    assert not _hit(steps["compute"], project.base) and steps["compute"].cache_reason == "input total changed"


def test_a_changed_parameter_invalidates_and_runs_show_says_why(project):
    out, steps = project.run(scale=2)
    assert out["result"]["value"] == 37
    assert _hit(steps["load"], project.base)
    assert not _hit(steps["compute"], project.base)
    assert steps["compute"].cache_reason == "parameter scale: 1 -> 2"
    shown = project.cli("runs", "show", out["run_id"])
    assert shown.returncode == 0, shown.stderr
    lines = {m.group(1): m.string for m in map(re.compile(r"[✓✗] (\S+) ").search, shown.stdout.splitlines()) if m}
    assert "cache miss: parameter scale: 1 -> 2" in lines["compute"]
    assert f"cache hit (same key as {project.base.run_id} load)" in lines["load"]


def test_a_change_to_the_step_code_invalidates_it(project):
    project.edit("pipeline.py", "transform(total * scale) + offset", "transform(total * scale) + offset + 1")
    out, steps = project.run()
    assert out["result"]["value"] == 20
    assert _hit(steps["load"], project.base)
    module = file_module_name(project.folder / "pipeline.py")
    assert not _hit(steps["compute"], project.base)
    assert steps["compute"].cache_reason == f"code changed: {module}.compute"


def test_a_change_to_a_helper_two_calls_deep_invalidates_the_step(project):
    project.edit("helpers2.py", "x * 3", "x * 4")
    out, steps = project.run()
    assert out["result"]["value"] == 25
    assert _hit(steps["load"], project.base)
    assert not _hit(steps["compute"], project.base)
    assert steps["compute"].cache_reason == "code changed: helpers2.deep"


# -- failures and --refresh --------------------------------------------------------------------


def test_a_failed_step_is_never_cached(project, tmp_path):
    log = tmp_path / "boom.log"
    for attempt in (1, 2):
        out, steps = project.run("failing", log=str(log))
        assert out["status"] == "failed"
        assert (steps["boom"].status, steps["boom"].cache) == ("failed", "miss")
        assert steps["boom"].cache_reason == "no earlier successful execution"
        assert log.read_text() == "ran\n" * attempt  # it really ran again


@pytest.mark.parametrize(
    ("flags", "refreshed"), [(["--refresh"], {"load", "compute", "stamp"}), (["--refresh", "compute"], {"compute"})]
)
def test_refresh_runs_memoized_steps_again(project, flags, refreshed):
    target = f"{project.folder / 'pipeline.py'}:pipeline"
    out = project.cli("run", target, "--param", "scale=1", *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = re.search(r"^run (\S+) succeeded$", out.stdout, re.MULTILINE).group(1)
    steps = _steps(project.ws, run_id)
    for name in refreshed:
        assert not _hit(steps[name], project.base) and steps[name].cache_reason == "--refresh"
    for name in set(MEMOIZED) - refreshed:
        assert _hit(steps[name], project.base)


# -- code_version straight, in fresh interpreters ------------------------------------------------

CODE_VERSION = """
import json, sys
sys.path.insert(0, sys.argv[1])
from distml.workflow.codehash import code_version
import steps
print(json.dumps(code_version(steps.run).parts))
"""


def _code_parts(folder: Path, hash_seed: str) -> dict[str, str]:
    env = {**_env(), "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", CODE_VERSION, str(folder)], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_module_level_tables_a_step_reads_count_and_hash_alike_in_every_process(tmp_path):
    (tmp_path / "settings.py").write_text(
        'NAMES = frozenset({"alpha", "beta", "gamma", "delta"})\nTABLE = {"bonus": 1, "tags": {"x", "y", "z", "w"}}\n'
    )
    (tmp_path / "steps.py").write_text(
        "import settings\n\n\ndef run(name):\n    return settings.TABLE['bonus'] + (name in settings.NAMES)\n"
    )
    first = _code_parts(tmp_path, "1")
    assert {"steps.run:settings.NAMES", "steps.run:settings.TABLE"} <= set(first)
    assert _code_parts(tmp_path, "2") == first  # set order follows string hashes, which differ per process
    (tmp_path / "settings.py").write_text((tmp_path / "settings.py").read_text().replace('"bonus": 1', '"bonus": 2'))
    changed = _code_parts(tmp_path, "1")
    assert sorted(k for k in first if first[k] != changed.get(k)) == ["steps.run:settings.TABLE"]


def test_parsed_source_is_kept_across_runs_until_its_file_changes(tmp_path, monkeypatch):
    """A second run reads the code version of an unchanged file from the workspace's digests, not
    by parsing; an edit (a new size or modification time) is parsed again and changes the version;
    a file modified in the last two seconds is never kept (a same-size edit could keep its time)."""
    import ast
    import importlib.util

    from distml.workflow import codehash

    module_file = tmp_path / "cached_steps.py"
    store = tmp_path / "codehash.json"

    def load(text: str, mtime: float):
        module_file.write_text(text)
        os.utime(module_file, (mtime, mtime))
        spec = importlib.util.spec_from_file_location("cached_steps", module_file)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "cached_steps", module)
        spec.loader.exec_module(module)
        return module.double

    double = load("def double(x):\n    return x * 2\n", time.time() - 60)
    parsed = codehash.SourceDigests(store)
    first = codehash.code_version(double, parsed)
    assert codehash.SourceDigests(store).entries == {}  # written by save(), once per run
    parsed.save()
    assert len(codehash.SourceDigests(store).entries) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again")

    with monkeypatch.context() as m:
        m.setattr(ast, "parse", no_parsing)
        assert codehash.code_version(double, codehash.SourceDigests(store)).digest == first.digest

    tripled = load("def double(x):\n    return x * 3\n", time.time() - 30)  # same size, another time
    again = codehash.SourceDigests(store)
    assert codehash.code_version(tripled, again).digest != first.digest
    again.save()
    assert len(codehash.SourceDigests(store).entries) == 1  # the old file's entry is gone

    fresh = load("def double(x):\n    return x * 4\n", time.time())
    recent = codehash.SourceDigests(store)
    codehash.code_version(fresh, recent)
    assert not recent.changed  # too recent to keep
