"""An HTTP client for the operator endpoints and the chat endpoint, used by the CLI.

It talks to a running gateway exactly as any client would (same URLs, same API keys), so
what an operator sees is what the API says. Every failure becomes an `OpsError` whose
message says what to do about it; the CLI prints it without a traceback.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8470"
SESSION_HEADER = "x-laneway-session-key"


class OpsError(Exception):
    """A failure an operator can act on; `str()` is the whole message, `status` the HTTP
    status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ChatEvent:
    """One thing a streamed turn said: `session` (its key, from the response header),
    `queued` (position), `delta` (text), `tool_calls` (calls of client tools), `finish`
    (reason) or `error` (message)."""

    kind: str
    value: Any = None


class OpsClient:
    """An async context manager around one aiohttp session.

    `timeout_s` bounds each non-streaming call; a chat stream is bounded only by the
    gateway's own limits, since a queued turn may legitimately wait a long time.
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout_s: float = 30.0) -> None:
        # people paste the OpenAI base URL; accept it
        self.url = url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key or None
        self.timeout_s = timeout_s
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = aiohttp.ClientSession(headers=headers)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._http is not None:
            await self._http.close()

    # -- operator endpoints ------------------------------------------------------------

    async def sessions(
        self,
        *,
        limit: int = 20,
        cursor: str | None = None,
        agent: str | None = None,
        tenant: str | None = None,
        busy: bool | None = None,
    ) -> dict[str, Any]:
        params: dict[str, str] = {"limit": str(limit)}
        if cursor:
            params["cursor"] = cursor
        if agent:
            params["agent"] = agent
        if tenant:
            params["tenant"] = tenant
        if busy is not None:
            params["busy"] = "true" if busy else "false"
        return await self._json("GET", "/v1/sessions", params)

    async def session(self, key: str, *, agent: str | None = None,
                      tenant: str | None = None) -> dict[str, Any]:
        return await self._json("GET", f"/v1/sessions/{_seg(key)}", _ref(agent, tenant))

    async def delete_session(self, key: str, *, agent: str | None = None,
                             tenant: str | None = None) -> dict[str, Any]:
        return await self._json("DELETE", f"/v1/sessions/{_seg(key)}", _ref(agent, tenant))

    async def turns(self, key: str, *, agent: str | None = None,
                    tenant: str | None = None) -> list[dict[str, Any]]:
        """A session's turns with their timings: the saved ones, then any still running."""
        body = await self._json("GET", f"/v1/sessions/{_seg(key)}/turns", _ref(agent, tenant))
        return list(body.get("data", []))

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._json("GET", "/v1/models", {})).get("data", [])]

    async def lanes(self) -> list[dict[str, Any]]:
        return list((await self._json("GET", "/v1/lanes", {})).get("data", []))

    async def _json(self, method: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        assert self._http is not None, "use OpsClient as `async with`"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._http.request(
                method, self.url + path, params=params, timeout=timeout
            ) as resp:
                data = await resp.read()
                if resp.status >= 400:
                    raise self._http_error(resp.status, data)
        except aiohttp.ClientError as e:
            raise self._unreachable(e) from None
        except TimeoutError:
            raise OpsError(f"{self.url} did not answer within {self.timeout_s:g}s") from None
        try:
            body = json.loads(data)
        except ValueError:
            raise OpsError(f"{self.url}{path} did not answer with JSON: is it laneway?") from None
        if not isinstance(body, dict):
            raise OpsError(f"{self.url}{path} answered with unexpected JSON")
        return body

    # -- chat ----------------------------------------------------------------------------

    async def chat(
        self, text: str, *, session_key: str | None, model: str = "default"
    ) -> AsyncIterator[ChatEvent]:
        """Stream one turn. The first event is `("session", key)`, from the response
        header, so a new session's key is known before any text arrives."""
        assert self._http is not None, "use OpsClient as `async with`"
        body = {"model": model, "stream": True,
                "messages": [{"role": "user", "content": text}]}
        headers = {SESSION_HEADER: session_key} if session_key else {}
        # no total timeout: a queued turn may wait; the gateway sends keep-alive comments
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
        try:
            async with self._http.post(
                self.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise self._http_error(resp.status, await resp.read())
                yield ChatEvent("session", resp.headers.get(SESSION_HEADER))
                async for event in _sse_events(resp.content):
                    yield event
        except aiohttp.ClientError as e:
            raise self._unreachable(e) from None

    # -- errors --------------------------------------------------------------------------

    def _unreachable(self, e: aiohttp.ClientError) -> OpsError:
        if isinstance(e, aiohttp.ClientConnectorError):
            os_error = e.os_error
            reason = ("connection refused" if isinstance(os_error, ConnectionRefusedError)
                      else os_error.strerror or str(os_error))
            return OpsError(
                f"cannot reach laneway at {self.url} ({reason}); is `laneway serve` running "
                "there? Set --url or LANEWAY_URL."
            )
        if isinstance(e, aiohttp.InvalidURL):
            return OpsError(f"not a valid URL: {self.url}")
        return OpsError(f"talking to {self.url} failed: {type(e).__name__}: {e}")

    def _http_error(self, status: int, data: bytes) -> OpsError:
        message, code = _error_fields(data)
        if status == 401:
            hint = "pass --api-key or set LANEWAY_API_KEY" if not self.api_key else (
                "check --api-key / LANEWAY_API_KEY")
            return OpsError(f"the server refused the API key ({message}); {hint}", status)
        return OpsError(f"{status} {code or 'error'}: {message}", status)


async def _sse_events(stream: aiohttp.StreamReader) -> AsyncIterator[ChatEvent]:
    """OpenAI chat.completion.chunk events, and laneway's `: queued position=N` comments."""
    finish: str | None = None
    async for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(": queued position="):
            yield ChatEvent("queued", int(line.rsplit("=", 1)[1] or 0))
            continue
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            yield ChatEvent("error", f"unreadable stream chunk: {payload[:80]!r}")
            return
        if "error" in chunk:
            yield ChatEvent("error", chunk["error"].get("message", "error"))
            return
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                yield ChatEvent("delta", delta["content"])
            if delta.get("tool_calls"):
                yield ChatEvent("tool_calls", delta["tool_calls"])
            finish = choice.get("finish_reason") or finish
    yield ChatEvent("finish", finish)


def _error_fields(data: bytes) -> tuple[str, str | None]:
    """(message, code) of an OpenAI-shaped error body; the raw text otherwise."""
    try:
        error = json.loads(data)["error"]
        return str(error.get("message")), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return data.decode("utf-8", "replace").strip()[:200] or "no details", None


def _seg(key: str) -> str:
    """A session key as one path segment: keys may hold '/', '?' or '#'."""
    return quote(key, safe="")


def _ref(agent: str | None, tenant: str | None) -> dict[str, str]:
    params = {}
    if agent:
        params["agent"] = agent
    if tenant:
        params["tenant"] = tenant
    return params
