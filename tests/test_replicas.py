"""Three replicas on one PostgreSQL database and one Redis: every guarantee of one process
must hold whichever replica a request reaches."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import (
    POSTGRES_ADMIN,
    REDIS,
    Gateway,
    StartGateway,
    eventually,
    postgres_database,
    redis_prefix,
)
from scripted_upstream import ScriptedUpstream

from laneway.store.postgres import WRITERS

REPEATS = 15
CHAT = "/chat/completions"


@pytest.fixture(scope="module")
def cluster(gateways: StartGateway, upstream: ScriptedUpstream) -> Iterator[list[Gateway]]:
    with redis_prefix() as prefix, postgres_database() as db:
        replicas = [
            gateways("--upstream", upstream.url, "--store", db,
                     "--lanes", f"{REDIS}?prefix={prefix}", "--lane-lease-s", "2")
            for _ in range(3)
        ]
        yield replicas
        for replica in replicas:
            replica.stop()


def _body(conv: str, text: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "default", "stream": stream,
            "messages": [{"role": "user", "content": f"[conv={conv}] {text}"}]}


async def _post(gateway: Gateway, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + CHAT, json=body, headers=headers) as resp:
            data = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, dict(resp.headers), data


def _seen(reply: dict[str, Any]) -> list[str]:
    return str(reply["choices"][0]["message"]["content"]).split(" :: SEEN ", 1)[1].split(" | ")


async def test_seed_race_across_replicas(cluster: list[Gateway], upstream: ScriptedUpstream) -> None:
    for _ in range(REPEATS):
        conv = uuid.uuid4().hex[:12]
        n = 5
        results = await asyncio.gather(*(
            _post(cluster[i % 3], _body(conv, f"[delay=0.01] m{i}"), {"x-laneway-session-key": conv})
            for i in range(n)
        ))
        assert all(status == 200 for status, _, _ in results), results
        prefixes = sorted((_seen(r) for _, _, r in results), key=len)
        assert [len(p) for p in prefixes] == list(range(1, n + 1)), prefixes
        for shorter, longer in zip(prefixes, prefixes[1:]):
            assert longer[: len(shorter)] == shorter
        status, _, final = await _post(cluster[0], _body(conv, "after"), {"x-laneway-session-key": conv})
        assert _seen(final) == prefixes[-1] + ["after"]
        assert upstream.max_concurrency(conv) == 1


async def test_reject_and_interrupt_see_another_replicas_turn(
    cluster: list[Gateway], upstream: ScriptedUpstream, conv: str
) -> None:
    headers = {"x-laneway-session-key": conv}
    holder = asyncio.ensure_future(_post(cluster[0], _body(conv, "[delay=5] long"), headers))
    await eventually(lambda: bool(upstream.calls(conv)))
    status, _, error = await _post(cluster[1], _body(conv, "no"), {**headers, "x-laneway-lane-policy": "reject"})
    assert status == 409 and error["error"]["code"] == "session_busy"
    started = time.monotonic()
    status, _, reply = await _post(cluster[2], _body(conv, "instead"), {**headers, "x-laneway-lane-policy": "interrupt"})
    assert status == 200 and time.monotonic() - started < 2.5
    assert _seen(reply) == ["long", "instead"]
    status, _, error = await holder
    assert status == 409 and error["error"]["code"] == "turn_interrupted"


async def test_idempotency_across_replicas(cluster: list[Gateway], upstream: ScriptedUpstream, conv: str) -> None:
    headers = {"x-laneway-session-key": conv, "Idempotency-Key": "pay-1"}
    results = await asyncio.gather(*(
        _post(replica, _body(conv, "[delay=0.3] pay"), headers) for replica in cluster
    ))
    assert {r["id"] for _, _, r in results} == {results[0][2]["id"]}
    status, _, later = await _post(cluster[1], _body(conv, "[delay=0.3] pay"), headers)
    assert later["id"] == results[0][2]["id"]
    assert len(upstream.calls(conv)) == 1


async def test_rejoin_on_another_replica(cluster: list[Gateway], upstream: ScriptedUpstream, conv: str) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(cluster[0].base_url + CHAT, json=_body(conv, "[chunk_delay=0.2] a b c d e f", True),
                               headers={"x-laneway-session-key": conv})
        turn_id = resp.headers["x-laneway-turn-id"]
        resp.close()
        async with http.get(f"{cluster[2].base_url}/sessions/{conv}/turns/{turn_id}") as r:
            assert (await r.json())["status"] == "running"
        async with http.get(f"{cluster[1].base_url}/sessions/{conv}/turns/{turn_id}?wait=5") as r:
            turn = await r.json()
    assert turn["status"] == "completed"
    assert turn["response"]["choices"][0]["message"]["content"].startswith("ECHO a b c")


async def test_queue_spans_replicas_in_order(cluster: list[Gateway], upstream: ScriptedUpstream, conv: str) -> None:
    headers = {"x-laneway-session-key": conv}
    holder = asyncio.ensure_future(_post(cluster[0], _body(conv, "[delay=0.4] first"), headers))
    await eventually(lambda: bool(upstream.calls(conv)))
    later = []
    for i in range(4):
        later.append(asyncio.ensure_future(_post(cluster[(i + 1) % 3], _body(conv, f"q{i}"), headers)))
        await asyncio.sleep(0.03)
    results = await asyncio.gather(holder, *later)
    assert [r[1].get("x-laneway-queue-position") for r in results[1:]] == ["1", "2", "3", "4"]
    assert _seen(results[-1][2]) == ["first", "q0", "q1", "q2", "q3"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cluster[2].base_url}/sessions/{conv}") as r:
            session = await r.json()
    assert session["turns"] == 5 and session["status"] == "idle"


async def test_a_replica_reuses_what_it_holds_only_when_the_lane_says_it_is_current(
    cluster: list[Gateway], upstream: ScriptedUpstream, conv: str
) -> None:
    """Turns of one key hop between replicas. A replica that ran the lane's last turn reads
    nothing from PostgreSQL for the next one; one whose cached transcript is turns behind
    reads it again: every turn sees every earlier one."""
    headers = {"x-laneway-session-key": conv}
    route = [0, 0, 1, 0, 2, 2, 2, 0, 1]
    sent: list[str] = []
    before = [await replica.metrics() for replica in cluster]
    for i, replica in enumerate(route):
        sent.append(f"m{i}")
        status, _, reply = await _post(cluster[replica], _body(conv, f"m{i}"), headers)
        assert status == 200, reply
        assert _seen(reply) == sent
    after = [await replica.metrics() for replica in cluster]
    series = {k: f'laneway_session_loads_total{{source="{k}"}}' for k in ("cache", "store")}
    gained = [{k: after[r][s] - before[r][s] for k, s in series.items()} for r in range(3)]
    # From the cache: the turns that followed one on the same replica (the 2nd, 6th, 7th).
    assert [g["cache"] for g in gained] == [1, 0, 2], gained
    assert [g["store"] for g in gained] == [3, 2, 1], gained


async def test_collect_across_replicas_loses_nothing(cluster: list[Gateway], upstream: ScriptedUpstream, conv: str) -> None:
    headers = {"x-laneway-session-key": conv}
    collect = {**headers, "x-laneway-lane-policy": "collect"}
    holder = asyncio.ensure_future(_post(cluster[0], _body(conv, "[delay=0.4] first"), headers))
    await eventually(lambda: bool(upstream.calls(conv)))
    a = asyncio.ensure_future(_post(cluster[1], _body(conv, "a"), collect))
    await asyncio.sleep(0.05)
    b = asyncio.ensure_future(_post(cluster[1], _body(conv, "b"), collect))
    await asyncio.sleep(0.05)
    c = asyncio.ensure_future(_post(cluster[2], _body(conv, "c"), collect))
    _, ra, rb, rc = await asyncio.gather(holder, a, b, c)
    assert ra[2]["id"] == rb[2]["id"], "a and b (same replica) were merged"
    assert _seen(rc[2]) == ["first", "a", "b", "c"]
    assert upstream.max_concurrency(conv) == 1


async def test_store_pool_size_bounds_postgres_connections(
    gateways: StartGateway, upstream: ScriptedUpstream
) -> None:
    """`LANEWAY_STORE_POOL_SIZE` (`--store-pool-size`) bounds the pooled connections a
    replica opens, however many turns run at once, and turn writes add `WRITERS` of their
    own; turns beyond them wait for one, they do not fail."""
    with redis_prefix() as prefix, postgres_database() as db:
        gateway = gateways("--upstream", upstream.url, "--store", db,
                           "--lanes", f"{REDIS}?prefix={prefix}",
                           env={"LANEWAY_STORE_POOL_SIZE": "2"})
        try:
            convs = [uuid.uuid4().hex[:12] for _ in range(16)]
            replies = await asyncio.gather(*[
                _post(gateway, _body(conv, "[delay=0.05] hi"), {"x-laneway-session-key": conv})
                for conv in convs
            ])
            assert [status for status, _, _ in replies] == [200] * 16
            name = db.rsplit("/", 1)[1]
            admin = await asyncpg.connect(POSTGRES_ADMIN)
            opened = dict(await admin.fetch(
                "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = $1 "
                "GROUP BY application_name", name))
            await admin.close()
            assert 1 <= opened.pop("laneway") <= 2, opened
            assert 1 <= opened.pop("laneway-writes") <= WRITERS and not opened, opened
        finally:
            gateway.stop()
