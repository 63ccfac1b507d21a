"""The seam between the store's logic and a database driver: run compiled statements,
give a transaction, and the few things no portable SQL can say (lexical search)."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Dialect

from laneway.store.base import MemoryScope, StaleFence
from laneway.store.statements import Sql, Statements

Row = tuple[Any, ...]


@dataclass(slots=True)
class TurnWrite:
    """Everything one turn writes, committed atomically by `Driver.commit_turn`."""

    session: dict[str, Any]  # sid, fence, revision, now, added: the session row's advance
    turn: dict[str, Any]
    messages: list[dict[str, Any]]
    memories: list[dict[str, Any]]


def settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Give a turn write's waiter its outcome, unless it stopped waiting (cancelled)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    elif isinstance(error, Exception):
        future.set_exception(error)
    else:
        future.cancel()


def stale_write() -> StaleFence:
    """A turn write refused: its session no longer carries the writer's fence, or moved past
    the revision the turn read."""
    return StaleFence("the session was claimed by a newer lane grant or moved on")


class Conn(Protocol):
    async def fetch(self, sql: Sql, params: dict[str, Any]) -> list[Row]: ...

    async def execute(self, sql: Sql, params: dict[str, Any]) -> int:
        """Run a write; returns the number of rows it changed."""

    async def executemany(self, sql: Sql, rows: list[dict[str, Any]]) -> None: ...

    async def search(self, scope: MemoryScope, terms: list[str], limit: int) -> list[Row]:
        """Memories of `scope` matching any of `terms`, best first: (id, text, pinned, created_at)."""

    async def recall(
        self, pinned: Sql, params: dict[str, Any], terms: list[str], limit: int
    ) -> tuple[list[Row], list[Row]]:
        """The pinned memories (newest first) and those matching `terms` (best first)."""


class Driver(Protocol):
    @property
    def dialect(self) -> Dialect:
        """What statements are compiled for. (Read-only, so that a driver may declare its
        own dialect's class.)"""
        ...

    async def open(self) -> None:
        """Connect and run the migrations."""

    async def close(self) -> None: ...

    def connect(self) -> AbstractAsyncContextManager[Conn]: ...

    def transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A connection inside a transaction: committed on exit, rolled back on error."""

    async def commit_turn(self, sql: Statements, write: TurnWrite) -> None:
        """Write a turn atomically if the session still carries its fence and the revision
        the turn read; `StaleFence` (and nothing written) if a newer lane holder claimed it
        or it moved on."""
