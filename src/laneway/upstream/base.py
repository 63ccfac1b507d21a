"""The seam between the agent loop and a model: any OpenAI-compatible Chat Completions API.

Both methods take a request body in OpenAI's shape (without `stream`) and raise only
`UpstreamError` / `UpstreamTimeout`, so the agent loop never sees transport details.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol


class Upstream(Protocol):
    #: Whether the model can be offered tools (function calling).
    supports_tools: bool
    #: What the model calls itself, sent as `model` upstream.
    model: str
    #: Whether `messages` may hold pre-encoded JSON (`orjson.Fragment`) besides dicts.
    takes_encoded: bool

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion; returns the response body."""

    def stream(self, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """One streamed chat completion; yields the parsed chunks until `[DONE]`, those that
        arrived together in one list (one step of the consumer per network read, not per
        chunk)."""

    async def close(self) -> None: ...
