"""SQLite through the stdlib `sqlite3` module, on the event loop's own thread.

In WAL mode with `synchronous=NORMAL` a turn's commit takes about 40 µs and never waits
for the disk, so running it inline costs less than handing it to a thread (aiosqlite's
hops cost more than the work). Checkpoints, which do wait for the disk, run on a
background thread with their own connection. Statements here never suspend, so a
transaction cannot interleave with another coroutine's.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.dialects import sqlite as sqlite_dialect

from laneway.errors import Unavailable
from laneway.store.base import MemoryScope, StaleFence
from laneway.store.driver import Row, TurnWrite
from laneway.store.migrate import upgrade
from laneway.store.statements import Sql, Statements

logger = logging.getLogger(__name__)

_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=10000",
            "wal_autocheckpoint=0", "cache_size=-32000")
_SEARCH = (
    "SELECT m.id, m.text, m.pinned, m.created_at FROM memories_fts "
    "JOIN memories m ON m.id = memories_fts.rowid "
    "WHERE memories_fts MATCH ? AND m.tenant = ? AND m.agent = ? AND m.session_id IS ? "
    "ORDER BY bm25(memories_fts) LIMIT ?"
)


class SqliteConn:
    __slots__ = ("raw",)

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    async def fetch(self, sql: Sql, params: dict[str, Any]) -> list[Row]:
        return self.raw.execute(sql.text, sql.args(params)).fetchall()

    async def execute(self, sql: Sql, params: dict[str, Any]) -> int:
        return self.raw.execute(sql.text, sql.args(params)).rowcount

    async def executemany(self, sql: Sql, rows: list[dict[str, Any]]) -> None:
        self.raw.executemany(sql.text, [sql.args(r) for r in rows])

    async def search(self, scope: MemoryScope, terms: list[str], limit: int) -> list[Row]:
        if not terms:
            return []
        match = " OR ".join(f'"{w}"' for w in terms)
        args = (match, scope.tenant, scope.agent, scope.session_id, limit)
        return self.raw.execute(_SEARCH, args).fetchall()

    async def recall(
        self, pinned: Sql, params: dict[str, Any], terms: list[str], limit: int
    ) -> tuple[list[Row], list[Row]]:
        scope = MemoryScope(params["tenant"], params["agent"], params["sid"])
        return await self.fetch(pinned, params), await self.search(scope, terms, limit)


class SqliteDriver:
    dialect = sqlite_dialect.dialect(paramstyle="qmark")

    def __init__(self, url: str) -> None:
        self.path = url.split(":///", 1)[1] if ":///" in url else ":memory:"
        self._conn: SqliteConn | None = None
        self._checkpointer: _Checkpointer | None = None

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{self.path}")
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                upgrade(conn)
        finally:
            engine.dispose()
        raw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in _PRAGMAS:
            raw.execute(f"PRAGMA {pragma}")
        self._conn = SqliteConn(raw)
        if self.path != ":memory:":
            self._checkpointer = _Checkpointer(self.path)

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._conn is not None:
            self._conn.raw.close()
            self._conn = None

    async def commit_turn(self, sql: Statements, write: TurnWrite) -> None:
        async with self.transaction() as conn:
            if await conn.execute(sql.advance_session, write.session) != 1:
                raise StaleFence("the session was claimed by a newer lane grant")
            await conn.execute(sql.insert_turn, write.turn)
            if write.messages:
                await conn.executemany(sql.insert_message, write.messages)
            if write.memories:
                await conn.executemany(sql.insert_memory, write.memories)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[SqliteConn]:
        assert self._conn is not None, "store is not open"
        yield self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteConn]:
        conn = self._conn
        assert conn is not None, "store is not open"
        try:
            conn.raw.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.raw.execute("ROLLBACK")
                raise
            conn.raw.execute("COMMIT")
        except sqlite3.OperationalError as e:  # disk full, I/O error, locked past the timeout
            raise Unavailable(f"the store (SQLite) cannot write: {e}", retry_after=1.0) from None
        if self._checkpointer is not None:
            self._checkpointer.dirty.set()


class _Checkpointer:
    """Moves the WAL into the database off the event loop, at most twice a second."""

    def __init__(self, path: str) -> None:
        self.dirty = threading.Event()
        self._stopping = threading.Event()
        self._path = path
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")
        try:
            while not self._stopping.is_set():
                if self.dirty.wait(0.5) and not self._stopping.wait(0.5):
                    self.dirty.clear()
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            logger.exception("WAL checkpoint failed")
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self.dirty.set()
        self._thread.join()
