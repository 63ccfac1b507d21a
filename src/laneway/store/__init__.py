"""Stores, picked by URL: `sqlite:///PATH` (embedded) or `postgresql://...` (many replicas)."""

from __future__ import annotations

from laneway.store.base import SessionRef, SessionState, StaleFence, Store, TurnRecord

__all__ = ["SessionRef", "SessionState", "StaleFence", "Store", "TurnRecord", "open_store"]


async def open_store(url: str, *, exclusive: bool, pool_size: int | None = None) -> Store:
    """`exclusive` says this process is the only writer (in-process lanes); `pool_size`
    bounds a PostgreSQL store's connections (None: the driver's default)."""
    from laneway.store.sql import SqlStore

    store = SqlStore(url, exclusive=exclusive, pool_size=pool_size)
    await store.open()
    return store
