"""The workspace: metadata store migrations (SQLite and PostgreSQL), artifacts, atomic writes."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from distml.core import db
from distml.core.errors import DistmlError
from distml.core.files import atomic_write
from distml.lineage import store as lineage_store
from distml.workspace import Workspace


def test_new_workspace_is_migrated(tmp_path):
    ws = Workspace(tmp_path / "w")
    assert (tmp_path / "w" / "distml.db").exists() is False  # the store opens lazily
    assert db.migrate(ws.engine) == db.LATEST
    assert db.migrate(ws.engine) == db.LATEST, "migrating twice changes nothing"
    assert "datasets" in sa.inspect(ws.engine).get_table_names()


def test_record_dataset_is_idempotent(workspace):
    kw = dict(name="digits", split="train", fingerprint="f" * 64, num_records=10, uri="x", schema={"a": 1})
    first = lineage_store.record_dataset(workspace.engine, **kw)
    assert lineage_store.record_dataset(workspace.engine, **kw) == first
    other = lineage_store.record_dataset(workspace.engine, **{**kw, "fingerprint": "e" * 64})
    assert other != first
    assert [row.fingerprint[0] for row in lineage_store.list_datasets(workspace.engine, "digits")] == ["e", "f"]


def test_newer_schema_is_refused_without_damage(workspace):
    engine = workspace.engine
    kw = dict(name="digits", split="train", fingerprint="f" * 64, num_records=10, uri="x", schema={"a": 1})
    lineage_store.record_dataset(engine, **kw)
    with engine.begin() as conn:
        conn.execute(db.schema_version.insert().values(version=999, applied_at=db.utc_now()))
    with pytest.raises(DistmlError, match="schema version 999, newer than this distml"):
        db.migrate(engine)
    # nothing stored was lost: the record and the newer version are still there, readable
    assert [row.fingerprint for row in lineage_store.list_datasets(engine, "digits")] == ["f" * 64]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.max(db.schema_version.c.version))).scalar() == 999


def test_metadata_store_on_postgresql(postgres_url, tmp_path):
    ws = Workspace(tmp_path / "pg", postgres_url)
    dataset_id = lineage_store.record_dataset(
        ws.engine, name="d", split="s", fingerprint="a" * 64, num_records=1, uri="u", schema={}
    )
    assert ws.engine.dialect.name == "postgresql" and dataset_id >= 1
    ws.close()


def test_the_environment_is_read_at_the_cli_only(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTML_DB_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("DISTML_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    ws = Workspace()
    assert ws.root == tmp_path.joinpath(".distml").relative_to(tmp_path) and ws.engine.dialect.name == "sqlite"
    assert ws.db_url == f"sqlite:///{tmp_path / '.distml' / 'distml.db'}"
    ws.close()


def test_bad_db_url_is_a_clear_error(tmp_path):
    with pytest.raises(DistmlError, match="not a valid SQLAlchemy URL"):
        _ = Workspace(tmp_path, db_url="definitely not a url").engine


def test_artifact_store_is_content_addressed(workspace, tmp_path):
    digest = workspace.artifacts.put_bytes(b"weights")
    assert workspace.artifacts.get_bytes(digest) == b"weights"
    (tmp_path / "f").write_bytes(b"weights")
    assert workspace.artifacts.put_file(tmp_path / "f") == digest
    with pytest.raises(DistmlError, match="SHA-256"):
        workspace.artifacts.get_bytes("nope")
    with pytest.raises(DistmlError, match="not in the artifact store"):
        workspace.artifacts.get_bytes("0" * 64)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_workspace_path_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DistmlError, match="not a folder"):
        Workspace(tmp_path / "file")


OPENER = """
import sys, time
from distml.workspace import Workspace
root, url, go = sys.argv[1], sys.argv[2] or None, float(sys.argv[3])
while time.time() < go:  # every process opens the new store at the same moment
    time.sleep(0.001)
print(Workspace(root, url).engine.dialect.name)
"""


@pytest.mark.slow
def test_many_processes_open_a_new_workspace_at_once(db_url, tmp_path):
    """Migrations run under a lock (SQLite: an exclusive transaction; PostgreSQL: an advisory lock):
    every opener succeeds and each migration is applied exactly once."""
    import subprocess
    import sys
    import time

    root = tmp_path / "new"
    go = time.time() + 3.0  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(root), db_url or "", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-800:] for rc, _, err in results if rc]
    ws = Workspace(root, db_url)
    with ws.engine.connect() as conn:
        versions = [r.version for r in conn.execute(sa.select(db.schema_version.c.version))]
    assert sorted(versions) == list(range(1, db.LATEST + 1)), "each migration exactly once"
    ws.close()
