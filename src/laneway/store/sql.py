"""The store's logic over any `Driver` (SQLite or PostgreSQL).

Sessions recently used keep their transcript tail in memory (`_cache`), so a turn reads
nothing in the common case and writes once. The cache is trusted outright only when this
process is the sole writer (embedded mode, `exclusive=True`); otherwise the session row's
revision, read while claiming the session, says whether the cached tail is still current.

With several replicas a turn can skip that claim, a round trip to the database: the lane's
previous holder leaves a hand-off note saying which state it left (`mark`: the session's id
and revision), and a replica whose cache holds exactly that state uses it as it is. The
commit still checks fence and revision, so a wrong note costs the turn, never the history.
"""

from __future__ import annotations

import re
import time
from collections import Counter, OrderedDict
from typing import Any

import orjson

from laneway.store.base import (
    Memory,
    MemoryScope,
    Message,
    SessionRef,
    SessionState,
    SessionSummary,
    StaleFence,
    TurnRecord,
)
from laneway.store.driver import Conn, Driver, Row, TurnWrite
from laneway.store.statements import Statements
from laneway.store.tail import Tail
from laneway.tokens import estimate_message

_WORD = re.compile(r"[^\W_]+")
_STOPWORDS = frozenset(
    "a an and are as at be but by do does did for from has have how i in is it its me my "
    "no not of on or our so that the their them then there these they this to was we were "
    "what when where which who why will with you your".split()
)
_TAIL_PAGE = 256


