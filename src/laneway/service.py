"""The one place that knows the order of a turn:

    lane (taken before the session's identity is resolved)
      → session → agent loop → fenced commit → reply

Each turn runs in its own task, detached from the HTTP request, so a client that goes away
after its turn started cannot cut the turn short: it finishes, is saved, and its result can
be read afterwards. A client that goes away while queued abandons the turn, which leaves
the queue without having touched the session.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from laneway.agent.loop import AgentLoop, TurnInput, TurnOutput
from laneway.agent.tools import ToolContext
from laneway.config import AgentConfig
from laneway.errors import LanewayError, Unavailable
from laneway.lanes.base import LaneBackend, Ticket
from laneway.metrics import Metrics
from laneway.store.base import (
    Memory,
    MemoryScope,
    SessionRef,
    SessionState,
    StaleFence,
    Store,
    TurnRecord,
)
from laneway.upstream.base import Upstream

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class TurnSummary:
    """A finished (or abandoned) turn, kept in memory for operators' live views."""

    turn_id: str
    tenant: str
    agent: str
    session_key: str
    outcome: str  # ok | error | abandoned | ...
    created: float
    queue_wait_ms: float
    duration_ms: float


def lane_key(ref: SessionRef) -> str:
    """Tenant and agent names cannot contain '/', so the key is unambiguous."""
    return f"{ref.tenant}/{ref.agent}/{ref.key}"


def new_session_key() -> str:
    return "sess_" + secrets.token_urlsafe(16)


class Turn:
    """One request's turn as the HTTP layer follows it: queued, running, done."""

    __slots__ = (
        "id",
        "completion_id",
        "ref",
        "model",
        "ticket",
        "created",
        "started",
        "queue_wait_ms",
        "events",
        "result",
        "task",
    )

    def __init__(self, ref: SessionRef, model: str, ticket: Ticket, stream: bool) -> None:
        token = secrets.token_hex(12)
        self.id = "turn_" + token
        self.completion_id = "chatcmpl-" + token
        self.ref = ref
        self.model = model
        self.ticket = ticket
        self.created = time.time()
        self.started = False
        self.queue_wait_ms = 0.0
        #: Streaming turns only: ("start", None), ("delta", str), ("tool_calls", list),
        #: then ("done", body) or ("error", LanewayError).
        self.events: asyncio.Queue[tuple[str, Any]] | None = asyncio.Queue() if stream else None
        self.result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    def emit(self, kind: str, value: Any) -> None:
        if self.events is not None:
            self.events.put_nowait((kind, value))

    def finish(self, body: dict[str, Any]) -> None:
        self.result.set_result(body)
        self.emit("done", body)

    def fail(self, error: LanewayError) -> None:
        self.result.set_exception(error)
        self.emit("error", error)

    def abandon(self) -> bool:
        """The client went away: leave the queue if still waiting. True if abandoned."""
        if self.started or self.task is None:
            return False
        self.task.cancel()
        return True


