"""Durable asynchronous inference jobs: stored before the 202, run by whichever replica claims them.

Rows of `inference_jobs` (migration 4) are claimed by a conditional UPDATE and held under a
renewed lease; a dead owner's rows are reclaimed (at once on its own host), so a restarted server
finishes them. Celery, RQ and arq were considered; they need a broker (Redis, RabbitMQ) besides
the metadata store that every replica already shares.

Pattern: event-driven serving: a request becomes a stored job, answered when a replica runs it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa

from distml.core.db import METADATA, UTCDateTime, fetch_one, utc_now
from distml.core.liveness import pid_alive

# -- asynchronous inference jobs (migration 4) ---------------------------------------------------
# A row is written before the job is acknowledged; a replica claims it by a conditional UPDATE
# of (status, owner) and holds it under a lease (`lease_expires`, epoch seconds) that it renews.

inference_jobs = sa.Table(
    "inference_jobs",
    METADATA,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),  # null: whichever version the runner serves
    sa.Column("status", sa.String(20), nullable=False),  # queued, running, succeeded, failed
    sa.Column("request_json", sa.Text, nullable=False),
    sa.Column("result_json", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("callback_url", sa.Text, nullable=True),
    sa.Column("callback_status", sa.String(20), nullable=True),  # pending, delivered, failed
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("lease_expires", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_inference_jobs_status_model", "status", "model"),
)


def _m4_inference_jobs(conn: sa.Connection) -> None:
    inference_jobs.create(conn)


MIGRATIONS = {4: _m4_inference_jobs}


log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "succeeded", "failed")
TERMINAL = ("succeeded", "failed")

#: (model, version or None, request object) -> (version used, V2 infer response as a JSON dict)
Execute = Callable[[str, "int | None", dict], Awaitable[tuple[int, dict]]]


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat()


@dataclass(frozen=True)
class InferenceJob:
    """One stored job: its request and, once run, its result or error, and its callback's state."""

    id: str
    model: str
    version: int | None
    status: str
    request_json: str
    result_json: str | None
    error: str | None
    callback_url: str | None
    callback_status: str | None
    owner: str | None
    lease_expires: float | None
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime


