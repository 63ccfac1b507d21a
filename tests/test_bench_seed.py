"""The benchmark's bulk seeding (`benchmarks/seed.py`) leaves sessions a gateway reads and
goes on with, as if their turns had been run through it: on SQLite and on PostgreSQL. The
store-size and history figures rest on it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    REDIS,
    Gateway,
    StartGateway,
    postgres_database,
    redis_prefix,
    start_gateway,
)
from openai import AsyncOpenAI
from scripted_upstream import ScriptedUpstream

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgres"])
def seeded(request: pytest.FixtureRequest, gateways: StartGateway, upstream: ScriptedUpstream,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    """A gateway on a store seeded with sessions seed0..seed19 of two turns each, started
    after the seeding as the benchmark does (a first start migrates the store)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.seed import seed_postgres, seed_sqlite

    keys = [f"seed{i}" for i in range(20)]
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            dsn = stack.enter_context(postgres_database())
            prefix = stack.enter_context(redis_prefix())
            backend = ["--store", dsn, "--lanes", f"{REDIS}?prefix={prefix}"]
            start_gateway(*backend).stop()
            seed_postgres(dsn, keys, turns=2, chars=80)
            yield gateways("--upstream", upstream.url, *backend)
        else:
            first = start_gateway()
            first.stop()
            seed_sqlite(first.data_dir / "laneway.db", keys, turns=2, chars=80)
            yield gateways("--upstream", upstream.url, data_dir=first.data_dir)


async def _turn(client: AsyncOpenAI, key: str, text: str) -> str:
    reply = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": text}],
        extra_headers={"x-laneway-session-key": key})
    return reply.choices[0].message.content or ""


async def test_a_seeded_session_goes_on_from_its_history(seeded: Gateway) -> None:
    async with seeded.client() as client:
        answer = await _turn(client, "seed7", "and now")
        assert answer.startswith("ECHO and now :: SEEN seeded question 0: the quarterly")
        assert "| seeded question 1: the quarterly" in answer and answer.endswith("| and now")
        session = await client.get("/sessions/seed7", cast_to=object)
    assert isinstance(session, dict)
    assert session["turns"] == 3
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 3


async def test_new_sessions_come_after_the_seeded_ones(seeded: Gateway) -> None:
    """New keys get sessions of their own (PostgreSQL's id sequence was moved past the
    seeded ids), with no seeded history."""
    async with seeded.client() as client:
        for _ in range(3):
            key = f"new-{uuid.uuid4().hex[:8]}"
            assert await _turn(client, key, "hello") == "ECHO hello :: SEEN hello"
