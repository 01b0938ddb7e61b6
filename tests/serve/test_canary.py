"""The canary analysis as a pure decision: observations and a clock in, verdicts out (instant, no I/O)."""

from __future__ import annotations

import pytest

from distml.core.errors import DistmlError
from distml.serve.canary import CanaryAnalysis, CanaryPolicy, parse_canary_policy


def feed(analysis: CanaryAnalysis, version: str, n: int, *, errors: int = 0, latency: float = 0.01, at: float = 1.0):
    for i in range(n):
        analysis.observe(version, i >= errors, latency, at)


def test_rolls_back_on_the_error_rate_once_both_versions_have_enough_requests():
    analysis = CanaryAnalysis("1", "2", CanaryPolicy(min_requests=20, max_error_rate_increase=0.05), now=0.0)
    feed(analysis, "1", 40)
    feed(analysis, "2", 19, errors=5)
    assert analysis.decide(1.0).action == "wait"  # 19 canary requests: not enough evidence yet
    feed(analysis, "2", 1)
    verdict = analysis.decide(1.5)
    assert verdict.action == "rollback"
    assert "canary error rate 25.0% (5 of 20)" in verdict.reason and "max increase 5.0%" in verdict.reason
    assert verdict.stats["2"].errors == 5 and verdict.stats["1"].error_rate == 0.0
    assert analysis.decide(100.0) is verdict  # final: sticks


def test_an_error_rate_within_the_allowed_increase_is_no_regression():
    analysis = CanaryAnalysis("1", "2", CanaryPolicy(window_s=5, min_requests=20), now=0.0)
    feed(analysis, "1", 100, errors=10)
    feed(analysis, "2", 100, errors=14)  # +4 points: under the 5-point default
    assert analysis.decide(1.0).action == "wait"
    assert analysis.decide(5.0).action == "promote"


def test_rolls_back_on_the_p99_latency_ratio_and_names_both_numbers():
    analysis = CanaryAnalysis("1", "2", CanaryPolicy(max_p99_ratio=2.0), now=0.0)
    feed(analysis, "1", 50, latency=0.004)
    feed(analysis, "2", 50, latency=0.020)
    verdict = analysis.decide(2.0)
    assert verdict.action == "rollback"
    assert "canary p99 latency 20.0 ms is 5.0x stable's 4.0 ms (max 2x)" in verdict.reason
    assert verdict.stats["2"].p99 == pytest.approx(0.020) and verdict.stats["1"].p50 == pytest.approx(0.004)


def test_promotes_after_the_window_without_evidence_against_it():
    analysis = CanaryAnalysis("1", "2", CanaryPolicy(window_s=10), now=100.0)
    feed(analysis, "1", 80, latency=0.010, at=101.0)
    feed(analysis, "2", 25, latency=0.012, at=101.0)
    assert analysis.decide(109.9).action == "wait"
    verdict = analysis.decide(110.0)
    assert verdict.action == "promote" and verdict.reason.startswith("no regression in 10 s")
    assert "over 25 canary and 80 stable requests" in verdict.reason
    feed(analysis, "2", 50, errors=50, at=110.5)  # after the verdict nothing changes it
    assert analysis.decide(111.0) is verdict


def test_too_few_canary_requests_still_promote_but_say_not_judged():
    analysis = CanaryAnalysis("1", "2", CanaryPolicy(window_s=3, min_requests=20), now=0.0)
    feed(analysis, "1", 100)
    feed(analysis, "2", 4, errors=4)  # all failed, but 4 requests are no evidence
    assert analysis.decide(2.9).action == "wait"
    verdict = analysis.decide(3.0)
    assert verdict.action == "promote"
    assert verdict.reason.startswith("not judged: only 4 canary requests") and "min_requests 20" in verdict.reason


def test_failure_threshold_needs_failed_checks_in_a_row_and_a_passing_check_resets_it():
    analysis = CanaryAnalysis("1", "2", CanaryPolicy(failure_threshold=3, window_s=100), now=0.0)
    feed(analysis, "1", 30, latency=0.01, at=1.0)
    feed(analysis, "2", 30, latency=0.05, at=1.0)
    assert analysis.decide(1.0).reason.startswith("check 1 of 3 failed")
    assert analysis.decide(1.1).reason.startswith("check 2 of 3 failed")
    feed(analysis, "2", 3000, latency=0.01, at=1.2)  # the canary recovers: its p99 is now normal
    assert analysis.decide(1.2).action == "wait" and analysis.failed_checks == 0
    feed(analysis, "2", 5000, latency=0.08, at=1.3)
    assert [analysis.decide(t).action for t in (1.3, 1.4, 1.5)] == ["wait", "wait", "rollback"]
    assert "3 failed checks in a row" in analysis.decide(1.6).reason


