"""Canary analysis: judge a new model version on live traffic beside the stable one, then promote or roll back.

`CanaryAnalysis` is the pure decision (Flagger's / Argo Rollouts' analysis reduced to two checks over
a sliding window: the error-rate increase and the p99-latency ratio; `failure_threshold` failed checks
in a row roll back, a window without one promotes); the gateway feeds it every answer and applies its
verdicts (`CanaryController`, which the gateway holds). Flagger and Argo Rollouts need Kubernetes and a Prometheus to
query; no in-process library judges a canary, so this one is small and written here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distml.core.errors import DistmlError
from distml.serve.protocol import ProtocolError

log = logging.getLogger("distml.serve.gateway")

MAX_SAMPLES = 100_000  # per version and window: memory stays bounded whatever the request rate

Action = Literal["wait", "promote", "rollback"]
CANARY_STATES = ("running", "promoted", "rolled_back")


class CanaryPolicy(BaseModel):
    """How a canary is run and judged (the names of Flagger's `analysis` where they exist)."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(0.2, gt=0, lt=1, description="the canary's share of traffic while it is analysed")
    window_s: float = Field(10.0, gt=0, le=86_400, description="seconds of analysis before it is promoted")
    interval_s: float = Field(0.25, gt=0, le=60, description="seconds between two checks (Flagger's interval)")
    min_requests: int = Field(20, ge=1, description="requests each version needs before it is judged")
    max_error_rate_increase: float = Field(
        0.05, ge=0, le=1, description="canary error rate minus stable error rate above which it rolls back"
    )
    max_p99_ratio: float = Field(2.0, ge=1, description="canary p99 / stable p99 latency above which it rolls back")
    failure_threshold: int = Field(
        1, ge=1, le=100, description="failed checks in a row that roll back (Flagger's threshold, Argo's failureLimit)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> CanaryPolicy:
        if self.interval_s > self.window_s:
            raise ValueError(
                f"interval_s ({self.interval_s:g} s) must not be longer than window_s ({self.window_s:g} s)"
            )
        return self


def parse_canary_policy(values: dict[str, Any]) -> CanaryPolicy:
    """A CanaryPolicy, or one DistmlError naming every bad field and what it expects."""
    try:
        return CanaryPolicy(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "policy"
            given = f" (got {err['input']!r})" if err["loc"] and err["type"] != "missing" else ""
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}{given}")
        fields = ", ".join(CanaryPolicy.model_fields)
        raise DistmlError(f"invalid canary policy: {'; '.join(problems)} (policy fields: {fields})") from None


@dataclass(frozen=True)
class VersionStats:
    """One version's answers in the window; latencies (seconds) are those of its successful answers."""

    requests: int
    errors: int
    error_rate: float
    p50: float | None
    p99: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p50_s": self.p50,
            "p99_s": self.p99,
        }


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    stats: dict[str, VersionStats]

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "stats": {v: s.as_dict() for v, s in self.stats.items()},
        }


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


