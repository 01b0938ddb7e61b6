"""`distml services` as a user runs it, on real detached services (a gateway and its replica
processes, started as a pipeline's serve step starts them: `ensure_serving`): list, logs, a gateway
killed with SIGKILL, stop. Waits are on processes and answers, never on elapsed time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.heavy("serving-faults")]


def distml(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distml.cli", "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )


def listed(workspace: Path) -> dict[str, dict]:
    out = distml(workspace, "services", "--json")
    assert out.returncode == 0, out.stderr
    return {service["name"]: service for service in json.loads(out.stdout)}


def gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


def test_services_list_logs_a_gateway_killed_with_sigkill_and_stop(service_ws):
    from distml.serve.admin import GatewayAdmin
    from distml.serve.service import ensure_serving, stop_service
    from distml.workspace import Workspace

    ws = Workspace(service_ws)
    try:
        alpha = ensure_serving(ws, "alpha", "cnn:1", {"port": 0})
        beta = ensure_serving(ws, "beta", "mlp", {"port": 0})
        with GatewayAdmin(alpha["url"]) as admin:  # cnn:2 beside cnn:1, 30% of the traffic to it
            admin.deploy("cnn", 2, canary_percent=30)
        alpha_tree = [psutil.Process(alpha["pid"]), *psutil.Process(alpha["pid"]).children(recursive=True)]
        beta_tree = [psutil.Process(beta["pid"]), *psutil.Process(beta["pid"]).children(recursive=True)]

        services = listed(service_ws)
        assert sorted(services) == ["alpha", "beta"]
        a, b = services["alpha"], services["beta"]
        assert (a["state"], a["url"], a["pid"], a["ready"], a["desired"]) == (
            "running",
            alpha["url"],
            alpha["pid"],
            1,
            1,
        )
        assert sorted(a["models"]) == ["cnn:1", "cnn:2"] and a["traffic"] == {"cnn": {"1": 70.0, "2": 30.0}}
        assert (b["state"], b["models"], b["ready"], b["desired"], b["error"]) == ("running", ["mlp:1"], 1, 1, None)
        table = distml(service_ws, "services", "list")
        assert table.returncode == 0, table.stderr
        row = next(line for line in table.stdout.splitlines() if "alpha" in line)
        for cell in ("running", alpha["url"], "cnn v1 70%, v2 30%", "1/1", str(alpha["pid"])):
            assert cell in row, table.stdout

        gateway_log = distml(service_ws, "services", "logs", "alpha")
        assert gateway_log.returncode == 0 and f"gateway ready on {alpha['url']}" in gateway_log.stdout
        replica_log = distml(service_ws, "services", "logs", "alpha", "--replica", "0")
        assert replica_log.returncode == 0 and "event=ready" in replica_log.stdout
        assert "cnn:1" in replica_log.stdout and "cnn:2" not in replica_log.stdout  # the replica before the roll
        rolled = distml(service_ws, "services", "logs", "alpha", "--replica", "g0-1")
        assert "event=ready" in rolled.stdout and "cnn:2" in rolled.stdout
        missing = distml(service_ws, "services", "logs", "alpha", "--replica", "7")
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
        assert "no log of replica g0-7 for service 'alpha'" in missing.stderr
        assert "its logs: the gateway's (no --replica), --replica 0, --replica 1" in missing.stderr

        os.kill(beta["pid"], signal.SIGKILL)  # the gateway dies without a word; its replicas with it
        wait_for(lambda: gone(beta_tree), "beta's gateway and replica to end")
        services = listed(service_ws)  # exits 0 all the same
        assert (services["beta"]["state"], services["beta"]["ready"]) == ("gone", None)
        assert services["alpha"]["state"] == "running"
        table = distml(service_ws, "services")
        assert table.returncode == 0 and "gone" in next(line for line in table.stdout.splitlines() if "beta" in line)

        unknown = distml(service_ws, "services", "stop", "gamma")
        assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
        assert "no service 'gamma'" in unknown.stderr and "services: alpha, beta" in unknown.stderr

        stale = distml(service_ws, "services", "stop", "beta")
        assert stale.returncode == 0 and "service beta was gone" in stale.stdout, stale.stderr
        assert "removed its stale record" in stale.stdout
        assert sorted(listed(service_ws)) == ["alpha"]

        stopped = distml(service_ws, "services", "stop", "alpha")
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped service alpha (gateway pid {alpha['pid']}" in stopped.stdout
        wait_for(lambda: gone(alpha_tree), "alpha's gateway and replicas to end")
        assert listed(service_ws) == {}
        after = distml(service_ws, "services", "logs", "alpha")  # a stopped service's logs remain
        assert after.returncode == 0 and "gateway ready on" in after.stdout
    finally:
        for name in ("alpha", "beta"):
            stop_service(ws, name)
        ws.close()
