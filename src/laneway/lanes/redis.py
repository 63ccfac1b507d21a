"""Lanes in Redis, shared by every replica. The same contract as the in-process lanes
(see `base.py`), made atomic by Lua scripts.

Keys, for prefix P and lane key K:

    P seq           INCR: ticket order, so arrival order is one order across replicas
    P fence         every grant's fence: INCR, raised to the server clock (µs) when it
                    lags, so fences keep growing after lane keys expired or Redis restarted
    P q:K           ZSET of waiting tickets scored by seq; expires with the longest wait
    P h:K           the holder, "ticket|fence|granted_ms", with a lease (PX) that the
                    holder's replica renews; a crashed holder's lane frees itself
    P n:K           the hand-off note of the last clean release, until the next grant
                    takes it (kept an hour at most)
    P c:NAME        an idempotency claim: "R|turn_id" (PX its time to live)
    P alive:R       replica R is alive (PX lease, renewed with its leases); grants skip
                    the tickets of dead replicas
    channel P r:R   grants ("grant|ticket|fence|note") and interrupts for replica R's
                    tickets: hand-off by notification, with a slow check as the safety
                    net for lost messages

A ticket id is "R:seq:entered_ms:owner". A holder that cannot renew its lease in time is
told it lost the lane (`on_lost`) and must stop; the fence keeps it from writing if it
does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from laneway.errors import QueueFull, QueueTimeout, SessionBusy, Unavailable
from laneway.lanes import redis_scripts as scripts
from laneway.lanes.base import LaneInfo
from laneway.lanes.resp import RespClient

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: A hand-off note outlives its lane's last turn this long: past it, the next turn claims
#: the session from the store, as it would with no note.
_NOTE_TTL_MS = 3_600_000


def parse_url(url: str) -> tuple[str, str]:
    """`redis://host:port/db?prefix=P` → (URL without the prefix, prefix)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "laneway:")
    return urlunsplit(parts._replace(query=urlencode(query))), prefix


class RedisTicket:
    __slots__ = ("key", "arrival_position", "fence", "handoff", "owner", "on_interrupt",
                 "on_lost", "id", "lost", "_lanes", "_future", "_done", "_renewed")

    def __init__(self, lanes: RedisLanes, key: str, ticket_id: str, position: int, fence: int,
                 owner: str, handoff: str | None = None) -> None:
        self.key = key
        self.id = ticket_id
        self.arrival_position = position
        self.fence = fence
        self.handoff = handoff
        self.owner = owner
        self.on_interrupt: Callable[[], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self._lanes = lanes
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if fence:
            self._future.set_result(None)
        self._done = False
        self._renewed = time.monotonic()
        self.lost = False

    def _grant(self, fence: int, handoff: str | None) -> None:
        if not self._future.done():
            self.fence = fence
            self.handoff = handoff
            self._renewed = time.monotonic()
            self._future.set_result(None)

    async def granted(self, timeout: float) -> None:
        lanes = self._lanes
        deadline = time.monotonic() + timeout
        while not self._future.done():
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(self._future),
                                       max(0.0, min(lanes.check_s, remaining)))
            except TimeoutError:
                state, value, note = await lanes._check_ticket(self)
                if state == 1:
                    self._grant(value, note)
                elif state == -1:
                    raise Unavailable("this request lost its place in the lane") from None
                elif time.monotonic() >= deadline:
                    raise QueueTimeout(
                        f"waited {timeout:g}s for the session's lane", retry_after=1.0
                    ) from None

    async def position(self) -> int:
        if self._future.done():
            return 0
        state, value, note = await self._lanes._check_ticket(self)
        if state == 1:
            self._grant(value, note)
            return 0
        return max(0, value)

    def secure(self) -> bool:
        """Renewed recently enough that the lease cannot have run out yet."""
        age = time.monotonic() - self._renewed
        return not self.lost and age < self._lanes.lease_ms / 1000 * 0.8

    async def release(self, handoff: str | None = None) -> None:
        if not self._done:
            await self._lanes._send_release(*self._leave(handoff))

    def release_soon(self, handoff: str | None = None) -> None:
        if not self._done:
            self._lanes._release_soon(*self._leave(handoff))

    def _leave(self, handoff: str | None) -> tuple[str, list[str], list[Any]]:
        """Mark the ticket done and give the release script's key and arguments."""
        self._done = True
        self.on_interrupt = self.on_lost = None
        lanes = self._lanes
        lanes._tickets.pop(self.id, None)
        keys = [lanes._q(self.key), lanes._h(self.key), lanes.prefix + "fence", lanes._n(self.key)]
        return self.key, keys, [self.id, lanes.lease_ms, _now_ms(), lanes.prefix, handoff or "",
                                _NOTE_TTL_MS]