def create_job(
    engine: sa.Engine, *, model: str, version: int | None, request: dict, callback_url: str | None = None
) -> InferenceJob:
    """Store a new queued job (committed when this returns); return its row."""
    now = utc_now()
    row = {
        "id": str(uuid.uuid4()),
        "model": model,
        "version": version,
        "status": "queued",
        "request_json": json.dumps(request, separators=(",", ":")),
        "result_json": None,
        "error": None,
        "callback_url": callback_url,
        "callback_status": None,
        "owner": None,
        "lease_expires": None,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as conn:
        conn.execute(inference_jobs.insert().values(**row))
    return InferenceJob(**row)


def get_job(engine: sa.Engine, job_id: str) -> InferenceJob | None:
    return fetch_one(engine, sa.select(inference_jobs).where(inference_jobs.c.id == job_id), InferenceJob)


def job_view(row: InferenceJob) -> dict[str, Any]:
    """The public JSON of a job: id, model, model_version, status, timestamps, result or error, callback."""
    view: dict[str, Any] = {
        "id": row.id,
        "model": row.model,
        "model_version": None if row.version is None else str(row.version),
        "status": row.status,
        "attempts": row.attempts,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }
    if row.status == "succeeded" and row.result_json is not None:
        view["result"] = json.loads(row.result_json)
    if row.status == "failed":
        view["error"] = row.error
    if row.callback_url:
        view["callback"] = {"url": row.callback_url, "status": row.callback_status or "waiting"}
    return view


class JobRunner:
    """Claims and runs the jobs of the models this replica serves, then delivers their callbacks."""

    def __init__(
        self,
        engine: sa.Engine,
        execute: Execute,
        served: dict[str, set[int]],
        *,
        on_finish: Callable[[str, str, str], None] | None = None,
        concurrency: int = 4,
        poll_interval: float = 0.5,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        callback_attempts: int = 3,
        callback_backoff: float = 0.5,
        callback_timeout: float = 10.0,
    ):
        self.engine = engine
        self.execute = execute
        self.served = served
        self.on_finish = on_finish
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.callback_attempts = callback_attempts
        self.callback_backoff = callback_backoff
        self.callback_timeout = callback_timeout
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._active: dict[str, asyncio.Task] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._http: httpx.AsyncClient | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=self.callback_timeout)
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="job-runner")

    def wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, give running jobs `timeout` seconds, hand the rest back to the queue."""
        self._stopping = True
        self.wake()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._active:
            await asyncio.wait(list(self._active.values()), timeout=timeout)
        leftovers = list(self._active)
        for task in list(self._active.values()):
            task.cancel()
        await asyncio.gather(*self._active.values(), return_exceptions=True)
        if leftovers:
            await asyncio.to_thread(self._release, leftovers)
        if self._http is not None:
            await self._http.aclose()

    # -- claiming ---------------------------------------------------------------------------

    def _owner_gone(self, owner: str | None, lease_expires: float | None, now: float) -> bool:
        if owner is None or lease_expires is None or lease_expires < now:
            return True
        if owner == self.owner:
            return False
        host, _, rest = owner.partition(":")
        pid_text = rest.partition(":")[0]
        if host == self.host and pid_text.isdigit() and int(pid_text) != os.getpid():
            return not pid_alive(int(pid_text))
        return False

    def _claimable(self, row: Any, now: float) -> bool:
        if row.id in self._active:
            return False
        if row.status in TERMINAL:  # only its callback is left to deliver
            return row.callback_status == "pending" and self._owner_gone(row.owner, row.lease_expires, now)
        if row.version is not None and row.version not in self.served.get(row.model, set()):
            return False
        return row.status == "queued" or self._owner_gone(row.owner, row.lease_expires, now)

    def _claim(self) -> InferenceJob | None:
        now = time.time()
        t = inference_jobs
        query = (
            sa.select(t.c.id, t.c.model, t.c.version, t.c.status, t.c.owner, t.c.lease_expires, t.c.callback_status)
            .where(t.c.model.in_(sorted(self.served)))
            .where(sa.or_(t.c.status.in_(("queued", "running")), t.c.callback_status == "pending"))
            .order_by(t.c.created_at)
            .limit(100)
        )
        with self.engine.connect() as conn:
            candidates = conn.execute(query).all()
        for row in candidates:
            if not self._claimable(row, now):
                continue
            values: dict[str, Any] = {
                "owner": self.owner,
                "lease_expires": now + self.lease_seconds,
                "updated_at": utc_now(),
            }
            if row.status not in TERMINAL:
                values["status"] = "running"
                values["attempts"] = t.c.attempts + 1
            owner_match = t.c.owner.is_(None) if row.owner is None else t.c.owner == row.owner
            with self.engine.begin() as conn:
                claimed = conn.execute(
                    t.update().where(t.c.id == row.id, t.c.status == row.status, owner_match).values(**values)
                ).rowcount
            if claimed == 1:
                return get_job(self.engine, row.id)
        return None

    def _release(self, job_ids: list[str]) -> None:
        t = inference_jobs
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.id.in_(job_ids), t.c.owner == self.owner, t.c.status == "running")
                .values(status="queued", owner=None, lease_expires=None, updated_at=utc_now())
            )
            conn.execute(
                t.update().where(t.c.id.in_(job_ids), t.c.owner == self.owner).values(owner=None, lease_expires=None)
            )

    async def _loop(self) -> None:
        while not self._stopping:
            row = None
            if len(self._active) < self.concurrency:
                try:
                    row = await asyncio.to_thread(self._claim)
                except Exception:
                    log.exception("claiming an inference job failed; retrying")
            if row is not None:
                self._active[row.id] = asyncio.get_running_loop().create_task(self._process(row))
                continue
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.poll_interval)
            except TimeoutError:
                pass

    # -- running ----------------------------------------------------------------------------

    def _update(self, job_id: str, **values: Any) -> bool:
        t = inference_jobs
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    t.update().where(t.c.id == job_id, t.c.owner == self.owner).values(updated_at=utc_now(), **values)
                ).rowcount
                == 1
            )

    async def _renew(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            await asyncio.to_thread(self._update, job_id, lease_expires=time.time() + self.lease_seconds)

    async def _process(self, row: InferenceJob) -> None:
        job_id = row.id
        renew = asyncio.get_running_loop().create_task(self._renew(job_id))
        try:
            if row.status == "running":
                row = await self._run(row)
                if row is None:
                    return
            if row.callback_url and row.callback_status == "pending":
                delivered = await self._deliver(row)
                await asyncio.to_thread(
                    self._update, job_id, callback_status="delivered" if delivered else "failed", lease_expires=None
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("inference job %s: unexpected failure in the runner", job_id)
        finally:
            renew.cancel()
            self._active.pop(job_id, None)
            self.wake()

    async def _run(self, row: InferenceJob) -> dict[str, Any] | None:
        job_id, model = row.id, row.model
        version = row.version
        if row.attempts > self.max_attempts:
            status, result, error = (
                "failed",
                None,
                (f"gave up after {self.max_attempts} attempts: the replica running it stopped each time"),
            )
        else:
            try:
                request = json.loads(row.request_json)
                version, response = await self.execute(model, version, request)
                status, result, error = "succeeded", json.dumps(response, separators=(",", ":")), None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status, result, error = "failed", None, str(exc) or type(exc).__name__
        callback_status = "pending" if row.callback_url else None
        ok = await asyncio.to_thread(
            self._update,
            job_id,
            status=status,
            version=version,
            result_json=result,
            error=error,
            callback_status=callback_status,
            lease_expires=time.time() + self.lease_seconds,
        )
        if not ok:
            log.warning("inference job %s was taken over by another replica; dropping this run's result", job_id)
            return None
        log.info("inference job %s model=%s version=%s status=%s", job_id, model, version, status)
        if self.on_finish is not None:
            self.on_finish(model, "" if version is None else str(version), status)
        return get_job(self.engine, job_id)

    async def _deliver(self, row: InferenceJob) -> bool:
        payload = job_view(row)
        payload.pop("callback", None)
        for attempt in range(1, self.callback_attempts + 1):
            try:
                response = await self._http.post(row.callback_url, json=payload)
                if response.is_success:
                    return True
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            log.warning(
                "inference job %s: callback to %s failed (attempt %d/%d): %s",
                row.id,
                row.callback_url,
                attempt,
                self.callback_attempts,
                problem,
            )
            if attempt < self.callback_attempts:
                await asyncio.sleep(self.callback_backoff * 2 ** (attempt - 1))
        log.error("inference job %s: giving up on its callback to %s", row.id, row.callback_url)
        return False


__all__ = ["STATUSES", "JobRunner", "create_job", "get_job", "job_view"]
