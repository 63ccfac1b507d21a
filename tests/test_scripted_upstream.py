"""Tests of the scripted upstream, through the official SDK (what the gateway speaks) and raw HTTP.

The gateway's end-to-end tests trust this server to behave like the real API, so these tests pin
its wire format, its strictness and its bookkeeping (concurrency, disconnects).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import eventually
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall
from scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.timeout(30)  # async tests rely on the repo's asyncio_mode = auto


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as up:
        yield up


@pytest.fixture
async def client(upstream: ScriptedUpstream) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=upstream.url, api_key="x", max_retries=0) as c:
        yield c


def user(text: str) -> Any:  # Any: the SDK's message TypedDicts are not worth spelling out here
    return {"role": "user", "content": text}


def assistant_calls(*ids: str) -> Any:
    calls = [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def tool(call_id: str, content: str = "r") -> Any:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


async def post(url: str, body: Any) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/chat/completions", json=body) as r:
        return r.status, await r.read(), r.content_type


def sse(raw: bytes) -> list[Any]:
    lines = [ln[6:] for ln in raw.decode().split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [orjson.loads(x) for x in lines[:-1]]


async def test_models(client: AsyncOpenAI) -> None:
    assert [m.id async for m in client.models.list()] == ["scripted"]


async def test_plain_reply_shape(upstream: ScriptedUpstream) -> None:
    body = {
        "model": "m1",
        "messages": [
            {"role": "system", "content": "sys"},
            user("first [conv=plain]"),
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "  second [delay=0] "}]},
        ],
    }
    status, raw, ctype = await post(upstream.url, body)
    assert (status, ctype) == (200, "application/json")
    out = orjson.loads(raw)
    assert set(out) == {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
    }
    assert out["object"] == "chat.completion" and out["model"] == "m1"
    assert out["id"].startswith("chatcmpl-") and isinstance(out["created"], int)
    message = {
        "role": "assistant",
        "content": "ECHO second :: SEEN first | second",
        "refusal": None,
    }
    assert out["choices"] == [
        {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    ]
    assert out["usage"]["completion_tokens"] == 7  # words
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 7
    [call] = upstream.calls("plain")
    assert (call.status, call.stream, call.body, call.tools) == (200, False, body, [])
    assert call.messages == body["messages"]
    assert call.ended is not None and call.ended >= call.started


async def test_conv_from_text_parts(client: AsyncOpenAI, upstream: ScriptedUpstream) -> None:
    message: Any = {"role": "user", "content": [{"type": "text", "text": "hi [conv=parts]"}]}
    await client.chat.completions.create(model="m", messages=[message])
    assert len(upstream.calls("parts")) == 1


async def test_sdk_stream_reassembled(client: AsyncOpenAI, upstream: ScriptedUpstream) -> None:
    async with client.chat.completions.stream(
        model="m", messages=[user("[conv=st] tell me a story")]
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "ECHO tell me a story :: SEEN tell me a story"
    assert final.choices[0].finish_reason == "stop"
    assert upstream.calls("st")[0].stream is True


async def test_raw_stream_chunks_and_usage(upstream: ScriptedUpstream) -> None:
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [user("[conv=usage] [reply=one two three four five six]")],
    }
    status, raw, ctype = await post(upstream.url, body)
    assert (status, ctype) == (200, "text/event-stream")
    chunks = sse(raw)
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert len(chunks) == 1 + 3 + 1 + 1  # role, 3 content pieces, finish, usage
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "one two three four five six"
    finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-2]["choices"] == [finish]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    status, raw, _ = await post(upstream.url, {**body, "stream_options": None})
    assert all("usage" not in c for c in sse(raw))


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip(
    client: AsyncOpenAI, upstream: ScriptedUpstream, stream: bool
) -> None:
    conv = f"tools-{stream}"
    tools: list[Any] = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("lookup", "clock")
    ]
    msgs: list[Any] = [user(f'[conv={conv}] go [call=lookup {{"q": "a]b"}}] [call=clock]')]
    first: ChatCompletion
    if stream:
        async with client.chat.completions.stream(model="m", messages=msgs, tools=tools) as s:
            first = await s.get_final_completion()
    else:
        first = await client.chat.completions.create(model="m", messages=msgs, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) for c in calls)
    assert [(c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("lookup", '{"q":"a]b"}'),
        ("clock", "{}"),
    ]
    assert all(c.id.startswith(f"call_{conv}_") for c in calls) and calls[0].id != calls[1].id
    msgs.append(choice.message.model_dump(exclude_none=True, exclude={"parsed"}))
    msgs += [tool(c.id, f"r{i}") for i, c in reversed(list(enumerate(calls)))]  # any order
    second = await client.chat.completions.create(model="m", messages=msgs, tools=tools)
    assert second.choices[0].message.content == "ECHO go :: SEEN go :: TOOLS r1 | r0"
    assert second.choices[0].finish_reason == "stop"
    assert upstream.calls(conv)[0].tools == ["lookup", "clock"]


OLDER = [assistant_calls("c2"), tool("c1")]
BAD_MESSAGES: dict[str, list[Any]] = {
    "no messages": [],
    "bad role": [{"role": "robot", "content": "x"}],
    "user without content": [{"role": "user"}],
    "part without type": [{"role": "user", "content": [{"text": "x"}]}],
    "empty assistant": [user("x"), {"role": "assistant"}],
    "tool without id": [user("x"), assistant_calls("c1"), {"role": "tool", "content": "r"}],
    "unanswered call": [user("x"), assistant_calls("c1"), user("y")],
    "unanswered at end": [user("x"), assistant_calls("c1")],
    "partly answered": [user("x"), assistant_calls("c1", "c2"), tool("c1")],
    "duplicate answer": [user("x"), assistant_calls("c1"), tool("c1"), tool("c1")],
    "stray tool": [user("x"), tool("c9")],
    "answer to older call": [user("x"), assistant_calls("c1"), tool("c1"), *OLDER],
    "bad directive": [user("[delay=soon]")],
}


@pytest.mark.parametrize("messages", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
async def test_sdk_bad_request(client: AsyncOpenAI, messages: list[Any]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=messages)
    assert info.value.status_code == 400 and info.value.type == "invalid_request_error"


BAD_BODIES: list[Any] = [
    [1],
    {"messages": [user("x")]},
    {"model": "", "messages": [user("x")]},
    {"model": "m", "messages": "hi"},
    {"model": "m", "messages": [user("x")], "n": 2},
    {"model": "m", "messages": [user("x")], "tools": [{"type": "function", "function": {}}]},
    {"model": "m", "messages": [user("x")], "tools": []},
    {"model": "m", "messages": [user("x")], "stream_options": {"include_usage": True}},
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_raw_bad_request(upstream: ScriptedUpstream, body: Any) -> None:
    status, raw, _ = await post(upstream.url, body)
    assert status == 400
    err = orjson.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"


async def test_unanswered_call_message(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="did not have response messages: c1"):
        await client.chat.completions.create(model="m", messages=BAD_MESSAGES["unanswered call"])


async def test_valid_tool_conversation_accepted(client: AsyncOpenAI) -> None:
    msgs = [user("x"), assistant_calls("c1", "c2"), tool("c2", "b"), tool("c1", "a")]
    r = await client.chat.completions.create(model="m", messages=[*msgs, user("y")])
    assert r.choices[0].message.content == "ECHO y :: SEEN x | y"
    r = await client.chat.completions.create(model="m", messages=msgs)
    assert r.choices[0].message.content == "ECHO x :: SEEN x :: TOOLS b | a"


async def test_concurrency_counting(client: AsyncOpenAI, upstream: ScriptedUpstream) -> None:
    async def ask(conv: str) -> None:
        await client.chat.completions.create(
            model="m", messages=[user(f"[conv={conv}] [delay=0.3]")]
        )

    task = asyncio.gather(ask("same"), ask("same"), ask("solo1"), ask("solo2"))
    await eventually(lambda: upstream.in_flight() >= 4)
    await task
    assert upstream.max_concurrency("same") == 2
    assert (upstream.max_concurrency("solo1"), upstream.max_concurrency("solo2")) == (1, 1)
    assert upstream.max_concurrency("never") == 0
    await ask("same")  # sequential afterwards: the peak stays 2, the log grows
    assert upstream.max_concurrency("same") == 2 and len(upstream.calls("same")) == 3
    assert all(c.ended is not None and c.status == 200 for c in upstream.calls("same"))
    assert upstream.max_concurrency("same", abandoned=False) == 2


async def test_concurrency_without_abandoned_calls(upstream: ScriptedUpstream) -> None:
    """A call whose client hung up counts only where abandoned calls are kept."""

    async def post(http: aiohttp.ClientSession, text: str) -> int:
        body = {"model": "m", "messages": [user(f"[conv=cut] {text}")]}
        async with http.post(upstream.url + "/chat/completions", json=body) as resp:
            return resp.status

    async with aiohttp.ClientSession() as http:
        abandoned = asyncio.ensure_future(post(http, "[delay=5]"))
        await eventually(lambda: upstream.in_flight() == 1)
        assert await post(http, "meanwhile") == 200
        abandoned.cancel()
    await eventually(lambda: upstream.in_flight() == 0)
    assert sorted(c.status for c in upstream.calls("cut")) == [0, 200]
    assert upstream.max_concurrency("cut") == 2
    assert upstream.max_concurrency("cut", abandoned=False) == 1


async def test_fail_directive(client: AsyncOpenAI, upstream: ScriptedUpstream) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="m", messages=[user("[conv=f5] [fail=503]")])
    assert info.value.status_code == 503 and info.value.type == "server_error"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=[user("[conv=f4] [fail=429]")])
    assert [c.status for c in upstream.calls("f5") + upstream.calls("f4")] == [503, 429]


@pytest.mark.parametrize(("conv", "directive"), [("gone1", "[hang]"), ("gone2", "[delay=5]")])
async def test_disconnect_counted(upstream: ScriptedUpstream, conv: str, directive: str) -> None:
    before = upstream.disconnects()
    async with AsyncOpenAI(base_url=upstream.url, api_key="x", max_retries=0, timeout=0.3) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(
                model="m", messages=[user(f"[conv={conv}] {directive}")]
            )
    await eventually(lambda: upstream.disconnects() == before + 1)
    [call] = upstream.calls(conv)
    assert call.status == 0 and call.ended is not None
    await eventually(lambda: upstream.in_flight() == 0)


async def test_disconnect_mid_stream(client: AsyncOpenAI, upstream: ScriptedUpstream) -> None:
    before = upstream.disconnects()
    stream = await client.chat.completions.create(
        model="m", stream=True, messages=[user("[conv=midstream] [chunk_delay=0.2]")]
    )
    async for _ in stream:
        break
    await stream.close()
    await eventually(lambda: upstream.disconnects() == before + 1)
    assert upstream.calls("midstream")[0].status == 0


async def test_broken_stream_and_bad_json(client: AsyncOpenAI, upstream: ScriptedUpstream) -> None:
    before = upstream.disconnects()
    msgs = [user("[conv=broken] a b c d e f [broken_stream]")]
    body: Any = {"model": "m", "stream": True, "messages": msgs}
    got = b""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{upstream.url}/chat/completions", json=body) as r,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            async for piece in r.content.iter_any():
                got += piece
    assert got.count(b"data: ") == 2 and b"[DONE]" not in got  # role chunk + one content chunk
    with pytest.raises(openai.APIConnectionError):
        async for _ in await client.chat.completions.create(model="m", messages=msgs, stream=True):
            pass
    status, raw, _ = await post(upstream.url, {**body, "stream": False})
    assert status == 200 and raw.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    status, raw, _ = await post(upstream.url, {"model": "m", "messages": [user("[bad_json]")]})
    assert status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    bad_stream = {"model": "m", "stream": True, "messages": [user("[bad_json]")]}
    status, raw, _ = await post(upstream.url, bad_stream)
    assert b"data: {not json\n\n" in raw and raw.endswith(b"data: [DONE]\n\n")
    assert [c.status for c in upstream.calls("broken")] == [200, 200, 200]
    assert upstream.disconnects() == before  # our own close is not the client going away


async def test_max_tokens_and_huge(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="m", max_tokens=3, messages=[user("[reply=a b c d e]")]
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("a b c", "length")
    r = await client.chat.completions.create(
        model="m", max_completion_tokens=9, messages=[user("[huge=100000]")]
    )
    assert r.choices[0].message.content == "x" * 100_000 and r.choices[0].finish_reason == "stop"


def test_sync_sdk_lifecycle_and_reset() -> None:
    with ScriptedUpstream() as up:
        assert up.port > 0 and up.url == f"http://127.0.0.1:{up.port}/v1"
        with openai.OpenAI(base_url=up.url, api_key="x", max_retries=0) as c:
            r = c.chat.completions.create(model="m", messages=[user("hi")])
            assert r.choices[0].message.content == "ECHO hi :: SEEN hi"
            r = c.chat.completions.create(model="m", messages=[user("[call=f]")])
            first_id = (r.choices[0].message.tool_calls or [])[0].id
            assert [c.conv for c in up.calls()] == ["none", "none"]
            assert up.max_concurrency("none") == 1
            up.reset()
            assert (up.calls(), up.max_concurrency("none"), up.in_flight()) == ([], 0, 0)
            r = c.chat.completions.create(model="m", messages=[user("[call=f]")])
            assert (r.choices[0].message.tool_calls or [])[0].id != first_id  # unique for life
    up.stop()  # idempotent


def test_start_raises_when_port_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            ScriptedUpstream(port=taken.getsockname()[1]).start()
