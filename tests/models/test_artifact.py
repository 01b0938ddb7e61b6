"""Model artifacts: exact round trips, versions and aliases, refusal of bad manifests and weights, no pickle."""

from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pytest
import safetensors.torch
import sqlalchemy as sa
import torch

from distml.core.errors import DistmlError
from distml.models import artifact
from distml.models.artifact import (
    IMAGE_INPUT_SPEC,
    ModelRecord,
    list_models,
    load_model,
    resolve_model,
    save_model,
    set_alias,
)
from distml.models.zoo import build_model, count_parameters
from distml.workspace import Workspace

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _save(workspace, model=None, **overrides) -> ModelRecord:
    kwargs = dict(
        name="fashion",
        architecture="cnn",
        arch_args={},
        input_spec=IMAGE_INPUT_SPEC,
        preprocessing={"scale": 1 / 255, "mean": 0.286, "std": 0.353},
        class_names=CLASSES,
        metrics={"accuracy": 0.91, "loss": 0.25},
        training={"epochs": 2, "lr": 0.001, "strategy": "allreduce", "workers": 2},
        data_fingerprint="ab" * 32,
        lineage={"dataset_ids": [1, 2], "execution_id": 7},
    )
    kwargs.update(overrides)
    if model is None:
        model = build_model(kwargs["architecture"], **kwargs["arch_args"])
    return save_model(workspace, model, **kwargs)


def _outputs(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(torch.rand(8, 28, 28))


def _put_manifest(workspace, manifest) -> str:
    return workspace.artifacts.put_bytes(json.dumps(manifest).encode())


@pytest.mark.parametrize("arch", ["cnn", "dropout", "batch_norm"])
def test_round_trip_gives_identical_outputs(workspace, arch):
    torch.manual_seed(0)
    model = build_model(arch)
    model.train()
    model(torch.rand(16, 28, 28))  # move batch-norm running statistics away from their defaults
    record = _save(workspace, model, architecture=arch)
    assert (record.name, record.version) == ("fashion", 1)
    loaded, manifest = load_model(workspace, "fashion")
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(model))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert manifest == record.manifest
    assert manifest["architecture"] == arch and manifest["class_names"] == CLASSES
    assert manifest["input_spec"] == {"name": "image", "shape": [28, 28], "datatype": "FP32"}
    assert manifest["weights_digest"] == record.weights_digest and manifest["format_version"] == 1
    assert manifest["num_parameters"] == count_parameters(model)
    assert manifest["lineage"] == {"dataset_ids": [1, 2], "execution_id": 7}
    assert manifest["data_fingerprint"] == "ab" * 32 and manifest["distml_version"]
    # the manifest and weights are plain files in the content-addressed store
    stored = json.loads(workspace.artifacts.get_bytes(record.manifest_digest))
    assert stored == manifest
    assert set(safetensors.torch.load(workspace.artifacts.get_bytes(record.weights_digest))) == set(model.state_dict())


def test_round_trip_of_arch_args_and_all_ref_forms(workspace):
    torch.manual_seed(0)
    model = build_model("mlp", width=16, depth=2, num_classes=3)
    record = _save(
        workspace,
        model,
        architecture="mlp",
        arch_args={"width": 16, "depth": 2, "num_classes": 3},
        class_names=["a", "b", "c"],
    )
    for ref in ("fashion", "fashion:1", record.manifest_digest):
        loaded, _ = load_model(workspace, ref)
        assert torch.equal(_outputs(loaded), _outputs(model)), ref
    assert resolve_model(workspace, record.manifest_digest).version == 1


def test_versions_auto_increment_per_name(workspace):
    torch.manual_seed(0)
    models = [build_model("cnn") for _ in range(3)]
    records = [_save(workspace, m, metrics={"accuracy": 0.5 + i / 10}) for i, m in enumerate(models)]
    assert [r.version for r in records] == [1, 2, 3]
    assert _save(workspace, name="other").version == 1
    assert torch.equal(_outputs(load_model(workspace, "fashion")[0]), _outputs(models[2])), "bare name is the latest"
    assert torch.equal(_outputs(load_model(workspace, "fashion:1")[0]), _outputs(models[0]))
    rows = list_models(workspace)
    assert [(r.name, r.version) for r in rows] == [("fashion", 3), ("fashion", 2), ("fashion", 1), ("other", 1)]
    assert rows[0].metrics == {"accuracy": 0.7} and rows[0].manifest_digest == records[2].manifest_digest
    assert [r.version for r in list_models(workspace, "other")] == [1]
    with pytest.raises(DistmlError, match="model 'fashion' has no version 9; its versions are 1 to 3"):
        load_model(workspace, "fashion:9")
    with pytest.raises(DistmlError, match="no model named 'nope' is registered; registered models: fashion, other"):
        load_model(workspace, "nope")


