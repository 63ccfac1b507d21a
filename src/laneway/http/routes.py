"""HTTP endpoints: parse and authorise, derive the lane key from headers only, call the
service, shape the reply. No session is looked up here before the lane is taken."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from laneway.config import Settings
from laneway.errors import (
    BadRequest,
    LanewayError,
    ModelNotFound,
    NotFound,
    Unavailable,
)
from laneway.http import openapi
from laneway.http.auth import Auth, Caller, RateLimiter
from laneway.http.chat import check_session_key, parse_chat
from laneway.http.errors import error_response
from laneway.http.replies import JSON, Reply, read_body
from laneway.http.sse import TurnStream, disconnected, either
from laneway.lanes.base import LaneBackend
from laneway.metrics import Metrics
from laneway.service import TurnService, lane_key
from laneway.store.base import MemoryScope, SessionRef, Store
from laneway.turn import Turn

logger = logging.getLogger(__name__)

#: The longest a rejoin may wait in one request; a client wanting longer asks again.
MAX_WAIT_S = 60.0


class Api:
    """The endpoints of one app; `bind` hands them the services its lifespan opened."""

    service: TurnService
    store: Store
    lanes: LaneBackend
    metrics: Metrics

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Auth(settings.api_keys, settings.admin_keys)
        self.rate = RateLimiter(settings.rate_limit_per_minute)
        self._openapi = orjson.dumps(openapi.document())
        self.started = int(time.time())

    def bind(self, service: TurnService, store: Store, lanes: LaneBackend, metrics: Metrics) -> None:
        self.service = service
        self.store = store
        self.lanes = lanes
        self.metrics = metrics

    def routes(self) -> list[Route]:
        from laneway.http.ui import ui_routes

        return [
            Route("/v1/chat/completions", self.chat_route, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/sessions", self.list_sessions, methods=["GET"]),
            Route("/v1/sessions/{key}", self.session, methods=["GET", "DELETE"]),
            Route("/v1/sessions/{key}/turns", self.list_turns, methods=["GET"]),
            Route("/v1/sessions/{key}/turns/{turn_id}", self.get_turn, methods=["GET"]),
            Route("/v1/lanes", self.list_lanes, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            *ui_routes(self),
        ]

    # -- chat ----------------------------------------------------------------------------

    async def chat_asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The hot path as a bare ASGI app: no router, no middleware stack, no Starlette
        request or response objects."""
        try:
            response = await self.chat_completions(scope, receive)
        except ClientDisconnect:  # gone before its request was whole: no one to answer
            return
        except LanewayError as e:
            response = error_response(e)
        except Exception:
            logger.exception("chat completion failed")
            response = error_response(LanewayError("internal error"))
        await response(scope, receive, send)

    async def chat_route(self, request: Request) -> Response | Reply | TurnStream:
        """The router's entry (the app sends POSTs to `chat_asgi` before routing)."""
        return await self.chat_completions(request.scope, request.receive)

    async def chat_completions(
        self, scope: Scope, receive: Receive
    ) -> Response | Reply | TurnStream:
        # Lower-case names (ASGI); the first of repeated headers wins, as in Starlette.
        request_headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in reversed(scope["headers"])
        }
        caller = self.auth.caller(request_headers)
        self.rate.check(caller.tenant)
        body = await read_body(receive, request_headers, self.settings.max_body_bytes)
        chat = parse_chat(body, request_headers, self.settings, caller.tenant)
        turn = await self.service.submit(chat)
        if not chat.stream:
            await self.service.run_here(turn)
        headers = {
            "x-laneway-session-key": turn.ref.key,
            "x-laneway-turn-id": turn.id,
        }
        if turn.arrival_position:
            headers["x-laneway-queue-position"] = str(turn.arrival_position)
        on_disconnect = chat.agent.on_disconnect
        if chat.stream:
            headers["x-laneway-queue-wait-ms"] = f"{turn.queue_wait_ms:.1f}"
            return TurnStream(
                turn, headers, chat.include_usage, self.settings.queue_keepalive_s, on_disconnect
            )
        if not turn.result.done():
            if turn.watched(on_disconnect):
                if not await _follow(turn, receive):  # the client left first
                    turn.detach(on_disconnect)
                    return Response(status_code=499)
            else:  # running already, and a disconnect would not stop it: nothing to watch
                await turn.settled()
        try:
            result = turn.result.result()
        except LanewayError as e:
            return error_response(e, headers)
        headers["x-laneway-queue-wait-ms"] = f"{turn.queue_wait_ms:.1f}"
        return Reply(orjson.dumps(result), headers)

    # -- models --------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        self.auth.caller(request.headers)
        return JSON({"object": "list", "data": [self._model(n) for n in self.settings.agents]})

    async def get_model(self, request: Request) -> Response:
        self.auth.caller(request.headers)
        agent = self.settings.agent(request.path_params["model"])
        if agent is None:
            raise ModelNotFound(f"the model {request.path_params['model']!r} does not exist")
        return JSON(self._model(agent.name))

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "laneway"}

    # -- sessions ------------------------------------------------------------------------

    async def list_sessions(self, request: Request) -> Response:
        caller = self.auth.caller(request.headers)
        q = request.query_params
        limit = _int_param(q.get("limit"), "limit", default=20, high=200)
        tenant = _tenant(caller, q.get("tenant"))
        sessions, cursor = await self.store.list_sessions(
            tenant, q.get("agent"), limit, q.get("cursor")
        )
        busy_filter = _bool_param(q.get("busy"), "busy")
        data = []
        for s in sessions:
            info = await self.lanes.info(lane_key(SessionRef(s.tenant, s.agent, s.key)))
            busy = info is not None
            if busy_filter is not None and busy != busy_filter:
                continue
            data.append(
                {
                    "key": s.key,
                    "agent": s.agent,
                    "tenant": s.tenant,
                    "status": "running" if busy else "idle",
                    "queue_depth": info.waiting if info else 0,
                    "turns": s.turns,
                    "created_at": s.created_at,
                    "updated_at": s.updated_at,
                }
            )
        return JSON({"object": "list", "data": data, "next_cursor": cursor})

    async def session(self, request: Request) -> Response:
        """One route for both methods, so a 405 lists them all in `Allow`."""
        if request.method == "DELETE":
            return await self.delete_session(request)
        return await self.get_session(request)

    async def get_session(self, request: Request) -> Response:
        ref = self._ref(request)
        q = request.query_params
        limit = _int_param(q.get("limit"), "limit", default=1000, high=100_000)
        info = await self.lanes.info(lane_key(ref))
        summary = await self.store.session_info(ref)
        if summary is None and info is None:
            raise NotFound(f"no session {ref.key!r}", code="session_not_found")
        messages = await self.store.transcript(ref, limit) if summary else []
        memories = await self._memories(ref)
        return JSON(
            {
                "object": "session",
                "key": ref.key,
                "agent": ref.agent,
                "tenant": ref.tenant,
                "status": "running" if info is not None and info.running else "idle",
                "queue_depth": info.waiting if info else 0,
                "turns": summary.turns if summary else 0,
                "created_at": summary.created_at if summary else None,
                "updated_at": summary.updated_at if summary else None,
                "messages": messages,
                "memories": memories,
            }
        )

    async def _memories(self, ref: SessionRef) -> list[dict[str, Any]]:
        agent = self.settings.agents.get(ref.agent)
        if agent is not None and agent.memory_scope == "agent":
            scope = MemoryScope(ref.tenant, ref.agent, None)
        else:
            session_id = await self.store.session_id(ref)
            if session_id is None:
                return []
            scope = MemoryScope(ref.tenant, ref.agent, session_id)
        return [
            {"id": m.id, "text": m.text, "pinned": m.pinned, "created_at": m.created_at}
            for m in await self.store.memories(scope, 1000)
        ]

    async def delete_session(self, request: Request) -> Response:
        """Deleting takes the lane like a turn, so it never cuts a running turn in half."""
        ref = self._ref(request)
        agent = self.settings.agents[ref.agent]
        ticket = await self.lanes.enter(lane_key(ref), max_waiting=agent.max_queue_depth)
        try:
            await ticket.granted(agent.max_queue_wait_s)
            deleted = await self.store.delete_session(ref)
        finally:
            await ticket.release()
        if not deleted:
            raise NotFound(f"no session {ref.key!r}", code="session_not_found")
        return JSON({"object": "session.deleted", "key": ref.key, "deleted": True})

    async def list_turns(self, request: Request) -> Response:
        """The session's turns: saved ones, then those queued or running in this process."""
        ref = self._ref(request)
        limit = _int_param(request.query_params.get("limit"), "limit", default=100, high=1000)
        stored = await self.store.turns(ref, limit)
        known = {t["id"] for t in stored}
        live = [t.view() for t in self.service.live(ref) if t.id not in known]
        data = [{"object": "turn", **t} for t in stored] + live
        return JSON({"object": "list", "data": data[-limit:]})

    async def get_turn(self, request: Request) -> Response:
        """Rejoin: a turn's status and result; `?wait=S` waits up to S seconds for it to
        end. A turn of another replica is known from the lanes while it runs and from the
        store once it has ended."""
        ref = self._ref(request)
        turn_id = request.path_params["turn_id"]
        wait = _float_param(request.query_params.get("wait"), "wait", high=MAX_WAIT_S)
        live = self.service.turn(turn_id)
        if live is not None and live.ref == ref:
            if wait and not live.result.done():
                with contextlib.suppress(TimeoutError, LanewayError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(live.result), wait)
            return JSON(live.view())
        deadline = time.monotonic() + wait
        while True:
            stored = await self.store.turn(ref, turn_id)
            if stored is not None:
                return JSON({"object": "turn", "session_key": ref.key, "agent": ref.agent,
                             **stored})
            info = await self.lanes.info(lane_key(ref))
            running = info is not None and info.holder == turn_id
            if time.monotonic() >= deadline:
                if running:
                    return JSON({"object": "turn", "id": turn_id, "session_key": ref.key,
                                 "agent": ref.agent, "status": "running"})
                raise NotFound("no such turn in this session", code="turn_not_found")
            await asyncio.sleep(0.05)

    def _ref(self, request: Request) -> SessionRef:
        caller = self.auth.caller(request.headers)
        q = request.query_params
        agent_name = q.get("agent", "default")
        agent = self.settings.agent(agent_name)
        if agent is None:
            raise NotFound(f"no agent {agent_name!r}", code="model_not_found", param="agent")
        tenant = _tenant(caller, q.get("tenant")) or caller.tenant
        return SessionRef(tenant, agent.name, check_session_key(request.path_params["key"], "key"))

    # -- operations ----------------------------------------------------------------------

    async def list_lanes(self, request: Request) -> Response:
        caller = self.auth.caller(request.headers)
        return JSON({"object": "list", "data": await self.visible_lanes(caller)})

    async def visible_lanes(self, caller: Caller) -> list[dict[str, Any]]:
        """The busy lanes the caller may see (its tenant's; all for an admin), as
        `/v1/lanes` and the operator page show them."""
        data = []
        for info in await self.lanes.busy():
            tenant, agent, key = info.key.split("/", 2)
            if not caller.admin and tenant != caller.tenant:
                continue
            data.append(
                {
                    "session_key": key,
                    "agent": agent,
                    "tenant": tenant,
                    "running": info.running,
                    "turn_id": info.holder,
                    "turn_age_s": round(info.held_for_s, 3),
                    "queue_depth": info.waiting,
                    "oldest_wait_s": round(info.oldest_wait_s, 3),
                }
            )
        return data

    async def healthz(self, request: Request) -> Response:
        try:
            await self.store.ping()
        except Exception:
            raise Unavailable("the store is not answering") from None
        return JSON({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    async def prometheus(self, request: Request) -> Response:
        busy = await self.lanes.busy()
        self.metrics.active_lanes = len(busy)
        self.metrics.queue_depth = sum(info.waiting for info in busy)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


async def _follow(turn: Turn, receive: Receive) -> bool:
    """Wait for the turn's result while watching for a disconnect: False if the client
    left first (a queued turn then leaves its lane, a running one may be stopped)."""
    gone = turn.result.get_loop().create_task(disconnected(receive))
    try:
        await either(turn.result, gone)
    finally:
        gone.cancel()
    return turn.result.done()


def _int_param(value: str | None, name: str, *, default: int, high: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= high:
        raise BadRequest(f"`{name}` must be an integer from 1 to {high}", param=name)
    return int(value)


def _bool_param(value: str | None, name: str) -> bool | None:
    if value is None:
        return None
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise BadRequest(f"`{name}` must be true or false", param=name)


def _float_param(value: str | None, name: str, *, high: float) -> float:
    if value is None:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= high:
        raise BadRequest(f"`{name}` must be a number of seconds from 0 to {high:g}", param=name)
    return number


def _tenant(caller: Caller, asked: str | None) -> str | None:
    """Admins may pick a tenant (or see all: None); others see only their own."""
    if caller.admin:
        return asked
    return caller.tenant

