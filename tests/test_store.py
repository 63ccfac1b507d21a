"""The SQL store: migrations match the table definitions, commits are atomic and fenced,
the cached tail stays bounded, memory search is lexical."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import POSTGRES_ADMIN, eventually, postgres_database
from sqlalchemy.ext.asyncio import create_async_engine
from tcp_proxy import TcpProxy

from laneway.errors import Unavailable
from laneway.store.base import MemoryScope, SessionRef, SessionState, StaleFence, TurnRecord
from laneway.store.schema import metadata
from laneway.store.sql import SqlStore, search_terms


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same contract on both databases: a fresh one per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(db_url)
    await s.open()
    yield s
    await s.close()


def _turn(n: int | str, *texts: str, memories: list[tuple[str, bool]] | None = None) -> TurnRecord:
    now = time.time()
    messages = []
    for text in texts:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "re " + text}]
    return TurnRecord(
        id=f"turn_{n}", status="completed", created_at=now, started_at=now, finished_at=now,
        queue_wait_ms=0.0, messages=messages, memories=memories or [], response=None, usage=None,
    )


async def test_migrations_match_schema(store: SqlStore, db_url: str) -> None:
    scheme, rest = db_url.split("://", 1)
    driver = "sqlite+aiosqlite" if scheme == "sqlite" else "postgresql+asyncpg"
    engine = create_async_engine(f"{driver}://{rest}")
    async with engine.connect() as conn:
        changes = await conn.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c), metadata)
        )
    await engine.dispose()
    # Lexical search lives outside the portable schema on purpose: FTS5 tables on SQLite,
    # a generated tsvector column and its index on PostgreSQL. Nothing else may differ.
    assert [c for c in changes if "memories_fts" not in str(c) and "tsv" not in str(c)] == []


async def test_commit_creates_then_appends(store: SqlStore) -> None:
    ref = SessionRef("t", "default", "k")
    state = await store.load(ref, fence=1, window_tokens=1000)
    assert state.revision == 0 and len(state.tail) == 0
    assert await store.session_info(ref) is None, "a claimed, empty session is not shown"
    await store.commit(state, _turn(1, "one"), fence=1)
    assert state.revision == 1 and state.turns == 1 and state.next_seq == 2
    again = await store.load(ref, fence=2, window_tokens=1000)
    await store.commit(again, _turn(2, "two"), fence=2)
    assert [m["content"] for m in await store.transcript(ref, 10)] == ["one", "re one", "two", "re two"]
    info = await store.session_info(ref)
    assert info is not None and info.turns == 2
    turn = await store.turn(ref, "turn_2")
    assert turn is not None and turn["status"] == "completed"
    assert await store.turn(SessionRef("other", "default", "k"), "turn_2") is None


async def test_turns_of_every_length_commit_whole_and_in_order(db_url: str) -> None:
    """A turn of 1 to 19 messages (PostgreSQL writes up to 16 as scalar parameters, longer
    ones as JSON in the batched statement): each lands whole, in order, and a stale one of
    either kind writes nothing."""
    a, b = SqlStore(db_url, exclusive=False), SqlStore(db_url, exclusive=False)
    await a.open()
    await b.open()
    ref = SessionRef("t", "default", "lengths")
    state = await a.load(ref, fence=1, window_tokens=100_000)
    expected: list[str] = []
    for n in range(1, 20):
        turn = _turn(n)
        turn.messages = [{"role": "user", "content": f"{n}.{i}"} for i in range(n)]
        await a.commit(state, turn, fence=1)
        expected += [f"{n}.{i}" for i in range(n)]
    assert state.next_seq == len(expected) == 190
    assert [m["content"] for m in await b.transcript(ref, 500)] == expected
    for n in (2, 18):
        zombie = await a.load(ref, fence=n, window_tokens=100_000)
        fresh = await b.load(ref, fence=n + 1, window_tokens=100_000)
        stale = _turn(f"stale{n}")
        stale.messages = [{"role": "user", "content": "lost"}] * n
        with pytest.raises(StaleFence):
            await a.commit(zombie, stale, fence=n)
        await b.commit(fresh, _turn(f"fresh{n}", f"after {n}"), fence=n + 1)
        expected += [f"after {n}", f"re after {n}"]
    assert [m["content"] for m in await b.transcript(ref, 500)] == expected
    await a.close()
    await b.close()


async def test_stale_fence_writes_nothing(db_url: str) -> None:
    """Two stores on one database (two replicas). A holder whose lease expired while it was
    paused (the zombie) cannot write once a newer holder has claimed the session, even if
    the newer one has not committed yet, and even for a brand-new session."""
    a, b = SqlStore(db_url, exclusive=False), SqlStore(db_url, exclusive=False)
    await a.open()
    await b.open()
    for key in ("old", "new"):
        ref = SessionRef("t", "default", key)
        if key == "old":
            first = await a.load(ref, fence=10, window_tokens=1000)
            await a.commit(first, _turn(1, "one"), fence=10)
        zombie = await a.load(ref, fence=11, window_tokens=1000)
        fresh = await b.load(ref, fence=12, window_tokens=1000)  # claims before the zombie wakes
        with pytest.raises(StaleFence):
            await a.commit(zombie, _turn(f"z{key}", "zombie"), fence=11)
        await b.commit(fresh, _turn(f"b{key}", "two"), fence=12)
        with pytest.raises(StaleFence):
            await a.load(ref, fence=11, window_tokens=1000)
        contents = [m["content"] for m in await b.transcript(ref, 10)]
        assert contents == (["one", "re one"] if key == "old" else []) + ["two", "re two"]
        reread = await a.load(ref, fence=13, window_tokens=1000)  # revision moved: tail refreshed
        assert [m["content"] for m in reread.tail.messages] == contents
    await a.close()
    await b.close()


async def test_sole_writer_reads_a_stored_session_without_claiming_it(db_url: str) -> None:
    """Embedded mode (exclusive): the first turn on a stored session that is not cached reads
    it and writes nothing before its commit, which still carries (and stores) its fence."""
    from sqlalchemy import select

    from laneway.store.schema import sessions
    from laneway.store.statements import compile_sql

    ref = SessionRef("t", "default", "k")
    first = SqlStore(db_url)
    await first.open()
    state = await first.load(ref, fence=1, window_tokens=1000)
    await first.commit(state, _turn(1, "one"), fence=1)
    await first.close()
    store = SqlStore(db_url)  # a restart: nothing cached
    await store.open()
    row = compile_sql(select(sessions.c.fence, sessions.c.updated_at), store.driver.dialect)

    async def stored() -> tuple[int, float]:
        async with store.driver.connect() as conn:
            fence, updated_at = (await conn.fetch(row, {}))[0]
        return fence, updated_at

    before = await stored()
    state = await store.load(ref, fence=2, window_tokens=1000)
    assert [m["content"] for m in state.tail.messages] == ["one", "re one"]
    assert await stored() == before
    await store.commit(state, _turn(2, "two"), fence=2)
    assert (await stored())[0] == 2
    assert [m["content"] for m in await store.transcript(ref, 10)] == ["one", "re one", "two", "re two"]
    await store.close()


async def test_a_handoff_note_spares_the_claim_and_a_stale_one_cannot_fork(db_url: str) -> None:
    """Two replicas. A turn whose lane came with a note naming the state its replica holds
    uses that state without claiming the session; a note naming another state, or one that
    is out of date, leads to a claim and a fresh read, or to a refused commit: never to a
    turn written on top of an old transcript."""
    from sqlalchemy import select

    from laneway.store.schema import sessions
    from laneway.store.statements import compile_sql

    a, b = SqlStore(db_url, exclusive=False), SqlStore(db_url, exclusive=False)
    await a.open()
    await b.open()
    ref = SessionRef("t", "default", "k")
    fence_sql = compile_sql(select(sessions.c.fence), a.driver.dialect)

    async def stored_fence() -> int:
        async with a.driver.connect() as conn:
            return int((await conn.fetch(fence_sql, {}))[0][0])

    def contents(state: SessionState) -> list[str]:
        return [m["content"] for m in state.tail.messages]

    state = await a.load(ref, fence=10, window_tokens=1000)
    await a.commit(state, _turn(1, "one"), fence=10)
    note = a.mark(ref)
    assert note == f"{state.id}:1"
    state = await a.load(ref, fence=11, window_tokens=1000, handoff=note)
    assert await stored_fence() == 10  # no claim was made
    await a.commit(state, _turn(2, "two"), fence=11)
    assert await stored_fence() == 11

    # The next turn runs on replica b, which holds nothing: the note is no use to it.
    state = await b.load(ref, fence=12, window_tokens=1000, handoff=a.mark(ref))
    assert await stored_fence() == 12 and contents(state) == ["one", "re one", "two", "re two"]
    await b.commit(state, _turn(3, "three"), fence=12)
    # Back on a, whose cache is a turn behind b's note: it claims and reads turn 3.
    state = await a.load(ref, fence=13, window_tokens=1000, handoff=b.mark(ref))
    assert await stored_fence() == 13 and (contents(state))[-2:] == ["three", "re three"]

    # A note out of date (the lane passed it on, then a turn it did not see was written):
    # the turn on the old state is refused and a forgets that state.
    stale_note = a.mark(ref)
    theirs = await b.load(ref, fence=14, window_tokens=1000)
    await b.commit(theirs, _turn(4, "four"), fence=14)
    state = await a.load(ref, fence=15, window_tokens=1000, handoff=stale_note)
    with pytest.raises(StaleFence):
        await a.commit(state, _turn(5, "forked"), fence=15)
    assert a.mark(ref) is None
    transcript = [m["content"] for m in await a.transcript(ref, 20)]
    assert transcript == ["one", "re one", "two", "re two", "three", "re three", "four", "re four"]
    state = await a.load(ref, fence=16, window_tokens=1000, handoff=stale_note)
    assert contents(state) == transcript
    assert SqlStore(db_url).mark(ref) is None  # a sole writer needs no notes
    await a.close()
    await b.close()


async def test_concurrent_commits_each_stand_alone(db_url: str) -> None:
    """Turns committing at the same instant (SQLite group-commits them): each is written
    or refused on its own. One is stale, one repeats a turn id (fails on its own), the
    others land."""
    a, b = SqlStore(db_url, exclusive=False), SqlStore(db_url, exclusive=False)
    await a.open()
    await b.open()
    refs = [SessionRef("t", "default", f"c{i}") for i in range(6)]
    states = [await a.load(ref, fence=20, window_tokens=1000) for ref in refs]
    await b.load(refs[1], fence=21, window_tokens=1000)  # a newer holder claims c1
    await a.commit(states[2], _turn("dup", "first"), fence=20)
    states[2] = await a.load(refs[2], fence=20, window_tokens=1000)
    results = await asyncio.gather(
        *(a.commit(state, _turn("dup" if i == 2 else f"c{i}", f"m{i}"), fence=20)
          for i, state in enumerate(states)),
        return_exceptions=True,
    )
    assert isinstance(results[1], StaleFence), results
    assert isinstance(results[2], Exception) and not isinstance(results[2], StaleFence), results
    assert [r is None for r in results] == [True, False, False, True, True, True], results
    for i, ref in enumerate(refs):
        contents = [m["content"] for m in await b.transcript(ref, 10)]
        assert contents == {1: [], 2: ["first", "re first"]}.get(i, [f"m{i}", f"re m{i}"])
    await a.close()
    await b.close()


async def test_postgres_writes_turns_that_finish_together_in_one_statement() -> None:
    """Ten turns finish at once: two are written as they come, the other eight wait and go
    together (rows written by one statement share its transaction id). Each keeps its own
    outcome: a stale one writes nothing, the others land with their memories."""
    with postgres_database() as url:
        a, b = SqlStore(url, exclusive=False), SqlStore(url, exclusive=False)
        await a.open()
        await b.open()
        refs = [SessionRef("t", "default", f"g{i}") for i in range(10)]
        states = [await a.load(ref, fence=30, window_tokens=1000) for ref in refs]
        await b.load(refs[6], fence=31, window_tokens=1000)  # g6's turn will be stale
        turns = [_turn(f"g{i}", f"m{i}", memories=[(f"fact {i}", i % 2 == 0)]) for i in range(10)]
        for i in (3, 4):
            turns[i].memory_scope = "agent"
        results = await asyncio.gather(*(a.commit(s, t, fence=30) for s, t in zip(states, turns)),
                                       return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["NoneType"] * 6 + ["StaleFence"] + ["NoneType"] * 3
        async with a.driver.connect() as conn:
            xmins = await conn.raw.fetch("SELECT DISTINCT xmin::text FROM turns")
            sessions = await conn.raw.fetch(
                "SELECT key, revision, next_seq, has_memories FROM sessions ORDER BY key")
        assert len(xmins) <= 3, xmins
        assert [tuple(r) for r in sessions] == [
            (f"g{i}", int(i != 6), 2 * (i != 6), i not in (3, 4, 6)) for i in range(10)]
        for i, (ref, state) in enumerate(zip(refs, states)):
            contents = [m["content"] for m in await a.transcript(ref, 10)]
            assert contents == ([] if i == 6 else [f"m{i}", f"re m{i}"])
            mine = [m.text for m in await a.memories(MemoryScope("t", "default", state.id), 10)]
            assert mine == ([] if i in (3, 4, 6) else [f"fact {i}"])
        shared = await a.memories(MemoryScope("t", "default", None), 10)
        assert sorted(m.text for m in shared) == ["fact 3", "fact 4"]
        await a.close()
        await b.close()


async def test_postgres_turn_writes_keep_their_connections_and_replace_lost_ones() -> None:
    """Turn writes run on the writer's own connections, kept from one write to the next; a
    statement's own error keeps its connection. With PostgreSQL unreachable a write and a
    load are 503s; once it is back, both work again at once, the writer on a new connection.
    Closing the store closes the writer's connections."""
    with postgres_database() as url:
        proxy = TcpProxy(5432).up()
        try:
            store = SqlStore(url.replace(":5432/", f":{proxy.port}/"), exclusive=False)
            await store.open()
            try:
                state = await store.load(SessionRef("t", "default", "w"), fence=1, window_tokens=1000)
                await store.commit(state, _turn(1, "one"), fence=1)
                await store.commit(state, _turn(2, "two"), fence=1)
                first = await _writer_pids(url)
                assert len(first) == 1
                with pytest.raises(asyncpg.UniqueViolationError):
                    await store.commit(state, _turn(2, "again"), fence=1)
                assert await _writer_pids(url) == first
                proxy.down()  # while no write runs: the next one does not find the dead connection
                with pytest.raises(Unavailable):
                    await store.load(state.ref, fence=2, window_tokens=1000)
                proxy.up()
                await store.commit(state, _turn(3, "three"), fence=1)
                second = await _writer_pids(url)
                assert len(second) == 1 and second != first
                proxy.down()
                with pytest.raises(Unavailable):
                    await store.commit(state, _turn(4, "lost"), fence=1)
                proxy.up()
                state = await store.load(state.ref, fence=3, window_tokens=1000)
                await store.commit(state, _turn(5, "five"), fence=3)
                assert [m["content"] for m in await store.transcript(state.ref, 10)] == [
                    "one", "re one", "two", "re two", "three", "re three", "five", "re five"]
            finally:
                await store.close()
            await eventually(lambda: _no_writers(url))
        finally:
            proxy.close()


