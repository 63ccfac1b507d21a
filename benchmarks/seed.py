"""Bulk-create sessions straight in a gateway's SQLite file, in the schema its migrations made
(the gateway is started once on the data dir to migrate, stopped, seeded, restarted).

Going through the API would take hours for a million sessions; `executemany` in one
transaction, rows in index order, takes seconds. Each seeded turn is what a real one leaves:
a session row, a user and an assistant message, a turn record.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson

from laneway.tokens import estimate_message

TENANT = "default"
AGENT = "default"


def _text(kind: str, turn: int, chars: int) -> str:
    head = f"seeded {kind} {turn}: "
    words = "the quarterly plan lists budget hiring roadmap risks owners dates "
    return (head + words * (chars // len(words) + 1))[:max(chars, len(head))]


def seed(db: Path, keys: Sequence[str], turns: int, chars: int = 60) -> None:
    """Give each key a session of `turns` turns whose messages have ~`chars` characters."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for pragma in ("synchronous=OFF", "cache_size=-400000", "temp_store=MEMORY"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN IMMEDIATE")
        first = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM sessions").fetchone()[0]
        ordered = sorted(keys)  # index order: appends instead of page splits
        now = time.time()
        conn.executemany(
            "INSERT INTO sessions (id, tenant, agent, key, created_at, updated_at, revision, "
            "next_seq, turns, fence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (
                (first + i, TENANT, AGENT, key, now, now, turns, 2 * turns, turns)
                for i, key in enumerate(ordered)
            ),
        )
        conn.executemany(
            "INSERT INTO messages (session_id, seq, turn_id, data, tokens) VALUES (?, ?, ?, ?, ?)",
            _messages(first, len(ordered), turns, chars),
        )
        ids = sorted(f"turn_{secrets.token_hex(12)}" for _ in range(len(ordered) * turns))
        conn.executemany(
            "INSERT INTO turns (id, session_id, status, created_at, started_at, finished_at, "
            "queue_wait_ms, usage, response, idempotency_key) "
            "VALUES (?, ?, 'completed', ?, ?, ?, 0, ?, NULL, NULL)",
            (
                (turn_id, first + n // turns, now, now, now, '{"total_tokens": 40}')
                for n, turn_id in enumerate(ids)
            ),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _messages(first: int, sessions: int, turns: int, chars: int) -> Iterator[tuple[object, ...]]:
    rows = []  # (seq, data, tokens) of one session, the same for every session
    for t in range(turns):
        for i, (role, kind) in enumerate((("user", "question"), ("assistant", "answer"))):
            message = {"role": role, "content": _text(kind, t, chars)}
            rows.append((2 * t + i, orjson.dumps(message).decode(), estimate_message(message)))
    for s in range(first, first + sessions):
        for seq, data, tokens in rows:
            yield s, seq, "turn_seeded", data, tokens
