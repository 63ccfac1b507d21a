"""Validate a chat completion request with plain dict checks (no model trees on the hot path)
and reduce it to what the turn needs: the request's instructions and its *new* input.

The server's transcript is authoritative: of the client's messages only the system ones
(extra instructions for this turn) and those after the last assistant message count, so a
client that resends the whole history gets nothing duplicated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from laneway.agent.loop import TurnInput
from laneway.agent.tools import BUILTIN_NAMES
from laneway.config import Settings
from laneway.errors import BadRequest, ModelNotFound
from laneway.service import ChatRequest, fingerprint

SESSION_HEADERS = ("x-laneway-session-key", "x-openclaw-session-key")
_SESSION_KEY = re.compile(r"[\x21-\x2e\x30-\x7e]{1,256}")  # printable ASCII but "/"
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file"})
_POLICIES = frozenset({"enqueue", "reject", "interrupt", "collect"})
#: Passed to the model as given, after a type check: (types, low, high).
_NUMBERS: dict[str, tuple[tuple[type[int | float], ...], float, float]] = {
    "temperature": ((int, float), 0, 2),
    "top_p": ((int, float), 0, 1),
    "presence_penalty": ((int, float), -2, 2),
    "frequency_penalty": ((int, float), -2, 2),
    "max_tokens": ((int,), 1, 1 << 20),
    "max_completion_tokens": ((int,), 1, 1 << 20),
    "seed": ((int,), -(1 << 63), (1 << 63) - 1),
}
_PASSTHROUGH_OBJECTS = ("response_format", "logit_bias")


def parse_chat(
    body: bytes, headers: Mapping[str, str], settings: Settings, tenant: str
) -> ChatRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` must be a non-empty string", param="model")
    agent = settings.agent(model)
    if agent is None:
        raise ModelNotFound(f"the model {model!r} does not exist", param="model")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty array", param="messages")
    systems, new_input = _split(messages)
    _check_limits(data, messages, settings)
    tools = _tools(data.get("tools"))
    retries = headers.get("x-stainless-retry-count")
    return ChatRequest(
        agent=agent,
        model=model,
        tenant=tenant,
        session_key=_session_key(headers),
        turn=TurnInput(
            systems=systems,
            new_input=new_input,
            client_tools=tools,
            tool_choice=_tool_choice(data.get("tool_choice"), tools),
            params=_params(data),
        ),
        stream=_bool(data, "stream"),
        include_usage=_include_usage(data),
        idempotency_key=_idempotency_key(headers),
        policy=_policy(headers, agent.lane_policy),
        fingerprint=fingerprint(body) if retries is not None else None,
        is_retry=retries not in (None, "0"),
    )


def _check_limits(data: dict[str, Any], messages: list[Any], settings: Settings) -> None:
    if len(messages) > settings.max_messages:
        raise BadRequest(f"at most {settings.max_messages} messages per request",
                         param="messages", code="too_many_messages")
    for i, message in enumerate(messages):
        if _size(message.get("content")) > settings.max_message_chars:
            raise BadRequest(f"messages[{i}] is over {settings.max_message_chars} characters",
                             param=f"messages[{i}].content", code="message_too_large")
    tools = data.get("tools")
    if isinstance(tools, list):
        if len(tools) > settings.max_tools:
            raise BadRequest(f"at most {settings.max_tools} tools per request", param="tools",
                             code="too_many_tools")
        if len(orjson.dumps(tools)) > settings.max_tools_bytes:
            raise BadRequest(f"the tool definitions are over {settings.max_tools_bytes} bytes",
                             param="tools", code="tools_too_large")
    for name in ("max_tokens", "max_completion_tokens"):
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > settings.max_tokens_cap:
            raise BadRequest(f"`{name}` is capped at {settings.max_tokens_cap}", param=name,
                             code="max_tokens_too_large")


def _size(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(orjson.dumps(part)) for part in content)
    return 0


def _split(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    systems: list[str] = []
    last_assistant = -1
    for i, message in enumerate(messages):
        _check_message(message, i)
        role = message["role"]
        if role in ("system", "developer"):
            systems.append(_text(message["content"]))
        elif role == "assistant":
            last_assistant = i
    new_input = [
        _clean(m)
        for m in messages[last_assistant + 1 :]
        if m["role"] not in ("system", "developer")
    ]
    if not new_input:
        raise BadRequest(
            "no new input: `messages` must have a user or tool message after the last "
            "assistant message",
            param="messages",
        )
    return systems, new_input


def _check_message(message: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise BadRequest(
            f"{where}.role must be one of {', '.join(sorted(_ROLES))}", param=f"{where}.role"
        )
    content = message.get("content")
    if role == "assistant":
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(f"{where}.content must be a string or an array", param=where)
        _check_tool_calls(message.get("tool_calls"), f"{where}.tool_calls")
        return
    _check_content(content, f"{where}.content", text_only=role != "user")
    if role == "tool" and not (
        isinstance(message.get("tool_call_id"), str) and message["tool_call_id"]
    ):
        raise BadRequest(f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"{where}.name must be a string", param=f"{where}.name")


def _check_tool_calls(calls: Any, where: str) -> None:
    """The client's copy of earlier tool calls is not used, but must be well-formed."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise BadRequest(f"{where} must be an array", param=where)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict)
            and isinstance(call.get("id"), str)
            and call.get("type") == "function"
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
        ):
            raise BadRequest(f"{where}[{j}] must be a function call with id, name and arguments",
                             param=where)


