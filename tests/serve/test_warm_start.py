"""Scale from zero through the warm pool: an autoscaled service keeps one pre-imported interpreter
(`serve.warmpool`) started, and the replica a request wakes is that very process (same pid), a managed
replica from then on (its log, scale-down, adoption by the next gateway); the next warm one follows, and
none is left once the service stops. Real processes; waits are on pids and answers, never on time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import numpy as np
import psutil
import pytest
from waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.heavy("serving")]

IMAGE = np.random.default_rng(0).integers(0, 256, size=(1, 28, 28)).astype(np.float32)
BODY = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": IMAGE.reshape(-1).tolist()}]}
FAST_SCALING = ("--scale-to-zero-after", "1", "--stable-window", "1", "--panic-window", "1")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group(client: httpx.Client, url: str) -> dict:
    return client.get(f"{url}/admin/replicas").json()["groups"][0]


def warm_interpreter(client: httpx.Client, url: str, not_pid: int | None = None) -> int:
    """The pid of the group's warm interpreter once it has imported everything (another than `not_pid`)."""
    g = wait_for(
        lambda: (g := group(client, url))["warm_pid"] not in (None, not_pid) and g["warm_ready"] and g,
        "a warm interpreter, imported",
        timeout=120,
    )
    return g["warm_pid"]


def infer(client: httpx.Client, url: str) -> None:
    answer = client.post(f"{url}/v2/models/cnn/infer", json=BODY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"] == [1, 10]


def test_a_request_at_zero_is_answered_by_the_warm_interpreter_and_none_is_left_after_stop(service_ws):
    cmd = [sys.executable, "-m", "distml.cli", "--workspace", str(service_ws), "serve", "cnn:1", "--autoscale", "0:2",
           "--replicas", "0", *FAST_SCALING, "--port", "0", "--name", "warm"]  # fmt: skip
    with open(service_ws / "serve.log", "wb") as log_file:  # the gateway's log, read on a failure
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    warm: list[int] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, (service_ws / "serve.log").read_text()[-3000:])
        url = line.split(" at ")[1].strip()
        with httpx.Client(timeout=120) as client:
            for round_ in range(2):  # from zero twice: the second request takes the warm one started after the first
                warm.append(warm_interpreter(client, url, not_pid=warm[-1] if warm else None))
                assert psutil.Process(warm[-1]).ppid() == proc.pid  # the gateway's child, as a replica is
                assert group(client, url)["replicas"] == []
                infer(client, url)
                (replica,) = group(client, url)["replicas"]
                assert (replica["pid"], replica["warm"]) == (warm[-1], True)  # that very process
                assert group(client, url)["warm_starts"] == round_ + 1
                log = service_ws / "services" / "warm" / "g0" / f"{replica['id']}.log"
                assert "event=ready" in log.read_text()  # it logs to its replica's file
                wait_for(lambda: group(client, url)["replicas"] == [], "the scale back to zero", timeout=120)
                wait_for(lambda: gone(warm[-1]), "the scaled-down replica's process to exit", timeout=120)
            last = warm_interpreter(client, url, not_pid=warm[-1])
    except (AssertionError, httpx.HTTPError) as exc:  # with what the gateway logged
        tail = (service_ws / "serve.log").read_text()[-4000:]
        raise AssertionError(f"{exc!r}; the gateway's log ends: {tail}") from exc
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    wait_for(lambda: gone(last), "the warm interpreter to stop with the service", timeout=30)


def test_a_warm_started_replica_is_adopted_by_the_next_gateway_and_its_spare_exits(service_ws):
    """Supervised: the gateway killed, the replica that came from the warm pool is adopted (same pid), the
    killed gateway's warm interpreter exits by itself (its pipe closed) and the new gateway starts its own."""
    from distml.serve.service import ensure_serving, stop_service
    from distml.workspace import Workspace

    ws = Workspace(service_ws)
    options = {"port": 0, "autoscale": "0:2", "replicas": 0, "scale_to_zero_after": 600}
    served = ensure_serving(ws, "web", "cnn:1", options)
    folder = service_ws / "services" / "web"
    supervisor = psutil.Process(served["pid"])
    try:
        url = served["url"]
        with httpx.Client(timeout=120) as client:
            spare = warm_interpreter(client, url)
            gateway = int((folder / "gateway.pid").read_text())
            assert psutil.Process(spare).ppid() == gateway
            infer(client, url)
            (replica,) = group(client, url)["replicas"]
            assert (replica["pid"], replica["warm"]) == (spare, True)
            second = warm_interpreter(client, url, not_pid=spare)
            state = folder / "state.json"
            wait_for(
                lambda: state.exists() and json.loads(state.read_text())["groups"][0]["replicas"],
                "saved state",
                timeout=120,
            )

            psutil.Process(gateway).kill()
            wait_for(lambda: int((folder / "gateway.pid").read_text()) != gateway, "the next gateway", timeout=120)
            wait_for(lambda: gone(second), "the dead gateway's warm interpreter to exit", timeout=120)
            third = warm_interpreter(client, url, not_pid=second)
            assert psutil.Process(third).ppid() == int((folder / "gateway.pid").read_text())
            (adopted,) = group(client, url)["replicas"]
            assert adopted["pid"] == spare  # taken over, not restarted
            infer(client, url)
        tree = [supervisor, *supervisor.children(recursive=True)]
        assert third in {p.pid for p in tree}
    finally:
        stop_service(ws, "web")
        ws.close()
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
