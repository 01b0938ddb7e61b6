"""Knative-KPA-style concurrency autoscaling (what KServe uses): stable and panic windows, scale to zero.

`Autoscaler` is the pure decision (desired = ceil(mean in-flight / target); at 2x target it panics,
scales up at once and never down until calm; zero after an idle period); `AutoscalerLoop` applies it
to a ReplicaSet. Knative's own autoscaler needs Kubernetes; no in-process library implements KPA.

Pattern: event-driven serving: the replica count follows the requests in flight, down to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from distml.serve.config import ScalingPolicy

log = logging.getLogger("distml.serve.autoscaler")


@dataclass
class Decision:
    desired: int
    panicking: bool
    stable_concurrency: float
    panic_concurrency: float


class Autoscaler:
    """KPA decision logic over concurrency samples; `clock` is injectable for tests."""

    def __init__(self, policy: ScalingPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.clock = clock
        self._samples: deque[tuple[float, float, float]] = deque()  # (time, concurrency, weight seconds)
        self._panic_since: float | None = None
        self._panic_desired = 0
        self.last_active = clock()

    def observe(self, concurrency: float, duration: float = 1.0, now: float | None = None) -> None:
        """Record the mean concurrency (in-flight + waiting requests) over the last `duration` s."""
        now = self.clock() if now is None else now
        self._samples.append((now, max(0.0, float(concurrency)), max(duration, 1e-6)))
        if concurrency > 0:
            self.last_active = now
        horizon = now - self.policy.stable_window
        while self._samples and self._samples[0][0] <= horizon:
            self._samples.popleft()

    def average(self, window: float, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        total = weight = 0.0
        for t, value, w in self._samples:
            if t > now - window:
                total += value * w
                weight += w
        return total / weight if weight else 0.0

    @property
    def panicking(self) -> bool:
        return self._panic_since is not None

    def decide(self, ready: int, current: int, queued: int = 0, now: float | None = None) -> Decision:
        """Desired replicas given `ready` replicas, the `current` desired count and `queued` waiters."""
        p = self.policy
        now = self.clock() if now is None else now
        if queued > 0:
            self.last_active = now
        stable = self.average(p.stable_window, now)
        panic = self.average(p.panic_window, now)
        want_stable = math.ceil(stable / p.target_concurrency - 1e-9)
        want_panic = math.ceil(panic / p.target_concurrency - 1e-9)
        if panic / max(ready, 1) >= p.panic_threshold * p.target_concurrency:
            if self._panic_since is None:
                log.info("autoscaler panics: %.2f in flight on %d ready replica(s)", panic, ready)
                self._panic_desired = current
            self._panic_since = now
        elif self._panic_since is not None and now - self._panic_since >= p.stable_window:
            log.info("autoscaler leaves panic mode")
            self._panic_since = None
        if self._panic_since is not None:  # scale up at once, never down while panicking
            desired = max(want_panic, self._panic_desired, current)
            self._panic_desired = desired
        else:
            desired = want_stable
        if queued > 0:
            desired = max(desired, 1)  # a waiting request with nothing running: cold start now
        if desired == 0 and not (p.min_replicas == 0 and now - self.last_active >= p.scale_to_zero_after):
            desired = 1 if current > 0 else 0
        desired = min(max(desired, p.min_replicas), p.max_replicas)
        return Decision(desired, self._panic_since is not None, stable, panic)


class AutoscalerLoop:
    """Applies an `Autoscaler` to a `ReplicaSet` every `tick` s, or at once when poked."""

    def __init__(self, autoscaler: Autoscaler, replica_set, tick: float = 0.5):
        self.autoscaler = autoscaler
        self.replicas = replica_set
        self.tick = tick
        self.last: Decision | None = None
        self._poke = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self.replicas.on_demand = self.poke
            self._task = asyncio.create_task(self._run(), name=f"autoscale-{self.replicas.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        self._poke.set()

    def step(self, area: float, last_area: float, dt: float) -> Decision:
        rs = self.replicas
        mean = (area - last_area) / dt if dt > 1e-6 else float(rs.in_flight + rs.waiting)
        self.autoscaler.observe(mean, duration=max(dt, 1e-3))
        decision = self.autoscaler.decide(ready=rs.ready_count, current=rs.desired, queued=rs.waiting)
        if decision.desired != rs.desired:
            log.info(
                "scale %s: %d -> %d (stable %.2f, panic %.2f%s)",
                rs.name,
                rs.desired,
                decision.desired,
                decision.stable_concurrency,
                decision.panic_concurrency,
                ", panicking" if decision.panicking else "",
            )
            rs.scale_to(decision.desired)
        self.last = decision
        return decision

    async def _run(self) -> None:
        last_area = self.replicas.load_integral()
        last_t = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.tick)
            self._poke.clear()
            now = time.monotonic()
            area = self.replicas.load_integral()
            try:
                self.step(area, last_area, now - last_t)
            except Exception:
                log.exception("autoscaler tick")
            last_area, last_t = area, now
