"""Requests no one wrote by hand: schemathesis sends a few thousand, generated from the apps' own OpenAPI,
to a real replica process and to a real gateway in front of one real replica (with a token), over sockets.

Every answer must be below 500 and, when it is an error, JSON `{"error": "..."}` (what V2 clients
read); no request may hang or drop its connection; afterwards each process is the same one, alive,
answering health, and its memory grew by less than a bound. Positive cases (valid by the schema) and
negative ones (each breaking it somewhere) alike; a share of them names a served model, so that they
pass the model lookup and reach the body parsers. The gateway is also sent the replica's operations
(metadata, readiness, jobs, repository), which it passes through.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

import fake_replica as fake
import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

pytestmark = [pytest.mark.slow, pytest.mark.heavy("fuzz"), pytest.mark.timeout(180)]

TOKEN = "fuzz-s3cret"
MODELS = ["cnn@champion", "mlp"]
# Examples per operation and generation mode: a case with a body costs 25-100 ms to generate, one
# with path parameters only ~3 ms (and the paths find bugs too: version "¹" was a 500).
BODY_EXAMPLES, PATH_EXAMPLES = 25, 120
REQUEST_TIMEOUT_S = 15  # a request that takes longer counts as a hang
RSS_GROWTH_BOUND = 96 * 1024 * 1024
# Admin operations whose valid bodies start or stop processes (a roll, a scale to 256 replicas): only
# their negative cases are generated, which every one of them must refuse.
NEGATIVE_ONLY = {"POST /admin/replicas/scale", "POST /admin/replicas/roll"}


def _error_shape(response: requests.Response) -> str | None:
    """What is wrong with an error answer's body, or None: it must be JSON with an "error" string."""
    try:
        body = response.json()
    except ValueError:
        return f"a {response.status_code} whose body is not JSON: {response.text[:200]!r}"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return f"a {response.status_code} without an 'error' string: {response.text[:200]!r}"
    return None


def fuzz(base: str, operations: Iterable, headers: dict[str, str] | None = None) -> tuple[Counter, list[str]]:
    """Send every operation's generated cases to `base`; returns (requests per operation, problems)."""
    session = requests.Session()
    counts: Counter = Counter()
    problems: list[str] = []

    def check(case) -> None:
        counts[case.operation.label] += 1
        try:
            response = case.call(base_url=base, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:  # a hang (timeout) or a dropped connection
            problems.append(f"{type(exc).__name__}: {exc}\n    {case.as_curl_command(headers=headers)}")
            return
        problem = None
        if response.status_code >= 500:
            problem = f"status {response.status_code}: {response.text[:300]}"
        elif response.status_code >= 400:
            problem = _error_shape(response)
        if problem:
            problems.append(f"{problem}\n    {case.as_curl_command(headers=headers)}")

    for op in operations:
        modes = [GenerationMode.NEGATIVE] if op.label in NEGATIVE_ONLY else [GenerationMode.POSITIVE]
        if op.body and op.label not in NEGATIVE_ONLY:
            modes.append(GenerationMode.NEGATIVE)  # path parameters are strings: nothing negative to make
        for mode in modes:
            strategies = [op.as_strategy(mode)]
            if "{model}" in op.path:
                strategies.append(op.as_strategy(mode, path_parameters={"model": "cnn"}))
            examples = BODY_EXAMPLES if op.body else PATH_EXAMPLES

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(st.one_of(strategies))
            def run(case) -> None:
                check(case)

            run()
    session.close()
    return counts, problems


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def warm_up(base: str, headers: dict[str, str]) -> None:
    """One answer of each kind before the memory baseline: lazily built state is not growth."""
    body = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    for path in ("/v2/models/cnn/infer", "/v2/models/cnn/infer"):
        assert requests.post(base + path, json=body, headers=headers, timeout=60).status_code == 200
    assert requests.post(base + "/v1/models/cnn:predict", json={"instances": [[[0] * 28] * 28]}, headers=headers).ok
    for path in ("/openapi.json", "/metrics", "/v2/models/cnn", "/v2/models/nope"):
        requests.get(base + path, headers=headers, timeout=60)


# Found by earlier runs (each was a 500 or a dropped connection), sent every time as well.
FOUND = [
    ("GET", "/v2/models/cnn/versions/%C2%B9", None),  # version "¹": str.isdigit() holds, int() refuses
    ("POST", "/v2/repository/models/%07x/load", {"parameters": {"version": "1"}}),  # a control character
    ("POST", "/v2/models/cnn/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": [], "data": [1]}]}),
]