def test_observations_older_than_the_window_are_discarded_and_other_versions_ignored():
    analysis = CanaryAnalysis("1", "2", CanaryPolicy(window_s=5, min_requests=1), now=0.0)
    feed(analysis, "2", 10, errors=10, at=0.5)  # a burst of errors that leaves the window
    feed(analysis, "3", 10, errors=10, at=0.5)  # not part of this canary
    feed(analysis, "1", 10, at=6.0)
    feed(analysis, "2", 10, at=6.0)
    stats = analysis.stats(6.0)
    assert set(stats) == {"1", "2"} and stats["2"].requests == 10 and stats["2"].errors == 0
    assert analysis.decide(6.0).action == "promote"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"weight": 1}, "weight: Input should be less than 1 (got 1)"),
        ({"weight": 0}, "weight: Input should be greater than 0"),
        ({"window_s": -1}, "window_s: Input should be greater than 0"),
        ({"min_requests": 0}, "min_requests: Input should be greater than or equal to 1"),
        ({"max_p99_ratio": 0.5}, "max_p99_ratio: Input should be greater than or equal to 1"),
        ({"max_error_rate_increase": 2}, "max_error_rate_increase: Input should be less than or equal to 1"),
        ({"weight": "lots"}, "weight: Input should be a valid number"),
        ({"interval_s": 5, "window_s": 2}, "interval_s (5 s) must not be longer than window_s (2 s)"),
        ({"wieght": 0.1}, "wieght: Extra inputs are not permitted"),
    ],
)
def test_bad_policy_values_give_one_clear_error(values, message):
    with pytest.raises(DistmlError) as info:
        parse_canary_policy(values)
    assert str(info.value).startswith("invalid canary policy: ") and message in str(info.value)
    assert "policy fields: weight, window_s" in str(info.value)


def test_defaults_and_a_canary_equal_to_the_stable_version():
    policy = parse_canary_policy({})
    assert (policy.weight, policy.window_s, policy.min_requests) == (0.2, 10.0, 20)
    assert (policy.max_error_rate_increase, policy.max_p99_ratio, policy.failure_threshold) == (0.05, 2.0, 1)
    with pytest.raises(DistmlError, match="is the stable version"):
        CanaryAnalysis("2", "2", policy, now=0.0)


# -- CanaryController: the canary's moves on the traffic and the replica groups, without a gateway


class Group:
    """A replica group's version calls as the controller makes them (ReplicaSet's contract)."""

    def __init__(self, fail_load: bool = False):
        self.loaded: set[str] = set()
        self.fail_load = fail_load

    async def load_version(self, ref: str) -> None:
        if self.fail_load:
            raise DistmlError(f"cannot load {ref}")
        self.loaded.add(ref)

    async def unload_version(self, ref: str) -> None:
        self.loaded.discard(ref)


def _start(values: dict):
    """(version, policy) from the canary request body as the gateway's route parses it (model cnn)."""
    from distml.serve.admin_api import CanaryRequestBody, parse_body

    body = parse_body(CanaryRequestBody, values, "cnn")
    return body.version, body.policy


def _controller(groups, traffic):
    from distml.serve.canary import CanaryController

    changes = []

    async def stable_version(model: str) -> str:
        return "1"

    async def drain(model: str, version: str) -> None:
        return None

    return CanaryController(traffic, groups, stable_version, drain, changes.append), changes


def test_a_canary_splits_the_traffic_and_a_failing_version_is_rolled_back_everywhere():
    import asyncio

    from distml.serve.protocol import ProtocolError

    async def scenario():
        groups, traffic = [Group(), Group()], {}
        controller, changes = _controller(groups, traffic)
        policy = {"version": "cnn:2", "weight": 0.25, "window_s": 60, "interval_s": 0.01, "min_requests": 5}
        run = await controller.start("cnn", *_start(policy))
        assert (run.stable, run.canary, run.state) == ("1", "2", "running")
        assert traffic["cnn"] == {"1": 0.75, "2": 0.25} and all(g.loaded == {"cnn:2"} for g in groups)
        with pytest.raises(ProtocolError, match="a canary of cnn:2 .stable 1. is running"):
            await controller.start("cnn", *_start({"version": "3"}))
        assert controller.uses("cnn", "2") and not controller.uses("cnn", "3")
        for _ in range(5):
            assert controller.observe("cnn", "1", True, 0.01) and controller.observe("cnn", "2", False, 0.01)
        assert not controller.observe("cnn", "7", True, 0.01), "a version outside the canary is not counted"
        await asyncio.wait_for(run.task, 10)
        assert run.state == "rolled_back" and "canary error rate 100.0%" in run.reason
        assert traffic["cnn"] == {"1": 100.0} and all(g.loaded == set() for g in groups)
        assert [state for state in (c.state for c in changes)][-1] == "rolled_back"
        assert controller.view("cnn")["state"] == "rolled_back" and controller.view("mlp")["state"] == "none"

    asyncio.run(scenario())


def test_a_canary_that_cannot_load_everywhere_leaves_nothing_behind():
    import asyncio

    async def scenario():
        groups, traffic = [Group(), Group(fail_load=True)], {"cnn": {"1": 100.0}}
        controller, _ = _controller(groups, traffic)
        with pytest.raises(DistmlError, match="cannot load cnn:2"):
            await controller.start("cnn", *_start({"version": "2"}))
        assert traffic == {"cnn": {"1": 100.0}}, "the split before the canary is restored"
        assert groups[0].loaded == set(), "unloaded from the group that had loaded it"
        assert controller.view("cnn")["state"] == "none"
        with pytest.raises(DistmlError, match="invalid canary request: version: .* expected a positive integer"):
            _start({"version": "x"})

    asyncio.run(scenario())
