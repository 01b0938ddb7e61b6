"""A workspace made in Python with its own metadata store (PostgreSQL here) is the store every
process of a pipeline uses: the step processes, the training ranks, the gateway and its replicas.
The URL travels in each process's config file; no process falls back to the workspace's SQLite."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from distml.lineage import store as lineage_store
from distml.lineage.store import DEPLOYMENT
from distml.pipelines.end_to_end import client_images, v2_request
from distml.serve.service import stop_service
from distml.train import store as train_store
from distml.workflow import store as workflow_store
from distml.workflow.orchestrator import run_pipeline
from distml.workspace import Workspace


@pytest.mark.slow
@pytest.mark.heavy("pipelines")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_workspace_made_in_python_reaches_steps_ranks_and_replicas(db_url, tmp_path):
    ws = Workspace(tmp_path / "ws", db_url)
    params = {"dataset": "digits", "models": ["cnn"], "epochs": 1, "workers": 1, "service": "travels"}
    try:
        result = run_pipeline(ws, "distml.pipelines.end_to_end:pipeline", params)
        assert result.status == "succeeded", result
        served = result.result["served"]
        images, labels, _ = client_images(ws, "digits", None, 4)
        # the replica found the model in the registry: it resolved the reference in PostgreSQL
        answer = httpx.post(f"{served['url']}/v2/models/{served['model'].split(':')[0]}/infer", json=v2_request(images))
        assert answer.status_code == 200, answer.text
    finally:
        stop_service(ws, "travels")
    with ws.engine.connect() as conn:
        steps = {row.step_name for row in conn.execute(sa.select(workflow_store.step_executions.c.step_name))}
        ranks = conn.execute(sa.select(sa.func.count()).select_from(train_store.train_steps)).scalar()
        deployments = conn.execute(
            sa.select(sa.func.count())
            .select_from(lineage_store.executions)
            .where(lineage_store.executions.c.type == DEPLOYMENT)
        ).scalar()
    assert {"ingest", "train", "select", "serve"} <= steps, "the step processes wrote to PostgreSQL"
    assert ranks > 0, "the training ranks recorded their steps in PostgreSQL"
    assert deployments > 0, "the gateway recorded its deployment in PostgreSQL"
    assert not (ws.root / "distml.db").exists(), "no process opened the workspace's SQLite file instead"
    ws.close()
