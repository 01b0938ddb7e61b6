"""TrainConfig: its sections, the previous release's flat form, and run ids that never change.

A run's id is a digest of the settings that define its result; running the same command again
resumes that run, so the ids below (computed by the release before the sections) must not change.
"""

from __future__ import annotations

import json

import pytest

from distml.core.errors import DistmlError
from distml.core.layout import WorkspaceRef
from distml.train.config import TrainConfig, load_config, parse_config

# (nested settings, the same settings in the previous release's flat form, the run id of both)
RUNS = {
    "defaults": ({}, {}, "cnn-digits-be0878875e0f"),
    "parameter-server async": (
        {
            "parallelism": {
                "strategy": "parameter-server",
                "ps_shards": 2,
                "ps_mode": "async",
                "ps_staleness": 3,
                "workers": 3,
            }
        },
        {"strategy": "parameter-server", "ps_shards": 2, "ps_mode": "async", "ps_staleness": 3, "workers": 3},
        "cnn-digits-c39a75dd32a0",
    ),
    "sgd with lr": (
        {"optimizer": {"name": "sgd", "lr": 0.05}, "data": {"batch_size": 32}, "training": {"epochs": 3}},
        {"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 3},
        "cnn-digits-96ea9dc0a4ed",
    ),
    "train files and warm start": (
        {
            "data": {"train_files": ["a.npz", "b.npz"], "dataset": "fashion-mnist"},
            "model": {"init_from": "digits-cnn:2"},
        },
        {"train_files": ["a.npz", "b.npz"], "init_from": "digits-cnn:2", "dataset": "fashion-mnist"},
        "cnn-fashion-mnist-53ae9a5136b6",
    ),
    "model args": (
        {"model": {"name": "mlp", "args": {"hidden": [64, 32], "dropout": 0.1}}, "training": {"seed": 7}},
        {"model": "mlp", "model_args": {"hidden": [64, 32], "dropout": 0.1}, "seed": 7},
        "mlp-digits-41444b31be5c",
    ),
    "max steps, and settings outside the id": (
        {
            "training": {"max_steps": 100, "device": "cpu"},
            "checkpoint": {"every": 10},
            "parallelism": {"workers": 4, "nnodes": "1:2", "rdzv_endpoint": "h:1"},
            "job": {"queue": "q", "priority": "high"},
            "workspace": {"root": "/tmp/x", "db_url": "sqlite:///y"},
        },
        {
            "max_steps": 100,
            "checkpoint_every": 10,
            "device": "cpu",
            "workers": 4,
            "nnodes": "1:2",
            "rdzv_endpoint": "h:1",
            "queue": "q",
            "priority": "high",
            "workspace": "/tmp/x",
            "db_url": "sqlite:///y",
        },
        "cnn-digits-2624dda83427",
    ),
}


@pytest.mark.parametrize("name", RUNS)
def test_run_ids_do_not_change(name):
    nested, flat, run_id = RUNS[name]
    assert parse_config(nested).resolved_run_id() == run_id
    assert parse_config(flat).resolved_run_id() == run_id, "the flat form of the same settings"
    assert parse_config(nested) == parse_config(flat)
    assert parse_config(nested).flat() == {**TrainConfig().flat(), **flat}


def test_a_given_run_id_wins_and_names_the_run_dir(tmp_path):
    config = parse_config({"job": {"run_id": "mine"}, "workspace": {"root": str(tmp_path)}})
    assert config.resolved_run_id() == "mine"
    assert config.run_dir() == tmp_path / "runs" / "mine"


def test_a_config_file_of_the_previous_release_loads(tmp_path):
    """A run written by the release before the sections resumes: its flat config.json loads."""
    old = {
        "model": "mlp",
        "model_args": {"width": 32},
        "dataset": "digits",
        "data_dir": None,
        "train_files": None,
        "init_from": None,
        "workers": 2,
        "strategy": "allreduce",
        "epochs": 1,
        "max_steps": None,
        "batch_size": 64,
        "lr": None,
        "optimizer": "adam",
        "seed": 0,
        "device": "auto",
        "checkpoint_every": 50,
        "max_restarts": 0,
        "nnodes": "1",
        "rdzv_endpoint": None,
        "rdzv_last_call_timeout": 5,
        "rdzv_keep_alive": 5,
        "ps_shards": 1,
        "ps_mode": "sync",
        "ps_staleness": None,
        "workspace": str(tmp_path),
        "db_url": f"sqlite:///{tmp_path}/distml.db",
        "run_id": None,
        "metrics_port": None,
        "log_samples": False,
        "threads": None,
        "queue": "default",
        "priority": "normal",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    config = load_config(path)
    assert config.model.name == "mlp" and config.model.args == {"width": 32}
    assert config.training.epochs == 1 and config.parallelism.workers == 2
    assert config.workspace == WorkspaceRef(root=str(tmp_path), db_url=f"sqlite:///{tmp_path}/distml.db")
    assert config.flat() == old, "the flat form round-trips"
    assert (
        config.resolved_run_id()
        == parse_config({"model": {"name": "mlp", "args": {"width": 32}}, "training": {"epochs": 1}}).resolved_run_id()
    )
    # what the launcher now writes is the nested form, and it loads the same
    path.write_text(config.model_dump_json())
    assert load_config(path) == config
    assert set(json.loads(path.read_text())) == {
        "model",
        "data",
        "optimizer",
        "training",
        "parallelism",
        "checkpoint",
        "job",
        "workspace",
    }


def test_flat_and_nested_keys_mix_but_not_twice():
    config = parse_config({"epochs": 2, "parallelism": {"workers": 3}, "model": "mlp"})
    assert (config.training.epochs, config.parallelism.workers, config.model.name) == (2, 3, "mlp")
    with pytest.raises(DistmlError, match="epochs.*training.epochs"):
        parse_config({"epochs": 2, "training": {"epochs": 3}})


def test_errors_name_the_dotted_location():
    with pytest.raises(DistmlError, match=r"parallelism\.workers"):
        parse_config({"parallelism": {"workers": 0}})
    with pytest.raises(DistmlError, match=r"parallelism\.workers"):
        parse_config({"workers": 0})  # the flat form's errors name the new location too
    with pytest.raises(DistmlError, match=r"training\.epochs"):
        parse_config({"training": {"epochs": 0}})
    with pytest.raises(DistmlError, match=r"training\.bogus.*[Ee]xtra"):
        parse_config({"training": {"bogus": 1}})
    with pytest.raises(DistmlError, match=r"job\.priority"):
        parse_config({"job": {"priority": "urgent-ish"}})
    with pytest.raises(DistmlError, match="optimizer.*'sgd' needs lr"):
        parse_config({"optimizer": {"name": "sgd"}})
    with pytest.raises(DistmlError, match="parallelism.*needs rdzv_endpoint"):
        parse_config({"parallelism": {"nnodes": "1:2"}})
    with pytest.raises(DistmlError, match="config.*bogus"):
        parse_config({"bogus": 1})


def test_updated_changes_settings_by_location_and_validates_again(tmp_path):
    config = parse_config({"parallelism": {"workers": 4}})
    ref = WorkspaceRef.of(tmp_path)
    changed = config.updated({"parallelism.workers": 1, "job.run_id": "r", "workspace": ref})
    assert (changed.parallelism.workers, changed.job.run_id, changed.workspace) == (1, "r", ref)
    assert config.parallelism.workers == 4, "a copy"
    with pytest.raises(DistmlError, match=r"parallelism\.workers"):
        config.updated({"parallelism.workers": 0})


def test_derived_settings():
    config = parse_config(
        {
            "parallelism": {
                "workers": 2,
                "strategy": "parameter-server",
                "ps_shards": 3,
                "nnodes": "1:4",
                "rdzv_endpoint": "h:1",
            }
        }
    )
    assert config.procs_per_node == 5 and config.max_nodes == 4
    assert parse_config({"training": {"threads": 3}}).threads_per_process(8) == 3
    assert parse_config({"optimizer": {"lr": 0.1}}).learning_rate(4) == 0.1
    assert parse_config({"data": {"batch_size": 16}}).learning_rate(4) == pytest.approx(1e-3)
