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
from laneway.http.replies import raw_headers
from laneway.turn import Event, Follower, Turn

_DONE = b"data: [DONE]\n\n"


class TurnStream:
    """ASGI response for a request that follows `turn` as a stream."""

    def __init__(
        self,
        turn: Turn,
        headers: dict[str, str],
        include_usage: bool,
        keepalive_s: float,
        on_disconnect: str,
    ) -> None:
        self.turn = turn
        self.headers = headers
        self.include_usage = include_usage
        self.keepalive_s = keepalive_s
        self.on_disconnect = on_disconnect
        self._base = {
            "id": turn.completion_id,
            "object": "chat.completion.chunk",
            "created": int(turn.created),
            "model": turn.model,
        }
        # A chunk is the same bytes as orjson.dumps of the whole dict, put together from
        # pieces encoded once: only the delta is encoded per chunk.
        head = orjson.dumps({**self._base, "choices": [{"index": 0, "delta": None}]})
        self._head = b"data: " + head[: head.rindex(b"null")]
        self._tail = b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self._text_head = self._head + b'{"content":'
        self._text_tail = b'},"logprobs":null,"finish_reason":null' + self._tail
        self._between = self._text_tail + self._text_head  # from one text to the next

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        turn = self.turn
        events = turn.events()
        gone = (
            asyncio.ensure_future(disconnected(receive))
            if turn.watched(self.on_disconnect) else None
        )
        try:
            if turn.arrival_position and not turn.started:
                await self._start(send)
                first = await self._wait_in_queue(events, gone, send)
            else:
                first = await _first_output(events, gone)
                if first is not None and first[0] == "error":
                    await error_response(first[1], self.headers)(scope, receive, send)
                    return
                if first is not None:
                    await self._start(send)
            if first is None or not await self._body(events, first, gone, send):
                turn.detach(self.on_disconnect)
        finally:
            if gone is not None:
                gone.cancel()

    async def _start(self, send: Send) -> None:
        headers = raw_headers(self.headers)
        headers += [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _wait_in_queue(
        self, events: Follower, gone: asyncio.Future[None] | None, send: Send
    ) -> Event | None:
        """Comments until the turn's first event; None if the client left meanwhile."""
        first = asyncio.ensure_future(anext(events))
        try:
            while True:
                position = await self.turn.position()
                await _write(send, b": queued position=%d\n\n" % position)
                assert gone is not None, "a queued turn is watched"
                watched: set[asyncio.Future[Any]] = {first, gone}
                done, _ = await asyncio.wait(
                    watched, timeout=self.keepalive_s, return_when=asyncio.FIRST_COMPLETED
                )
                if first in done:
                    return first.result()
                if gone in done:
                    return None
        finally:
            first.cancel()

    async def _body(
        self,
        events: Follower,
        event: Event,
        gone: asyncio.Future[None] | None,
        send: Send,
    ) -> bool:
        """Relay events until the turn ends: True, or False if the client left first."""
        role_sent = relayed = False
        watch = self.on_disconnect == "cancel"  # notice a disconnect between events too
        out: list[bytes] = []  # chunks not sent yet: all that are ready go in one write
        while True:
            kind, value = event
            if kind == "error":
                assert isinstance(value, LanewayError)
                out.append(b"data: " + orjson.dumps(value.body()) + b"\n\n")
                await _write(send, b"".join(out), more=False)
                return True
            if kind != "start" and not role_sent:
                role_sent = True
                out.append(self._chunk({"role": "assistant", "content": ""}))
            if kind == "deltas":
                relayed = True
                out.append(self._texts(value))
            elif kind == "tool_calls":
                relayed = True
                out.append(self._chunk({"tool_calls": _indexed(value)}))
            elif kind == "done":
                await self._end(send, value, whole=not relayed, before=out)
                return True
            if out and not events.ready():
                await _write(send, b"".join(out))
                out.clear()
            if gone is None:
                event = await anext(events)
                continue
            if gone.done():
                return False
            if watch:
                following = await _next(events, gone)
                if following is None:
                    return False
                event = following
            else:
                event = await anext(events)

    async def _end(self, send: Send, body: dict[str, Any], whole: bool,
                   before: list[bytes]) -> None:
        """The last chunks, after those in `before`; `whole` for a follower that saw no
        deltas (the turn was not streamed): it gets the reply in one piece."""
        choice = body["choices"][0]
        out = b"".join(before)
        message = choice["message"]
        if whole and message.get("content"):
            out += self._texts([message["content"]])
        if whole and message.get("tool_calls"):
            out += self._chunk({"tool_calls": _indexed(message["tool_calls"])})
        out += self._chunk({}, choice["finish_reason"])
        if self.include_usage:
            usage = {**self._base, "choices": [], "usage": body["usage"]}
            out += b"data: " + orjson.dumps(usage) + b"\n\n"
        await _write(send, out + _DONE, more=False)

    def _texts(self, texts: list[str]) -> bytes:
        """`_chunk({"content": text})` of each text, the common chunk, put together without a
        dict and in one join: what lies between two texts is a constant."""
        return self._text_head + self._between.join(map(orjson.dumps, texts)) + self._text_tail

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return (self._head + orjson.dumps(delta) + b',"logprobs":null,"finish_reason":'
                + orjson.dumps(finish) + self._tail)


async def _first_output(
    events: Follower, gone: asyncio.Future[None] | None
) -> Event | None:
    """The first event that is not "start"; None if the client left before it."""
    while (event := await _next(events, gone)) is not None:
        if event[0] != "start":
            return event
    return None


async def _next(
    events: Follower, gone: asyncio.Future[None] | None
) -> Event | None:
    """The next event, or None if the client leaves first (None: not watched)."""
    if gone is None:
        return await anext(events)
    following = asyncio.ensure_future(anext(events))
    await either(following, gone)
    if not following.done():
        following.cancel()
        return None
    return following.result()


def _indexed(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": i, **call} for i, call in enumerate(calls)]


async def _write(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def either(a: asyncio.Future[Any], b: asyncio.Future[Any]) -> None:
    """Returns once `a` or `b` is done; cancels neither. `asyncio.wait` does the same with
    sets, a waiter and a callback per future each call: 24 K more instructions per queued
    turn (callgrind)."""
    woken = a.get_loop().create_future()  # not get_running_loop(): a getpid call on 3.11

    def wake(_: object) -> None:
        if not woken.done():
            woken.set_result(None)

    a.add_done_callback(wake)
    b.add_done_callback(wake)
    try:
        await woken
    finally:
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (call only after the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
