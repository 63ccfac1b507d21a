"""The store on SQLAlchemy Core (async): SQLite (aiosqlite, WAL) or PostgreSQL (asyncpg).

Sessions recently used keep their transcript tail in memory (`_cache`), so a turn reads
nothing from the database in the common case and writes once. The cache is only trusted
when this process is the sole writer (embedded mode, `exclusive=True`); otherwise the
session row's revision decides whether the cached tail is still current.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import delete, event, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from laneway.store import schema as t
from laneway.store.base import (
    Memory,
    MemoryScope,
    Message,
    SessionRef,
    SessionState,
    SessionSummary,
    StaleFence,
    StoredMessage,
    TurnRecord,
)
from laneway.store.migrate import upgrade
from laneway.tokens import estimate_message

_WORD = re.compile(r"\w+")
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


def async_url(url: str) -> str:
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


class SqlStore:
    def __init__(self, url: str, *, exclusive: bool = True, cache_sessions: int = 4096) -> None:
        self.url = async_url(url)
        self.exclusive = exclusive
        self._cache: OrderedDict[SessionRef, SessionState] = OrderedDict()
        self._cache_size = cache_sessions
        self._engine: AsyncEngine | None = None
        self._sqlite = self.url.startswith("sqlite")
        # SQLite has one writer at a time; queueing here beats spinning on SQLITE_BUSY.
        self._write_lock = asyncio.Lock() if self._sqlite else None

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "store is not open"
        return self._engine

    async def open(self) -> None:
        if self._sqlite:
            database = make_url(self.url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self._engine = create_async_engine(self.url)
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self._engine = create_async_engine(self.url, pool_size=10, max_overflow=20)
        async with self._engine.begin() as conn:
            await conn.run_sync(upgrade)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # -- turns -------------------------------------------------------------------------

    async def load(self, ref: SessionRef, fence: int, window_tokens: int) -> SessionState:
        cached = self._cache.get(ref)
        if cached is not None and self.exclusive:
            self._cache.move_to_end(ref)
            return cached
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        t.sessions.c.id,
                        t.sessions.c.revision,
                        t.sessions.c.next_seq,
                        t.sessions.c.turns,
                        t.sessions.c.created_at,
                        t.sessions.c.fence,
                    ).where(*_identity(ref))
                )
            ).first()
            if row is None:
                state = SessionState(ref=ref, created_at=time.time(), window_tokens=window_tokens)
            elif row.fence > fence:
                raise StaleFence(f"session {ref.key} is held by a newer lane grant")
            elif cached is not None and cached.revision == row.revision:
                state = cached
            else:
                state = SessionState(
                    ref=ref,
                    id=row.id,
                    revision=row.revision,
                    next_seq=row.next_seq,
                    turns=row.turns,
                    created_at=row.created_at,
                    window_tokens=window_tokens,
                )
                state.tail = await self._tail(conn, row.id, window_tokens)
                state.tail_tokens = sum(m.tokens for m in state.tail)
        self._remember(state)
        return state

    async def commit(self, state: SessionState, turn: TurnRecord, fence: int) -> None:
        now = turn.finished_at
        rows = [
            {
                "seq": state.next_seq + i,
                "turn_id": turn.id,
                "data": orjson.dumps(m).decode(),
                "tokens": estimate_message(m),
            }
            for i, m in enumerate(turn.messages)
        ]
        async with self._writing() as conn:
            if state.id is None:
                session_id = (
                    await conn.execute(
                        insert(t.sessions)
                        .values(
                            tenant=state.ref.tenant,
                            agent=state.ref.agent,
                            key=state.ref.key,
                            created_at=state.created_at,
                            updated_at=now,
                            revision=1,
                            next_seq=len(rows),
                            turns=1,
                            fence=fence,
                        )
                        .returning(t.sessions.c.id)
                    )
                ).scalar_one()
            else:
                session_id = state.id
                result = await conn.execute(
                    update(t.sessions)
                    .where(t.sessions.c.id == session_id, t.sessions.c.fence <= fence)
                    .values(
                        updated_at=now,
                        revision=t.sessions.c.revision + 1,
                        next_seq=t.sessions.c.next_seq + len(rows),
                        turns=t.sessions.c.turns + 1,
                        fence=fence,
                    )
                )
                if result.rowcount != 1:
                    raise StaleFence(f"session {state.ref.key} was claimed by a newer lane grant")
            await conn.execute(
                insert(t.turns).values(
                    id=turn.id,
                    session_id=session_id,
                    status=turn.status,
                    created_at=turn.created_at,
                    started_at=turn.started_at,
                    finished_at=turn.finished_at,
                    queue_wait_ms=turn.queue_wait_ms,
                    usage=_json(turn.usage),
                    response=_json(turn.response),
                    idempotency_key=turn.idempotency_key,
                )
            )
            if rows:
                await conn.execute(
                    insert(t.messages), [{"session_id": session_id, **r} for r in rows]
                )
            if turn.memories:
                scoped_id = session_id if turn.memory_scope == "session" else None
                await conn.execute(
                    insert(t.memories),
                    [
                        {
                            "tenant": state.ref.tenant,
                            "agent": state.ref.agent,
                            "session_id": scoped_id,
                            "text": text_,
                            "pinned": pinned,
                            "created_at": now,
                        }
                        for text_, pinned in turn.memories
                    ],
                )
        state.id = session_id
        state.revision += 1
        state.turns += 1
        state.tail.extend(
            StoredMessage(r["seq"], m, r["tokens"]) for r, m in zip(rows, turn.messages)
        )
        state.tail_tokens += sum(r["tokens"] for r in rows)
        state.next_seq += len(rows)
        if state.tail_tokens > 2 * state.window_tokens:
            _trim(state)

    # -- memories ----------------------------------------------------------------------

    async def search_memories(self, scope: MemoryScope, query: str, limit: int) -> list[Memory]:
        terms = search_terms(query)
        if not terms or limit <= 0:
            return []
        m = t.memories
        if self._sqlite:
            match = " OR ".join(f'"{w}"' for w in terms)
            stmt = text(
                "SELECT m.id, m.text, m.pinned, m.created_at FROM memories_fts "
                "JOIN memories m ON m.id = memories_fts.rowid "
                "WHERE memories_fts MATCH :match AND m.tenant = :tenant AND m.agent = :agent "
                "AND m.session_id IS :sid ORDER BY bm25(memories_fts) LIMIT :limit"
            ).bindparams(
                match=match,
                tenant=scope.tenant,
                agent=scope.agent,
                sid=scope.session_id,
                limit=limit,
            )
        else:
            query_ = func.to_tsquery("english", " | ".join(terms))
            stmt = (
                select(m.c.id, m.c.text, m.c.pinned, m.c.created_at)
                .where(*_scope(scope), text("tsv @@ to_tsquery('english', :q)"))
                .order_by(func.ts_rank(text("tsv"), query_).desc())
                .limit(limit)
                .params(q=" | ".join(terms))
            )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [Memory(r.id, r.text, bool(r.pinned), r.created_at) for r in rows]

    async def pinned_memories(self, scope: MemoryScope, limit: int) -> list[Memory]:
        return await self._memories(scope, limit, pinned_only=True)

    async def memories(self, scope: MemoryScope, limit: int) -> list[Memory]:
        return await self._memories(scope, limit, pinned_only=False)

    async def _memories(self, scope: MemoryScope, limit: int, *, pinned_only: bool) -> list[Memory]:
        m = t.memories
        stmt = select(m.c.id, m.c.text, m.c.pinned, m.c.created_at).where(*_scope(scope))
        if pinned_only:
            stmt = stmt.where(m.c.pinned.is_(True))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(m.c.id.desc()).limit(limit))).all()
        return [Memory(r.id, r.text, bool(r.pinned), r.created_at) for r in reversed(rows)]

    # -- reading and deleting sessions -------------------------------------------------

    async def session_id(self, ref: SessionRef) -> int | None:
        cached = self._cache.get(ref)
        if cached is not None and cached.id is not None and self.exclusive:
            return cached.id
        async with self.engine.connect() as conn:
            return (
                await conn.execute(select(t.sessions.c.id).where(*_identity(ref)))
            ).scalar_one_or_none()

    async def session_info(self, ref: SessionRef) -> SessionSummary | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_summary_query().where(*_identity(ref)))).first()
        return None if row is None else _summary(row)

    async def transcript(self, ref: SessionRef, limit: int) -> list[Message]:
        s, m = t.sessions, t.messages
        stmt = (
            select(m.c.data)
            .join(s, s.c.id == m.c.session_id)
            .where(*_identity(ref))
            .order_by(m.c.seq.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).scalars().all()
        return [orjson.loads(data) for data in reversed(rows)]

    async def turn(self, ref: SessionRef, turn_id: str) -> dict[str, Any] | None:
        s, tu = t.sessions, t.turns
        stmt = (
            select(tu)
            .join(s, s.c.id == tu.c.session_id)
            .where(tu.c.id == turn_id, *_identity(ref))
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).mappings().first()
        if row is None:
            return None
        record = dict(row)
        record.pop("session_id")
        for name in ("usage", "response"):
            record[name] = orjson.loads(record[name]) if record[name] else None
        return record

    async def list_sessions(
        self, tenant: str | None, agent: str | None, limit: int, cursor: str | None
    ) -> tuple[list[SessionSummary], str | None]:
        s = t.sessions
        stmt = _summary_query().order_by(s.c.id).limit(limit + 1)
        if tenant is not None:
            stmt = stmt.where(s.c.tenant == tenant)
        if agent is not None:
            stmt = stmt.where(s.c.agent == agent)
        if cursor:
            stmt = stmt.where(s.c.id > int(cursor))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_summary(r) for r in rows], (str(rows[-1].id) if more else None)

    async def delete_session(self, ref: SessionRef) -> bool:
        self._cache.pop(ref, None)
        async with self._writing() as conn:
            result = await conn.execute(delete(t.sessions).where(*_identity(ref)))
        return bool(result.rowcount)

    # -- helpers -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    async def _tail(
        self, conn: AsyncConnection, session_id: int, window_tokens: int
    ) -> list[StoredMessage]:
        """Newest messages, whole pages, until they cover `window_tokens`."""
        m = t.messages
        tail: list[StoredMessage] = []
        tokens = 0
        before: int | None = None
        while True:
            stmt = select(m.c.seq, m.c.data, m.c.tokens).where(m.c.session_id == session_id)
            if before is not None:
                stmt = stmt.where(m.c.seq < before)
            rows = (await conn.execute(stmt.order_by(m.c.seq.desc()).limit(_TAIL_PAGE))).all()
            page = [StoredMessage(r.seq, orjson.loads(r.data), r.tokens) for r in reversed(rows)]
            tail[:0] = page
            tokens += sum(r.tokens for r in rows)
            if len(rows) < _TAIL_PAGE or tokens >= window_tokens:
                return tail
            before = rows[-1].seq

    def _remember(self, state: SessionState) -> None:
        self._cache[state.ref] = state
        self._cache.move_to_end(state.ref)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _trim(state: SessionState) -> None:
    """Drop the oldest cached messages down to one window, cutting before a user message
    so that no tool result loses its call."""
    tail = state.tail
    cut = 0
    tokens = state.tail_tokens
    while cut < len(tail) - 1 and tokens > state.window_tokens:
        tokens -= tail[cut].tokens
        cut += 1
    while cut < len(tail) and tail[cut].message.get("role") != "user":
        tokens -= tail[cut].tokens
        cut += 1
    if 0 < cut < len(tail):
        del tail[:cut]
        state.tail_tokens = tokens


def _identity(ref: SessionRef) -> tuple[Any, ...]:
    s = t.sessions
    return (s.c.tenant == ref.tenant, s.c.agent == ref.agent, s.c.key == ref.key)


def _scope(scope: MemoryScope) -> tuple[Any, ...]:
    m = t.memories
    owner = (
        m.c.session_id.is_(None) if scope.session_id is None else m.c.session_id == scope.session_id
    )
    return (m.c.tenant == scope.tenant, m.c.agent == scope.agent, owner)


def _summary_query() -> Any:
    s = t.sessions
    return select(s.c.id, s.c.key, s.c.agent, s.c.tenant, s.c.turns, s.c.created_at, s.c.updated_at)


def _summary(row: Any) -> SessionSummary:
    return SessionSummary(
        row.key, row.agent, row.tenant, row.turns, row.created_at, row.updated_at
    )


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "foreign_keys=ON",
        "busy_timeout=10000",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()

