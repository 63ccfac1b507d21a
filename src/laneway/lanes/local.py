"""In-process lanes: a dict of busy keys, each a holder and a FIFO of waiting futures.

Everything here runs on the event loop thread without awaiting, so each state change is
atomic; the only suspension point is a waiter's `await future`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from laneway.errors import QueueFull, QueueTimeout, SessionBusy
from laneway.lanes.base import LaneInfo


class _Lane:
    __slots__ = ("holder", "waiters", "since")

    def __init__(self) -> None:
        self.holder: LocalTicket | None = None
        self.waiters: deque[LocalTicket] = deque()
        self.since = 0.0


class LocalTicket:
    __slots__ = ("key", "arrival_position", "fence", "owner", "on_interrupt", "on_lost",
                 "entered", "_lanes", "_lane", "_future", "_done")
    #: The in-process lanes pass no notes: their store trusts its cache (see base.py).
    handoff: str | None = None

    def __init__(self, lanes: LocalLanes, lane: _Lane, key: str, position: int, owner: str) -> None:
        self.key = key
        self.arrival_position = position
        self.fence = 0
        self.owner = owner
        self.on_interrupt: Callable[[], None] | None = None
        self.on_lost: Callable[[], None] | None = None  # an in-process lane is never lost
        self.entered = 0.0  # set (monotonic) only for a ticket that has to wait
        self._lanes = lanes
        self._lane = lane
        self._future: asyncio.Future[None] | None = None
        self._done = False

    async def granted(self, timeout: float) -> None:
        if self._lane.holder is self:
            return
        if self._future is None:
            raise RuntimeError("ticket was released")
        # A timer of our own, not `asyncio.timeout`: its context manager cost 23 K
        # instructions per queued turn on top of the timer itself (callgrind).
        timer = self._future.get_loop().call_later(timeout, self._expire, timeout)
        try:
            await self._future
        except QueueTimeout:
            if self._lane.holder is self:  # granted in the same tick the timer fired
                return
            raise
        finally:
            timer.cancel()

    def _expire(self, timeout: float) -> None:
        """The wait is over: the ticket's future fails, unless the lane was granted first."""
        future = self._future
        if future is not None and not future.done():
            future.set_exception(
                QueueTimeout(f"waited {timeout:g}s for the session's lane", retry_after=1.0)
            )

    async def position(self) -> int:
        lane = self._lane
        if lane.holder is self:
            return 0
        try:
            return lane.waiters.index(self) + (lane.holder is not None)
        except ValueError:
            return 0

    def secure(self) -> bool:
        return self._lane.holder is self

    async def release(self, handoff: str | None = None) -> None:
        self.release_soon()

    def release_soon(self, handoff: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        self.on_interrupt = self.on_lost = None
        self._lanes._leave(self)


class LocalLanes:
    """One process's lanes. Fences start from the wall clock in microseconds so they keep
    growing across restarts of the process that owns the store."""

    def __init__(self) -> None:
        self._lanes: dict[str, _Lane] = {}
        self._fence = time.time_ns() // 1000

    async def enter(self, key: str, *, max_waiting: int, owner: str = "") -> LocalTicket:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.holder is None and not lane.waiters:
            ticket = LocalTicket(self, lane, key, 0, owner)
            self._grant(lane, ticket)
            return ticket
        if len(lane.waiters) >= max_waiting:
            if max_waiting == 0:
                raise SessionBusy("the session is running another turn", retry_after=1.0)
            raise QueueFull(
                f"{len(lane.waiters)} requests already wait for this session", retry_after=1.0
            )
        ticket = LocalTicket(self, lane, key, len(lane.waiters) + 1, owner)
        ticket._future = asyncio.get_running_loop().create_future()
        ticket.entered = time.monotonic()
        lane.waiters.append(ticket)
        return ticket

    async def interrupt(self, key: str) -> bool:
        lane = self._lanes.get(key)
        holder = lane.holder if lane is not None else None
        if holder is None:
            return False
        if holder.on_interrupt is not None:
            holder.on_interrupt()
        return True

    async def claim(self, name: str, turn_id: str, ttl_s: float, *, replace: bool = False) -> str | None:
        return None  # one process: the service's own index is the only one needed

    async def unclaim(self, name: str, turn_id: str) -> None:
        return None

    async def claimed(self, name: str) -> str | None:
        return None

    async def info(self, key: str) -> LaneInfo | None:
        lane = self._lanes.get(key)
        return None if lane is None else self._info(key, lane)

    async def busy(self) -> list[LaneInfo]:
        return [self._info(key, lane) for key, lane in self._lanes.items()]

    async def close(self) -> None:
        for lane in self._lanes.values():
            for ticket in lane.waiters:
                if ticket._future is not None and not ticket._future.done():
                    ticket._future.cancel()
        self._lanes.clear()

    def __len__(self) -> int:
        return len(self._lanes)

    def _info(self, key: str, lane: _Lane) -> LaneInfo:
        holder = lane.holder
        now = time.monotonic()
        held = now - lane.since if holder is not None else 0.0
        owner = holder.owner or None if holder is not None else None
        oldest = now - lane.waiters[0].entered if lane.waiters else 0.0
        return LaneInfo(key, holder is not None, len(lane.waiters), held, owner, oldest)

    def _grant(self, lane: _Lane, ticket: LocalTicket) -> None:
        self._fence += 1
        ticket.fence = self._fence
        lane.holder = ticket
        lane.since = time.monotonic()
        if ticket._future is not None and not ticket._future.done():
            ticket._future.set_result(None)

    def _leave(self, ticket: LocalTicket) -> None:
        lane = ticket._lane
        if lane.holder is ticket:
            lane.holder = None
            if lane.waiters:
                self._grant(lane, lane.waiters.popleft())
        else:
            try:
                lane.waiters.remove(ticket)
            except ValueError:
                pass
        if lane.holder is None and not lane.waiters and self._lanes.get(ticket.key) is lane:
            del self._lanes[ticket.key]
