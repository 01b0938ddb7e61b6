"""The gateway on real processes and sockets: proxying, balancing, failover, canary, rolls, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fake_replica as fake
import httpx
import pytest

from distml.serve.replicas import READY, NoReplicaAvailable, Replica, ReplicaSet

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def replicas_of(base: str, token: str | None = None) -> list[dict]:
    return fake.admin(base, "GET", "/admin/replicas", token).json()["groups"][0]["replicas"]


def test_least_outstanding_with_round_robin_ties():
    class Proc:
        pid = 0

        def poll(self):
            return None

    async def scenario():
        rs = ReplicaSet(["unused"], ["m"], workspace=".", replicas=0)
        a, b, c = (
            Replica(f"r{i}", ("m",), Proc(), Path("p"), Path("l"), "h", 0.0, port=1, state=READY) for i in range(3)
        )
        rs._replicas.extend([a, b, c])
        picks = [await rs.acquire() for _ in range(3)]
        assert picks == [a, b, c]  # all idle: round-robin
        rs.release(a)
        rs.release(c)
        assert await rs.acquire() in (a, c)  # b still busy
        assert await rs.acquire() in (a, c)
        assert rs.in_flight == 3
        # an excluded replica (it just failed a request) is skipped while another is ready
        rs.release(a), rs.release(b), rs.release(c)
        assert [await rs.acquire(exclude={"r0", "r1"}) for _ in range(2)] == [c, c]
        assert rs.load_integral() >= 0
        # nothing ready: the request is held, then told why after its timeout
        empty = ReplicaSet(["unused"], ["m"], workspace=".", replicas=0)
        demanded = []
        empty.on_demand = lambda: demanded.append(1)
        t0 = time.monotonic()
        with pytest.raises(NoReplicaAvailable, match="no replica of replicas was ready within 0.3 s"):
            await empty.acquire(timeout=0.3)
        assert time.monotonic() - t0 >= 0.3 and demanded and empty.waiting == 0

    asyncio.run(scenario())


def test_replica_set_add_remove_drains_first_and_close(tmp_path):
    async def scenario():
        rs = ReplicaSet(
            fake.FAKE_REPLICA_COMMAND,
            ["echo:1"],
            workspace=tmp_path / "ws",
            run_dir=tmp_path / "run",
            replicas=1,
            health_interval=0.25,
        )
        await rs.start()
        first = rs.replicas[0]
        try:
            assert rs.ready_count == 1 and first.port is not None
            second = await rs.add()
            assert second.state == READY and rs.ready_count == 2 and rs.desired == 2
            busy = await rs.acquire(exclude={first.id})
            assert busy is second
            removal = asyncio.create_task(rs.remove(busy))
            await asyncio.sleep(0.6)
            assert busy.state == "draining" and busy.alive()  # waits for its outstanding request
            other = await rs.acquire()
            assert other is first  # a draining replica gets no new requests
            rs.release(other)
            rs.release(busy)
            await asyncio.wait_for(removal, 15)
            assert busy.process.returncode == 0  # SIGTERM after the drain: clean exit
            assert rs.desired == 1 and [r.id for r in rs.replicas] == [first.id]
        finally:
            await rs.close()
        assert not first.alive() and rs.replicas == []

    asyncio.run(scenario())


def test_proxy_passthrough_errors_health_metrics_and_token(tmp_path):
    with fake.gateway_process(tmp_path, "--model", "echo:7", "--token", TOKEN) as (base, _proc):
        with httpx.Client(base_url=base, timeout=30) as client:
            body = fake.v2_body(rows=2, cols=2)
            resp = client.post("/v2/models/echo/infer", json=body, headers=AUTH)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-model-version"] == "7"
            assert resp.json()["outputs"][0]["data"] == [0, 2, 4, 6]
            resp = client.post("/v1/models/echo:predict", json={"instances": [[1, 2], [3, 4]]}, headers=AUTH)
            assert resp.json() == {"predictions": [[2, 4], [6, 8]]} and resp.headers["x-model-version"] == "7"
            resp = client.post("/v2/models/echo/versions/7/infer", json=body, headers=AUTH)
            assert resp.status_code == 200
            # the replica's errors come back untouched
            resp = client.post("/v2/models/missing/infer", json=body, headers=AUTH)
            assert resp.status_code == 404 and "missing" in resp.json()["error"]
            resp = client.post("/v2/models/echo/infer", content=b"{not json", headers=AUTH)
            assert resp.status_code == 400 and "error" in resp.json()
            assert client.get("/v2/models/echo", headers=AUTH).json()["name"] == "echo"
            # the bearer token guards everything but health, as on the replicas
            assert client.post("/v2/models/echo/infer", json=body).status_code == 401
            assert client.get("/metrics").status_code == 401
            assert "Bearer" in client.get("/admin/replicas").json()["error"]
            assert client.get("/admin/replicas", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert client.get("/v2/health/ready").json() == {"ready": True}
            assert client.get("/v2/health/live").json() == {"live": True}
            metrics = client.get("/metrics", headers=AUTH).text
            for line in (
                'distml_gateway_requests_total{model="echo",status="200"} 3.0',
                'distml_gateway_requests_total{model="missing",status="404"} 1.0',
                'distml_gateway_requests_total{model="echo",status="400"} 1.0',
                'distml_gateway_replicas_desired{group="0"} 1.0',
                'distml_gateway_replicas_ready{group="0"} 1.0',
                'distml_gateway_queue_depth{group="0"} 0.0',
                "distml_gateway_request_seconds_bucket",
            ):
                assert line in metrics, line
            # bad admin input gets one clear error
            resp = client.post("/admin/models/echo/traffic", json={"versions": {"1": -5}}, headers=AUTH)
            assert resp.status_code == 400 and "weight" in resp.json()["error"]
            resp = client.post("/admin/replicas/roll", json={"models": []}, headers=AUTH)
            assert resp.status_code == 400 and "models" in resp.json()["error"]


def test_least_outstanding_spreads_load_over_two_replicas(tmp_path):
    with fake.gateway_process(tmp_path, "--model", "echo:1", "--replicas", "2", replica_args="--delay-ms 50") as (
        base,
        _proc,
    ):
        with fake.Load(base, clients=4) as load:
            time.sleep(2.0)
        assert not load.failures, load.failures[:3]
        served = [r["served"] for r in replicas_of(base)]
        assert sum(served) >= 40
        assert min(served) / sum(served) > 0.35, served


def test_kill_9_under_load_loses_no_request_and_the_replica_is_replaced(tmp_path):
    with fake.gateway_process(tmp_path, "--model", "echo:1", "--replicas", "2", replica_args="--delay-ms 20") as (
        base,
        _proc,
    ):
        before = replicas_of(base)
        assert [r["state"] for r in before] == ["ready", "ready"]
        with fake.Load(base, clients=4) as load:
            time.sleep(1.5)
            victim = before[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            time.sleep(3.5)
        assert load.count() > 100
        assert not load.failures, load.failures[:3]
        after_kill = [r for r in load.records if r[0] > killed_at]
        assert len(after_kill) > 50
        fake.wait_for(
            lambda: [r["state"] for r in replicas_of(base)] == ["ready", "ready"],
            timeout=15,
            message="replacement ready",
        )
        pids = {r["pid"] for r in replicas_of(base)}
        assert victim not in pids and before[1]["pid"] in pids
        assert not fake.pid_alive(victim)
        metrics = httpx.get(base + "/metrics").text
        assert 'distml_gateway_replica_ejections_total{group="0"} 1.0' in metrics
        retries = float(
            next(line.split()[1] for line in metrics.splitlines() if line.startswith("distml_gateway_retries_total"))
        )
        assert retries >= 1  # requests did hit the dead replica and were retried elsewhere


def test_a_hung_replica_fails_its_health_checks_and_its_requests_move_elsewhere(tmp_path):
    flags = ["--model", "echo:1", "--replicas", "2", "--health-timeout", "0.3", "--max-health-failures", "2"]
    with fake.gateway_process(tmp_path, *flags, replica_args="--delay-ms 20") as (base, _proc):
        before = replicas_of(base)
        hung = before[1]["pid"]
        try:
            with fake.Load(base, clients=2) as load:
                time.sleep(0.5)
                os.kill(hung, signal.SIGSTOP)  # alive but answering nothing: only health checks can tell
                fake.wait_for(
                    lambda: hung not in {r["pid"] for r in replicas_of(base)},
                    timeout=10,
                    message="hung replica ejected",
                )
                time.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert not load.failures, load.failures[:3]  # its stuck requests were reset and retried
        fake.wait_for(
            lambda: [r["state"] for r in replicas_of(base)] == ["ready", "ready"],
            timeout=15,
            message="replacement ready",
        )
        assert not fake.pid_alive(hung)
        assert "failed 2 health checks" in fake.admin(base, "GET", "/admin/replicas").json()["groups"][0]["last_error"]


def test_canary_split_promote_and_rollback(tmp_path):
    with fake.gateway_process(tmp_path, "--model", "echo:3", "--model", "echo:4", "--seed", "7") as (base, _proc):
        resp = fake.admin(base, "POST", "/admin/models/echo/traffic", json={"versions": {"3": 90, "4": 10}})
        assert resp.status_code == 200 and resp.json()["versions"] == {"3": 90.0, "4": 10.0}
        with httpx.Client(base_url=base, timeout=30) as client:

            def versions(n: int, path: str = "/v2/models/echo/infer") -> Counter:
                seen = Counter()
                for i in range(n):
                    resp = client.post(path, json=fake.v2_body(start=i))
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["model_version"] == resp.headers["x-model-version"]
                    seen[resp.headers["x-model-version"]] += 1
                return seen

            split = versions(200)
            assert set(split) == {"3", "4"}
            assert 8 <= split["4"] <= 40, split  # 10% of 200 = 20, binomial sd 4.2
            assert versions(10, "/v2/models/echo/versions/3/infer") == Counter({"3": 10})  # explicit wins
            assert fake.admin(base, "POST", "/admin/models/echo/promote", json={"version": "4"}).status_code == 200
            assert versions(30) == Counter({"4": 30})
            assert fake.admin(base, "GET", "/admin/models/echo/traffic").json()["versions"] == {"4": 100.0}
            fake.admin(base, "POST", "/admin/models/echo/promote", json={"version": 3})  # rollback
            assert versions(30) == Counter({"3": 30})


def test_roll_to_a_new_version_under_load_loses_no_request(tmp_path):
    with fake.gateway_process(tmp_path, "--model", "echo:1", "--replicas", "2", replica_args="--delay-ms 20") as (
        base,
        _proc,
    ):
        old_pids = {r["pid"] for r in replicas_of(base)}
        with fake.Load(base, clients=4) as load:
            time.sleep(1.0)
            resp = fake.admin(base, "POST", "/admin/replicas/roll", json={"models": ["echo:2", "echo:1"]})
            assert resp.status_code == 200, resp.text
            rolled_at = time.monotonic()
            time.sleep(1.0)
        assert not load.failures, load.failures[:3]
        versions = Counter(v for t, _s, v, _e in load.records if t > rolled_at + 0.2)
        assert set(versions) == {"2"} and versions["2"] > 20, versions  # default = the highest loaded
        assert {r[2] for r in load.records} == {"1", "2"}
        now = replicas_of(base)
        assert len(now) == 2 and all(r["models"] == ["echo:2", "echo:1"] for r in now)
        assert not old_pids & {r["pid"] for r in now}
        assert not any(fake.pid_alive(pid) for pid in old_pids)
        # a roll to a model that cannot load fails with the replica's reason and keeps the old replicas
        resp = fake.admin(base, "POST", "/admin/replicas/roll", json={"models": ["broken:1"]})
        assert resp.status_code == 400 and "old replicas kept" in resp.json()["error"]
        assert "weights file is corrupt" in resp.json()["error"]
        assert {r["pid"] for r in replicas_of(base)} == {r["pid"] for r in now}
        # the old version is still loaded, so rollback is a traffic change
        resp = fake.admin(base, "POST", "/admin/models/echo/promote", json={"version": "1"})
        assert resp.status_code == 200
        assert httpx.post(base + "/v2/models/echo/infer", json=fake.v2_body()).headers["x-model-version"] == "1"


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_replicas_never_outlive_the_gateway(tmp_path, how):
    with fake.gateway_process(tmp_path, "--model", "echo:1", "--replicas", "2") as (base, proc):
        pids = [r["pid"] for r in replicas_of(base)]
        assert all(fake.pid_alive(p) for p in pids)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0  # drained and exited cleanly
        else:
            proc.kill()
            proc.wait(10)
        fake.wait_for(lambda: not any(fake.pid_alive(p) for p in pids), timeout=10, message="replicas gone")


def test_a_replica_that_cannot_start_fails_the_gateway_with_its_reason(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "distml.serve.gateway",
        "--workspace",
        str(tmp_path / "ws"),
        "--model",
        "echo:1",
        "--replica-command",
        f"{sys.executable} {fake.HERE / 'fake_replica.py'}",
        "--replica-args=--bogus-flag",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "error: gateway did not start" in result.stderr
    assert "unrecognized arguments: --bogus-flag" in result.stderr
    assert (tmp_path / "run" / "g0" / "g0-0.log").exists()  # the log the message names is kept
