"""The lane contract, property-tested on the in-process backend: random arrivals, cancels
(including a cancel in the same tick as the grant), timeouts and releases."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from laneway.errors import QueueFull, QueueTimeout, SessionBusy
from laneway.lanes import LaneBackend, open_lanes
from laneway.lanes.local import LocalLanes
from laneway.lanes.redis import RedisLanes

REDIS = "redis://127.0.0.1:6379/0"


@contextlib.asynccontextmanager
async def backend(kind: str) -> AsyncIterator[LaneBackend]:
    """A fresh backend: in-process, or Redis under a random key prefix, removed after."""
    if kind == "local":
        lanes = LocalLanes()
        yield lanes
        await lanes.close()
        return
    prefix = f"lwtest:{uuid.uuid4().hex[:10]}:"
    lanes = await open_lanes(f"{REDIS}?prefix={prefix}", lease_s=2.0)
    try:
        yield lanes
    finally:
        await lanes.close()
        client = redis.asyncio.Redis.from_url(REDIS)
        names = [k async for k in client.scan_iter(match=prefix + "*")]
        leftovers = [n for n in names if not n.endswith((b"seq", b"fence"))]
        if names:
            await client.delete(*names)
        await client.aclose()
        assert leftovers == [], f"lane state left in Redis: {leftovers}"


async def _idle(lanes: LaneBackend) -> bool:
    return not await lanes.busy()

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
    def __init__(self, lanes: LaneBackend) -> None:
        self.lanes = lanes
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


async def _settle(kind: str) -> None:
    """Let grants reach their waiters: a few loop turns in-process, pub/sub for Redis."""
    if kind == "redis":
        await asyncio.sleep(0.02)
    for _ in range(5):
        await asyncio.sleep(0)


async def _play(kind: str, schedule: list[tuple[str, object, float]]) -> None:
    async with backend(kind) as lanes:
        await _play_on(kind, World(lanes), schedule)


async def _play_on(kind: str, world: World, schedule: list[tuple[str, object, float]]) -> None:
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
        await _settle(kind)
        world.check()
    # drain: finish everyone, then no lane may be left behind
    for _ in range(len(world.requests) + 1):
        for request in world.requests:
            if request.state == "holding":
                request.done.set()
        await _settle(kind)
        world.check()
    await asyncio.gather(*(r.task for r in world.requests if r.task), return_exceptions=True)
    assert all(r.state in ("finished", "cancelled", "timed_out") for r in world.requests)
    assert await _idle(world.lanes), "a lane leaked"


@settings(max_examples=300, deadline=None)
@given(ops)
def test_lane_properties_local(schedule: list[tuple[str, object, float]]) -> None:
    asyncio.run(_play("local", schedule))


@settings(max_examples=40, deadline=None)
@given(ops)
def test_lane_properties_redis(schedule: list[tuple[str, object, float]]) -> None:
    asyncio.run(_play("redis", schedule))


@pytest.fixture(params=["local", "redis"])
async def lanes(request: pytest.FixtureRequest) -> AsyncIterator[LaneBackend]:
    async with backend(request.param) as b:
        yield b


async def test_positions_and_limits(lanes: LaneBackend) -> None:
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
    assert await lanes.info("k") is None and await _idle(lanes)


async def test_release_drops_the_holders_callbacks(lanes: LaneBackend) -> None:
    """The callbacks close over the turn, which holds the ticket: kept after the release,
    each turn would be a cycle that waits for a full collection to be freed."""
    holder = await lanes.enter("k", max_waiting=5)
    holder.on_interrupt = holder.on_lost = lambda: None
    await holder.release()
    assert holder.on_interrupt is None and holder.on_lost is None
    assert await _idle(lanes)


async def test_timeout_leaves_the_queue(lanes: LaneBackend) -> None:
    holder = await lanes.enter("k", max_waiting=5)
    waiter = await lanes.enter("k", max_waiting=5)
    with pytest.raises(QueueTimeout):
        await waiter.granted(0.01)
    await waiter.release()
    assert (await lanes.info("k")).waiting == 0  # type: ignore[union-attr]
    await holder.release()
    assert await _idle(lanes)


async def test_info_reports_how_long_the_head_of_the_queue_waited(lanes: LaneBackend) -> None:
    holder = await lanes.enter("k", max_waiting=5, owner="turn_1")
    assert (await lanes.info("k")).oldest_wait_s == 0  # type: ignore[union-attr]
    first = await lanes.enter("k", max_waiting=5, owner="turn_2")
    await asyncio.sleep(0.2)
    second = await lanes.enter("k", max_waiting=5, owner="turn_3")
    info = await lanes.info("k")
    assert info is not None and info.holder == "turn_1" and info.waiting == 2
    assert 0.15 <= info.oldest_wait_s < 5, info  # the head's wait, not the newest's
    await first.release()  # the head leaves: the next one's wait is shorter
    assert (await lanes.info("k")).oldest_wait_s < info.oldest_wait_s  # type: ignore[union-attr]
    await second.release()
    await holder.release()
    assert await _idle(lanes)


async def test_interrupt_reaches_the_holder(lanes: LaneBackend) -> None:
    holder = await lanes.enter("k", max_waiting=5, owner="turn_1")
    interrupted = asyncio.Event()
    holder.on_interrupt = interrupted.set
    assert (await lanes.info("k")).holder == "turn_1"  # type: ignore[union-attr]
    assert await lanes.interrupt("k")
    await asyncio.wait_for(interrupted.wait(), 2)
    await holder.release()
    assert not await lanes.interrupt("k")


@contextlib.asynccontextmanager
async def _two_replicas() -> AsyncIterator[tuple[Any, Any]]:
    """Two replicas' lanes on one Redis, under a key prefix of their own, removed after."""
    prefix = f"lwtest:{uuid.uuid4().hex[:10]}:"
    a = await open_lanes(f"{REDIS}?prefix={prefix}", lease_s=1.0)
    b = await open_lanes(f"{REDIS}?prefix={prefix}", lease_s=1.0)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        client = redis.asyncio.Redis.from_url(REDIS)
        names = [k async for k in client.scan_iter(match=prefix + "*")]
        if names:
            await client.delete(*names)
        await client.aclose()


