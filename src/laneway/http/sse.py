"""A turn as an OpenAI chat.completion.chunk stream (Server-Sent Events).

A turn that can start at once sends its headers with its first output, so a model that
fails before answering still gets a proper HTTP error. A queued turn sends 200 and its
headers at once, then `: queued position=N` comments until it starts. The stream carries
only `data:` lines and comments, never `id:`, `event:` or `retry:` fields.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from laneway.errors import LanewayError
from laneway.http.errors import error_response
from laneway.service import Turn

_DONE = b"data: [DONE]\n\n"


class TurnStream:
    """ASGI response for a streamed turn."""

    def __init__(
        self, turn: Turn, headers: dict[str, str], include_usage: bool, keepalive_s: float
    ) -> None:
        self.turn = turn
        self.headers = headers
        self.include_usage = include_usage
        self.keepalive_s = keepalive_s
        self._base = {
            "id": turn.completion_id,
            "object": "chat.completion.chunk",
            "created": int(turn.created),
            "model": turn.model,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        turn = self.turn
        assert turn.events is not None
        if turn.ticket.arrival_position:
            await self._start(send)
            first = await self._wait_in_queue(receive, send)
            if first is None:
                return
        else:
            first = await _next_output(turn.events)
            if first[0] == "error":
                await error_response(first[1], self.headers)(scope, receive, send)
                return
            await self._start(send)
        await self._body(send, first)

    async def _start(self, send: Send) -> None:
        headers = [(k.encode(), v.encode()) for k, v in self.headers.items()]
        headers += [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _wait_in_queue(self, receive: Receive, send: Send) -> tuple[str, Any] | None:
        """Comments until the turn's first event. None if the client left, which abandons
        the turn (it leaves the queue untouched)."""
        turn = self.turn
        assert turn.events is not None
        first = asyncio.ensure_future(turn.events.get())
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            while True:
                position = await turn.ticket.position()
                await _write(send, b": queued position=%d\n\n" % position)
                done, _ = await asyncio.wait(
                    {first, gone}, timeout=self.keepalive_s, return_when=asyncio.FIRST_COMPLETED
                )
                if first in done:
                    return first.result()
                if gone in done:
                    turn.abandon()
                    return None
        finally:
            gone.cancel()
            first.cancel()

    async def _body(self, send: Send, event: tuple[str, Any]) -> None:
        """Relay events until the turn ends; the role chunk goes before the first output."""
        turn = self.turn
        assert turn.events is not None
        role_sent = False
        while True:
            kind, value = event
            if kind == "error":
                assert isinstance(value, LanewayError)
                await _write(send, b"data: " + orjson.dumps(value.body()) + b"\n\n", more=False)
                return
            if kind != "start" and not role_sent:
                role_sent = True
                await _write(send, self._chunk({"role": "assistant", "content": ""}))
            if kind == "delta":
                await _write(send, self._chunk({"content": value}))
            elif kind == "tool_calls":
                calls = [{"index": i, **call} for i, call in enumerate(value)]
                await _write(send, self._chunk({"tool_calls": calls}))
            elif kind == "done":
                await self._end(send, value)
                return
            event = await turn.events.get()

    async def _end(self, send: Send, body: dict[str, Any]) -> None:
        finish = body["choices"][0]["finish_reason"]
        out = self._chunk({}, finish)
        if self.include_usage:
            usage = {**self._base, "choices": [], "usage": body["usage"]}
            out += b"data: " + orjson.dumps(usage) + b"\n\n"
        await _write(send, out + _DONE, more=False)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def _next_output(events: asyncio.Queue[tuple[str, Any]]) -> tuple[str, Any]:
    while (event := await events.get())[0] == "start":
        pass
    return event


async def _write(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (call only after the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
