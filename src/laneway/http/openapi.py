"""The OpenAPI 3.1 document of the gateway as implemented, served at /openapi.json.

Written by hand (no model classes on the hot path to derive it from) and kept honest by the
schemathesis run in the tests, which checks every response against it.
"""

from __future__ import annotations

from typing import Any

from laneway import __version__

Schema = dict[str, Any]

SESSION_KEY = r"^[!-.0-~]{1,256}$"  # printable ASCII without spaces or "/"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Schema]:
    reasons = {
        400: "Invalid input (malformed JSON, wrong types, unknown roles, too large)",
        401: "Missing or wrong API key",
        404: "Unknown model, session, turn or endpoint",
        409: "The session is busy (`reject`) or the turn was interrupted",
        429: "The lane's queue is full or the wait too long, or the tenant's rate limit",
        502: "The model failed",
        503: "The store or the lanes (PostgreSQL, Redis) are unreachable",
        504: "The model or the turn took too long",
    }
    retry = {"Retry-After": {"schema": {"type": "string"}},
             "x-should-retry": {"schema": {"type": "string", "enum": ["true", "false"]}}}
    return {
        str(status): {**_json(_ref("ErrorResponse"), reasons[status]),
                      **({"headers": retry} if status in (409, 429, 503) else {})}
        for status in statuses
    }


_TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_ANY_PART: Schema = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["text", "image_url", "input_audio", "file"]}},
}


def _content(part: Schema) -> Schema:
    return {"anyOf": [{"type": "string", "minLength": 1, "pattern": r"\S"},
                      {"type": "array", "minItems": 1, "items": part}]}


def _message(role: str, content: Schema, required: list[str], extra: Schema | None = None) -> Schema:
    return {
        "type": "object",
        "required": ["role", *required],
        "properties": {"role": {"const": role}, "content": content,
                       "name": _nullable({"type": "string"}), **(extra or {})},
    }


_TOOL_CALL: Schema = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}},
    },
}

