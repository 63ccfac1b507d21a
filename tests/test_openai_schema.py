"""Self-test of the transcribed OpenAI schemas in ``openai_schema``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import ValidationError
from openai_schema import validate_chunk, validate_completion, validate_error, validate_models

Body = dict[str, Any]

USAGE: Body = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

COMPLETION: Body = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}

TOOL_COMPLETION: Body = copy.deepcopy(COMPLETION)
TOOL_COMPLETION["choices"][0] |= {
    "finish_reason": "tool_calls",
    "message": {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    },
}

_CHUNK_BASE: Body = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "m",
}
CONTENT_CHUNK: Body = _CHUNK_BASE | {
    "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}
    ],
    "usage": None,
}
TOOL_CHUNK: Body = _CHUNK_BASE | {
    "choices": [
        {
            "index": 0,
            "delta": {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}},
                    {"index": 0, "function": {"arguments": '{"a":'}},
                ]
            },
            "logprobs": None,
            "finish_reason": None,
        }
    ],
}
FINAL_CHUNK: Body = _CHUNK_BASE | {
    "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]
}
USAGE_CHUNK: Body = _CHUNK_BASE | {"choices": [], "usage": USAGE}

ERROR: Body = {
    "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}
}
MODELS: Body = {
    "object": "list",
    "data": [{"id": "m", "object": "model", "created": 1700000000, "owned_by": "laneway"}],
}


def _with(body: Body, path: str, value: Any = ..., *, drop: bool = False) -> Body:
    """Copy of ``body`` with the dotted ``path`` set to ``value`` (or removed)."""
    out = copy.deepcopy(body)
    *parents, last = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if drop:
        del node[last]
    else:
        node[last] = value
    return out


Validator = Callable[[Body], None]

VALID: list[tuple[Validator, Body]] = [
    (validate_completion, COMPLETION),
    (validate_completion, TOOL_COMPLETION),
    (validate_completion, _with(COMPLETION, "usage", drop=True)),
    (validate_completion, _with(COMPLETION, "choices.0.message.refusal", "no")),
    (validate_completion, _with(COMPLETION, "extra_field", 1)),
    (
        validate_completion,
        _with(COMPLETION, "choices.0.logprobs", {"content": None, "refusal": None}),
    ),
    (validate_chunk, CONTENT_CHUNK),
    (validate_chunk, TOOL_CHUNK),
    (validate_chunk, FINAL_CHUNK),
    (validate_chunk, USAGE_CHUNK),
    (validate_error, ERROR),
    (validate_error, _with(ERROR, "error.code", "model_not_found")),
    (validate_models, MODELS),
    (validate_models, {"object": "list", "data": []}),
]

INVALID: list[tuple[Validator, Body, str]] = [
    (validate_completion, _with(COMPLETION, "choices.0.logprobs", drop=True), "logprobs"),
    (validate_completion, _with(COMPLETION, "choices.0.message.refusal", drop=True), "refusal"),
    (validate_completion, _with(COMPLETION, "choices.0.message.content", drop=True), "content"),
    (validate_completion, _with(COMPLETION, "choices.0.finish_reason", None), "finish_reason"),
    (validate_completion, _with(COMPLETION, "choices.0.finish_reason", "eos"), "finish_reason"),
    (validate_completion, _with(COMPLETION, "object", "chat.completion.chunk"), "object"),
    (validate_completion, _with(COMPLETION, "created", "now"), "created"),
    (validate_completion, _with(COMPLETION, "usage.total_tokens", drop=True), "total_tokens"),
    (validate_completion, _with(COMPLETION, "system_fingerprint", None), "system_fingerprint"),
    (
        validate_completion,
        _with(TOOL_COMPLETION, "choices.0.message.tool_calls.0.function.arguments", {}),
        "arguments",
    ),
    (
        validate_completion,
        _with(TOOL_COMPLETION, "choices.0.message.tool_calls.0.id", drop=True),
        "id",
    ),
    (validate_chunk, _with(CONTENT_CHUNK, "choices.0.finish_reason", drop=True), "finish_reason"),
    (validate_chunk, _with(CONTENT_CHUNK, "object", "chat.completion"), "object"),
    (validate_chunk, _with(CONTENT_CHUNK, "choices.0.delta.role", "bot"), "role"),
    (validate_chunk, _with(TOOL_CHUNK, "choices.0.delta.tool_calls.1.index", drop=True), "index"),
    (validate_chunk, _with(USAGE_CHUNK, "usage", {"prompt_tokens": 1}), "completion_tokens"),
    (validate_chunk, _with(USAGE_CHUNK, "choices", None), "choices"),
    (validate_error, _with(ERROR, "error.param", drop=True), "param"),
    (validate_error, _with(ERROR, "error.code", 404), "code"),
    (validate_error, {"message": "bad"}, "error"),
    (validate_models, _with(MODELS, "data.0.owned_by", drop=True), "owned_by"),
    (validate_models, _with(MODELS, "object", "models"), "object"),
]


@pytest.mark.parametrize(("validate", "body"), VALID)
def test_valid(validate: Validator, body: Body) -> None:
    validate(body)


@pytest.mark.parametrize(("validate", "body", "needle"), INVALID)
def test_invalid(validate: Validator, body: Body, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        validate(body)


def test_message_is_readable() -> None:
    with pytest.raises(ValidationError) as info:
        validate_completion(_with(COMPLETION, "choices.0.logprobs", drop=True))
    assert str(info.value) == (
        "not a valid CreateChatCompletionResponse:\n"
        "  $.choices[0]: 'logprobs' is a required property"
    )
