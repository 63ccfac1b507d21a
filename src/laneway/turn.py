"""A turn as the requests that wait on it see it: queued, running, then a result or an error.

Several requests can follow one turn: the members of a `collect` batch, and repeats of an
idempotent request. A streamed turn keeps its event log, so a follower that arrives late
replays what it missed and then follows live.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from laneway.errors import LanewayError
from laneway.lanes.base import Ticket
from laneway.store.base import SessionRef

#: ("start", None), ("deltas", [text, ...]) (the text of one read from the model, in its
#: pieces), ("tool_calls", list); then ("done", body) or ("error", err)
Event = tuple[str, Any]
TERMINAL = ("done", "error")


class _RandomHex:
    """Hex strings of `size` random bytes, cut from blocks the OS's randomness fills 4 KiB at
    a time: `secrets.token_hex` makes a getrandom system call and three Python calls for
    each (1.0 µs against 0.3 here). For the event loop's thread; a forked child starts on a
    block of its own, never on its parent's."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._block = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._block = b""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at + self._size > len(self._block):
            self._block = os.urandom(4096 // self._size * self._size)
            at = 0
        self._at = at + self._size
        return self._block[at : at + self._size].hex()


_turn_hex = _RandomHex(12)


def new_turn_id() -> str:
    return "turn_" + _turn_hex()


class Turn:
    __slots__ = (
        "id",
        "completion_id",
        "ref",
        "model",
        "ticket",
        "arrival_position",
        "created",
        "started",
        "queue_wait_ms",
        "status",
        "streamed",
        "requests",
        "result",
        "task",
        "interrupt_reason",
        "interruptible",
        "_log",
        "_waiters",
    )

    def __init__(
        self,
        ref: SessionRef,
        model: str,
        streamed: bool,
        turn_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.id = turn_id or new_turn_id()
        self.completion_id = "chatcmpl-" + self.id.removeprefix("turn_")
        self.ref = ref
        self.model = model
        #: The lane ticket, from joining the lane until the turn is retired.
        self.ticket: Ticket | None = None
        self.arrival_position = 0
        self.created = time.time()
        self.started = False
        self.queue_wait_ms = 0.0
        self.status = "queued"
        #: Whether the model's output is streamed (and logged for followers).
        self.streamed = streamed
        #: Requests waiting on this turn: its own, collected ones, idempotent repeats.
        self.requests = 1
        loop = loop or asyncio.get_running_loop()
        self.result: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.task: asyncio.Task[Any] | None = None
        #: Why the running turn is being stopped: "interrupt", "disconnect" or "timeout".
        self.interrupt_reason: str | None = None
        #: True while stopping the turn is safe: the model is running, nothing is committing.
        self.interruptible = False
        self._log: list[Event] = []
        #: Followers waiting for the next event or the result, each on a future of its own.
        self._waiters: list[asyncio.Future[None]] = []

    # -- producing ----------------------------------------------------------------------

    def emit(self, kind: str, value: Any) -> None:
        """Log an event and wake the followers waiting for one. "start" wakes them only for
        a turn that was queued (its stream stops its queue comments then); the others skip
        it, so it waits in the log for the first output (a wake-up less per streamed turn)."""
        if self.streamed:
            self._log.append((kind, value))
            if self._waiters and (kind != "start" or self.arrival_position):
                self._wake()

    def finish(self, body: dict[str, Any], status: str) -> None:
        self.status = status
        self.result.set_result(body)
        self.emit("done", body)
        self._wake()

    def fail(self, error: LanewayError, status: str = "failed") -> None:
        self.status = status
        self.result.set_exception(error)
        self.result.exception()  # retrieved: followers may be gone; nothing to warn about
        self.emit("error", error)
        self._wake()

    def abandon(self) -> None:
        """The turn's task was cancelled before it had a result (shutdown)."""
        if not self.result.done():
            self.result.cancel()
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _changed(self) -> asyncio.Future[None]:
        """A future of the caller's own, done at the next event or at the result. Setting
        it directly wakes a follower one loop iteration sooner than `asyncio.shield` of a
        shared future would, and a follower cancelled meanwhile leaves the others alone."""
        waiter = self.result.get_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    # -- following ----------------------------------------------------------------------

    def watched(self, on_disconnect: str) -> bool:
        """Whether a follower must watch for its client leaving. Only a queued turn leaves
        its lane then, and a running one stops only under `on_disconnect = "cancel"`; a
        follower that need not watch saves a task and two loop iterations per wait."""
        return bool(self.arrival_position and not self.started) or on_disconnect == "cancel"

    async def settled(self) -> None:
        """Returns once the turn has its result (or was abandoned)."""
        while not self.result.done():
            await self._changed()

    def events(self) -> Follower:
        """Every event from the first, then live ones, until the terminal event."""
        return Follower(self)

    async def position(self) -> int:
        """The turn's place in its lane: 0 once it holds the lane or has been retired."""
        ticket = self.ticket
        return 0 if ticket is None else await ticket.position()

    def interrupt(self, reason: str) -> None:
        """Stop the turn: at once if the model is running, else before it is called; a
        turn already committing finishes normally. The turn then saves what it has."""
        if self.interrupt_reason is not None or self.result.done():
            return
        self.interrupt_reason = reason
        if self.interruptible and self.task is not None:
            self.task.cancel()

    def detach(self, on_disconnect: str) -> None:
        """A request following this turn went away. The last one leaving a queued turn
        takes it out of the queue; leaving a running one stops it only if the agent's
        `on_disconnect` says "cancel"."""
        self.requests -= 1
        if self.requests > 0 or self.result.done() or self.task is None:
            return
        if not self.started:
            self.task.cancel()
        elif on_disconnect == "cancel":
            self.interrupt("disconnect")

    def view(self) -> dict[str, Any]:
        """The turn as `GET /v1/sessions/{key}/turns/{id}` shows it."""
        view: dict[str, Any] = {
            "object": "turn",
            "id": self.id,
            "session_key": self.ref.key,
            "agent": self.ref.agent,
            "status": self.status,
            "created_at": self.created,
            "queue_wait_ms": self.queue_wait_ms if self.started else None,
        }
        if self.result.cancelled():
            view["status"] = "abandoned"
        elif self.result.done():
            if self.result.exception() is not None:
                error = self.result.exception()
                assert isinstance(error, LanewayError)
                view["error"] = error.body()["error"]
            else:
                view["response"] = self.result.result()
        return view


class Follower:
    """One request's place in a turn's events (see `Turn.events`). `ready()` says whether the
    next event is there already, so that a stream can send all those in one write."""

    __slots__ = ("turn", "_i", "_ended")

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self._i = 0
        self._ended = False

    def __aiter__(self) -> Follower:
        return self

    def ready(self) -> bool:
        turn = self.turn
        return self._i < len(turn._log) if turn.streamed else turn.result.done()

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        turn = self.turn
        if not turn.streamed:  # followed as a stream, produced without one: replay the end
            await turn.settled()
            self._ended = True
            try:
                return ("done", turn.result.result())
            except LanewayError as e:
                return ("error", e)
        while self._i >= len(turn._log):
            await turn._changed()
        event = turn._log[self._i]
        self._i += 1
        self._ended = event[0] in TERMINAL
        return event