async def test_redis_crashed_holder_frees_its_lane_within_the_lease() -> None:
    async with _two_replicas() as (a, b):
        holder = await a.enter("k", max_waiting=5, owner="turn_a")
        waiter = await b.enter("k", max_waiting=5, owner="turn_b")
        for task in a._tasks:  # replica a dies: no release, no more heartbeats
            task.cancel()
        started = asyncio.get_running_loop().time()
        await waiter.granted(5)
        freed_after = asyncio.get_running_loop().time() - started
        assert freed_after < 1.0 + b.check_s + 0.5, freed_after
        assert waiter.fence > holder.fence
        await waiter.release()
        assert await b.info("k") is None


async def test_redis_holder_that_loses_its_lease_is_told() -> None:
    async with _two_replicas() as (a, b):
        holder = await a.enter("k", max_waiting=5)
        lost = asyncio.Event()
        holder.on_lost = lost.set
        await a._redis.delete(a._h("k"))  # the lease is gone (expired while paused, say)
        await asyncio.wait_for(lost.wait(), 2)
        other = await b.enter("k", max_waiting=5)
        assert other.arrival_position == 0 and other.fence > holder.fence
        await other.release()
        await holder.release()  # a stale release must not free someone else's lane


async def test_redis_grants_across_replicas_in_arrival_order() -> None:
    async with _two_replicas() as (a, b):
        order: list[str] = []
        first = await a.enter("k", max_waiting=10)
        tickets = []
        for i in range(6):
            lanes = a if i % 2 else b
            tickets.append((f"t{i}", await lanes.enter("k", max_waiting=10)))

        async def run(name: str, ticket: Any) -> None:
            await ticket.granted(5)
            order.append(name)
            await ticket.release()

        tasks = [asyncio.ensure_future(run(n, t)) for n, t in tickets]
        await asyncio.sleep(0.05)
        await first.release()
        await asyncio.gather(*tasks)
        assert order == [f"t{i}" for i in range(6)]