SCHEMAS: dict[str, Schema] = {
    "ErrorResponse": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": _nullable({"type": "string"}),
                           "code": _nullable({"type": "string"})},
        }},
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1,
                      "description": "An agent: `default`, `laneway/NAME` or a configured name"},
            "messages": {"type": "array", "minItems": 1, "items": {"oneOf": [
                _message("system", _content(_TEXT_PART), ["content"]),
                _message("developer", _content(_TEXT_PART), ["content"]),
                _message("user", _content(_ANY_PART), ["content"]),
                _message("assistant", _nullable({"anyOf": [{"type": "string"},
                                                            {"type": "array"}]}), [],
                         {"tool_calls": _nullable({"type": "array", "items": _TOOL_CALL})}),
                _message("tool", _content(_TEXT_PART), ["content", "tool_call_id"],
                         {"tool_call_id": {"type": "string", "minLength": 1}}),
            ]}},
            "stream": _nullable({"type": "boolean"}),
            "stream_options": _nullable({"type": "object", "properties": {
                "include_usage": _nullable({"type": "boolean"})}}),
            "tools": _nullable({"type": "array", "items": {
                "type": "object", "required": ["type", "function"],
                "properties": {"type": {"const": "function"}, "function": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
                                   "description": _nullable({"type": "string"}),
                                   "parameters": _nullable({"type": "object"}),
                                   "strict": _nullable({"type": "boolean"})}}}}}),
            "tool_choice": _nullable({"anyOf": [
                {"enum": ["none", "auto", "required"]},
                {"type": "object", "required": ["type", "function"],
                 "properties": {"type": {"const": "function"},
                                "function": {"type": "object", "required": ["name"],
                                             "properties": {"name": {"type": "string"}}}}}]}),
            "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
            "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
            "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
            "max_tokens": _nullable({"type": "integer", "minimum": 1}),
            "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
            "n": _nullable({"const": 1}),
            "seed": _nullable({"type": "integer"}),
            "stop": _nullable({"anyOf": [{"type": "string"}, {
                "type": "array", "maxItems": 4, "items": {"type": "string"}}]}),
            "response_format": _nullable({"type": "object"}),
            "logit_bias": _nullable({"type": "object"}),
            "parallel_tool_calls": _nullable({"type": "boolean"}),
            "user": {**_nullable({"type": "string"}), "description": "Not a session key"},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"}, "logprobs": {"type": "null"},
                    "finish_reason": {"enum": ["stop", "length", "tool_calls",
                                               "content_filter", "function_call"]},
                    "message": {"type": "object", "required": ["role", "content", "refusal"],
                                "properties": {"role": {"const": "assistant"},
                                               "content": _nullable({"type": "string"}),
                                               "refusal": {"type": "null"},
                                               "tool_calls": {"type": "array",
                                                              "items": _TOOL_CALL}}},
                }}},
            "usage": _ref("Usage"),
        },
    },
    "ChatCompletionChunk": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "delta", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"}, "delta": {"type": "object"},
                    "logprobs": {"type": "null"},
                    "finish_reason": _nullable({"enum": ["stop", "length", "tool_calls",
                                                         "content_filter", "function_call"]}),
                }}},
            "usage": _nullable(_ref("Usage")),
        },
    },
    "StreamEvent": {
        "description": "One SSE event: a chunk, a final error, or [DONE]. Never id, event "
                       "(other than the default) or retry fields.",
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref("ChatCompletionChunk"),
                                             _ref("ErrorResponse")]}},
            ]},
        },
        "not": {"anyOf": [{"required": ["id"]}, {"required": ["retry"]}]},
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {k: {"type": "integer"} for k in
                       ("prompt_tokens", "completion_tokens", "total_tokens")},
    },
    "Model": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                       "created": {"type": "integer"}, "owned_by": {"type": "string"}},
    },
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
    "SessionSummary": {
        "type": "object",
        "required": ["key", "agent", "tenant", "status", "queue_depth", "turns"],
        "properties": {"key": {"type": "string"}, "agent": {"type": "string"},
                       "tenant": {"type": "string"}, "status": {"enum": ["idle", "running"]},
                       "queue_depth": {"type": "integer"}, "turns": {"type": "integer"},
                       "created_at": {"type": "number"}, "updated_at": {"type": "number"}},
    },
    "SessionList": {"type": "object", "required": ["object", "data", "next_cursor"],
                    "properties": {"object": {"const": "list"},
                                   "data": {"type": "array", "items": _ref("SessionSummary")},
                                   "next_cursor": _nullable({"type": "string"})}},
    "Session": {
        "type": "object",
        "required": ["object", "key", "agent", "tenant", "status", "queue_depth", "turns",
                     "messages", "memories"],
        "properties": {
            "object": {"const": "session"}, "key": {"type": "string"},
            "agent": {"type": "string"}, "tenant": {"type": "string"},
            "status": {"enum": ["idle", "running"]}, "queue_depth": {"type": "integer"},
            "turns": {"type": "integer"},
            "created_at": _nullable({"type": "number"}),
            "updated_at": _nullable({"type": "number"}),
            "messages": {"type": "array", "items": {
                "type": "object", "required": ["role"],
                "properties": {"role": {"type": "string"},
                               "interrupted": {"type": "boolean"}}}},
            "memories": {"type": "array", "items": {
                "type": "object", "required": ["id", "text", "pinned", "created_at"],
                "properties": {"id": {"type": "integer"}, "text": {"type": "string"},
                               "pinned": {"type": "boolean"}, "created_at": {"type": "number"}}}},
        },
    },
    "Turn": {
        "type": "object", "required": ["object", "id", "status"],
        "properties": {
            "object": {"const": "turn"}, "id": {"type": "string"},
            "status": {"enum": ["queued", "running", "completed", "awaiting_tools",
                                "interrupted", "failed", "abandoned"]},
            "response": _nullable(_ref("ChatCompletion")),
            "error": {"type": "object"},
            "queue_wait_ms": _nullable({"type": "number"}),
        },
    },
    "TurnList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _ref("Turn")}}},
    "LaneList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object",
            "required": ["session_key", "agent", "tenant", "running", "queue_depth"],
            "properties": {"session_key": {"type": "string"}, "agent": {"type": "string"},
                           "tenant": {"type": "string"}, "running": {"type": "boolean"},
                           "turn_id": _nullable({"type": "string"}),
                           "turn_age_s": {"type": "number"},
                           "queue_depth": {"type": "integer"},
                           "oldest_wait_s": {"type": "number"}}}}}},
}


