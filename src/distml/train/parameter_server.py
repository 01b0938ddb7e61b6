"""Parameter servers: S server processes own shards of the parameters, W workers push and pull.

The parameters, concatenated in `model.parameters()` order, are cut into S contiguous ranges of
equal size (a large tensor may span two servers, so one server never carries more than 1/S of
the traffic); each server keeps its range as one flat vector with its own optimizer state (fused
Adam or plain SGD: both elementwise, so cutting inside a tensor changes no update). Workers keep
their parameters and gradients as views into one flat buffer, so a push or pull is one
`isend`/`irecv` of a slice per server with no packing. `sync` averages all W gradients per step
(the same update as allreduce); `async` applies each gradient as it arrives (recv from any source
of the worker's step, then its gradient), optionally holding back a worker more than `staleness`
steps ahead of the slowest (stale-synchronous parallel, `StalenessGate`: a gradient is computed on
parameters that hold every worker's updates up to at most `staleness` steps before its own).
Transport: torch.distributed point-to-point over gloo, the maintained route
(torch.distributed.rpc is in maintenance mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distml.core.errors import DistmlError
from distml.train.optimizer import make_optimizer

CLOCK_TAG = 1  # async: a worker's step travels as its own message, ahead of its gradient (tag 0)


@dataclass
class ShardLayout:
    """Which range of the flattened parameters each server owns: `bounds[k] = (start, end)`."""

    bounds: list[tuple[int, int]]

    @classmethod
    def balanced(cls, params: list[torch.Tensor], num_shards: int) -> ShardLayout:
        """Equal contiguous ranges (sizes differ by at most one element) covering every parameter."""
        if num_shards < 1:
            raise ValueError(f"need at least one parameter server, got {num_shards}")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"parameter servers need one parameter dtype, the model has {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in params)
        edges = [total * k // num_shards for k in range(num_shards + 1)]
        return cls(list(pairwise(edges)))

    @property
    def numels(self) -> list[int]:
        return [end - start for start, end in self.bounds]

    def flat(self, params: list[torch.Tensor], shard: int) -> torch.Tensor:
        """A copy of server `shard`'s range of the parameters."""
        start, end = self.bounds[shard]
        return flatten(params)[start:end].clone()


def flatten(params: list[torch.Tensor]) -> torch.Tensor:
    members = [p.detach().reshape(-1).cpu() for p in params]
    return torch.cat(members) if members else torch.zeros(0)


class PSWorker:
    """Worker side: forward/backward locally, push gradients, pull the servers' parameters."""

    def __init__(self, model: torch.nn.Module, server_ranks: list[int], mode: str, device: torch.device):
        self.model, self.server_ranks, self.mode, self.device = model, server_ranks, mode, device
        self.params = [p for p in model.parameters()]
        self.layout = ShardLayout.balanced(self.params, len(server_ranks))
        self.param_all = flatten(self.params).clone()
        self.grad_all = torch.zeros_like(self.param_all)
        self.param_flat = [self.param_all[start:end] for start, end in self.layout.bounds]
        self.grad_flat = [self.grad_all[start:end] for start, end in self.layout.bounds]
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.clock = torch.zeros(1)
        self.on_cpu = device.type == "cpu"
        if self.on_cpu:  # parameters and gradients become views of the flat buffers
            for p, (start, end) in zip(self.params, pairwise(self.offsets)):
                p.data = self.param_all[start:end].view_as(p)
                p.grad = self.grad_all[start:end].view_as(p)
        self.step_count = 0

    def pull(self) -> None:
        """Receive every shard's current parameters from its server."""
        requests = [dist.irecv(self.param_flat[k], src=rank) for k, rank in enumerate(self.server_ranks)]
        for request in requests:
            request.wait()
        if not self.on_cpu:
            self._copy_in()

    def _copy_in(self) -> None:
        with torch.no_grad():
            for p, (start, end) in zip(self.params, pairwise(self.offsets)):
                p.copy_(self.param_all[start:end].view_as(p))

    def _collect_grads(self) -> None:
        if self.on_cpu:
            return
        for p, (start, end) in zip(self.params, pairwise(self.offsets)):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            self.grad_all[start:end].copy_(grad.reshape(-1))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.on_cpu:
            self.grad_all.zero_()
        else:
            self.model.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self._collect_grads()
        self.step_count += 1
        sends = []
        if self.mode == "async":
            self.clock[0] = float(self.step_count)
            sends = [dist.isend(self.clock, dst=rank, tag=CLOCK_TAG) for rank in self.server_ranks]
        sends += [dist.isend(self.grad_flat[k], dst=rank) for k, rank in enumerate(self.server_ranks)]
        receives = [dist.irecv(self.param_flat[k], src=rank) for k, rank in enumerate(self.server_ranks)]
        for request in sends + receives:
            request.wait()
        if not self.on_cpu:
            self._copy_in()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """Worker-local state: buffers such as BatchNorm statistics (parameters live on servers)."""
        return {
            "buffers": {name: b.detach().cpu() for name, b in self.model.named_buffers()},
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].data.copy_(value)
        self.step_count = int(state["step_count"])