async def _writer_pids(url: str) -> list[int]:
    conn = await asyncpg.connect(POSTGRES_ADMIN)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                                "AND application_name = 'laneway-writes'", url.rsplit("/", 1)[1])
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


async def _no_writers(url: str) -> bool:
    return await _writer_pids(url) == []


async def test_tail_is_bounded_and_reloads_a_window(store: SqlStore, db_url: str) -> None:
    ref = SessionRef("t", "default", "long")
    state = await store.load(ref, fence=1, window_tokens=200)
    for i in range(60):
        await store.commit(state, _turn(i, f"message number {i} " + "pad " * 10), fence=1)
    assert state.tail.tokens <= 2 * 200 + 50
    assert state.tail.messages[0]["role"] == "user"
    cold = SqlStore(db_url)
    await cold.open()
    loaded = await cold.load(ref, fence=2, window_tokens=200)
    assert loaded.turns == 60 and loaded.next_seq == 120
    assert loaded.tail.tokens >= 200
    assert loaded.tail.messages[-1]["content"] == "re message number 59 " + "pad " * 10
    await cold.close()


async def test_memory_search_and_scopes(store: SqlStore) -> None:
    ref = SessionRef("t", "default", "mem")
    state = await store.load(ref, fence=1, window_tokens=1000)
    await store.commit(
        state,
        _turn(1, "x", memories=[("Ann likes green tea", False), ("the launch is on Friday", True)]),
        fence=1,
    )
    scope = MemoryScope("t", "default", state.id)
    found = await store.search_memories(scope, "What tea does Ann like?", 5)
    assert [m.text for m in found] == ["Ann likes green tea"]
    recalled = await store.recall(scope, "does Ann like tea?", 5)
    assert [m.text for m in recalled] == ["the launch is on Friday", "Ann likes green tea"]
    assert [m.text for m in await store.recall(scope, "", 5)] == ["the launch is on Friday"]
    assert await store.recall(MemoryScope("t", "default", None), "tea", 5) == []
    assert await store.search_memories(MemoryScope("t", "default", None), "tea", 5) == []
    assert await store.search_memories(MemoryScope("u", "default", state.id), "tea", 5) == []
    assert await store.search_memories(scope, "the and of", 5) == []
    assert await store.search_memories(scope, 'tea" OR x NEAR(', 5)  # FTS syntax is neutralised
    await store.delete_session(ref)
    assert await store.search_memories(scope, "tea", 5) == []


