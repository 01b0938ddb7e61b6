"""Continuous training's store: watches, the arrivals each one ingested, and its cycles (migration 8).

A cycle claims every pending arrival in one transaction, so data that arrives while a cycle
runs waits for the next one, and an arrival is new in exactly one cycle even across a `kill -9`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from distml.core.db import METADATA, UTCDateTime, fetch_all, fetch_one, in_transaction, insert_once, utc_now

# -- continuous training: watches, arrivals and cycles (migration 8) ---------------------------
# A watch follows one source. Each arrival (a new file or partition, or a range of new rows) is
# ingested once into a snapshot and recorded `pending` (or `rejected`, with why); a cycle claims
# every pending arrival in one transaction, so data that arrives while a cycle runs waits for
# the next one, and an arrival is new in exactly one cycle even across a `kill -9`.

watches = sa.Table(
    "watches",
    METADATA,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("settings_json", sa.Text, nullable=False),
    sa.Column("watermark", sa.Text, nullable=True),  # SQL sources: the last order-column value ingested
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("pid_started", sa.String(40), nullable=True),
    sa.Column("host", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

watch_arrivals = sa.Table(
    "watch_arrivals",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("watch", sa.String(200), nullable=False),
    sa.Column("key", sa.String(1000), nullable=False),  # a file or partition path, or a row range
    sa.Column("fingerprint", sa.String(200), nullable=True),
    sa.Column("num_records", sa.Integer, nullable=True),
    sa.Column("snapshot", sa.Text, nullable=True),  # the ingested .npz (accepted arrivals)
    sa.Column("status", sa.String(20), nullable=False),  # pending, rejected, claimed, trained
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("cycle", sa.Integer, nullable=True),  # the cycle it was new in
    sa.Column("arrived_at", UTCDateTime, nullable=False),
    sa.Column("detected_at", UTCDateTime, nullable=False),
    sa.Column("ingested_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("watch", "key", name="uq_watch_arrival"),
)

watch_cycles = sa.Table(
    "watch_cycles",
    METADATA,
    sa.Column("watch", sa.String(200), primary_key=True),
    sa.Column("cycle", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),  # running, promoted, kept, rolled_back, failed
    sa.Column("run_id", sa.String(64), nullable=True),  # its workflow run
    sa.Column("production", sa.String(300), nullable=True),  # what served before it
    sa.Column("candidate", sa.String(300), nullable=True),
    sa.Column("decision_json", sa.Text, nullable=True),
    sa.Column("timings_json", sa.Text, nullable=True),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
)


def _m8_continuous(conn: sa.Connection) -> None:
    for table in (watches, watch_arrivals, watch_cycles):
        table.create(conn)


@dataclass(frozen=True)
class Watch:
    """A watch: its settings (a `WatchConfig` as JSON), watermark and owner process."""

    name: str
    settings_json: str
    watermark: str | None
    pid: int | None
    pid_started: str | None
    host: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self.settings_json or "{}")


@dataclass(frozen=True)
class Arrival:
    """A file, partition or range of rows a watch ingested (or rejected, with why)."""

    id: int
    watch: str
    key: str
    fingerprint: str | None
    num_records: int | None
    snapshot: str | None
    status: str
    reason: str | None
    cycle: int | None
    arrived_at: dt.datetime
    detected_at: dt.datetime
    ingested_at: dt.datetime


@dataclass(frozen=True)
class Cycle:
    """One cycle of a watch: its workflow run, the candidate against production and the decision."""

    watch: str
    cycle: int
    status: str
    run_id: str | None
    production: str | None
    candidate: str | None
    decision_json: str | None
    timings_json: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def decision(self) -> dict[str, Any]:
        return json.loads(self.decision_json) if self.decision_json else {}

    @property
    def timings(self) -> dict[str, Any]:
        return json.loads(self.timings_json) if self.timings_json else {}


def list_watches(engine: sa.Engine) -> list[Watch]:
    """Every watch, by name."""
    return fetch_all(engine, sa.select(watches).order_by(watches.c.name), Watch)


def get_watch(engine: sa.Engine, name: str) -> Watch | None:
    return fetch_one(engine, sa.select(watches).where(watches.c.name == name), Watch)


def save_watch(engine: sa.Engine, name: str, **values: Any) -> None:
    """Create watch `name` or update the given columns."""

    def work(conn: sa.Connection) -> None:
        now = utc_now()
        if conn.execute(sa.select(watches.c.name).where(watches.c.name == name)).first() is None:
            conn.execute(
                watches.insert().values(
                    name=name, settings_json=values.pop("settings_json", "{}"), created_at=now, updated_at=now, **values
                )
            )
        else:
            conn.execute(watches.update().where(watches.c.name == name).values(updated_at=now, **values))

    in_transaction(engine, work)


def record_arrival(engine: sa.Engine, watch: str, key: str, watermark: str | None = None, **values: Any) -> bool:
    """Record an ingested (or rejected) arrival; with `watermark`, move the watch's watermark in the
    same transaction. False when `key` was already recorded (a restart redoing its last arrival)."""

    def work(conn: sa.Connection) -> bool:
        now = utc_now()
        row = {"watch": watch, "key": key, "detected_at": now, "ingested_at": now, "arrived_at": now, **values}
        inserted = insert_once(conn, watch_arrivals, row, ("watch", "key"))
        if watermark is not None:
            conn.execute(watches.update().where(watches.c.name == watch).values(watermark=watermark, updated_at=now))
        return inserted

    return in_transaction(engine, work)


def known_arrival_keys(engine: sa.Engine, watch: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(watch_arrivals.c.key).where(watch_arrivals.c.watch == watch)).scalars())


def accepted_arrival_with(engine: sa.Engine, watch: str, fingerprint: str) -> Arrival | None:
    """The first arrival of `watch` not rejected whose records have `fingerprint`, if any."""
    a = watch_arrivals.c
    query = sa.select(watch_arrivals).where(a.watch == watch, a.fingerprint == fingerprint, a.status != "rejected")
    return fetch_one(engine, query.order_by(a.id).limit(1), Arrival)


def list_arrivals(engine: sa.Engine, watch: str) -> list[Arrival]:
    query = sa.select(watch_arrivals).where(watch_arrivals.c.watch == watch).order_by(watch_arrivals.c.id)
    return fetch_all(engine, query, Arrival)


def claim_cycle(engine: sa.Engine, watch: str, production: str | None) -> tuple[int, list[Arrival]] | None:
    """Start the next cycle with every pending arrival (one transaction); None when none is pending.

    Its `started_at`, chosen once before the transaction, is also the claim's token: when a commit
    succeeded but its answer was lost, the rerun finds no pending arrival but the running cycle it
    claimed (one watch process claims at a time) and returns it, instead of None."""
    started_at = utc_now()

    def work(conn: sa.Connection) -> tuple[int, list[Arrival]] | None:
        c = watch_cycles.c
        mine = conn.execute(
            sa.select(c.cycle).where(c.watch == watch, c.status == "running", c.started_at == started_at)
        ).scalar()
        if mine is not None:  # this call's earlier try committed
            query = sa.select(watch_arrivals).where(watch_arrivals.c.watch == watch, watch_arrivals.c.cycle == mine)
            return mine, [Arrival(**r) for r in conn.execute(query.order_by(watch_arrivals.c.id)).mappings()]
        pending = [
            Arrival(**r)
            for r in conn.execute(
                sa.select(watch_arrivals)
                .where(watch_arrivals.c.watch == watch, watch_arrivals.c.status == "pending")
                .order_by(watch_arrivals.c.id)
            ).mappings()
        ]
        if not pending:
            return None
        last = conn.execute(sa.select(sa.func.max(watch_cycles.c.cycle)).where(watch_cycles.c.watch == watch)).scalar()
        cycle = (last or 0) + 1
        conn.execute(
            watch_cycles.insert().values(
                watch=watch, cycle=cycle, status="running", production=production, started_at=started_at
            )
        )
        conn.execute(
            watch_arrivals.update()
            .where(watch_arrivals.c.id.in_([a.id for a in pending]))
            .values(status="claimed", cycle=cycle)
        )
        return cycle, pending

    return in_transaction(engine, work)


def update_cycle(engine: sa.Engine, watch: str, cycle: int, **values: Any) -> None:
    query = watch_cycles.update().where(watch_cycles.c.watch == watch, watch_cycles.c.cycle == cycle).values(**values)
    in_transaction(engine, lambda conn: conn.execute(query))


def finish_cycle(engine: sa.Engine, watch: str, cycle: int, status: str, **values: Any) -> None:
    """End a cycle and mark its arrivals trained (whether or not its model was promoted)."""
    finished_at = utc_now()

    def work(conn: sa.Connection) -> None:
        conn.execute(
            watch_cycles.update()
            .where(watch_cycles.c.watch == watch, watch_cycles.c.cycle == cycle)
            .values(status=status, finished_at=finished_at, **values)
        )
        conn.execute(
            watch_arrivals.update()
            .where(watch_arrivals.c.watch == watch, watch_arrivals.c.cycle == cycle)
            .values(status="trained")
        )

    in_transaction(engine, work)


def list_cycles(engine: sa.Engine, watch: str) -> list[Cycle]:
    query = sa.select(watch_cycles).where(watch_cycles.c.watch == watch).order_by(watch_cycles.c.cycle)
    return fetch_all(engine, query, Cycle)


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {8: _m8_continuous}


@dataclass(frozen=True)
class WatchSummary:
    """A watch as views show it: its row, its arrivals counted by status, and its cycles in order."""

    watch: Watch
    arrivals: dict[str, int]
    cycles: list[Cycle]


def watch_summaries(engine: sa.Engine, names: Iterable[str] | None = None) -> list[WatchSummary]:
    """Every watch (or those named) with its arrival counts and cycles: three queries, whatever
    the number of watches."""
    wq, aq, cq = (
        sa.select(watches),
        sa.select(watch_arrivals.c.watch, watch_arrivals.c.status, sa.func.count()),
        sa.select(watch_cycles),
    )
    if names is not None:
        names = list(names)
        wq, aq, cq = (
            wq.where(watches.c.name.in_(names)),
            aq.where(watch_arrivals.c.watch.in_(names)),
            cq.where(watch_cycles.c.watch.in_(names)),
        )
    with engine.connect() as conn:
        rows = [Watch(**r) for r in conn.execute(wq.order_by(watches.c.name)).mappings()]
        counts: dict[str, dict[str, int]] = {}
        for watch, status, count in conn.execute(aq.group_by(watch_arrivals.c.watch, watch_arrivals.c.status)):
            counts.setdefault(watch, {})[status] = count
        cycles: dict[str, list[Cycle]] = {}
        for r in conn.execute(cq.order_by(watch_cycles.c.watch, watch_cycles.c.cycle)).mappings():
            cycles.setdefault(r["watch"], []).append(Cycle(**r))
    return [WatchSummary(w, counts.get(w.name, {}), cycles.get(w.name, [])) for w in rows]
