"""Stores, picked by URL: `sqlite:///PATH` (embedded) or `postgresql://...` (many replicas)."""

from __future__ import annotations

from laneway.store.base import SessionRef, SessionState, StaleFence, Store, TurnRecord

__all__ = ["SessionRef", "SessionState", "StaleFence", "Store", "TurnRecord", "open_store"]


async def open_store(url: str, *, exclusive: bool) -> Store:
    """`exclusive` says this process is the only writer (in-process lanes)."""
    from laneway.store.sql import SqlStore

    store = SqlStore(url, exclusive=exclusive)
    await store.open()
    return store