def test_concurrent_saves_get_distinct_versions(workspace):
    _ = workspace.engine  # migrate once before the threads start
    results, errors = [], []

    def worker():
        try:
            results.append(_save(workspace).version)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [1, 2, 3, 4, 5, 6]


def test_aliases(workspace):
    torch.manual_seed(0)
    first, second = build_model("cnn"), build_model("cnn")
    _save(workspace, first)
    _save(workspace, second)
    set_alias(workspace, "fashion", "champion", 1)
    assert torch.equal(_outputs(load_model(workspace, "fashion@champion")[0]), _outputs(first))
    assert resolve_model(workspace, "fashion@champion").version == 1
    set_alias(workspace, "fashion", "champion", 2)  # moving an alias
    assert resolve_model(workspace, "fashion@champion").version == 2
    set_alias(workspace, "fashion", "canary", 2)
    listed = [(r.version, r.aliases) for r in list_models(workspace)]
    assert listed == [(2, ["canary", "champion"]), (1, [])]
    with pytest.raises(DistmlError, match="model 'fashion' has no alias 'staging'"):
        load_model(workspace, "fashion@staging")
    with pytest.raises(DistmlError, match="model 'fashion' has no version 5"):
        set_alias(workspace, "fashion", "champion", 5)
    with pytest.raises(DistmlError, match="no model named 'ghost' is registered"):
        set_alias(workspace, "ghost", "champion", 1)
    with pytest.raises(DistmlError, match="alias 'bad alias' is not valid"):
        set_alias(workspace, "fashion", "bad alias", 1)

    from distml.models import registry

    assert registry.dangling_aliases(workspace.engine) == []
    with workspace.engine.begin() as conn:  # a damaged store: SQLite checks the foreign key only when told
        conn.execute(registry.model_versions.delete().where(registry.model_versions.c.version == 2))
    assert registry.dangling_aliases(workspace.engine) == ["fashion@canary", "fashion@champion"]


@pytest.mark.parametrize(
    "ref",
    ["fashion:zero", "fashion:0", "bad name", "", "fashion:1@x"],
)
def test_bad_refs_are_explained(workspace, ref):
    _save(workspace)
    with pytest.raises(DistmlError, match="not valid|not a positive integer"):
        load_model(workspace, ref)


def test_unknown_digest(workspace):
    with pytest.raises(DistmlError, match="no model manifest with digest 0{64}"):
        load_model(workspace, "0" * 64)


def test_corrupt_manifests_are_refused(workspace):
    manifest = _save(workspace).manifest
    cases = [
        (b"{not json", "is not valid UTF-8 JSON"),
        (b"\xff\xfe", "is not valid UTF-8 JSON"),
        (b"[1, 2]", "is a JSON list, expected an object"),
        (
            json.dumps({k: v for k, v in manifest.items() if k != "class_names"}).encode(),
            "lacks required key.*class_names",
        ),
        (json.dumps({**manifest, "format_version": 99}).encode(), "format version 99, newer than this distml"),
        (json.dumps({**manifest, "format_version": 0}).encode(), "expected 'distml.model' version 1"),
        (json.dumps({**manifest, "arch_args": [1]}).encode(), "'arch_args' is \\[1\\], expected an object"),
        (json.dumps({**manifest, "weights_digest": "xyz"}).encode(), "not a 64-character SHA-256"),
        (json.dumps({**manifest, "weights_digest": "1" * 64}).encode(), "names weights 1{64}, which are not in"),
    ]
    for raw, pattern in cases:
        digest = workspace.artifacts.put_bytes(raw)
        with pytest.raises(DistmlError, match=pattern):
            load_model(workspace, digest)


def test_a_manifest_changed_on_disk_is_detected(workspace):
    record = _save(workspace)
    workspace.artifacts.path(record.manifest_digest).write_text(json.dumps({**record.manifest, "metrics": {}}))
    with pytest.raises(DistmlError, match="corrupted"):
        load_model(workspace, "fashion")