def search_terms(query: str, limit: int = 16) -> list[str]:
    """Words worth matching: lower-cased, no stopwords, deduplicated, in order."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(query.lower()):
        if len(word) > 1 and word not in _STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)[:limit]


def open_driver(url: str, pool_size: int | None = None) -> Driver:
    if url.startswith("sqlite:"):
        from laneway.store.sqlite import SqliteDriver

        return SqliteDriver(url)
    from laneway.store.postgres import POOL_SIZE, PostgresDriver

    return PostgresDriver(url, pool_size=pool_size or POOL_SIZE)


class SqlStore:
    def __init__(self, url: str, *, exclusive: bool = True, cache_sessions: int = 4096,
                 pool_size: int | None = None) -> None:
        self.driver = open_driver(url, pool_size)
        self.sql = Statements(self.driver.dialect)
        self.exclusive = exclusive
        self._cache: OrderedDict[SessionRef, SessionState] = OrderedDict()
        #: Exclusive mode: whether an agent-wide memory scope has any memory (skips recall).
        self._has_memories: dict[MemoryScope, bool] = {}
        self._cache_size = cache_sessions
        #: Turns' session loads by where they came from: "cache" (no round trip) or "store".
        self.loads: Counter[str] = Counter()

    async def open(self) -> None:
        await self.driver.open()

    async def close(self) -> None:
        await self.driver.close()

    async def ping(self) -> None:
        async with self.driver.connect() as conn:
            await conn.fetch(self.sql.ping, {})

    # -- turns -------------------------------------------------------------------------

    async def load(self, ref: SessionRef, fence: int, window_tokens: int,
                   handoff: str | None = None) -> SessionState:
        cached = self._cache.get(ref)
        if cached is not None and (self.exclusive or handoff == _mark(cached)):
            self._cache.move_to_end(ref)
            self.loads["cache"] += 1
            return cached
        self.loads["store"] += 1
        try:
            return await self._claim(ref, fence, window_tokens, cached)
        except BaseException:
            self._cache.pop(ref, None)  # what it holds may no longer be current
            raise

    def mark(self, ref: SessionRef) -> str | None:
        """The hand-off note for the session state this replica holds, when it is exactly
        the committed one; None in exclusive mode, which needs no notes."""
        cached = None if self.exclusive else self._cache.get(ref)
        return None if cached is None else _mark(cached)

    async def _claim(self, ref: SessionRef, fence: int, window_tokens: int,
                     cached: SessionState | None) -> SessionState:
        async with self.driver.connect() as conn:
            rows = []
            if self.exclusive:  # no other writer to fence out: a read, not a write
                rows = await conn.fetch(self.sql.find_session, _identity(ref))
            if not rows:  # one statement: atomic on its own
                rows = await conn.fetch(
                    self.sql.claim_session, {**_identity(ref), "fence": fence, "now": time.time()}
                )
            if not rows:
                raise StaleFence(f"session {ref.key} is held by a newer lane grant")
            sid, revision, next_seq, turns, created_at, has_memories = rows[0]
            if cached is not None and cached.id == sid and cached.revision == revision:
                state = cached
            else:
                state = SessionState(ref, sid, revision, next_seq, turns, created_at,
                                     window_tokens=window_tokens)
                if revision:
                    state.tail = await self._tail(conn, sid, window_tokens)
            state.has_memories = bool(has_memories)
        self._remember(state)
        return state

    async def commit(self, state: SessionState, turn: TurnRecord, fence: int) -> None:
        assert state.id is not None, "commit a state that `load` returned"
        now = turn.finished_at
        added = len(turn.messages)
        rows: list[dict[str, Any]] = [
            {
                "session_id": state.id,
                "seq": state.next_seq + i,
                "turn_id": turn.id,
                "data": orjson.dumps(m).decode(),
                "tokens": estimate_message(m),
            }
            for i, m in enumerate(turn.messages)
        ]
        owner = state.id if turn.memory_scope == "session" else None
        own_memories = bool(turn.memories) and owner is not None
        write = TurnWrite(
            session={"sid": state.id, "fence": fence, "revision": state.revision, "now": now,
                     "added": added, "memories": own_memories},
            turn=_turn_row(turn, state.id),
            messages=rows,
            memories=[
                {"tenant": state.ref.tenant, "agent": state.ref.agent, "session_id": owner,
                 "text": text, "pinned": pinned, "created_at": now}
                for text, pinned in turn.memories
            ],
        )
        try:
            await self.driver.commit_turn(self.sql, write)
        except BaseException:
            # Refused, or in doubt (a connection lost after the statement was sent): the
            # cached state is not known to be the committed one any more.
            self._cache.pop(state.ref, None)
            raise
        if turn.memories and owner is None:
            self._remember_memories(MemoryScope(state.ref.tenant, state.ref.agent, None), True)
        state.has_memories = state.has_memories or own_memories
        state.revision += 1
        state.turns += 1
        state.tail.extend(
            map(_for_model, turn.messages),
            (r["tokens"] for r in rows),
            # The row's `str`, not orjson's `bytes`: those keep a 4 KiB buffer however short.
            (None if "interrupted" in m else r["data"] for m, r in zip(turn.messages, rows)),
        )
        state.next_seq += added
        if state.tail.tokens > 2 * state.window_tokens:
            state.tail.trim(state.window_tokens)

    # -- memories ----------------------------------------------------------------------

    async def search_memories(self, scope: MemoryScope, query: str, limit: int) -> list[Memory]:
        terms = search_terms(query)
        if not terms or limit <= 0:
            return []
        async with self.driver.connect() as conn:
            return _memories(await conn.search(scope, terms, limit))

    async def recall(self, scope: MemoryScope, query: str, limit: int) -> list[Memory]:
        """Pinned memories, then those matching `query`. A process that is the only writer
        remembers which agent scopes have no memories at all and skips both queries for
        them (a session's own row says whether it has any: `SessionState.has_memories`)."""
        if self.exclusive and scope.session_id is None:
            known = self._has_memories.get(scope)
            if known is None:
                async with self.driver.connect() as conn:
                    known = bool(await conn.fetch(self.sql.any_memory_agent,
                                                  _scope_params(scope)))
                self._remember_memories(scope, known)
            if not known:
                return []
        pinned_sql = self.sql.pinned_agent if scope.session_id is None else self.sql.pinned_session
        async with self.driver.connect() as conn:
            pinned_rows, found_rows = await conn.recall(
                pinned_sql, {**_scope_params(scope), "limit": limit}, search_terms(query), limit
            )
        pinned = _memories(reversed(pinned_rows))
        seen = {m.id for m in pinned}
        return pinned + [m for m in _memories(found_rows) if m.id not in seen]

    def _remember_memories(self, scope: MemoryScope, present: bool) -> None:
        self._has_memories[scope] = present
        if len(self._has_memories) > self._cache_size * 4:
            self._has_memories.pop(next(iter(self._has_memories)))

    async def memories(self, scope: MemoryScope, limit: int) -> list[Memory]:
        sql = self.sql.memories_agent if scope.session_id is None else self.sql.memories_session
        return await self._memories(sql, scope, limit)

    async def _memories(self, sql: Any, scope: MemoryScope, limit: int) -> list[Memory]:
        params = {**_scope_params(scope), "limit": limit}
        async with self.driver.connect() as conn:
            return _memories(reversed(await conn.fetch(sql, params)))

    # -- reading and deleting sessions -------------------------------------------------

    async def session_id(self, ref: SessionRef) -> int | None:
        cached = self._cache.get(ref)
        if cached is not None and cached.id is not None and self.exclusive:
            return cached.id
        async with self.driver.connect() as conn:
            rows = await conn.fetch(self.sql.session_id, _identity(ref))
        return rows[0][0] if rows else None

    async def session_info(self, ref: SessionRef) -> SessionSummary | None:
        async with self.driver.connect() as conn:
            rows = await conn.fetch(self.sql.summary, _identity(ref))
        return _summary(rows[0]) if rows else None

    async def transcript(self, ref: SessionRef, limit: int) -> list[Message]:
        async with self.driver.connect() as conn:
            rows = await conn.fetch(self.sql.transcript, {**_identity(ref), "limit": limit})
        return [orjson.loads(r[0]) for r in reversed(rows)]

    async def turn(self, ref: SessionRef, turn_id: str) -> dict[str, Any] | None:
        async with self.driver.connect() as conn:
            rows = await conn.fetch(self.sql.turn, {**_identity(ref), "turn_id": turn_id})
        if not rows:
            return None
        names = ("id", "status", "created_at", "started_at", "finished_at", "queue_wait_ms",
                 "usage", "response", "idempotency_key")
        record = dict(zip(names, rows[0]))
        for name in ("usage", "response"):
            record[name] = orjson.loads(record[name]) if record[name] else None
        return record

    async def turns(self, ref: SessionRef, limit: int) -> list[dict[str, Any]]:
        """The session's newest turns (without their responses), oldest first."""
        async with self.driver.connect() as conn:
            rows = await conn.fetch(self.sql.turns, {**_identity(ref), "limit": limit})
        names = ("id", "status", "created_at", "started_at", "finished_at", "queue_wait_ms",
                 "usage", "idempotency_key")
        records = [dict(zip(names, row)) for row in reversed(rows)]
        for record in records:
            record["usage"] = orjson.loads(record["usage"]) if record["usage"] else None
        return records

    async def idempotent_turn(
        self, ref: SessionRef, key: str, since: float
    ) -> tuple[str, dict[str, Any]] | None:
        """The turn that answered Idempotency-Key `key` after `since`: (id, response)."""
        params = {**_identity(ref), "idempotency_key": key, "since": since}
        async with self.driver.connect() as conn:
            rows = await conn.fetch(self.sql.idempotent_turn, params)
        if not rows or rows[0][1] is None:
            return None
        return rows[0][0], orjson.loads(rows[0][1])

    async def list_sessions(
        self, tenant: str | None, agent: str | None, limit: int, cursor: str | None
    ) -> tuple[list[SessionSummary], str | None]:
        sql = self.sql
        stmt = {
            (False, False): sql.list_all,
            (True, False): sql.list_tenant,
            (False, True): sql.list_agent,
            (True, True): sql.list_tenant_agent,
        }[(tenant is not None, agent is not None)]
        after = int(cursor) if cursor and cursor.isdigit() else 0
        params = {"tenant": tenant, "agent": agent, "after": after, "limit": limit + 1}
        async with self.driver.connect() as conn:
            rows = await conn.fetch(stmt, params)
        more = len(rows) > limit
        rows = rows[:limit]
        return [_summary(r) for r in rows], (str(rows[-1][0]) if more else None)

    async def delete_session(self, ref: SessionRef) -> bool:
        self._cache.pop(ref, None)
        async with self.driver.transaction() as conn:
            return await conn.execute(self.sql.delete_session, _identity(ref)) > 0

    # -- helpers -----------------------------------------------------------------------

    async def _tail(self, conn: Conn, session_id: int, window_tokens: int) -> Tail:
        """Newest messages, whole pages, until they cover `window_tokens`."""
        rows: list[Row] = []
        tokens = 0
        page = await conn.fetch(self.sql.tail_first, {"sid": session_id, "limit": _TAIL_PAGE})
        while True:
            rows[:0] = page[::-1]
            tokens += sum(r[2] for r in page)
            if len(page) < _TAIL_PAGE or tokens >= window_tokens:
                messages = [_for_model(orjson.loads(r[1])) for r in rows]
                tail = Tail()
                tail.extend(messages, (r[2] for r in rows),
                            (None if '"interrupted"' in r[1] else r[1] for r in rows))
                return tail
            page = await conn.fetch(
                self.sql.tail_before,
                {"sid": session_id, "before": page[-1][0], "limit": _TAIL_PAGE},
            )

    def _remember(self, state: SessionState) -> None:
        self._cache[state.ref] = state
        self._cache.move_to_end(state.ref)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _mark(state: SessionState) -> str:
    return f"{state.id}:{state.revision}"


def _identity(ref: SessionRef) -> dict[str, Any]:
    return {"tenant": ref.tenant, "agent": ref.agent, "key": ref.key}


def _scope_params(scope: MemoryScope) -> dict[str, Any]:
    return {"tenant": scope.tenant, "agent": scope.agent, "sid": scope.session_id}


def _turn_row(turn: TurnRecord, session_id: int) -> dict[str, Any]:
    return {
        "id": turn.id,
        "session_id": session_id,
        "status": turn.status,
        "created_at": turn.created_at,
        "started_at": turn.started_at,
        "finished_at": turn.finished_at,
        "queue_wait_ms": turn.queue_wait_ms,
        "usage": _json(turn.usage),
        "response": _json(turn.response),
        "idempotency_key": turn.idempotency_key,
    }


def _for_model(message: Message) -> Message:
    """The message as the model may see it: without laneway's own marks."""
    if "interrupted" in message:
        return {k: v for k, v in message.items() if k != "interrupted"}
    return message


def _memories(rows: Any) -> list[Memory]:
    return [Memory(r[0], r[1], bool(r[2]), r[3]) for r in rows]


def _summary(row: Row) -> SessionSummary:
    _id, key, agent, tenant, turns, created_at, updated_at = row
    return SessionSummary(key, agent, tenant, turns, created_at, updated_at)


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
