"""OpenAI wire-format schemas for the gateway's end-to-end tests.

Hand transcription (Draft 2020-12 JSON Schema, as Python dicts) of part of OpenAI's
published OpenAPI document, github.com/openai/openai-openapi, file ``openapi.json``,
branch ``main`` at commit f85dbe223d40e1a31cba812ab2d755c7e98a92a3 (openapi 3.1.0,
``info.version`` 2.3.0). The document itself is not vendored.

Components transcribed (``#/components/schemas/...``):
    CreateChatCompletionResponse, ChatCompletionResponseMessage,
    ChatCompletionMessageToolCalls, ChatCompletionMessageToolCall,
    ChatCompletionMessageCustomToolCall, ChatCompletionTokenLogprob, CompletionUsage,
    CreateChatCompletionStreamResponse, ChatCompletionStreamResponseDelta,
    ChatCompletionMessageToolCallChunk, ServiceTier, Metadata, ErrorResponse, Error,
    ListModelsResponse, Model.

Transcription rules, for whoever re-checks this against a newer spec:
* every ``required`` list, type and enum is copied as-is; ``additionalProperties`` is
  left open, as it is in the spec;
* OpenAPI 3.0 ``nullable: true`` and ``anyOf: [X, {type: null}]`` both become
  ``type: [X, "null"]`` (with ``None`` added to any enum); this is equivalent and gives
  clearer error messages;
* the ``discriminator`` on tool calls (``oneOf`` function | custom) is written as
  ``if``/``then`` on ``type``;
* ``ChatCompletionModeration`` is only checked as ``object | null`` with
  ``required: [input, output]``; its result sub-schemas are not transcribed;
* ``Model`` has no ``type`` in the spec; ``type: object`` is added;
* ``format`` keywords (``unixtime``, ``uri``, ``date``) are not asserted.
"""

from __future__ import annotations

from typing import Any, Final

from jsonschema import Draft202012Validator, ValidationError

__all__ = ["validate_chunk", "validate_completion", "validate_error", "validate_models"]

Schema = dict[str, Any]

STR: Final[Schema] = {"type": "string"}
INT: Final[Schema] = {"type": "integer"}
NUM: Final[Schema] = {"type": "number"}


