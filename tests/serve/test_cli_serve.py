"""`distml serve` and `distml deploy` as a user runs them: the real gateway over real model replicas.

Two versions of `cnn` are trained once per session (`distml train` on digits); every test starts
`distml serve` (two share one), puts a bounded closed-loop load on it over loopback and asserts on
counts and events (answers, statuses, versions, the gateway's metrics and /admin/replicas), never on
time. `distml deploy` runs in this process (click's runner: the same command, no second torch import).
"""

from __future__ import annotations

import base64
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import fake_replica as fake
import httpx
import numpy as np
import psutil
import pytest
import waiting
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.heavy("serving")]


def distml(workspace: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distml.cli", "--workspace", str(workspace), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def deploy(workspace: Path, *args: str):
    """`distml --workspace WORKSPACE deploy ARGS...` in this process; its click Result (exit_code, stdout)."""
    from click.testing import CliRunner

    from distml.cli import main

    return CliRunner().invoke(main, ["--workspace", str(workspace), "deploy", *args])


def run_distml(workspace: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distml.cli", "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory) -> Path:
    """A workspace where `distml train` made cnn:1 (digits, a few steps); cnn:2 is the same trained
    model registered again with another seed's weights for its last layer, so versions answer apart."""
    import torch

    from distml.models.artifact import load_model, save_model
    from distml.workspace import Workspace

    ws = tmp_path_factory.mktemp("trained") / "ws"
    result = run_distml(
        ws, "train", "--model", "cnn", "--dataset", "digits", "--workers", "1", "--epochs", "1",
        "--max-steps", "15", "--seed", "0", "--run-id", "serve-test",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model cnn:1" in result.stdout
    workspace = Workspace(ws)
    model, manifest = load_model(workspace, "cnn:1")
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(0.5)  # a different (worse) version 2, as a retrained candidate would be
    keys = ("architecture", "arch_args", "input_spec", "preprocessing", "class_names", "training", "data_fingerprint")
    record = save_model(workspace, model, name="cnn", metrics={"test_accuracy": 0.5}, **{k: manifest[k] for k in keys})
    assert record.version == 2
    workspace.close()
    return ws


def digits_images(n: int) -> np.ndarray:
    """n real 28x28 digit images of 0..255 pixels, as a client would send them."""
    from sklearn.datasets import load_digits

    small = load_digits().images[:n]
    return np.stack(
        [np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28)), np.float32) for im in small]
    )


class Service:
    """A running `distml serve`: its URL, its process tree, and helpers to read its state."""

    def __init__(self, workspace: Path, *args: str):
        self.proc = distml(workspace, "serve", *args, "--port", "0")
        self.client = httpx.Client(timeout=120)
        # Threads read both pipes all along: the test waits for a line with a timeout, and the
        # service never blocks on a full pipe however much it logs.
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._forward, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        self._stderr = threading.Thread(target=self._forward, args=(self.proc.stderr, self.errors.append), daemon=True)
        self._stderr.start()
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:  # it exited
                break
            if line.startswith("serving "):
                self.url = line.split(" at ")[1].strip()
                return
            seen.append(line)
        self.proc.kill()
        self.proc.wait(30)
        self._stderr.join(10)
        raise AssertionError(f"distml serve did not start in 120 s: {''.join(seen)[-2000:]} {self.stderr()[-3000:]}")

    @staticmethod
    def _forward(pipe, put) -> None:
        for line in pipe:
            put(line)
        put(None)

    def stderr(self) -> str:
        return "".join(line for line in self.errors if line is not None)

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        # one client for the service's life: the tests poll these routes, and a new httpx client
        # costs 40 ms of CPU (its TLS context loads the CA bundle)
        return self.client.request(method, self.url + path, **kwargs)

    def group(self, index: int = 0) -> dict:
        return self.admin("GET", "/admin/replicas").json()["groups"][index]

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.client.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.client.close()
        children = psutil.Process(self.proc.pid).children(recursive=True) if self.proc.poll() is None else []
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        self._stderr.join(10)
        assert code == 0, self.stderr()[-3000:]
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children),
                 "every replica to stop with the gateway")  # fmt: skip


