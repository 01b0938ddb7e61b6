"""HTTP plumbing shared by the replica and the gateway, each piece in one place.

Bearer-token auth as one Starlette-style ASGI middleware class (the scheme is case-insensitive,
RFC 7235), `{"error": ...}` bodies and exception handlers, bounded (and decompressed) request
bodies, and running uvicorn on a socket bound here: the port file is written once the app is
ready, SIGTERM/SIGINT drain in-flight requests and return instead of killing the process, and a
response's head and body leave in one write (`CoalescedWrites`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from distml.core.errors import DistmlError
from distml.core.files import atomic_write
from distml.serve import protocol
from distml.serve.protocol import ProtocolError

log = logging.getLogger("distml.serve")

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
UNAUTHORIZED = "missing or wrong bearer token; send the header 'Authorization: Bearer <token>'"


# --- auth ----------------------------------------------------------------------------------


def token_matches(header: bytes | str | None, token: str) -> bool:
    """Does an `Authorization` header value carry `token` under the Bearer scheme (any case)?"""
    if header is None:
        return False
    raw = header.encode("latin-1") if isinstance(header, str) else header
    scheme, _, value = raw.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token.encode())


class BearerAuth:
    """Pure ASGI middleware: every HTTP request but the two health checks needs `Authorization: Bearer TOKEN`."""

    def __init__(self, app: Any, token: str | None, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.token = token
        self.open_paths = open_paths  # exact paths: a prefix would let /v2/health/../models/m/infer through

    async def __call__(self, scope, receive, send) -> None:
        if self.token is None or scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if token_matches(header, self.token):
            await self.app(scope, receive, send)
            return
        response = error_response(401, UNAUTHORIZED, {"www-authenticate": "Bearer"})
        await response(scope, receive, send)


class FastRoutes:
    """Pure ASGI: the hot routes (inference) answered directly, everything else passed to `app`.

    FastAPI's own stack (error and telemetry middlewares, exception handling, exit stacks, a
    linear route scan, dependency solving) costs more per request than a one-image inference
    answer; hot endpoints are plain `async (Request) -> Response` functions, and their
    DistmlErrors become `{"error": ...}` answers here. They stay in the OpenAPI docs through the
    app's own (documentation) routes.
    """

    def __init__(self, app: Any, routes: Sequence[tuple[str, str, Callable[[Request], Any]]]):
        from starlette.routing import compile_path

        self.app = app
        self.routes = [(method, compile_path(path)[0], endpoint) for method, path, endpoint in routes]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            for method, regex, endpoint in self.routes:
                match = regex.match(scope["path"])
                if match is not None and scope["method"] == method:
                    scope["path_params"] = match.groupdict()
                    try:
                        response = await endpoint(Request(scope, receive))
                    except DistmlError as exc:
                        response = error_response(getattr(exc, "status", 400), str(exc), getattr(exc, "headers", None))
                    except Exception as exc:  # a bug: answer it as JSON, log it in full
                        log.exception("event=unhandled_error path=%s", scope["path"])
                        response = error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


# FastAPI's native OpenTelemetry (0.13x+) looks up the global tracer, meter and logger providers on
# every request (~10 us) even when none is configured; the apps count requests in their own
# Prometheus metrics, so it is off unless a caller passes `telemetry` itself.
TELEMETRY_OFF = {"tracing": False, "metrics": False, "logs": False}


class FrontedApp(FastAPI):
    """FastAPI for the docs and the cold routes, behind `front`: pure ASGI layers (outermost first,
    as (class, options)) that every request passes before FastAPI's own stack; `FastRoutes` among
    them lets the hot routes skip that stack."""

    front: list[tuple[type, dict[str, Any]]] = []

    def __init__(self, **kwargs: Any):
        if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
            kwargs.setdefault("telemetry", TELEMETRY_OFF)
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> Any:
        app = super().build_middleware_stack()
        for layer, options in reversed(self.front):
            app = layer(app, **options)
        return app


# --- errors --------------------------------------------------------------------------------


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The one error shape of both apps: `{"error": message}` (what V2 clients read)."""
    return Response(error_body(message), status, headers=headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    """DistmlError -> its `status` (400 by default); unknown routes and methods -> 404/405 in our shape."""

    @app.exception_handler(DistmlError)
    async def _distml_error(_request: Request, exc: DistmlError) -> Response:
        return error_response(getattr(exc, "status", 400), str(exc), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}; see /docs for the V2 (/v2/...) and "
                "V1 (/v1/models/{model}[:predict]) routes"
            )
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))


# --- request bodies ------------------------------------------------------------------------


# An over-limit body is read and thrown away, up to this much in all (or twice the limit, if more)
# and for this long, before its 413 and a close: a client that writes the whole body before reading
# (urllib, requests, many SDKs) then reads the 413 and its message instead of "connection reset by
# peer" (closing with unread data sends a TCP RST, which discards the answer in the client's
# buffer). nginx does the same for its 413 (lingering close: lingering_time 30 s); past the bound
# the connection is closed at once, as before, so a huge upload costs at most this much reading.
DRAIN_MAX_BYTES = 256 * 1024 * 1024
DRAIN_MAX_SECONDS = 30.0


class BodyTooLarge(ProtocolError):
    """413 for a body over the limit; the connection is closed after the answer."""

    headers = {"connection": "close"}

    def __init__(self, message: str):
        super().__init__(413, message)