def send_found(base: str, headers: dict[str, str]) -> list[str]:
    problems = []
    for method, path, body in FOUND:
        try:
            response = requests.request(method, base + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            problems.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            continue
        if response.status_code >= 500 or _error_shape(response):
            problems.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
    return problems


def report(what: str, counts: Counter, problems: list[str]) -> None:
    print(f"{what}: {sum(counts.values())} generated requests over {len(counts)} operations")
    unique = list(dict.fromkeys(p.split("\n")[0][:120] for p in problems))
    assert not problems, f"{len(problems)} bad answers from the {what}; kinds:\n" + "\n".join(
        next(p for p in problems if p.startswith(u)) for u in unique[:15]
    )


def test_a_replica_answers_generated_requests_below_500(launch):
    server = launch(MODELS, max_batch_size=8, max_batch_delay_ms=2)
    warm_up(server.url, {})
    before = rss(server.proc.pid)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    counts, problems = fuzz(server.url, operations)
    problems += send_found(server.url, {})
    report("replica", counts, problems)
    assert sum(counts.values()) >= 600
    assert server.proc.poll() is None, server.log()[-3000:]
    assert requests.get(server.url + "/v2/health/ready", timeout=10).json() == {"ready": True}
    grown = rss(server.proc.pid) - before
    assert grown < RSS_GROWTH_BOUND, f"the replica's memory grew by {grown / 2**20:.0f} MiB"
    assert "event=unhandled_error" not in server.log()


def test_a_gateway_with_a_token_answers_generated_requests_below_500(tmp_path, serve_workspace):
    from distml.core.layout import WorkspaceRef
    from distml.serve.config import REPLICA_COMMAND, ReplicaConfig

    replica = ReplicaConfig(
        workspace=WorkspaceRef(root=str(serve_workspace)), models=MODELS, max_batch_size=8, max_batch_delay_ms=2
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    name = f"fuzz-{time.monotonic_ns()}"
    settings_ = {"replica_command": list(REPLICA_COMMAND), "replica": replica, "token": TOKEN, "timeout": 120}
    with fake.gateway_process(tmp_path, name=name, **settings_) as (base, proc):
        (before_replica,) = fake.admin(base, "GET", "/admin/replicas", TOKEN).json()["groups"][0]["replicas"]
        replica_base = f"http://127.0.0.1:{before_replica['port']}"
        assert requests.post(base + "/v2/models/cnn/infer", json={}).status_code == 401  # the token is needed
        warm_up(base, auth)
        before = rss(proc.pid)
        gateway_ops = [
            r.ok() for r in schemathesis.openapi.from_url(base + "/openapi.json", headers=auth).get_all_operations()
        ]
        # the replica's operations the gateway does not document itself go through its passthrough
        replica_schema = schemathesis.openapi.from_url(replica_base + "/openapi.json", headers=auth)
        own = {op.label for op in gateway_ops}
        passed = [r.ok() for r in replica_schema.get_all_operations() if r.ok().label not in own]
        counts, problems = fuzz(base, [*gateway_ops, *passed], headers=auth)
        problems += send_found(base, auth)
        report("gateway", counts, problems)
        assert sum(counts.values()) >= 1000
        assert proc.poll() is None
        assert requests.get(base + "/v2/health/ready", timeout=10).json() == {"ready": True}
        (after_replica,) = fake.admin(base, "GET", "/admin/replicas", TOKEN).json()["groups"][0]["replicas"]
        assert after_replica["pid"] == before_replica["pid"]  # the replica behind it never died either
        grown = rss(proc.pid) - before
        assert grown < RSS_GROWTH_BOUND, f"the gateway's memory grew by {grown / 2**20:.0f} MiB"
    gateway_log = (tmp_path / f"{name}.log").read_text()
    replica_log = (replica.workspace.service_dir(name) / "g0" / "g0-0.log").read_text()
    assert "Traceback" not in gateway_log, gateway_log[-3000:]
    assert "event=unhandled_error" not in replica_log, replica_log[-3000:]
