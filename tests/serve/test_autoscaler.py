"""Autoscaling: KPA decisions under a fake clock, then burst / idle / scale to zero / cold start for real."""

from __future__ import annotations

import fake_replica as fake
import httpx
import pytest
from pydantic import ValidationError

from distml.core.errors import DistmlError
from distml.serve import config
from distml.serve.autoscaler import Autoscaler, AutoscalerLoop, ScalingPolicy


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(
    scaler: Autoscaler,
    clock: Clock,
    concurrency: float,
    seconds: float,
    ready: int,
    current: int,
    queued: int = 0,
    step: float = 0.5,
) -> tuple[int, list]:
    """Feed `concurrency` for `seconds`, applying each decision; return the final desired count and the trace."""
    trace = []
    for _ in range(int(round(seconds / step))):
        clock.now += step
        scaler.observe(concurrency, duration=step)
        decision = scaler.decide(ready=ready, current=current, queued=queued)
        current = ready = decision.desired
        trace.append(decision)
    return current, trace


def test_steady_load_at_target_holds_and_scales_down_only_after_the_stable_window():
    clock = Clock()
    scaler = Autoscaler(
        ScalingPolicy(target_concurrency=2, min_replicas=1, max_replicas=10, stable_window=60, panic_window=6), clock
    )
    current, _ = run(scaler, clock, concurrency=8, seconds=60, ready=4, current=4)
    assert current == 4  # 8 in flight / target 2
    # load drops to 2: the stable window still remembers the old load, so no sudden scale-down
    current, trace = run(scaler, clock, concurrency=2, seconds=20, ready=4, current=4)
    assert current > 1 and all(d.desired <= 4 for d in trace)
    current, _ = run(scaler, clock, concurrency=2, seconds=45, ready=current, current=current)
    assert current == 1


def test_burst_panics_scales_up_at_once_and_never_down_while_panicking():
    clock = Clock()
    scaler = Autoscaler(
        ScalingPolicy(target_concurrency=1, min_replicas=1, max_replicas=8, stable_window=60, panic_window=6), clock
    )
    run(scaler, clock, concurrency=1, seconds=60, ready=1, current=1)
    clock.now += 1
    scaler.observe(12, duration=1)
    decision = scaler.decide(ready=1, current=1)
    # one second of 12 in flight: the 6 s panic window's mean is (5 x 1 + 12) / 6 = 2.83 -> 3 at once,
    # while the 60 s stable window alone would still say ceil(1.18) = 2
    assert decision.panicking and decision.desired == 3
    assert decision.stable_concurrency == pytest.approx(71 / 60)
    clock.now += 1
    scaler.observe(40, duration=1)
    decision = scaler.decide(ready=3, current=3)
    assert decision.panicking and decision.desired == 8  # (4 + 12 + 40) / 6 = 9.3, capped at max_replicas
    # the burst ends; while panicking the count never goes down
    current, trace = run(scaler, clock, concurrency=0.5, seconds=50, ready=8, current=8)
    assert all(d.desired == 8 for d in trace if d.panicking)
    # after a full stable window without reaching the threshold, panic ends and it scales down
    current, trace = run(scaler, clock, concurrency=0.5, seconds=70, ready=current, current=current)
    assert not trace[-1].panicking and current == 1


def test_a_small_rise_is_not_a_panic():
    clock = Clock()
    scaler = Autoscaler(
        ScalingPolicy(target_concurrency=4, min_replicas=1, max_replicas=8, stable_window=10, panic_window=1), clock
    )
    current, trace = run(scaler, clock, concurrency=6, seconds=3, ready=2, current=2)
    assert not any(d.panicking for d in trace) and current == 2  # 6 on 2 replicas: 75% of target


def test_scale_to_zero_after_idle_and_back_to_one_for_a_waiting_request():
    clock = Clock()
    policy = ScalingPolicy(
        target_concurrency=1, min_replicas=0, max_replicas=3, stable_window=2, panic_window=0.5, scale_to_zero_after=5
    )
    scaler = Autoscaler(policy, clock)
    current, _ = run(scaler, clock, concurrency=1, seconds=3, ready=1, current=1)
    assert current == 1
    current, trace = run(scaler, clock, concurrency=0, seconds=4.5, ready=1, current=1)
    assert current == 1  # idle, but not for scale_to_zero_after yet
    current, trace = run(scaler, clock, concurrency=0, seconds=1, ready=1, current=1)
    assert current == 0
    current, _ = run(scaler, clock, concurrency=0, seconds=10, ready=0, current=0)
    assert current == 0  # stays at zero without traffic
    clock.now += 0.01
    scaler.observe(0, duration=0.01)
    assert scaler.decide(ready=0, current=0, queued=1).desired == 1  # cold start for a waiting request
    # with min_replicas=1 it never goes to zero
    keep = Autoscaler(ScalingPolicy(min_replicas=1, stable_window=2, panic_window=0.5, scale_to_zero_after=0), clock)
    current, _ = run(keep, clock, concurrency=0, seconds=10, ready=1, current=1)
    assert current == 1


