"""SQLite through the stdlib `sqlite3` module, on the event loop's own thread.

In WAL mode with `synchronous=NORMAL` a turn's commit takes about 40 µs and never waits
for the disk, so running it inline costs less than handing it to a thread (aiosqlite's
hops cost more than the work). Checkpoints, which do wait for the disk, run on a
background thread with their own connection. Statements here never suspend, so a
transaction cannot interleave with another coroutine's.

Turns are group-committed: the first turn that finishes in an event-loop iteration commits
at once, and those that finish after it in the same iteration (a burst of model replies
under load) share one transaction at the start of the next, which costs about a sixth of
one transaction each. Writing the first at once spares a lone turn the two loop iterations
of waiting for a group (40 µs of CPU per turn at concurrency 1). A turn still gets its
answer only after its own write is durable, and the write of each stays conditional on
its own fence.

Both connections open the file through SQLite's `unix-excl` VFS: the process holds the
database's lock for as long as it runs, and the WAL index lives in its memory instead of a
shared `-shm` file. The default VFS takes and drops a `fcntl` lock in that file around every
statement and transaction, 6.4 system calls per turn; `unix-excl` takes none. The price is
that no other process can open the database while laneway has it open (they get
"database is locked"), which one process owning its embedded store never needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine
from sqlalchemy.dialects import sqlite as sqlite_dialect

from laneway.errors import Unavailable
from laneway.store.base import MemoryScope
from laneway.store.driver import Row, TurnWrite, settle, stale_write
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
        #: Turn writes waiting for the next group commit, each with its waiter.
        self._pending: list[tuple[Statements, TurnWrite, asyncio.Future[None]]] = []
        #: Whether a turn write was committed at once in this loop iteration.
        self._wrote_now = False
        self._loop: asyncio.AbstractEventLoop | None = None  # set by `open` (see commit_turn)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(f"sqlite:///{self.path}")
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                upgrade(conn)
        finally:
            engine.dispose()
        raw = _connect(self.path, check_same_thread=False)
        for pragma in _PRAGMAS:
            raw.execute(f"PRAGMA {pragma}")
        self._conn = SqliteConn(raw)
        if self.path != ":memory:":
            self._checkpointer = _Checkpointer(self.path)

    async def close(self) -> None:
        if self._pending and self._conn is not None:
            self._flush()  # writes queued in this very iteration
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._conn is not None:
            self._conn.raw.close()
            self._conn = None

    async def commit_turn(self, sql: Statements, write: TurnWrite) -> None:
        loop = self._loop  # held: each get_running_loop() is a getpid system call on 3.11
        assert loop is not None, "store is not open"
        if not self._wrote_now:
            self._wrote_now = True
            loop.call_soon(self._next_iteration)
            if self._write_all([(sql, write)])[0]:
                raise stale_write()
            return
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((sql, write, future))
        await future

    def _next_iteration(self) -> None:
        self._wrote_now = False

    def _flush(self) -> None:
        """Commit every pending turn write in one transaction. If one of them fails for a
        reason of its own (not a stale fence), commit them one by one so that it fails
        alone."""
        batch, self._pending = self._pending, []
        batch = [item for item in batch if not item[2].done()]  # waiter cancelled: drop it
        if not batch:
            return
        if len(batch) > 1:
            try:
                stale = self._write_all([(sql, write) for sql, write, _ in batch])
            except sqlite3.IntegrityError:
                pass  # below, one by one
            except Exception as e:
                _settle_all(batch, e)
                return
            else:
                for (_, _, future), is_stale in zip(batch, stale):
                    settle(future, stale_write() if is_stale else None)
                return
        for sql, write, future in batch:
            try:
                one_stale = self._write_all([(sql, write)])[0]
            except Exception as e:
                settle(future, e)
            else:
                settle(future, stale_write() if one_stale else None)

    def _write_all(self, writes: list[tuple[Statements, TurnWrite]]) -> list[bool]:
        """One transaction; a write whose session no longer carries its fence writes
        nothing (its first statement changed no row). Returns which ones were stale."""
        stale = []
        with self._immediate() as raw:
            for sql, write in writes:
                advanced = raw.execute(sql.advance_session.text,
                                       sql.advance_session.args(write.session)).rowcount
                stale.append(advanced != 1)
                if advanced != 1:
                    continue
                raw.execute(sql.insert_turn.text, sql.insert_turn.args(write.turn))
                if write.messages:
                    raw.executemany(sql.insert_message.text,
                                    [sql.insert_message.args(m) for m in write.messages])
                if write.memories:
                    raw.executemany(sql.insert_memory.text,
                                    [sql.insert_memory.args(m) for m in write.memories])
        return stale

    def _immediate(self) -> _Immediate:
        assert self._conn is not None, "store is not open"
        return _Immediate(self._conn.raw, self._checkpointer)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[SqliteConn]:
        assert self._conn is not None, "store is not open"
        yield self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteConn]:
        assert self._conn is not None, "store is not open"
        with self._immediate():
            yield self._conn


class _Immediate:
    """A write transaction: committed if the block returns, rolled back if it raises;
    SQLite's own failures (disk full, I/O error, locked past the timeout) become
    `Unavailable`, and the checkpointer learns that the WAL grew. A class, not
    `contextlib.contextmanager`: its generator cost 6 K instructions per turn."""

    __slots__ = ("raw", "checkpointer")

    def __init__(self, raw: sqlite3.Connection, checkpointer: _Checkpointer | None) -> None:
        self.raw = raw
        self.checkpointer = checkpointer

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise _unavailable(e) from None
        return self.raw

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 _tb: Any) -> None:
        try:
            self.raw.execute("ROLLBACK" if kind is not None else "COMMIT")
        except sqlite3.OperationalError as e:
            raise _unavailable(e) from None
        if isinstance(error, sqlite3.OperationalError):
            raise _unavailable(error) from None
        if kind is None and self.checkpointer is not None:
            self.checkpointer.mark()


def _connect(path: str, **options: Any) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are begun explicitly) through the
    `unix-excl` VFS (see the module's docstring)."""
    if path == ":memory:":
        conn: sqlite3.Connection = sqlite3.connect(path, isolation_level=None, **options)
    else:
        uri = f"file:{quote(path)}?vfs=unix-excl"
        conn = sqlite3.connect(uri, isolation_level=None, uri=True, **options)
    return conn


def _unavailable(error: sqlite3.OperationalError) -> Unavailable:
    return Unavailable(f"the store (SQLite) cannot write: {error}", retry_after=1.0)


def _settle_all(batch: list[tuple[Statements, TurnWrite, asyncio.Future[None]]],
                error: BaseException) -> None:
    for _, _, future in batch:
        settle(future, error)


class _Checkpointer:
    """Moves the WAL into the database off the event loop, at most twice a second. It
    sleeps until a commit marks the WAL grown: an idle store wakes no thread."""

    def __init__(self, path: str) -> None:
        self.dirty = threading.Event()
        self._stopping = threading.Event()
        self._path = path
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = _connect(self._path)
        conn.execute("PRAGMA busy_timeout=10000")
        try:
            while not self._stopping.is_set():
                self.dirty.wait()
                if not self._stopping.wait(0.5):
                    self.dirty.clear()
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            logger.exception("WAL checkpoint failed")
        finally:
            conn.close()

    def mark(self) -> None:
        """The WAL has grown. (Setting the event only when clear: it takes a lock.)"""
        if not self.dirty.is_set():
            self.dirty.set()

    def stop(self) -> None:
        self._stopping.set()
        self.dirty.set()
        self._thread.join()