class StalenessGate:
    """The stale-synchronous bookkeeping of one async server, apart from the transport.

    `clocks` holds each worker's last pushed step; a reply (the parameters a worker computes its
    next gradient on) is held back while its worker is more than `staleness` steps ahead of the
    slowest worker still short of the segment's end (`done_at`). `seen` holds, per worker, the
    clocks of all workers whose updates the parameters it was last sent contain: the version its
    next gradient is computed on, which `push` returns so that a server can record it.
    """

    def __init__(self, worker_ranks: list[int], staleness: int | None):
        self.staleness = staleness
        self.clocks = dict.fromkeys(worker_ranks, 0)
        self.seen: dict[int, dict[int, int]] = {}
        self.held: list[int] = []
        self.done_at = 0

    def start(self, clocks: dict[int, int], done_at: int) -> None:
        """A segment: the workers are at `clocks` (every earlier reply was sent) and end at `done_at`."""
        self.clocks, self.done_at, self.held = clocks, done_at, []
        for rank in clocks:  # a worker not sent parameters since broadcast holds those of `clocks`
            self.seen.setdefault(rank, dict(clocks))

    def push(self, src: int, clock: int) -> tuple[dict[int, int], list[int]]:
        """`src`'s gradient of step `clock` arrived: returns the clocks of the parameters it was
        computed on, and the workers to reply to once it is applied."""
        based_on = self.seen.pop(src)
        self.clocks[src] = clock
        self.held.append(src)
        active = [c for c in self.clocks.values() if c < self.done_at]
        slowest = min(active) if active else self.done_at
        ready = [r for r in self.held if self.staleness is None or self.clocks[r] - slowest <= self.staleness]
        self.held = [r for r in self.held if r not in ready]
        return based_on, self._sent(ready)

    def release_all(self) -> list[int]:
        """The segment's pushes are all in: nobody is too far ahead any more."""
        ready, self.held = self.held, []
        return self._sent(ready)

    def _sent(self, ranks: list[int]) -> list[int]:
        for rank in ranks:
            self.seen[rank] = dict(self.clocks)
        return ranks


class PSServer:
    """One server: owns a flat shard of the parameters and the optimizer's state for it.

    `record`, when given, is called in async mode with (worker, step, clocks) for every gradient
    applied: `clocks` are the workers' steps whose updates the parameters it was computed on hold.
    """

    def __init__(
        self,
        shard: int,
        initial: torch.Tensor,
        worker_ranks: list[int],
        lr: float,
        mode: str,
        staleness: int | None = None,
        optimizer: str = "adam",
        record: Callable[[int, int, dict[int, int]], None] | None = None,
    ):
        self.shard, self.worker_ranks, self.mode, self.staleness = shard, worker_ranks, mode, staleness
        self.param = torch.nn.Parameter(initial.clone())
        self.optimizer = make_optimizer(optimizer, [self.param], lr)
        self.buffers = [torch.zeros(initial.numel()) for _ in worker_ranks]
        self.clock = torch.zeros(1)
        self.updates = 0
        self.gate = StalenessGate(worker_ranks, staleness)
        self.record = record

    def broadcast(self) -> None:
        """Send the current parameters to every worker (start of a run or of an attempt)."""
        self.gate.seen.clear()
        for request in [dist.isend(self.param.data, dst=rank) for rank in self.worker_ranks]:
            request.wait()

    def _apply(self, grad: torch.Tensor) -> None:
        self.param.grad = grad
        self.optimizer.step()
        self.updates += 1

    def serve_sync_step(self) -> None:
        """Receive one gradient from every worker, apply their mean, send the parameters back."""
        for request in [dist.irecv(buf, src=rank) for buf, rank in zip(self.buffers, self.worker_ranks)]:
            request.wait()
        grad = self.buffers[0]  # summed in place: stack().mean() allocates W copies (168 ms vs 13 ms at 20M)
        for other in self.buffers[1:]:
            grad.add_(other)
        if len(self.buffers) > 1:
            grad.mul_(1.0 / len(self.buffers))
        self._apply(grad)
        for request in [dist.isend(self.param.data, dst=rank) for rank in self.worker_ranks]:
            request.wait()

    def serve_async(self, pushes: int, clocks: dict[int, int], done_at: int) -> None:
        """Apply `pushes` gradients as they arrive; reply at once unless a worker is more than
        `staleness` steps ahead of the slowest worker still short of `done_at`."""
        self.gate.start(clocks, done_at)
        buf = self.buffers[0]
        for _ in range(pushes):
            src = dist.recv(self.clock, tag=CLOCK_TAG)
            dist.recv(buf, src=src)
            clock = int(self.clock.item())
            based_on, ready = self.gate.push(src, clock)
            self._apply(buf)
            if self.record is not None:
                self.record(src, clock, based_on)
            for dst in ready:
                dist.send(self.param.data, dst=dst)
        for dst in self.gate.release_all():
            dist.send(self.param.data, dst=dst)

    def state_dict(self) -> dict[str, Any]:
        return {"param": self.param.data.clone(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["param"].numel() != self.param.numel():
            raise DistmlError(
                f"the checkpoint's shard {self.shard} holds {state['param'].numel():,} parameters, this layout "
                f"gives it {self.param.numel():,}: it was written with another model or number of servers; "
                "resume with the same --model, --model-arg and --ps-shards, or start a new --run-id"
            )
        self.param.data.copy_(state["param"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
