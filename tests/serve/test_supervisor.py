"""A service's gateway killed with SIGKILL under load: its supervisor starts another on the same socket,
which adopts the running replicas (same pids) and keeps the traffic split and the canary. Real
processes (supervisor, gateways, replicas), real clients; waits are on answers and pids, never on time."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
from load import Load

pytestmark = [pytest.mark.slow, pytest.mark.heavy("serving")]


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def replica_pids(admin) -> list[int]:
    return sorted(r["pid"] for g in admin.snapshot()["groups"] for r in g["replicas"] if r["state"] == "ready")


@pytest.fixture
def service_ws(serve_workspace, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(serve_workspace, root)
    return root


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
            admin.start_canary("cnn:2", {"weight": 0.3, "window_s": 3600, "min_requests": 1})
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
