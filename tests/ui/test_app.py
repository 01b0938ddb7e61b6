"""The UI's app without a browser: pages on an empty workspace, bad input, and who may act."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from distml.models import registry
from distml.ui import svg
from distml.ui.app import create_app
from distml.workflow import store as workflow_store

PAGES = ("/runs", "/api/runs", "/training", "/models", "/services", "/queues", "/watches")


def client(workspace, **options) -> TestClient:
    return TestClient(create_app(workspace, **options), follow_redirects=False)


def test_every_page_reads_an_empty_workspace(workspace):
    ui = client(workspace)
    for path in PAGES:
        response = ui.get(path)
        assert response.status_code == 200, (path, response.text[:300])
    assert "no runs yet" in ui.get("/runs").text
    assert ui.get("/api/runs").json() == {
        "runs": [],
        "page": 1,
        "pages": 1,
        "total": 0,
        "filters": {"state": "", "target": "", "since": ""},
        "states": ["running", "succeeded", "failed", "stopped"],
    }


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/runs?state=bogus", 400, "state must be one of running, succeeded, failed, stopped, got &#39;bogus&#39;"),
        ("/runs?since=yesterday", 400, "since must be a date such as 2026-12-07"),
        ("/runs/nope", 404, "no workflow run &#39;nope&#39;"),
        ("/models/ghost", 404, "no model named &#39;ghost&#39; is registered"),
        ("/services/ghost", 404, "no service &#39;ghost&#39; in"),
        ("/watches/ghost", 404, "no watch &#39;ghost&#39;"),
    ],
)
def test_bad_input_is_one_clear_error_page(workspace, path, status, message):
    response = client(workspace).get(path)
    assert response.status_code == status and message in response.text, response.text[:500]


def test_runs_are_paged_and_filtered(workspace):
    for i in range(60):
        workflow_store.create_workflow_run(workspace.engine, f"run-{i:03d}", f"pkg.mod{i % 2}:pipe", {}, {}, 1, "h")
    workflow_store.update_workflow_run(workspace.engine, "run-007", status="failed")
    ui = client(workspace)
    first = ui.get("/api/runs").json()
    assert first["total"] == 60 and first["pages"] == 2 and len(first["runs"]) == 50
    assert first["runs"][0]["run_id"] == "run-059"  # newest first
    assert [r["run_id"] for r in ui.get("/api/runs?state=failed").json()["runs"]] == ["run-007"]
    assert ui.get("/api/runs?target=mod1&page=2").json()["runs"] == []
    assert ui.get("/api/runs?target=mod1").json()["total"] == 30
    assert "run-009" in ui.get("/runs?page=2").text


def test_actions_are_refused_without_the_token_and_in_read_only(workspace):
    digest = "d" * 64
    for _ in range(2):
        registry.record_model_version(
            workspace.engine, name="m", manifest_digest=digest, weights_digest=digest, metrics={}
        )
    form = {"alias": "champion", "version": "2"}
    refused = client(workspace, token="secret").post("/models/m/alias", data=form)
    assert refused.status_code == 401 and "token" in refused.json()["error"]  # TokenGate, before the route
    wrong = client(workspace, token="secret").post("/models/m/alias", data=form, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401
    read_only = client(workspace, token="secret", read_only=True)
    refused = read_only.post("/models/m/alias", data=form, headers={"Authorization": "Bearer secret"})
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    assert registry.get_model_alias(workspace.engine, "m", "champion") is None, "a refused action acted"
    ui = client(workspace, token="secret")
    ui.post("/login", data={"token": "secret", "back": "/models/m"})
    done = ui.post("/models/m/alias", data=form)
    assert done.status_code == 303 and "now+points+at+m%3A2" in done.headers["location"]
    assert registry.get_model_alias(workspace.engine, "m", "champion") == 2
    bad = ui.post("/models/m/alias", data={"alias": "champion", "version": "9"})
    assert bad.status_code == 303 and "has+no+version+9" in bad.headers["location"]  # the error, on the page


def test_a_fan_out_folds_into_one_group_node_until_opened():
    nodes = [svg.DagNode("ingest", "ingest", "succeeded")]
    nodes += [svg.DagNode(f"train[{m}]", m, s, "", ["ingest"]) for m, s in (("a", "succeeded"), ("b", "failed"))]
    nodes += [svg.DagNode("select", "select", "upstream_failed", "", ["train[a]", "train[b]"])]
    steps = {"ingest": "ingest", "train[a]": "train", "train[b]": "train", "select": "select"}
    folded = {n.id: n for n in svg.fold_fanouts(nodes, set(), steps)}
    assert set(folded) == {"ingest", "train[*]", "select"}
    assert folded["train[*]"].state == "failed" and folded["select"].upstream == ["train[*]"]
    opened = {n.id for n in svg.fold_fanouts(nodes, {"train"}, steps)}
    assert opened == {"ingest", "train[a]", "train[b]", "select"}
    drawn = svg.dag(list(folded.values()))
    assert drawn.count('class="node"') == 3 and 'data-state="failed"' in drawn and "<script" not in drawn
