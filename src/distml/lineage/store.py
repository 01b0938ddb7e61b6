"""Lineage's store: data set snapshots and the ML Metadata graph (artifacts, executions, contexts, events).

The tables of migrations 1 and 7 and the idempotent recorders every producer goes through: an
artifact or execution is keyed within its type, so recording it again from any process adds
to it (`insert_once`, one transaction each through `in_transaction`), never duplicates it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from distml.core.db import METADATA, UTCDateTime, fetch_all, in_transaction, insert_once, utc_now

datasets = sa.Table(
    "datasets",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("split", sa.String(100), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("num_records", sa.BigInteger, nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("schema_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("name", "split", "fingerprint", name="uq_dataset_snapshot"),
)


def _m1_datasets(conn: sa.Connection) -> None:
    datasets.create(conn)


def record_dataset(
    engine: sa.Engine,
    *,
    name: str,
    split: str,
    fingerprint: str,
    num_records: int,
    uri: str,
    schema: dict[str, Any],
) -> int:
    """Record a data set snapshot (idempotent per name, split and fingerprint); return its id."""

    def work(conn: sa.Connection) -> int:
        row = conn.execute(
            sa.select(datasets.c.id).where(
                datasets.c.name == name,
                datasets.c.split == split,
                datasets.c.fingerprint == fingerprint,
            )
        ).first()
        if row is not None:
            return int(row.id)
        result = conn.execute(
            datasets.insert().values(
                name=name,
                split=split,
                fingerprint=fingerprint,
                num_records=num_records,
                uri=uri,
                schema_json=json.dumps(schema, sort_keys=True),
                created_at=utc_now(),
            )
        )
        return int(result.inserted_primary_key[0])

    return in_transaction(engine, work)  # a rerun finds the row a lost commit inserted


@dataclass(frozen=True)
class Dataset:
    """A recorded data set snapshot: one split of one data set with its content fingerprint."""

    id: int
    name: str
    split: str
    fingerprint: str
    num_records: int
    uri: str
    schema_json: str
    created_at: dt.datetime

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.schema_json)


def list_datasets(engine: sa.Engine, name: str | None = None) -> list[Dataset]:
    """All recorded data set snapshots, newest first, optionally for one name."""
    query = sa.select(datasets).order_by(datasets.c.id.desc())
    if name is not None:
        query = query.where(datasets.c.name == name)
    return fetch_all(engine, query, Dataset)


# -- ML Metadata: artifacts, executions, contexts and the events that link them (migration 7) ----
# The model of ML Metadata (MLMD): an artifact is a thing that exists (a data snapshot, a checkpoint,
# a model), an execution something that ran (a training run, a pipeline step, a deployment), an
# event says an execution read (input) or wrote (output) an artifact, and a context groups
# executions and artifacts (a pipeline run, a service) through associations and attributions.
# Artifacts and executions carry a `key` unique within their type, so a producer records what it
# knows whenever it knows it, any number of times, from any process: recording is idempotent.
# The registry (model_versions, model_aliases) lives on top: a version's manifest digest is the
# key of its `model` artifact. `lineage/record.py` records the producers' facts; `views/lineage.py` walks the graph.

artifacts = sa.Table(
    "artifacts",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(50), nullable=False),  # dataset_snapshot, checkpoint, model
    sa.Column("key", sa.String(500), nullable=False),
    sa.Column("name", sa.String(300), nullable=True),
    sa.Column("uri", sa.Text, nullable=True),
    sa.Column("fingerprint", sa.String(200), nullable=True, index=True),  # content digest
    sa.Column("properties_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("type", "key", name="uq_artifact_key"),
)

executions = sa.Table(
    "executions",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(50), nullable=False),  # training_run, step_execution, registration, deployment
    sa.Column("key", sa.String(500), nullable=False),
    sa.Column("name", sa.String(300), nullable=True),
    sa.Column("state", sa.String(20), nullable=False),  # running, complete, failed, stopped, ended
    sa.Column("properties_json", sa.Text, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("ended_at", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("type", "key", name="uq_execution_key"),
)

contexts = sa.Table(
    "contexts",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(50), nullable=False),  # pipeline_run, service
    sa.Column("name", sa.String(300), nullable=False),
    sa.Column("properties_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("type", "name", name="uq_context_name"),
)

events = sa.Table(
    "events",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("execution_id", sa.Integer, sa.ForeignKey("executions.id"), nullable=False),
    sa.Column("artifact_id", sa.Integer, sa.ForeignKey("artifacts.id"), nullable=False, index=True),
    sa.Column("kind", sa.String(10), nullable=False),  # input, output
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("execution_id", "artifact_id", "kind", name="uq_event"),
)

attributions = sa.Table(
    "attributions",
    METADATA,
    sa.Column("context_id", sa.Integer, sa.ForeignKey("contexts.id"), primary_key=True),
    sa.Column("artifact_id", sa.Integer, sa.ForeignKey("artifacts.id"), primary_key=True, index=True),
)

associations = sa.Table(
    "associations",
    METADATA,
    sa.Column("context_id", sa.Integer, sa.ForeignKey("contexts.id"), primary_key=True),
    sa.Column("execution_id", sa.Integer, sa.ForeignKey("executions.id"), primary_key=True, index=True),
)

EVENT_KINDS = ("input", "output")

# The types of artifacts, executions and contexts distml records.
SNAPSHOT, CHECKPOINT, MODEL = "dataset_snapshot", "checkpoint", "model"
TRAINING, STEP, REGISTRATION, DEPLOYMENT = "training_run", "step_execution", "registration", "deployment"
PIPELINE_RUN, SERVICE = "pipeline_run", "service"


def _m7_lineage(conn: sa.Connection) -> None:
    for table in (artifacts, executions, contexts, events, attributions, associations):
        table.create(conn)


def _merged(old_json: str | None, new: dict[str, Any] | None) -> str:
    properties = json.loads(old_json) if old_json else {}
    properties.update(new or {})
    return json.dumps(properties, sort_keys=True, default=str)


def record_artifact(
    conn: sa.Connection,
    type: str,
    key: str,
    *,
    name: str | None = None,
    uri: str | None = None,
    fingerprint: str | None = None,
    properties: dict[str, Any] | None = None,
) -> int:
    """The id of artifact (`type`, `key`), created on first record; later records add the
    properties and fields they give. Run inside `in_transaction`."""
    given = {k: v for k, v in {"name": name, "uri": uri, "fingerprint": fingerprint}.items() if v is not None}
    where = (artifacts.c.type == type, artifacts.c.key == key)
    row = conn.execute(sa.select(artifacts).where(*where)).first()
    if row is None:
        values = dict(type=type, key=key, properties_json=_merged(None, properties), created_at=utc_now(), **given)
        if insert_once(conn, artifacts, values, ("type", "key")):
            return int(conn.execute(sa.select(artifacts.c.id).where(*where)).scalar_one())
        row = conn.execute(sa.select(artifacts).where(*where)).one()
    merged = _merged(row.properties_json, properties)
    if merged != row.properties_json or any(getattr(row, k) != v for k, v in given.items()):
        conn.execute(artifacts.update().where(artifacts.c.id == row.id).values(properties_json=merged, **given))
    return int(row.id)


def record_execution(
    conn: sa.Connection,
    type: str,
    key: str,
    *,
    state: str,
    name: str | None = None,
    properties: dict[str, Any] | None = None,
) -> int:
    """The id of execution (`type`, `key`), created on first record with `state`; a later record
    moves it to `state` (ended_at is set once it is no longer running) and adds its properties.
    One process writes each execution (its producer). Run inside `in_transaction`."""
    now = utc_now()
    where = (executions.c.type == type, executions.c.key == key)
    values: dict[str, Any] = {"state": state, "updated_at": now, "ended_at": None if state == "running" else now}
    if name is not None:
        values["name"] = name
    if properties is None:  # a change of state: one statement when the execution exists
        row = conn.execute(executions.update().where(*where).values(**values).returning(executions.c.id)).first()
        if row is not None:
            return int(row.id)
    first = dict(type=type, key=key, started_at=now, properties_json=_merged(None, properties), **values)
    inserted = insert_once(conn, executions, first, ("type", "key"))
    row = conn.execute(sa.select(executions.c.id, executions.c.properties_json).where(*where)).one()
    if not inserted:
        conn.execute(
            executions.update()
            .where(executions.c.id == row.id)
            .values(properties_json=_merged(row.properties_json, properties), **values)
        )
    return int(row.id)


def record_context(conn: sa.Connection, type: str, name: str, properties: dict[str, Any] | None = None) -> int:
    """The id of context (`type`, `name`), created on first record. Run inside `in_transaction`."""
    where = (contexts.c.type == type, contexts.c.name == name)
    found = conn.execute(sa.select(contexts.c.id).where(*where)).scalar()
    if found is None:
        values = dict(type=type, name=name, properties_json=_merged(None, properties), created_at=utc_now())
        insert_once(conn, contexts, values, ("type", "name"))
        found = conn.execute(sa.select(contexts.c.id).where(*where)).scalar_one()
    return int(found)


def link(conn: sa.Connection, execution_id: int, artifact_id: int, kind: str) -> None:
    """Record the event: execution `execution_id` read (`input`) or wrote (`output`) the artifact
    (once, however often it is recorded). Run inside `in_transaction`."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"event kind must be one of {EVENT_KINDS}, got {kind!r}")
    values = dict(execution_id=execution_id, artifact_id=artifact_id, kind=kind, created_at=utc_now())
    insert_once(conn, events, values, ("execution_id", "artifact_id", "kind"))


