"""The one place that knows the order of a turn:

    lane (taken before the session's identity is resolved)
      → session → agent loop → fenced commit → reply

`submit` decides, at a request's arrival, which turn it follows: an earlier one (an
idempotent repeat, or a `collect` batch still waiting) or a new one that joins the lane by
the request's policy. A turn runs in a task of its own, so that a client going away
cannot cut it in half (unless the agent says `on_disconnect = "cancel"`, which interrupts
it) and a streamed reply can be relayed while it runs. The common case, a plain request
that gets its lane at once, runs its turn in the request's own task instead (`run_here`):
nothing watches for its client, the server does not cancel a request's task when its
client leaves, and a task less saves two loop iterations per turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from laneway.agent.loop import AgentLoop, TurnInput, TurnOutput
from laneway.agent.tools import ToolContext
from laneway.config import AgentConfig, Settings
from laneway.errors import (
    LanewayError,
    QueueFull,
    QueueTimeout,
    SessionBusy,
    TurnInterrupted,
    TurnTimeout,
    Unavailable,
)
from laneway.lanes.base import LaneBackend
from laneway.metrics import Metrics
from laneway.repeats import Repeats
from laneway.store.base import (
    Memory,
    MemoryScope,
    SessionRef,
    SessionState,
    StaleFence,
    Store,
    TurnRecord,
)
from laneway.turn import Turn, new_turn_id
from laneway.upstream.base import Upstream

logger = logging.getLogger(__name__)

_KEEP_FINISHED = 10_000
_UNLIMITED = contextlib.nullcontext()


@dataclass(slots=True)
class ChatRequest:
    """A validated chat completion request (see `http/chat.py`)."""

    agent: AgentConfig
    model: str  # as the client named it; echoed in responses
    tenant: str
    session_key: str | None
    turn: TurnInput
    stream: bool = False
    include_usage: bool = False
    idempotency_key: str | None = None
    policy: str = "enqueue"
    #: Hash of the body when an SDK sends x-stainless-retry-count, and whether this is a retry.
    fingerprint: str | None = None
    is_retry: bool = False


class TurnSummary(NamedTuple):
    """A finished (or abandoned) turn, kept in memory for operators' live views. A tuple:
    one is made per turn, in a quarter of a frozen dataclass's time."""

    turn_id: str
    tenant: str
    agent: str
    session_key: str
    outcome: str
    created: float
    queue_wait_ms: float
    duration_ms: float


def lane_key(ref: SessionRef) -> str:
    """Tenant and agent names cannot contain '/', so the key is unambiguous."""
    return f"{ref.tenant}/{ref.agent}/{ref.key}"


def new_session_key() -> str:
    return "sess_" + secrets.token_urlsafe(16)


