"""Models: the zoo of reference classifiers and the model artifact format.

`zoo` builds models by name (or `package.module:factory`); `artifact` stores them as
safetensors weights plus a JSON manifest, versioned in the metadata store, never pickled.
The names below load on first use (PEP 562), so `distml.models.datatypes` imports no torch, and
`artifact` imports it only to save or load weights (resolving, listing and aliasing need none).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelRecord": "artifact",
    "list_models": "artifact",
    "load_model": "artifact",
    "resolve_model": "artifact",
    "save_model": "artifact",
    "set_alias": "artifact",
    "unset_alias": "artifact",
    "build_model": "zoo",
    "count_parameters": "zoo",
    "model_names": "zoo",
    "register_model": "zoo",
}

__all__ = sorted(_EXPORTS)

# The zoo's own models (zoo.py builds its registry from these names): a manifest that names one is
# known to be buildable without importing torch.
BUILTIN_MODELS = ("cnn", "dropout", "batch_norm", "mlp")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distml.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"distml.models.{module}"), name)