async def test_redis_fences_keep_growing_after_redis_forgets_everything() -> None:
    """A Redis restarted without persistence starts its counters over; fences must not."""
    async with backend("redis") as lanes:
        first = await lanes.enter("k", max_waiting=1)
        await first.release()
        client = redis.asyncio.Redis.from_url(REDIS)
        prefix = lanes.prefix  # type: ignore[attr-defined]
        await client.delete(prefix + "fence", prefix + "seq")
        await client.aclose()
        second = await lanes.enter("k", max_waiting=1)
        assert second.fence > first.fence
        await second.release()


async def test_redis_a_release_that_overtakes_its_leases_renewal_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The heartbeat renews the leases it saw held; a turn may end and release on the lean
    connection meanwhile, and that release may reach Redis first. The renewal then finds
    the lane free: that is no lost lease (no warning, no `lost`). A lease that is gone
    while its ticket still holds it is one."""
    async with _two_replicas() as (a, _):
        ended = await a.enter("k", max_waiting=5)
        held = await a.enter("j", max_waiting=5)
        ended.release_soon()
        await asyncio.wait_for(asyncio.gather(*a._releasing), 2)
        await a._redis.delete(a._h("j"))
        await a._renew_leases([ended, held])
        assert not ended.lost and held.lost
        assert caplog.text.count("lost the lease") == 1 and "lost the lease of j" in caplog.text
        await held.release()


async def test_redis_passes_a_clean_releases_note_to_the_next_grant_only() -> None:
    """The note a holder releases with reaches the next grant, whether that ticket waits on
    another replica, on the same one, or arrives after the lane went idle; the grant takes
    it, so no later grant sees it again. A holder that lost its lane leaves none."""
    async with _two_replicas() as (a, b):
        holder = await a.enter("k", max_waiting=5)
        assert holder.handoff is None
        first, second = await b.enter("k", max_waiting=5), await b.enter("k", max_waiting=5)
        await holder.release("s:1")
        await first.granted(2)  # by a notification to replica b
        assert first.handoff == "s:1"
        await first.release("s:2")  # b's own release grants b's next ticket
        await second.granted(2)
        assert second.handoff == "s:2"
        await second.release("s:3")  # the lane goes idle with the note
        later = await b.enter("k", max_waiting=5)
        assert later.arrival_position == 0 and later.handoff == "s:3"
        await later.release()  # no note to leave
        again = await a.enter("k", max_waiting=5)
        assert again.handoff is None
        await a._redis.delete(a._h("k"))  # its lease runs out: the lane is someone else's
        await again.release("s:4")
        last = await b.enter("k", max_waiting=5)
        assert last.handoff is None
        await last.release()


async def test_local_lanes_pass_no_notes() -> None:
    async with backend("local") as lanes:
        holder = await lanes.enter("k", max_waiting=1)
        waiter = await lanes.enter("k", max_waiting=1)
        await holder.release("s:1")
        await waiter.granted(1)
        assert waiter.handoff is None
        await waiter.release("s:2")


async def test_redis_release_soon_frees_the_lane_ahead_of_the_next_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A turn's reply does not wait for its release: `release_soon` returns at once, yet a
    request of the same replica that enters right after finds the lane free, and a waiter
    on another replica gets the grant with the note."""
    async with _two_replicas() as (a, b):
        for i in range(20):
            ticket = await a.enter("k", max_waiting=5)
            assert ticket.arrival_position == 0, i  # the previous release went first
            ticket.release_soon(f"s:{i}")
        holder = await a.enter("k", max_waiting=5)
        assert holder.handoff == "s:19"
        waiter = await b.enter("k", max_waiting=5)
        holder.release_soon("s:20")
        await waiter.granted(2)
        assert waiter.handoff == "s:20"
        waiter.release_soon()
    assert "could not release" not in caplog.text


async def test_redis_grant_messages_with_and_without_a_note() -> None:
    """A grant published by a replica of a build before the notes has no note field: it is
    a grant without a note, not a message that stops the listener."""
    lanes = RedisLanes(REDIS)
    me = lanes.replica
    lanes._dispatch(f"grant|{me}:1:0:turn_a|7|12:3")
    lanes._dispatch(f"grant|{me}:2:0:turn_b|8")
    assert {k: v[:2] for k, v in lanes._early.items()} == {
        f"{me}:1:0:turn_a": (7, "12:3"), f"{me}:2:0:turn_b": (8, None)}
    await lanes._redis.aclose()