def wait_for(condition, what: str, timeout: float = 120.0, interval: float = 0.1):
    """`waiting.wait_for` with this file's longer timeout (a real model's replicas start here)."""
    return waiting.wait_for(condition, what, timeout, interval)


class Load:
    """Closed-loop clients (bounded by `stop`); records (status, answering version) of every request.
    `pause` s between one client's requests keeps a steady stream from taking both cores."""

    def __init__(self, url: str, images: np.ndarray, clients: int = 3, kind: str = "v1", pause: float = 0.0):
        self.url, self.kind, self.images, self.pause = url, kind, images, pause
        self.results: list[tuple[int, str | None]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = index
            while not self.stopping.is_set() and len(self.results) < 20_000:
                image = self.images[n % len(self.images)]
                n += 1
                try:
                    if self.kind == "v1":
                        r = client.post(f"{self.url}/v1/models/cnn:predict", json={"instances": [image.tolist()]})
                    else:
                        r = client.post(f"{self.url}/v2/models/cnn/infer", json=v2_body(image[None]))
                    self.results.append((r.status_code, r.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))
                if self.pause:
                    self.stopping.wait(self.pause)

    def answered(self) -> int:
        return sum(1 for status, _ in self.results if status == 200)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)


def v2_body(images: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.reshape(-1).tolist()}]}  # fmt: skip


def versions_of(url: str, n: int, kind: str, images: np.ndarray) -> Counter:
    return Counter(versions_in_order(url, n, kind, images))


def versions_in_order(url: str, n: int, kind: str, images: np.ndarray) -> list[str]:
    """The version that answered each of `n` sequential requests naming none ("v1" or "v2" route)."""
    seen = []
    with httpx.Client(timeout=120) as client:
        for i in range(n):
            image = images[i % len(images)]
            if kind == "v1":
                r = client.post(f"{url}/v1/models/cnn:predict", json={"instances": [image.tolist()]})
            else:
                r = client.post(f"{url}/v2/models/cnn/infer", json=v2_body(image[None]))
                assert r.json()["model_version"] == r.headers["x-model-version"].split(":")[1]
            assert r.status_code == 200, r.text
            seen.append(r.headers["x-model-version"])
    return seen


def test_kill_9_of_a_replica_under_load_loses_no_request_and_a_replacement_joins(trained_workspace):
    service = Service(trained_workspace, "cnn:1", "--replicas", "2")
    try:
        before = service.group()["replicas"]
        assert [r["state"] for r in before] == ["ready", "ready"]
        with Load(service.url, digits_images(8), clients=4) as load:
            wait_for(lambda: load.answered() >= 50, "50 answers before the kill")
            os.kill(before[0]["pid"], signal.SIGKILL)
            at_kill = len(load.results)
            wait_for(lambda: service.metric("distml_gateway_replica_ejections_total") >= 1, "the ejection")
            pids = {r["pid"] for r in before}
            wait_for(
                lambda: (g := service.group())["ready"] == 2 and {r["pid"] for r in g["replicas"]} != pids,
                "a replacement replica to become ready",
            )
            wait_for(lambda: len(load.results) >= at_kill + 100, "100 more answers after the kill")
        statuses = Counter(status for status, _ in load.results)
        assert set(statuses) == {200}, f"failed requests: {statuses}"
        assert service.metric("distml_gateway_retries_total") >= 1, "the requests in flight on it were retried"
        # scaling by hand, with real replicas: up to 3 ready, back to 1
        assert service.admin("POST", "/admin/replicas/scale", json={"replicas": 3}).status_code == 200
        wait_for(lambda: service.group()["ready"] == 3, "3 ready replicas")
        service.admin("POST", "/admin/replicas/scale", json={"replicas": 1})
        wait_for(lambda: len(service.group()["replicas"]) == 1, "1 replica left")
        bad = service.admin("POST", "/admin/replicas/scale", json={"replicas": -1})
        assert bad.status_code == 400 and "integer 0..256" in bad.json()["error"]
    finally:
        service.stop()