class CanaryAnalysis:
    """The judgement of version `canary` against version `stable` from `now` on (any clock, in seconds).

    `observe` records one answer: `ok` False for an error, which is a 5xx answer or a failed or timed
    out upstream (what the gateway answers 502/503/504); a 4xx is the client's error and is recorded
    as ok. Statistics are over a sliding window of the last `window_s` seconds (older observations are
    discarded); as the analysis promotes `window_s` after it starts, that is all of it until then.
    `decide` rolls back as soon as both versions have `min_requests` and `failure_threshold` checks in
    a row found the canary worse than the thresholds, promotes once `window_s` has passed without a
    failed check (judged or not: the reason says which), and waits otherwise. A final verdict sticks.
    """

    def __init__(self, stable: str, canary: str, policy: CanaryPolicy, now: float):
        if stable == canary:
            raise DistmlError(f"the canary version {canary} is the stable version; pick another version")
        self.stable, self.canary, self.policy = stable, canary, policy
        self.started = now
        self.failed_checks = 0
        self.final: Verdict | None = None
        self._samples: dict[str, deque[tuple[float, bool, float]]] = {
            stable: deque(maxlen=MAX_SAMPLES),
            canary: deque(maxlen=MAX_SAMPLES),
        }

    def observe(self, version: str, ok: bool, latency_s: float, now: float) -> None:
        """Record one answer of `version` (other versions are ignored)."""
        samples = self._samples.get(version)
        if samples is not None and self.final is None:
            samples.append((now, bool(ok), max(0.0, float(latency_s))))

    def stats(self, now: float) -> dict[str, VersionStats]:
        horizon = now - self.policy.window_s
        out = {}
        for version, samples in self._samples.items():
            while samples and samples[0][0] < horizon:
                samples.popleft()
            n = len(samples)
            errors = sum(1 for _, ok, _ in samples if not ok)
            latencies = np.fromiter((lat for _, ok, lat in samples if ok), dtype=np.float64)
            p50, p99 = (float(q) for q in np.percentile(latencies, [50, 99])) if latencies.size else (None, None)
            out[version] = VersionStats(n, errors, errors / n if n else 0.0, p50, p99)
        return out

    def decide(self, now: float) -> Verdict:
        if self.final is not None:
            return self.final
        p = self.policy
        stats = self.stats(now)
        stable, canary = stats[self.stable], stats[self.canary]
        judged = stable.requests >= p.min_requests and canary.requests >= p.min_requests
        problems = []
        if judged:
            increase = canary.error_rate - stable.error_rate
            if increase > p.max_error_rate_increase + 1e-12:
                problems.append(
                    f"canary error rate {canary.error_rate:.1%} ({canary.errors} of {canary.requests}) is "
                    f"{increase:.1%} above stable's {stable.error_rate:.1%} (max increase "
                    f"{p.max_error_rate_increase:.1%})"
                )
            if canary.p99 is not None and stable.p99 is not None and canary.p99 > p.max_p99_ratio * stable.p99:
                ratio = canary.p99 / max(stable.p99, 1e-12)
                problems.append(
                    f"canary p99 latency {_ms(canary.p99)} is {ratio:.1f}x stable's {_ms(stable.p99)} "
                    f"(max {p.max_p99_ratio:g}x)"
                )
        if problems:
            self.failed_checks += 1
            what = "; ".join(problems)
            if self.failed_checks >= p.failure_threshold:
                checks = f" ({self.failed_checks} failed checks in a row)" if p.failure_threshold > 1 else ""
                self.final = Verdict("rollback", f"{what}{checks}", stats)
                return self.final
            return Verdict("wait", f"check {self.failed_checks} of {p.failure_threshold} failed: {what}", stats)
        self.failed_checks = 0
        elapsed = now - self.started
        if elapsed >= p.window_s:
            if judged:
                reason = (
                    f"no regression in {p.window_s:g} s: canary error rate {canary.error_rate:.1%} vs "
                    f"{stable.error_rate:.1%}, p99 {_ms(canary.p99)} vs {_ms(stable.p99)} over {canary.requests} "
                    f"canary and {stable.requests} stable requests"
                )
            else:
                short, n = ("canary", canary.requests)
                if canary.requests >= p.min_requests:
                    short, n = ("stable", stable.requests)
                reason = (
                    f"not judged: only {n} {short} requests in {p.window_s:g} s (min_requests {p.min_requests}); "
                    "promoted as nothing showed it worse"
                )
            self.final = Verdict("promote", reason, stats)
            return self.final
        return Verdict(
            "wait",
            f"analysing: {canary.requests} canary and {stable.requests} stable requests "
            f"(min_requests {p.min_requests}), {p.window_s - elapsed:.1f} s of {p.window_s:g} s left",
            stats,
        )


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()


@dataclass
class CanaryRun:
    """One canary of a model as the gateway runs it: what `GET /admin/models/{model}/canary` shows.

    `state` is "running" from the request on (loading the version into the replicas, then analysing),
    then "promoted" or "rolled_back" once traffic has moved and the losing version is unloaded."""

    model: str
    stable: str
    canary: str
    policy: CanaryPolicy
    started_at: float  # wall clock (time.time())
    state: str = "running"
    reason: str = "loading the canary version into every replica"
    analysis: CanaryAnalysis | None = None
    verdict: Verdict | None = None
    decided_at: float | None = None
    resumed_at: float | None = None  # when a gateway that took over from a dead one began judging it again
    task: Any = field(default=None, repr=False)

    @property
    def versions(self) -> tuple[str, str]:
        return (self.stable, self.canary)

    def view(self) -> dict[str, Any]:
        stats = self.verdict.stats if self.verdict is not None else {}
        return {
            "model": self.model,
            "state": self.state,
            "stable": self.stable,
            "canary": self.canary,
            "reason": self.reason,
            "stats": {v: s.as_dict() for v, s in stats.items()},
            "policy": self.policy.model_dump(),
            "started_at": _iso(self.started_at),
            "decided_at": _iso(self.decided_at),
            "resumed_at": _iso(self.resumed_at),
        }


