"""Turn writes to PostgreSQL: a lone turn's goes at once, turns that finish together share
one statement.

Each statement costs PostgreSQL far more than each turn in it: on this project's VM a
turn written alone took 0.31 ms of the server's CPU, and 0.14 / 0.08 ms each in statements
of 4 / 8 turns. So at most `writers` statements are in flight; a turn that finishes while
they are busy waits, and the next statement carries every turn waiting by then. A turn at
concurrency 1 never waits, and writes with the one-turn statement, the cheaper of the two
(by 0.06 ms of server CPU). Each turn still gets its answer only when its own write is
durable, and each stays conditional on its own fence and revision.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import orjson

from laneway.store.driver import TurnWrite, settle, stale_write

# A turn's whole write in one statement (one round trip, atomic): the session row is
# advanced only if it still carries this holder's fence and the revision the turn read, and
# every insert reads from that update, so a stale holder writes nothing and gets 0.
_ADVANCE = """
WITH s AS (
  UPDATE sessions SET updated_at = $1, revision = revision + 1, next_seq = next_seq + $2,
         turns = turns + 1, fence = $3, has_memories = has_memories OR $6
  WHERE id = $4 AND fence <= $3 AND revision = $5 RETURNING id
), t AS (
  INSERT INTO turns (id, session_id, status, created_at, started_at, finished_at,
                     queue_wait_ms, usage, response, idempotency_key)
  SELECT $7, s.id, $8, $9, $10, $11, $12, $13, $14, $15 FROM s
)"""
_FIXED = 15  # the parameters of `_ADVANCE`
_MESSAGES = """, m AS (
  INSERT INTO messages (session_id, seq, turn_id, data, tokens)
  SELECT s.id, x.seq, $7, x.data, x.tokens FROM s, (VALUES {rows}) AS x(seq, data, tokens)
)"""
#: A turn's messages go as scalar parameters, not arrays: asyncpg checks each element of an
#: array against three abstract base classes and escapes text arrays character by character.
#: Turns with more messages, or with memories (both rare), take the batched statement.
_INLINE = 16


def _commit_turn(messages: int) -> str:
    rows = ", ".join(f"(${_FIXED + 3 * i + 1}::integer, ${_FIXED + 3 * i + 2}::text, "
                     f"${_FIXED + 3 * i + 3}::integer)" for i in range(messages))
    return _ADVANCE + (_MESSAGES.format(rows=rows) if messages else "") + "\nSELECT count(*) FROM s"


_COMMIT_TURN = [_commit_turn(n) for n in range(_INLINE + 1)]

# Several turns (of different sessions) in one statement: the same conditions per session;
# each insert keeps the rows of the sessions that advanced. Returns those sessions' ids.
# Each table's rows come as one JSON array of the dicts a `TurnWrite` holds (keys named as
# the columns): orjson writes it in microseconds, where arrays cost asyncpg a check of every
# element against abstract base classes (0.044 against 0.027 ms of client CPU a turn, in
# statements of 8, with the same server CPU).
_COMMIT_TURNS = """
WITH u AS (
  SELECT * FROM json_to_recordset($1::json)
    AS u(sid bigint, fence bigint, revision integer, added integer, now float8, memories boolean)
), s AS (
  UPDATE sessions SET updated_at = u.now, revision = sessions.revision + 1,
         next_seq = sessions.next_seq + u.added, turns = sessions.turns + 1, fence = u.fence,
         has_memories = sessions.has_memories OR u.memories
  FROM u WHERE sessions.id = u.sid AND sessions.fence <= u.fence
           AND sessions.revision = u.revision
  RETURNING sessions.id
), t AS (
  INSERT INTO turns (id, session_id, status, created_at, started_at, finished_at,
                     queue_wait_ms, usage, response, idempotency_key)
  SELECT x.id, x.session_id, x.status, x.created_at, x.started_at, x.finished_at,
         x.queue_wait_ms, x.usage, x.response, x.idempotency_key
  FROM json_to_recordset($2::json)
    AS x(id text, session_id bigint, status text, created_at float8, started_at float8,
         finished_at float8, queue_wait_ms float8, usage text, response text,
         idempotency_key text)
  WHERE x.session_id IN (SELECT id FROM s)
), m AS (
  INSERT INTO messages (session_id, seq, turn_id, data, tokens)
  SELECT y.session_id, y.seq, y.turn_id, y.data, y.tokens
  FROM json_to_recordset($3::json)
    AS y(session_id bigint, seq integer, turn_id text, data text, tokens integer)
  WHERE y.session_id IN (SELECT id FROM s)
), mem AS (
  INSERT INTO memories (tenant, agent, session_id, text, pinned, created_at)
  SELECT z.tenant, z.agent, z.session_id, z.text, z.pinned, z.created_at
  FROM json_to_recordset($4::json)
    AS z(owner bigint, tenant text, agent text, session_id bigint, text text, pinned boolean,
         created_at float8)
  WHERE z.owner IN (SELECT id FROM s)
)
SELECT coalesce(array_agg(id), '{}') FROM s
"""

Open = Callable[[], Awaitable[asyncpg.Connection]]
Errors = Callable[[], AbstractAsyncContextManager[None]]
_Waiting = tuple[TurnWrite, "asyncio.Future[None]"]


class GroupWriter:
    """Writes turns, at most `writers` statements at a time, each on one of the writer's own
    connections (opened by `open_connection`; `errors` maps a lost or refused connection to
    `Unavailable`, as the driver does for its pool).

    The connections are the writer's, not the pool's: a write through the pool waited for
    the pool's release, a task and two loop iterations (`asyncio.shield`), 0.08-0.09 ms of
    a c1 turn on this project's VM, after 0.03-0.04 for the acquire. A connection that
    fails other than by a statement's own error is closed, and so are the idle ones (after
    a restart of PostgreSQL they are all dead); the next write opens a new one."""

    def __init__(self, open_connection: Open, errors: Errors, writers: int) -> None:
        self._open = open_connection
        self._errors = errors
        self._writers = writers
        self._writing = 0
        self._waiting: list[_Waiting] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: list[asyncpg.Connection] = []
        self._closed = False

    async def write(self, write: TurnWrite) -> None:
        """Write one turn; `StaleFence` if its session moved past its fence or revision."""
        if self._writing >= self._writers:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append((write, future))
            await future
            return
        self._writing += 1
        try:
            written = await self._write_one(write)
        finally:
            self._writing -= 1
            self._start_next()
        if not written:
            raise stale_write()

    async def close(self) -> None:
        """Let the statements in flight finish, then close the connections."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._errors():
            conn = self._take_idle() or await self._open()
            try:
                yield conn
            except asyncpg.PostgresError as e:  # the statement's error: the connection is fine
                self._keep(conn, isinstance(e, asyncpg.PostgresConnectionError))
                raise
            except BaseException:  # lost, timed out or cancelled mid-statement: in doubt
                self._keep(conn, True)
                raise
            self._keep(conn, False)

    def _take_idle(self) -> asyncpg.Connection | None:
        """An idle connection still open (one whose server closed it meanwhile is dropped)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
        return None

    def _keep(self, conn: asyncpg.Connection, broken: bool) -> None:
        if broken:
            for other in [conn, *self._idle]:
                other.terminate()
            self._idle.clear()
        elif self._closed:
            conn.terminate()
        else:
            self._idle.append(conn)

    def _start_next(self) -> None:
        """Send every turn waiting now in one statement, one turn per session (a second
        write of a session, possible only from a holder that lost its lane, waits)."""
        if not self._waiting or self._writing >= self._writers:
            return
        batch: list[_Waiting] = []
        later: list[_Waiting] = []
        sessions: set[int] = set()
        for item in self._waiting:
            if item[1].done():  # its waiter was cancelled: nothing to write
                continue
            sid = item[0].session["sid"]
            (later if sid in sessions else batch).append(item)
            sessions.add(sid)
        self._waiting = later
        if not batch:
            return
        self._writing += 1
        task = asyncio.get_running_loop().create_task(self._write_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_batch(self, batch: list[_Waiting]) -> None:
        try:
            if len(batch) > 1:
                try:
                    written = await self._write_many([w for w, _ in batch])
                except asyncpg.IntegrityConstraintViolationError:
                    pass  # one turn's own fault (a repeated turn id): below, one by one
                else:
                    for write, future in batch:
                        settle(future, None if write.session["sid"] in written else stale_write())
                    return
            for write, future in batch:
                try:
                    settle(future, None if await self._write_one(write) else stale_write())
                except Exception as e:
                    settle(future, e)
        except BaseException as e:
            for _, future in batch:
                settle(future, e)
            if not isinstance(e, Exception):
                raise
        finally:
            self._writing -= 1
            self._start_next()

    async def _write_one(self, write: TurnWrite) -> bool:
        session, turn, messages = write.session, write.turn, write.messages
        if write.memories or len(messages) > _INLINE:
            return session["sid"] in await self._write_many([write])
        args = [session["now"], session["added"], session["fence"], session["sid"],
                session["revision"], session["memories"], turn["id"], turn["status"],
                turn["created_at"], turn["started_at"], turn["finished_at"],
                turn["queue_wait_ms"], turn["usage"], turn["response"], turn["idempotency_key"]]
        for m in messages:
            args += (m["seq"], m["data"], m["tokens"])
        async with self._connection() as conn:
            written: int = await conn.fetchval(_COMMIT_TURN[len(messages)], *args)
        return written == 1

    async def _write_many(self, writes: list[TurnWrite]) -> set[int]:
        rows = (
            [w.session for w in writes],
            [w.turn for w in writes],
            [m for w in writes for m in w.messages],
            [{"owner": w.session["sid"], **m} for w in writes for m in w.memories],
        )
        async with self._connection() as conn:
            return set(await conn.fetchval(_COMMIT_TURNS, *map(_json, rows)))


def _json(rows: list[dict[str, Any]]) -> str:
    return orjson.dumps(rows).decode()

