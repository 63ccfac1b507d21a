"""The bundled SmolLM2 model, run in-process by llama.cpp: a short turn, streamed and not.
Needs the `local` extra, which CI installs; without it this test fails rather than skips."""

from __future__ import annotations

from conftest import StartGateway


async def test_bundled_model_answers(gateways: StartGateway) -> None:
    gateway = gateways(env={"LANEWAY_UPSTREAM": ""})
    client = gateway.client(timeout=120.0)
    reply = await client.chat.completions.create(
        model="default",
        max_tokens=12,
        messages=[{"role": "user", "content": "Say hello."}],
        extra_headers={"x-laneway-session-key": "local-smoke"},
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    stream = await client.chat.completions.create(
        model="default",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Name a colour."}],
        extra_headers={"x-laneway-session-key": "local-smoke"},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None
    models = await client.models.list()
    assert [m.id for m in models.data] == ["default"]
