"""GatewayAdmin, the one admin client: what it sends for a deploy (roll, then split or promote),
and one clear error when the gateway cannot be reached or refuses. The real gateway answers these
routes in tests/serve/test_cli_serve.py (`distml deploy`, canaries); here a recording HTTP server
stands in so that each request and error path can be checked exactly."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distml.core.errors import DistmlError
from distml.serve.admin import GatewayAdmin


class Recorder(ThreadingHTTPServer):
    def __init__(self, answers: dict[tuple[str, str], tuple[int, object]]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers, self.seen = answers, []


class Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.seen.append((self.command, self.path, body, self.headers.get("Authorization")))
        status, answer = self.server.answers.get((self.command, self.path), (200, {}))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def gateway():
    def start(answers=None):
        server = Recorder(answers or {})
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    servers: list[Recorder] = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_canary_deploy_rolls_then_splits_with_the_version_serving_before(gateway):
    server, url = gateway({("GET", "/admin/replicas"): (200, {"groups": [{"models": ["cnn:1", "other@prod"]}]})})
    with GatewayAdmin(url, token="secret") as admin:
        done = admin.deploy("cnn", 2, canary_percent=20)
    assert (done.version, done.percent, done.previous) == (2, 20, 1)
    assert [(m, p, b) for m, p, b, _ in server.seen] == [
        ("GET", "/admin/replicas", None),
        ("POST", "/admin/replicas/roll", {"models": ["cnn:2", "cnn:1", "other@prod"]}),
        ("POST", "/admin/models/cnn/traffic", {"versions": {"1": 80, "2": 20}}),
    ]
    assert {auth for *_, auth in server.seen} == {"Bearer secret"}


def test_a_deploy_without_an_earlier_pinned_version_sends_it_all_traffic(gateway):
    server, url = gateway({("GET", "/admin/replicas"): (200, {"groups": [{"models": ["cnn@champion"]}]})})
    with GatewayAdmin(url) as admin:
        done = admin.deploy("cnn", 3, canary_percent=10)
    assert (done.percent, done.previous) == (100.0, None)
    assert server.seen[-1][:3] == ("POST", "/admin/models/cnn/promote", {"version": "3"})
    assert server.seen[-1][3] is None, "no token, no Authorization header"


def test_a_refusal_is_one_error_naming_the_gateways_answer(gateway):
    refusal = {"error": "a canary of cnn is running"}
    _, url = gateway({("POST", "/admin/models/cnn/canary"): (409, refusal)})
    with GatewayAdmin(url) as admin, pytest.raises(DistmlError) as info:
        admin.start_canary("cnn:2", {"weight": 0.2})
    assert str(info.value) == f"gateway answered 409 to POST /admin/models/cnn/canary: {json.dumps(refusal)}"
    with GatewayAdmin(url) as admin, pytest.raises(DistmlError, match="expected NAME:VERSION such as cnn:3"):
        admin.start_canary("cnn@prod")


def test_waiting_for_a_canary_that_does_not_exist_fails_at_once(gateway):
    _, url = gateway({("GET", "/admin/models/cnn/canary"): (200, {"state": "none"})})
    with GatewayAdmin(url) as admin, pytest.raises(DistmlError, match=f"no canary of 'cnn' on the service at {url}"):
        admin.wait_canary("cnn", timeout=60)


def test_an_unreachable_gateway_is_one_clear_error():
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        with GatewayAdmin(url) as admin, pytest.raises(DistmlError, match=f"cannot reach the gateway at {url}"):
            admin.loaded_models()


def test_the_client_builds_its_bodies_with_the_gateways_models_and_refuses_a_bad_one_before_sending(gateway):
    server, url = gateway()
    with GatewayAdmin(url) as admin:
        admin.promote("cnn", 3)
        admin.start_canary("cnn:2", {"weight": 0.5})
        with pytest.raises(DistmlError, match=r"^invalid promotion: version: model version 0 is not valid"):
            admin.promote("cnn", 0)
        with pytest.raises(DistmlError, match=r"^invalid canary request: weight: Input should be less than 1"):
            admin.start_canary("cnn:2", {"weight": 1.5})
        with pytest.raises(DistmlError, match=r"^invalid traffic split: versions.1: Input should be greater"):
            admin.split("cnn", {1: -5, 2: 105})
    assert [(m, p, b) for m, p, b, _ in server.seen] == [
        ("POST", "/admin/models/cnn/promote", {"version": "3"}),
        ("POST", "/admin/models/cnn/canary", {"weight": 0.5, "version": "2"}),  # unset policy fields: the gateway's
    ]
