"""The model registry: numbered versions of each named model and the aliases that point at them.

Migration 2's tables. A version is a manifest digest (the artifact store holds the files); an
alias (`@production`) moves between versions of one name. Racing writers get distinct numbers.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from distml.core.db import METADATA, UTCDateTime, utc_now
from distml.core.errors import DistmlError
from distml.core.refs import ModelRef

# --- model registry (migration 2) -------------------------------------------------------

model_versions = sa.Table(
    "model_versions",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("manifest_digest", sa.String(64), nullable=False, index=True),
    sa.Column("weights_digest", sa.String(64), nullable=False),
    sa.Column("metrics_json", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_model_version"),
)

model_aliases = sa.Table(
    "model_aliases",
    METADATA,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(200), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.ForeignKeyConstraint(
        ["name", "version"], ["model_versions.name", "model_versions.version"], name="fk_alias_version"
    ),
)


def _m2_models(conn: sa.Connection) -> None:
    model_versions.create(conn)
    model_aliases.create(conn)


def record_model_version(
    engine: sa.Engine,
    *,
    name: str,
    manifest_digest: str,
    weights_digest: str,
    metrics: dict[str, Any],
    attempts: int = 50,
) -> int:
    """Register a new version of model `name` (previous highest + 1, from 1); return it.

    Two writers racing for the same number meet the unique (name, version) constraint; the
    loser retries with the next number.
    """
    for _ in range(attempts):
        try:
            with engine.begin() as conn:
                current = conn.execute(
                    sa.select(sa.func.max(model_versions.c.version)).where(model_versions.c.name == name)
                ).scalar()
                version = (current or 0) + 1
                conn.execute(
                    model_versions.insert().values(
                        name=name,
                        version=version,
                        manifest_digest=manifest_digest,
                        weights_digest=weights_digest,
                        metrics_json=json.dumps(metrics, sort_keys=True),
                        created_at=utc_now(),
                    )
                )
                return version
        except sa.exc.IntegrityError:
            continue

    raise DistmlError(f"could not register a new version of model {name!r}: {attempts} concurrent conflicts")


@dataclass(frozen=True)
class ModelVersion:
    """A registered version: its manifest and weights digests, metrics and the aliases on it."""

    name: str
    version: int
    manifest_digest: str
    weights_digest: str
    metrics: dict[str, Any]
    created_at: dt.datetime
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def _version(row: Any, aliases: Iterable[str] = ()) -> ModelVersion:
    return ModelVersion(
        row.name,
        row.version,
        row.manifest_digest,
        row.weights_digest,
        json.loads(row.metrics_json),
        row.created_at,
        list(aliases),
    )


def _one(engine: sa.Engine, query: sa.Select) -> ModelVersion | None:
    with engine.connect() as conn:
        row = conn.execute(query.limit(1)).first()
    return _version(row) if row is not None else None


def get_model_version(engine: sa.Engine, name: str, version: int | None = None) -> ModelVersion | None:
    """One model version (the latest when `version` is None), or None."""
    query = sa.select(model_versions).where(model_versions.c.name == name)
    query = (
        query.order_by(model_versions.c.version.desc())
        if version is None
        else query.where(model_versions.c.version == version)
    )
    return _one(engine, query)


def find_model_version_by_manifest(engine: sa.Engine, manifest_digest: str) -> ModelVersion | None:
    """The earliest model version registered with this manifest digest, or None."""
    v = model_versions
    return _one(engine, sa.select(v).where(v.c.manifest_digest == manifest_digest).order_by(v.c.id))


def set_model_alias(engine: sa.Engine, name: str, alias: str, version: int) -> None:
    """Point `name@alias` at `version` (creating or moving the alias)."""
    with engine.begin() as conn:
        values = dict(version=version, updated_at=utc_now())
        updated = conn.execute(
            model_aliases.update().where(model_aliases.c.name == name, model_aliases.c.alias == alias).values(**values)
        ).rowcount
        if not updated:
            conn.execute(model_aliases.insert().values(name=name, alias=alias, **values))


def get_model_alias(engine: sa.Engine, name: str, alias: str) -> int | None:
    """The version `name@alias` points at, or None."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(model_aliases.c.version).where(model_aliases.c.name == name, model_aliases.c.alias == alias)
        ).scalar()


def delete_model_alias(engine: sa.Engine, name: str, alias: str, version: int | None = None) -> int | None:
    """Remove `name@alias`; return the version it pointed at, or None if nothing was removed.

    With `version`, the alias is removed only while it points at that version, so an alias
    someone else has just moved is left alone (None is returned; read it again to tell why).
    """
    where = (model_aliases.c.name == name, model_aliases.c.alias == alias)
    with engine.begin() as conn:
        current = conn.execute(sa.select(model_aliases.c.version).where(*where).with_for_update()).scalar()
        if current is None or (version is not None and current != version):
            return None
        conn.execute(model_aliases.delete().where(*where, model_aliases.c.version == current))
        return current


