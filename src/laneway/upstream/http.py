"""Any OpenAI-compatible server over HTTP, through the lean keep-alive client of `h1.py`.

Not aiohttp, for the calls of every turn: measured with callgrind on the gateway, its
request and response machinery cost more instructions than the rest of the turn's Python.
(httpx was out earlier: 3-4x aiohttp's CPU, and its pool serialised under concurrency.)
Errors become `UpstreamError`/`UpstreamTimeout` with a message that names the failure but
never echoes the upstream's body or our credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson

from laneway.errors import UpstreamError, UpstreamTimeout
from laneway.upstream.h1 import Connection, Origin, ResponseError, ResponseTimeout

_DONE = b"[DONE]"


class HttpUpstream:
    supports_tools = True
    takes_encoded = True

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None,
        timeout_s: float,
        max_reply_bytes: int,
    ) -> None:
        self.model = model
        url = base_url.rstrip("/") + "/chat/completions"
        self._origin = Origin(url, connect_timeout_s=min(timeout_s, 10))
        parts = urlsplit(url)
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = "Content-Type: application/json\r\nAccept-Encoding: identity\r\n"
        if api_key:
            headers += f"Authorization: Bearer {api_key}\r\n"
        self._headers = headers.encode("latin-1")
        self._timeout_s = timeout_s
        self._max_reply = max_reply_bytes
        self._loop: asyncio.AbstractEventLoop | None = None

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        data = orjson.dumps({**body, "model": self.model})
        deadline = self._deadline()
        conn: Connection | None = None
        try:
            conn = await self._origin.post(self._path, self._headers, data, deadline)
            payload = await self._read(conn, deadline)
            _check_status(conn.status, payload)
        except ResponseTimeout:
            raise UpstreamTimeout(f"the model did not answer within {self._timeout_s:g}s") from None
        except ResponseError as e:
            raise UpstreamError(f"could not reach the model: {e.what}") from None
        finally:
            if conn is not None:
                self._origin.release(conn)
        try:
            result = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError("the model answered with invalid JSON") from None
        if not isinstance(result, dict) or not _has_message(result):
            raise UpstreamError("the model's answer has no choices[0].message")
        return result

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        data = orjson.dumps(
            {
                **body,
                "model": self.model,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        deadline = self._deadline()
        conn: Connection | None = None
        try:
            conn = await self._origin.post(self._path, self._headers, data, deadline)
            if conn.status != 200:
                _check_status(conn.status, await self._read(conn, deadline))
            received = 0  # bytes of whole lines
            rest = b""
            while (piece := await conn.read(None, idle_s=self._timeout_s)) is not None:
                buffered = rest + piece if rest else piece
                if received + len(buffered) <= self._max_reply:
                    whole = _whole_events(buffered)
                    if whole is not None:
                        received += len(buffered)
                        rest = b""
                        chunks, ended = whole
                        yield chunks
                        if ended:
                            return
                        continue
                lines = buffered.split(b"\n")
                rest = lines.pop()
                over = received + len(buffered) > self._max_reply
                if over:  # relay the lines within the limit, then refuse
                    lines = _within(lines, self._max_reply - received)
                received += len(buffered) - len(rest)
                chunks = []
                try:
                    for line in lines:
                        if line[:5] == b"data:":  # not blank lines or comments
                            chunk = _event(line)
                            if chunk is _END:
                                if chunks:
                                    yield chunks
                                return
                            chunks.append(chunk)
                except UpstreamError:  # what came before the bad line still goes out
                    if chunks:
                        yield chunks
                    raise
                if chunks:
                    yield chunks
                if over:
                    raise self._too_big()
        except ResponseTimeout:
            raise UpstreamTimeout(
                f"the model's stream was silent for {self._timeout_s:g}s"
            ) from None
        except ResponseError as e:
            raise UpstreamError(f"the model's stream broke: {e.what}") from None
        finally:
            if conn is not None:
                self._origin.release(conn)
        raise UpstreamError("the model's stream ended before [DONE]")

    def _deadline(self) -> float:
        """`timeout_s` from now in loop time. The loop is looked up once: on Python 3.11
        each `asyncio.get_running_loop()` is a getpid system call."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time() + self._timeout_s

    async def _read(self, conn: Connection, deadline: float) -> bytes:
        """The body, refusing one over the reply limit before holding it all."""
        pieces, size = [], 0
        while (piece := await conn.read(deadline)) is not None:
            size += len(piece)
            if size > self._max_reply:
                raise self._too_big()
            pieces.append(piece)
        return b"".join(pieces)

    def _too_big(self) -> UpstreamError:
        return UpstreamError(f"the model's reply is over {self._max_reply} bytes")

    async def close(self) -> None:
        self._origin.close()


