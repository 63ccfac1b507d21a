"""`HttpProtocol` (uvicorn's httptools protocol writing each reply whole), driven through
uvicorn's own parser with a transport that records what is written."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from laneway.http.server import HttpProtocol

BODY = b'{"ok":true}'
HEAD = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8470), "peername": ("127.0.0.1", 50000)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _reply(scope: Scope, receive: Receive, send: Send) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEAD})
    await send({"type": "http.response.body", "body": BODY})


class Exchange:
    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, http=HttpProtocol, lifespan="off", log_level="critical")
        self.protocol = HttpProtocol(config, ServerState(), {}, asyncio.get_running_loop())
        self.transport = Recording()
        self.protocol.connection_made(self.transport)

    async def send(self, request: bytes) -> None:
        self.protocol.data_received(request)
        await self.until(lambda: self.protocol.cycle.response_complete or self.transport.closed)

    async def until(self, done: Any) -> None:
        for _ in range(1000):
            if done():
                return
            await asyncio.sleep(0)
        pytest.fail("the exchange did not get there")


async def test_a_reply_with_a_length_goes_out_in_one_write() -> None:
    exchange = Exchange(_reply)
    for _ in range(2):  # and again on the kept-alive connection
        await exchange.send(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")
    first, second = exchange.transport.writes
    assert first == second
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\n" + BODY)


async def test_pipelined_requests_get_whole_replies_in_order() -> None:
    exchange = Exchange(_reply)
    request = b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}"
    exchange.protocol.data_received(request + request)
    await exchange.until(lambda: len(exchange.transport.writes) == 2)
    first, second = exchange.transport.writes
    assert first == second and first.endswith(b"\r\n\r\n" + BODY)


async def test_a_finished_cycle_is_freed_without_the_collector() -> None:
    """The view and its cycle do not keep each other alive: every request would otherwise
    leave a reference loop for the collector to find."""
    request = b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}"
    gc.disable()
    try:
        exchange = Exchange(_reply)
        await exchange.send(request)
        first = weakref.ref(exchange.protocol.cycle)
        await exchange.send(request)
        assert first() is None
    finally:
        gc.enable()


async def test_a_streamed_reply_sends_its_head_at_once() -> None:
    go = asyncio.Event()

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await go.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    exchange = Exchange(stream)
    exchange.protocol.data_received(b"GET /s HTTP/1.1\r\nhost: a\r\n\r\n")
    await exchange.until(lambda: exchange.transport.writes)
    assert exchange.transport.writes[0].endswith(b"transfer-encoding: chunked\r\n\r\n")
    go.set()
    await exchange.until(lambda: exchange.protocol.cycle.response_complete)
    assert exchange.transport.writes[1:] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]


async def test_a_head_request_gets_its_head() -> None:
    exchange = Exchange(_reply)
    await exchange.send(b"HEAD /v1/x HTTP/1.1\r\nhost: a\r\n\r\n")
    (head,) = exchange.transport.writes
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")


async def test_100_continue_goes_out_before_the_whole_reply() -> None:
    exchange = Exchange(_reply)
    exchange.protocol.data_received(b"POST /v1/x HTTP/1.1\r\nhost: a\r\n"
                                    b"expect: 100-continue\r\ncontent-length: 2\r\n\r\n")
    await exchange.until(lambda: exchange.transport.writes)
    assert exchange.transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    await exchange.send(b"{}")
    assert exchange.transport.writes[1].endswith(b"\r\n\r\n" + BODY)


async def test_an_app_failing_after_its_head_sends_the_head_and_closes() -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEAD})
        raise RuntimeError("the app failed before its body")

    exchange = Exchange(fails)
    await exchange.send(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
    assert exchange.transport.closed
    (head,) = exchange.transport.writes
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