def test_cold_start_from_zero_holds_requests_and_hold_timeout_answers_503(trained_workspace):
    images = digits_images(4)
    # a replica takes longer than 1 ms to get ready, even from the warm interpreter (loading the weights
    # alone does). Its first request starts the replica, which gets ready (and stays) while the other
    # service is tested.
    impatient = Service(trained_workspace, "cnn:1", "--autoscale", "0:1", "--replicas", "0", "--hold-timeout", "0.001",
                        "--scale-to-zero-after", "600")  # fmt: skip
    try:
        first = httpx.post(f"{impatient.url}/v1/models/cnn:predict", json={"instances": [images[0].tolist()]},
                           timeout=60)  # fmt: skip
        assert first.status_code == 503
        assert "no replica became ready within the hold timeout of 0.001 s (--hold-timeout)" in first.json()["error"]
        # --replicas 0: start with none (like Knative, the initial scale is otherwise 1)
        service = Service(trained_workspace, "cnn:1", "--autoscale", "0:2", "--replicas", "0",
                          "--scale-to-zero-after", "1", "--stable-window", "2", "--panic-window", "1")  # fmt: skip
        try:
            assert service.group()["desired"] == 0 and service.group()["replicas"] == []
            assert httpx.get(f"{service.url}/v2/health/ready").status_code == 200  # it can cold-start
            with Load(service.url, images, clients=3) as load:  # every request arrives with nothing running
                wait_for(lambda: load.answered() >= 20, "20 answers after the cold start")
            assert set(Counter(s for s, _ in load.results)) == {200}, Counter(s for s, _ in load.results)
            wait_for(lambda: service.group()["replicas"] == [], "scale back to zero when idle", timeout=60)
        finally:
            service.stop()
        wait_for(lambda: impatient.group()["ready"] == 1, "the replica that request woke up")
        again = httpx.post(f"{impatient.url}/v1/models/cnn:predict", json={"instances": [images[0].tolist()]})
        assert again.status_code == 200
    finally:
        impatient.stop()


def test_autoscale_up_under_a_burst_and_down_when_idle(trained_workspace):
    service = Service(trained_workspace, "cnn:1", "--autoscale", "1:3", "--target-concurrency", "1",
                      "--stable-window", "2", "--panic-window", "1")  # fmt: skip
    try:
        assert service.group()["desired"] == 1
        with Load(service.url, digits_images(8), clients=8) as load:
            wait_for(lambda: service.group()["desired"] >= 2, "the autoscaler to add replicas")
            wait_for(lambda: service.group()["ready"] >= 2, "a second replica to serve")
            wait_for(lambda: load.answered() >= 100, "100 answers")
        assert set(Counter(s for s, _ in load.results)) == {200}
        wait_for(lambda: service.group()["desired"] == 1 and len(service.group()["replicas"]) == 1,
                 "scale down to the minimum when idle", timeout=90)  # fmt: skip
        scale = service.admin("POST", "/admin/replicas/scale", json={"replicas": 2})
        assert scale.status_code == 409 and "--autoscale" in scale.json()["error"]
    finally:
        service.stop()