def _header(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "header", "required": False, "schema": schema,
            "description": description}


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_KEY = {"name": "key", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": SESSION_KEY}}
_SESSION_SCOPE = [
    _query("agent", {"type": "string"}, "The session's agent (default `default`)"),
    _query("tenant", {"type": "string"}, "Admin keys only: another tenant's session"),
]
_CHAT_HEADERS = [
    _header("x-laneway-session-key", {"type": "string", "pattern": SESSION_KEY},
            "The session; without one the turn runs in a new session"),
    _header("x-openclaw-session-key", {"type": "string", "pattern": SESSION_KEY}, "Alias"),
    _header("x-laneway-lane-policy", {"enum": ["enqueue", "reject", "interrupt", "collect"]},
            "What to do when the session's lane is busy"),
    _header("x-laneway-session-override", {"const": "isolated"},
            "Run in an explicitly new session instead of the lane"),
    _header("Idempotency-Key", {"type": "string", "minLength": 1, "maxLength": 200},
            "A repeat returns the first request's result"),
]
_CHAT_RESPONSE_HEADERS = {
    name: {"schema": {"type": "string"}, "description": description}
    for name, description in (
        ("x-laneway-session-key", "The session the turn ran in"),
        ("x-laneway-turn-id", "The turn, for GET /v1/sessions/{key}/turns/{turn_id}"),
        ("x-laneway-queue-wait-ms", "Time spent waiting for the lane"),
        ("x-laneway-queue-position", "Position at arrival, for a request that waited"),
    )
}


def document() -> Schema:
    all_errors = _errors(400, 401, 404, 409, 429, 502, 503, 504)
    read = _errors(400, 401, 404, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "laneway", "version": __version__,
                 "description": "An OpenAI-compatible agent gateway with one lane per session."},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "parameters": _CHAT_HEADERS,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref("ChatCompletionRequest"),
                    "example": {"model": "default",
                                "messages": [{"role": "user", "content": "Hello!"}]},
                }}},
                "responses": {
                    "200": {"description": "The reply (JSON, or SSE when `stream` is true)",
                            "headers": _CHAT_RESPONSE_HEADERS,
                            "content": {"application/json": {"schema": _ref("ChatCompletion")},
                                        "text/event-stream": {"schema": _ref("StreamEvent")}}},
                    **all_errors,
                },
            }},
            "/v1/models": {"get": {"operationId": "listModels", "responses": {
                "200": _json(_ref("ModelList"), "The agents"), **_errors(401)}}},
            "/v1/models/{model}": {"get": {
                "operationId": "getModel",
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json(_ref("Model"), "An agent"), **_errors(401, 404)}}},
            "/v1/sessions": {"get": {
                "operationId": "listSessions",
                "parameters": [
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
                    _query("cursor", {"type": "string"}),
                    _query("agent", {"type": "string"}),
                    _query("busy", {"type": "boolean"}),
                    _query("tenant", {"type": "string"}, "Admin keys only"),
                ],
                "responses": {"200": _json(_ref("SessionList"), "A page of sessions"), **read},
            }},
            "/v1/sessions/{key}": {
                "get": {"operationId": "getSession",
                        "parameters": [_KEY, *_SESSION_SCOPE,
                                       _query("limit", {"type": "integer", "minimum": 1,
                                                        "maximum": 100000})],
                        "responses": {"200": _json(_ref("Session"), "The session"), **read}},
                "delete": {"operationId": "deleteSession",
                           "parameters": [_KEY, *_SESSION_SCOPE],
                           "responses": {"200": _json({"type": "object", "required": ["deleted"]},
                                                      "Deleted"), **_errors(400, 401, 404, 429, 503)}},
            },
            "/v1/sessions/{key}/turns": {"get": {
                "operationId": "listTurns",
                "parameters": [_KEY, *_SESSION_SCOPE,
                               _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})],
                "responses": {"200": _json(_ref("TurnList"), "The session's turns"), **read}}},
            "/v1/sessions/{key}/turns/{turn_id}": {"get": {
                "operationId": "getTurn",
                "parameters": [_KEY, {"name": "turn_id", "in": "path", "required": True,
                                      "schema": {"type": "string"}},
                               *_SESSION_SCOPE,
                               _query("wait", {"type": "number", "minimum": 0, "maximum": 60},
                                      "Seconds to wait for the turn to end")],
                "responses": {"200": _json(_ref("Turn"), "The turn"), **read}}},
            "/v1/lanes": {"get": {"operationId": "listLanes", "responses": {
                "200": _json(_ref("LaneList"), "Busy lanes"), **_errors(401, 503)}}},
            "/healthz": {"get": {"operationId": "health", "security": [{}], "responses": {
                "200": _json({"type": "object", "required": ["status"]}, "Serving"),
                **_errors(503)}}},
            "/metrics": {"get": {"operationId": "metrics", "security": [{}], "responses": {
                "200": {"description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "security": [{}], "responses": {
                "200": _json({"type": "object"}, "This document")}}},
        },
    }
