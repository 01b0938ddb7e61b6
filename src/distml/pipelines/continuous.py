"""Continuous training: new data in, a better model served, every decision recorded.

`Watcher` (`distml watch`) follows a folder or a table (`distml.data.arrivals`): a folder by its
filesystem events where they can be trusted (a poll every EVENT_POLL_S as a safety net), else by
polling. Each arrival is checked and ingested once into a snapshot and recorded `pending`, or
`rejected` with why. A cycle claims everything pending in one transaction (data arriving
meanwhile waits for the next cycle: never a pile-up of runs) and runs the workflow `cycle`: train a
candidate on every accepted snapshot so far (optionally from production's weights) while
production is measured on the fixed holdout and the newest data, and promote the candidate only if
it beats production by the margin, as a canary that the gateway judges and rolls back by itself
(the candidate's accuracy on the newest data is measured during the canary's window). A restarted
watch resumes its cycle.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distml.core.db import StoreUnavailable
from distml.core.errors import DistmlError
from distml.models import registry
from distml.pipelines import watches as watch_store
from distml.pipelines.promotion import decide, test_accuracy
from distml.scheduling.core import Resources
from distml.serve.canary import CanaryPolicy
from distml.workflow import current, step

CYCLE_MODULE = "distml.pipelines.continuous"
CYCLE_TARGET = f"{CYCLE_MODULE}:cycle"


class CycleSettings(BaseModel):
    """What each cycle's steps need: the source, the model and its training, the promotion rule
    and the service. The steps receive it typed (`watch: CycleSettings`), validated in their process."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str
    table: str | None = None
    order_column: str | None = None
    dataset: Literal["digits", "fashion-mnist"] = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    model_args: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(3, ge=1)
    workers: int = Field(1, ge=1, le=64)
    batch_size: int = Field(64, ge=1)
    lr: float | None = Field(None, gt=0)
    warm_start: bool = False
    margin: float = Field(0.0, ge=0, le=1, description="holdout accuracy a candidate must gain over production")
    service: str | None = None
    replicas: int = Field(1, ge=1, le=64)
    port: int = Field(0, ge=0, le=65535)
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)
    poll_s: float = Field(0.2, gt=0, le=60, description="seconds between polls where no filesystem events come")
    events: bool = Field(True, description="follow a folder by its filesystem events where they can be trusted")

    @property
    def service_name(self) -> str:
        return self.service or self.name


class WatchConfig(CycleSettings):
    """Everything one watch needs, validated before anything starts (`distml watch`'s flags)."""

    max_cycles: int | None = Field(None, ge=1, description="stop after this many cycles (demos, benchmarks)")
    workspace: str

    def cycle_settings(self) -> CycleSettings:
        return CycleSettings(**self.model_dump(exclude={"max_cycles", "workspace"}))


def parse_watch_config(values: dict[str, Any]) -> WatchConfig:
    try:
        return WatchConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise DistmlError(f"invalid watch settings: {problems}") from None


# -- the cycle: a workflow run ------------------------------------------------------------------


CYCLE_MAX_RESTARTS = 2  # torchrun restarts of a cycle's training ranks before the cycle fails
# What a cycle's step processes import once, in their forkserver: torch and distml's training code
# (training, evaluating), and the serving client (promoting).
CYCLE_PRELOAD = ("torch", "distml.train.worker", "distml.models.artifact", "distml.serve.admin", "distml.serve.service")


def _workspace():
    return current().workspace