def associate(
    conn: sa.Connection, context_id: int, *, execution_id: int | None = None, artifact_id: int | None = None
) -> None:
    """Put an execution (association) or an artifact (attribution) in a context, once."""
    if execution_id is not None:
        insert_once(
            conn, associations, {"context_id": context_id, "execution_id": execution_id}, ("context_id", "execution_id")
        )
    if artifact_id is not None:
        insert_once(
            conn, attributions, {"context_id": context_id, "artifact_id": artifact_id}, ("context_id", "artifact_id")
        )


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {1: _m1_datasets, 7: _m7_lineage}


def find_execution(conn: sa.Connection, type: str, key: str) -> sa.Row | None:
    """Execution (`type`, `key`)'s id, state and properties_json, or None."""
    e = executions
    return conn.execute(
        sa.select(e.c.id, e.c.state, e.c.properties_json).where(e.c.type == type, e.c.key == key)
    ).first()


def end_execution(engine: sa.Engine, type: str, key: str, state: str) -> None:
    """Execution (`type`, `key`) ended in `state`, if it was recorded."""
    where = (executions.c.type == type, executions.c.key == key)
    with engine.connect() as conn:  # a read first: most steps touch no artifact, and a write would
        if conn.execute(sa.select(executions.c.id).where(*where)).first() is None:  # queue for the lock
            return
    now = utc_now()
    in_transaction(
        engine,
        lambda conn: conn.execute(executions.update().where(*where).values(state=state, ended_at=now, updated_at=now)),
    )


