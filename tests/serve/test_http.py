"""serve.http's uvicorn protocol: a response's head and body leave in one write, as soon as it is complete."""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.server import ServerState

from distml.serve import http


class FakeTransport(asyncio.Transport):
    """Records writes; what uvicorn's protocol asks of a TCP transport, nothing more."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


REQUEST = b"POST /infer HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"


def run_one_request(app) -> FakeTransport:
    async def main() -> FakeTransport:
        config = uvicorn.Config(app, http=http.http_protocol(), lifespan="off", log_config=None, server_header=False)
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(REQUEST)
        for _ in range(100):  # until the app has answered and the loop has had its turns
            if app.done:
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    return asyncio.run(main())


def test_a_response_leaves_in_one_write_when_it_is_complete():
    seen: dict[str, list[bytes]] = {}

    class App:
        done = False

        async def __call__(self, scope, receive, send) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"12")]})
            await send({"type": "http.response.body", "body": b'{"ok": true}'})
            # uvicorn has marked the response complete inside that send: it must be on the wire already,
            # not held for the loop's next turn (the client would wait on everything else the turn runs)
            seen["at_end"] = list(transports[-1].writes)
            self.done = True

    transports: list[FakeTransport] = []
    original = FakeTransport.__init__

    def record(self):
        original(self)
        transports.append(self)

    FakeTransport.__init__ = record
    try:
        transport = run_one_request(App())
    finally:
        FakeTransport.__init__ = original
    assert len(transport.writes) == 1, transport.writes  # head and body joined: one send(), one TCP segment
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"ok": true}'
    assert seen["at_end"] == transport.writes


def test_a_streamed_response_is_sent_at_the_loops_next_turn_and_close_sends_what_is_held():
    async def main() -> tuple[list[bytes], list[bytes], FakeTransport]:
        loop = asyncio.get_running_loop()
        transport = FakeTransport()
        writes = http.CoalescedWrites(transport, loop)
        writes.write(b"head ")
        writes.write(b"part")
        held = list(transport.writes)
        await asyncio.sleep(0)  # the loop's next turn
        after_turn = list(transport.writes)
        writes.write(b"last")
        writes.close()
        return held, after_turn, transport

    held, after_turn, transport = asyncio.run(main())
    assert held == []
    assert after_turn == [b"head part"]
    assert transport.writes == [b"head part", b"last"] and transport.closed