class TurnService:
    def __init__(
        self,
        store: Store,
        lanes: LaneBackend,
        upstreams: dict[str, Upstream],
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.lanes = lanes
        self.upstreams = upstreams
        self.metrics = metrics
        self._running: set[asyncio.Task[None]] = set()
        #: The last turns, newest last, for live views (`/v1/lanes`, the web page).
        self.recent: deque[TurnSummary] = deque(maxlen=2000)

    async def submit(self, req: ChatRequest) -> Turn:
        """Take a place in the session's lane and start the turn. Raises at once when the
        lane cannot take it (queue full)."""
        ref = SessionRef(req.tenant, req.agent.name, req.session_key or new_session_key())
        ticket = await self.lanes.enter(lane_key(ref), max_waiting=req.agent.max_queue_depth)
        turn = Turn(ref, req.model, ticket, req.stream)
        task = asyncio.create_task(self._run(turn, req))
        turn.task = task
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return turn

    async def _run(self, turn: Turn, req: ChatRequest) -> None:
        agent = req.agent
        outcome = "error"
        started_at = 0.0
        try:
            await turn.ticket.granted(agent.max_queue_wait_s)
            turn.started = True
            started_at = time.time()
            turn.queue_wait_ms = (started_at - turn.created) * 1000
            self.metrics.queue_wait.observe(turn.queue_wait_ms / 1000)
            turn.emit("start", None)
            state = await self.store.load(turn.ref, turn.ticket.fence, agent.context_tokens)
            tools = self._tool_context(state, agent, turn.ticket)
            memories = await self._recall(tools.scope, req, agent)
            loop = AgentLoop(agent, self.upstreams[agent.name])
            upstream_started = time.perf_counter()
            output = await loop.run(
                state, req.turn, memories, tools, turn.emit if req.stream else None
            )
            self.metrics.upstream_seconds.observe(time.perf_counter() - upstream_started)
            body = self._completion(turn, output)
            await self._commit(turn, req, state, output, tools, body, started_at)
            outcome = "ok"
            turn.finish(body)
        except asyncio.CancelledError:
            outcome = "abandoned"
            if not turn.result.done():
                turn.result.cancel()
            raise
        except LanewayError as e:
            turn.fail(e)
        except Exception as e:
            logger.exception("turn %s failed", turn.id)
            turn.fail(LanewayError(f"internal error: {type(e).__name__}"))
        finally:
            await turn.ticket.release()
            self.metrics.turns.labels(outcome).inc()
            duration_ms = (time.time() - started_at) * 1000 if turn.started else 0.0
            if turn.started:
                self.metrics.turn_seconds.observe(duration_ms / 1000)
            ref = turn.ref
            self.recent.append(
                TurnSummary(turn.id, ref.tenant, ref.agent, ref.key, outcome, turn.created,
                            turn.queue_wait_ms, duration_ms)
            )

    def _tool_context(self, state: SessionState, agent: AgentConfig, ticket: Ticket) -> ToolContext:
        ref = state.ref
        if agent.memory_scope == "agent":
            scope: MemoryScope | None = MemoryScope(ref.tenant, ref.agent, None)
        elif state.id is not None:
            scope = MemoryScope(ref.tenant, ref.agent, state.id)
        else:
            scope = None

        async def queue_depth() -> int:
            info = await self.lanes.info(ticket.key)
            return 0 if info is None else info.waiting

        return ToolContext(self.store, scope, state, queue_depth)

    async def _recall(
        self, scope: MemoryScope | None, req: ChatRequest, agent: AgentConfig
    ) -> list[Memory]:
        """Pinned memories, then those matching the new input: recall must not depend on
        the model thinking of calling memory_search."""
        if scope is None or agent.recall_limit <= 0:
            return []
        query = " ".join(
            m["content"] if isinstance(m["content"], str) else _text(m["content"])
            for m in req.turn.new_input
            if m["role"] == "user"
        )
        pinned = await self.store.pinned_memories(scope, agent.recall_limit)
        found = await self.store.search_memories(scope, query, agent.recall_limit)
        seen = {m.id for m in pinned}
        return pinned + [m for m in found if m.id not in seen]

    async def _commit(
        self,
        turn: Turn,
        req: ChatRequest,
        state: SessionState,
        output: TurnOutput,
        tools: ToolContext,
        body: dict[str, Any],
        started_at: float,
    ) -> None:
        record = TurnRecord(
            id=turn.id,
            status=output.status,
            created_at=turn.created,
            started_at=started_at,
            finished_at=time.time(),
            queue_wait_ms=turn.queue_wait_ms,
            messages=output.messages,
            memories=tools.saved,
            response=body,
            usage=output.usage,
            idempotency_key=req.idempotency_key,
            memory_scope=req.agent.memory_scope,
        )
        try:
            await self.store.commit(state, record, turn.ticket.fence)
        except StaleFence:
            raise Unavailable("this turn lost its lane before it could be saved") from None

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

    async def close(self, grace_s: float = 10.0) -> None:
        """Let running turns finish (and be saved); queued ones are abandoned."""
        if not self._running:
            return
        _, pending = await asyncio.wait(set(self._running), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _text(parts: Any) -> str:
    return " ".join(p.get("text", "") for p in parts if isinstance(p, dict))