# -- reading the graph -------------------------------------------------------------------------


@dataclass
class Artifact:
    """A thing that exists: a data snapshot, a checkpoint, a model (keyed within its type)."""

    id: int
    type: str
    key: str
    name: str | None
    uri: str | None
    fingerprint: str | None
    properties: dict[str, Any]
    created_at: dt.datetime


@dataclass
class Execution:
    """Something that ran: a training run, a pipeline step, a registration, a deployment."""

    id: int
    type: str
    key: str
    name: str | None
    state: str
    properties: dict[str, Any]
    started_at: dt.datetime
    ended_at: dt.datetime | None
    updated_at: dt.datetime


def _by_id(conn: sa.Connection, table: sa.Table, ids: Iterable[int], row_type: Any) -> dict[int, Any]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    out = {}
    for row in conn.execute(sa.select(table).where(table.c.id.in_(ids))).mappings():
        values = dict(row)
        values["properties"] = json.loads(values.pop("properties_json") or "{}")
        out[values["id"]] = row_type(**values)
    return out


def artifacts_by_id(engine: sa.Engine, ids: Iterable[int]) -> dict[int, Artifact]:
    with engine.connect() as conn:
        return _by_id(conn, artifacts, ids, Artifact)


def executions_by_id(engine: sa.Engine, ids: Iterable[int]) -> dict[int, Execution]:
    with engine.connect() as conn:
        return _by_id(conn, executions, ids, Execution)


