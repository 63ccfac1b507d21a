"""PostgreSQL through asyncpg's own pool, which prepares and caches each statement once
per connection. Migrations run through SQLAlchemy's asyncpg engine at start; turn writes
go through `pgwrites.GroupWriter`, which puts the turns that finish together into one
statement."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.ext.asyncio import create_async_engine

from laneway.errors import Unavailable
from laneway.store.base import MemoryScope
from laneway.store.driver import Row, TurnWrite
from laneway.store.migrate import upgrade
from laneway.store.pgwrites import GroupWriter
from laneway.store.statements import Sql, Statements

_SEARCH = (
    "SELECT id, text, pinned, created_at FROM memories "
    "WHERE tenant = $1 AND agent = $2 AND session_id {owner} "
    "AND tsv @@ to_tsquery('english', $3) "
    "ORDER BY ts_rank(tsv, to_tsquery('english', $3)) DESC LIMIT $4"
)
_SEARCH_SESSION = _SEARCH.format(owner="= $5")
_SEARCH_AGENT = _SEARCH.format(owner="IS NULL")
# Pinned memories and the search in one round trip; `kind` tells the two apart.
_RECALL = (
    "(SELECT id, text, pinned, created_at, 0 AS kind FROM memories "
    "WHERE tenant = $1 AND agent = $2 AND session_id {owner} AND pinned "
    "ORDER BY id DESC LIMIT $4) UNION ALL "
    "(SELECT id, text, pinned, created_at, 1 FROM memories "
    "WHERE tenant = $1 AND agent = $2 AND session_id {owner} AND $3 <> '' "
    "AND tsv @@ to_tsquery('english', $3) "
    "ORDER BY ts_rank(tsv, to_tsquery('english', $3)) DESC LIMIT $4)"
)
_RECALL_SESSION = _RECALL.format(owner="= $5")
_RECALL_AGENT = _RECALL.format(owner="IS NULL")
#: A connection attempt gives up after this: when PostgreSQL is down, requests fail fast.
#: Waiting for a free pooled connection has no limit of its own (queries have one, 30 s),
#: so a burst of load queues instead of failing.
_CONNECT_S = 3.0
#: Pooled connections per replica by default (`--store-pool-size`), for reads and claims: a
#: turn holds one only for a statement; turn writes have `WRITERS` connections of their own.
#: At 32 concurrent turns a pool of 20 served 7% fewer turns a second than one of 2-8: its
#: turns went to more server processes, each slower to wake (see the README).
POOL_SIZE = 6
#: Turn-write statements in flight at once per replica, each on a connection of its own
#: (see `pgwrites`).
WRITERS = 2


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """The store keeps no session state on a connection (no SET, LISTEN, cursors or advisory
    locks), so the reset query asyncpg's pool runs on every release (a round trip, 8% of a
    turn's CPU with Postgres + Redis) has nothing to undo. Open transactions are still
    rolled back by the pool."""

    def get_reset_query(self) -> str:
        return ""


class PostgresConn:
    __slots__ = ("raw",)

    def __init__(self, raw: asyncpg.Connection) -> None:
        self.raw = raw

    async def fetch(self, sql: Sql, params: dict[str, Any]) -> list[Row]:
        return [tuple(r) for r in await self.raw.fetch(sql.text, *sql.args(params))]

    async def execute(self, sql: Sql, params: dict[str, Any]) -> int:
        status: str = await self.raw.execute(sql.text, *sql.args(params))
        return int(status.rsplit(" ", 1)[-1])

    async def executemany(self, sql: Sql, rows: list[dict[str, Any]]) -> None:
        await self.raw.executemany(sql.text, [sql.args(r) for r in rows])

    async def search(self, scope: MemoryScope, terms: list[str], limit: int) -> list[Row]:
        query = " | ".join(terms)
        if scope.session_id is None:
            rows = await self.raw.fetch(_SEARCH_AGENT, scope.tenant, scope.agent, query, limit)
        else:
            rows = await self.raw.fetch(
                _SEARCH_SESSION, scope.tenant, scope.agent, query, limit, scope.session_id
            )
        return [tuple(r) for r in rows]


    async def recall(
        self, pinned: Sql, params: dict[str, Any], terms: list[str], limit: int
    ) -> tuple[list[Row], list[Row]]:
        base = (params["tenant"], params["agent"], " | ".join(terms), limit)
        if params["sid"] is None:
            rows = await self.raw.fetch(_RECALL_AGENT, *base)
        else:
            rows = await self.raw.fetch(_RECALL_SESSION, *base, params["sid"])
        return ([tuple(r)[:4] for r in rows if r["kind"] == 0],
                [tuple(r)[:4] for r in rows if r["kind"] == 1])


class PostgresDriver:
    dialect = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        self.dsn = "postgresql://" + url.split("://", 1)[1]
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._writer = GroupWriter(self._open_writer, self._unavailable_when_down, WRITERS)

    async def open(self) -> None:
        engine = create_async_engine("postgresql+asyncpg://" + self.dsn.split("://", 1)[1])
        try:
            async with engine.begin() as conn:
                await conn.run_sync(upgrade)
        finally:
            await engine.dispose()
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self._pool_size, command_timeout=30, timeout=_CONNECT_S,
            connection_class=_Connection, server_settings={"application_name": "laneway"},
        )

    async def close(self) -> None:
        await self._writer.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[PostgresConn]:
        assert self._pool is not None, "store is not open"
        async with self._unavailable_when_down(), self._pool.acquire() as raw:
            yield PostgresConn(raw)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresConn]:
        assert self._pool is not None, "store is not open"
        async with self._unavailable_when_down(), self._pool.acquire() as raw, raw.transaction():
            yield PostgresConn(raw)

    async def commit_turn(self, sql: Statements, write: TurnWrite) -> None:
        await self._writer.write(write)

    async def _open_writer(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, command_timeout=30, timeout=_CONNECT_S,
                                     server_settings={"application_name": "laneway-writes"})

    @contextlib.asynccontextmanager
    async def _unavailable_when_down(self) -> AsyncIterator[None]:
        """A lost or refused connection is a 503 (the transaction, if any, rolled back).
        The pool's other connections are likely dead too: replace them all, so service
        resumes at once when PostgreSQL is back."""
        try:
            yield
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError) as e:
            if self._pool is not None:
                await self._pool.expire_connections()
            raise Unavailable(f"the store (PostgreSQL) is unreachable: {type(e).__name__}",
                              retry_after=1.0) from None