def test_wrong_architecture_is_refused(workspace):
    manifest = _save(workspace).manifest
    unknown = _put_manifest(workspace, {**manifest, "architecture": "resnet"})
    with pytest.raises(DistmlError, match="cannot build: unknown model 'resnet'"):
        load_model(workspace, unknown)
    missing_module = _put_manifest(workspace, {**manifest, "architecture": "gone_pkg_xyz:net"})
    with pytest.raises(DistmlError, match="cannot build.*'gone_pkg_xyz' cannot be imported"):
        load_model(workspace, missing_module)
    other = _put_manifest(workspace, {**manifest, "architecture": "mlp", "arch_args": {"width": 8, "depth": 1}})
    with pytest.raises(
        DistmlError,
        match="do not fit architecture 'mlp'.*missing keys '1.bias', '1.weight'; "
        "unexpected keys '0.bias', '0.weight', '6.bias', '6.weight', '9.bias'.*shape mismatch '3.bias'",
    ):
        load_model(workspace, other)
    bad_args = _put_manifest(workspace, {**manifest, "arch_args": {"widht": 3}})
    with pytest.raises(DistmlError, match="unknown argument.*'widht'"):
        load_model(workspace, bad_args)


def _with_weights(workspace, manifest, tensors) -> str:
    digest = workspace.artifacts.put_bytes(safetensors.torch.save(tensors))
    return _put_manifest(workspace, {**manifest, "weights_digest": digest})


def test_tampered_weights_are_refused_naming_the_keys(workspace):
    record = _save(workspace)
    state = {k: v.clone() for k, v in build_model("cnn").state_dict().items()}
    missing = _with_weights(workspace, record.manifest, {k: v for k, v in state.items() if k != "0.weight"})
    with pytest.raises(DistmlError, match="missing keys '0.weight'"):
        load_model(workspace, missing)
    extra = _with_weights(workspace, record.manifest, {**state, "extra.bias": torch.zeros(3)})
    with pytest.raises(DistmlError, match="unexpected keys 'extra.bias'"):
        load_model(workspace, extra)
    reshaped = _with_weights(workspace, record.manifest, {**state, "11.bias": torch.zeros(11)})
    with pytest.raises(DistmlError, match=r"shape mismatch '11.bias' is \(11,\), expected \(10,\)"):
        load_model(workspace, reshaped)
    garbage = workspace.artifacts.put_bytes(b"\x00" * 64)
    with pytest.raises(DistmlError, match="not a readable safetensors file"):
        load_model(workspace, _put_manifest(workspace, {**record.manifest, "weights_digest": garbage}))


def test_weights_changed_on_disk_or_registry_mismatch_are_detected(workspace):
    record = _save(workspace)
    path = workspace.artifacts.path(record.weights_digest)
    good = path.read_bytes()
    path.write_bytes(good[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(DistmlError, match="model weights .* is corrupted"):
        load_model(workspace, "fashion")
    path.write_bytes(good)
    from distml.models import registry

    with workspace.engine.begin() as conn:
        conn.execute(registry.model_versions.update().values(weights_digest="2" * 64))
    with pytest.raises(DistmlError, match="registry entry is inconsistent"):
        load_model(workspace, "fashion")


def test_loading_never_unpickles(workspace, monkeypatch):
    torch.manual_seed(0)
    model = build_model("batch_norm")
    _save(workspace, model, architecture="batch_norm")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used while loading a model artifact")

    for target, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, attr, forbidden)
    fresh = Workspace(workspace.root)  # a fresh process's view
    try:
        loaded, _ = load_model(fresh, "fashion")
    finally:
        fresh.close()
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_tied_weights_are_saved_and_loaded_strictly(workspace, tmp_path, monkeypatch):
    (tmp_path / "tied_models.py").write_text(
        "from torch import nn\n"
        "def tied(num_classes=10):\n"
        "    shared = nn.Linear(784, 784)\n"
        "    return nn.Sequential(nn.Flatten(), shared, nn.ReLU(), shared, nn.Linear(784, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = build_model("tied_models:tied")
    _save(workspace, model, architecture="tied_models:tied")
    loaded, manifest = load_model(workspace, "fashion")
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert manifest["num_parameters"] == 784 * 785 + 7850


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"architecture": "mlp"}, r"does not match architecture 'mlp' with arguments \{\}: missing keys"),
        (
            {"arch_args": {"num_classes": 3}},
            r"shape mismatch '11.bias' is \(10,\), expected \(3,\), '11.weight' is \(10, 64\), expected \(3, 64\)",
        ),
        ({"class_names": CLASSES[:9]}, "class_names has 9 names but architecture 'cnn' has 10 classes"),
        ({"class_names": ["a"] * 10}, "class_names must be a list of distinct non-empty strings"),
        ({"metrics": {"loss": float("nan")}}, "metrics must be plain JSON"),
        ({"metrics": {"when": object()}}, "metrics must be plain JSON.*object is not JSON-serialisable"),
        ({"training": "lr=0.1"}, "training must be dict, got str"),
        ({"name": "bad:name"}, "model name 'bad:name' is not valid"),
        ({"name": "a" * 64}, "not a 64-character hex digest"),
        ({"input_spec": {"name": "image", "shape": [28, 28], "datatype": "float"}}, "not a V2 datatype"),
        ({"input_spec": {"name": "image", "shape": [28, 0], "datatype": "FP32"}}, "list of positive integers"),
        ({"data_fingerprint": 5}, "data_fingerprint must be str or null, got int"),
        ({"architecture": "resnet"}, "unknown model 'resnet'"),
    ],
)
def test_save_refuses_bad_input_before_storing(workspace, overrides, pattern):
    model = build_model("cnn")
    with pytest.raises(DistmlError, match=pattern):
        _save(workspace, model, **overrides)
    assert list_models(workspace) == []