def fingerprint(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


class TurnService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        lanes: LaneBackend,
        upstreams: dict[str, Upstream],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.lanes = lanes
        self.upstreams = upstreams
        self.metrics = metrics
        #: Held, not looked up per turn: on Python 3.11 each `asyncio.get_running_loop()`
        #: (and `current_task()` without a loop) is a getpid system call.
        self._loop = asyncio.get_running_loop()
        #: Queued and running turns, then the last finished ones (for rejoin and repeats).
        self._live: dict[str, Turn] = {}
        self._finished: OrderedDict[str, Turn] = OrderedDict()
        self.repeats = Repeats(store, lanes, settings.idempotency_ttl_s)
        #: Turn id → the idempotency names it claimed (released if it fails untouched).
        self._names: dict[str, list[str]] = {}
        #: Waiting requests per tenant (this replica's).
        self._queued: Counter[str] = Counter()
        #: Lane key → the `collect` turn still waiting there, open to more requests.
        self._batches: dict[str, Turn] = {}
        #: Turn id → its input (a `collect` batch grows it until the turn starts).
        self._inputs: dict[str, TurnInput] = {}
        #: Turns that the submitting request runs itself (`run_here`), not yet started.
        self._here: dict[str, tuple[ChatRequest, str]] = {}
        limit = settings.max_concurrent_turns
        #: Places among the turns that may call the model at once (FIFO across keys).
        self._admission = asyncio.Semaphore(limit) if limit else None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.recent: deque[TurnSummary] = deque(maxlen=2000)

    # -- arrival -------------------------------------------------------------------------

    async def submit(self, req: ChatRequest) -> Turn:
        """The turn this request follows, joining or starting one. Raises at once when the
        lane cannot take it (busy under `reject`, queue full)."""
        ref = SessionRef(req.tenant, req.agent.name, req.session_key or new_session_key())
        key = lane_key(ref)
        names = self.repeats.names(req, key)
        for name in names:
            earlier = await self.repeats.earlier(name, ref, req)
            if earlier is not None:
                return self._deduplicated(earlier)
        claim = self.repeats.hold(names)
        turn: Turn | None = None
        try:
            turn_id = new_turn_id()
            if names:
                earlier = await self.repeats.among_replicas(names, turn_id, ref, req)
                if earlier is not None:
                    turn = self._deduplicated(earlier)
                    return turn
            turn = await self._join(req, ref, key, turn_id)
            self._names[turn.id] = names
            return turn
        finally:
            self.repeats.settle(names, claim, turn)

    def _deduplicated(self, turn: Turn) -> Turn:
        turn.requests += 1
        self.metrics.turns["deduplicated"] += 1
        return turn

    async def _join(self, req: ChatRequest, ref: SessionRef, key: str, turn_id: str) -> Turn:
        batch = self._batches.get(key)
        if req.policy == "collect" and batch is not None and await self._can_join(batch, req):
            batch_input = self._inputs[batch.id]
            batch_input.new_input.extend(req.turn.new_input)
            batch_input.systems.extend(s for s in req.turn.systems if s not in batch_input.systems)
            batch.requests += 1
            batch.streamed = batch.streamed or req.stream
            self.metrics.turns["collected"] += 1
            return batch
        turn = Turn(ref, req.model, req.stream, turn_id, self._loop)
        max_waiting = 0 if req.policy == "reject" else req.agent.max_queue_depth
        try:
            ticket = await self.lanes.enter(key, max_waiting=max_waiting, owner=turn.id)
        except SessionBusy:
            self.metrics.turns["rejected"] += 1
            raise
        except QueueFull:
            self.metrics.turns["queue_full"] += 1
            raise
        turn.ticket = ticket
        turn.arrival_position = ticket.arrival_position
        if ticket.arrival_position:
            if self._queued[req.tenant] >= self.settings.max_queued_per_tenant:
                await ticket.release()
                self.metrics.turns["queue_full"] += 1
                raise QueueFull(
                    f"{self.settings.max_queued_per_tenant} requests of this tenant already wait",
                    code="tenant_queue_full", retry_after=1.0,
                )
            self._queued[req.tenant] += 1
        if req.policy == "interrupt" and ticket.arrival_position:
            await self.lanes.interrupt(key)
        if req.policy == "collect" and ticket.arrival_position:
            self._batches[key] = turn
        self._inputs[turn.id] = req.turn
        self._live[turn.id] = turn
        if req.stream or ticket.arrival_position or req.agent.on_disconnect == "cancel":
            self._track(turn, self._loop.create_task(self._run(turn, req, key)))
        else:
            self._here[turn.id] = (req, key)
        return turn

    async def run_here(self, turn: Turn) -> None:
        """Run `turn` in the calling task if `submit` left it to the request that made it
        (a plain request that got its lane at once); otherwise return at once."""
        here = self._here.pop(turn.id, None)
        if here is None:
            return
        task = asyncio.current_task(self._loop)
        assert task is not None
        self._track(turn, task)
        await self._run(turn, *here)

    def _track(self, turn: Turn, task: asyncio.Task[Any]) -> None:
        turn.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _can_join(self, batch: Turn, req: ChatRequest) -> bool:
        """A batch takes only plain user input, and only while it is still the last in its
        lane's queue: joining must not overtake a request that arrived in between."""
        if batch.started or any(m["role"] != "user" for m in req.turn.new_input):
            return False
        assert batch.ticket is not None
        info = await self.lanes.info(batch.ticket.key)
        return info is not None and await batch.ticket.position() == info.waiting

    # -- the turn ------------------------------------------------------------------------

    async def _run(self, turn: Turn, req: ChatRequest, key: str) -> None:
        agent = req.agent
        ticket = turn.ticket
        assert ticket is not None
        outcome = "error"
        started_at = 0.0
        timer: asyncio.TimerHandle | None = None
        queued = bool(ticket.arrival_position)
        try:
            await ticket.granted(agent.max_queue_wait_s)
            if queued:
                queued = False
                self._queued[turn.ref.tenant] -= 1
            started_at = time.time()
            turn.started = True
            turn.status = "running"
            if self._batches.get(key) is turn:
                del self._batches[key]
            turn.queue_wait_ms = (started_at - turn.created) * 1000
            self.metrics.queue_wait.observe(turn.queue_wait_ms / 1000)
            ticket.on_interrupt = lambda: turn.interrupt("interrupt")
            ticket.on_lost = lambda: turn.interrupt("lost")
            timer = self._loop.call_later(
                agent.max_turn_s, turn.interrupt, "timeout"
            )
            turn.emit("start", None)
            outcome = await self._execute(turn, req, started_at)
        except asyncio.CancelledError:
            outcome = "abandoned"
            turn.abandon()
            raise
        except QueueTimeout as e:
            outcome = "queue_timeout"
            turn.fail(e)
        except TurnInterrupted as e:
            outcome = "interrupted"
            turn.fail(e, "interrupted")
        except TurnTimeout as e:
            outcome = "timeout"
            turn.fail(e)
        except LanewayError as e:
            turn.fail(e)
        except Exception as e:
            logger.exception("turn %s failed", turn.id)
            turn.fail(LanewayError(f"internal error: {type(e).__name__}"))
        finally:
            if queued:
                self._queued[turn.ref.tenant] -= 1
            if timer is not None:
                timer.cancel()
            if self._batches.get(key) is turn:
                del self._batches[key]
            # The state this replica holds is the one its successor will find, unless
            # something failed in doubt (then the store has forgotten it: no note).
            ticket.release_soon(self.store.mark(turn.ref) if turn.started else None)
            names = self._names.pop(turn.id, [])
            if names and outcome not in ("ok", "interrupted"):
                with contextlib.suppress(LanewayError):
                    await self.repeats.release(names, turn.id)
            self._retire(turn, outcome, started_at)

    async def _execute(self, turn: Turn, req: ChatRequest, started_at: float) -> str:
        """Session → agent loop → fenced commit. Returns the outcome for the metrics."""
        agent = req.agent
        assert turn.ticket is not None
        inp = self._inputs[turn.id]
        loading = time.perf_counter()
        try:
            state = await self.store.load(turn.ref, turn.ticket.fence, agent.context_tokens,
                                          turn.ticket.handoff)
        finally:  # a failed call too: an operator looks here when the store is slow or down
            self.metrics.store_load.observe(time.perf_counter() - loading)
        tools = self._tool_context(state, agent, turn.ticket.key)
        memories = await self._recall(tools.scope, inp, agent, state)
        loop = AgentLoop(agent, self.upstreams[agent.name], state, inp)
        upstream_started = time.perf_counter()
        try:
            if turn.interrupt_reason is not None:  # asked to stop before the model ran
                raise asyncio.CancelledError
            async with self._admission or _UNLIMITED:
                turn.interruptible = True
                output = await loop.run(memories, tools, turn.emit if turn.streamed else None)
        except asyncio.CancelledError:
            turn.interruptible = False
            reason = turn.interrupt_reason
            if reason is None:
                raise
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                current.uncancel()
            if reason == "timeout":
                raise TurnTimeout(f"the turn ran past {agent.max_turn_s:g}s") from None
            if reason == "lost":
                raise Unavailable("this turn lost its lane (lease expired); nothing was saved",
                                  retry_after=1.0) from None
            await self._commit(turn, req, state, loop.salvage(), tools, None, None, started_at,
                               "interrupted")
            raise TurnInterrupted(
                "this turn was interrupted by a newer request for the session; its input "
                "and partial reply were saved" if reason == "interrupt" else
                "this turn was stopped when its client disconnected"
            ) from None
        turn.interruptible = False
        self.metrics.upstream_seconds.observe(time.perf_counter() - upstream_started)
        body = self._completion(turn, output)
        await self._commit(turn, req, state, output.messages, tools, body, output.usage,
                           started_at, output.status)
        turn.finish(body, output.status)
        return "ok"

    def _tool_context(self, state: SessionState, agent: AgentConfig, key: str) -> ToolContext:
        ref = state.ref
        if agent.memory_scope == "agent":
            scope: MemoryScope | None = MemoryScope(ref.tenant, ref.agent, None)
        elif state.id is not None:
            scope = MemoryScope(ref.tenant, ref.agent, state.id)
        else:
            scope = None

        async def queue_depth() -> int:
            info = await self.lanes.info(key)
            return 0 if info is None else info.waiting

        return ToolContext(self.store, scope, state, queue_depth)

    async def _recall(
        self, scope: MemoryScope | None, inp: TurnInput, agent: AgentConfig, state: SessionState
    ) -> list[Memory]:
        """Pinned memories, then those matching the new input: recall must not depend on
        the model thinking of calling memory_search."""
        if scope is None or agent.recall_limit <= 0:
            return []
        if scope.session_id is not None and not state.has_memories:
            return []  # the session's row says it has none: no query
        query = " ".join(_text(m["content"]) for m in inp.new_input if m["role"] == "user")
        return await self.store.recall(scope, query, agent.recall_limit)

    async def _commit(
        self,
        turn: Turn,
        req: ChatRequest,
        state: SessionState,
        messages: list[dict[str, Any]],
        tools: ToolContext,
        body: dict[str, Any] | None,
        usage: dict[str, int] | None,
        started_at: float,
        status: str,
    ) -> None:
        assert turn.ticket is not None
        if not turn.ticket.secure():
            raise Unavailable("this turn lost its lane (lease expired); nothing was saved",
                              retry_after=1.0)
        record = TurnRecord(
            id=turn.id,
            status=status,
            created_at=turn.created,
            started_at=started_at,
            finished_at=time.time(),
            queue_wait_ms=turn.queue_wait_ms,
            messages=messages,
            memories=tools.saved,
            response=body,
            usage=usage,
            idempotency_key=req.idempotency_key,
            memory_scope=req.agent.memory_scope,
        )
        writing = time.perf_counter()
        try:
            await self.store.commit(state, record, turn.ticket.fence)
        except StaleFence:
            raise Unavailable("this turn lost its lane before it could be saved") from None
        finally:
            self.metrics.store_commit.observe(time.perf_counter() - writing)

    def _completion(self, turn: Turn, output: TurnOutput) -> dict[str, Any]:
        return {
            "id": turn.completion_id,
            "object": "chat.completion",
            "created": int(turn.created),
            "model": turn.model,
            "choices": [
                {
                    "index": 0,
                    "message": output.reply,
                    "logprobs": None,
                    "finish_reason": output.finish_reason,
                }
            ],
            "usage": output.usage,
        }

    def _retire(self, turn: Turn, outcome: str, started_at: float) -> None:
        self._live.pop(turn.id, None)
        self._inputs.pop(turn.id, None)
        # Kept for late followers, a finished turn needs its result, not its task (with
        # its coroutine and context) or its released ticket (with the lane's queue): those
        # would keep ~8 more objects alive per turn for the garbage collector to walk.
        turn.task = None
        turn.ticket = None
        self._finished[turn.id] = turn
        while len(self._finished) > _KEEP_FINISHED:
            self._finished.popitem(last=False)
        self.metrics.turns[outcome] += 1
        duration_ms = (time.time() - started_at) * 1000 if turn.started else 0.0
        if turn.started:
            self.metrics.turn_seconds.observe(duration_ms / 1000)
        ref = turn.ref
        self.recent.append(
            TurnSummary(turn.id, ref.tenant, ref.agent, ref.key, outcome, turn.created,
                        turn.queue_wait_ms, duration_ms)
        )

    # -- reading turns -------------------------------------------------------------------

    def turn(self, turn_id: str) -> Turn | None:
        """A queued, running or recently finished turn of this process."""
        return self._live.get(turn_id) or self._finished.get(turn_id)

    def live(self, ref: SessionRef) -> list[Turn]:
        """The session's queued and running turns in this process, oldest first."""
        return [t for t in self._live.values() if t.ref == ref]

    async def close(self, grace_s: float = 10.0) -> None:
        """Let running turns finish (and be saved); queued ones are abandoned."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
