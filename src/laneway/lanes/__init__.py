"""Lane backends, picked by URL: `local` (in-process) or `redis://` (many replicas)."""

from __future__ import annotations

from laneway.lanes.base import LaneBackend, LaneInfo, Ticket

__all__ = ["LaneBackend", "LaneInfo", "Ticket", "open_lanes"]


async def open_lanes(url: str, *, lease_s: float = 10.0, max_wait_s: float = 3600.0) -> LaneBackend:
    if url == "local":
        from laneway.lanes.local import LocalLanes

        return LocalLanes()
    from laneway.lanes.redis import RedisLanes

    lanes = RedisLanes(url, lease_s=lease_s, max_wait_s=max_wait_s)
    await lanes.open()
    return lanes
