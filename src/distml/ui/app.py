"""`distml ui`: the whole workspace in a browser, read through the owners' queries, steered through the CLI's functions.

Server-rendered pages (FastAPI + Jinja2) that read without JavaScript: runs, one run's DAG and
step logs, training runs, models and lineage, services, queues and watches. Live parts follow by
server-sent events (`/events/...`) and a small script of our own (static/ui.js). With a token,
`TokenGate` lets no request but /health, /login and /static/ through without it (a Bearer header,
the cookie `/login` sets, or `?token=` once, as Jupyter takes it); actions are POST forms that the
page confirms, also refused with `read_only`. The app holds no SQL and no state but a short history
of each service's /metrics scrapes, for rates and latency quantiles.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Form, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from distml.core.errors import DistmlError
from distml.core.exposure import check_exposure
from distml.core.layout import ServiceRecord
from distml.ui import pages
from distml.workspace import Workspace

HERE = Path(__file__).parent
COOKIE = "distml_ui_token"
PAGE_SIZE = 50
SSE_INTERVAL_S = 1.0
HEALTH = "/health"
UI_TOKEN_ENV = "DISTML_UI_TOKEN"
SERVE_TOKEN_ENV = "DISTML_SERVE_TOKEN"
OPEN_PATHS = frozenset({HEALTH, "/login"})  # exact paths; and /static/ (our CSS and script, no data)
OPEN_PREFIX = "/static/"
NEEDS_TOKEN = (
    "this UI needs its token: send 'Authorization: Bearer <token>', or sign in at /login "
    "(the token `distml ui` was started with)"
)


def session_value(token: str) -> str:
    """What the sign-in cookie holds: derived from the token, so a leaked cookie does not give the
    token itself away (nor does any response carry it)."""
    return hmac.new(token.encode(), b"distml-ui-session", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def authorized(request: Request, token: str | None) -> bool:
    """No token set, or the request carries it: a Bearer header or the sign-in cookie."""
    if token is None:
        return True
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and _same(value.strip(), token):
        return True
    return _same(request.cookies.get(COOKIE, ""), session_value(token))


def local_path(back: str) -> str:
    """Where a sign-in may send the browser on: a path of this UI, never another site (//host)."""
    if back.startswith("/") and not back.startswith(("//", "/\\")):
        return back
    return "/runs"


class TokenGate:
    """Pure ASGI: with a token, every request but /health, /login and /static/ needs it. `?token=`
    on a GET (a link with the token, as Jupyter prints) sets the sign-in cookie and sends the browser
    on to the same URL without it; otherwise a refused page gets the sign-in form (401) and /api/,
    /events/ and every POST a 401 JSON error. Neither says what the token is."""

    def __init__(self, app: Any, token: str | None, login_page: Callable[[str, str | None, int], Response]):
        self.app, self.token, self.login_page = app, token, login_page

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if self.token is None or scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if authorized(request, self.token):
            await self.app(scope, receive, send)
            return
        rest = [(key, value) for key, value in request.query_params.multi_items() if key != "token"]
        here = path + ("?" + urlencode(rest) if rest else "")
        given = request.query_params.get("token")
        page = scope["method"] in ("GET", "HEAD")
        if page and given is not None and _same(given, self.token):
            response: Response = RedirectResponse(here, status_code=303)
            response.set_cookie(COOKIE, session_value(self.token), httponly=True, samesite="strict")
        elif page and not path.startswith(("/api/", "/events/")):
            response = self.login_page(here, "wrong token" if given is not None else None, 401)
        else:
            response = JSONResponse({"error": NEEDS_TOKEN}, status_code=401, headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)


class Actions:
    """Who may act: refused in read-only mode, and without the token when one is set."""

    def __init__(self, token: str | None, read_only: bool):
        self.token, self.read_only = token, read_only

    def refusal(self, request: Request) -> str | None:
        if self.read_only:
            return "this UI is read-only (started with --read-only); use the CLI, or restart it without --read-only"
        if not authorized(request, self.token):
            return "this action needs the UI's token: sign in at /login"
        return None


def create_app(
    workspace: Workspace, token: str | None = None, read_only: bool = False, serve_token: str | None = None
) -> FastAPI:
    """The UI over `workspace`; `token` guards the actions, `read_only` refuses them all,
    `serve_token` is the services' gateways' bearer token."""
    app = FastAPI(title="distml ui", docs_url=None, redoc_url=None, openapi_url=None)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["dt"] = pages.when
    env.filters["dur"] = pages.duration
    env.globals["quote"] = lambda value: quote(str(value), safe="")
    actions = Actions(token, read_only)
    metrics = pages.ServiceMetrics(serve_token)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def login_page(back: str, problem: str | None = None, status: int = 200) -> HTMLResponse:
        page = env.get_template("login.html").render(back=local_path(back), problem=problem)
        return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})

    app.add_middleware(TokenGate, token=token, login_page=login_page)

    def render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        values.setdefault("flash", request.query_params.get("done"))
        values.setdefault("problem", request.query_params.get("problem"))
        page = env.get_template(template).render(
            request=request, read_only=read_only, token_set=token is not None, root=str(workspace.root), **values
        )
        return HTMLResponse(page, status_code=status)

    @app.exception_handler(DistmlError)
    async def distml_error(request: Request, exc: DistmlError):
        return render(request, "error.html", status=404 if "no " in str(exc)[:40] else 400, message=str(exc))

    _session_routes(app, token, login_page)
    _read_routes(app, workspace, render, metrics)
    _registry_routes(app, workspace, render, metrics)
    _event_routes(app, workspace, metrics)
    _action_routes(app, workspace, actions, metrics)
    return app


