"""Which earlier turn a repeated request follows instead of running again.

A request is a repeat when it carries an `Idempotency-Key` already seen on its session, or
when it is an SDK retry (`x-stainless-retry-count` > 0) of a body seen in the last minutes.
Names are claimed in this process first (so a concurrent repeat waits for the decision),
then among replicas through the lane backend; a finished turn is found in the store.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from laneway.errors import TurnInterrupted
from laneway.lanes.base import LaneBackend
from laneway.store.base import SessionRef, Store
from laneway.turn import Turn

if TYPE_CHECKING:
    from laneway.service import ChatRequest

#: A retried SDK request (x-stainless-retry-count > 0) repeats the body of its first
#: attempt; within this window it follows that attempt's turn instead of running again.
RETRY_WINDOW_S = 600.0
_POLL_S = 0.05

Slot = Turn | asyncio.Future["Turn | None"]


class Repeats:
    def __init__(self, store: Store, lanes: LaneBackend, ttl_s: float) -> None:
        self.store = store
        self.lanes = lanes
        self.ttl_s = ttl_s
        #: Made in the app's lifespan; held: get_running_loop() is a system call on 3.11.
        self._loop = asyncio.get_running_loop()
        self._keys = _Expiring(ttl_s)
        self._retries = _Expiring(RETRY_WINDOW_S)

    def names(self, req: ChatRequest, key: str) -> list[str]:
        names = []
        if req.idempotency_key:
            names.append(f"{key}\x00key\x00{req.idempotency_key}")
        if req.fingerprint:
            scope = key if req.session_key else f"{req.tenant}/{req.agent.name}/*"
            names.append(f"{scope}\x00retry\x00{req.fingerprint}")
        return names

    async def earlier(self, name: str, ref: SessionRef, req: ChatRequest) -> Turn | None:
        """The turn an earlier request of this name started in this process, or a finished
        one in the store, unless it failed without changing anything."""
        if _is_retry_name(name) and not req.is_retry:
            return None  # a first attempt: it registers its body for its own retries
        entry = self._index(name).get(name)
        found: Turn | None = None
        if entry is not None:
            found = await entry if isinstance(entry, asyncio.Future) else entry
        elif req.idempotency_key and not _is_retry_name(name) and req.session_key:
            found = await self._stored(ref, req, req.idempotency_key)
        return found if _followable(found) else None

    def hold(self, names: list[str]) -> asyncio.Future[Turn | None]:
        """Claim the names in this process before anything awaits."""
        claim: asyncio.Future[Turn | None] = self._loop.create_future()
        for name in names:
            self._index(name)[name] = claim
        return claim

    def settle(self, names: list[str], claim: asyncio.Future[Turn | None], turn: Turn | None) -> None:
        for name in names:
            if turn is None:
                self._index(name).pop(name)
            else:
                self._index(name)[name] = turn
        claim.set_result(turn)

    async def among_replicas(
        self, names: list[str], turn_id: str, ref: SessionRef, req: ChatRequest
    ) -> Turn | None:
        """Claim the names for `turn_id` among replicas; if another replica's turn has
        them, follow that turn to its end (None if it failed without a trace)."""
        for name in names:
            ttl = RETRY_WINDOW_S if _is_retry_name(name) else self.ttl_s
            if _is_retry_name(name) and not req.is_retry:
                await self.lanes.claim(name, turn_id, ttl, replace=True)
                continue
            other = await self.lanes.claim(name, turn_id, ttl)
            if other is not None:
                found = await self._follow(name, other, ref, req)
                if _followable(found):
                    return found
                await self.lanes.claim(name, turn_id, ttl, replace=True)
        return None

    async def release(self, names: list[str], turn_id: str) -> None:
        """The turn failed without changing anything: its repeats may run anew."""
        for name in names:
            await self.lanes.unclaim(name, turn_id)

    async def _follow(self, name: str, turn_id: str, ref: SessionRef, req: ChatRequest) -> Turn | None:
        """Wait for another replica's turn: its record appears in the store when it ends;
        its claim disappears if it failed or its replica died."""
        deadline = time.monotonic() + req.agent.max_queue_wait_s + req.agent.max_turn_s
        while time.monotonic() < deadline:
            record = await self.store.turn(ref, turn_id)
            if record is not None:
                return _replay(ref, req, turn_id, record)
            if await self.lanes.claimed(name) != turn_id:
                return None
            await asyncio.sleep(_POLL_S)
        return None

    async def _stored(self, ref: SessionRef, req: ChatRequest, key: str) -> Turn | None:
        stored = await self.store.idempotent_turn(ref, key, time.time() - self.ttl_s)
        if stored is None:
            return None
        return _replay(ref, req, stored[0], {"status": "completed", "response": stored[1]})

    def _index(self, name: str) -> _Expiring:
        return self._retries if _is_retry_name(name) else self._keys


def _is_retry_name(name: str) -> bool:
    return "\x00retry\x00" in name


def _followable(turn: Turn | None) -> bool:
    """A turn a repeat may follow: not abandoned, and not failed without a trace (an
    interrupted turn saved its input, so its repeat gets the same error)."""
    if turn is None or turn.result.cancelled():
        return False
    error = turn.result.exception() if turn.result.done() else None
    return error is None or isinstance(error, TurnInterrupted)


def _replay(ref: SessionRef, req: ChatRequest, turn_id: str, record: dict[str, object]) -> Turn:
    """A finished turn known only from its record, as a turn requests can follow."""
    turn = Turn(ref, req.model, streamed=False, turn_id=turn_id)
    turn.started = True
    response = record.get("response")
    if record.get("status") == "interrupted" or not isinstance(response, dict):
        turn.fail(TurnInterrupted("this request's turn was interrupted by a newer request"),
                  "interrupted")
    else:
        turn.finish(response, str(record.get("status")))
    return turn


class _Expiring:
    """Names → a turn (or the future of one being decided), forgotten after `ttl_s` and
    bounded in size: oldest first out."""

    def __init__(self, ttl_s: float, limit: int = 100_000) -> None:
        self._ttl = ttl_s
        self._limit = limit
        self._items: OrderedDict[str, tuple[float, Slot]] = OrderedDict()

    def get(self, name: str) -> Slot | None:
        now = time.monotonic()
        items = self._items
        while items and (len(items) > self._limit or next(iter(items.values()))[0] < now):
            items.popitem(last=False)
        entry = items.get(name)
        return None if entry is None else entry[1]

    def __setitem__(self, name: str, value: Slot) -> None:
        self._items.pop(name, None)
        self._items[name] = (time.monotonic() + self._ttl, value)

    def pop(self, name: str) -> None:
        self._items.pop(name, None)
