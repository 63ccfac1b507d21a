"""The scripted model for benchmarks: `POST .../chat/completions` on a raw asyncio protocol
(httptools + uvloop), so a call costs the upstream tens of microseconds and the model is never
what a benchmark measures. aiohttp's server would cost ~5x more per call, CPU taken from the
gateway on a 2-core machine.

The script rides in the last user message, `bench d=<ms> [h=<tag>] [g=1] ...`:
  d  wait this long before answering (the model's latency);
  h  record, per tag, the gap between the end of one call and the start of the next: the lane
     hand-off as the model sees it (`GET /_bench/gaps?tag=T` returns and forgets them);
  g  park the call until `POST /_bench/release` (`GET /_bench/parked` counts them), to hold
     many sessions open at once;
  p  stream the reply one event per write, this many ms apart, as a model whose tokens come
     one by one (without it, the whole stream goes in one write).

    python -m benchmarks.upstream --port 0     # prints "ready PORT" on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httptools
import orjson
import uvloop

REPLY = (
    "Sure. The meeting covered the budget, two open positions and the roadmap for the next "
    "quarter; the action items are assigned to Ann and Bo, due Friday."
)
PIECES = 8  # content deltas of a streamed reply
_OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
_OK_SSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


class Script:
    __slots__ = ("delay_s", "gate", "pace_s", "tag")

    def __init__(self, text: str) -> None:
        self.delay_s, self.tag, self.gate, self.pace_s = 0.0, "", False, 0.0
        for word in text.split(maxsplit=8)[1:]:
            name, _, value = word.partition("=")
            if name == "d":
                self.delay_s = float(value) / 1000
            elif name == "h":
                self.tag = value
            elif name == "g":
                self.gate = value == "1"
            elif name == "p":
                self.pace_s = float(value) / 1000


class Model:
    """State shared by all connections of one upstream process (owned by `serve`)."""

    def __init__(self) -> None:
        self.calls = 0
        self.last_end: dict[str, float] = {}
        self.gaps: dict[str, list[float]] = {}
        self.parked: list[Callable[[], None]] = []

    def started(self, tag: str, now: float) -> None:
        last = self.last_end.get(tag)
        if last is not None:
            self.gaps.setdefault(tag, []).append((now - last) * 1000)

    def answer(self, body: bytes) -> tuple[list[bytes], Script]:
        """The HTTP response for a chat completion request, in the writes that send it (one,
        unless the script paces a stream), and its script."""
        self.calls += 1
        data = orjson.loads(body)
        text = next(
            (m["content"] for m in reversed(data["messages"]) if m.get("role") == "user"), ""
        )
        script = Script(text if isinstance(text, str) else "")
        base = {
            "id": f"chatcmpl-bench{self.calls}",
            "created": int(time.time()),
            "model": data.get("model", "bench"),
            "system_fingerprint": None,
        }
        usage = {"prompt_tokens": len(body) // 4, "completion_tokens": 30, "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + 30
        if data.get("stream") is not True:
            message = {"role": "assistant", "content": REPLY, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            out = orjson.dumps(
                {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
            return [_OK_JSON % len(out) + out], script
        opts = data.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        events = _stream(base, usage if with_usage else None)
        if script.pace_s > 0:
            pieces = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
            return [_OK_SSE + pieces[0], *pieces[1:-1], pieces[-1] + b"0\r\n\r\n"], script
        return [_OK_SSE + _chunked(b"".join(events))], script


def _stream(base: dict[str, Any], usage: dict[str, int] | None) -> list[bytes]:
    head = {**base, "object": "chat.completion.chunk"}
    if usage is not None:
        head["usage"] = None
    size = -(-len(REPLY) // PIECES)
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": REPLY[i : i + size]} for i in range(0, len(REPLY), size)]
    events = [
        {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
        for d in deltas
    ]
    events.append(
        {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    )
    if usage is not None:
        events.append({**head, "choices": [], "usage": usage})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)


def _json(obj: Any) -> bytes:
    out = orjson.dumps(obj)
    return _OK_JSON % len(out) + out


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests on it are answered in order."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        url, body = self.url.decode(), b"".join(self.body)
        self.url, self.body = b"", []
        path = urlsplit(url).path
        if path.endswith("/chat/completions"):
            response, script = self.model.answer(body)
            if script.tag:
                self.model.started(script.tag, now)
            send = functools.partial(self._send, response, script.tag, script.pace_s)
            if script.gate:
                self.model.parked.append(send)
            elif script.delay_s > 0:
                asyncio.get_running_loop().call_later(script.delay_s, send)
            else:
                send()
        else:
            self._send([self._control(path, parse_qs(urlsplit(url).query))], "")

    def _control(self, path: str, query: dict[str, list[str]]) -> bytes:
        model = self.model
        if path.endswith("/models"):
            return _json({"object": "list", "data": [{"id": "bench", "object": "model",
                                                      "created": 0, "owned_by": "bench"}]})
        if path == "/_bench/gaps":
            tag = query.get("tag", [""])[0]
            model.last_end.pop(tag, None)
            return _json({"gaps_ms": model.gaps.pop(tag, [])})
        if path == "/_bench/parked":
            return _json({"parked": len(model.parked), "calls": model.calls})
        if path == "/_bench/release":
            parked, model.parked = model.parked, []
            for send in parked:
                send()
            return _json({"released": len(parked)})
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def _send(self, pieces: list[bytes], tag: str, pace_s: float = 0.0) -> None:
        """Write the first piece now and each next one `pace_s` later."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if tag and len(pieces) == 1:
            self.model.last_end[tag] = time.perf_counter()
        transport.write(pieces[0])
        if len(pieces) > 1:
            asyncio.get_running_loop().call_later(
                pace_s, self._send, pieces[1:], tag, pace_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    model = Model()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(model), host, port, backlog=4096, reuse_address=True
    )
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
