"""Clients that go away: a queued request leaves the queue having changed nothing; a running
turn finishes and is saved."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from conftest import Gateway
from scripted_upstream import ScriptedUpstream


def _body(conv: str, text: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "default", "stream": stream, "messages": [{"role": "user", "content": f"[conv={conv}] {text}"}]}


async def _post(gateway: Gateway, body: dict[str, Any], key: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", json=body, headers={"x-laneway-session-key": key}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]


async def _session(gateway: Gateway, key: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.base_url}/sessions/{key}") as resp:
            return await resp.json()  # type: ignore[no-any-return]


async def _wait_idle(gateway: Gateway, key: str, timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        session = await _session(gateway, key)
        if session.get("status") == "idle" or time.monotonic() > deadline:
            return session
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
async def test_queued_client_leaving_changes_nothing(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str, stream: bool
) -> None:
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.6] first"), conv))
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as http:
        post = http.post(
            gateway.base_url + "/chat/completions",
            json=_body(conv, "gone", stream),
            headers={"x-laneway-session-key": conv},
        )
        if stream:  # a queued stream gets its headers at once, then queue comments
            resp = await post
            assert resp.status == 200
            assert resp.headers["x-laneway-queue-position"] == "1"
            assert await resp.content.readline() == b": queued position=1\n"
            resp.close()
        else:  # a plain one hears nothing until its turn ends: give up waiting
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(post, 0.15)
    await asyncio.sleep(0.05)
    session = await _session(gateway, conv)
    assert session["queue_depth"] == 0, "the abandoned request still waits"
    await holder
    after = await _post(gateway, _body(conv, "third"), conv)
    assert after["choices"][0]["message"]["content"].endswith("SEEN first | third")
    assert "gone" not in str([c.messages for c in upstream.calls(conv)])
    assert (await _session(gateway, conv))["turns"] == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_running_turn_finishes_after_client_leaves(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str, stream: bool
) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(
                gateway.base_url + "/chat/completions",
                json=_body(conv, "[delay=0.4] slow", stream),
                headers={"x-laneway-session-key": conv},
                timeout=aiohttp.ClientTimeout(total=0.15),
            ) as resp:
                await resp.read()
    assert upstream.calls(conv), "the turn should have started"
    session = await _wait_idle(gateway, conv)
    assert session["turns"] == 1
    assert session["messages"][1]["content"].startswith("ECHO slow")


async def test_queued_stream_gets_keepalive_comments(gateway: Gateway, conv: str) -> None:
    """The default gateway sends them every 0.2 s (15 s by default)."""
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.7] first"), conv))
    await asyncio.sleep(0.05)
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.base_url + "/chat/completions",
            json=_body(conv, "second", True),
            headers={"x-laneway-session-key": conv},
        ) as resp:
            assert resp.status == 200
            started = time.monotonic()
            first_data = None
            async for line in resp.content:
                lines.append(line)
                if first_data is None and line.startswith(b"data:"):
                    first_data = time.monotonic() - started
    await holder
    comments = [line for line in lines if line.startswith(b":")]
    assert len(comments) >= 3 and all(c == b": queued position=1\n" for c in comments)
    assert not [line for line in lines if line.split(b":")[0] in (b"id", b"event", b"retry")]
    assert lines[-2] == b"data: [DONE]\n"
    assert first_data is not None and first_data > 0.4
