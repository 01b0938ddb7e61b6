"""A steady load on a service for the tests that break something under it: client threads, each with
its own HTTP client, sending one V2 request at a time and recording when each was sent and answered."""

from __future__ import annotations

import threading
import time

import httpx

PAUSE_S = 0.01  # between a client's requests: a steady load, not one that takes the cores from the suite
BODY = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}


class Load:
    """`clients` threads asking `url`'s model `model`; `answers` holds (sent, version, answered) in
    monotonic seconds, `failed` each failure's description."""

    def __init__(self, url: str, clients: int = 4, model: str = "cnn"):
        self.url, self.model, self.stop, self.lock = url, model, threading.Event(), threading.Lock()
        self.answers: list[tuple[float, str, float]] = []
        self.failed: list[str] = []
        self.threads = [threading.Thread(target=self._ask, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _ask(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(f"{self.url}/v2/models/{self.model}/infer", json=BODY)
                    response.raise_for_status()
                    with self.lock:
                        self.answers.append((sent, response.json()["model_version"], time.monotonic()))
                except httpx.HTTPError as exc:
                    text = getattr(getattr(exc, "response", None), "text", "")[:200]
                    with self.lock:
                        self.failed.append(f"{exc!r}: {text}" if text else repr(exc))
                self.stop.wait(PAUSE_S)

    def versions_since(self, moment: float) -> list[str]:
        """The versions that answered the requests sent after `moment`."""
        with self.lock:
            return [version for sent, version, _ in self.answers if sent > moment]

    def first_answer_after(self, moment: float) -> float | None:
        """When the first request sent after `moment` was answered."""
        with self.lock:
            return min((answered for sent, _, answered in self.answers if sent > moment), default=None)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