def events_of(
    engine: sa.Engine, *, artifacts: Iterable[int] = (), executions: Iterable[int] = (), kind: str
) -> list[tuple[int, int]]:
    """(execution id, artifact id) of the `kind` events of these artifacts or executions."""
    with engine.connect() as conn:
        return _events(conn, artifacts=artifacts, executions=executions, kind=kind)


def _events(conn: sa.Connection, *, artifacts: Iterable[int] = (), executions: Iterable[int] = (), kind: str):
    e = events
    where = [e.c.kind == kind]
    artifacts, executions = sorted(set(artifacts)), sorted(set(executions))
    if artifacts:
        where.append(e.c.artifact_id.in_(artifacts))
    if executions:
        where.append(e.c.execution_id.in_(executions))
    if not artifacts and not executions:
        return []
    return [
        (r.execution_id, r.artifact_id)
        for r in conn.execute(sa.select(e.c.execution_id, e.c.artifact_id).where(*where))
    ]


def walk(engine: sa.Engine, start: Iterable[int], direction: str) -> tuple[set[int], set[int]]:
    """Artifacts and executions reachable from `start`: upstream through the executions that wrote
    an artifact and what they read (data snapshots are where it stops: their lineage is their
    fingerprint), or downstream through the executions that read one and what they wrote."""
    seen_artifacts, seen_executions = set(start), set()
    frontier = set(start)
    into, out_of = ("output", "input") if direction == "up" else ("input", "output")
    with engine.connect() as conn:
        while frontier:
            found_executions = {e for e, _ in _events(conn, artifacts=frontier, kind=into)} - seen_executions
            seen_executions |= found_executions
            found = {a for _, a in _events(conn, executions=found_executions, kind=out_of)} - seen_artifacts
            seen_artifacts |= found
            frontier = found
            if direction == "up" and found:
                types = dict(
                    conn.execute(sa.select(artifacts.c.id, artifacts.c.type).where(artifacts.c.id.in_(found))).all()
                )
                frontier = {a for a in found if types[a] != SNAPSHOT}
    return seen_artifacts, seen_executions


def artifact_id(engine: sa.Engine, type: str, key: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(artifacts.c.id).where(artifacts.c.type == type, artifacts.c.key == key)).scalar()


def snapshots(engine: sa.Engine, fingerprint_prefix: str = "", limit: int | None = None) -> list[Artifact]:
    """Data snapshot artifacts whose fingerprint starts with `fingerprint_prefix`, oldest first (the
    newest `limit` when given)."""
    a = artifacts
    query = sa.select(a).where(a.c.type == SNAPSHOT, a.c.fingerprint.startswith(fingerprint_prefix, autoescape=True))
    query = query.order_by(a.c.id.desc()).limit(limit) if limit is not None else query.order_by(a.c.id)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        Artifact(
            **{
                **{k: v for k, v in r.items() if k != "properties_json"},
                "properties": json.loads(r["properties_json"] or "{}"),
            }
        )
        for r in rows
    ]
