"""Models: the zoo of reference classifiers and the model artifact format.

`zoo` builds models by name (or `package.module:factory`); `artifact` stores them as
safetensors weights plus a JSON manifest, versioned in the metadata store, never pickled.
"""

from distml.models.artifact import (
    ModelRecord,
    list_models,
    load_model,
    resolve_model,
    save_model,
    set_alias,
)
from distml.models.zoo import build_model, count_parameters, model_names, register_model

__all__ = [
    "ModelRecord",
    "build_model",
    "count_parameters",
    "list_models",
    "load_model",
    "model_names",
    "register_model",
    "resolve_model",
    "save_model",
    "set_alias",
]
