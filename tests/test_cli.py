"""The `distml` command as a user runs it: real subprocesses, real exit codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distml import __version__


def distml(*args, workspace, env=None):
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "distml.cli", "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full_env,
    )


def test_help_and_version(tmp_path):
    out = distml("--help", workspace=tmp_path)
    assert out.returncode == 0 and "data" in out.stdout and "version" in out.stdout
    out = distml("version", workspace=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"distml {__version__}"


def test_prepare_and_inspect_digits(tmp_path):
    out = distml("data", "prepare", "--dataset", "digits", workspace=tmp_path / "ws")
    assert out.returncode == 0, out.stderr
    assert "1437" in out.stdout and "360" in out.stdout
    caches = [p for p in (tmp_path / "ws" / "cache" / "data").iterdir() if p.is_dir()]
    assert len(caches) == 2
    out = distml("data", "inspect", "--dataset", "digits", workspace=tmp_path / "ws")
    assert out.returncode == 0, out.stderr
    assert "8x8" in out.stdout and "uint8" in out.stdout and "class balance" in out.stdout
    assert "142" in out.stdout  # train images of digit 0
    from distml.lineage.store import list_datasets
    from distml.workspace import Workspace

    rows = list_datasets(Workspace(tmp_path / "ws").engine, "digits")
    assert sorted(r.split for r in rows) == ["test", "train"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("data", "inspect", "--dataset", "nope"), "unknown data set 'nope'"),
        (("data", "prepare", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/folder"), "/nonexistent/folder"),
        (("services", "stop", "nope"), "no service 'nope' in "),
        (("services", "logs", "nope"), "no service 'nope' in "),
        (("runs", "show", "nope", "--json"), "no workflow run 'nope'"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    out = distml(*args, workspace=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert "Traceback" not in out.stderr


def test_a_service_whose_gateway_died_lists_as_gone_and_stop_removes_its_stale_record(tmp_path):
    """A stand-in for a gateway (a real process, its record as `ensure_serving` writes it), then
    killed with SIGKILL: listed as gone without failing the command; `services stop` cleans up.
    tests/serve/test_cli_services.py does the same with a real gateway."""
    from distml.core.layout import ServiceRecord
    from distml.core.liveness import process_identity

    ws = tmp_path / "ws"
    assert json.loads(distml("services", "--json", workspace=ws).stdout) == []
    assert "no services in" in distml("services", workspace=ws).stdout
    proc = subprocess.Popen(["sleep", "600"])
    try:
        ServiceRecord("old", "http://127.0.0.1:9", "cnn:1", proc.pid, process_identity(proc.pid)).write(ws)
        (alive,) = json.loads(distml("services", "list", "--json", workspace=ws).stdout)
        # its process runs, its gateway does not answer: running, with why nothing more is known
        assert (alive["state"], alive["ready"]) == ("running", None)
        assert "cannot reach the gateway at http://127.0.0.1:9" in alive["error"]
    finally:
        proc.kill()
        proc.wait()
    out = distml("services", "--json", workspace=ws)
    assert out.returncode == 0, out.stderr
    (gone,) = json.loads(out.stdout)
    assert (gone["name"], gone["state"], gone["model"], gone["pid"]) == ("old", "gone", "cnn:1", proc.pid)
    table = distml("services", workspace=ws)
    assert table.returncode == 0 and "gone" in table.stdout and "http://127.0.0.1:9" in table.stdout
    stop = distml("services", "stop", "old", workspace=ws)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.startswith("service old was gone") and "removed its stale record" in stop.stdout
    assert ServiceRecord.read(ws, "old", alive=False) is None
    again = distml("services", "stop", "old", workspace=ws)
    assert again.returncode == 2 and "no service 'old'" in again.stderr and "it is stopped" in again.stderr
    missing = distml("services", "logs", "old", workspace=ws)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "no gateway log for service 'old'" in missing.stderr and "it has no logs" in missing.stderr


def test_fashion_mnist_offline_says_where_to_put_the_files(tmp_path):
    out = distml(
        "data",
        "prepare",
        "--dataset",
        "fashion-mnist",
        workspace=tmp_path,
        env={"DISTML_FASHION_MNIST_URL": "http://127.0.0.1:9/"},
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in out.stderr
    assert "--data-dir" in out.stderr


def _settings(model) -> dict:
    """The fields of a config model by dotted location, through its sections (nested models)."""
    from pydantic import BaseModel

    out = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update({f"{name}.{inner}": f for inner, f in _settings(field.annotation).items()})
        out[name] = field
    return out


@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("train", "distml.train.config:TrainConfig"),
        ("watch", "distml.pipelines.continuous:WatchConfig"),
    ],
)
def test_each_setting_has_one_default_the_config_models(command, config):
    """A flag that sets a config field either takes its default from the model (ConfigDefault) or
    has none (None: the model's applies); a second copy of a default in the CLI fails here."""
    import importlib

    import click

    from distml.cli import ConfigDefault, main

    module, _, name = config.partition(":")
    settings = _settings(getattr(importlib.import_module(module), name))
    names = {location.rpartition(".")[2] for location in settings}
    ctx = click.Context(main.commands[command])
    checked = 0
    for param in main.commands[command].params:
        if isinstance(param, ConfigDefault):
            source = importlib.import_module(param.config.partition(":")[0])
            model = getattr(source, param.config.partition(":")[2])
            field = _settings(model)[param.field]  # a dotted location that exists
            assert param.get_default(ctx) == field.get_default(call_default_factory=True)
            checked += 1
        elif param.name in names and not (param.required or param.multiple or param.is_flag):
            if param.name in ("queue", "priority"):  # the scheduler's flags, shared by every command
                continue
            assert param.default is None, f"--{param.name} copies a default its config model holds"
    assert checked >= 8


def test_train_flags_set_the_settings_of_the_sections(tmp_path):
    """Each `distml train` flag lands at its setting's location; unset flags give the models' defaults."""
    from distml.cli import config_values, main
    from distml.train.config import TrainConfig, parse_config

    command = main.commands["train"]
    args = ["--model", "mlp", "--workers", "3", "--epochs", "2", "--checkpoint-every", "5", "--lr", "0.1"]
    args += ["--strategy", "parameter-server", "--ps-shards", "2", "--queue", "q", "--rdzv-last-call", "9"]
    ctx = command.make_context("train", args)
    options = dict(ctx.params)
    values = config_values(ctx, options)
    assert set(options) == {"model_args", "train_files", "data_dir"}, "every other flag names its setting"
    config = parse_config(values)
    assert (config.model.name, config.parallelism.workers, config.training.epochs) == ("mlp", 3, 2)
    assert (config.checkpoint.every, config.optimizer.lr, config.parallelism.ps_shards) == (5, 0.1, 2)
    assert (config.job.queue, config.parallelism.rdzv_last_call_timeout) == ("q", 9)
    defaults = parse_config(config_values(ctx := command.make_context("train", []), dict(ctx.params)))
    assert defaults == TrainConfig()


def test_a_changed_config_default_shows_in_the_help(monkeypatch):
    from click.testing import CliRunner

    from distml.cli import main
    from distml.train.config import TrainingSection

    monkeypatch.setattr(TrainingSection.model_fields["epochs"], "default", 7)
    out = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--epochs INTEGER" in out and "[default: 7]" in out
