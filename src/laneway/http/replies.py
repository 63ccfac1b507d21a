"""The bytes of the hot path's exchange: the request body, read with its size limit, and JSON
replies. `Reply` goes out as two bare ASGI messages; the other endpoints use `JSON`, a
Starlette response."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from laneway.errors import PayloadTooLarge


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Reply:
    """A JSON reply as two bare ASGI messages: the hot path needs none of the header
    bookkeeping of Starlette's `Response`."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: bytes, headers: dict[str, str], status: int = 200) -> None:
        self.body = body
        self.headers = headers
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(b"content-type", b"application/json"),
               (b"content-length", b"%d" % len(self.body)), *raw_headers(self.headers)]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI sends them: bytes, Latin-1 as HTTP/1.1 has them."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole body; `PayloadTooLarge` past `limit` bytes (before reading any if the
    declared length says so), `ClientDisconnect` if the client leaves first."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
