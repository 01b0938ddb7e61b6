"""The model zoo: classifiers for 28x28 single-channel images, built by name with keyword args.

Names map to factories in a registry (`cnn`, `dropout`, `batch_norm`, `mlp` built in); any
other factory is reachable as an import path `package.module:factory`. timm and
torchvision's model registries were considered; they target ImageNet-sized inputs and would
add a dependency for four small networks, so the registry is a dict here.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distml.core.errors import DistmlError
from distml.models import BUILTIN_MODELS

IMAGE_SIZE = 28

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ImageClassifier(nn.Sequential):
    """`nn.Sequential` that takes images as (N, C, H, W) or, without the channel dim, (N, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return super().forward(x)


def _check_int(model: str, arg: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DistmlError(f"model {model!r}: argument {arg} must be an integer >= {minimum}, got {value!r}")
    return value


def _conv_stack(model: str, in_channels: int, num_classes: int, *, dropout: bool, batch_norm: bool):
    _check_int(model, "in_channels", in_channels, 1)
    _check_int(model, "num_classes", num_classes, 1)

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        if batch_norm:
            return [nn.Conv2d(c_in, c_out, 3), nn.BatchNorm2d(c_out), nn.Sigmoid(), nn.MaxPool2d(2)]
        return [nn.Conv2d(c_in, c_out, 3), nn.ReLU(), nn.MaxPool2d(2)]

    layers: list[nn.Module] = [*block(in_channels, 32), *block(32, 64)]  # 28 -> 26 -> 13 -> 11 -> 5
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers += [
        nn.Conv2d(64, 64, 3),  # 5 -> 3
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    ]
    return ImageClassifier(*layers)


def cnn(*, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Three 3x3 convolutions (32, 64, 64 filters, two 2x2 max-pools) and two dense layers.

    93,322 parameters at the defaults.
    """
    return _conv_stack("cnn", in_channels, num_classes, dropout=False, batch_norm=False)


def dropout(*, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """`cnn` with Dropout(0.5) after the second pooling (same 93,322 parameters)."""
    return _conv_stack("dropout", in_channels, num_classes, dropout=True, batch_norm=False)


def batch_norm(*, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """`cnn` with conv -> BatchNorm2d -> Sigmoid -> pool in the first two blocks (93,514 parameters)."""
    return _conv_stack("batch_norm", in_channels, num_classes, dropout=False, batch_norm=True)


def mlp(*, num_classes: int = 10, in_channels: int = 1, width: int = 2048, depth: int = 4) -> nn.Module:
    """Flatten, `depth` hidden Linear(width) + ReLU layers, then Linear(width, num_classes).

    Parameters: (784*in_channels + 1)*width + (depth - 1)*(width + 1)*width + (width + 1)*num_classes.
    width=2048, depth=4 (the defaults) gives 14,217,226 (~14M); width=2450, depth=4 gives
    19,962,610 (~20M), as does width=3000, depth=3 with 20,391,010.
    """
    _check_int("mlp", "in_channels", in_channels, 1)
    _check_int("mlp", "num_classes", num_classes, 1)
    _check_int("mlp", "width", width, 1)
    _check_int("mlp", "depth", depth, 0)
    layers: list[nn.Module] = [nn.Flatten()]
    features = in_channels * IMAGE_SIZE * IMAGE_SIZE
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return ImageClassifier(*layers)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {name: globals()[name] for name in BUILTIN_MODELS}


def register_model(name: str, factory: Callable[..., nn.Module], *, replace: bool = False) -> Callable[..., nn.Module]:
    """Make `factory` buildable as `name`; returns the factory. Re-registering needs `replace=True`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise DistmlError(
            f"model name {name!r} is not valid; expected letters, digits, '_', '.' or '-' "
            "(':' is reserved for import paths)"
        )
    if not callable(factory):
        raise DistmlError(f"model {name!r}: factory must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and _REGISTRY[name] is not factory and not replace:
        raise DistmlError(f"model {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = factory
    return factory


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _unknown_name_error(name: Any) -> DistmlError:
    return DistmlError(
        f"unknown model {name!r}; expected one of {', '.join(model_names())} "
        "or an import path of the form 'package.module:factory'"
    )


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The factory for a registered name or an import path `package.module:factory`."""
    if not isinstance(name, str):
        raise _unknown_name_error(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not _IMPORT_PATH.match(name):
        raise _unknown_name_error(name)
    module_name, attr_path = name.split(":", 1)
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise DistmlError(
                f"model {name!r}: module {module_name!r} cannot be imported (not found on sys.path); "
                "expected an importable 'package.module:factory'"
            ) from exc
        raise DistmlError(f"model {name!r}: importing module {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise DistmlError(f"model {name!r}: importing module {module_name!r} failed: {exc!r}") from exc
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise DistmlError(
                f"model {name!r}: module {module_name!r} has no attribute {attr_path!r}; "
                "expected a factory that returns a torch.nn.Module"
            )
        target = getattr(target, part)
    if not callable(target):
        raise DistmlError(
            f"model {name!r}: {attr_path!r} is a {type(target).__name__}, not callable; "
            "expected a factory that returns a torch.nn.Module"
        )
    return target


def _check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # no introspectable signature (some builtins): let the call decide
    params = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = None
    else:
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise DistmlError(
                f"model {name!r}: unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"it accepts {', '.join(accepted) or 'no arguments'}"
            )
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        missing = [
            n
            for n, p in params.items()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in kwargs
        ]
        what = f"missing required argument(s) {', '.join(map(repr, missing))}" if missing else str(exc)
        raise DistmlError(f"model {name!r}: {what}") from exc


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model `name` (registered name or `package.module:factory`) with keyword args."""
    factory = resolve_factory(name)
    _check_kwargs(name, factory, kwargs)
    try:
        model = factory(**kwargs)
    except DistmlError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DistmlError(f"model {name!r} could not be built with arguments {kwargs!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise DistmlError(f"model {name!r}: the factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared parameter once); only those with grad if `trainable_only`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