def test_search_terms() -> None:
    assert search_terms("What does Ann like? Ann likes TEA!") == ["ann", "like", "likes", "tea"]
    assert search_terms("the a of") == []


async def test_list_sessions_pages(store: SqlStore) -> None:
    for i in range(5):
        state = await store.load(SessionRef("t", "default", f"k{i}"), fence=1, window_tokens=100)
        await store.commit(state, _turn(i, "x"), fence=1)
    other = await store.load(SessionRef("u", "default", "k"), fence=1, window_tokens=100)
    await store.commit(other, _turn(9, "x"), fence=1)
    page, cursor = await store.list_sessions("t", None, 3, None)
    assert [s.key for s in page] == ["k0", "k1", "k2"] and cursor
    page, cursor = await store.list_sessions("t", None, 3, cursor)
    assert [s.key for s in page] == ["k3", "k4"] and cursor is None
    everyone, _ = await store.list_sessions(None, None, 10, None)
    assert len(everyone) == 6


async def test_migration_0002_backfills_has_memories(db_url: str) -> None:
    """A database made by the first migration, with a memory in it, upgraded in place."""
    from laneway.store.migrate import upgrade

    scheme, rest = db_url.split("://", 1)
    driver = "sqlite+aiosqlite" if scheme == "sqlite" else "postgresql+asyncpg"
    engine = create_async_engine(f"{driver}://{rest}")
    async with engine.begin() as conn:
        await conn.run_sync(upgrade, "0001")
        for sql in (
            "INSERT INTO sessions (id, tenant, agent, key, created_at, updated_at, revision,"
            " next_seq, turns, fence) VALUES (1, 't', 'default', 'k', 0, 0, 1, 0, 1, 1)",
            "INSERT INTO sessions (id, tenant, agent, key, created_at, updated_at, revision,"
            " next_seq, turns, fence) VALUES (2, 't', 'default', 'k2', 0, 0, 1, 0, 1, 1)",
            "INSERT INTO memories (tenant, agent, session_id, text, pinned, created_at)"
            " VALUES ('t', 'default', 1, 'remember me', false, 0)",
        ):
            await conn.exec_driver_sql(sql)
    await engine.dispose()
    store = SqlStore(db_url)
    await store.open()  # runs 0002
    with_memory = await store.load(SessionRef("t", "default", "k"), fence=2, window_tokens=100)
    without = await store.load(SessionRef("t", "default", "k2"), fence=2, window_tokens=100)
    assert with_memory.has_memories and not without.has_memories
    await store.close()


