"""Invalid input is a clear OpenAI-shaped 400 that changes nothing, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import Gateway, StartGateway
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from openai_schema import validate_error
from scripted_upstream import ScriptedUpstream

from laneway.config import load as load_settings
from laneway.errors import LanewayError
from laneway.http.chat import parse_chat

USER = {"role": "user", "content": "hi"}

CASES: list[tuple[str, Any, str | None]] = [
    ("not json", b"{nope", None),
    ("array body", [1, 2], None),
    ("no model", {"messages": [USER]}, "model"),
    ("model not a string", {"model": 3, "messages": [USER]}, "model"),
    ("no messages", {"model": "default"}, "messages"),
    ("empty messages", {"model": "default", "messages": []}, "messages"),
    ("messages not a list", {"model": "default", "messages": "hi"}, "messages"),
    ("message not an object", {"model": "default", "messages": ["hi"]}, "messages[0]"),
    ("unknown role", {"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("missing role", {"model": "default", "messages": [{"content": "x"}]}, "messages[0].role"),
    ("empty content", {"model": "default", "messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ("blank content", {"model": "default", "messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    ("null content", {"model": "default", "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("content a number", {"model": "default", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("bad part", {"model": "default", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content"),
    ("tool without id", {"model": "default", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ("only a system message", {"model": "default", "messages": [{"role": "system", "content": "x"}]}, "messages"),
    ("ends with assistant", {"model": "default", "messages": [USER, {"role": "assistant", "content": "x"}]}, "messages"),
    ("stream not bool", {"model": "default", "messages": [USER], "stream": "yes"}, "stream"),
    ("temperature out of range", {"model": "default", "messages": [USER], "temperature": 9}, "temperature"),
    ("max_tokens not int", {"model": "default", "messages": [USER], "max_tokens": "10"}, "max_tokens"),
    ("max_tokens bool", {"model": "default", "messages": [USER], "max_tokens": True}, "max_tokens"),
    ("n two", {"model": "default", "messages": [USER], "n": 2}, "n"),
    ("tools not a list", {"model": "default", "messages": [USER], "tools": {}}, "tools"),
    ("tool without name", {"model": "default", "messages": [USER], "tools": [{"type": "function", "function": {}}]}, "tools[0]"),
    ("tool shadows builtin", {"model": "default", "messages": [USER], "tools": [{"type": "function", "function": {"name": "memory_save"}}]}, "tools[0]"),
    ("bad tool_choice", {"model": "default", "messages": [USER], "tool_choice": "sometimes"}, "tool_choice"),
    ("stream_options not object", {"model": "default", "messages": [USER], "stream": True, "stream_options": 1}, "stream_options"),
    ("stop too many", {"model": "default", "messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


async def _post(gateway: Gateway, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.base_url + "/chat/completions",
            data=data,
            headers={"content-type": "application/json", **(headers or {})},
        ) as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize("body, param", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_body_is_400_and_changes_nothing(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str, body: Any, param: str | None
) -> None:
    before = len(upstream.calls())
    status, error = await _post(gateway, body, {"x-laneway-session-key": conv})
    assert status == 400, error
    validate_error(error)
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param
    assert len(upstream.calls()) == before
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.base_url}/sessions/{conv}") as resp:
            assert resp.status == 404
    status, ok = await _post(gateway, {"model": "default", "messages": [{"role": "user", "content": f"[conv={conv}] still up"}]}, {"x-laneway-session-key": conv})
    assert status == 200 and ok["choices"][0]["message"]["content"].endswith("SEEN still up")


@pytest.mark.parametrize("key", ["has space", "a/b", "x" * 257, "tab\tkey"])
async def test_bad_session_key_is_400(gateway: Gateway, key: str) -> None:
    status, error = await _post(gateway, {"model": "default", "messages": [USER]}, {"x-laneway-session-key": key})
    assert status == 400 and error["error"]["param"] == "x-laneway-session-key"


@pytest.mark.parametrize("path", ["", "/turns", "/turns/turn_1"])
async def test_bad_session_key_in_a_path_is_400(gateway: Gateway, path: str) -> None:
    async with aiohttp.ClientSession() as http:
        for key in ("has%20space", "ctl%7F%06", "%C2%A5yen", "x" * 257):
            async with http.get(f"{gateway.base_url}/sessions/{key}{path}") as resp:
                body = await resp.json()
                assert resp.status == 400 and body["error"]["param"] == "key", (key, body)
                validate_error(body)


async def test_bad_lane_policy_is_400(gateway: Gateway) -> None:
    status, error = await _post(gateway, {"model": "default", "messages": [USER]}, {"x-laneway-lane-policy": "shove"})
    assert status == 400 and error["error"]["param"] == "x-laneway-lane-policy"


async def test_oversized_body_is_400(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, "--max-body-bytes", "2000")
    big = {"model": "default", "messages": [{"role": "user", "content": f"[conv={conv}] " + "x" * 3000}]}
    status, error = await _post(gateway, big)
    assert status == 400 and error["error"]["code"] == "request_too_large"
    validate_error(error)
    # chunked upload without a content-length is cut off too
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"x" * 500
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", data=chunks()) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "request_too_large"
    assert not upstream.calls(conv)
    status, _ = await _post(gateway, {"model": "default", "messages": [{"role": "user", "content": "small"}]})
    assert status == 200


async def test_wrong_method_is_openai_shaped(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.base_url + "/chat/completions") as resp:
            assert resp.status == 405
            validate_error(await resp.json())


# -- any JSON at all: a 4xx or a request, never a crash ------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]) | _json},
    optional={"content": _json | st.text(max_size=5), "tool_call_id": _json, "name": _json,
              "tool_calls": _json},
)
_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["default", "laneway/default"]) | _json,
     "messages": st.lists(_message, max_size=4) | _json},
    optional={k: _json for k in ("stream", "stream_options", "tools", "tool_choice", "temperature",
                                 "max_tokens", "stop", "n", "user", "response_format", "seed")},
)


@hsettings(max_examples=400, deadline=None)
@given(body=_body | _json, headers=st.dictionaries(
    st.sampled_from(["x-laneway-session-key", "x-openclaw-session-key", "x-laneway-lane-policy",
                     "x-laneway-session-override", "idempotency-key", "x-stainless-retry-count"]),
    st.text(max_size=6)))
def test_parse_chat_never_crashes(body: Any, headers: dict[str, str]) -> None:
    settings = load_settings({"data_dir": "/tmp/unused"})
    try:
        parse_chat(json.dumps(body).encode(), headers, settings, "default")
    except LanewayError as e:
        assert 400 <= e.status < 500
