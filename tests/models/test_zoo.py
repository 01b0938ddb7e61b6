"""The model zoo: shapes, exact parameter counts, registration by name and import path, clear errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from distml.core.errors import DistmlError
from distml.models import zoo
from distml.models.zoo import build_model, count_parameters, model_names, register_model

SMALL_MLP = {"width": 32, "depth": 2}


@pytest.mark.parametrize("name", ["cnn", "dropout", "batch_norm", "mlp"])
@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 1, 28, 28)])
def test_every_zoo_model_maps_images_to_ten_logits(name, shape):
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(shape))
    assert out.shape == (5, 10) and out.dtype == torch.float32


def test_with_and_without_channel_dim_give_the_same_output():
    model = build_model("batch_norm").eval()
    x = torch.rand(3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model(x.unsqueeze(1)))


def test_num_classes_and_in_channels():
    model = build_model("cnn", num_classes=3, in_channels=2).eval()
    assert model(torch.rand(4, 2, 28, 28)).shape == (4, 3)
    assert build_model("mlp", num_classes=7, in_channels=3, **SMALL_MLP)(torch.rand(2, 3, 28, 28)).shape == (2, 7)


def test_exact_parameter_counts():
    # conv1 1*32*9+32, conv2 32*64*9+64, conv3 64*64*9+64, dense 576*64+64, output 64*10+10
    assert count_parameters(build_model("cnn")) == 320 + 18496 + 36928 + 36928 + 650 == 93_322
    assert count_parameters(build_model("dropout")) == 93_322
    assert count_parameters(build_model("batch_norm")) == 93_322 + 2 * (32 + 64)  # BN weight and bias
    # the sizes the mlp docstring promises
    assert count_parameters(build_model("mlp")) == 14_217_226
    assert count_parameters(build_model("mlp", width=2450, depth=4)) == 19_962_610
    assert count_parameters(build_model("mlp", width=3000, depth=3)) == 20_391_010
    assert count_parameters(build_model("mlp", width=16, depth=0)) == 784 * 10 + 10


def test_layer_layout_matches_the_reference_designs():
    kinds = lambda m: [type(layer).__name__ for layer in m]  # noqa: E731
    assert kinds(build_model("cnn")) == [
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
    ]
    assert kinds(build_model("dropout"))[6] == "Dropout" and build_model("dropout")[6].p == 0.5
    assert kinds(build_model("batch_norm"))[:8] == [
        "Conv2d",
        "BatchNorm2d",
        "Sigmoid",
        "MaxPool2d",
        "Conv2d",
        "BatchNorm2d",
        "Sigmoid",
        "MaxPool2d",
    ]


def test_count_parameters_counts_shared_parameters_once_and_can_skip_frozen():
    layer = nn.Linear(4, 4)
    tied = nn.Sequential(layer, nn.ReLU(), layer)
    assert count_parameters(tied) == 20
    layer.bias.requires_grad_(False)
    assert count_parameters(tied, trainable_only=True) == 16


def test_model_names_and_register_model(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))
    assert model_names() == ["batch_norm", "cnn", "dropout", "mlp"]

    def tiny(*, num_classes: int = 10, in_channels: int = 1):
        return nn.Sequential(nn.Flatten(), nn.Linear(784 * in_channels, num_classes))

    assert register_model("tiny", tiny) is tiny
    assert "tiny" in model_names()
    assert build_model("tiny", num_classes=4)(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(DistmlError, match="already registered; pass replace=True"):
        register_model("tiny", lambda: nn.Linear(1, 1))
    register_model("tiny", lambda: nn.Linear(1, 1), replace=True)
    with pytest.raises(DistmlError, match="not valid.*reserved for import paths"):
        register_model("a:b", tiny)


def test_import_path_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def small(num_classes=10, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

        class Factories:
            @staticmethod
            def linear(num_classes=10):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))

        def not_a_model():
            return 42

        NOT_CALLABLE = 3
    """)
    )
    (tmp_path / "broken_models.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("my_models", "broken_models"):
        monkeypatch.delitem(sys.modules, mod, raising=False)

    model = build_model("my_models:small", num_classes=3, hidden=5)
    assert model(torch.rand(2, 28, 28)).shape == (2, 3)
    assert build_model("my_models:Factories.linear")(torch.rand(1, 28, 28)).shape == (1, 10)

    with pytest.raises(DistmlError, match="module 'no_such_module_abc' cannot be imported"):
        build_model("no_such_module_abc:f")
    with pytest.raises(DistmlError, match="importing module 'broken_models' failed: No module named 'no_such_depend"):
        build_model("broken_models:f")
    with pytest.raises(DistmlError, match="has no attribute 'missing'"):
        build_model("my_models:missing")
    with pytest.raises(DistmlError, match="not callable"):
        build_model("my_models:NOT_CALLABLE")
    with pytest.raises(DistmlError, match="returned int, expected a torch.nn.Module"):
        build_model("my_models:not_a_model")
    with pytest.raises(DistmlError, match="'my_models:small': unknown argument.*'width'.*accepts num_classes, hidden"):
        build_model("my_models:small", width=3)


def test_unknown_name_lists_known_names_and_import_form():
    with pytest.raises(DistmlError) as info:
        build_model("resnet")
    message = str(info.value)
    assert "'resnet'" in message and "batch_norm, cnn, dropout, mlp" in message
    assert "'package.module:factory'" in message


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("cnn", {"widht": 3}, r"model 'cnn': unknown argument\(s\) 'widht'; it accepts num_classes, in_channels"),
        ("mlp", {"width": 0}, r"model 'mlp': argument width must be an integer >= 1, got 0"),
        ("mlp", {"depth": -1}, r"model 'mlp': argument depth must be an integer >= 0, got -1"),
        ("mlp", {"width": 2.5}, r"model 'mlp': argument width must be an integer"),
        ("dropout", {"num_classes": True}, r"model 'dropout': argument num_classes must be an integer"),
        ("batch_norm", {"in_channels": "1"}, r"model 'batch_norm': argument in_channels must be an integer"),
    ],
)
def test_bad_kwargs_name_the_model_and_the_argument(name, kwargs, pattern):
    with pytest.raises(DistmlError, match=pattern):
        build_model(name, **kwargs)


def test_missing_required_argument(monkeypatch):
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))
    register_model("needs_width", lambda *, width: nn.Linear(width, 2))
    with pytest.raises(DistmlError, match="model 'needs_width': missing required argument.*'width'"):
        build_model("needs_width")
