"""Bulk-create sessions straight in a gateway's store, in the schema its migrations made (the
gateway is started once to migrate, stopped, seeded, restarted): its SQLite file, or its
PostgreSQL database.

Going through the API would take hours for a million sessions; one transaction of bulk
inserts, rows in index order, takes seconds (`executemany` on SQLite, `COPY` on PostgreSQL).
Each seeded turn is what a real one leaves: a session row, a user and an assistant message,
a turn record.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson

from laneway.tokens import estimate_message

TENANT = "default"
AGENT = "default"
_USAGE = '{"total_tokens": 40}'


def seed_sqlite(db: Path, keys: Sequence[str], turns: int, chars: int = 60) -> None:
    """Give each key a session of `turns` turns whose messages have ~`chars` characters, in
    the SQLite file `db`."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for pragma in ("synchronous=OFF", "cache_size=-400000", "temp_store=MEMORY"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN IMMEDIATE")
        first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM sessions").fetchone()[0]
        rows = _Rows(first, keys, turns, chars)
        conn.executemany(
            "INSERT INTO sessions (id, tenant, agent, key, created_at, updated_at, revision, "
            "next_seq, turns, fence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows.sessions())
        conn.executemany(
            "INSERT INTO messages (session_id, seq, turn_id, data, tokens) VALUES (?, ?, ?, ?, ?)",
            rows.messages())
        conn.executemany(
            "INSERT INTO turns (id, session_id, status, created_at, started_at, finished_at, "
            "queue_wait_ms, usage) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows.turns())
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def seed_postgres(dsn: str, keys: Sequence[str], turns: int, chars: int = 60) -> None:
    """The same in the PostgreSQL database at `dsn`: the rows by `COPY`, then the sessions'
    id sequence moved past them (new sessions take ids after the seeded ones) and the tables
    analyzed, as a database that grew by use would be."""

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                # The rows are consistent by construction: skip the per-row foreign-key
                # triggers, as `pg_restore --disable-triggers` does (a superuser's setting).
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute("LOCK TABLE sessions IN EXCLUSIVE MODE")
                first = await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM sessions")
                rows = _Rows(first, keys, turns, chars)
                await conn.copy_records_to_table("sessions", records=rows.sessions(), columns=(
                    "id", "tenant", "agent", "key", "created_at", "updated_at", "revision",
                    "next_seq", "turns", "fence"))
                await conn.copy_records_to_table("messages", records=rows.messages(), columns=(
                    "session_id", "seq", "turn_id", "data", "tokens"))
                await conn.copy_records_to_table("turns", records=rows.turns(), columns=(
                    "id", "session_id", "status", "created_at", "started_at", "finished_at",
                    "queue_wait_ms", "usage"))
                await conn.execute("SELECT setval(pg_get_serial_sequence('sessions', 'id'), "
                                   "(SELECT max(id) FROM sessions))")
            await conn.execute("ANALYZE sessions, messages, turns")
        finally:
            await conn.close()

    asyncio.run(run())


class _Rows:
    """The rows of `turns`-turn sessions for `keys`, ids from `first`, keys in index order
    (appends instead of page splits)."""

    def __init__(self, first: int, keys: Sequence[str], turns: int, chars: int) -> None:
        self.first, self.keys, self.turns_each, self.chars = first, sorted(keys), turns, chars
        self.now = time.time()

    def sessions(self) -> Iterator[tuple[object, ...]]:
        t, now = self.turns_each, self.now
        for i, key in enumerate(self.keys):
            yield self.first + i, TENANT, AGENT, key, now, now, t, 2 * t, t, 0

    def messages(self) -> Iterator[tuple[object, ...]]:
        one = []  # (seq, data, tokens) of one session, the same for every session
        for t in range(self.turns_each):
            for i, (role, kind) in enumerate((("user", "question"), ("assistant", "answer"))):
                message = {"role": role, "content": _text(kind, t, self.chars)}
                one.append((2 * t + i, orjson.dumps(message).decode(), estimate_message(message)))
        for s in range(self.first, self.first + len(self.keys)):
            for seq, data, tokens in one:
                yield s, seq, "turn_seeded", data, tokens

    def turns(self) -> Iterator[tuple[object, ...]]:
        t, now = self.turns_each, self.now
        ids = sorted(f"turn_{secrets.token_hex(12)}" for _ in range(len(self.keys) * t))
        for n, turn_id in enumerate(ids):
            yield turn_id, self.first + n // t, "completed", now, now, now, 0.0, _USAGE


def _text(kind: str, turn: int, chars: int) -> str:
    head = f"seeded {kind} {turn}: "
    words = "the quarterly plan lists budget hiring roadmap risks owners dates "
    return (head + words * (chars // len(words) + 1))[:max(chars, len(head))]
