"""The gateway on real processes and sockets: proxying, balancing, failover, canary, scaling, rolls, cleanup.

Every gateway here is `python -m distml.serve.gateway SERVE_CONFIG.json` over fake replicas
(tests/serve/fake_replica.py). Assertions are on counts and events (answers, versions, what
/admin/replicas and /metrics show), never on durations or throughput: a busy machine only makes
a test wait longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import fake_replica as fake
import httpx
import pytest

from distml.core.layout import WorkspaceRef
from distml.serve.config import ReplicaConfig
from distml.serve.replicas import READY, NoReplicaAvailable, Replica, ReplicaSet

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def snapshot(base: str, token: str | None = None) -> dict:
    resp = fake.admin(base, "GET", "/admin/replicas", token)
    assert resp.status_code == 200, resp.text
    return resp.json()


def replicas_of(base: str, token: str | None = None) -> list[dict]:
    return snapshot(base, token)["groups"][0]["replicas"]


def states(base: str) -> list[str]:
    return [r["state"] for r in replicas_of(base)]


def metrics_of(base: str, token: str | None = None) -> str:
    return fake.admin(base, "GET", "/metrics", token).text


# ---------------------------------------------------------------- ReplicaSet in-process


def test_least_outstanding_with_round_robin_ties():
    class Proc:
        pid = 0

        def poll(self):
            return None

    template = ReplicaConfig(workspace=WorkspaceRef(root="."), models=["m"])

    async def scenario():
        rs = ReplicaSet(["unused"], template, replicas=0)
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
        # nothing ready: the request is held (and asks for a cold start), then told why after its timeout
        empty = ReplicaSet(["unused"], template, replicas=0)
        demanded = asyncio.Event()
        empty.on_demand = demanded.set
        held = asyncio.create_task(empty.acquire(timeout=0.3))
        await asyncio.wait_for(demanded.wait(), 30)
        assert not held.done() and empty.waiting == 1  # waiting, not failed at once
        with pytest.raises(NoReplicaAvailable, match="no replica of replicas was ready within 0.3 s"):
            await held
        assert empty.waiting == 0

    asyncio.run(scenario())


def test_replica_set_add_remove_drains_first_and_close(tmp_path):
    async def until(condition, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.02)

    async def scenario():
        rs = ReplicaSet(
            fake.FAKE_REPLICA_COMMAND,
            ReplicaConfig(workspace=WorkspaceRef(root=str(tmp_path / "ws")), models=["echo:1"]),
            run_dir=tmp_path / "run",
            replicas=1,
            health_interval=0.25,
        )
        await rs.start()
        first = rs.replicas[0]
        try:
            assert rs.ready_count == 1 and first.port is not None
            assert (tmp_path / "run" / f"{first.id}.json").exists()  # its ReplicaConfig file
            second = await rs.add()
            assert second.state == READY and rs.ready_count == 2 and rs.desired == 2
            busy = await rs.acquire(exclude={first.id})
            assert busy is second
            removal = asyncio.create_task(rs.remove(busy))
            await until(lambda: busy.state == "draining")
            # a negative check: whatever the machine's speed, an outstanding request keeps it alive
            await asyncio.sleep(0.3)
            assert busy.alive() and not removal.done()
            other = await rs.acquire()
            assert other is first  # a draining replica gets no new requests
            rs.release(other)
            rs.release(busy)
            await asyncio.wait_for(removal, 30)
            assert busy.process.returncode == 0  # SIGTERM after the drain: clean exit
            assert rs.desired == 1 and [r.id for r in rs.replicas] == [first.id]
        finally:
            await rs.close()
        assert not first.alive() and rs.replicas == []

    asyncio.run(scenario())


# ---------------------------------------------------------------- admin bodies, in process


def test_admin_bodies_name_a_version_one_way_and_a_bad_one_is_one_clear_400(tmp_path):
    """Every admin route that takes a model version parses it with the same type (`admin_api`): a
    positive integer, "3" or 3, or "echo:3" under model echo's routes; anything else is one 400 in
    the gateway's error shape, naming the body, the field and the body expected. The app runs in
    process without its lifespan: no replica starts, and no bad body reaches one."""
    from distml.serve.gateway import Gateway, create_app

    _, config = fake.write_serve_config(tmp_path, ["echo:1"])
    gateway = Gateway(config)
    app = create_app(gateway)
    version_error = "model version {!r} is not valid; expected a positive integer such as 3 or echo:3"

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:

            async def refused(path: str, body) -> str:
                resp = await client.post(path, json=body)
                assert resp.status_code == 400, (path, body, resp.text)
                assert list(resp.json()) == ["error"], resp.text
                return resp.json()["error"]

            promote = '{"version": "<version>"}'
            for bad in ("latest", "0", 0, -2, True, 2.0, "other:3", "", None):
                error = await refused("/admin/models/echo/promote", {"version": bad})
                assert error == f"invalid promotion: version: {version_error.format(bad)}; expected {promote}"
            assert await refused("/admin/models/echo/promote", {}) == (
                f"invalid promotion: version: Field required; expected {promote}"
            )
            error = await refused("/admin/models/echo/traffic", {"versions": {"1": 50, "latest": 50}})
            assert error.startswith(f"invalid traffic split: versions.latest: {version_error.format('latest')}; ")
            error = await refused("/admin/models/echo/canary", {"version": "x", "weight": 0.5})
            assert error.startswith(f"invalid canary request: version: {version_error.format('x')}; expected "), error
            error = await refused("/v2/repository/models/echo/load", {"parameters": {"version": "two"}})
            assert error == (
                f"invalid repository request: parameters.version: {version_error.format('two')}; "
                'expected {"parameters": {"version": "<version number>"}}'
            )
            assert gateway.traffic == {} and gateway.canary.view("echo")["state"] == "none", "nothing changed"

            # what clients send today, and its spellings, all name version 3
            for good in ("3", 3, "echo:3"):
                resp = await client.post("/admin/models/echo/promote", json={"version": good})
                assert resp.status_code == 200 and resp.json() == {"model": "echo", "versions": {"3": 100.0}}
            resp = await client.post("/admin/models/echo/traffic", json={"versions": {"echo:3": 70, "4": 30, "5": 0}})
            assert resp.status_code == 200 and resp.json()["versions"] == {"3": 70.0, "4": 30.0}

            # /docs shows the bodies the routes parse
            schema = (await client.get("/openapi.json")).json()
            promote_doc = schema["paths"]["/admin/models/{model}/promote"]["post"]["requestBody"]
            assert promote_doc["content"]["application/json"]["schema"]["$ref"].endswith("/PromoteRequestBody")
            assert "version" in schema["components"]["schemas"]["CanaryRequestBody"]["properties"]

    asyncio.run(scenario())


# ---------------------------------------------------------------- one gateway, end to end


def test_proxy_passthrough_errors_health_metrics_and_token(tmp_path):
    with fake.gateway_process(tmp_path, ["echo:7"], token=TOKEN) as (base, _proc):
        with httpx.Client(base_url=base, timeout=30) as client:
            body = fake.v2_body(rows=2, cols=2)
            resp = client.post("/v2/models/echo/infer", json=body, headers=AUTH)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-model-version"] == "echo:7"
            assert resp.json()["model_version"] == "7"  # the body keeps the bare version
            assert resp.json()["outputs"][0]["data"] == [0, 2, 4, 6]
            resp = client.post("/v1/models/echo:predict", json={"instances": [[1, 2], [3, 4]]}, headers=AUTH)
            assert resp.json() == {"predictions": [[2, 4], [6, 8]]} and resp.headers["x-model-version"] == "echo:7"
            resp = client.post("/v1/models/echo/versions/7:predict", json={"instances": [1]}, headers=AUTH)
            assert resp.json() == {"predictions": [2]} and resp.headers["x-model-version"] == "echo:7"
            resp = client.post("/v2/models/echo/versions/7/infer", json=body, headers=AUTH)
            assert resp.status_code == 200 and resp.headers["x-model-version"] == "echo:7"
            # the replica's errors come back untouched
            resp = client.post("/v2/models/missing/infer", json=body, headers=AUTH)
            assert resp.status_code == 404 and "missing" in resp.json()["error"]
            resp = client.post("/v2/models/echo/versions/8/infer", json=body, headers=AUTH)
            assert resp.status_code == 404 and "no version" in resp.json()["error"]
            resp = client.post("/v2/models/echo/infer", content=b"{not json", headers=AUTH)
            assert resp.status_code == 400 and "error" in resp.json()
            # a version pin the gateway cannot read is a 404, as a replica answers a version it lacks
            resp = client.post("/v2/models/echo/infer", json=body, headers={**AUTH, "X-Model-Version": "latest"})
            assert resp.status_code == 404 and "has no version 'latest'" in resp.json()["error"]
            split = client.post("/admin/models/echo/traffic", json={"versions": {"latest": 100}}, headers=AUTH)
            assert split.status_code == 400 and "expected a positive integer such as 3" in split.json()["error"]
            assert client.get("/v2/models/echo", headers=AUTH).json()["name"] == "echo"
            # the bearer token guards everything but health, as on the replicas
            assert client.post("/v2/models/echo/infer", json=body).status_code == 401
            assert client.get("/metrics").status_code == 401
            assert "Bearer" in client.get("/admin/replicas").json()["error"]
            assert client.get("/v2/health/ready").json() == {"ready": True}
            assert client.get("/v2/health/live").json() == {"live": True}
            metrics = client.get("/metrics", headers=AUTH).text
            for line in (
                'distml_gateway_requests_total{model="echo",status="200"} 4.0',
                'distml_gateway_requests_total{model="missing",status="404"} 1.0',
                'distml_gateway_requests_total{model="echo",status="404"} 1.0',
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
        # a body over the limit (32 MiB by default) from a client that sends it all before reading
        # (urllib) gets its 413 and message, on the hot route and on an admin one, not a reset
        limit = 32 * 1024 * 1024
        for path in ("/v2/models/echo/infer", "/admin/replicas/scale"):
            request = urllib.request.Request(base + path, data=b"x" * (2 * limit), headers=AUTH)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            assert refused.value.code == 413, path
            assert f"exceeds the server's limit of {limit} bytes" in json.loads(refused.value.read())["error"]


def test_bearer_scheme_is_case_insensitive_and_a_wrong_token_is_401(tmp_path):
    with fake.gateway_process(tmp_path, ["echo:1"], token=TOKEN) as (base, _proc):
        with httpx.Client(base_url=base, timeout=30) as client:
            for scheme in ("bearer", "BEARER", "Bearer"):
                resp = client.post(
                    "/v2/models/echo/infer", json=fake.v2_body(), headers={"Authorization": f"{scheme} {TOKEN}"}
                )
                assert resp.status_code == 200, (scheme, resp.text)
                resp = client.get("/admin/replicas", headers={"Authorization": f"{scheme} {TOKEN}"})
                assert resp.status_code == 200, (scheme, resp.text)
            for headers in ({"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}, {}):
                for method, path in (("POST", "/v2/models/echo/infer"), ("GET", "/admin/replicas")):
                    resp = client.request(method, path, json=fake.v2_body(), headers=headers)
                    assert resp.status_code == 401, (headers, path)
                    assert resp.headers["www-authenticate"] == "Bearer", (headers, path)
                    assert "Bearer" in resp.json()["error"]
            # only the two health checks are open: not paths that start like them
            assert client.get("/v2/health/ready").status_code == 200
            sneaky = "/v2/health/../models/echo/infer"

            def raw_post(path: str, headers: dict) -> tuple[int, dict]:  # httpx would normalise the '..'
                host, port = base.removeprefix("http://").split(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    conn.request("POST", path, body=json.dumps(fake.v2_body()), headers=headers)
                    resp = conn.getresponse()
                    return resp.status, json.loads(resp.read() or b"{}")
                finally:
                    conn.close()

            for path in (sneaky, "/v2/health/live/../../models/echo", "/v2/health/x"):
                status, _ = raw_post(path, {"content-type": "application/json"})
                assert status == 401, path
            # and with the token, a path with dot segments is refused rather than normalised by the proxy
            status, body = raw_post(sneaky, {"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"})
            assert status == 400 and "'..' segments" in body["error"]


def test_least_outstanding_spreads_load_over_two_replicas(tmp_path):
    # g0-1 takes 400 ms an answer, g0-0 10 ms: least-outstanding keeps about half of the 4 clients'
    # requests on each, so the fast one serves many times more (~40x less what the gateway and the
    # clients add to both; round robin gives both the same count, to one request)
    env = {fake.DELAY_ENV: "10", fake.DELAYS_ENV: "g0-1=400"}
    with fake.gateway_process(tmp_path, replicas=2, env=env) as (base, _proc):
        with fake.Load(base, clients=4) as load:
            fake.wait_for(lambda: load.count() >= 120, timeout=60, message="120 answers")
        assert not load.failures, load.failures[:3]
        served = {r["id"]: r["served"] for r in replicas_of(base)}
        assert set(served) == {"g0-0", "g0-1"} and sum(served.values()) == load.count(), served
        assert served["g0-1"] >= 1, served  # both serve
        assert served["g0-0"] >= 2 * served["g0-1"], served


def test_kill_9_under_load_loses_no_request_and_the_replica_is_replaced(tmp_path):
    with fake.gateway_process(tmp_path, replicas=2, env={"FAKE_REPLICA_DELAY_MS": "20"}) as (base, _proc):
        before = replicas_of(base)
        assert [r["state"] for r in before] == ["ready", "ready"]
        victim = before[0]["pid"]
        with fake.Load(base, clients=4) as load:
            fake.wait_for(lambda: load.count() >= 30, timeout=60, message="30 answers before the kill")
            # freeze the victim until a request is stuck on it, so the kill surely cuts one in flight
            os.kill(victim, signal.SIGSTOP)
            try:
                fake.wait_for(
                    lambda: next(r["outstanding"] for r in replicas_of(base) if r["pid"] == victim) > 0,
                    timeout=30,
                    message="a request in flight on the victim",
                )
            finally:
                os.kill(victim, signal.SIGKILL)
            answered_at_kill = load.count()
            fake.wait_for(
                lambda: fake.metric(metrics_of(base), 'distml_gateway_replica_ejections_total{group="0"}') == 1,
                timeout=30,
                message="the killed replica ejected",
            )
            fake.wait_for(
                lambda: states(base) == ["ready", "ready"] and victim not in {r["pid"] for r in replicas_of(base)},
                timeout=30,
                message="replacement ready",
            )
            fake.wait_for(lambda: load.count() >= answered_at_kill + 50, timeout=60, message="50 answers after")
        assert not load.failures, load.failures[:3]
        pids = {r["pid"] for r in replicas_of(base)}
        assert victim not in pids and before[1]["pid"] in pids
        assert not fake.pid_alive(victim)
        metrics = metrics_of(base)
        assert fake.metric(metrics, 'distml_gateway_replica_ejections_total{group="0"}') == 1
        assert fake.metric(metrics, "distml_gateway_retries_total") >= 1  # the cut request was retried


def test_a_hung_replica_fails_its_health_checks_and_its_requests_move_elsewhere(tmp_path):
    settings = {"replicas": 2, "health_timeout": 0.5, "max_health_failures": 2}
    with fake.gateway_process(tmp_path, env={"FAKE_REPLICA_DELAY_MS": "20"}, **settings) as (base, _proc):
        before = replicas_of(base)
        hung = before[1]["pid"]
        try:
            with fake.Load(base, clients=2) as load:
                fake.wait_for(lambda: load.count() >= 10, timeout=60, message="10 answers before the hang")
                os.kill(hung, signal.SIGSTOP)  # alive but answering nothing: only health checks can tell
                fake.wait_for(
                    lambda: hung not in {r["pid"] for r in replicas_of(base)},
                    timeout=30,
                    message="hung replica ejected",
                )
                answered = load.count()
                fake.wait_for(lambda: load.count() >= answered + 20, timeout=60, message="20 answers after")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert not load.failures, load.failures[:3]  # its stuck requests were reset and retried
        fake.wait_for(lambda: states(base) == ["ready", "ready"], timeout=30, message="replacement ready")
        fake.wait_for(lambda: not fake.pid_alive(hung), timeout=30, message="hung replica gone")
        assert "failed 2 health checks" in snapshot(base)["groups"][0]["last_error"]


def _versions_in_order(client: httpx.Client, n: int, path: str, headers: dict | None = None) -> list[str]:
    """The replica version (`echo:3`, ...) that answered each of `n` sequential requests to `path`."""
    seen = []
    for i in range(n):
        if path.startswith("/v1/"):
            resp = client.post(path, json={"instances": [[i, 1]]}, headers=headers)
            assert resp.status_code == 200 and resp.json() == {"predictions": [[2 * i, 2]]}, resp.text
        else:
            resp = client.post(path, json=fake.v2_body(start=i), headers=headers)
            assert resp.status_code == 200, resp.text
            assert f"echo:{resp.json()['model_version']}" == resp.headers["x-model-version"]
        seen.append(resp.headers["x-model-version"])
    return seen


def _answered_by(client: httpx.Client, n: int, path: str, headers: dict | None = None) -> Counter:
    """How many of `n` requests to `path` each replica version (`echo:3`, ...) answered."""
    return Counter(_versions_in_order(client, n, path, headers))


def test_canary_split_promote_rollback_and_pins_on_v1_and_v2(tmp_path):
    with fake.gateway_process(tmp_path, ["echo:3", "echo:4"], seed=7) as (base, _proc):
        predict = "/v1/models/echo:predict"
        with httpx.Client(base_url=base, timeout=30) as client:
            # no split: the replica's default, the highest loaded version
            assert _answered_by(client, 5, predict) == Counter({"echo:4": 5})
            resp = fake.admin(base, "POST", "/admin/models/echo/traffic", json={"versions": {"3": 70, "4": 30}})
            assert resp.status_code == 200 and resp.json()["versions"] == {"3": 70.0, "4": 30.0}
            # seeded, the split is exact: request by request, the version of the gateway's draw (an
            # unseeded, unweighted or round-robin choice answers another sequence); 60 V1, then 60 V2
            expected = [f"echo:{v}" for v in fake.replayed_split(7, resp.json()["versions"], 120)]
            assert Counter(expected) == Counter({"echo:3": 91, "echo:4": 29})  # what seed 7 draws of 70/30
            v1 = _versions_in_order(client, 60, predict)
            assert v1 == expected[:60], (Counter(v1), Counter(expected[:60]))
            # the same split on V2 (the same draws, continued); a version in the path wins over it
            v2 = _versions_in_order(client, 60, "/v2/models/echo/infer")
            assert v2 == expected[60:], (Counter(v2), Counter(expected[60:]))
            assert _answered_by(client, 10, "/v2/models/echo/versions/3/infer") == Counter({"echo:3": 10})
            # a pinned version is answered by that version, whatever the split says
            for pin in ("4", "echo:4"):
                assert _answered_by(client, 20, predict, {"X-Model-Version": pin}) == Counter({"echo:4": 20})
            assert _answered_by(client, 10, "/v1/models/echo/versions/3:predict") == Counter({"echo:3": 10})

            # promote: all traffic to 4, on V1 and V2
            resp = fake.admin(base, "POST", "/admin/models/echo/promote", json={"version": "4"})
            assert resp.status_code == 200 and resp.json()["versions"] == {"4": 100.0}
            assert _answered_by(client, 30, predict) == Counter({"echo:4": 30})
            assert _answered_by(client, 10, "/v2/models/echo/infer") == Counter({"echo:4": 10})
            for pin in ("3", "echo:3"):
                assert _answered_by(client, 10, predict, {"X-Model-Version": pin}) == Counter({"echo:3": 10})
                assert _answered_by(client, 10, "/v2/models/echo/infer", {"X-Model-Version": pin}) == Counter(
                    {"echo:3": 10}
                )

            # rollback is a promote of the old version
            assert fake.admin(base, "POST", "/admin/models/echo/promote", json={"version": 3}).status_code == 200
            assert _answered_by(client, 30, predict) == Counter({"echo:3": 30})
            assert _answered_by(client, 10, predict, {"X-Model-Version": "4"}) == Counter({"echo:4": 10})

            # removing the split: the default version answers again
            resp = fake.admin(base, "DELETE", "/admin/models/echo/traffic")
            assert resp.status_code == 200 and resp.json()["versions"] == {}
            assert fake.admin(base, "GET", "/admin/models/echo/traffic").json()["versions"] == {}
            assert _answered_by(client, 20, predict) == Counter({"echo:4": 20})
            assert _answered_by(client, 10, predict, {"X-Model-Version": "3"}) == Counter({"echo:3": 10})


def test_scale_by_hand_up_and_down_and_bad_bodies(tmp_path):
    with fake.gateway_process(tmp_path) as (base, _proc):

        def group() -> dict:
            return snapshot(base)["groups"][0]

        def scale(body=None, **kwargs) -> httpx.Response:
            return fake.admin(base, "POST", "/admin/replicas/scale", json=body, **kwargs)

        first = replicas_of(base)[0]["pid"]
        resp = scale({"replicas": 3})
        assert resp.status_code == 200 and resp.json()["groups"][0]["desired"] == 3, resp.text
        fake.wait_for(
            lambda: group()["ready"] == 3 and states(base) == ["ready"] * 3, timeout=45, message="3 replicas ready"
        )
        pids = {r["pid"] for r in replicas_of(base)}
        assert len(pids) == 3 and first in pids
        assert fake.metric(metrics_of(base), 'distml_gateway_replicas_ready{group="0"}') == 3

        resp = scale({"replicas": 1})
        assert resp.status_code == 200 and resp.json()["groups"][0]["desired"] == 1
        fake.wait_for(lambda: states(base) == ["ready"], timeout=45, message="back to 1 replica")
        assert group()["ready"] == 1 and group()["desired"] == 1
        retired = pids - {r["pid"] for r in replicas_of(base)}
        assert len(retired) == 2
        fake.wait_for(lambda: not any(fake.pid_alive(p) for p in retired), timeout=30, message="retired gone")
        resp = httpx.post(base + "/v2/models/echo/infer", json=fake.v2_body(), timeout=30)
        assert resp.status_code == 200 and resp.headers["x-model-version"] == "echo:1"

        # bad bodies: one clear 400 each, and nothing changes
        for bad in ({"replicas": -1}, {"replicas": "x"}, {"replicas": 1.5}, {"replicas": True}, {}, [3]):
            resp = scale(bad)
            assert resp.status_code == 400, (bad, resp.text)
            assert "replicas" in resp.json()["error"], (bad, resp.json())
        resp = scale(content=b"not json")
        assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"], resp.text
        assert group()["desired"] == 1 and states(base) == ["ready"]


def test_roll_to_a_new_version_under_load_loses_no_request(tmp_path):
    with fake.gateway_process(tmp_path, replicas=2, env={"FAKE_REPLICA_DELAY_MS": "20"}) as (base, _proc):
        old_pids = {r["pid"] for r in replicas_of(base)}
        with fake.Load(base, clients=4) as load:
            fake.wait_for(lambda: load.count() >= 20, timeout=60, message="20 answers before the roll")
            resp = fake.admin(base, "POST", "/admin/replicas/roll", json={"models": ["echo:2", "echo:1"]})
            assert resp.status_code == 200, resp.text
            rolled = time.monotonic()  # the old replicas have drained and exited by now
            fake.wait_for(lambda: len(load.sent_after(rolled)) >= 20, timeout=60, message="20 answers after")
        assert not load.failures, load.failures[:3]
        after = Counter(r.version for r in load.sent_after(rolled))
        assert set(after) == {"echo:2"}, after  # the new default: the highest loaded version
        assert {r.version for r in load.records} == {"echo:1", "echo:2"}
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
        assert httpx.post(base + "/v2/models/echo/infer", json=fake.v2_body()).headers["x-model-version"] == "echo:1"


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_replicas_never_outlive_the_gateway(tmp_path, how):
    with fake.gateway_process(tmp_path, replicas=2) as (base, proc):
        pids = [r["pid"] for r in replicas_of(base)]
        assert all(fake.pid_alive(p) for p in pids)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0  # drained and exited cleanly
        else:
            proc.kill()
            proc.wait(30)
        fake.wait_for(lambda: not any(fake.pid_alive(p) for p in pids), timeout=30, message="replicas gone")


def test_a_replica_that_cannot_start_fails_the_gateway_with_its_reason(tmp_path):
    path, config = fake.write_serve_config(tmp_path, ["broken:1"])
    result = subprocess.run(
        [sys.executable, "-m", "distml.serve.gateway", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=fake.gateway_env(),
    )
    assert result.returncode == 2, result.stderr
    assert "error: gateway did not start" in result.stderr
    assert "weights file is corrupt" in result.stderr  # the replica's own words, from its log
    assert (config.service_dir() / "g0" / "g0-0.log").exists()  # the log the message names is kept
    assert (config.service_dir() / "g0" / "g0-0.json").exists()  # and the ReplicaConfig it was given
    assert not Path(config.port_file).exists()