# A cycle's steps are not memoized: every cycle trains on files no earlier one had (its new arrivals),
# so a memo key could never hit, and hashing the steps' code would delay each cycle's training. A
# resumed cycle takes over its finished steps and adopts its running ones without memo keys.
@step
def train_candidate(watch: CycleSettings, train_files: list[str], init_from: str | None = None) -> dict:
    """Train the watch's model on `train_files` (from `init_from`'s weights when given)."""
    from distml.train.config import parse_config
    from distml.train.launcher import launch

    started = time.time()
    config = parse_config(
        {
            "model": {"name": watch.model, "args": watch.model_args, "init_from": init_from},
            "data": {
                "dataset": watch.dataset,
                "data_dir": watch.data_dir,
                "train_files": train_files,
                "batch_size": watch.batch_size,
            },
            "optimizer": {"lr": watch.lr},
            "training": {"epochs": watch.epochs},
            "parallelism": {"workers": watch.workers},
            # a rank that dies (killed, out of memory) is restarted from the last checkpoint, as a
            # `distml train --max-restarts` run is: the cycle goes on instead of failing
            "checkpoint": {"max_restarts": CYCLE_MAX_RESTARTS},
            "workspace": _workspace().ref,
        }
    )
    result = launch(config)
    if result is None:
        raise DistmlError(f"training run {config.resolved_run_id()} stopped before the end")
    kept = {k: result[k] for k in ("model", "run_id", "test_accuracy", "steps")}
    return {**kept, "started": started, "finished": time.time()}


def accuracy_on(
    ws: Any, ref: str, watch: CycleSettings, newest_files: list[str], holdout: bool = True
) -> dict[str, float]:
    """`ref`'s accuracy on the data set's fixed test split (the holdout) and on the newest snapshots."""
    import dataclasses

    from distml.data.datasets import get_dataset, with_train_files
    from distml.models.artifact import load_model

    dataset = get_dataset(watch.dataset, ws, watch.data_dir, progress=False)
    model, _ = load_model(ws, ref)
    out = {"holdout": test_accuracy(ws, model, dataset)} if holdout else {}
    if newest_files:
        newest = with_train_files(dataset, newest_files).splits["train"]
        out["newest"] = test_accuracy(ws, model, dataclasses.replace(dataset, splits={"test": newest}))
    return out


PRODUCTION_NICE = 5  # production's evaluation runs beside the training: the training goes first


@step(resources=Resources(cpus=0))
def evaluate_production(watch: CycleSettings, production: str | None, newest_files: list[str]) -> dict | None:
    """Production on the holdout and on the newest data, while the candidate trains (it needs
    nothing of it), at a lower CPU priority than the training; None when there is no production."""
    if production is None:
        return None
    os.nice(PRODUCTION_NICE)
    measured = accuracy_on(_workspace(), production, watch, newest_files)
    for split, value in measured.items():
        current().log_metric(f"production.{split}_accuracy", value)
    return measured


def _candidate_newest(watch: CycleSettings, candidate: dict, newest_files: list[str]) -> dict[str, float]:
    """The candidate's accuracy on the newest data (its holdout accuracy is its training run's own,
    measured on the same test split as it finished), logged as the step's metrics."""
    measured = {"holdout": candidate["test_accuracy"]}
    measured.update(accuracy_on(_workspace(), candidate["model"], watch, newest_files, holdout=False))
    for split, value in measured.items():
        current().log_metric(f"candidate.{split}_accuracy", value)
    return measured


