"""The seed scenario: several requests on a brand-new key at the same instant.

Every one must land in the one session, each turn seeing all earlier turns exactly once,
and the model must never run two turns of the key at once.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import aiohttp
import pytest
from conftest import Gateway, StartGateway
from openai import AsyncOpenAI
from scripted_upstream import ScriptedUpstream

REPEATS_PAIR = 25  # per order
REPEATS_FIVE = 20
FIFTY = 50


def _seen(reply: str) -> list[str]:
    return reply.split(" :: SEEN ", 1)[1].split(" :: ")[0].split(" | ")


async def _ask(client: AsyncOpenAI, key: str, text: str, *, stream: bool = False) -> str:
    headers = {"x-laneway-session-key": key}
    messages = [{"role": "user", "content": text}]
    if not stream:
        reply = await client.chat.completions.create(
            model="default", messages=messages, extra_headers=headers  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or ""
    chunks = await client.chat.completions.create(
        model="default", messages=messages, extra_headers=headers, stream=True  # type: ignore[arg-type]
    )
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def _race(
    client: AsyncOpenAI, upstream: ScriptedUpstream, n: int, *, stream_first: bool = False
) -> None:
    conv = uuid.uuid4().hex[:12]
    texts = [f"[conv={conv}] [delay=0.01] m{i}" for i in range(n)]
    replies = await asyncio.gather(
        *(_ask(client, conv, t, stream=stream_first and i == 0) for i, t in enumerate(texts))
    )
    expected = {f"m{i}" for i in range(n)}
    # Each reply saw some prefix of the turns, including its own, each exactly once.
    prefixes = sorted((_seen(r) for r in replies), key=len)
    assert [len(p) for p in prefixes] == list(range(1, n + 1)), prefixes
    for shorter, longer in zip(prefixes, prefixes[1:]):
        assert longer[: len(shorter)] == shorter
    final = _seen(await _ask(client, conv, f"[conv={conv}] after"))
    assert final[:-1] == prefixes[-1] and set(final[:-1]) == expected
    assert len(final) == n + 1
    assert upstream.max_concurrency(conv) == 1


@pytest.mark.parametrize("stream_first", [False, True], ids=["plain", "first-streams"])
async def test_two_at_once(client: AsyncOpenAI, upstream: ScriptedUpstream, stream_first: bool) -> None:
    for _ in range(REPEATS_PAIR):
        await _race(client, upstream, 2, stream_first=stream_first)


async def test_two_at_once_other_order(client: AsyncOpenAI, upstream: ScriptedUpstream) -> None:
    """The streaming request arrives second."""
    for _ in range(REPEATS_PAIR):
        conv = uuid.uuid4().hex[:12]
        plain, streamed = await asyncio.gather(
            _ask(client, conv, f"[conv={conv}] plain"),
            _ask(client, conv, f"[conv={conv}] streamed", stream=True),
        )
        assert sorted([len(_seen(plain)), len(_seen(streamed))]) == [1, 2]
        assert upstream.max_concurrency(conv) == 1


@pytest.mark.parametrize("stream_first", [False, True], ids=["plain", "first-streams"])
async def test_five_at_once(client: AsyncOpenAI, upstream: ScriptedUpstream, stream_first: bool) -> None:
    for _ in range(REPEATS_FIVE):
        await _race(client, upstream, 5, stream_first=stream_first)


async def test_fifty_at_once(gateways: StartGateway, upstream: ScriptedUpstream) -> None:
    deep = gateways("--upstream", upstream.url, "--max-queue-depth", str(FIFTY))
    client = deep.client(timeout=60.0)
    for _ in range(3):
        await _race(client, upstream, FIFTY)


async def test_arrival_order_is_turn_order(gateway: Gateway, upstream: ScriptedUpstream) -> None:
    """Requests that arrive one after another while the lane is busy run in that order."""
    conv = uuid.uuid4().hex[:12]
    client = gateway.client()
    first = asyncio.ensure_future(_ask(client, conv, f"[conv={conv}] [delay=0.3] first"))
    await asyncio.sleep(0.1)
    later = []
    for i in range(4):
        later.append(asyncio.ensure_future(_ask(client, conv, f"[conv={conv}] q{i}")))
        await asyncio.sleep(0.02)
    await asyncio.gather(first, *later)
    final = _seen(await _ask(client, conv, f"[conv={conv}] end"))
    assert final == ["first", "q0", "q1", "q2", "q3", "end"]


async def test_queue_position_header(gateway: Gateway, conv: str) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": f"[conv={conv}] [delay=0.3] a"}]}
    headers = {"x-laneway-session-key": conv}
    async with aiohttp.ClientSession() as http:
        async def post(text: str) -> aiohttp.ClientResponse:
            b = {**body, "messages": [{"role": "user", "content": f"[conv={conv}] {text}"}]}
            async with http.post(gateway.base_url + "/chat/completions", json=b, headers=headers) as r:
                await r.read()
                return r

        first = asyncio.ensure_future(post("[delay=0.3] a"))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(post("b"))
        await asyncio.sleep(0.02)
        third = asyncio.ensure_future(post("c"))
        r1, r2, r3 = await asyncio.gather(first, second, third)
    assert "x-laneway-queue-position" not in r1.headers
    assert r2.headers["x-laneway-queue-position"] == "1"
    assert r3.headers["x-laneway-queue-position"] == "2"
    assert float(r1.headers["x-laneway-queue-wait-ms"]) < 50
    assert float(r2.headers["x-laneway-queue-wait-ms"]) > 100
    assert float(r3.headers["x-laneway-queue-wait-ms"]) > 100


async def test_memory_saved_by_first_is_recalled_by_second(
    client: AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    for _ in range(5):
        conv = uuid.uuid4().hex[:12]
        fact = f"zebra{conv} likes green tea"
        save = f'[conv={conv}] [call=memory_save {{"text": "{fact}"}}] remember'
        recall = f"[conv={conv}] what does zebra{conv} like?"
        await asyncio.gather(_ask(client, conv, save), _ask(client, conv, recall))
        calls = upstream.calls(conv)
        asker = [c for c in calls if "what does" in str(c.messages[-1]["content"])]
        assert len(asker) == 1
        systems = [m["content"] for m in asker[0].messages if m["role"] == "system"]
        saved_first = any("remember" in str(m.get("content")) for m in asker[0].messages)
        if saved_first:  # the saving turn won the lane: its memory is in the asker's context
            assert any(fact in s for s in systems), systems
        assert upstream.max_concurrency(conv) == 1


def test_seen_parser() -> None:
    assert _seen("ECHO x :: SEEN a | b | x") == ["a", "b", "x"]
    assert _seen("ECHO x :: SEEN a :: TOOLS t") == ["a"]
    assert re.match(r"m\d", "m3")
