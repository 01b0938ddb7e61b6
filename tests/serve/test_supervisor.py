"""A service's gateway killed with SIGKILL under load: its supervisor starts another on the same socket,
which adopts the running replicas (same pids) and keeps the traffic split and the canary. Real
processes (supervisor, gateways, replicas), real clients; waits are on answers and pids, never on time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from load import Load
from waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.heavy("serving-faults")]


def replica_pids(admin) -> list[int]:
    return sorted(r["pid"] for g in admin.snapshot()["groups"] for r in g["replicas"] if r["state"] == "ready")


def test_a_gateway_killed_under_load_comes_back_with_its_replicas_split_and_canary(service_ws):
    """One service, two replicas, a canary of cnn:2 beside cnn:1 taking 30 % under load: the gateway
    killed, then the supervisor killed (which takes the whole service along)."""
    from distml.serve.admin import GatewayAdmin
    from distml.serve.service import ensure_serving, stop_service
    from distml.workspace import Workspace

    ws = Workspace(service_ws)
    served = ensure_serving(ws, "web", "cnn:1", {"port": 0, "replicas": 2})
    folder = service_ws / "services" / "web"
    supervisor = psutil.Process(served["pid"])
    load = None
    try:
        with GatewayAdmin(served["url"]) as admin:
            # a canary nothing ends but an abort (no window end, no threshold a noisy p99 of a few
            # samples could cross): what the test checks is that the takeover keeps it, not its analysis
            never = {"max_error_rate_increase": 1.0, "max_p99_ratio": 1e9}
            admin.start_canary("cnn:2", {"weight": 0.3, "window_s": 3600, "min_requests": 1, **never})
            before = replica_pids(admin)
            assert len(before) == 2
            gateway_pid = int((folder / "gateway.pid").read_text())
            assert psutil.Process(gateway_pid).ppid() == supervisor.pid
            load = Load(served["url"])
            wait_for(lambda: len(load.versions_since(0)) >= 50, "answers before the kill")

            os.kill(gateway_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: len(load.versions_since(killed_at)) >= 50, "answers after the kill")
            first_after = load.first_answer_after(killed_at)
            new_gateway = int((folder / "gateway.pid").read_text())
            assert new_gateway != gateway_pid and psutil.Process(new_gateway).ppid() == supervisor.pid
            assert replica_pids(admin) == before  # adopted, not restarted
            assert admin.snapshot()["traffic"] == {"cnn": {"1": 0.7, "2": 0.3}}
            assert sorted(admin.loaded_models()) == ["cnn:1", "cnn:2"]
            status = admin.canary_status("cnn")
            assert (status["state"], status["stable"], status["canary"]) == ("running", "1", "2")
            assert status["resumed_at"] is not None  # judged again by the new gateway
            load.close()
            # only the requests in flight at the kill may fail: one per client at most
            assert len(load.failed) <= len(load.threads), load.failed
            assert set(load.versions_since(killed_at)) == {"1", "2"}  # the split still sends some to each
            print(f"recovery {first_after - killed_at:.3f} s, failed {len(load.failed)} of {len(load.answers)}")
            assert admin.abort_canary("cnn")["state"] == "rolled_back"  # and the canary can still be ended
            assert admin.snapshot()["traffic"] == {"cnn": {"1": 100.0}}

        tree = [supervisor, *supervisor.children(recursive=True)]
        assert len(tree) == 5  # supervisor, gateway, standby gateway, two replicas
        supervisor.kill()  # the service itself: it takes its gateway, standby and replicas along
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if load is not None:
            load.close()
        stop_service(ws, "web")  # whatever is left, if an assertion failed before the kill


def test_a_step_killed_while_its_service_starts_leaves_it_to_the_retry(service_ws):
    """The process calling `ensure_serving` (a pipeline's serve step) is killed before the gateway is
    ready: the retry finds the service starting on its address and takes it, instead of failing on the
    address in use (or starting a second one beside a service nobody tracks)."""
    from distml.serve.service import ensure_serving, list_services, stop_service
    from distml.workspace import Workspace

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    step = subprocess.Popen(
        [sys.executable, "-c", "import sys; from distml.serve.service import ensure_serving; "
         "from distml.workspace import Workspace; "
         f"ensure_serving(Workspace(sys.argv[1]), 'web', 'cnn:1', {{'port': {port}}})", str(service_ws)],
    )  # fmt: skip
    folder = service_ws / "services" / "web"
    wait_for(lambda: (folder / "service.json").exists() or step.poll() is not None, "the service to start")
    assert not (folder / "gateway.port").exists(), "the service was known only once its gateway was ready"
    step.kill()  # before its gateway is ready: the step never writes what it started
    step.wait()
    ws = Workspace(service_ws)
    orphan = json.loads((folder / "service.json").read_text())["pid"]
    try:
        served = ensure_serving(ws, "web", "cnn:1", {"port": port})  # the step's retry
        assert (served["action"], served["pid"], served["url"]) == ("unchanged", orphan, f"http://127.0.0.1:{port}")
        assert [s.name for s in list_services(ws)] == ["web"]
        tree = [psutil.Process(orphan), *psutil.Process(orphan).children(recursive=True)]
    finally:
        assert stop_service(ws, "web")
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
