"""PostgreSQL's own CPU per turn write, for variants of the tables or of the writing session,
to find what would make the distributed backend's one statement per turn cheaper.

Each variant gets a database of its own, migrated by laneway, then changed by the variant's
statements; 32 sessions take turns of two messages each, written one at a time through
laneway's `GroupWriter` (the one-turn statement that a turn at concurrency 1 sends). The
figure is the CPU of the PostgreSQL backend that ran them, from /proc (`procs.cpu_seconds`),
so PostgreSQL must run on this machine. Variants run interleaved, `--repeats` times.

    python -m benchmarks.pgwrite [--dsn postgresql://postgres@127.0.0.1/test]
                                 [--turns 3000] [--repeats 3] [variant ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import time
from collections.abc import AsyncIterator

import asyncpg
import orjson

from benchmarks.procs import cpu_seconds
from laneway.store.driver import TurnWrite
from laneway.store.pgwrites import GroupWriter
from laneway.store.sql import SqlStore

#: name: (statements on the migrated database, statements on the writing connection)
VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "as-is": ([], []),
    # What `pg_restore --disable-triggers` does: no foreign-key checks (needs a superuser).
    "no-fk-triggers": ([], ["SET session_replication_role = replica"]),
    # Messages keyed by (session_id, seq) alone: no id sequence, one index fewer.
    "no-message-id": (["ALTER TABLE messages DROP COLUMN id"], []),
    # Room in each page of sessions for its updated row (a HOT update, no index entries).
    "fillfactor-70": (["ALTER TABLE sessions SET (fillfactor = 70)"], []),
    # The commit does not wait for the WAL flush: a 2xx would no longer mean durable.
    "async-commit": ([], ["SET synchronous_commit = off"]),
}
SESSIONS = 32


@contextlib.asynccontextmanager
async def _database(dsn: str) -> AsyncIterator[str]:
    name = "laneway_pgwrite_" + secrets.token_hex(4)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield dsn.rsplit("/", 1)[0] + "/" + name
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def _errors_as_raised() -> AsyncIterator[None]:
    """`GroupWriter`'s error mapping (the driver's turns a lost PostgreSQL into
    `Unavailable`); a benchmark lets asyncpg's own errors through."""
    yield


async def _measure(dsn: str, variant: str, turns: int) -> float:
    """ms of the writing backend's CPU per turn."""
    tables, session = VARIANTS[variant]
    async with _database(dsn) as url:
        store = SqlStore(url)  # opening it migrates the database
        await store.open()
        await store.close()
        setup = await asyncpg.connect(url)
        for statement in tables:
            await setup.execute(statement)
        now = time.time()
        sids = [await setup.fetchval(
            "INSERT INTO sessions (tenant, agent, key, created_at, updated_at, revision,"
            " next_seq, turns, fence) VALUES ('t', 'a', $1, $2, $2, 0, 0, 0, 1) RETURNING id",
            f"k{i}", now) for i in range(SESSIONS)]
        await setup.close()
        backends: list[int] = []

        async def open_writer() -> asyncpg.Connection:
            conn = await asyncpg.connect(url)
            for statement in session:
                await conn.execute(statement)
            backends.append(conn.get_server_pid())
            return conn

        writer = GroupWriter(open_writer, _errors_as_raised, 1)
        revisions = dict.fromkeys(sids, 0)
        try:
            warm = 200
            for i in range(warm + turns):
                if i == warm:
                    start = cpu_seconds(backends[0])
                sid = sids[i % SESSIONS]
                await writer.write(_write(sid, revisions[sid], i))
                revisions[sid] += 1
            used = cpu_seconds(backends[0]) - start
        finally:
            await writer.close()
        if len(backends) != 1:
            raise SystemExit(f"{variant}: the writer's connection was replaced mid-run")
        check = await asyncpg.connect(url)
        written = await check.fetchval("SELECT count(*) FROM messages")
        await check.close()
        if written != 2 * (warm + turns):
            raise SystemExit(f"{variant}: {written} messages written, not {2 * (warm + turns)}")
        return 1000 * used / turns


def _write(sid: int, revision: int, i: int) -> TurnWrite:
    now = time.time()
    return TurnWrite(
        session={"sid": sid, "fence": 1, "revision": revision, "now": now, "added": 2,
                 "memories": False},
        turn={"id": f"turn_{i:024x}", "session_id": sid, "status": "completed",
              "created_at": now, "started_at": now, "finished_at": now, "queue_wait_ms": 0.1,
              "usage": '{"prompt_tokens":40,"completion_tokens":20,"total_tokens":60}',
              "response": _json({"id": f"chatcmpl-{i}", "object": "chat.completion"}),
              "idempotency_key": None},
        messages=[{"session_id": sid, "seq": 2 * revision + k, "turn_id": f"turn_{i:024x}",
                   "data": _json({"role": role, "content": "x" * 60}), "tokens": 20}
                  for k, role in enumerate(("user", "assistant"))],
        memories=[],
    )


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


async def _run(dsn: str, variants: list[str], turns: int, repeats: int) -> None:
    figures: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            figures[variant].append(await _measure(dsn, variant, turns))
    print(f"{'variant':<16} {'median':>7}  runs (ms of PostgreSQL CPU per turn)")
    for variant, runs in figures.items():
        print(f"{variant:<16} {statistics.median(runs):>7.3f}  "
              + " ".join(f"{r:.3f}" for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help=f"some of {', '.join(VARIANTS)} (all)")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--turns", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"no variant {', '.join(sorted(unknown))}; the variants: {', '.join(VARIANTS)}")
    asyncio.run(_run(args.dsn, args.variants or list(VARIANTS), args.turns, args.repeats))


if __name__ == "__main__":
    main()
