"""Chat Completions through the official openai SDK: shapes, headers, models, streaming."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest
from conftest import Gateway
from openai import AsyncOpenAI
from openai_schema import validate_chunk, validate_completion, validate_error, validate_models


async def test_reply_and_headers(client: AsyncOpenAI, conv: str) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] hello"}],
        extra_headers={"x-laneway-session-key": conv},
    )
    completion = raw.parse()
    validate_completion(orjson.loads(raw.content))
    assert completion.choices[0].message.content.startswith("ECHO hello")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "default"
    assert raw.headers["x-laneway-session-key"] == conv
    assert raw.headers["x-laneway-turn-id"].startswith("turn_")
    assert float(raw.headers["x-laneway-queue-wait-ms"]) >= 0
    assert "x-laneway-queue-position" not in raw.headers
    assert completion.usage is not None and completion.usage.total_tokens > 0


async def test_new_session_key_when_none_given(client: AsyncOpenAI, conv: str) -> None:
    first = await client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": f"[conv={conv}] one"}]
    )
    key = first.headers["x-laneway-session-key"]
    assert key.startswith("sess_")
    second = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] two"}],
        extra_headers={"x-laneway-session-key": key},
    )
    assert second.choices[0].message.content.endswith("SEEN one | two")
    other = await client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": f"[conv={conv}] three"}]
    )
    assert other.headers["x-laneway-session-key"] != key
    assert other.parse().choices[0].message.content.endswith("SEEN three")


async def test_openclaw_alias_header(client: AsyncOpenAI, conv: str) -> None:
    for text in ("a", "b"):
        reply = await client.chat.completions.create(
            model="laneway/default",
            messages=[{"role": "user", "content": f"[conv={conv}] {text}"}],
            extra_headers={"x-openclaw-session-key": conv},
        )
    assert reply.choices[0].message.content.endswith("SEEN a | b")
    assert reply.model == "laneway/default"


async def test_stream_reassembles_and_validates(gateway: Gateway, conv: str) -> None:
    body = {
        "model": "default",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"[conv={conv}] streamed words here"}],
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.base_url + "/chat/completions",
            json=body,
            headers={"x-laneway-session-key": conv},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-laneway-session-key"] == conv
            raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events), events
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    for chunk in chunks:
        validate_chunk(chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text.startswith("ECHO streamed words here")


async def test_stream_through_sdk(client: AsyncOpenAI, conv: str) -> None:
    stream = await client.chat.completions.create(
        model="default",
        stream=True,
        messages=[{"role": "user", "content": f"[conv={conv}] via sdk"}],
        extra_headers={"x-laneway-session-key": conv},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("ECHO via sdk")
    after = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] next"}],
        extra_headers={"x-laneway-session-key": conv},
    )
    assert after.choices[0].message.content.endswith("SEEN via sdk | next")


async def test_models(gateway: Gateway, client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["default"]
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.base_url + "/models") as resp:
            validate_models(await resp.json())


async def test_unknown_model_is_404(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found"
    validate_error(caught.value.response.json())


async def test_unknown_endpoint_is_openai_shaped(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.base_url + "/nothing") as resp:
            assert resp.status == 404
            validate_error(await resp.json())


async def test_session_view_and_delete(client: AsyncOpenAI, gateway: Gateway, conv: str) -> None:
    await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] keep me"}],
        extra_headers={"x-laneway-session-key": conv},
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.base_url}/sessions/{conv}") as resp:
            session = await resp.json()
        assert session["status"] == "idle" and session["turns"] == 1
        assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
        async with http.delete(f"{gateway.base_url}/sessions/{conv}") as resp:
            assert resp.status == 200
        async with http.get(f"{gateway.base_url}/sessions/{conv}") as resp:
            assert resp.status == 404
            validate_error(await resp.json())
        async with http.delete(f"{gateway.base_url}/sessions/{conv}") as resp:
            assert resp.status == 404
    fresh = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] again"}],
        extra_headers={"x-laneway-session-key": conv},
    )
    assert fresh.choices[0].message.content.endswith("SEEN again")


async def test_healthz_and_metrics(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/healthz") as resp:
            assert (await resp.json())["status"] == "ok"
        async with http.get(gateway.url + "/metrics") as resp:
            text = await resp.text()
    assert "laneway_turns_total" in text
    assert "laneway_queue_wait_seconds_bucket" in text


async def test_metrics_time_each_turns_store_calls(
    gateway: Gateway, client: AsyncOpenAI, conv: str
) -> None:
    """A turn reads its session once and writes once: both calls land in
    `laneway_store_seconds`, with a sum that grows."""
    before = await gateway.metrics()
    await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hello"}],
        extra_headers={"x-laneway-session-key": conv},
    )
    after = await gateway.metrics()
    for op in ("load", "commit"):
        count = f'laneway_store_seconds_count{{op="{op}"}}'
        assert after[count] == before.get(count, 0) + 1, op
        total = f'laneway_store_seconds_sum{{op="{op}"}}'
        assert after[total] > before.get(total, 0), op
        assert f'laneway_store_seconds_bucket{{le="+Inf",op="{op}"}}' in after, op