def test_sharded_scatter_gather_answers_equal_a_single_replicas(trained_workspace):
    images = digits_images(7)
    sharded = Service(trained_workspace, "cnn:1", "--shards", "2")
    try:
        v1 = {"instances": [im.tolist() for im in images[:5]]}
        whole = httpx.post(f"{sharded.url}/v1/models/cnn:predict", json=v1, headers={"X-Shard-Key": "k"}).json()
        scattered = httpx.post(f"{sharded.url}/v1/models/cnn:predict", json=v1)
        assert scattered.headers["x-distml-group"] == "0,1" and scattered.headers["x-model-version"] == "cnn:1"
        # the same answers (floats may differ in the last bits: a batch of 5 and parts of 3 and 2 run
        # different kernels)
        assert [p["label"] for p in scattered.json()["predictions"]] == [p["label"] for p in whole["predictions"]]
        np.testing.assert_allclose(
            [p["probabilities"] for p in scattered.json()["predictions"]],
            [p["probabilities"] for p in whole["predictions"]],
            atol=1e-6,
        )
        v2 = v2_body(images)
        one = httpx.post(f"{sharded.url}/v2/models/cnn/infer", json=v2, headers={"X-Shard-Key": "k"}).json()
        both = httpx.post(f"{sharded.url}/v2/models/cnn/infer", json=v2)
        assert both.headers["x-distml-group"] == "0,1"
        assert [o["name"] for o in both.json()["outputs"]] == [o["name"] for o in one["outputs"]]
        assert both.json()["outputs"][0]["shape"] == [7, 10] and both.json()["outputs"][1]["shape"] == [7]
        np.testing.assert_allclose(both.json()["outputs"][0]["data"], one["outputs"][0]["data"], atol=1e-6)
        assert both.json()["outputs"][1]["data"] == one["outputs"][1]["data"]
        # and equal to what the model gives for each image alone
        single = [httpx.post(f"{sharded.url}/v1/models/cnn:predict", json={"instances": [im.tolist()]}).json()
                  for im in images[:5]]  # fmt: skip
        for alone, joint in zip(single, scattered.json()["predictions"]):
            np.testing.assert_allclose(alone["predictions"][0]["probabilities"], joint["probabilities"], atol=1e-6)
        png = io.BytesIO()
        Image.fromarray(images[0].astype(np.uint8)).save(png, "PNG")
        mixed = {"instances": [images[1].tolist(), {"image_bytes": {"b64": base64.b64encode(png.getvalue()).decode()}}]}
        assert httpx.post(f"{sharded.url}/v1/models/cnn:predict", json=mixed).status_code == 200
    finally:
        sharded.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (["cnn:9"], "no version 9"),
        (["cnn:1", "--max-batch-size", "0"], "--max-batch-size: Input should be greater than or equal to 1"),
        (["cnn:1", "--shards", "0"], "--shards: Input should be greater than or equal to 1"),
        (["cnn:1", "--replicas", "0"], "use --autoscale 0:N to scale from zero"),
        (["cnn:1", "--autoscale", "3:1"], "min replicas 3 > max replicas 1"),
        (["cnn:1", "--autoscale", "x"], "--autoscale expects MIN:MAX"),
        (["cnn:1", "--stable-window", "5"], "--stable-window applies to autoscaling; add --autoscale MIN:MAX"),
        (["cnn:1", "--autoscale", "1:2", "--panic-window", "9", "--stable-window", "3"], "must not be longer"),
        (["cnn:1", "--hold-timeout", "-1"], "--hold-timeout: Input should be greater than 0"),
        (["cnn:1", "--max-batch-delay-ms", "-5"], "--max-batch-delay-ms: Input should be greater than or equal"),
    ],
)
def test_bad_flags_fail_at_once_with_one_clear_line_before_any_replica_starts(trained_workspace, args, message):
    from click.testing import CliRunner

    from distml.cli import main

    # in process (the CLI fails before it would start anything); test_a_model_without_recorded_
    # preprocessing_is_refused_at_load runs the same path as a real `distml serve` process
    result = CliRunner().invoke(
        main, ["--workspace", str(trained_workspace), "serve", *args, "--port", "0", "--name", "bad-flags"]
    )
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (trained_workspace / "services" / "bad-flags").exists()


@pytest.fixture
def canary_workspace(serve_workspace, tmp_path) -> Path:
    """A copy of the serving fixtures' workspace (cnn:1 and cnn:2 answer alike, in speed too) where
    cnn:3 is a broken candidate: cnn:1 with a NaN bias in its last layer, as a diverged training
    leaves it. Every answer of it is NaN, so the replica answers 500 to each of its requests."""
    import shutil

    import torch

    from distml.models.artifact import load_model, save_model
    from distml.workspace import Workspace

    root = tmp_path / "ws"
    shutil.copytree(serve_workspace, root)
    workspace = Workspace(root)
    model, manifest = load_model(workspace, "cnn:1")
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].bias.fill_(float("nan"))
    keys = ("architecture", "arch_args", "input_spec", "preprocessing", "class_names", "training", "data_fingerprint")
    record = save_model(workspace, model, name="cnn", metrics={"test_accuracy": 0.0}, **{k: manifest[k] for k in keys})
    assert record.version == 3
    workspace.close()
    return root


