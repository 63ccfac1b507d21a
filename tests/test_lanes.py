"""The lane contract, property-tested on the in-process backend: random arrivals, cancels
(including a cancel in the same tick as the grant), timeouts and releases."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from laneway.errors import QueueFull, QueueTimeout, SessionBusy
from laneway.lanes.local import LocalLanes

KEYS = ("a", "b", "c")


@dataclass
class Request:
    key: str
    number: int
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    state: str = "waiting"  # waiting | holding | finished | cancelled | timed_out
    fence: int = 0


class World:
    def __init__(self) -> None:
        self.lanes = LocalLanes()
        self.requests: list[Request] = []
        self.grants: dict[str, list[int]] = {k: [] for k in KEYS}
        self.fences: dict[str, list[int]] = {k: [] for k in KEYS}

    async def arrive(self, key: str, timeout: float) -> None:
        request = Request(key, len(self.requests))
        self.requests.append(request)
        ticket = await self.lanes.enter(key, max_waiting=1000)

        async def run() -> None:
            try:
                await ticket.granted(timeout)
                request.state = "holding"
                self.grants[key].append(request.number)
                self.fences[key].append(ticket.fence)
                await request.done.wait()
                request.state = "finished"
            except asyncio.CancelledError:
                request.state = "cancelled"
                raise
            except QueueTimeout:
                request.state = "timed_out"
            finally:
                await ticket.release()

        request.task = asyncio.ensure_future(run())

    def holders(self, key: str) -> list[Request]:
        return [r for r in self.requests if r.key == key and r.state == "holding"]

    def check(self) -> None:
        for key in KEYS:
            assert len(self.holders(key)) <= 1, f"two holders on {key}"
            granted = self.grants[key]
            assert granted == sorted(granted), f"not FIFO on {key}: {granted}"
            fences = self.fences[key]
            assert fences == sorted(set(fences)), f"fences not increasing on {key}"
            waiting = [r for r in self.requests if r.key == key and r.state == "waiting"]
            assert not (waiting and not self.holders(key)), f"{key} stalled with waiters"


ops = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from(KEYS), st.sampled_from([100.0, 100.0, 0.001])),
        st.tuples(st.just("finish"), st.sampled_from(KEYS), st.just(0.0)),
        st.tuples(st.just("cancel"), st.integers(0, 40), st.just(0.0)),
        st.tuples(st.just("finish_and_cancel_next"), st.sampled_from(KEYS), st.just(0.0)),
        st.tuples(st.just("tick"), st.just(""), st.just(0.0)),
    ),
    max_size=60,
)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _play(schedule: list[tuple[str, object, float]]) -> None:
    world = World()
    for op, arg, value in schedule:
        if op == "arrive":
            await world.arrive(str(arg), value)
        elif op == "finish":
            for holder in world.holders(str(arg)):
                holder.done.set()
        elif op == "cancel" and isinstance(arg, int) and arg < len(world.requests):
            task = world.requests[arg].task
            if task is not None and world.requests[arg].state == "waiting":
                task.cancel()
        elif op == "finish_and_cancel_next":
            key = str(arg)
            waiting = [r for r in world.requests if r.key == key and r.state == "waiting"]
            for holder in world.holders(key):
                holder.done.set()
            await asyncio.sleep(0)  # the holder releases: the next waiter is granted now
            if waiting and waiting[0].task is not None:
                waiting[0].task.cancel()  # ...and cancelled before it could run
        elif op == "tick":
            await asyncio.sleep(0.002)
        await _settle()
        world.check()
    # drain: finish everyone, then no lane may be left behind
    for _ in range(len(world.requests) + 1):
        for request in world.requests:
            if request.state == "holding":
                request.done.set()
        await _settle()
        world.check()
    await asyncio.gather(*(r.task for r in world.requests if r.task), return_exceptions=True)
    assert all(r.state in ("finished", "cancelled", "timed_out") for r in world.requests)
    assert len(world.lanes) == 0, "a lane leaked"


@settings(max_examples=300, deadline=None)
@given(ops)
def test_lane_properties(schedule: list[tuple[str, object, float]]) -> None:
    asyncio.run(_play(schedule))


async def test_positions_and_limits() -> None:
    lanes = LocalLanes()
    holder = await lanes.enter("k", max_waiting=2)
    assert holder.arrival_position == 0 and await holder.position() == 0
    second = await lanes.enter("k", max_waiting=2)
    third = await lanes.enter("k", max_waiting=2)
    assert (second.arrival_position, third.arrival_position) == (1, 2)
    with pytest.raises(QueueFull):
        await lanes.enter("k", max_waiting=2)
    with pytest.raises(SessionBusy):
        await lanes.enter("k", max_waiting=0)
    info = await lanes.info("k")
    assert info is not None and info.running and info.waiting == 2
    await second.release()  # leaves the queue
    assert await third.position() == 1
    await holder.release()
    await third.granted(1)
    assert await third.position() == 0 and third.fence > holder.fence
    await third.release()
    assert await lanes.info("k") is None and len(lanes) == 0


async def test_timeout_leaves_the_queue() -> None:
    lanes = LocalLanes()
    holder = await lanes.enter("k", max_waiting=5)
    waiter = await lanes.enter("k", max_waiting=5)
    with pytest.raises(QueueTimeout):
        await waiter.granted(0.01)
    await waiter.release()
    assert (await lanes.info("k")).waiting == 0  # type: ignore[union-attr]
    await holder.release()
    assert len(lanes) == 0
