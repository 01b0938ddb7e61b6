"""Who may use `distml ui`: with a token, every route but /health (and the sign-in page and static
files) needs it; a browser signs in once (the form, or `?token=` as Jupyter takes it); a host other
than loopback is refused without a token unless --insecure; the token is in no command line, log
line, answer or command the UI starts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from distml.cli import main as cli
from distml.ui import app as ui_app
from distml.ui.app import COOKIE, create_app, session_value

DISTML = str(Path(sys.executable).with_name("distml"))
TOKEN = "ui-5ecret-never-shown-7f3e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPEN = {"/health", "/login"}  # and /static/: our CSS and script, no data
REFUSED = "refusing to listen on 0.0.0.0 without a token"


def client(workspace, **options) -> TestClient:
    return TestClient(create_app(workspace, **options), follow_redirects=False, raise_server_exceptions=False)


def route_table(app) -> list[tuple[str, str, str]]:
    """(method, route path, concrete path) of every route and mount of `app`, parameters filled in."""
    table = []
    for route in app.routes:
        if not hasattr(route, "methods"):  # a Mount: /static
            table.append(("GET", route.path, route.path + "/ui.css"))
            continue
        for method in sorted(route.methods - {"HEAD"}):
            table.append((method, route.path, re.sub(r"\{[^}]+\}", "1", route.path)))
    return table


def test_every_ui_route_needs_the_token_but_health_login_and_static(workspace):
    ui = client(workspace, token=TOKEN)
    table = route_table(ui.app)
    checked = {route for _, route, _ in table}
    assert {"/api/runs", "/events/runs/{run_id}", "/services/{name}/{action}", "/runs/{run_id}/cancel"} <= checked
    assert {"/runs", "/models/{name}", "/health", "/login", "/logout", "/static"} <= checked
    for method, route, path in table:
        bare = ui.request(method, path)
        wrong = ui.request(method, path, headers={"Authorization": f"Bearer {TOKEN}x", "Cookie": f"{COOKIE}=no"})
        if (method, route) == ("POST", "/login"):  # open: it checks the token itself
            assert bare.status_code == 401 and "wrong token" in bare.text
            continue
        if route in OPEN or route == "/static":
            assert bare.status_code == 200, (method, path)
            continue
        with ui.stream(method, path, headers=AUTH) as good:  # an event stream of an unknown run ends
            assert good.status_code != 401, (method, path)
        for refused in (bare, wrong):
            assert refused.status_code == 401, (method, path, refused.status_code)
            assert TOKEN not in refused.text and TOKEN not in str(refused.headers)
            if method == "GET" and not path.startswith(("/api/", "/events/")):
                assert 'form class="login" method="post" action="/login"' in refused.text  # a page: sign in
            else:
                assert refused.json()["error"].startswith("this UI needs its token")
                assert refused.headers["www-authenticate"] == "Bearer"


def test_without_a_token_everything_is_open(workspace):
    ui = client(workspace)
    for method, _, path in route_table(ui.app):
        if method == "GET" and not path.startswith("/events/"):
            assert ui.get(path).status_code != 401, path


def test_a_browser_signs_in_with_the_form_or_once_with_token_in_the_url(workspace):
    ui = client(workspace, token=TOKEN)
    page = ui.get("/runs?state=failed")
    assert page.status_code == 401 and 'name="back" value="/runs?state=failed"' in page.text
    wrong = ui.post("/login", data={"token": "guess-1234", "back": "/runs"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text and "guess-1234" not in wrong.text
    assert COOKIE not in ui.cookies
    offsite = ui.post("/login", data={"token": TOKEN, "back": "//evil.example/x"})
    assert offsite.status_code == 303 and offsite.headers["location"].startswith("/runs?")  # never another site
    assert ui.cookies[COOKIE] == session_value(TOKEN) != TOKEN  # the cookie is not the token itself
    assert ui.get("/runs").status_code == 200 and ui.get("/api/runs").status_code == 200
    assert "sign out" in ui.get("/runs").text
    assert ui.post("/logout").status_code == 303
    assert ui.get("/api/runs").status_code == 401

    fresh = client(workspace, token=TOKEN)
    link = fresh.get(f"/runs?state=failed&token={TOKEN}")  # as Jupyter's printed link: once
    assert link.status_code == 303 and link.headers["location"] == "/runs?state=failed"  # the token is gone
    assert TOKEN not in str(link.headers) and fresh.get("/runs?state=failed").status_code == 200
    assert client(workspace, token=TOKEN).get("/runs?token=guess-1234").status_code == 401
    assert client(workspace, token=TOKEN).get(f"/api/runs?token={TOKEN}").status_code == 303  # then the API


def test_ui_actions_start_commands_with_secrets_in_the_environment_only(workspace, monkeypatch):
    started = []
    monkeypatch.setenv("DISTML_UI_TOKEN", TOKEN)
    monkeypatch.setattr(ui_app.subprocess, "Popen", lambda command, **kw: started.append((command, kw["env"])))
    ui_app._cli(workspace, ["run", "--resume", "r1"], "r1", serve_token="serve-5ecret")
    ((command, env),) = started
    assert not any(s in " ".join(command) for s in (TOKEN, "serve-5ecret", workspace.db_url))
    assert env["DISTML_SERVE_TOKEN"] == "serve-5ecret" and env["DISTML_DB_URL"] == workspace.db_url
    assert "DISTML_UI_TOKEN" not in env  # the UI's own token stays with the UI


def test_distml_ui_refuses_0_0_0_0_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTML_UI_TOKEN", raising=False)
    ws = tmp_path / "ws"
    refused = CliRunner().invoke(cli, ["--workspace", str(ws), "ui", "--host", "0.0.0.0", "--read-only"])
    assert refused.exit_code == 2 and REFUSED in refused.output, refused.output
    assert "DISTML_UI_TOKEN" in refused.output and "--insecure" in refused.output
    assert not ws.exists(), "refused before the workspace is opened"


def start_ui(ws: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """`distml ui --port 0 ARGS` as its own process; its URL, and the file its output goes to."""
    out = ws.parent / f"ui-{len(list(ws.parent.glob('ui-*.out')))}.out"
    process = subprocess.Popen(
        [DISTML, "--workspace", str(ws), "ui", "--port", "0", *args],
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for _ in range(300):
        match = re.search(r"distml ui at (http://\S+)", out.read_text())
        if match:
            return process, match.group(1).replace("0.0.0.0", "127.0.0.1"), out
        assert process.poll() is None, out.read_text()
        subprocess.run(["sleep", "0.05"], check=True)
    process.kill()
    raise AssertionError(f"`distml ui` printed no address: {out.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_distml_ui_on_0_0_0_0_with_insecure_starts_open(tmp_path):
    process, url, _ = start_ui(tmp_path / "ws", "--host", "0.0.0.0", "--insecure")
    try:
        assert httpx.get(url + "/api/runs").status_code == 200
    finally:
        stop(process)


@pytest.fixture
def guarded_ui(tmp_path):
    """`distml ui` on 0.0.0.0 with its token from --token-file (never on the command line)."""
    token_file = tmp_path / "ui-token"
    token_file.write_text(TOKEN + "\n")
    process, url, out = start_ui(tmp_path / "ws", "--host", "0.0.0.0", "--token-file", str(token_file))
    yield process, url, out
    stop(process)


def test_the_ui_token_is_in_no_command_line_log_or_answer(guarded_ui):
    process, url, out = guarded_ui
    assert TOKEN not in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
    with httpx.Client(base_url=url, timeout=10) as http:
        answers = [
            http.get("/runs"),
            http.get("/api/runs"),
            http.get("/api/runs?token=guess-1234"),
            http.post("/login", data={"token": "guess-1234"}),
            http.get(f"/runs?token={TOKEN}"),  # its redirect, not logged
            http.get("/api/runs", headers=AUTH),
            http.get("/runs/nope", headers=AUTH),
            http.get("/health"),
        ]
    assert [a.status_code for a in answers] == [401, 401, 401, 401, 303, 200, 404, 200]
    assert all(TOKEN not in a.text and TOKEN not in str(a.headers) for a in answers)
    stop(process)
    assert "distml ui at" in out.read_text() and TOKEN not in out.read_text()


def test_a_browser_is_asked_to_sign_in_then_sees_the_pages(guarded_ui, page, browser, screenshot_dir):
    _, url, _ = guarded_ui
    first = page.goto(url + "/models")
    assert first.status == 401 and page.locator("main.signin form.login").count() == 1
    page.screenshot(path=str(screenshot_dir / "sign-in.png"), full_page=True)
    page.fill('form.login input[name="token"]', "guess-1234")
    page.click("form.login button")
    assert "wrong token" in page.locator(".problem").inner_text()
    page.fill('form.login input[name="token"]', TOKEN)
    page.click("form.login button")
    page.wait_for_selector(".flash")
    assert page.url == url + "/models?done=signed+in+for+this+browser"
    for seen in (page.errors, page.console_errors, page.error_responses, page.failed_requests):
        seen.clear()  # the 401s above were expected
    assert page.goto(url + "/runs").status == 200  # the cookie: every page, its script and live parts
    assert not page.errors, page.errors
    page.click("header form.logout button")
    page.wait_for_url(url + "/login")

    linked = browser.new_context().new_page()
    landed = linked.goto(f"{url}/queues?token={TOKEN}")  # a link with the token: once, then the cookie
    assert landed.status == 200 and linked.url == url + "/queues"
    linked.context.close()
