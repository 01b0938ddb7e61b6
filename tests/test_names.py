"""Names no one wrote by hand: `../`, a NUL, 300 characters, for every kind of name a user gives.

Each is refused with one clear error naming what is expected, and nothing is written outside the
workspace (nor a folder named after it inside).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from distml.cli import main
from distml.core.errors import DistmlError

BAD = {"dots": "../escape", "nul": "a\x00b", "long": "a" * 300, "slash": "a/b", "empty": ""}


def run(tmp_path, *args: str):
    return CliRunner().invoke(main, ["--workspace", str(tmp_path / "ws"), *args])


def commands(name: str) -> dict[str, tuple[str, ...]]:
    return {
        "model": ("models", "alias", f"{name}:1", "champion"),
        "alias": ("models", "alias", "cnn:1", name),
        "served model": ("serve", name),
        "service": ("services", "logs", name),
        "stopped service": ("services", "stop", name),
        "queue": ("queue", "set", name, "--weight", "1"),
        "watch": ("watch", "--source", ".", "--name", name),
        "lineage": ("lineage", name),
    }


@pytest.mark.parametrize(
    "kind", ["model", "alias", "served model", "service", "stopped service", "queue", "watch", "lineage"]
)
@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_name_is_refused_with_one_clear_error(tmp_path, kind, bad):
    name = BAD[bad]
    args = commands(name)[kind]
    out = run(tmp_path, *args)
    assert out.exit_code == 2, (args, out.output)
    assert out.output.count("error:") == 1 and "Traceback" not in out.output, out.output
    clear = ("expected", "must", "is not valid", "match", "letters", "no service", "at most", "at least")
    assert any(word in out.output for word in clear), out.output
    outside = [p for p in tmp_path.iterdir() if p.name != "ws"]
    assert outside == [], f"{args} wrote {outside}"
    assert not (tmp_path / "escape").exists() and not list((tmp_path / "ws").rglob("*escape*"))


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_step_name_is_refused(bad):
    from distml.workflow import step

    with pytest.raises(DistmlError, match="step name"):
        step(name=BAD[bad])(lambda: 1)