def _check_content(content: Any, where: str, *, text_only: bool) -> None:
    if isinstance(content, str):
        if not content.strip():
            raise BadRequest(f"{where} must not be empty", param=where)
        return
    if not isinstance(content, list) or not content:
        raise BadRequest(f"{where} must be a non-empty string or array of parts", param=where)
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind if isinstance(kind, str) else None
        allowed = ("text",) if text_only else _PART_TYPES
        if kind not in allowed:
            raise BadRequest(f"{where}[{j}].type must be one of {', '.join(allowed)}", param=where)
        if kind == "text" and not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}[{j}].text must be a string", param=where)


def _clean(message: dict[str, Any]) -> dict[str, Any]:
    """Only the fields the transcript keeps."""
    kept = {"role": message["role"], "content": message["content"]}
    if message["role"] == "tool":
        kept["tool_call_id"] = message["tool_call_id"]
    elif message.get("name"):
        kept["name"] = message["name"]
    return kept


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("`tools` must be an array", param="tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or tool.get("type") != "function":
            raise BadRequest(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                param=f"tools[{i}]",
            )
        if not _TOOL_NAME.fullmatch(name):
            raise BadRequest(f"tools[{i}].function.name is invalid", param=f"tools[{i}]")
        if name in BUILTIN_NAMES:
            raise BadRequest(f"tools[{i}]: {name!r} is a built-in tool", param=f"tools[{i}]")
        if name in seen:
            raise BadRequest(f"tools[{i}]: {name!r} is defined twice", param=f"tools[{i}]")
        for field_, kind in (("parameters", dict), ("description", str), ("strict", bool)):
            value = function.get(field_)  # type: ignore[union-attr]
            if value is not None and not isinstance(value, kind):
                raise BadRequest(f"tools[{i}].function.{field_} has the wrong type",
                                 param=f"tools[{i}]")
        seen.add(name)
    return tools or None


def _tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> Any:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tools and any(t["function"]["name"] == name for t in tools):
            return choice
    raise BadRequest("`tool_choice` must be none, auto, required or a tool of `tools`",
                     param="tool_choice")


def _params(data: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, (types, low, high) in _NUMBERS.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types) or not low <= value <= high:
            raise BadRequest(f"`{name}` must be a number from {low:g} to {high:g}", param=name)
        params[name] = value
    stop = data.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise BadRequest("`stop` must be a string or up to 4 strings", param="stop")
        params["stop"] = stop
    for name in _PASSTHROUGH_OBJECTS:
        value = data.get(name)
        if value is not None:
            if not isinstance(value, dict):
                raise BadRequest(f"`{name}` must be an object", param=name)
            params[name] = value
    if data.get("parallel_tool_calls") is not None:
        params["parallel_tool_calls"] = _bool(data, "parallel_tool_calls")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("`user` must be a string", param="user")
    n = data.get("n")
    if n is not None and n != 1:
        raise BadRequest("`n` must be 1: a session has one reply per turn", param="n")
    return params


def _bool(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be a boolean", param=name)
    return value


def _include_usage(data: dict[str, Any]) -> bool:
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object", param="stream_options")
    return _bool(options, "include_usage")


def check_session_key(key: str, param: str) -> str:
    """A session key as a header or a path gives it: 400 unless well-formed."""
    if not _SESSION_KEY.fullmatch(key):
        raise BadRequest(f"{param} must be 1-256 printable ASCII characters, no spaces or '/'",
                         param=param)
    return key


def _session_key(headers: Mapping[str, str]) -> str | None:
    """The session key; every session header given must be well-formed, and the alias
    may not name another session than the main header."""
    keys = []
    for name in SESSION_HEADERS:
        key = headers.get(name)
        if key is not None:
            keys.append(check_session_key(key, name))
    if len(set(keys)) > 1:
        raise BadRequest(f"{SESSION_HEADERS[0]} and {SESSION_HEADERS[1]} name different sessions",
                         param=SESSION_HEADERS[1])
    override = headers.get("x-laneway-session-override")
    if override is not None:
        if override != "isolated":
            raise BadRequest(
                "x-laneway-session-override must be 'isolated'",
                param="x-laneway-session-override",
            )
        return None  # an explicitly new, separate session: the one way around a busy lane
    return keys[0] if keys else None


def _idempotency_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 200:
        raise BadRequest("Idempotency-Key must be 1-200 characters", param="idempotency-key")
    return key


def _policy(headers: Mapping[str, str], default: str) -> str:
    policy = headers.get("x-laneway-lane-policy", default)
    if policy not in _POLICIES:
        raise BadRequest(
            f"x-laneway-lane-policy must be one of {', '.join(sorted(_POLICIES))}",
            param="x-laneway-lane-policy",
        )
    return policy