#: `_event`'s answer to `data: [DONE]`: compared by identity, never read.
_END: dict[str, Any] = {}


def _event(line: bytes) -> dict[str, Any]:
    """The chunk a server-sent `data:` line carries; `_END` for `data: [DONE]`. A chunk
    as servers write it, `data: {`, skips the check for the end. (Finding the end by the
    failed parse instead cost 2 µs per stream in the decode error's Python constructor; and
    `b"{" in line` tries the needle as an integer first, an error formatted and dropped.)
    JSON's whitespace covers the space after `data:` and a CR before the line end."""
    if line[6:7] != b"{" and line[5:].strip() == _DONE:
        return _END
    try:
        chunk = orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        raise UpstreamError("the model streamed invalid JSON") from None
    if type(chunk) is not dict:
        raise UpstreamError("the model streamed a non-object chunk")
    if "error" in chunk:
        raise UpstreamError("the model reported an error mid-stream")
    return chunk


_LAST = b"data: " + _DONE + b"\n\n"
_BETWEEN = b"\n\ndata: "  # what separates two events as servers write them


def _whole_events(data: bytes) -> tuple[list[dict[str, Any]], bool] | None:
    """The chunks of `data` in one parse (at least one), and whether it ends the stream, when
    `data` is whole events as servers write them: `data: {...}` lines, each followed by a
    blank line, and perhaps `data: [DONE]`. None for anything else, an error chunk
    included: the caller then goes line by line, which names the error. A JSON text holds
    no raw line end, so `\n\ndata: ` only ever comes between events; made commas, they turn
    the events into one JSON array. That array has one element per event unless an event
    is not one JSON value (`{"a": [1` then `2]}` would make one): then the count differs,
    and the lines decide.
    One parse of a read instead of a split and a parse per line: 50 K of a streamed turn's
    1.11 M instructions, for a reply of 11 chunks that come in one read (callgrind)."""
    if data[:7] != b"data: {" or data[-2:] != b"\n\n":
        return None
    ended = data.endswith(_LAST)
    events = data[6 : -len(_LAST)] if ended else data[6:]
    joined = events.replace(_BETWEEN, b",")
    try:
        chunks = orjson.loads(b"[" + joined + b"]")
    except orjson.JSONDecodeError:
        return None
    separators = (len(events) - len(joined)) // (len(_BETWEEN) - 1)  # each became a comma
    if len(chunks) != separators + 1:
        return None
    for chunk in chunks:
        if type(chunk) is not dict or "error" in chunk:
            return None
    return chunks, ended


def _within(lines: list[bytes], budget: int) -> list[bytes]:
    """The first lines that fit in `budget` bytes, each with its line end."""
    for i, line in enumerate(lines):
        budget -= len(line) + 1
        if budget < 0:
            return lines[:i]
    return lines


def _check_status(status: int, payload: bytes) -> None:
    if status == 200:
        return
    kind = ""
    try:
        error = orjson.loads(payload).get("error")
        if isinstance(error, dict) and isinstance(error.get("type"), str):
            kind = f" ({error['type'][:40]})"
    except (orjson.JSONDecodeError, AttributeError):
        pass
    if status in (408, 504):
        raise UpstreamTimeout(f"the model server timed out (HTTP {status})")
    raise UpstreamError(f"the model server answered HTTP {status}{kind}")


def _has_message(result: dict[str, Any]) -> bool:
    choices = result.get("choices")
    return (
        isinstance(choices, list)
        and bool(choices)
        and isinstance(choices[0], dict)
        and isinstance(choices[0].get("message"), dict)
    )