def test_scaling_policy_is_the_config_model_and_rejects_bad_settings():
    assert ScalingPolicy is config.ScalingPolicy  # re-exported by the autoscaler module
    for kwargs, flag, words in (
        ({"target_concurrency": 0}, "--target-concurrency", "greater than 0"),
        ({"min_replicas": 3, "max_replicas": 2}, "--autoscale", "min replicas 3 > max replicas 2"),
        ({"min_replicas": -1}, "--autoscale MIN:MAX", "greater than or equal to 0"),
        ({"max_replicas": 0}, "--autoscale MIN:MAX", "greater than or equal to 1"),
        ({"stable_window": 5, "panic_window": 6}, "--autoscale", "must not be longer than the stable window"),
        ({"panic_threshold": 1.0}, "autoscale.panic_threshold", "greater than 1"),
        ({"target": 4}, "autoscale.target", "Extra inputs are not permitted"),
    ):
        with pytest.raises(ValidationError):
            ScalingPolicy(**kwargs)
        with pytest.raises(DistmlError) as info:
            config.parse_scaling_policy(kwargs)
        message = str(info.value)
        assert message.startswith("invalid autoscaling policy: ") and words in message, (kwargs, message)
        # within a whole service config, the message names the `distml serve` flag to change
        with pytest.raises(DistmlError) as info:
            config.parse_serve_config({"replica": {"models": ["echo:1"]}, "autoscale": kwargs})
        message = str(info.value)
        assert f"{flag}: " in message and words in message, (kwargs, message)
    assert config.parse_scaling_policy({"min_replicas": 0, "max_replicas": 2}).min_replicas == 0


class StubReplicas:
    name = "stub"

    def __init__(self):
        self.in_flight, self.waiting, self.ready_count, self.desired = 0, 0, 1, 1
        self.on_demand = None

    def scale_to(self, n):
        self.desired = n


def test_loop_step_turns_the_concurrency_integral_into_a_decision():
    stub = StubReplicas()
    clock = Clock()
    loop = AutoscalerLoop(
        Autoscaler(ScalingPolicy(target_concurrency=1, max_replicas=5, stable_window=4, panic_window=1), clock), stub
    )
    clock.now += 1
    decision = loop.step(area=4.0, last_area=0.0, dt=1.0)  # 4 requests in flight for the whole second
    assert decision.panicking and stub.desired == 4


def test_burst_scales_up_idle_scales_to_zero_and_cold_starts_lose_nothing(tmp_path):
    policy = {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_concurrency": 1,
        "stable_window": 2,
        "panic_window": 0.5,
        "scale_to_zero_after": 2,
    }
    settings = {"replicas": 0, "autoscale": policy, "autoscale_tick": 0.1, "hold_timeout": 60}
    with fake.gateway_process(tmp_path, env={"FAKE_REPLICA_DELAY_MS": "150"}, **settings) as (base, _proc):

        def group() -> dict:
            return fake.admin(base, "GET", "/admin/replicas").json()["groups"][0]

        assert group()["desired"] == 0 and group()["replicas"] == []
        assert httpx.get(base + "/v2/health/ready").status_code == 200  # can cold-start, so ready

        # cold start: with nothing running, the request waits for a replica to start instead of failing
        resp = httpx.post(base + "/v2/models/echo/infer", json=fake.v2_body(), timeout=90)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-model-version"] == "echo:1"
        assert resp.headers["x-distml-replica"] == "g0-0"  # the first replica ever started answered it
        assert group()["ready"] >= 1

        # scaling by hand is refused while the autoscaler owns the count
        resp = fake.admin(base, "POST", "/admin/replicas/scale", json={"replicas": 3})
        assert resp.status_code == 409 and "--autoscale" in resp.json()["error"], resp.text

        # burst: 6 clients at 150 ms each is ~6 in flight against a target of 1 per replica
        with fake.Load(base, clients=6) as load:
            fake.wait_for(lambda: group()["ready"] >= 2, timeout=60, interval=0.1, message="scaled past 1 replica")
            answered = load.count()
            fake.wait_for(lambda: load.count() >= answered + 20, timeout=60, message="20 answers after scaling")
        assert not load.failures, load.failures[:3]

        # idle: down to zero replicas, processes gone
        pids = {r["pid"] for r in group()["replicas"]}
        fake.wait_for(
            lambda: group()["desired"] == 0 and not group()["replicas"],
            timeout=60,
            interval=0.2,
            message="scale to zero",
        )
        fake.wait_for(lambda: not any(fake.pid_alive(p) for p in pids), timeout=30, message="replicas gone")
        metrics = httpx.get(base + "/metrics").text
        assert fake.metric(metrics, 'distml_gateway_replicas_ready{group="0"}') == 0

        # and back from zero: concurrent requests during the cold start all succeed
        with fake.Load(base, clients=3) as load:
            fake.wait_for(lambda: load.count() >= 10, timeout=90, message="requests after cold start")
        assert not load.failures, load.failures[:3]
