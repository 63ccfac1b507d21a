"""The error tree. Every failure a client can see is one of these; `http/errors.py` is the
only place they become OpenAI-shaped responses.

    LanewayError (500 server_error)
    ├── BadRequest (400 invalid_request_error)
    │   ├── ContextTooLong (400 context_length_exceeded)
    │   └── PayloadTooLarge (400 request_too_large)
    ├── Unauthorized (401 invalid_api_key)
    ├── NotFound (404)
    │   └── ModelNotFound (404 model_not_found)
    ├── SessionBusy (409 session_busy)
    ├── QueueFull (429 queue_full)
    ├── QueueTimeout (429 queue_timeout)
    ├── RateLimited (429 rate_limit_exceeded)
    ├── TurnInterrupted (409 turn_interrupted)
    ├── UpstreamError (502 upstream_error)
    │   └── UpstreamTimeout (504 upstream_timeout)
    │       └── TurnTimeout (504 turn_timeout)
    └── Unavailable (503 service_unavailable)
"""

from __future__ import annotations


class LanewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(LanewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextTooLong(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(LanewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(LanewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(BadRequest):
    code = "request_too_large"


class SessionBusy(LanewayError):
    status = 409
    type = "invalid_request_error"
    code = "session_busy"


class TurnInterrupted(LanewayError):
    status = 409
    type = "invalid_request_error"
    code = "turn_interrupted"


class QueueFull(LanewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class QueueTimeout(LanewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_timeout"


class RateLimited(LanewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(LanewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class TurnTimeout(UpstreamTimeout):
    code = "turn_timeout"


class Unavailable(LanewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