@step(resources=Resources(cpus=0))
def promote(
    watch: CycleSettings,
    candidate: dict,
    baseline: dict | None,
    production: str | None,
    cycle: int,
    newest_files: list[str],
) -> dict:
    """Register the candidate and, if its holdout accuracy beats production's (`baseline`), serve
    it: start the service (first model) or try it as a canary that the gateway promotes or rolls
    back; `production` moves only then. The candidate's accuracy on the newest data is measured
    once it answers (during the canary's window), or before a kept candidate's decision returns."""
    from distml.models.artifact import register_as, set_alias
    from distml.serve.admin import GatewayAdmin
    from distml.serve.service import ensure_serving, service_record

    ws, ctx = _workspace(), current()
    name, service = watch.name, watch.service_name
    evaluation = {"candidate": {"holdout": candidate["test_accuracy"]}, "production": baseline}
    accept, reason = decide(evaluation, watch.margin)
    lineage = {"workflow_run": ctx.run_id, "step": ctx.node_id, "watch": name, "cycle": cycle}
    record = register_as(ws, candidate["model"], name, lineage)
    out = {"version": record.version, "model": record.ref, "reason": reason, "evaluation": evaluation}
    if not accept:
        evaluation["candidate"] = _candidate_newest(watch, candidate, newest_files)
        return {**out, "action": "kept"}
    started = time.time()
    running = service_record(ws, service)
    if running is None:
        served = ensure_serving(ws, service, record.ref, {"replicas": watch.replicas, "port": watch.port})
        answering = time.time()
        set_alias(ws, name, "production", record.version)
        evaluation["candidate"] = _candidate_newest(watch, candidate, newest_files)
        return {**out, "action": "started", "url": served["url"], "swap_started": started, "answering": answering}
    token = os.environ.get("DISTML_SERVE_TOKEN")
    policy = watch.canary
    with GatewayAdmin(running.url, token) as admin:
        admin.start_canary(record.ref, policy.model_dump())  # returns once loaded everywhere and sent its share
        answering = time.time()
        evaluation["candidate"] = _candidate_newest(watch, candidate, newest_files)  # while the canary runs
        final = admin.wait_canary(name, policy.window_s * 4 + 120)
    out.update(url=running.url, swap_started=started, answering=answering, canary=final)
    if final["state"] == "promoted" and str(final.get("canary")) == str(record.version):
        set_alias(ws, name, "production", record.version)
        running.serving(record.ref).write(ws.root)  # what the service now serves
        return {**out, "action": "promoted", "reason": f"{reason}; canary: {final.get('reason', '')}"}
    return {**out, "action": "rolled_back", "reason": f"{reason}; canary rolled back: {final.get('reason', '')}"}


def cycle(
    watch: CycleSettings, cycle: int, train_files: list[str], newest_files: list[str], production: str | None = None
):
    """One cycle of a watch: train a candidate on all data so far while production is evaluated,
    promote the candidate if it is better."""
    trainer = train_candidate.options(resources=Resources(cpus=1, workers=watch.workers))
    candidate = trainer(watch, train_files, production if watch.warm_start else None)
    baseline = evaluate_production(watch, production, newest_files)  # beside the training
    return promote(watch, candidate, baseline, production, cycle, newest_files)