def _session_routes(app: FastAPI, token: str | None, login_page: Callable[..., HTMLResponse]) -> None:
    """Health (open, for probes), and signing in and out (the cookie `TokenGate` accepts)."""

    @app.get(HEALTH)
    async def health():
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(back: str = "/runs"):
        return login_page(back)

    @app.post("/login")
    async def login(token_given: str = Form("", alias="token"), back: str = Form("/runs")):
        if token is None:
            return _back(local_path(back))
        if not _same(token_given, token):
            return login_page(back, "wrong token", 401)
        response = _back(local_path(back), done="signed in for this browser")
        response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="strict")
        return response

    @app.post("/logout")
    async def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return response


def _read_routes(app: FastAPI, ws: Workspace, render: Callable[..., HTMLResponse], metrics: pages.ServiceMetrics):
    @app.get("/", include_in_schema=False)
    async def index():
        return RedirectResponse("/runs", status_code=307)

    @app.get("/runs", response_class=HTMLResponse)
    def runs(request: Request, page: int = 1, state: str = "", target: str = "", since: str = ""):
        listing = pages.run_list(ws, page, PAGE_SIZE, state or None, target or None, since or None)
        return render(request, "runs.html", **listing)

    @app.get("/api/runs")
    def api_runs(page: int = 1, state: str = "", target: str = "", since: str = ""):
        listing = pages.run_list(ws, page, PAGE_SIZE, state or None, target or None, since or None)
        return JSONResponse(pages.jsonable(listing))

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(request: Request, run_id: str, step: str = "", open: str = ""):
        opened = set(filter(None, open.split(",")))
        return render(request, "run.html", **pages.run_page(ws, run_id, step or None, opened))

    @app.get("/api/runs/{run_id}")
    def api_run(run_id: str):
        return JSONResponse(pages.jsonable(pages.run_page(ws, run_id, None, set())))

    @app.get("/runs/{run_id}/log", response_class=PlainTextResponse)
    def step_log(run_id: str, step: str):
        return PlainTextResponse(pages.log_text(ws, run_id, step))


def _registry_routes(app: FastAPI, ws: Workspace, render: Callable[..., HTMLResponse], metrics: pages.ServiceMetrics):
    @app.get("/training", response_class=HTMLResponse)
    def training(request: Request):
        return render(request, "training.html", runs=pages.training_list(ws))

    @app.get("/training/{run_id}", response_class=HTMLResponse)
    def training_run(request: Request, run_id: str):
        return render(request, "training_run.html", **pages.training_page(ws, run_id))

    @app.get("/models", response_class=HTMLResponse)
    def models(request: Request):
        return render(request, "models.html", models=pages.model_list(ws))

    @app.get("/models/{name}", response_class=HTMLResponse)
    def model(request: Request, name: str):
        return render(request, "model.html", **pages.model_page(ws, name))

    @app.get("/models/{name}/{version}/lineage", response_class=HTMLResponse)
    def lineage(request: Request, name: str, version: int):
        return render(request, "lineage.html", **pages.lineage_page(ws, name, version))

    @app.get("/services", response_class=HTMLResponse)
    def services(request: Request):
        return render(request, "services.html", services=pages.service_list(ws, metrics))

    @app.get("/services/{name}", response_class=HTMLResponse)
    def service(request: Request, name: str):
        return render(request, "service.html", **pages.service_page(ws, name, metrics))

    @app.get("/queues", response_class=HTMLResponse)
    def queues(request: Request):
        return render(request, "queues.html", **pages.queues_page(ws))

    @app.get("/watches", response_class=HTMLResponse)
    def watches(request: Request):
        return render(request, "watches.html", watches=pages.watch_list(ws))

    @app.get("/watches/{name}", response_class=HTMLResponse)
    def watch(request: Request, name: str):
        return render(request, "watch.html", **pages.watch_page(ws, name))


# -- live parts: server-sent events ----------------------------------------------------------------


def _sse(produce: Callable[[], Any], interval: float = SSE_INTERVAL_S) -> StreamingResponse:
    """An event stream that sends `produce()` as JSON whenever it changes (checked every `interval`)."""

    async def stream() -> AsyncIterator[str]:
        last = None
        while True:
            try:
                value = json.dumps(pages.jsonable(await asyncio.to_thread(produce)), sort_keys=True)
            except DistmlError as exc:
                yield f"event: problem\ndata: {json.dumps(str(exc))}\n\n"
                return
            if value != last:
                yield f"data: {value}\n\n"
                last = value
            await asyncio.sleep(interval)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _event_routes(app: FastAPI, ws: Workspace, metrics: pages.ServiceMetrics) -> None:
    @app.get("/events/runs/{run_id}")
    async def run_events(run_id: str):
        return _sse(lambda: pages.run_states(ws, run_id))

    @app.get("/events/runs/{run_id}/log")
    async def log_events(run_id: str, step: str):
        return _sse(lambda: {"text": pages.log_text(ws, run_id, step, lines=200)}, interval=0.5)

    @app.get("/events/services/{name}")
    async def service_events(name: str):
        return _sse(lambda: pages.service_live(ws, name, metrics), interval=2.0)


