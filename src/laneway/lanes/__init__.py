"""Lane backends, picked by URL: `local` (in-process) or `redis://` (many replicas)."""

from __future__ import annotations

from laneway.lanes.base import LaneBackend, LaneInfo, Ticket

__all__ = ["LaneBackend", "LaneInfo", "Ticket", "open_lanes"]


async def open_lanes(url: str) -> LaneBackend:
    if url == "local":
        from laneway.lanes.local import LocalLanes

        return LocalLanes()
    raise ValueError(f"lane backend {url!r} is not available in this build")