def _with_aliases(conn: sa.Connection, rows: list[Any]) -> list[ModelVersion]:
    aliases: dict[tuple[str, int], list[str]] = {}
    names = sorted({row.name for row in rows})
    if names:
        query = sa.select(model_aliases).where(model_aliases.c.name.in_(names)).order_by(model_aliases.c.alias)
        for row in conn.execute(query):
            aliases.setdefault((row.name, row.version), []).append(row.alias)
    return [_version(row, aliases.get((row.name, row.version), ())) for row in rows]


def list_model_versions(engine: sa.Engine, name: str | None = None) -> list[ModelVersion]:
    """Registered model versions (name ascending, newest version first) with their aliases."""
    query = sa.select(model_versions).order_by(model_versions.c.name, model_versions.c.version.desc())
    if name is not None:
        query = query.where(model_versions.c.name == name)
    with engine.connect() as conn:
        return _with_aliases(conn, conn.execute(query).all())


def versions_by_digest(engine: sa.Engine, digests: Iterable[str]) -> dict[str, ModelVersion]:
    """manifest digest -> the earliest version registered with it (with its aliases)."""
    digests = sorted(set(digests))
    if not digests:
        return {}
    v = model_versions
    with engine.connect() as conn:
        rows = conn.execute(sa.select(v).where(v.c.manifest_digest.in_(digests)).order_by(v.c.id)).all()
        out: dict[str, ModelVersion] = {}
        for version in _with_aliases(conn, rows):
            out.setdefault(version.manifest_digest, version)
    return out


def dangling_aliases(engine: sa.Engine) -> list[str]:
    """`name@alias` of every alias whose version is not registered: none, unless the store was
    damaged (SQLite enforces the foreign key only when told; the chaos benchmark checks it)."""
    a, v = model_aliases, model_versions
    joined = a.outerjoin(v, sa.and_(a.c.name == v.c.name, a.c.version == v.c.version))
    query = sa.select(a.c.name, a.c.alias).select_from(joined).where(v.c.id.is_(None)).order_by(a.c.name, a.c.alias)
    with engine.connect() as conn:
        return [f"{name}@{alias}" for name, alias in conn.execute(query)]


def model_names(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(model_versions.c.name).distinct().order_by(model_versions.c.name)).scalars())


def _ranges(values: list[int]) -> str:
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]} to {values[-1]}"
    return ", ".join(map(str, values))


def lookup(engine: sa.Engine, ref: str | ModelRef) -> ModelVersion | None:
    """The registered version `ref` names (any `ModelRef` form), or None."""
    try:
        return resolve(engine, ref)
    except DistmlError:
        return None


def resolve(engine: sa.Engine, ref: str | ModelRef) -> ModelVersion:
    """The registered version `ref` names: `NAME` (its latest), `NAME:VERSION`, `NAME@ALIAS` or a
    manifest digest. Every reference resolves here, with one error that says what exists."""
    parsed = ModelRef.parse(ref)
    if parsed.digest is not None:
        found = find_model_version_by_manifest(engine, parsed.digest)
        if found is None:
            raise DistmlError(f"no registered model version has manifest digest {parsed.digest}")
        return found
    name, alias, version = parsed.name, parsed.alias, parsed.version
    v, a = model_versions, model_aliases
    with engine.connect() as conn:
        versions = list(conn.execute(sa.select(v.c.version).where(v.c.name == name).order_by(v.c.version)).scalars())
        aliases = conn.execute(sa.select(a.c.alias, a.c.version).where(a.c.name == name).order_by(a.c.alias)).all()
    if not versions:
        names = model_names(engine)
        known = "registered models: " + ", ".join(names[:20]) if names else "no models are registered yet"
        if len(names) > 20:
            known += f" and {len(names) - 20} more"
        raise DistmlError(f"no model named {name!r} is registered; {known}")
    if alias is not None:
        version = next((r.version for r in aliases if r.alias == alias), None)
        if version is None:
            known = ", ".join(f"{r.alias} (-> {name}:{r.version})" for r in aliases)
            raise DistmlError(
                f"model {name!r} has no alias {alias!r}; "
                + (
                    f"its aliases are {known}"
                    if known
                    else f"it has no aliases (set one with `distml models alias {name}:VERSION {alias}`)"
                )
            )
    elif version is None:
        version = versions[-1]
    if version not in versions:
        raise DistmlError(f"model {name!r} has no version {version}; its versions are {_ranges(versions)}")
    found = get_model_version(engine, name, version)
    assert found is not None
    return ModelVersion(**{**found.__dict__, "aliases": [r.alias for r in aliases if r.version == version]})


MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {2: _m2_models}