# -- the watch ----------------------------------------------------------------------------------


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _seconds(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    return value.timestamp()


def freshness(arrivals: list[watch_store.Arrival], cycle_started: float, decision: dict) -> dict[str, float] | None:
    """Seconds from the first new arrival to the new model answering, in parts that add up:
    detect, ingest, wait (for the previous cycle), start (of the training step), train, evaluate
    (from the training's end: the hand-over to promotion, the decision and the registration) and
    swap (loading it everywhere and sending it traffic)."""
    if "answering" not in decision or not arrivals:
        return None
    first = min(arrivals, key=lambda a: _seconds(a.arrived_at))
    arrived, detected, ingested = (_seconds(first.arrived_at), _seconds(first.detected_at), _seconds(first.ingested_at))
    train_started = decision["train"]["started"]
    train_finished = decision["train"].get("finished") or decision["evaluation"]["started"]
    parts = {
        "detect": detected - arrived,
        "ingest": ingested - detected,
        "wait": max(0.0, cycle_started - ingested),
        "start": train_started - max(cycle_started, ingested),
        "train": train_finished - train_started,
        "evaluate": decision["swap_started"] - train_finished,
        "swap": decision["answering"] - decision["swap_started"],
    }
    parts = {k: round(v, 3) for k, v in parts.items()}
    total = decision["answering"] - arrived
    return {**parts, "total": round(total, 3), "overhead": round(total - parts["train"], 3)}


# With filesystem events: the folder is polled this often too (an event lost, say). A file counts
# once it held still between two looks: one seen for the first time is looked at again after
# SETTLE_S (renamed in, it is complete), one seen changing (written in place) after `poll_s`, as
# when polling; each of its writes brings an event, and a look, meanwhile.
EVENT_POLL_S = 10.0
SETTLE_S = 0.05


class Watcher:
    """Follows one source for one watch (see the module docstring). `run(stop)` returns when
    `stop` is set or `max_cycles` cycles have finished; `say` receives one line per event."""

    def __init__(self, workspace: Any, config: WatchConfig, say: Callable[[str], None] = print):
        from distml.data.arrivals import Schema, open_source
        from distml.data.datasets import get_dataset

        self.ws, self.config, self.say = workspace, config, say
        self.engine = workspace.engine
        self.source = open_source(config.source, config.table, config.order_column)
        self.dataset = get_dataset(config.dataset, workspace, config.data_dir, progress=True)
        self.schema = Schema.of_dataset(self.dataset)
        self.snapshots = Path(workspace.root) / "continuous" / config.name / "snapshots"
        self.arrived = threading.Event()
        self.cycles_done = 0

    # ------------------------------------------------------------ ingestion

    def _claim_watch(self) -> None:
        from distml.core.liveness import process_identity

        row = watch_store.get_watch(self.engine, self.config.name)
        other = row is not None and row.pid and row.pid != os.getpid() and row.host == socket.gethostname()
        if other and process_identity(row.pid) == row.pid_started:  # None once the process is gone
            raise DistmlError(f"watch {self.config.name!r} is already running (pid {row.pid}); stop it first")
        settings = self.config.model_dump(exclude={"max_cycles"})
        settings["source_detail"] = self.source.describe()
        watch_store.save_watch(
            self.engine,
            self.config.name,
            settings_json=json.dumps(settings, sort_keys=True),
            pid=os.getpid(),
            pid_started=process_identity(os.getpid()),
            host=socket.gethostname(),
        )

    def ingest_once(self) -> int:
        """Poll the source once; check, snapshot and record every new arrival. Returns how many."""
        from distml.data.arrivals import BadBatch, TableArrivals, validate, write_snapshot
        from distml.lineage import record as lineage

        if isinstance(self.source, TableArrivals):
            arrivals = self.source.poll(
                getattr(watch_store.get_watch(self.engine, self.config.name), "watermark", None)
            )
        else:
            arrivals = self.source.poll(watch_store.known_arrival_keys(self.engine, self.config.name))
        for arrival in arrivals:
            detected = time.time()
            values: dict[str, Any] = {"arrived_at": _utc(arrival.arrived_at), "detected_at": _utc(detected)}
            try:
                image, label = validate(arrival.read(), self.schema)
                path, fingerprint = write_snapshot(self.snapshots, image, label)
                same = watch_store.accepted_arrival_with(self.engine, self.config.name, fingerprint)
                if same is not None:
                    raise BadBatch(f"the same records as {same.key} (fingerprint {fingerprint[:12]})")
                values.update(status="pending", snapshot=str(path), fingerprint=fingerprint, num_records=len(label))
            except BadBatch as exc:
                values.update(status="rejected", reason=str(exc))
            values["ingested_at"] = _utc(time.time())
            if not watch_store.record_arrival(self.engine, self.config.name, arrival.key, arrival.watermark, **values):
                continue
            if values["status"] == "pending":
                lineage.record_data_snapshot(
                    self.engine,
                    name=self.dataset.name,
                    split="train",
                    fingerprint=values["fingerprint"],
                    uri=f"file:{values['snapshot']}",
                    num_records=values["num_records"],
                )
                self.say(f"arrived {arrival.key}: {values['num_records']} records")
            else:
                self.say(f"rejected {arrival.key}: {values['reason']}")
            self.arrived.set()
        return len(arrivals)

    def open_events(self) -> tuple[Any, str]:
        """The source's filesystem events, or None; and, in words, how the source is followed."""
        from distml.data.arrivals import FolderArrivals, FolderEvents

        polling = f"polling every {self.config.poll_s:g} s"
        if not isinstance(self.source, FolderArrivals):
            return None, polling
        if not self.config.events:
            return None, f"{polling} (filesystem events turned off)"
        events, kind = FolderEvents.open(self.source.folder)
        if events is None:
            return None, f"{polling} ({kind})"
        return events, f"filesystem events ({kind}), a poll every {EVENT_POLL_S:g} s as a fallback"

    def _ingest_loop(self, stop: threading.Event, events: Any = None) -> None:
        """Ingest, then wait: for the source's next events (or a file seen changing to settle, or the
        fallback poll), or `poll_s` without events."""
        while not stop.is_set():
            try:
                self.ingest_once()
            except DistmlError as exc:  # e.g. the database is briefly unreachable: say so, poll again
                self.say(f"polling {self.config.source} failed: {exc}")
            if events is None:
                stop.wait(self.config.poll_s)
            elif self.source.changing:
                events.wait(self.config.poll_s, stop)
            else:
                events.wait(SETTLE_S if self.source.unsettled else EVENT_POLL_S, stop)

    # ------------------------------------------------------------ cycles

    def production(self) -> str | None:
        version = registry.get_model_alias(self.engine, self.config.name, "production")
        return f"{self.config.name}:{version}" if version is not None else None

    def _run_cycle(self, number: int, resume_run: str | None = None) -> dict[str, Any]:
        from distml.workflow.orchestrator import RunOptions, new_run_id, run_pipeline
        from distml.workflow.orchestrator import resume_run as resume

        arrivals = watch_store.list_arrivals(self.engine, self.config.name)
        used = [a for a in arrivals if a.snapshot and a.cycle is not None and a.cycle <= number]
        new = [a for a in used if a.cycle == number]
        row = next(c for c in watch_store.list_cycles(self.engine, self.config.name) if c.cycle == number)
        production = row.production
        keys = ", ".join(a.key for a in new) or "nothing new"
        self.say(f"cycle {number}: {keys}; training on {sum(a.num_records for a in used)} records")
        try:
            if resume_run:
                result = resume(self.ws, resume_run)
            else:
                params = {
                    "watch": self.config.cycle_settings().model_dump(mode="json"),
                    "cycle": number,
                    "train_files": [a.snapshot for a in used],
                    "newest_files": [a.snapshot for a in new],
                    "production": production,
                }
                run_id = new_run_id(f"watch-{self.config.name}")
                watch_store.update_cycle(self.engine, self.config.name, number, run_id=run_id)
                options = RunOptions(preload=(*CYCLE_PRELOAD, CYCLE_MODULE))  # imported once, in the forkserver
                result = run_pipeline(self.ws, CYCLE_TARGET, params, options, run_id=run_id)
            if result.status != "succeeded":
                failed = [f"{s.node.id}: {s.error}" for s in result.states.values() if s.status == "failed"]
                raise DistmlError("; ".join(failed) or f"workflow run {result.run_id} {result.status}")
        except StoreUnavailable as exc:  # the cycle stays running in the store: the watch's next start resumes it
            name = self.config.name
            message = f"watch {name!r} stopped in cycle {number}: {exc}; start it again to resume"
            raise StoreUnavailable(message) from exc
        except DistmlError as exc:
            watch_store.finish_cycle(
                self.engine, self.config.name, number, "failed", decision_json=json.dumps({"error": str(exc)})
            )
            self.say(f"cycle {number} failed: {exc}")
            return {"status": "failed", "error": str(exc)}
        decision = dict(result.result)
        decision["train"] = _node_value(result, "train_candidate")
        timings = freshness(new, _seconds(row.started_at), decision)
        status = {"started": "promoted"}.get(decision["action"], decision["action"])
        watch_store.finish_cycle(
            self.engine,
            self.config.name,
            number,
            status,
            candidate=decision["model"],
            decision_json=json.dumps(decision, default=str),
            timings_json=json.dumps(timings) if timings else None,
        )
        ev = decision["evaluation"]
        prod = ev["production"]["holdout"] if ev["production"] else None
        self.say(
            f"cycle {number}: {decision['model']} holdout {ev['candidate']['holdout']:.4f}"
            + (f" vs production {prod:.4f}" if prod is not None else "")
            + f": {decision['action']} ({decision['reason']})"
            + (f"; fresh after {timings['total']:.2f} s" if timings else "")
        )
        return {"status": status, **decision, "timings": timings}

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self._claim_watch()
        events, how = self.open_events()  # before the first poll: nothing arriving after it is missed
        try:
            self._run(stop, events, how)
        finally:
            if events is not None:
                events.close()

    def _run(self, stop: threading.Event, events: Any, how: str) -> None:
        self.say(f"watching {self.config.source} as {self.config.name!r} (service {self.config.service_name}): {how}")
        for row in watch_store.list_cycles(self.engine, self.config.name):
            if row.status == "running":  # this watch was stopped or killed inside it
                self.say(f"resuming cycle {row.cycle}")
                self._run_cycle(row.cycle, resume_run=row.run_id)
                self.cycles_done += 1
        self.ingest_once()
        poller = threading.Thread(
            target=self._ingest_loop, args=(stop, events), name="distml-watch-ingest", daemon=True
        )
        poller.start()
        try:
            while not stop.is_set():
                if self.config.max_cycles is not None and self.cycles_done >= self.config.max_cycles:
                    break
                claimed = watch_store.claim_cycle(self.engine, self.config.name, self.production())
                if claimed is None:
                    self.arrived.wait(self.config.poll_s)
                    self.arrived.clear()
                    continue
                self._run_cycle(claimed[0])
                self.cycles_done += 1
        finally:
            stop.set()
            poller.join(timeout=30)
            watch_store.save_watch(self.engine, self.config.name, pid=None, pid_started=None)


def _node_value(result: Any, node_id: str) -> Any:
    state = result.states.get(node_id)
    return state.value if state is not None else None


def cycle_rows(engine: Any, name: str) -> list[dict[str, Any]]:
    """One row per cycle of watch `name`: its new arrivals, decision, accuracies and freshness,
    plus one row per rejected arrival (cycle None)."""
    arrivals = watch_store.list_arrivals(engine, name)
    rows = []
    for c in watch_store.list_cycles(engine, name):
        decision = c.decision
        evaluation = decision.get("evaluation") or {}
        rows.append(
            {
                "cycle": c.cycle,
                "status": c.status,
                "arrivals": [a.key for a in arrivals if a.cycle == c.cycle],
                "records": sum(a.num_records or 0 for a in arrivals if a.cycle == c.cycle),
                "model": decision.get("model"),
                "candidate": evaluation.get("candidate"),
                "production": evaluation.get("production"),
                "reason": decision.get("reason") or decision.get("error"),
                "freshness": c.timings or None,
                "run_id": c.run_id,
            }
        )
    for a in arrivals:
        if a.status == "rejected":
            rows.append({"cycle": None, "status": "rejected", "arrivals": [a.key], "reason": a.reason})
    return rows


def cycles_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("cycle", "new data", "model", "holdout", "production", "decision", "why", "fresh after"):
        table.add_column(column, overflow="fold")
    for r in rows:
        cand, prod, fresh = r.get("candidate") or {}, r.get("production") or {}, r.get("freshness") or {}
        table.add_row(
            str(r["cycle"]) if r["cycle"] is not None else "-",
            ", ".join(r["arrivals"]) + (f" ({r['records']} rows)" if r.get("records") else ""),
            r.get("model") or "",
            f"{cand['holdout']:.4f}" if "holdout" in cand else "",
            f"{prod['holdout']:.4f}" if "holdout" in prod else "",
            r["status"],
            r.get("reason") or "",
            f"{fresh['total']:.1f} s" if "total" in fresh else "",
        )
    return table
