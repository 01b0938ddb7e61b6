"""Who may do what on the gateway and the replicas: every route but health needs the bearer token,
a host other than loopback is refused without one unless --insecure, and the token never shows in
a command line, a log, a written file or an answer."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import fake_replica as fake
import httpx
import psutil
import pytest
from click.testing import CliRunner

from distml.cli import main as cli
from distml.core.errors import DistmlError
from distml.core.exposure import check_exposure, is_loopback
from distml.serve import http

TOKEN = "tok-5ecret-never-shown-0c9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEALTH = {"/v2/health/live", "/v2/health/ready"}
#: what must be behind the token on the gateway (a route table that lost one of these is a bug too)
ADMIN_ROUTES = {
    "/admin/replicas/scale",
    "/admin/replicas/roll",
    "/admin/models/{model}/traffic",
    "/admin/models/{model}/canary",
    "/admin/models/{model}/promote",
    "/v2/repository/models/{model}/{action}",
    "/metrics",
}
REFUSED = "refusing to listen on 0.0.0.0 without a token"


def route_table(app) -> list[tuple[str, str, str]]:
    """(method, route path, concrete path) for every route of `app`, path parameters filled in."""
    table = []
    for route in app.routes:
        for method in sorted((getattr(route, "methods", None) or {"GET"}) - {"HEAD"}):
            table.append((method, route.path, re.sub(r"\{[^}]+\}", "1", route.path)))
    return table


def answers(app, table, headers=None) -> dict[tuple[str, str], httpx.Response]:
    """Each route's answer from `app` in-process (no lifespan: nothing starts), on one event loop."""

    async def ask():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as client:
            return {
                (method, route): await client.request(method, path, headers=headers, content=b"")
                for method, route, path in table
            }

    return asyncio.run(ask())


def assert_guarded(app, open_routes: set[str]) -> set[str]:
    """Every route of `app` but `open_routes` is 401 without the token (or with a wrong one) and not
    401 with it; no answer carries the token. Returns the routes checked."""
    table = route_table(app)
    bare, good = answers(app, table), answers(app, table, AUTH)
    wrong = answers(app, table, {"Authorization": "Bearer no"})
    for method, route, _ in table:
        key = (method, route)
        if route in open_routes:
            assert bare[key].status_code != 401, key
        else:
            assert bare[key].status_code == 401, (key, bare[key].status_code, bare[key].text[:200])
            assert wrong[key].status_code == 401, key
            assert bare[key].headers["www-authenticate"] == "Bearer"
            assert "Bearer <token>" in bare[key].json()["error"]  # says what is expected
        assert good[key].status_code != 401, (key, good[key].text[:200])
        for response in (bare[key], wrong[key], good[key]):
            assert TOKEN not in response.text and TOKEN not in str(response.headers), key
    return {route for _, route, _ in table}


def test_open_paths_are_only_the_health_checks():
    assert http.OPEN_PATHS == HEALTH  # /metrics too needs the token: Prometheus sends it (authorization)


def test_every_gateway_route_needs_the_token_but_health(tmp_path):
    from distml.core.layout import WorkspaceRef
    from distml.serve.config import ReplicaConfig, ServeConfig
    from distml.serve.gateway import Gateway, create_app

    replica = ReplicaConfig(workspace=WorkspaceRef(root=str(tmp_path / "ws")), models=["m:1"])
    config = ServeConfig(replica=replica, token=TOKEN, hold_timeout=0.05, request_timeout=2)
    assert TOKEN not in config.model_dump_json()  # what `distml serve` and services write: config.json
    checked = assert_guarded(create_app(Gateway(config)), HEALTH)
    assert checked >= ADMIN_ROUTES | {"/docs", "/openapi.json", "/v2/{rest:path}"}


def test_every_replica_route_needs_the_token_but_health(serve_workspace):
    from distml.core.layout import WorkspaceRef
    from distml.serve.config import ReplicaConfig
    from distml.serve.server import create_app
    from distml.workspace import Workspace

    config = ReplicaConfig(workspace=WorkspaceRef(root=str(serve_workspace)), models=["mlp"])
    ws = Workspace(serve_workspace)
    try:
        checked = assert_guarded(create_app(config, token=TOKEN, workspace=ws), HEALTH)
    finally:
        ws.close()
    assert {"/v2/repository/models/{model}/load", "/v2/repository/models/{model}/unload", "/metrics"} <= checked
    assert {"/v2/models/{model}/infer", "/v2/models/{model}/jobs", "/v2/jobs/{job_id}"} <= checked


# -- who may listen where ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_token(host):
    assert is_loopback(host)
    check_exposure(host, None, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "example.internal"])
def test_any_other_host_needs_a_token_or_insecure(host):
    assert not is_loopback(host)
    with pytest.raises(DistmlError, match="without a token: anyone who reaches this address could") as refused:
        check_exposure(host, None, False)
    assert "DISTML_SERVE_TOKEN" in str(refused.value) and "--insecure" in str(refused.value)
    check_exposure(host, TOKEN, False)
    check_exposure(host, None, True)


