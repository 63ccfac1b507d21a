"""PostgreSQL or Redis going away: requests fail fast with a clear 503, nothing is half
written, and service resumes by itself when they are back. Each server is reached through
a TCP proxy the test cuts, so the machine's shared servers stay up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from conftest import Gateway, StartGateway, postgres_database, redis_prefix
from scripted_upstream import ScriptedUpstream
from tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def proxied(gateways: StartGateway, upstream: ScriptedUpstream) -> Iterator[tuple[Gateway, TcpProxy, TcpProxy]]:
    pg, rd = TcpProxy(5432).up(), TcpProxy(6379).up()
    with redis_prefix() as prefix, postgres_database() as db:
        store = db.replace(":5432/", f":{pg.port}/")
        gateway = gateways("--upstream", upstream.url, "--store", store,
                           "--lanes", f"redis://127.0.0.1:{rd.port}/0?prefix={prefix}",
                           "--lane-lease-s", "1.5")
        yield gateway, pg, rd
        gateway.stop()
        pg.close()
        rd.close()


async def _ask(gateway: Gateway, key: str, text: str) -> tuple[int, Any]:
    body = {"model": "default", "messages": [{"role": "user", "content": f"[conv={key}] {text}"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", json=body,
                             headers={"x-laneway-session-key": key}) as resp:
            return resp.status, await resp.json()


async def _recovers(gateway: Gateway, key: str, text: str, within: float = 10) -> Any:
    deadline = time.monotonic() + within
    while True:
        status, reply = await _ask(gateway, key, text)
        if status == 200:
            return reply
        assert status == 503 and time.monotonic() < deadline, (status, reply)
        await asyncio.sleep(0.2)


def _seen(reply: Any) -> list[str]:
    return str(reply["choices"][0]["message"]["content"]).split(" :: SEEN ", 1)[1].split(" | ")


@pytest.mark.parametrize("which", ["postgres", "redis"])
async def test_outage_is_503_then_service_resumes(
    proxied: tuple[Gateway, TcpProxy, TcpProxy], which: str
) -> None:
    gateway, pg, rd = proxied
    proxy = pg if which == "postgres" else rd
    key = uuid.uuid4().hex[:12]
    await _recovers(gateway, key, "before")
    proxy.down()
    try:
        started = time.monotonic()
        status, error = await _ask(gateway, key, "during")
        assert status == 503, error
        assert error["error"]["code"] == "service_unavailable"
        assert ("PostgreSQL" if which == "postgres" else "Redis") in error["error"]["message"]
        assert time.monotonic() - started < 5, "failed fast"
    finally:
        proxy.up()
    reply = await _recovers(gateway, key, "after")
    assert _seen(reply) == ["before", "after"], "the failed request left nothing"


@pytest.mark.parametrize("which", ["postgres", "redis"])
async def test_outage_during_a_turn_writes_nothing(
    proxied: tuple[Gateway, TcpProxy, TcpProxy], which: str
) -> None:
    gateway, pg, rd = proxied
    proxy = pg if which == "postgres" else rd
    key = uuid.uuid4().hex[:12]
    await _recovers(gateway, key, "before")  # from the previous test's outage, if any
    turn = asyncio.ensure_future(_ask(gateway, key, "[delay=2.5] doomed"))
    await asyncio.sleep(0.3)
    proxy.down()
    try:
        status, error = await turn
        assert status == 503, error
    finally:
        proxy.up()
    reply = await _recovers(gateway, key, "after")
    assert _seen(reply) == ["before", "after"]
