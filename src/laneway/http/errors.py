"""The only place errors become OpenAI-shaped responses."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from laneway.errors import (
    LanewayError,
    NotFound,
    QueueTimeout,
    SessionBusy,
    TurnInterrupted,
)

logger = logging.getLogger(__name__)

#: Errors a retry cannot fix: the official SDKs honour `x-should-retry: false`.
_NO_RETRY = (SessionBusy, TurnInterrupted, QueueTimeout)


def error_headers(error: LanewayError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after)))
    if isinstance(error, _NO_RETRY):
        headers["x-should-retry"] = "false"
    return headers


def error_response(error: LanewayError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(error.body()),
        status_code=error.status,
        headers={**error_headers(error), **(headers or {})},
        media_type="application/json",
    )


async def laneway_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LanewayError)
    return error_response(exc)


async def http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound("no such endpoint"))
    error = LanewayError(str(exc.detail), code="method_not_allowed")
    error.status = exc.status_code
    error.type = "invalid_request_error"
    return error_response(error, dict(exc.headers or {}))


async def unexpected_error(_request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(LanewayError("internal error"))