def test_save_refuses_a_non_module(workspace):
    with pytest.raises(DistmlError, match="model must be a torch.nn.Module, got dict"):
        save_model(
            workspace,
            {},
            name="x",
            architecture="cnn",
            arch_args={},
            input_spec=IMAGE_INPUT_SPEC,
            preprocessing={},
            class_names=CLASSES,
            metrics={},
            training={},
            data_fingerprint=None,
        )


def test_numpy_and_tensor_scalars_in_metrics_become_numbers(workspace):
    record = _save(workspace, metrics={"accuracy": np.float32(0.5), "loss": torch.tensor(0.25), "n": np.int64(3)})
    assert record.manifest["metrics"] == {"accuracy": 0.5, "loss": 0.25, "n": 3}
    assert list_models(workspace)[0].metrics == record.manifest["metrics"]


def test_identical_weights_share_one_blob(workspace):
    model = build_model("cnn")
    first, second = _save(workspace, model), _save(workspace, model)
    assert first.weights_digest == second.weights_digest and first.manifest_digest != second.manifest_digest


def test_migration_2_creates_the_registry_tables(workspace):
    tables = sa.inspect(workspace.engine).get_table_names()
    assert {"model_versions", "model_aliases"} <= set(tables)


def test_model_registry_on_postgresql(postgres_url, tmp_path):
    ws = Workspace(tmp_path / "pg", postgres_url)
    try:
        name = f"pg_{tmp_path.name}".replace("-", "_")[:60]
        torch.manual_seed(0)
        model = build_model("cnn")
        assert [_save(ws, model, name=name).version for _ in range(2)] == [1, 2]
        set_alias(ws, name, "champion", 1)
        loaded, _ = load_model(ws, f"{name}@champion")
        assert torch.equal(_outputs(loaded), _outputs(model))
        assert [r.aliases for r in list_models(ws, name)] == [[], ["champion"]]
    finally:
        ws.close()


def test_public_api_is_exported():
    import distml.models as models

    assert models.save_model is save_model and models.load_model is load_model
    assert set(artifact.__all__) >= {"save_model", "load_model", "list_models", "set_alias", "ModelRecord"}


def test_resolving_listing_aliasing_and_serving_a_model_import_no_torch(workspace):
    """What `distml models`, `distml serve` and the gateway do with a registered model needs no
    torch (importing it costs every such process 1.5 s of CPU); only saving and loading weights do."""
    import subprocess
    import sys

    from distml.data import datasets

    serving = datasets.pixel_serving((28, 28), datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD)
    _save(workspace, name="cnn", preprocessing=serving)  # as training records it for serving
    script = (
        "import sys\n"
        "from distml.models.artifact import list_models, resolve_model, set_alias\n"
        "from distml.serve.service import build_serve_config\n"
        "from distml.workspace import Workspace\n"
        f"ws = Workspace({str(workspace.root)!r})\n"
        "assert resolve_model(ws, 'cnn:1').manifest['architecture'] == 'cnn' and len(list_models(ws)) == 1\n"
        "set_alias(ws, 'cnn', 'champion', 1)\n"
        "assert build_serve_config(ws, 'cnn@champion', {})[0].models == ['cnn:1']\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "no torch", out.stdout
