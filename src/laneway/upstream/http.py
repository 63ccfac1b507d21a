"""Any OpenAI-compatible server over HTTP, through one shared aiohttp session.

aiohttp rather than httpx: on this hardware httpx spent 3-4x the CPU per request and its
pool serialised under concurrency. Errors become `UpstreamError`/`UpstreamTimeout` with a
message that names the failure but never echoes the upstream's body or our credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from laneway.errors import UpstreamError, UpstreamTimeout

_DONE = b"[DONE]"


class HttpUpstream:
    supports_tools = True
    takes_encoded = True

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        model: str,
        api_key: str | None,
        timeout_s: float,
        max_reply_bytes: int,
    ) -> None:
        self.model = model
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 10))
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout_s, 10), sock_read=timeout_s
        )
        self._timeout_s = timeout_s
        self._max_reply = max_reply_bytes

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        data = orjson.dumps({**body, "model": self.model})
        try:
            async with self._session.post(
                self._url, data=data, headers=self._headers, timeout=self._timeout
            ) as resp:
                payload = await self._read(resp)
                _check_status(resp.status, payload)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"the model did not answer within {self._timeout_s:g}s") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"could not reach the model: {type(e).__name__}") from None
        try:
            result = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError("the model answered with invalid JSON") from None
        if not isinstance(result, dict) or not _has_message(result):
            raise UpstreamError("the model's answer has no choices[0].message")
        return result

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        data = orjson.dumps(
            {
                **body,
                "model": self.model,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        try:
            async with self._session.post(
                self._url, data=data, headers=self._headers, timeout=self._stream_timeout
            ) as resp:
                if resp.status != 200:
                    _check_status(resp.status, await self._read(resp))
                received = 0
                async for line in resp.content:
                    received += len(line)
                    if received > self._max_reply:
                        raise UpstreamError(f"the model's reply is over {self._max_reply} bytes")
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == _DONE:
                        return
                    try:
                        chunk = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        raise UpstreamError("the model streamed invalid JSON") from None
                    if not isinstance(chunk, dict):
                        raise UpstreamError("the model streamed a non-object chunk")
                    if "error" in chunk:
                        raise UpstreamError("the model reported an error mid-stream")
                    yield chunk
        except asyncio.TimeoutError:
            raise UpstreamTimeout(
                f"the model's stream was silent for {self._timeout_s:g}s"
            ) from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"the model's stream broke: {type(e).__name__}") from None
        raise UpstreamError("the model's stream ended before [DONE]")

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, refusing one over the reply limit before holding it all."""
        if (resp.content_length or 0) > self._max_reply:
            raise UpstreamError(f"the model's reply is over {self._max_reply} bytes")
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(65536):
            size += len(chunk)
            if size > self._max_reply:
                raise UpstreamError(f"the model's reply is over {self._max_reply} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        return None


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
