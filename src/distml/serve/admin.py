"""The one client of a gateway's admin API, for `distml deploy`, the pipelines' serve steps and watches.

`GatewayAdmin` wraps the routes under /admin (replicas, roll, promote, traffic, canary) with one
error message per failure and one reused HTTP connection (a new httpx client costs about 40 ms
of CPU for its TLS context, which a loop polling a canary five times a second would pay each time).
It builds every body with the models the gateway parses it with (`admin_api`), so a bad argument
fails here, before any request, with the message the gateway would answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from distml.core.errors import DistmlError
from distml.core.refs import ModelRef
from distml.serve.admin_api import (
    CanaryRequestBody,
    PromoteRequestBody,
    RollRequestBody,
    ScaleRequestBody,
    TrafficRequestBody,
    parse_body,
    to_json,
)

TIMEOUT_S = 300.0  # a roll waits for new replicas to load their models


class GatewayAdmin:
    """Admin calls to the gateway at `url` (with `token` when the service has one); use it as a
    context manager, or close() it, to release its connection."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT_S):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(headers=headers, timeout=timeout)

    def __enter__(self) -> GatewayAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One admin request; its JSON answer, or one DistmlError naming the gateway's answer."""
        try:
            response = self._client.request(method, self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise DistmlError(f"cannot reach the gateway at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise DistmlError(f"gateway answered {response.status_code} to {method} {path}: {response.text[:300]}")
        return response.json()

    # -- replicas and traffic ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The gateway's state: its replica groups (each replica's state, in-flight, models), the
        traffic split per model, canaries and the autoscaler's last decision."""
        return self.request("GET", "/admin/replicas")

    def scale(self, replicas: int) -> dict[str, Any]:
        """Set the replica count of every group (refused while autoscaling is on)."""
        return self.request(
            "POST", "/admin/replicas/scale", to_json(parse_body(ScaleRequestBody, {"replicas": replicas}))
        )

    def loaded_models(self) -> list[str]:
        """The model references the service's replicas load (its first replica group)."""
        return list(self.snapshot()["groups"][0]["models"])

    def roll(self, models: list[str]) -> None:
        """Replace the replicas with ones that load `models` (each new one ready before an old one drains)."""
        self.request("POST", "/admin/replicas/roll", to_json(parse_body(RollRequestBody, {"models": models})))

    def promote(self, name: str, version: int) -> None:
        """Send all of model `name`'s traffic to `version` (also a rollback, to an older one)."""
        body = parse_body(PromoteRequestBody, {"version": version}, name)
        self.request("POST", f"/admin/models/{name}/promote", to_json(body))

    def split(self, name: str, weights: dict[int, float]) -> None:
        """Split model `name`'s traffic between loaded versions, {version: weight}."""
        body = parse_body(TrafficRequestBody, {"versions": weights}, name)
        self.request("POST", f"/admin/models/{name}/traffic", to_json(body))

    def swap(self, ref: str) -> None:
        """Serve `ref` (NAME:VERSION) alone: roll the replicas onto it, then send it all traffic."""
        pinned = ModelRef.pinned(ref)
        self.roll([ref])
        self.promote(pinned.name, pinned.version)

    def deploy(self, name: str, version: int, canary_percent: float = 0.0) -> Deployment:
        """Load `name:version` beside what the replicas load now, then give it `canary_percent` of the
        traffic (split with the version serving before) or, with 0 or no earlier version, all of it."""
        ref = f"{name}:{version}"
        current = self.loaded_models()
        # the versions of `name` loaded now, where pinned ('cnn@champion' names no version to split with)
        earlier = [
            r.version for r in map(ModelRef.parse, current) if r.name == name and r.version not in (None, version)
        ]
        self.roll([ref, *[r for r in current if r != ref]])
        if canary_percent > 0 and earlier:
            self.split(name, {earlier[0]: 100 - canary_percent, version: canary_percent})
            return Deployment(name, version, canary_percent, earlier[0])
        self.promote(name, version)
        return Deployment(name, version, 100.0, None)

    # -- canaries ------------------------------------------------------------------------------

    def start_canary(self, ref: str, policy: dict[str, Any] | None = None) -> dict:
        """Start a canary of `ref` (NAME:VERSION): the gateway loads it into every replica, sends it
        `policy["weight"]` of the traffic and promotes or rolls it back by itself (policy fields:
        `distml.serve.canary.CanaryPolicy`). Returns the canary's state."""
        pinned = ModelRef.pinned(ref)
        body = parse_body(CanaryRequestBody, {**(policy or {}), "version": pinned.version}, pinned.name)
        return self.request("POST", f"/admin/models/{pinned.name}/canary", to_json(body))

    def canary_status(self, name: str) -> dict:
        """The last canary of model `name`: {state (running, promoted, rolled_back or none), stable,
        canary, reason, stats}."""
        return self.request("GET", f"/admin/models/{name}/canary")

    def abort_canary(self, name: str) -> dict:
        """Roll back the running canary of `name` now (the stable version takes all traffic again)."""
        return self.request("DELETE", f"/admin/models/{name}/canary")

    def wait_canary(self, name: str, timeout: float, interval: float = 0.2) -> dict:
        """Poll the canary of `name` until it is promoted or rolled back; its final state."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.canary_status(name)
            if status["state"] in ("promoted", "rolled_back"):
                return status
            if status["state"] == "none":
                raise DistmlError(f"no canary of {name!r} on the service at {self.url}")
            if time.monotonic() > deadline:
                raise DistmlError(
                    f"the canary of {name}:{status['canary']} was not decided after {timeout:g} s: {status}"
                )
            time.sleep(interval)


@dataclass(frozen=True)
class Deployment:
    """What `GatewayAdmin.deploy` did: `percent` of `name`'s traffic to `version`, the rest to `previous`."""

    name: str
    version: int
    percent: float
    previous: int | None
