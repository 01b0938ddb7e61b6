"""The main job's `select` moves `@production` only to a better candidate (the watch's `decide`),
measured on the data set's fixed test split; `distml run --margin/--promote` set that rule."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from distml.cli import main
from distml.data import datasets
from distml.data.loader import Loader
from distml.data.preprocess import Normalize
from distml.models import registry
from distml.models.artifact import IMAGE_INPUT_SPEC, register_as, resolve_model, save_model, set_alias
from distml.pipelines.end_to_end import select, select_model

NAME = "digits-classifier"
SPLITS = {"train": {"snapshot_id": "s-1"}, "test": {"snapshot_id": "s-2"}}
DATA = {"dataset": "digits", "data_dir": None, "splits": SPLITS}


def linear_model(ws, weight: torch.Tensor, bias: torch.Tensor, name: str):
    """A registered `mlp` of no hidden layer (one Linear over the 28x28 pixels) with these weights."""
    from distml.models.zoo import build_model

    model = build_model("mlp", depth=0, width=1)
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    normalize = Normalize("image", mean=datasets.DIGITS_MEAN, std=datasets.DIGITS_STD, scale=1 / 16)
    return save_model(
        ws,
        model,
        name=name,
        architecture="mlp",
        arch_args={"depth": 0, "width": 1},
        input_spec=IMAGE_INPUT_SPEC,
        preprocessing={
            **datasets.pixel_serving((28, 28), datasets.DIGITS_MEAN, datasets.DIGITS_STD),
            "dataset": "digits",
            "steps": normalize.params(),
            "key": normalize.key,
        },
        class_names=[str(i) for i in range(10)],
        metrics={},
        training={"seed": 0},
        data_fingerprint=None,
    )


@pytest.fixture
def models(workspace):
    """`good`: a nearest-class-mean classifier fitted on the digits train split (~0.9 on the test
    split); `bad`: a constant answer of class 0 (~0.1)."""
    ds = datasets.get_dataset("digits", workspace, None, progress=False)
    sums, counts = torch.zeros(10, 28 * 28), torch.zeros(10)
    loader = Loader(ds.splits["train"], batch_size=512, shuffle=False, preprocess=ds.preprocess, cache="memory")
    for batch in loader:
        x, y = batch["image"].reshape(len(batch["label"]), -1).float(), batch["label"].long()
        sums.index_add_(0, y, x)
        counts += torch.bincount(y, minlength=10).float()
    means = sums / counts[:, None]
    good = linear_model(workspace, means, -0.5 * (means**2).sum(1), "good")
    bad = linear_model(workspace, torch.zeros(10, 28 * 28), torch.eye(10)[0], "bad")
    return good.ref, bad.ref


def make_production(ws, ref: str) -> str:
    record = register_as(ws, ref, NAME)
    set_alias(ws, NAME, "production", record.version)
    return record.ref


def production_version(ws) -> int | None:
    return registry.get_model_alias(ws.engine, NAME, "production")


def test_a_candidate_worse_than_production_is_kept_out_and_promote_always_moves_it(workspace, models):
    good, bad = models
    kept = make_production(workspace, good)
    out = select_model(workspace, [{"model": bad}], DATA, NAME)
    assert out["action"] == "kept" and out["model"] == kept  # what `serve` serves: production's model
    assert out["candidate"] == bad and out["scores"][bad] < 0.2 < 0.8 < out["production"]["test_accuracy"]
    assert out["test_accuracy"] == out["production"]["test_accuracy"]
    assert "is not above production" in out["reason"] and "margin 0" in out["reason"]
    assert production_version(workspace) == 1
    assert [row.version for row in registry.list_model_versions(workspace.engine, NAME)] == [1]

    out = select_model(workspace, [{"model": bad}], DATA, NAME, promote="always")
    assert out["action"] == "promoted" and "promote=always" in out["reason"]
    assert production_version(workspace) == 2 and out["model"] == f"{NAME}:2"
    assert resolve_model(workspace, f"{NAME}@production").manifest["lineage"]["candidate"] == bad


def test_a_better_candidate_is_promoted_unless_the_margin_asks_for_more(workspace, models):
    good, bad = models
    make_production(workspace, bad)
    out = select_model(workspace, [{"model": bad}, {"model": good}], DATA, NAME, margin=0.99)
    assert (out["action"], out["candidate"], production_version(workspace)) == ("kept", good, 1)
    assert "margin 0.99" in out["reason"]
    out = select_model(workspace, [{"model": bad}, {"model": good}], DATA, NAME, margin=0.5)
    assert (out["action"], out["model"], production_version(workspace)) == ("promoted", f"{NAME}:2", 2)
    assert "> production" in out["reason"]


def test_the_first_model_becomes_production(workspace, models):
    good, bad = models
    out = select_model(workspace, [{"model": bad}], DATA, NAME)
    assert out["production"] is None and out["action"] == "promoted" and out["reason"].startswith("first model")
    assert production_version(workspace) == 1


def test_select_steps_defaults_are_the_gate():
    import inspect

    parameters = inspect.signature(select.fn).parameters
    assert (parameters["margin"].default, parameters["promote"].default) == (0.0, "better")


PIPELINES = """
from distml.workflow import step

@step
def echo(margin: float, promote: str) -> dict:
    return {"margin": margin, "promote": promote}

def gated(margin: float = 0.0, promote: str = "better"):
    return echo(margin, promote)

def plain(n: int = 1):
    return echo(n, "n")
"""


def test_run_passes_margin_and_promote_only_to_a_pipeline_that_declares_them(tmp_path):
    path = tmp_path / "pipe.py"
    path.write_text(textwrap.dedent(PIPELINES))
    ws = str(tmp_path / "ws")

    def run(*args):
        return CliRunner().invoke(main, ["--workspace", ws, "run", *args])

    out = run(f"{path}:gated", "--margin", "0.25", "--promote", "always")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output[out.output.index("{") :]) == {"margin": 0.25, "promote": "always"}
    out = run(f"{path}:plain")  # not given: the flags' defaults are not passed on
    assert out.exit_code == 0, out.output
    for flag, value in (("--margin", "0.1"), ("--promote", "always")):
        out = run(f"{path}:plain", flag, value)
        assert out.exit_code == 2, out.output
        key = flag.removeprefix("--")
        assert f"{flag} sets a pipeline's `{key}` parameter, which {path}:plain does not have" in out.output
    out = run(f"{path}:gated", "--promote", "sometimes")
    assert out.exit_code == 2 and "'sometimes' is not one of 'better', 'always'" in out.output
    shown = " ".join(run("--help").output.split())  # the pipeline's defaults, shown
    assert "--margin FLOAT" in shown and "[default: 0.0]" in shown and "[default: better]" in shown