class CanaryController:
    """Runs the canaries of a gateway: loads the candidate into every replica group, sets the traffic
    split, feeds the answers to its `CanaryAnalysis` and applies the verdict (all traffic to the
    winner, the loser unloaded once no request is in flight to it). The gateway proxies requests;
    this holds the canary state and moves `traffic` (the gateway's split, shared) and nothing else.

    `stable_version(model)` tells the version taking all of a model's traffic (asking a replica when
    no split says), `drain(model, version)` waits for its in-flight requests, and `on_change(run)` is
    called as a run changes state (the gateway's metrics)."""

    def __init__(
        self,
        traffic: dict[str, dict[str, float]],
        groups: list[Any],
        stable_version: Callable[[str], Awaitable[str]],
        drain: Callable[[str, str], Awaitable[None]],
        on_change: Callable[[CanaryRun], None] = lambda run: None,
    ):
        self.traffic, self.groups = traffic, groups
        self.runs: dict[str, CanaryRun] = {}  # the last canary of each model, running or decided
        self._stable_version, self._drain, self._on_change = stable_version, drain, on_change

    def observe(self, model: str, version: str | None, ok: bool, seconds: float) -> bool:
        """Count one answer of `model` by `version` in its running analysis; whether it was counted."""
        run = self.runs.get(model)
        if run is None or run.analysis is None or run.decided_at is not None or version not in run.versions:
            return False
        run.analysis.observe(version, ok, seconds, time.monotonic())
        return True

    def uses(self, model: str, version: str) -> bool:
        """Is `version` of `model` in a canary still running?"""
        run = self.runs.get(model)
        return run is not None and run.state == "running" and version in run.versions

    async def close(self) -> None:
        tasks = [run.task for run in self.runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def start(self, model: str, version: int, policy: CanaryPolicy) -> CanaryRun:
        """Load `version` into every replica of every group, then send it
        `policy.weight` of the traffic beside the stable version (the one taking all of it) and judge it
        (`CanaryAnalysis`) until it is promoted or rolled back. The split is set only once every ready
        replica answers the version, and the losing version is unloaded only once no request is in
        flight to it: under load no request fails. 409 while another canary of `model` runs."""
        canary = str(version)
        current = self.runs.get(model)
        if current is not None and current.state == "running":
            raise ProtocolError(
                409,
                f"a canary of {model}:{current.canary} (stable {current.stable}) is running; wait until it is "
                f"promoted or rolled back (GET /admin/models/{model}/canary) or abort it (DELETE)",
            )
        run = CanaryRun(model, "", canary, policy, started_at=time.time())
        self.runs[model] = run  # held from here: a second canary gets 409 while this one loads
        previous_split = self.traffic.get(model)
        loaded: list[Any] = []
        try:
            run.stable = stable = await self._stable_version(model)
            if stable == canary:
                raise DistmlError(f"version {canary} of {model!r} already takes all traffic; a canary needs another")
            # Pin first: loading a higher version changes a replica's default (its highest) version.
            self.traffic[model] = {stable: 100.0}
            await self._drain(model, "")
            results = await asyncio.gather(
                *(rs.load_version(f"{model}:{canary}") for rs in self.groups), return_exceptions=True
            )
            loaded = [rs for rs, res in zip(self.groups, results) if not isinstance(res, BaseException)]
            failed = [res for res in results if isinstance(res, BaseException)]
            if failed:
                raise failed[0]
        except BaseException:
            await asyncio.gather(*(rs.unload_version(f"{model}:{canary}") for rs in loaded), return_exceptions=True)
            if previous_split is None:
                self.traffic.pop(model, None)
            else:
                self.traffic[model] = previous_split
            if current is not None:
                self.runs[model] = current
            else:
                self.runs.pop(model, None)
            raise
        run.analysis = CanaryAnalysis(stable, canary, policy, time.monotonic())
        run.reason = "analysing"
        self.traffic[model] = {stable: 1.0 - policy.weight, canary: policy.weight}
        log.warning("canary %s:%s started beside %s: %s", model, canary, stable, self.traffic[model])
        self._on_change(run)
        run.task = asyncio.create_task(self._run(run), name=f"canary-{model}")
        return run

    async def _run(self, run: CanaryRun) -> None:
        try:
            while True:
                await asyncio.sleep(run.policy.interval_s)
                verdict = run.analysis.decide(time.monotonic())
                run.verdict, run.reason = verdict, verdict.reason
                if verdict.action != "wait":
                    await self._end(run, verdict)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: never leave a half-judged canary taking traffic
            log.exception("canary analysis of %s", run.model)
            await self._end(run, Verdict("rollback", f"the analysis failed: {exc}", {}))

    async def _end(self, run: CanaryRun, verdict: Verdict) -> None:
        """Move all traffic to the winner, wait for the loser's in-flight requests, unload it."""
        run.decided_at = time.time()
        run.reason = verdict.reason
        if verdict.stats:
            run.verdict = verdict
        promote = verdict.action == "promote"
        winner, loser = (run.canary, run.stable) if promote else (run.stable, run.canary)
        self.traffic[run.model] = {winner: 100.0}
        log.warning("canary %s:%s %s: %s", run.model, run.canary, "promoted" if promote else "rolled back", run.reason)
        await self._drain(run.model, loser)
        results = await asyncio.gather(
            *(rs.unload_version(f"{run.model}:{loser}") for rs in self.groups), return_exceptions=True
        )
        failed = [res for res in results if isinstance(res, BaseException)]
        if failed:
            log.warning("unloading %s:%s after its canary failed: %s", run.model, loser, failed[0])
            run.reason += f"; unloading version {loser} failed: {failed[0]}"
        run.state = "promoted" if promote else "rolled_back"
        self._on_change(run)

    async def abort(self, model: str) -> CanaryRun:
        """Roll the running canary of `model` back now, with reason "aborted"."""
        run = self.runs.get(model)
        if run is None or run.state != "running":
            raise ProtocolError(404, f"no canary of model {model!r} is running")
        if run.analysis is None or run.task is None:
            raise ProtocolError(409, f"the canary {model}:{run.canary} is still loading into the replicas; retry")
        if run.decided_at is not None:
            raise ProtocolError(409, f"the canary {model}:{run.canary} is already decided: {run.reason}")
        run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)
        verdict = Verdict("rollback", "aborted", run.analysis.stats(time.monotonic()))
        run.analysis.final = verdict
        await self._end(run, verdict)
        return run

    def saved(self) -> dict[str, Any]:
        """The canaries as a gateway taking over from this one needs them (`restore`)."""
        return {
            model: {"stable": run.stable, "canary": run.canary, "policy": run.policy.model_dump(), "state": run.state,
                    "reason": run.reason, "analysing": run.analysis is not None, "started_at": run.started_at,
                    "decided_at": run.decided_at, "resumed_at": run.resumed_at}
            for model, run in self.runs.items()
        }  # fmt: skip

    def restore(self, saved: dict[str, Any]) -> list[tuple[str, str]]:
        """Take over the canaries of a gateway that died (their split is in `traffic` already): a running
        one is analysed again from now (the answers it had seen died with that gateway); decided ones are
        kept to be shown. Returns the (model, version) pairs to unload: canaries that were still loading
        (no traffic went to them: as if they had failed) and the losers of canaries being ended."""
        unfinished = []
        for model, entry in saved.items():
            policy = CanaryPolicy.model_validate(entry["policy"])
            run = CanaryRun(model, entry["stable"], entry["canary"], policy, started_at=entry["started_at"])
            run.state, run.reason, run.decided_at = entry["state"], entry["reason"], entry["decided_at"]
            run.resumed_at = entry.get("resumed_at")
            if run.state == "running" and not entry["analysing"]:
                unfinished.append((model, run.canary))
                self.traffic[model] = {run.stable: 100.0}
                continue
            if run.state == "running" and run.decided_at is not None:  # died while unloading the loser
                promoted = self.traffic.get(model) == {run.canary: 100.0}
                run.state = "promoted" if promoted else "rolled_back"
                unfinished.append((model, run.stable if promoted else run.canary))
            self.runs[model] = run
            if run.state == "running":
                run.analysis = CanaryAnalysis(run.stable, run.canary, policy, time.monotonic())
                run.reason, run.resumed_at = "analysing again from the start: the gateway was restarted", time.time()
                log.warning("canary %s:%s beside %s resumed after a gateway restart", model, run.canary, run.stable)
                run.task = asyncio.create_task(self._run(run), name=f"canary-{model}")
            self._on_change(run)
        return unfinished

    def view(self, model: str) -> dict[str, Any]:
        run = self.runs.get(model)
        if run is None:
            return {"model": model, "state": "none", "stable": None, "canary": None, "reason": None, "stats": {},
                    "started_at": None, "decided_at": None, "resumed_at": None}  # fmt: skip
        return run.view()


__all__ = [
    "CANARY_STATES",
    "CanaryAnalysis",
    "CanaryController",
    "CanaryPolicy",
    "CanaryRun",
    "Verdict",
    "VersionStats",
    "parse_canary_policy",
]
