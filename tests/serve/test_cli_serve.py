"""`distml serve` and `distml deploy` as a user runs them: real gateway, real replicas, real load.

Under steady load a replica is killed with kill -9, a new version is deployed as a canary and
then promoted: no request fails, every answer names the version that produced it, and Ctrl-C
stops the gateway and every replica.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest


def distml(workspace, *args, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "distml.cli", "--workspace", str(workspace), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_url(proc, timeout=90.0) -> str:
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("serving "):
            return line.split(" at ")[1].strip()
        if proc.poll() is not None:
            break
    raise AssertionError(f"distml serve did not start: {line} {proc.stderr.read()[-2000:]}")


class Load:
    """Closed-loop V1 clients; records every status and the version that answered."""

    def __init__(self, url: str, image: list, clients: int = 3):
        self.url, self.stop = url, threading.Event()
        self.results: list[tuple[int, str | None]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        self.body = {"instances": [image]}

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/models/cnn:predict", json=self.body)
                    self.results.append((r.status_code, r.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.mark.slow
def test_serve_survives_kill_and_swaps_versions_with_no_failed_request(serve_workspace, make_pixels):
    proc = distml(serve_workspace, "serve", "cnn:1", "--port", "0", "--replicas", "2")
    try:
        url = wait_url(proc)
        replicas = httpx.get(f"{url}/admin/replicas").json()["groups"][0]["replicas"]
        assert len(replicas) == 2
        with Load(url, make_pixels(1, 3)[0].tolist()) as load:
            time.sleep(1.5)
            os.kill(replicas[0]["pid"], signal.SIGKILL)
            time.sleep(2.0)
            canary = distml(serve_workspace, "deploy", "cnn:2", "--url", url, "--canary", "50")
            out, err = canary.communicate(timeout=180)
            assert canary.returncode == 0, err
            assert "50% of traffic" in out
            time.sleep(2.0)
            promote = distml(serve_workspace, "deploy", "cnn:2", "--url", url, "--promote")
            assert promote.wait(timeout=60) == 0
            mark = len(load.results)
            time.sleep(1.5)
        statuses = Counter(status for status, _ in load.results)
        assert set(statuses) == {200}, f"failed requests: {statuses}"
        versions = [v for _, v in load.results]
        assert "cnn:1" in versions and "cnn:2" in versions
        assert set(versions[mark + 10 :]) == {"cnn:2"}, "after promote every answer comes from version 2"
        snapshot = httpx.get(f"{url}/admin/replicas").json()["groups"][0]
        assert snapshot["ready"] == 2, "the killed replica was replaced"
    finally:
        children = [p for p in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], (
            "Ctrl-C stops every replica"
        )


def test_serve_rejects_an_unknown_model(serve_workspace):
    proc = distml(serve_workspace, "serve", "cnn:9", "--port", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no version 9" in err and "Traceback" not in err