def test_canary_is_loaded_in_place_then_promoted_or_rolled_back_by_its_analysis_under_load(canary_workspace):
    from distml.serve.admin import GatewayAdmin

    service = Service(canary_workspace, "cnn:1")
    images = digits_images(8)
    admin = GatewayAdmin(service.url)
    try:
        replica = service.group()["replicas"][0]
        direct = f"http://127.0.0.1:{replica['port']}/v2/repository/models/cnn/load"
        missing = httpx.post(direct, json={"parameters": {"version": "9"}}, timeout=60)
        assert missing.status_code == 404 and "cannot load cnn:9" in missing.json()["error"], missing.text
        assert admin.canary_status("cnn")["state"] == "none"
        bad = service.admin("POST", "/admin/models/cnn/canary", json={"version": "2", "weight": 1.5})
        assert bad.status_code == 400 and "weight: Input should be less than 1" in bad.json()["error"]
        assert service.admin("DELETE", "/admin/models/cnn/canary").status_code == 404
        with Load(service.url, images, clients=3, kind="v2", pause=0.02) as load:
            wait_for(lambda: load.answered() >= 20, "20 answers before the canary")
            # cnn:2 is as good as cnn:1: promoted once its window passes. Judged on errors alone (none
            # either side, whatever the load): a p99 of ~100 samples on 2 shared cores is noise, so
            # max_p99_ratio 1e6 keeps latency out of it; half the traffic gets both 20 answers soon.
            policy = {"weight": 0.5, "window_s": 3, "max_p99_ratio": 1e6}
            started = admin.start_canary("cnn:2", policy)
            assert (started["state"], started["stable"], started["canary"]) == ("running", "1", "2")
            again = service.admin("POST", "/admin/models/cnn/canary", json={"version": "3"})
            assert again.status_code == 409 and "is running" in again.json()["error"]
            promoted = admin.wait_canary("cnn", timeout=120)
            assert promoted["state"] == "promoted", promoted
            assert promoted["reason"].startswith("no regression"), promoted["reason"]
            assert promoted["stats"]["2"]["requests"] >= 20 and promoted["stats"]["2"]["errors"] == 0
            assert service.admin("GET", "/admin/models/cnn/traffic").json()["versions"] == {"2": 100.0}
            assert service.group()["models"] == ["cnn:2"] and service.group()["replicas"][0]["pid"] == replica["pid"]
            at_promote = len(load.results)
            wait_for(lambda: len(load.results) >= at_promote + 30, "30 answers after the promotion")
            # cnn:3 fails every request: rolled back on its error rate as soon as both versions have 20
            # answers, whatever the load (a canary that passed would be promoted after its 30 s window)
            admin.start_canary("cnn:3", {"weight": 0.2, "window_s": 30})
            rolled = admin.wait_canary("cnn", timeout=120)
            assert rolled["state"] == "rolled_back", rolled
            assert "canary error rate 100.0%" in rolled["reason"] and "stable's 0.0%" in rolled["reason"], rolled
            canary_stats, stable_stats = rolled["stats"]["3"], rolled["stats"]["2"]
            assert canary_stats["errors"] == canary_stats["requests"] >= 20 and stable_stats["errors"] == 0, rolled
            assert service.admin("GET", "/admin/models/cnn/traffic").json()["versions"] == {"2": 100.0}
            at_rollback = len(load.results)
            wait_for(lambda: len(load.results) >= at_rollback + 30, "30 answers after the rollback")
        # the only failures are the broken candidate's own answers (500, named cnn:3), none after the rollback
        failed = Counter((status, version) for status, version in load.results if status != 200)
        assert set(failed) == {(500, "cnn:3")}, f"failed requests: {failed}"
        assert sum(failed.values()) >= canary_stats["errors"]
        assert {"cnn:1", "cnn:2", "cnn:3"} <= {version for _, version in load.results}
        assert all(version == "cnn:2" for _, version in load.results[at_rollback + 3 :])
        # the gateway's model-repository routes act on every replica, and refuse what would fail requests
        refused = service.admin("POST", "/v2/repository/models/cnn/unload", json={"parameters": {"version": "2"}})
        assert refused.status_code == 409 and "move its traffic away" in refused.json()["error"]
        unknown = service.admin("POST", "/v2/repository/models/cnn/load", json={"parameters": {"version": "9"}})
        assert unknown.status_code == 404 and "could not load cnn:9" in unknown.json()["error"], unknown.text
        assert service.group()["models"] == ["cnn:2"] and service.group()["replicas"][0]["pid"] == replica["pid"]
        gone = httpx.post(f"{service.url}/v2/models/cnn/versions/3/infer", json=v2_body(images[:1]))
        assert gone.status_code == 404  # unloaded from the replica
        assert service.metric('distml_gateway_canary_state{model="cnn",state="rolled_back"}') == 1
    finally:
        admin.close()
        service.stop()