def test_distml_serve_refuses_0_0_0_0_without_a_token_and_reads_a_token_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTML_SERVE_TOKEN", raising=False)
    ws = tmp_path / "ws"
    runner = CliRunner()
    refused = runner.invoke(cli, ["--workspace", str(ws), "serve", "nope", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and REFUSED in refused.output, refused.output
    assert "DISTML_SERVE_TOKEN" in refused.output and "--insecure" in refused.output
    assert not ws.exists(), "refused before the workspace is touched"
    # past the check (then the unknown model stops it): --insecure, a token file, the variable
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    for extra, env in (
        (["--insecure"], {}),
        (["--token-file", str(token_file)], {}),
        ([], {"DISTML_SERVE_TOKEN": TOKEN}),
    ):
        passed = runner.invoke(cli, ["--workspace", str(ws), "serve", "nope", "--host", "0.0.0.0", *extra], env=env)
        assert passed.exit_code == 2 and REFUSED not in passed.output and "nope" in passed.output, passed.output
        assert TOKEN not in passed.output
    both = runner.invoke(cli, ["serve", "nope", "--token", "x", "--token-file", str(token_file)])
    assert both.exit_code == 2 and "not both" in both.output
    (tmp_path / "empty").write_text("\n")
    empty = runner.invoke(cli, ["serve", "nope", "--token-file", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "is empty" in empty.output


def _exit_of(command: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_gateway_and_replica_processes_refuse_0_0_0_0_without_a_token_and_start_with_insecure(tmp_path):
    path, config = fake.write_serve_config(tmp_path, ["echo:1"], host="0.0.0.0", name="exposed")
    refused = _exit_of([sys.executable, "-m", "distml.serve.gateway", str(path)], fake.gateway_env())
    assert refused.returncode == 2 and REFUSED in refused.stderr, refused.stderr
    assert not config.service_dir().exists(), "no replica started"

    replica = fake.write_serve_config(tmp_path, ["echo:1"], name="r")[1].replica
    replica_path = tmp_path / "replica.json"
    replica_path.write_text(replica.model_copy(update={"host": "0.0.0.0"}).model_dump_json())
    refused = _exit_of([sys.executable, "-m", "distml.serve.server", str(replica_path)], fake.gateway_env())
    assert refused.returncode == 2 and REFUSED in refused.stderr and '"insecure": true' in refused.stderr

    with fake.gateway_process(tmp_path, ["echo:1"], host="0.0.0.0", insecure=True, name="insecure") as (base, _):
        assert httpx.get(base + "/admin/replicas").status_code == 200  # open, as asked


# -- the token never shows ---------------------------------------------------------------------


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_the_token_is_in_no_command_line_log_file_or_answer_of_a_gateway_and_its_replicas(tmp_path):
    settings = {"replicas": 2, "log_level": "debug", "name": "leaky", "host": "0.0.0.0"}  # with a token: allowed
    with fake.gateway_process(tmp_path, ["echo:1"], token=TOKEN, **settings) as (base, gateway):
        with httpx.Client(base_url=base, timeout=30) as client:
            body = fake.v2_body()
            assert client.post("/v2/models/echo/infer", json=body, headers=AUTH).status_code == 200
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
                for method, path in (("POST", "/v2/models/echo/infer"), ("POST", "/admin/replicas/scale")):
                    refused = client.request(method, path, json=body, headers=headers)
                    assert refused.status_code == 401 and TOKEN not in refused.text
            bad = [
                client.post("/admin/replicas/scale", json={"replicas": -1}, headers=AUTH),
                client.post("/v2/models/nope/infer", json=body, headers=AUTH),
                client.get("/v2/nope?token=" + TOKEN, headers=AUTH),
            ]
            assert all(r.status_code >= 400 and TOKEN not in r.text for r in bad), [r.text for r in bad]
            fake.admin(base, "POST", "/admin/replicas/scale", TOKEN, json={"replicas": 3})
            while fake.admin(base, "GET", "/admin/replicas", TOKEN).json()["groups"][0]["ready"] < 3:
                time.sleep(0.1)  # a hang ends at the test's timeout
        children = psutil.Process(gateway.pid).children(recursive=True)
        assert len(children) >= 3, children
        for pid in [gateway.pid, *(child.pid for child in children)]:
            assert TOKEN not in _cmdline(pid), f"the token in the command line of {pid}: {_cmdline(pid)}"
        for child in children:  # ... and every replica has it, from its environment
            assert psutil.Process(child.pid).environ().get("DISTML_SERVE_TOKEN") == TOKEN
    logs = list(tmp_path.rglob("*.log"))
    assert len(logs) >= 4 and "replica g0-2 starting" in (tmp_path / "leaky.log").read_text(), logs
    assert list(tmp_path.rglob("*.json")), "the service's config files"
    assert _files_holding(tmp_path, TOKEN) == []


@pytest.mark.heavy("serving")
def test_a_real_replica_logs_and_writes_no_token(launch, make_pixels):
    server = launch(["mlp"], token=TOKEN, log_level="debug")
    pixels = make_pixels(2)
    body = {"inputs": [{"name": "image", "shape": [2, 28, 28], "datatype": "FP32", "data": pixels.ravel().tolist()}]}
    assert httpx.post(f"{server.url}/v2/models/mlp/infer", json=body, headers=AUTH, timeout=30).status_code == 200
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}):
        refused = httpx.post(f"{server.url}/v2/repository/models/mlp/load", json={}, headers=headers)
        assert refused.status_code == 401 and TOKEN not in refused.text
    assert httpx.get(f"{server.url}/v2/models/mlp?token={TOKEN}", headers=AUTH).status_code == 200  # no access log
    bad = httpx.post(f"{server.url}/v2/models/ghost/infer", json=body, headers=AUTH)
    assert bad.status_code == 404 and TOKEN not in bad.text
    assert TOKEN not in _cmdline(server.proc.pid)
    server.stop()
    assert "level=INFO" in server.log() and TOKEN not in server.log()
    assert _files_holding(server.log_path.parent, TOKEN) == []