async def test_migration_0003_keeps_transcripts_and_turns(db_url: str) -> None:
    """A database at 0002 with a session, its messages and an idempotent turn, upgraded in
    place to the session-clustered tables: the session reads back whole."""
    from laneway.store.migrate import upgrade

    scheme, rest = db_url.split("://", 1)
    driver = "sqlite+aiosqlite" if scheme == "sqlite" else "postgresql+asyncpg"
    engine = create_async_engine(f"{driver}://{rest}")
    now = time.time()
    async with engine.begin() as conn:
        await conn.run_sync(upgrade, "0002")
        await conn.exec_driver_sql(
            "INSERT INTO sessions (id, tenant, agent, key, created_at, updated_at, revision,"
            " next_seq, turns, fence) VALUES (7, 't', 'default', 'k', 0, 0, 1, 2, 1, 1)")
        for seq, role in enumerate(("user", "assistant")):
            await conn.exec_driver_sql(
                "INSERT INTO messages (session_id, seq, turn_id, data, tokens) VALUES "
                f"(7, {seq}, 'turn_a', '{{\"role\": \"{role}\", \"content\": \"m{seq}\"}}', 5)")
        await conn.exec_driver_sql(
            "INSERT INTO turns (id, session_id, status, created_at, started_at, finished_at,"
            " queue_wait_ms, usage, response, idempotency_key) VALUES ('turn_a', 7, 'completed',"
            f" {now}, {now}, {now}, 0, NULL, '{{\"id\": \"chatcmpl-a\"}}', 'idem-1')")
    await engine.dispose()
    store = SqlStore(db_url)
    await store.open()  # runs 0003
    ref = SessionRef("t", "default", "k")
    state = await store.load(ref, fence=2, window_tokens=1000)
    assert [m["content"] for m in state.tail.messages] == ["m0", "m1"]
    assert await store.idempotent_turn(ref, "idem-1", now - 60) == ("turn_a", {"id": "chatcmpl-a"})
    assert await store.idempotent_turn(ref, "idem-2", now - 60) is None
    await store.commit(state, _turn("b", "next"), fence=2)
    assert [t["id"] for t in await store.turns(ref, 10)] == ["turn_a", "turn_b"]
    await store.close()


