"""`distml ui`: the whole workspace in a browser, read through the owners' queries, steered through the CLI's functions.

Server-rendered pages (FastAPI + Jinja2) that read without JavaScript: runs, one run's DAG and
step logs, training runs, models and lineage, services, queues and watches. Live parts follow by
server-sent events (`/events/...`) and a small script of our own (static/ui.js). Actions are POST
forms that the page confirms; they are refused with `read_only` and, when a token is set, without
it (a Bearer header, or the cookie `/login` sets). The app holds no SQL and no state but a short
history of each service's /metrics scrapes, for rates and latency quantiles.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from distml.core.errors import DistmlError
from distml.core.layout import ServiceRecord
from distml.ui import pages
from distml.workspace import Workspace

HERE = Path(__file__).parent
COOKIE = "distml_ui_token"
PAGE_SIZE = 50
SSE_INTERVAL_S = 1.0


class Actions:
    """Who may act: refused in read-only mode, and without the token when one is set."""

    def __init__(self, token: str | None, read_only: bool):
        self.token, self.read_only = token, read_only

    def refusal(self, request: Request) -> str | None:
        if self.read_only:
            return "this UI is read-only (started with --read-only); use the CLI, or restart it without --read-only"
        if self.token is None:
            return None
        given = request.cookies.get(COOKIE) or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return "this action needs the UI's token: enter it in the box at the top of the page"
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

    _read_routes(app, workspace, render, metrics)
    _registry_routes(app, workspace, render, metrics)
    _event_routes(app, workspace, metrics)
    _action_routes(app, workspace, actions, metrics)
    return app


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

    @app.post("/login")
    async def login(request: Request, token: str = Form(...), back: str = Form("/runs")):
        response = _back(back if back.startswith("/") else "/runs", done="token set for this browser")
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.post("/runs/{run_id}/resume")
    def resume(request: Request, run_id: str):
        return guarded(request, f"/runs/{quote(run_id)}", lambda: _cli(ws, ["run", "--resume", run_id], run_id))

    @app.post("/runs/{run_id}/cancel")
    def cancel(request: Request, run_id: str):
        return guarded(request, f"/runs/{quote(run_id)}", lambda: pages.cancel_run(ws, run_id))

    @app.post("/runs/{run_id}/rerun")
    def rerun(request: Request, run_id: str, refresh: str = Form("")):
        back = f"/runs/{quote(run_id)}"
        return guarded(request, back, lambda: _cli(ws, pages.rerun_args(ws, run_id, refresh), run_id))

    @app.post("/models/{name}/alias")
    def alias(request: Request, name: str, alias: str = Form(...), version: int = Form(...)):
        return guarded(request, f"/models/{quote(name)}", lambda: pages.set_model_alias(ws, name, alias, version))

    @app.post("/services/{name}/{action}")
    def service_action(
        request: Request, name: str, action: str, model: str = Form(""), version: int = Form(0), value: float = Form(0)
    ):
        back = f"/services/{quote(name)}"
        return guarded(request, back, lambda: pages.service_action(ws, metrics, name, action, model, version, value))


def _cli(ws: Workspace, args: list[str], run_id: str) -> str:
    """Start a `distml` command (the CLI itself) detached, its output in the run's folder."""
    from distml.core.layout import workflow_dir

    log = workflow_dir(ws.root, run_id) / "ui-actions.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "distml.cli", "--workspace", str(ws.root), "--db-url", ws.db_url, *args]
    with open(log, "ab") as out:
        out.write(f"\n$ distml {' '.join(args)}   ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        out.flush()
        subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return f"started: distml {' '.join(args)} (output in {log})"


def serve_ui(
    workspace: Workspace,
    host: str,
    port: int,
    token: str | None,
    read_only: bool,
    serve_token: str | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Run the UI until interrupted; print its address once it listens."""
    import socket

    import uvicorn

    app = create_app(workspace, token, read_only, serve_token)
    sock = socket.create_server((host, port))
    actual = sock.getsockname()[1]
    echo(f"distml ui at http://{host}:{actual}" + ("  (read-only)" if read_only else ""))
    # an event stream never ends by itself: shutting down waits for them this long, then closes them
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


__all__ = ["COOKIE", "ServiceRecord", "create_app", "serve_ui"]