async def _discard(stream: Any, size: int, max_bytes: int) -> None:
    """Read and drop the rest of `stream` (`size` bytes read so far), up to the drain bound."""
    bound = max(DRAIN_MAX_BYTES, 2 * max_bytes)
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(DRAIN_MAX_SECONDS):
            async for chunk in stream:
                size += len(chunk)
                if size > bound:
                    return


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `max_bytes` (the rest read and discarded,
    up to a bound, so that the client gets to read the 413)."""
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > max_bytes:
        # not when the client waits for "100 Continue" (it sends no body then), nor past the bound
        if int(length) <= max(DRAIN_MAX_BYTES, 2 * max_bytes) and "expect" not in request.headers:
            await _discard(request.stream(), 0, max_bytes)
        raise BodyTooLarge(
            f"request body of {length} bytes exceeds the server's limit of {max_bytes} bytes; "
            "send fewer items per request",
        )
    # ASGI messages read here, not through `request.stream()` (an async generator per request): most
    # bodies come in one message. What is not read (over the limit) is left to that stream.
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            if message.get("more_body", False):
                await _discard(request.stream(), size, max_bytes)
            raise BodyTooLarge(
                f"request body exceeds the server's limit of {max_bytes} bytes; send fewer items per request"
            )
        if not message.get("more_body", False):
            return chunk if not chunks else b"".join([*chunks, chunk])
        chunks.append(chunk)


async def read_json(request: Request, max_bytes: int, expected: str) -> dict[str, Any]:
    """The body as a JSON object (gzip/deflate undone), or one 400 that ends with `expected ...`."""
    body = protocol.decompress_body(
        await read_body(request, max_bytes), request.headers.get("content-encoding"), max_bytes
    )
    return protocol.load_json_object(body, "request body", f"expected {expected}")


# --- API docs ------------------------------------------------------------------------------


def request_body(model: type) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is read by hand (fast path) but documented as `model`."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_bodies(app: FastAPI, models: Sequence[type]) -> None:
    """Put the pydantic `models` named by `request_body` into the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in body.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components.setdefault(model.__name__, body)
        return schema

    app.openapi = openapi


# --- binding and running -------------------------------------------------------------------


class CoalescedWrites:
    """A transport that holds writes until `flush`: at the end of each response, else the loop's next turn.

    uvicorn writes a response's head and its body separately: two send() system calls and two TCP
    segments (two wake-ups of the client) per small answer. Joined, a one-image answer costs one of
    each. Everything else, `close` included (after the held bytes), is the wrapped transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def http_protocol() -> Any:
    """uvicorn's httptools protocol on `CoalescedWrites`; uvicorn's default ("auto") without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency
        return "auto"

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescedWrites(transport, self.loop))

        def on_response_complete(self) -> None:
            self.transport.flush()  # the whole answer is written: send it now, not after the loop's turn
            super().on_response_complete()

    return CoalescingHttpToolsProtocol


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0 = a free port), or a DistmlError that says what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise DistmlError(
            f"cannot listen on {host}:{port} ({exc}); pick another --host/--port (0: a free port)"
        ) from exc
    sock.setblocking(False)
    return sock


def write_port_file(path: str | Path, port: int) -> None:
    with atomic_write(Path(path), "w") as handle:
        handle.write(str(port))


def clear_port_file(path: str | Path | None) -> None:
    """Never leave a previous run's port for the caller to read."""
    if path:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


async def serve(
    app: Any,
    sock: socket.socket,
    *,
    ready: Callable[[], bool] = lambda: True,
    failed: Callable[[], str | None] = lambda: None,
    port_file: str | Path | None = None,
    on_ready: Callable[[int], None] | None = None,
    on_stop: Callable[[], None] | None = None,
    graceful_timeout: float = 30.0,
    log_level: str = "warning",
) -> int:
    """Serve `app` on `sock` until SIGTERM/SIGINT; returns 0 after draining, 1 if `failed()` said why.

    Once uvicorn listens and `ready()` holds, the bound port goes to `port_file` (atomically) and
    to `on_ready`. On a signal, `on_stop` runs first (e.g. readiness turns 503), then uvicorn
    stops accepting and finishes in-flight requests for up to `graceful_timeout` seconds.
    """
    import uvicorn

    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_timeout,
        timeout_keep_alive=30,
        proxy_headers=False,  # no proxy in front of us sets X-Forwarded-*; its middleware costs per request
        server_header=False,
        http=http_protocol(),
    )
    server = uvicorn.Server(config)

    @contextlib.contextmanager
    def capture_signals() -> Iterator[None]:
        # uvicorn's own re-raises the signal after draining, killing the process; we return 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    server.capture_signals = capture_signals
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not task.done() and not (server.started and ready()):
        reason = failed()
        if reason:
            log.error("event=exit reason=%r", reason)
            server.should_exit = True
            await task
            return 1
        await asyncio.sleep(0.02)
    if not task.done():
        port = sock.getsockname()[1]
        if port_file:
            write_port_file(port_file, port)
        if on_ready is not None:
            on_ready(port)
    while not task.done() and not server.should_exit:
        await asyncio.sleep(0.05)
    if on_stop is not None:
        on_stop()
    await task
    return 0


@contextlib.contextmanager
def stop_on_signal() -> Iterator[asyncio.Event]:
    """While inside, SIGTERM/SIGINT cancel the current task (e.g. a slow start-up) and set the
    yielded event, so the caller can clean up and exit 0 instead of dying by the signal."""
    stopping = asyncio.Event()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread() or task is None:
        yield stopping
        return

    def stop() -> None:
        stopping.set()
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        yield stopping
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (uvicorn's "auto" choice), else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


def run(coroutine_factory: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(coroutine_factory())


__all__ = [
    "BearerAuth",
    "BodyTooLarge",
    "bind",
    "clear_port_file",
    "error_body",
    "error_response",
    "install_error_handlers",
    "read_body",
    "read_json",
    "run",
    "serve",
    "token_matches",
    "write_port_file",
]
