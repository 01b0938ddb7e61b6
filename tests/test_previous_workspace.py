"""A workspace made by the previous release opens and reads with this code: no migration, no repair.

tests/fixtures/previous-release-workspace.tar.gz was made at commit 94d83af (before the `core/`
floor, ModelRef and UTCDateTime) with `distml train --model mlp --model-arg width=8 --model-arg
depth=1 --epochs 1 --workers 1 --dataset digits`, `distml run examples/word_lengths.py:pipeline`
and `set_alias(ws, "mlp", "production", 1)`; checkpoints and caches were left out (36 KB).
"""

from __future__ import annotations

import datetime as dt
import tarfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from distml.core import db
from distml.models.artifact import list_models, resolve_model
from distml.train import store as train_store
from distml.views import lineage
from distml.workflow import store as workflow_store
from distml.workspace import Workspace

ARCHIVE = Path(__file__).parent / "fixtures" / "previous-release-workspace.tar.gz"


@pytest.fixture
def old(tmp_path):
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(tmp_path / "ws", filter="data")
    ws = Workspace(tmp_path / "ws")
    yield ws
    ws.close()


def test_its_store_opens_at_the_same_schema_version(old):
    with old.engine.connect() as conn:
        versions = [r.version for r in conn.execute(sa.select(db.schema_version.c.version))]
    assert max(versions) == db.LATEST, "no migration was needed"


def test_its_registry_resolves_every_form_of_reference(old):
    by_alias = resolve_model(old, "mlp@production")
    assert (by_alias.name, by_alias.version) == ("mlp", 1)
    assert resolve_model(old, "mlp:1").manifest_digest == by_alias.manifest_digest
    assert resolve_model(old, by_alias.manifest_digest).weights_digest == by_alias.weights_digest
    (row,) = list_models(old, "mlp")
    assert row.aliases == ["production"] and row.created_at.tzinfo == dt.UTC


def test_its_runs_and_lineage_read_with_aware_times(old):
    (run,) = train_store.list_training_runs(old.engine, include=["mlp-digits-0ba507445e6b"])
    assert run.status == "complete" and run.step == 23 and run.config["model"] == "mlp"
    assert run.updated_at.tzinfo == dt.UTC and run.recorded_at.tzinfo == dt.UTC
    (workflow,) = workflow_store.list_workflow_runs(old.engine)
    assert workflow.status == "succeeded" and workflow.created_at.tzinfo == dt.UTC
    steps = {r.node_id: r.status for r in workflow_store.list_step_executions(old.engine, workflow.run_id)}
    assert steps == {f"measure[{w}]": "succeeded" for w in ("distributed", "machine", "learning")} | {
        "total": "succeeded",
        "report": "succeeded",
    }
    graph = lineage.model_lineage(old.engine, "mlp@production")
    assert [r["run_id"] for r in graph["upstream"]["training_runs"]] == ["mlp-digits-0ba507445e6b"]
