"""One owner per table: each migration belongs to the package SCHEMA names, the migrated store has
exactly the tables and columns the owners declare, and no module outside an owner writes SQL."""

from __future__ import annotations

import importlib
import re
import tarfile
from pathlib import Path

import pytest
import sqlalchemy as sa

import distml
from distml.core import db
from distml.workspace import Workspace

SRC = Path(distml.__file__).parent
PREVIOUS = Path(__file__).parent / "fixtures" / "previous-release-workspace.tar.gz"

# Modules that may hold SQL: the owners SCHEMA names, the floor's helpers, and the data sources that
# read a user's own SQL database (not the metadata store).
SQL_ALLOWED = {*db.SCHEMA.values(), "distml.core.db"}
USER_DATABASES = {"distml.data.sources", "distml.data.arrivals"}
SQL = re.compile(r"sa\.select\(|\.insert\(\)|\.update\(\)|\.delete\(\)|conn\.execute\(|sa\.text\(")


def test_each_migration_is_declared_by_the_owner_schema_names():
    owners: dict[str, set[int]] = {}
    for version, owner in db.SCHEMA.items():
        owners.setdefault(owner, set()).add(version)
    for owner, versions in owners.items():
        module = importlib.import_module(owner)
        assert set(module.MIGRATIONS) == versions, f"{owner} declares {set(module.MIGRATIONS)}, SCHEMA says {versions}"
    assert sorted(db.SCHEMA) == list(range(1, db.LATEST + 1)), "migrations are numbered 1..N without a gap"


@pytest.mark.parametrize("made_by", ["this release", "the previous release"])
def test_the_migrated_store_has_exactly_the_tables_and_columns_the_owners_declare(tmp_path, made_by):
    """A new store, and one the previous release made (migrated to now): a column declared without
    the migration that adds it would be missing from the second."""
    if made_by == "the previous release":
        with tarfile.open(PREVIOUS) as archive:
            archive.extractall(tmp_path / "ws", filter="data")
    ws = Workspace(tmp_path / "ws")
    inspector = sa.inspect(ws.engine)
    for owner in set(db.SCHEMA.values()):
        importlib.import_module(owner)
    assert set(inspector.get_table_names()) == set(db.METADATA.tables)
    for name, table in db.METADATA.tables.items():
        stored = {column["name"] for column in inspector.get_columns(name)}
        assert stored == set(table.columns.keys()), name
    ws.close()


def test_a_table_is_declared_by_one_owner_only():
    declared: dict[str, str] = {}
    for owner in sorted(set(db.SCHEMA.values())):
        source = (SRC / Path(*owner.split(".")[1:])).with_suffix(".py").read_text()
        for name in re.findall(r'sa\.Table\(\s*"(\w+)"', source):
            assert name not in declared, f"table {name} is declared by {declared[name]} and {owner}"
            declared[name] = owner
    assert set(declared) | {"schema_version"} == set(db.METADATA.tables)


def test_no_sql_outside_the_owners():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(("distml", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        if module in SQL_ALLOWED or module in USER_DATABASES:
            continue
        if SQL.search(path.read_text()):
            offenders.append(module)
    assert offenders == [], f"SQL outside the tables' owners: {offenders}"