class RedisLanes:
    def __init__(self, url: str, *, lease_s: float = 10.0, max_wait_s: float = 3600.0) -> None:
        self.url, self.prefix = parse_url(url)
        self.replica = secrets.token_hex(6)
        self.lease_ms = int(lease_s * 1000)
        self.check_s = lease_s / 4
        self._queue_ttl_ms = int((max_wait_s + 2 * lease_s) * 1000)
        # A bounded pool that makes callers wait for a free connection: under thousands of
        # concurrent requests an unbounded one ran into redis-py's connection cap (503s).
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=64, timeout=5.0, socket_timeout=2.0,
            socket_connect_timeout=2.0, decode_responses=True,
        )
        self._redis = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        # The scripts every turn runs go through the lean client when it can speak the URL.
        self._fast = RespClient(self.url) if self.url.startswith("redis://") else None
        self._enter = self._redis.register_script(scripts.ENTER)
        self._release = self._redis.register_script(scripts.RELEASE)
        self._check = self._redis.register_script(scripts.CHECK)
        self._renew = self._redis.register_script(scripts.RENEW)
        self._claim = self._redis.register_script(scripts.CLAIM)
        self._unclaim = self._redis.register_script(scripts.UNCLAIM)
        self._tickets: dict[str, RedisTicket] = {}
        #: Grants that arrived before `enter` registered their ticket: fence, note, when
        #: received.
        #: A grant for a ticket already released (its notification came late) is dropped
        #: by the heartbeat.
        self._early: dict[str, tuple[int, str | None, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Releases on their way (`release_soon`): their replies, or the tasks sending them.
        self._releasing: set[asyncio.Future[Any]] = set()
        self._closing = False
        self._alive_ok = time.monotonic()

    async def open(self) -> None:
        await self._call(self._redis.set(self._alive_key(), "1", px=self.lease_ms))
        self._tasks = [
            asyncio.create_task(self._listen(), name="lanes-listen"),
            asyncio.create_task(self._heartbeat(), name="lanes-heartbeat"),
        ]

    async def close(self) -> None:
        """Stop the listener and the heartbeat. Their loops also end on `_closing`: a
        cancellation that lands inside redis-py may come back out as a `RedisError`,
        which they would otherwise take for an outage and retry."""
        self._closing = True
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=2.0)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._alive_key())
        await self._redis.aclose()
        if self._fast is not None:
            await self._fast.close()

    # -- the contract --------------------------------------------------------------------

    async def enter(self, key: str, *, max_waiting: int, owner: str = "") -> RedisTicket:
        ticket_id, position, value, note = await self._eval(
            self._enter,
            [self._q(key), self._h(key), self.prefix + "seq", self.prefix + "fence",
             self._n(key)],
            [self.replica, owner, max_waiting, self.lease_ms, _now_ms(), self._queue_ttl_ms,
             self.prefix],
        )
        if position == -1:
            if max_waiting == 0:
                raise SessionBusy("the session is running another turn", retry_after=1.0)
            raise QueueFull(f"{value} requests already wait for this session", retry_after=1.0)
        ticket = RedisTicket(self, key, ticket_id, position, value if position == 0 else 0, owner,
                             note or None)
        self._tickets[ticket_id] = ticket
        early = self._early.pop(ticket_id, None)
        if early is not None:
            ticket._grant(early[0], early[1])
        return ticket

    async def interrupt(self, key: str) -> bool:
        holder = await self._call(self._redis.get(self._h(key)))
        if holder is None:
            return False
        ticket = str(holder).split("|", 1)[0]
        replica = ticket.split(":", 1)[0]
        await self._call(self._redis.publish(f"{self.prefix}r:{replica}", f"interrupt|{ticket}"))
        return True

    async def claim(self, name: str, turn_id: str, ttl_s: float, *, replace: bool = False) -> str | None:
        value = f"{self.replica}|{turn_id}"
        if replace:
            await self._call(self._redis.set(self._c(name), value, px=int(ttl_s * 1000)))
            return None
        other = await self._call(
            self._claim(keys=[self._c(name)], args=[value, int(ttl_s * 1000), self.prefix])
        )
        return other or None

    async def unclaim(self, name: str, turn_id: str) -> None:
        await self._call(self._unclaim(keys=[self._c(name)], args=[f"{self.replica}|{turn_id}"]))

    async def claimed(self, name: str) -> str | None:
        current = await self._call(self._redis.get(self._c(name)))
        if current is None:
            return None
        replica, _, turn_id = str(current).partition("|")
        alive = await self._call(self._redis.exists(f"{self.prefix}alive:{replica}"))
        return turn_id if alive else None

    async def info(self, key: str) -> LaneInfo | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._h(key))
            pipe.zcard(self._q(key))
            pipe.zrange(self._q(key), 0, 0)
            holder, waiting, head = await self._call(pipe.execute())
        if holder is None and not waiting:
            return None
        return _info(key, holder, waiting, head[0] if head else None)

    async def busy(self) -> list[LaneInfo]:
        keys: set[str] = set()
        for pattern in (self.prefix + "h:*", self.prefix + "q:*"):
            async for name in self._redis.scan_iter(match=pattern, count=500):
                keys.add(name[len(self.prefix) + 2 :])
        infos = [await self.info(key) for key in sorted(keys)]
        return [info for info in infos if info is not None]

    # -- releasing -----------------------------------------------------------------------

    async def _send_release(self, key: str, keys: list[str], args: list[Any]) -> None:
        try:
            granted = await self._eval(self._release, keys, args)
        except Unavailable:
            logger.warning("could not release %s: its lease will run out", key)
            return
        if granted:  # the next ticket may be this replica's: no need to wait for the message
            self._granted(granted[0], int(granted[1]), granted[2] or None)

    def _release_soon(self, key: str, keys: list[str], args: list[Any]) -> None:
        """Send the release on the lean client's connection at once (ahead of any later
        call of this replica) and handle its reply when it comes; with no such connection
        ready, a task releases."""
        reply = self._fast.evalsha_now(self._release.sha, keys, args) if self._fast else None
        if reply is None:
            self._release_in_task(key, keys, args)
            return
        self._releasing.add(reply)
        reply.add_done_callback(functools.partial(self._released, key, keys, args))

    def _released(self, key: str, keys: list[str], args: list[Any], reply: asyncio.Future[Any]
                  ) -> None:
        self._releasing.discard(reply)
        granted = None if reply.cancelled() or reply.exception() else reply.result()
        if isinstance(granted, ResponseError) and str(granted).startswith("NOSCRIPT"):
            self._release_in_task(key, keys, args)  # Redis restarted: `_eval` sends the script
        elif granted is None or isinstance(granted, ResponseError):
            logger.warning("could not release %s: its lease will run out", key)
        elif granted:
            self._granted(granted[0], int(granted[1]), granted[2] or None)

    def _release_in_task(self, key: str, keys: list[str], args: list[Any]) -> None:
        task = asyncio.ensure_future(self._send_release(key, keys, args))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    # -- helpers -------------------------------------------------------------------------

    async def _check_ticket(self, ticket: RedisTicket) -> tuple[int, int, str | None]:
        """The safety net's check: (state, fence or tickets ahead, note); see `scripts.CHECK`."""
        key = ticket.key
        result = await self._eval(
            self._check, [self._q(key), self._h(key), self.prefix + "fence", self._n(key)],
            [ticket.id, self.lease_ms, _now_ms(), self.prefix],
        )
        note = result[2] if len(result) > 2 else ""
        return int(result[0]), int(result[1]), note or None

    async def _eval(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self._fast is not None:
            return await self._call(self._fast.evalsha(script.sha, keys, args, script.script))
        return await self._call(script(keys=keys, args=args))

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisError, OSError) as e:
            raise Unavailable(f"the lane service (Redis) is unreachable: {type(e).__name__}",
                              retry_after=1.0) from None

    async def _listen(self) -> None:
        """Grants and interrupts for this replica's tickets; reconnects after an outage."""
        while not self._closing:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(f"{self.prefix}r:{self.replica}")
                    async for message in pubsub.listen():
                        self._dispatch(message.get("data"))
            except (RedisError, OSError):
                await asyncio.sleep(0.2)

    def _dispatch(self, data: Any) -> None:
        if not isinstance(data, str):
            return
        kind, _, rest = data.partition("|")
        if kind == "grant":
            # A replica of a build before the notes sends no note: its grants carry none.
            ticket_id, fence, *note = rest.split("|")
            self._granted(ticket_id, int(fence), note[0] or None if note else None)
        elif kind == "interrupt":
            ticket = self._tickets.get(rest)
            if ticket is not None and ticket.on_interrupt is not None:
                ticket.on_interrupt()

    def _granted(self, ticket_id: str, fence: int, note: str | None) -> None:
        """A grant, from a notification or from this replica's own RELEASE: a no-op for a
        ticket already granted or of another replica."""
        ticket = self._tickets.get(ticket_id)
        if ticket is not None:
            ticket._grant(fence, note)
        elif ticket_id.startswith(self.replica + ":"):
            self._early[ticket_id] = (fence, note, time.monotonic())

    async def _heartbeat(self) -> None:
        """Renew this replica's liveness and every lease it holds, five times a lease.
        A lease not renewed in time is lost: its holder is told to stop."""
        while not self._closing:
            await asyncio.sleep(self.lease_ms / 5000)
            await self._renew_leases([t for t in self._tickets.values()
                                      if t._future.done() and not t._done and not t.lost])
            now = time.monotonic()
            for ticket_id, (_, _, received) in list(self._early.items()):
                if now - received > self.lease_ms / 1000:
                    del self._early[ticket_id]

    async def _renew_leases(self, held: list[RedisTicket]) -> None:
        """Renew this replica's liveness and the leases of `held`. A ticket released while
        its renewal was on its way (the release goes on another connection, so it may
        arrive first) lost nothing: its turn is over."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._alive_key(), "1", px=self.lease_ms)
                for ticket in held:
                    await self._renew(keys=[self._h(ticket.key)],
                                      args=[ticket.id, self.lease_ms], client=pipe)
                results = await pipe.execute()
        except (RedisError, OSError):
            results = None
        now = time.monotonic()
        for i, ticket in enumerate(held):
            if ticket._done:
                continue
            if results is not None and results[i + 1] == 1:
                ticket._renewed = now
            elif results is not None or now - ticket._renewed > self.lease_ms / 1000 * 0.8:
                self._lose(ticket)

    def _lose(self, ticket: RedisTicket) -> None:
        logger.warning("lost the lease of %s", ticket.key)
        ticket.lost = True
        if ticket.on_lost is not None:
            ticket.on_lost()

    def _alive_key(self) -> str:
        return f"{self.prefix}alive:{self.replica}"

    def _c(self, name: str) -> str:
        return f"{self.prefix}c:{name}"

    def _q(self, key: str) -> str:
        return f"{self.prefix}q:{key}"

    def _h(self, key: str) -> str:
        return f"{self.prefix}h:{key}"

    def _n(self, key: str) -> str:
        return f"{self.prefix}n:{key}"


def _info(key: str, holder: str | None, waiting: int, head: str | None) -> LaneInfo:
    now_ms = _now_ms()
    oldest = max(0.0, (now_ms - int(head.split(":", 3)[2])) / 1000) if head else 0.0
    if holder is None:
        return LaneInfo(key, False, waiting, 0.0, None, oldest)
    ticket, _, rest = holder.partition("|")
    granted_ms = int(rest.rsplit("|", 1)[-1])
    owner = ticket.split(":", 3)[3] or None
    return LaneInfo(key, True, waiting, max(0.0, (now_ms - granted_ms) / 1000), owner, oldest)


def _now_ms() -> int:
    return int(time.time() * 1000)
