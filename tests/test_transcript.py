"""The server's transcript is authoritative: history resends, client tool round trips,
abandoned tool calls, upstream failures and the context budget."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import Gateway, StartGateway
from openai import AsyncOpenAI
from openai_schema import validate_chunk, validate_completion
from scripted_upstream import ScriptedUpstream

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _h(key: str) -> dict[str, str]:
    return {"x-laneway-session-key": key}


async def _session(gateway: Gateway, key: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.base_url}/sessions/{key}") as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]


def _model_view(call_messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], str(m.get("content"))) for m in call_messages if m["role"] != "system"]


async def test_full_history_resend_is_not_duplicated(
    client: AsyncOpenAI, upstream: ScriptedUpstream, conv: str
) -> None:
    other = conv + "x"
    history: list[dict[str, Any]] = []
    for i in range(3):
        history.append({"role": "user", "content": f"[conv={conv}] q{i}"})
        full = await client.chat.completions.create(
            model="default", messages=history, extra_headers=_h(conv)  # type: ignore[arg-type]
        )
        history.append({"role": "assistant", "content": full.choices[0].message.content})
        only_new = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": f"[conv={other}] q{i}"}],
            extra_headers=_h(other),
        )
        assert full.choices[0].message.content == only_new.choices[0].message.content.replace(
            other, conv
        )
    assert full.choices[0].message.content.endswith("SEEN q0 | q1 | q2")
    resent = _model_view(upstream.calls(conv)[-1].messages)
    fresh = _model_view(upstream.calls(other)[-1].messages)
    assert resent == [(r, c.replace(other, conv)) for r, c in fresh]


async def test_request_system_messages_are_instructions(
    client: AsyncOpenAI, upstream: ScriptedUpstream, conv: str
) -> None:
    await client.chat.completions.create(
        model="default",
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": f"[conv={conv}] hello"},
        ],
        extra_headers=_h(conv),
    )
    sent = upstream.calls(conv)[-1].messages
    assert sent[0]["role"] == "system" and "Answer in French." in sent[0]["content"]
    assert [m["role"] for m in sent[1:]] == ["user"]


@pytest.mark.parametrize("stream", [False, True])
async def test_client_tool_round_trip(
    client: AsyncOpenAI, upstream: ScriptedUpstream, gateway: Gateway, conv: str, stream: bool
) -> None:
    ask = {"role": "user", "content": f'[conv={conv}] [call=get_weather {{"city": "Oslo"}}] weather?'}
    if stream:
        chunks = await client.chat.completions.create(
            model="default", messages=[ask], tools=[WEATHER], extra_headers=_h(conv), stream=True  # type: ignore[list-item]
        )
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        async for chunk in chunks:
            validate_chunk(chunk.model_dump(exclude_unset=True))
            for c in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
                slot = calls.setdefault(c.index, {"id": c.id, "name": "", "arguments": ""})
                slot["name"] += c.function.name or ""
                slot["arguments"] += c.function.arguments or ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls"
        call_id, name, arguments = calls[0]["id"], calls[0]["name"], calls[0]["arguments"]
    else:
        first = await client.chat.completions.create(
            model="default", messages=[ask], tools=[WEATHER], extra_headers=_h(conv)  # type: ignore[list-item]
        )
        assert first.choices[0].finish_reason == "tool_calls"
        tool_call = first.choices[0].message.tool_calls[0]
        call_id, name, arguments = tool_call.id, tool_call.function.name, tool_call.function.arguments
    assert name == "get_weather" and orjson.loads(arguments) == {"city": "Oslo"}
    assert (await _session(gateway, conv))["turns"] == 1
    second = await client.chat.completions.create(
        model="default",
        messages=[{"role": "tool", "tool_call_id": call_id, "content": "sunny, 21C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        extra_headers=_h(conv),
    )
    assert second.choices[0].message.content.endswith(":: TOOLS sunny, 21C")
    roles = [m["role"] for m in (await _session(gateway, conv))["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]


async def test_abandoned_client_tool_call_gets_a_result(
    client: AsyncOpenAI, upstream: ScriptedUpstream, gateway: Gateway, conv: str
) -> None:
    await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f'[conv={conv}] [call=get_weather {{"city": "Rome"}}] w?'}],
        tools=[WEATHER],  # type: ignore[list-item]
        extra_headers=_h(conv),
    )
    reply = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] never mind"}],
        extra_headers=_h(conv),
    )
    assert reply.choices[0].message.content.startswith("ECHO never mind")
    messages = (await _session(gateway, conv))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user", "assistant"]
    assert "did not return a result" in messages[2]["content"]


async def test_tool_result_for_unknown_call_is_400(client: AsyncOpenAI, gateway: Gateway, conv: str) -> None:
    await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"[conv={conv}] hi"}], extra_headers=_h(conv)
    )
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="default",
            messages=[{"role": "tool", "tool_call_id": "call_nope", "content": "x"}],
            extra_headers=_h(conv),
        )
    assert (await _session(gateway, conv))["turns"] == 1


async def test_builtin_tools_loop_inside_the_gateway(
    client: AsyncOpenAI, upstream: ScriptedUpstream, gateway: Gateway, conv: str
) -> None:
    reply = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f'[conv={conv}] [call=memory_save {{"text": "the door code is 4711"}}] [call=session_status {{}}] note it'}],
        extra_headers=_h(conv),
    )
    message = reply.choices[0].message
    assert message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    assert message.content.startswith("ECHO note it") and ":: TOOLS saved |" in message.content
    assert '"session_key":"' + conv in message.content
    assert len(upstream.calls(conv)) == 2
    session = await _session(gateway, conv)
    assert [m["text"] for m in session["memories"]] == ["the door code is 4711"]
    search = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f'[conv={conv}] [call=memory_search {{"query": "door code"}}] find'}],
        extra_headers=_h(conv),
    )
    assert "the door code is 4711" in search.choices[0].message.content
    recalled = upstream.calls(conv)[-1].messages
    assert any("the door code is 4711" in m["content"] for m in recalled if m["role"] == "system")


async def test_memory_is_recalled_without_a_tool_call(
    client: AsyncOpenAI, upstream: ScriptedUpstream, conv: str
) -> None:
    """Turn B queued behind turn A finds A's memory in its context."""
    save = asyncio.ensure_future(
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": f'[conv={conv}] [delay=0.2] [call=memory_save {{"text": "Ann is allergic to peanuts"}}] ok'}],
            extra_headers=_h(conv),
        )
    )
    await asyncio.sleep(0.05)
    await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] can Ann eat peanuts?"}],
        extra_headers=_h(conv),
    )
    await save
    systems = [m["content"] for m in upstream.calls(conv)[-1].messages if m["role"] == "system"]
    assert any("Ann is allergic to peanuts" in s for s in systems)
    other = conv + "o"
    await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={other}] can Ann eat peanuts?"}],
        extra_headers=_h(other),
    )
    systems = [m["content"] for m in upstream.calls(other)[-1].messages if m["role"] == "system"]
    assert not any("peanuts" in s for s in systems), "session-scoped memory leaked"


