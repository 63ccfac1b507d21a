"""The lane contract every backend implements (in-process, Redis).

A lane serialises the turns of one session key. The request path is:

    ticket = await lanes.enter(key, max_waiting=...)   # arrival: position fixed here
    try:
        await ticket.granted(timeout)                  # FIFO wait; exclusive from here on
        ... resolve the session, run the turn, commit with ticket.fence ...
    finally:
        await ticket.release(note)                     # leave the queue or free the lane

Guarantees, identical in every backend:

* **Exclusive**: at most one ticket per key holds the lane at any instant.
* **FIFO**: tickets of one key are granted in the order `enter` returned them.
* **Cancel-safe**: a waiter cancelled or timed out leaves the queue without a trace; a
  ticket granted at the instant its waiter was cancelled passes the lane on in `release`.
* **Fenced**: each grant carries a `fence` larger than every earlier grant of that key, so
  the store can refuse a write from a holder that lost the lane without knowing it.
* **Bounded**: an idle lane holds no state; memory is proportional to busy keys only
  (Redis also keeps a released lane's hand-off note, a few bytes, for an hour).

A **hand-off note** is what a holder leaves its successor: a string from the store
(`Store.mark`) naming the session state it left, so that the next holder, if it holds the
same state, need not ask the store for it. A grant carries the note of the release that
freed the lane, and only of that one: a lane whose holder lost its lease passes on none.
The in-process lanes pass none at all: their store is the only writer and trusts its cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LaneInfo:
    """A busy lane as operators see it."""

    key: str
    running: bool
    waiting: int
    held_for_s: float
    #: The running turn's id (what `enter` was given as `owner`).
    holder: str | None = None
    #: How long the head of the queue has waited (0 when nothing waits).
    oldest_wait_s: float = 0.0


class Ticket(Protocol):
    key: str
    #: Tickets ahead of this one when it arrived, the running turn included; 0 = lane was free.
    arrival_position: int
    #: Valid once granted: monotonic per key across grants.
    fence: int
    #: Valid once granted: the previous holder's hand-off note, if it left one.
    handoff: str | None
    #: Called (on the event loop) when another request asks the holder to stop.
    on_interrupt: Callable[[], None] | None
    #: Called when the holder lost the lane (its lease ran out): it must stop at once.
    on_lost: Callable[[], None] | None

    async def granted(self, timeout: float) -> None:
        """Wait until this ticket holds the lane; `QueueTimeout` after `timeout` seconds."""

    async def position(self) -> int:
        """Tickets ahead now (0 when this ticket holds the lane)."""

    async def release(self, handoff: str | None = None) -> None:
        """Leave the queue or free the lane for the next ticket, with `handoff` for it if
        this ticket holds the lane, and drop `on_interrupt` and
        `on_lost` (they close over the turn, which holds the ticket: a cycle that only the
        collector could free otherwise). Idempotent."""

    def release_soon(self, handoff: str | None = None) -> None:
        """`release` without waiting for its answer (a turn's reply need not wait for the
        lane service): under way when this returns, so ahead of any later call of this
        process to the lanes, and its outcome handled when it comes."""

    def secure(self) -> bool:
        """Whether the holder can be sure it still holds the lane (checked before a
        commit; the fence still guards the store if the answer comes too late)."""


class LaneBackend(Protocol):
    async def enter(self, key: str, *, max_waiting: int, owner: str = "") -> Ticket:
        """Join the key's queue. `QueueFull` if `max_waiting` tickets already wait, and
        `SessionBusy` when `max_waiting` is 0 and the lane is busy. `owner` names the
        ticket's turn in `LaneInfo.holder`."""

    async def interrupt(self, key: str) -> bool:
        """Ask the key's holder to stop (its `on_interrupt` runs, wherever it is).
        False if the lane is idle."""

    async def claim(self, name: str, turn_id: str, ttl_s: float, *, replace: bool = False) -> str | None:
        """Claim an idempotency name for `turn_id` among replicas for `ttl_s`. Returns the
        turn id of another live replica's earlier claim, else None (claimed). A single
        process has no one to share with and always returns None."""

    async def unclaim(self, name: str, turn_id: str) -> None:
        """Drop `turn_id`'s claim (its turn failed without changing anything)."""

    async def claimed(self, name: str) -> str | None:
        """The turn id holding the claim, if its replica is alive."""

    async def info(self, key: str) -> LaneInfo | None:
        """The lane of `key`, or None when it is idle."""

    async def busy(self) -> list[LaneInfo]:
        """All busy lanes."""

    async def close(self) -> None: ...
