"""The optimizer a run uses, by name: one place for the trainers and the parameter servers.

`adam` (the default) is torch's fused Adam: one pass over all parameters (on CPU 20M
parameters: 16 ms vs 121 ms for the per-tensor loop). `sgd` is plain SGD (no momentum, no
weight decay), whose step is linear in the gradient: parity tests use it because Adam's
normalisation hides a gradient that is summed instead of averaged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, fused=True)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