def _obj(required: tuple[str, ...] = (), **props: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": props}


def _nullable(schema: Schema) -> Schema:
    out = dict(schema, type=[schema["type"], "null"])
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


# --- shared --------------------------------------------------------------------------

FINISH_REASON: Final = _enum("stop", "length", "tool_calls", "content_filter", "function_call")
SERVICE_TIER: Final = _nullable(_enum("auto", "default", "flex", "scale", "priority", "fast"))
METADATA: Final[Schema] = {"type": ["object", "null"], "additionalProperties": STR}
MODERATION: Final[Schema] = {"type": ["object", "null"], "required": ["input", "output"]}

_BYTES: Final = _nullable(_array(INT))
TOKEN_LOGPROB: Final = _obj(
    ("token", "logprob", "bytes", "top_logprobs"),
    token=STR,
    logprob=NUM,
    bytes=_BYTES,
    top_logprobs=_array(_obj(("token", "logprob", "bytes"), token=STR, logprob=NUM, bytes=_BYTES)),
)
# choices[].logprobs: required in CreateChatCompletionResponse, optional in the stream.
CHOICE_LOGPROBS: Final = _nullable(
    _obj(
        ("content", "refusal"),
        content=_nullable(_array(TOKEN_LOGPROB)),
        refusal=_nullable(_array(TOKEN_LOGPROB)),
    )
)

COMPLETION_USAGE: Final = _obj(
    ("prompt_tokens", "completion_tokens", "total_tokens"),
    completion_tokens=INT,
    prompt_tokens=INT,
    total_tokens=INT,
    completion_tokens_details=_obj(
        accepted_prediction_tokens=INT,
        audio_tokens=INT,
        reasoning_tokens=INT,
        text_tokens=INT,
        rejected_prediction_tokens=INT,
    ),
    prompt_tokens_details=_obj(
        audio_tokens=INT,
        cached_tokens=INT,
        text_tokens=INT,
        image_tokens=INT,
        cache_write_tokens=INT,
    ),
)

# --- CreateChatCompletionResponse ----------------------------------------------------

FUNCTION_TOOL_CALL: Final = _obj(
    ("id", "type", "function"),
    id=STR,
    type=_enum("function"),
    function=_obj(("name", "arguments"), name=STR, arguments=STR),
)
CUSTOM_TOOL_CALL: Final = _obj(
    ("id", "type", "custom"),
    id=STR,
    type=_enum("custom"),
    custom=_obj(("name", "input"), name=STR, input=STR),
)
TOOL_CALLS: Final = _array(
    {
        **_obj(("type",), type=_enum("function", "custom")),
        "allOf": [
            {"if": {"properties": {"type": {"const": kind}}}, "then": schema}
            for kind, schema in (("function", FUNCTION_TOOL_CALL), ("custom", CUSTOM_TOOL_CALL))
        ],
    }
)

RESPONSE_MESSAGE: Final = _obj(
    ("role", "content", "refusal"),
    content=_nullable(STR),
    refusal=_nullable(STR),
    tool_calls=TOOL_CALLS,
    annotations=_array(
        _obj(
            ("type", "url_citation"),
            type=_enum("url_citation"),
            url_citation=_obj(
                ("end_index", "start_index", "url", "title"),
                end_index=INT,
                start_index=INT,
                url=STR,
                title=STR,
            ),
        )
    ),
    role=_enum("assistant"),
    function_call=_obj(("name", "arguments"), arguments=STR, name=STR),
    audio=_nullable(
        _obj(
            ("id", "expires_at", "data", "transcript"),
            id=STR,
            expires_at=INT,
            data=STR,
            transcript=STR,
        )
    ),
)

_TOP_LEVEL: Final = ("choices", "created", "id", "model", "object")

CHAT_COMPLETION: Final = _obj(
    _TOP_LEVEL,
    id=STR,
    choices=_array(
        _obj(
            ("finish_reason", "index", "message", "logprobs"),
            finish_reason=FINISH_REASON,
            index=INT,
            message=RESPONSE_MESSAGE,
            logprobs=CHOICE_LOGPROBS,
        )
    ),
    created=INT,
    model=STR,
    metadata=METADATA,
    service_tier=SERVICE_TIER,
    system_fingerprint=STR,
    object=_enum("chat.completion"),
    usage=COMPLETION_USAGE,
    moderation=MODERATION,
)

# --- CreateChatCompletionStreamResponse ----------------------------------------------

TOOL_CALL_CHUNK: Final = _obj(
    ("index",),
    index=INT,
    id=STR,
    type=_enum("function"),
    function=_obj(name=STR, arguments=STR),
)

STREAM_DELTA: Final = _obj(
    content=_nullable(STR),
    function_call=_obj(arguments=STR, name=STR),
    tool_calls=_array(TOOL_CALL_CHUNK),
    role=_enum("developer", "system", "user", "assistant", "tool"),
    refusal=_nullable(STR),
)

# `choices` may be [] on the final chunk under stream_options.include_usage; `usage` is
# optional and null on every chunk except that last one (the spec does not tie the two).
CHAT_COMPLETION_CHUNK: Final = _obj(
    _TOP_LEVEL,
    id=STR,
    choices=_array(
        _obj(
            ("delta", "finish_reason", "index"),
            delta=STREAM_DELTA,
            logprobs=CHOICE_LOGPROBS,
            finish_reason=_nullable(FINISH_REASON),
            index=INT,
        )
    ),
    created=INT,
    model=STR,
    obfuscation=STR,
    service_tier=SERVICE_TIER,
    system_fingerprint=STR,
    object=_enum("chat.completion.chunk"),
    usage=_nullable(COMPLETION_USAGE),
    moderation=MODERATION,
)

# --- ErrorResponse, ListModelsResponse -----------------------------------------------

ERROR_RESPONSE: Final = _obj(
    ("error",),
    error=_obj(
        ("type", "message", "param", "code"),
        code=_nullable(STR),
        message=STR,
        param=_nullable(STR),
        type=STR,
    ),
)

MODEL: Final = _obj(
    ("id", "object", "created", "owned_by"),
    id=STR,
    created=INT,
    object=_enum("model"),
    owned_by=STR,
    shutdown_date=_nullable(STR),
)
LIST_MODELS_RESPONSE: Final = _obj(("object", "data"), object=_enum("list"), data=_array(MODEL))

# --- validators ----------------------------------------------------------------------


def _validator(schema: Schema) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


_COMPLETION: Final = _validator(CHAT_COMPLETION)
_CHUNK: Final = _validator(CHAT_COMPLETION_CHUNK)
_ERROR: Final = _validator(ERROR_RESPONSE)
_MODELS: Final = _validator(LIST_MODELS_RESPONSE)


def _validate(validator: Draft202012Validator, instance: object, what: str) -> None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path)))
    if errors:
        lines = "\n".join(f"  {e.json_path}: {e.message}" for e in errors)
        raise ValidationError(f"not a valid {what}:\n{lines}", path=errors[0].path) from errors[0]


def validate_completion(body: dict[str, Any]) -> None:
    """Validate a ``/v1/chat/completions`` response body (CreateChatCompletionResponse)."""
    _validate(_COMPLETION, body, "CreateChatCompletionResponse")


def validate_chunk(chunk: dict[str, Any]) -> None:
    """Validate one decoded SSE ``data:`` chunk (CreateChatCompletionStreamResponse)."""
    _validate(_CHUNK, chunk, "CreateChatCompletionStreamResponse")


def validate_error(body: dict[str, Any]) -> None:
    """Validate an error response body (ErrorResponse)."""
    _validate(_ERROR, body, "ErrorResponse")


def validate_models(body: dict[str, Any]) -> None:
    """Validate a ``/v1/models`` response body (ListModelsResponse)."""
    _validate(_MODELS, body, "ListModelsResponse")