# ---------------------------------------------------------------- two tests on one service


@pytest.fixture(scope="module")
def seeded_service(trained_workspace):
    """`distml serve cnn:1 --seed 7`, shared by the split test and the accuracy test: the only requests
    here that pin no version are the split test's, so it replays the seeded split's draws exactly."""
    service = Service(trained_workspace, "cnn:1", "--seed", "7")
    yield service
    service.stop()


def test_canary_split_promote_and_rollback_on_every_route(seeded_service, trained_workspace):
    service, images = seeded_service, digits_images(16)
    deployed = deploy(trained_workspace, "cnn:2", "--url", service.url, "--canary", "30")
    assert deployed.exit_code == 0, deployed.output
    assert "30% of traffic to it, 70% to version 1" in deployed.stdout
    split = service.admin("GET", "/admin/models/cnn/traffic").json()["versions"]
    assert split == {"1": 70.0, "2": 30.0}
    # seeded, the split is exact, request by request: the versions of the gateway's draws (an unseeded,
    # unweighted or round-robin choice answers another sequence); 60 on V1, then 60 on V2
    expected = [f"cnn:{v}" for v in fake.replayed_split(7, split, 120)]
    assert Counter(expected) == Counter({"cnn:1": 91, "cnn:2": 29})  # what seed 7 draws of 70/30
    for kind, part in (("v1", expected[:60]), ("v2", expected[60:])):
        seen = versions_in_order(service.url, 60, kind, images)
        assert seen == part, (kind, Counter(seen), Counter(part))
    # a client pins a version whatever the split, on either route
    with httpx.Client(timeout=60) as client:
        for version in ("1", "2"):
            pinned = Counter(
                client.post(f"{service.url}/v1/models/cnn:predict", json={"instances": [images[0].tolist()]},
                            headers={"X-Model-Version": version}).headers["x-model-version"]
                for _ in range(10)
            )  # fmt: skip
            assert pinned == {f"cnn:{version}": 10}
            pinned = Counter(
                client.post(f"{service.url}/v2/models/cnn/infer", json=v2_body(images[:1]),
                            headers={"X-Model-Version": version}).headers["x-model-version"]
                for _ in range(10)
            )  # fmt: skip
            assert pinned == {f"cnn:{version}": 10}
    promote = deploy(trained_workspace, "cnn:2", "--url", service.url, "--promote")
    assert promote.exit_code == 0, promote.output
    for kind in ("v1", "v2"):
        assert versions_of(service.url, 20, kind, images) == {"cnn:2": 20}, kind
    rollback = deploy(trained_workspace, "cnn:1", "--url", service.url, "--rollback")
    assert rollback.exit_code == 0, rollback.output
    for kind in ("v1", "v2"):
        assert versions_of(service.url, 20, kind, images) == {"cnn:1": 20}, kind
    # deleting the split: the replica's default (highest loaded) version answers again
    assert service.admin("DELETE", "/admin/models/cnn/traffic").json() == {"model": "cnn", "versions": {}}
    for kind in ("v1", "v2"):
        assert versions_of(service.url, 10, kind, images) == {"cnn:2": 10}, kind


def test_the_trained_model_answers_digits_correctly_through_the_gateway(seeded_service):
    """The manifest's preprocessing is what training used: served answers are those of training."""
    from sklearn.datasets import load_digits

    labels = load_digits().target[:64]
    body = {"instances": [im.tolist() for im in digits_images(64)]}
    # version 1 named in the path: the split test may have loaded version 2 beside it
    answer = httpx.post(f"{seeded_service.url}/v1/models/cnn/versions/1:predict", json=body, timeout=60)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "cnn:1", answer.text
    accuracy = float(np.mean([p["label"] == y for p, y in zip(answer.json()["predictions"], labels)]))
    assert accuracy >= 0.5, accuracy  # 15 steps of training; normalised wrongly it answers at chance