async def test_agent_scoped_memory_is_shared(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways(
        "--upstream", upstream.url,
        config='[agents.shared]\nmemory_scope = "agent"\nsystem_prompt = "Be brief."\n',
    )
    client = gateway.client()
    await client.chat.completions.create(
        model="shared",
        messages=[{"role": "user", "content": f'[conv={conv}] [call=memory_save {{"text": "the office wifi is lanes42"}}] save'}],
        extra_headers=_h("one"),
    )
    await client.chat.completions.create(
        model="laneway/shared",
        messages=[{"role": "user", "content": f"[conv={conv}] what is the office wifi?"}],
        extra_headers=_h("two"),
    )
    systems = [m["content"] for m in upstream.calls(conv)[-1].messages if m["role"] == "system"]
    assert systems[0].startswith("Be brief.")
    assert any("lanes42" in s for s in systems)
    assert [m.id for m in (await client.models.list()).data] == ["default", "shared"]


FAILURES = [(False, "[fail=500]"), (False, "[fail=429]"), (False, "[bad_json]"),
            (False, "[broken_stream]"), (True, "[fail=500]"), (True, "[bad_json]")]


@pytest.mark.parametrize("stream, directive", FAILURES)
async def test_upstream_failure_leaves_session_as_before(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str, directive: str, stream: bool
) -> None:
    """Before any output, a failure is a plain 502 (a started stream: see below)."""
    client = gateway.client()
    await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"[conv={conv}] before"}], extra_headers=_h(conv)
    )
    before = await _session(gateway, conv)
    body = {"model": "default", "stream": stream, "messages": [{"role": "user", "content": f"[conv={conv}] {directive} boom"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", json=body, headers=_h(conv)) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
    assert error["code"] == "upstream_error" and "scripted" not in error["message"]
    assert await _session(gateway, conv) == before
    after = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"[conv={conv}] after"}], extra_headers=_h(conv)
    )
    assert after.choices[0].message.content.endswith("SEEN before | after")
    assert "boom" not in str(upstream.calls(conv)[-1].messages)


async def test_upstream_timeout_is_504(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, "--upstream-timeout-s", "0.5")
    client = gateway.client()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"[conv={conv}] [hang] wait"}], extra_headers=_h(conv)
        )
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    ok = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"[conv={conv}] fine"}], extra_headers=_h(conv)
    )
    assert ok.choices[0].message.content.endswith("SEEN fine")


async def test_error_after_stream_started_is_a_final_event(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    body = {"model": "default", "stream": True, "messages": [{"role": "user", "content": f"[conv={conv}] [broken_stream] some long words to split"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", json=body, headers=_h(conv)) as resp:
            assert resp.status == 200
            events = [e for e in (await resp.text()).split("\n\n") if e]
    assert "[DONE]" not in events[-1]
    assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_error"
    for event in events[:-1]:
        validate_chunk(orjson.loads(event[6:]))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.base_url}/sessions/{conv}") as resp:
            assert resp.status == 404  # the failed first turn created nothing


async def test_context_budget_drops_oldest_turns(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, "--context-tokens", "400")
    client = gateway.client()
    for i in range(12):
        reply = await client.chat.completions.create(
            model="default",
            max_tokens=50,
            messages=[{"role": "user", "content": f"[conv={conv}] turn{i} " + "word " * 20}],
            extra_headers=_h(conv),
        )
    sent = upstream.calls(conv)[-1].messages
    users = [m["content"] for m in sent if m["role"] == "user"]
    assert 1 < len(users) < 12 and "turn11" in users[-1]
    assert sent[1]["role"] == "user"  # the window starts at a whole turn
    assert sum(len(str(m["content"])) for m in sent) // 4 <= 400
    session = await _session(gateway, conv)
    assert session["turns"] == 12 and len(session["messages"]) == 24
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x " * 2000}], extra_headers=_h(conv)
        )
    assert caught.value.code == "context_length_exceeded"
    assert reply.choices[0].message.content


async def test_completion_validates(gateway: Gateway, conv: str) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": f"[conv={conv}] [call=get_weather {{}}] x"}], "tools": [WEATHER]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", json=body, headers=_h(conv)) as resp:
            data = await resp.json()
    validate_completion(data)
    assert data["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