# -- actions: the CLI's functions, confirmed on the page, refused without the right --------------------


def _back(path: str, done: str | None = None, problem: str | None = None) -> RedirectResponse:
    query = {k: v for k, v in {"done": done, "problem": problem}.items() if v}
    return RedirectResponse(path + ("?" + urlencode(query) if query else ""), status_code=303)


def _action_routes(app: FastAPI, ws: Workspace, actions: Actions, metrics: pages.ServiceMetrics) -> None:
    def guarded(request: Request, back: str, act: Callable[[], str]) -> Any:
        refusal = actions.refusal(request)
        if refusal is not None:
            return JSONResponse({"error": refusal}, status_code=403)
        try:
            return _back(back, done=act())
        except DistmlError as exc:
            return _back(back, problem=str(exc))

    @app.post("/runs/{run_id}/resume")
    def resume(request: Request, run_id: str):
        back = f"/runs/{quote(run_id)}"
        return guarded(request, back, lambda: _cli(ws, ["run", "--resume", run_id], run_id, metrics.token))

    @app.post("/runs/{run_id}/cancel")
    def cancel(request: Request, run_id: str):
        return guarded(request, f"/runs/{quote(run_id)}", lambda: pages.cancel_run(ws, run_id))

    @app.post("/runs/{run_id}/rerun")
    def rerun(request: Request, run_id: str, refresh: str = Form("")):
        back = f"/runs/{quote(run_id)}"
        return guarded(request, back, lambda: _cli(ws, pages.rerun_args(ws, run_id, refresh), run_id, metrics.token))

    @app.post("/models/{name}/alias")
    def alias(request: Request, name: str, alias: str = Form(...), version: int = Form(...)):
        return guarded(request, f"/models/{quote(name)}", lambda: pages.set_model_alias(ws, name, alias, version))

    @app.post("/services/{name}/{action}")
    def service_action(
        request: Request, name: str, action: str, model: str = Form(""), version: int = Form(0), value: float = Form(0)
    ):
        back = f"/services/{quote(name)}"
        return guarded(request, back, lambda: pages.service_action(ws, metrics, name, action, model, version, value))


def _cli(ws: Workspace, args: list[str], run_id: str, serve_token: str | None = None) -> str:
    """Start a `distml` command (the CLI itself) detached, its output in the run's folder. Secrets
    (the store's URL, the services' token) go in its environment, never its command line (ps)."""
    from distml.core import DB_URL_ENV
    from distml.core.layout import workflow_dir

    log = workflow_dir(ws.root, run_id) / "ui-actions.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "distml.cli", "--workspace", str(ws.root), *args]
    env = {key: value for key, value in os.environ.items() if key != UI_TOKEN_ENV}  # the UI's own stays here
    env[DB_URL_ENV] = ws.db_url
    if serve_token:
        env[SERVE_TOKEN_ENV] = serve_token
    with open(log, "ab") as out:
        out.write(f"\n$ distml {' '.join(args)}   ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        out.flush()
        subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return f"started: distml {' '.join(args)} (output in {log})"


def check_ui_exposure(host: str, token: str | None, insecure: bool, read_only: bool) -> None:
    """A host other than loopback needs the UI's token, or `insecure` (`check_exposure`)."""
    risk = "read the workspace (runs, logs, models, lineage)"
    if not read_only:
        risk += ", cancel runs, move aliases and shift services' traffic"
    check_exposure(host, token, insecure, risk=risk, remedy="set DISTML_UI_TOKEN (or --token-file FILE)")


def serve_ui(
    workspace: Workspace,
    host: str,
    port: int,
    token: str | None,
    read_only: bool,
    serve_token: str | None = None,
    echo: Callable[[str], None] = print,
    insecure: bool = False,
) -> None:
    """Run the UI until interrupted; print its address (never its token) once it listens. A host
    other than loopback needs a token, or `insecure`."""
    import socket

    import uvicorn

    check_ui_exposure(host, token, insecure, read_only)
    app = create_app(workspace, token, read_only, serve_token)
    sock = socket.create_server((host, port))
    actual = sock.getsockname()[1]
    echo(f"distml ui at http://{host}:{actual}" + ("  (read-only)" if read_only else ""))
    # an event stream never ends by itself: shutting down waits for them this long, then closes them
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


__all__ = [
    "COOKIE",
    "HEALTH",
    "OPEN_PATHS",
    "ServiceRecord",
    "TokenGate",
    "check_ui_exposure",
    "create_app",
    "serve_ui",
    "session_value",
]