def test_lookups_read_indexes_not_tables(tmp_path: Path) -> None:
    """SQLite's plans for the per-request statements: every table is searched through a key,
    and an idempotency key through its own index, not among all of its session's turns."""
    import sqlite3

    from laneway.store.sqlite import SqliteDriver
    from laneway.store.statements import Statements

    asyncio.run(_open_close(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    sql = Statements(SqliteDriver.dialect)
    plans = {
        name: " | ".join(row[3] for row in conn.execute(
            "EXPLAIN QUERY PLAN " + getattr(sql, name).text,
            [None] * len(getattr(sql, name).names)))
        for name in ("session_id", "find_session", "claim_session", "advance_session", "tail_first",
                     "tail_before", "turn", "turns", "idempotent_turn", "transcript", "summary")
    }
    assert all("SCAN" not in plan for plan in plans.values()), plans
    assert "INDEX ix_turns_idempotency" in plans["idempotent_turn"]
    conn.close()


async def _open_close(url: str) -> None:
    store = SqlStore(url)
    await store.open()
    await store.close()


async def test_sqlite_write_transactions_roll_back_and_report_unavailable(tmp_path: Path) -> None:
    """A failing block rolls back and its error goes on unchanged; SQLite's own failures (a
    bad statement, the database locked past the timeout) become `Unavailable`."""
    import sqlite3

    from laneway.errors import Unavailable
    from laneway.store.sqlite import SqliteDriver

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    driver = SqliteDriver(url)
    await driver.open()
    insert = ("INSERT INTO sessions (tenant, agent, key, created_at, updated_at, revision,"
              " next_seq, turns, fence) VALUES ('t', 'a', 'k', 0, 0, 0, 0, 0, 0)")
    count = "SELECT count(*) FROM sessions"
    with pytest.raises(KeyError):
        async with driver.transaction() as conn:
            conn.raw.execute(insert)
            raise KeyError("the block failed")
    with pytest.raises(Unavailable, match="no such table"):
        async with driver.transaction() as conn:
            conn.raw.execute("SELECT * FROM nowhere")
    other = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    async with driver.connect() as conn:
        conn.raw.execute("PRAGMA busy_timeout=10")
        with pytest.raises(Unavailable, match="locked"):
            async with driver.transaction():
                pass
        other.execute("ROLLBACK")
        other.close()
        async with driver.transaction():
            conn.raw.execute(insert)
        assert conn.raw.execute(count).fetchone()[0] == 1
        assert not conn.raw.in_transaction
    await driver.close()


async def test_cached_transcripts_cost_about_their_size(store: SqlStore) -> None:
    """A session's cached tail keeps each message's JSON at its own size. (orjson's `bytes`
    keep a buffer of 4 KiB or more however short the JSON: cached for every message of 4,096
    sessions, that grew the server by 10 KB a turn.)"""
    ref = SessionRef("t", "default", "sizes")
    state = await store.load(ref, fence=1, window_tokens=100_000)
    await store.commit(state, _turn(0, "warm"), fence=1)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(1, 101):
            await store.commit(state, _turn(n, f"message {n}"), fence=1)
        gc.collect()
        per_message = (tracemalloc.get_traced_memory()[0] - before) / 200
    finally:
        tracemalloc.stop()
    assert len(state.tail) == 202
    assert per_message < 1024, f"{per_message:.0f} bytes kept per cached message"


async def test_sqlite_store_is_held_by_its_process_alone(tmp_path: Path) -> None:
    """The store opens SQLite through `unix-excl` (no lock system calls per statement):
    another process cannot read it while it is open, and can once it is closed."""
    path = tmp_path / "db.sqlite"
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0);"
              "print(c.execute('SELECT count(*) FROM sessions').fetchone()[0])")
    read = [sys.executable, "-c", script, str(path)]
    store = SqlStore(f"sqlite:///{path}")
    await store.open()
    try:
        await store.load(SessionRef("t", "default", "held"), fence=1, window_tokens=1000)
        held = subprocess.run(read, capture_output=True, text=True, timeout=60)
        assert held.returncode != 0 and "database is locked" in held.stderr, held
    finally:
        await store.close()
    released = subprocess.run(read, capture_output=True, text=True, timeout=60)
    assert released.returncode == 0 and released.stdout.strip() == "1", released


async def test_sqlite_wal_is_checkpointed_in_the_background_and_truncated_at_close(
    tmp_path: Path,
) -> None:
    """The checkpoint thread sleeps until a commit marks the WAL grown, then moves it into
    the database file (which grows by the new pages); closing empties the WAL."""
    path = tmp_path / "db.sqlite"
    store = SqlStore(f"sqlite:///{path}")
    await store.open()
    try:
        before = path.stat().st_size
        ref = SessionRef("t", "default", "wal")
        state = await store.load(ref, fence=1, window_tokens=1000)
        for n in range(20):
            await store.commit(state, _turn(n, "x" * 8000), fence=1)
        deadline = time.monotonic() + 20
        while path.stat().st_size == before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert path.stat().st_size > before, "nothing was checkpointed"
    finally:
        await store.close()
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
