"""`distml ui` in a real browser (Debian's Chromium under Playwright) over a real workspace.

The workspace is the session's real `distml run --dataset digits` (tests/digits_pipeline.py) plus
a real `distml watch` cycle and a real pipeline whose step talks while the test watches its log.
Every page loads with no console error and no failed request; the run's DAG shows the pipeline's
nodes with their states and cache reasons; the log follows the running step; a canary started and
promoted from the Services page moves the split the gateway reports (read from the gateway);
actions are refused without the token and in --read-only; the served version's lineage graph
reaches its data snapshot. Screenshots of every page go to $DISTML_UI_SCREENSHOTS (or tmp).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from distml.serve.admin import GatewayAdmin

DISTML = str(Path(sys.executable).with_name("distml"))
TOKEN = "ui-test-token"
SERVICE = "ui-svc"
WATCH = "ui-watch"
pytestmark = [pytest.mark.slow, pytest.mark.heavy("pipelines")]

TALKER = textwrap.dedent(
    """
    import pathlib, time
    from distml.workflow import step

    @step
    def talk(folder: str) -> str:
        for n in (1, 2):
            print(f"line {n} from the step", flush=True)
            gate = pathlib.Path(folder) / f"go{n}"
            while not gate.exists():
                time.sleep(0.05)
        return "done"

    def pipeline(folder: str):
        return talk(folder)
    """
)


def start_ui(ws_root: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`distml ui --port 0` as its own process; its URL from the line it prints."""
    process = subprocess.Popen(
        [DISTML, "--workspace", str(ws_root), "ui", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    line = process.stdout.readline()  # printed once it listens; a crash ends the stream
    match = re.search(r"distml ui at (http://\S+)", line)
    assert match, f"`distml ui` printed {line!r} then exited {process.poll()}"
    return process, match.group(1)


def problems(page) -> list[str]:
    """What went wrong in the browser, except an event stream (`/events/...`) that the browser cuts
    (net::ERR_ABORTED) when the test leaves a live page: a stream has no end of its own."""
    return [e for e in page.errors if not ("/events/" in e and "ERR_ABORTED" in e)]


def wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def visit(page, url: str, shots: Path, name: str) -> None:
    response = page.goto(url)
    assert response is not None and response.status == 200, f"{url}: {response and response.status}"
    page.wait_for_load_state("load")
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def start_a_watch_cycle(ws_root: Path, tmp_path: Path) -> subprocess.Popen:
    """One real `distml watch` cycle, started in the background: a Parquet wave of digits and a
    broken file arrive, an mlp trains on the wave and is served, the broken file is rejected."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distml.data.datasets import _read_bundled_digits

    images, labels = _read_bundled_digits()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    flat = images[:600].reshape(600, 64)
    table = pa.table({"image": pa.array(list(flat), type=pa.list_(pa.uint8())), "label": labels[:600]})
    pq.write_table(table, inbox / "wave1.parquet")
    (inbox / "broken.parquet").write_bytes(b"not parquet")
    command = [DISTML, "--workspace", str(ws_root), "watch", "--source", str(inbox), "--name", WATCH]
    command += ["--model", "mlp", "--epochs", "1", "--poll", "0.1", "--max-cycles", "1"]
    log = (tmp_path / "watch.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_the_ui_shows_and_steers_a_real_workspace(digits_pipeline, page, screenshot_dir, tmp_path):
    from distml.lineage.store import list_datasets
    from distml.serve.service import ensure_serving, stop_service
    from distml.workflow import store as workflow_store

    ws = digits_pipeline.ws
    root = Path(ws.root)
    assert digits_pipeline.run.returncode == 0, digits_pipeline.run.stderr[-3000:]
    watching = start_a_watch_cycle(root, tmp_path)  # runs while the other pages are checked
    talker = tmp_path / "talker.py"
    talker.write_text(TALKER)
    gates = tmp_path / "gates"
    gates.mkdir()
    talking = subprocess.Popen(
        [DISTML, "--workspace", str(root), "run", f"{talker}:pipeline", "--param", f"folder={gates}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    served = ensure_serving(ws, SERVICE, "digits-classifier:1", {"replicas": 1, "port": 0})
    token_file = tmp_path / "ui-token"
    token_file.write_text(TOKEN)
    ui, url = start_ui(root, "--token-file", str(token_file))
    read_only, read_only_url = start_ui(root, "--read-only")
    try:
        # -- signed in once (the token in a link, as Jupyter prints it), then every page, with no
        # console error and no failed request ----------------------------------------------------
        assert page.goto(f"{url}/runs?token={TOKEN}").status == 200 and page.url == f"{url}/runs"
        run_id, rerun_id = digits_pipeline.run_id, digits_pipeline.rerun_id
        pages = {
            "runs": "/runs",
            "run": f"/runs/{run_id}",
            "run-open": f"/runs/{run_id}?open=train",
            "rerun": f"/runs/{rerun_id}",
            "step": f"/runs/{run_id}?step=select",
            "training": "/training",
            "models": "/models",
            "model": "/models/digits-classifier",
            "lineage": "/models/digits-classifier/2/lineage",
            "services": "/services",
            "queues": "/queues",
        }
        for name, path in pages.items():
            visit(page, url + path, screenshot_dir, name)
        page.goto(url + "/training")
        training_id = page.locator("tr[data-run-id] a").first.inner_text()
        visit(page, f"{url}/training/{training_id}", screenshot_dir, "training-run")
        assert not problems(page), problems(page)

        # -- the run's DAG: its nodes, their states, the cache reasons ------------------------------
        page.goto(f"{url}/runs/{run_id}")
        states = {n.get_attribute("data-node-id"): n.get_attribute("data-state") for n in page.locator("g.node").all()}
        assert {"ingest", "train[*]", "select", "serve"} <= set(states), states
        assert set(states.values()) == {"succeeded"}, states
        page.goto(f"{url}/runs/{run_id}?open=train")
        opened = {n.get_attribute("data-node-id") for n in page.locator("g.node").all()}
        assert {"train[batch_norm]", "train[cnn]"} <= opened, opened
        page.goto(f"{url}/runs/{rerun_id}")
        why = page.locator('tr[data-node-id="train[cnn]"] td.why').inner_text()
        assert why.startswith(f"same key as {run_id}"), why  # the memoized re-run says whose result it took

        # -- a running step's log follows, without a reload ------------------------------------------
        talk_run = wait_for(
            lambda: next((r for r in workflow_store.list_workflow_runs(ws.engine) if "talker" in r.target), None),
            "the talking pipeline to start",
        )
        step_log = f"{url}/runs/{talk_run.run_id}/log?step=talk"
        wait_for(lambda: "line 1" in httpx.get(step_log, headers={"Authorization": f"Bearer {TOKEN}"}).text, "line 1")
        page.goto(f"{url}/runs/{talk_run.run_id}?step=talk")
        page.screenshot(path=str(screenshot_dir / "step-running.png"), full_page=True)
        assert "line 2" not in page.locator("#log").inner_text()
        (gates / "go1").touch()
        page.wait_for_function("document.querySelector('#log').textContent.includes('line 2')", timeout=30_000)
        (gates / "go2").touch()
        assert talking.wait(60) == 0
        page.wait_for_function(
            "document.querySelector('#run-status').textContent === 'succeeded'", timeout=30_000
        )  # the run's state followed too

        # -- a canary from the Services page moves the gateway's split -------------------------------
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{url}/services/{SERVICE}")
        page.fill('form[action$="/canary"] input[name="version"]', "2")
        page.fill('form[action$="/canary"] input[name="value"]', "30")
        page.click('form[action$="/canary"] button')
        page.wait_for_selector(".flash")
        page.screenshot(path=str(screenshot_dir / "service-canary.png"), full_page=True)
        with GatewayAdmin(served["url"]) as admin:
            assert admin.snapshot()["traffic"]["digits-classifier"] == {"1": 70.0, "2": 30.0}
        page.fill('form[action$="/promote"] input[name="version"]', "2")
        page.click('form[action$="/promote"] button')
        page.wait_for_selector(".flash")
        with GatewayAdmin(served["url"]) as admin:
            assert admin.snapshot()["traffic"]["digits-classifier"] == {"2": 100.0}
        page.goto(f"{url}/services/{SERVICE}")
        page.wait_for_selector('#traffic tr[data-version="2"]')
        page.screenshot(path=str(screenshot_dir / "service-promoted.png"), full_page=True)

        # -- refused: without the token, and in --read-only ----------------------------------------
        form = {"model": "digits-classifier", "version": "1"}
        refused = httpx.post(f"{url}/services/{SERVICE}/promote", data=form)
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        with_token = {"Authorization": f"Bearer {TOKEN}"}
        refused = httpx.post(f"{read_only_url}/services/{SERVICE}/promote", data=form, headers=with_token)
        assert refused.status_code == 403 and "read-only" in refused.json()["error"]
        with GatewayAdmin(served["url"]) as admin:
            assert admin.snapshot()["traffic"]["digits-classifier"] == {"2": 100.0}, "a refused action acted"
        page.goto(f"{read_only_url}/services/{SERVICE}")
        assert page.locator('form[action$="/promote"] button').is_disabled()
        page.screenshot(path=str(screenshot_dir / "service-read-only.png"), full_page=True)

        # -- the watch's cycle as a timeline ---------------------------------------------------------
        assert watching.wait(240) == 0, (tmp_path / "watch.log").read_text()[-3000:]
        visit(page, f"{url}/watches", screenshot_dir, "watches")
        visit(page, f"{url}/watches/{WATCH}", screenshot_dir, "watch")

        # -- the served version's lineage reaches its data snapshot --------------------------------
        train_fingerprint = next(d.fingerprint for d in list_datasets(ws.engine, "digits") if d.split == "train")
        page.goto(f"{url}/models/digits-classifier/2/lineage")
        assert page.locator(f'li[data-fingerprint="{train_fingerprint}"]').count() == 1
        assert page.locator("svg.lineage g.lnode").count() >= 4
        page.goto(f"{url}/watches/{WATCH}")
        assert page.locator("ol.timeline li").count() >= 2  # the cycle and the rejected arrival
        assert "cannot read" in page.locator("ol.timeline").inner_text()
        assert not problems(page), problems(page)
    finally:
        stop_service(ws, SERVICE)
        stop_service(ws, WATCH)
        (gates / "go1").touch()
        (gates / "go2").touch()
        for process in (ui, read_only, talking, watching):
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
    assert os.listdir(screenshot_dir)
