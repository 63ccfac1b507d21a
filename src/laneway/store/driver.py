"""The seam between the store's logic and a database driver: run compiled statements,
give a transaction, and the few things no portable SQL can say (lexical search)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from sqlalchemy.engine import Dialect

from laneway.store.base import MemoryScope
from laneway.store.statements import Sql

Row = tuple[Any, ...]


class Conn(Protocol):
    async def fetch(self, sql: Sql, params: dict[str, Any]) -> list[Row]: ...

    async def execute(self, sql: Sql, params: dict[str, Any]) -> int:
        """Run a write; returns the number of rows it changed."""

    async def executemany(self, sql: Sql, rows: list[dict[str, Any]]) -> None: ...

    async def search(self, scope: MemoryScope, terms: list[str], limit: int) -> list[Row]:
        """Memories of `scope` matching any of `terms`, best first: (id, text, pinned, created_at)."""


class Driver(Protocol):
    dialect: Dialect

    async def open(self) -> None:
        """Connect and run the migrations."""

    async def close(self) -> None: ...

    def connect(self) -> AbstractAsyncContextManager[Conn]: ...

    def transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A connection inside a transaction: committed on exit, rolled back on error."""
