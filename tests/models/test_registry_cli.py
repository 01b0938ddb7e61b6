"""`distml models` and `distml models alias` as a user runs them: real subprocesses on a real registry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distml.core.errors import DistmlError
from distml.models.artifact import IMAGE_INPUT_SPEC, list_models, resolve_model, save_model, set_alias, unset_alias
from distml.models.registry import delete_model_alias, get_model_alias
from distml.models.zoo import build_model

PREPROCESSING = {
    "input": {"shape": [28, 28], "dtype": "UINT8"},
    "normalization": {"scale": 1 / 255, "mean": 0.286, "std": 0.353},
}
ARCH_ARGS = {"width": 8, "depth": 1}  # a tiny mlp: each save takes milliseconds


def _save(workspace, name="cnn", accuracy=0.9):
    return save_model(
        workspace,
        build_model("mlp", **ARCH_ARGS),
        name=name,
        architecture="mlp",
        arch_args=ARCH_ARGS,
        input_spec=IMAGE_INPUT_SPEC,
        preprocessing=PREPROCESSING,
        class_names=[str(k) for k in range(10)],
        metrics={"test_accuracy": accuracy, "steps": 20},
        training={"epochs": 1},
        data_fingerprint=None,
    )


@pytest.fixture
def registry(workspace):
    """A workspace holding cnn:1 (test accuracy 0.81) and cnn:2 (0.9234)."""
    assert _save(workspace, accuracy=0.81).version == 1
    assert _save(workspace, accuracy=0.9234).version == 2
    return workspace


def distml(workspace, *args):
    return subprocess.run(
        [sys.executable, "-m", "distml.cli", "--workspace", str(workspace.root), "models", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def distml_in_process(workspace, *args):
    """The same CLI code without a new interpreter (click's runner): for the many bad-input cases."""
    from click.testing import CliRunner

    from distml.cli import main

    result = CliRunner().invoke(main, ["--workspace", str(workspace.root), "models", *args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _ok(out) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def _one_error(out) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert out.stdout == ""
    return lines[0]


def _table_rows(stdout: str) -> list[list[str]]:
    """The cells of the rich table's body rows, top to bottom: name, version, created, metrics, aliases."""
    rows = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 5 and cells[1].isdigit():
            rows.append(cells)
    return rows


def test_alias_set_then_resolve_and_move(registry):
    assert _ok(distml(registry, "alias", "cnn:1", "champion")).strip() == "cnn@champion -> cnn:1"
    assert resolve_model(registry, "cnn@champion").version == 1
    # MODEL alone is the latest version; moving the alias says where from.
    assert _ok(distml(registry, "alias", "cnn", "champion")).strip() == "cnn@champion -> cnn:2 (moved from cnn:1)"
    assert resolve_model(registry, "cnn@champion").version == 2
    assert _ok(distml(registry, "alias", "cnn:1", "champion")).strip() == "cnn@champion -> cnn:1 (moved from cnn:2)"
    assert resolve_model(registry, "cnn@champion").version == 1
    assert [(r.version, r.aliases) for r in list_models(registry)] == [(2, []), (1, ["champion"])]


def test_unset_then_resolving_fails_clearly(registry):
    set_alias(registry, "cnn", "champion", 2)
    set_alias(registry, "cnn", "canary", 1)
    assert _ok(distml_in_process(registry, "alias", "cnn:2", "champion", "--unset")).strip() == (
        "removed cnn@champion (it pointed at cnn:2)"
    )
    with pytest.raises(DistmlError, match=r"model 'cnn' has no alias 'champion'; its aliases are canary \(-> cnn:1\)"):
        resolve_model(registry, "cnn@champion")
    # MODEL alone removes the alias whatever version it points at.
    assert "removed cnn@canary (it pointed at cnn:1)" in _ok(
        distml_in_process(registry, "alias", "cnn", "canary", "--unset")
    )
    assert all(r.aliases == [] for r in list_models(registry))
    # The versions themselves are untouched.
    assert [r.version for r in list_models(registry)] == [2, 1]


def test_unset_of_an_alias_moved_elsewhere_removes_nothing(registry):
    set_alias(registry, "cnn", "champion", 1)
    line = _one_error(distml_in_process(registry, "alias", "cnn:2", "champion", "--unset"))
    assert "cnn@champion points at version 1, not 2" in line and "nothing was removed" in line
    assert resolve_model(registry, "cnn@champion").version == 1


def test_list_shows_versions_metrics_and_aliases(registry):
    _save(registry, name="other", accuracy=0.5)
    set_alias(registry, "cnn", "champion", 2)
    set_alias(registry, "cnn", "canary", 2)
    set_alias(registry, "cnn", "baseline", 1)
    for args in [(), ("list",), ("list", "cnn")]:
        out = _ok(distml(registry, *args))
        for column in ("name", "version", "created", "metrics", "aliases"):
            assert column in out
        rows = _table_rows(out)
        cnn = [cells for cells in rows if cells[0] == "cnn"]
        assert [cells[1] for cells in cnn] == ["2", "1"]  # newest version first
        assert "test_accuracy=0.9234" in cnn[0][3] and "steps=20" in cnn[0][3]
        assert "test_accuracy=0.8100" in cnn[1][3]
        assert cnn[0][4] == "canary, champion" and cnn[1][4] == "baseline"
        assert cnn[0][2][:2] == "20" and len(cnn[0][2]) == len("2025-01-01 00:00:00")
        assert [cells[0] for cells in rows] == (["cnn", "cnn"] if args == ("list", "cnn") else ["cnn", "cnn", "other"])
    rows = _table_rows(_ok(distml(registry, "list", "other")))
    assert [cells[:2] for cells in rows] == [["other", "1"]] and "test_accuracy=0.5000" in rows[0][3]


def test_list_with_nothing_registered(workspace):
    out = _ok(distml_in_process(workspace))
    assert out.strip() == f"no models are registered in {workspace.root}; `distml train` registers one"
    assert _ok(distml_in_process(workspace, "list")) == out
    line = _one_error(distml_in_process(workspace, "list", "cnn"))
    assert line == "error: no model named 'cnn' is registered; no models are registered yet"


@pytest.mark.parametrize(
    "args, message",
    [
        (("alias", "cnn:x", "champion"), "model reference 'cnn:x' is not valid (the version must be a positive"),
        (("alias", "cnn:0", "champion"), "model reference 'cnn:0' is not valid"),
        (("alias", "cnn:", "champion"), "model reference 'cnn:' is not valid"),
        (("alias", ":2", "champion"), "model reference ':2' is not valid"),
        (("alias", "cnn@champion", "staging"), "model reference 'cnn@champion' is not valid"),
        (("alias", "ghost", "champion"), "no model named 'ghost' is registered; registered models: cnn"),
        (("alias", "ghost:1", "champion"), "no model named 'ghost' is registered; registered models: cnn"),
        (("alias", "cnn:3", "champion"), "model 'cnn' has no version 3; its versions are 1 to 2"),
        (("alias", "cnn:1", "bad alias"), "alias 'bad alias' is not valid; expected 1-200 letters"),
        (("alias", "cnn:1", "x@y"), "alias 'x@y' is not valid"),
        (("alias", "cnn", "a" * 64), "alias '" + "a" * 64 + "' is not valid"),
        (("alias", "bad name", "champion"), "model reference 'bad name' is not valid (the name must be 1-200"),
        (("alias", "cnn:x", "champion", "--unset"), "model reference 'cnn:x' is not valid"),
        (("alias", "ghost", "champion", "--unset"), "no model named 'ghost' is registered"),
        (("alias", "cnn:3", "champion", "--unset"), "model 'cnn' has no version 3; its versions are 1 to 2"),
        (("alias", "cnn", "bad alias", "--unset"), "alias 'bad alias' is not valid"),
        (
            ("alias", "cnn", "staging", "--unset"),
            "model 'cnn' has no alias 'staging'; its aliases are champion (-> cnn:1)",
        ),
        (("list", "ghost"), "no model named 'ghost' is registered; registered models: cnn"),
    ],
)
def test_bad_input_is_one_error_line_and_changes_nothing(registry, args, message):
    set_alias(registry, "cnn", "champion", 1)
    before = list_models(registry)
    line = _one_error(distml_in_process(registry, *args))
    assert message in line
    assert list_models(registry) == before
    assert resolve_model(registry, "cnn@champion").version == 1


def test_help_says_model_alone_is_the_latest_version(workspace):
    out = _ok(distml_in_process(workspace, "alias", "--help"))
    assert "MODEL alone means its latest version" in " ".join(out.split())
    assert "--unset" in out


def test_unset_alias_api(registry):
    set_alias(registry, "cnn", "champion", 2)
    with pytest.raises(DistmlError, match="points at version 2, not 1"):
        unset_alias(registry, "cnn", "champion", 1)
    with pytest.raises(DistmlError, match="alias version must be a positive integer or None, got True"):
        unset_alias(registry, "cnn", "champion", True)
    assert unset_alias(registry, "cnn", "champion", 2) == 2
    assert get_model_alias(registry.engine, "cnn", "champion") is None
    with pytest.raises(DistmlError, match="model 'cnn' has no alias 'champion'; it has no aliases"):
        unset_alias(registry, "cnn", "champion")
    # The store-level function: None when nothing matches, the old version when something was removed.
    set_alias(registry, "cnn", "champion", 1)
    assert delete_model_alias(registry.engine, "cnn", "nope") is None
    assert delete_model_alias(registry.engine, "cnn", "champion", 2) is None
    assert get_model_alias(registry.engine, "cnn", "champion") == 1
    assert delete_model_alias(registry.engine, "cnn", "champion") == 1
    assert get_model_alias(registry.engine, "cnn", "champion") is None
