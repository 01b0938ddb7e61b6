"""Data-parallel training with allreduce: every worker holds the whole model.

DistributedDataParallel averages gradients in buckets while backward still runs (gloo on
CPU, NCCL on CUDA), then each worker applies the same Adam step, so replicas stay identical.
With one worker the model is used unwrapped (DDP's per-step hooks buy nothing there).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


class AllReduceTrainer:
    def __init__(self, model: torch.nn.Module, lr: float, device: torch.device, world_size: int):
        self.model = model.to(device)
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped: torch.nn.Module = DistributedDataParallel(self.model, device_ids=ids,
                                                                    gradient_as_bucket_view=True)
        else:
            self.wrapped = self.model
        # one fused kernel per step on CUDA; the default multi-tensor path on CPU
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, fused=device.type == "cuda" or None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.wrapped(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
