"""The operator web page at `/ui` and the live feed behind it.

The page is static (vendored HTML, CSS and JS in `static/`, no build step, nothing from a
CDN) and reads everything through the API with the caller's key, so it can show nothing
the key could not already read. It is read-only.

Auth: like every endpoint, `Authorization: Bearer KEY`. A browser cannot set that header
when it navigates or opens an `EventSource`, so the `/ui` routes (and only they) also take
the key as `?key=KEY`; the page passes it on to its own fetch and feed calls.

`/ui/events` is a Server-Sent Events feed: one JSON snapshot a second (busy lanes, the
last turns, per-bucket queue wait and latency for the chart), computed from the lane
backend and the service's in-memory `recent` turns, so it reflects this replica's turns.
`/ui/turns?session=KEY` lists this replica's recent turns of one session with their timings,
failed and abandoned ones included (the store keeps only the turns that changed the session;
`GET /v1/sessions/{key}/turns` lists those).
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from laneway.errors import NotFound, Unauthorized
from laneway.http.auth import Caller
from laneway.service import TurnSummary

if TYPE_CHECKING:
    from laneway.http.routes import Api

#: The files under `static/` that may be served; nothing else is reachable by name.
_ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
_SECURITY = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",  # the URL may carry ?key=
    "x-content-type-options": "nosniff",
}
FEED_INTERVAL_S = 1.0
CHART_WINDOW_S = 300.0  # the chart's last five minutes
CHART_BUCKET_S = 5.0
STATS_WINDOW_S = 60.0
RECENT_SHOWN = 20


def ui_routes(api: Api) -> list[Route]:
    return UiRoutes(api).routes()


class UiRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    def routes(self) -> list[Route]:
        return [
            Route("/ui", self.page, methods=["GET"]),
            Route("/ui/", self.page, methods=["GET"]),
            Route("/ui/static/{name}", self.asset, methods=["GET"]),
            Route("/ui/events", self.events, methods=["GET"]),
            Route("/ui/turns", self.turns, methods=["GET"]),
        ]

    def _caller(self, request: Request) -> Caller:
        headers: dict[str, str] = dict(request.headers)
        key = request.query_params.get("key")
        if "authorization" not in headers and key:
            headers["authorization"] = f"Bearer {key}"
        return self.api.auth.caller(headers)

    async def page(self, request: Request) -> Response:
        try:
            self._caller(request)
        except Unauthorized as e:
            return HTMLResponse(_login_page(e.message), status_code=401, headers=_SECURITY)
        body = resources.files("laneway.http").joinpath("static/index.html").read_bytes()
        return HTMLResponse(body, headers={**_SECURITY, "cache-control": "no-store"})

    async def asset(self, request: Request) -> Response:
        """Code, not data: served without a key so the page's own tags can load it."""
        name = request.path_params["name"]
        if name not in _ASSETS:
            raise NotFound("no such file")
        body = resources.files("laneway.http").joinpath("static", name).read_bytes()
        return Response(body, media_type=_ASSETS[name],
                        headers={**_SECURITY, "cache-control": "no-cache"})

    async def events(self, request: Request) -> Response:
        caller = self._caller(request)
        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        return StreamingResponse(self._feed(caller), media_type="text/event-stream",
                                 headers=headers)

    async def _feed(self, caller: Caller) -> AsyncIterator[bytes]:
        """Snapshots until the client goes away (Starlette then cancels this generator)."""
        yield b"retry: 1000\n\n"
        while True:
            snapshot = await self.snapshot(caller)
            yield b"data: " + orjson.dumps(snapshot) + b"\n\n"
            await asyncio.sleep(FEED_INTERVAL_S)

    async def snapshot(self, caller: Caller) -> dict[str, Any]:
        now = time.time()
        lanes = await self.api.visible_lanes(caller)
        lanes.sort(key=lambda lane: (-lane["queue_depth"], -lane["turn_age_s"]))
        turns = _visible(self.api.service.recent, caller)
        return {
            "now": now,
            "caller": {"tenant": caller.tenant, "admin": caller.admin},
            "lanes": lanes,
            "waiting": sum(lane["queue_depth"] for lane in lanes),
            # changes with every finished turn, even once `recent` is full
            "last_turn_id": turns[-1].turn_id if turns else None,
            "recent": [_turn_json(t) for t in turns[-RECENT_SHOWN:][::-1]],
            "stats": _stats([t for t in turns if _finished(t) >= now - STATS_WINDOW_S]),
            "chart": _buckets(turns, now),
        }

    async def turns(self, request: Request) -> Response:
        caller = self._caller(request)
        q = request.query_params
        key = q.get("session")
        config = self.api.settings.agent(q.get("agent") or "default")
        agent = config.name if config is not None else q.get("agent")
        tenant = (q.get("tenant") or caller.tenant) if caller.admin else caller.tenant
        data = [
            _turn_json(t)
            for t in self.api.service.recent
            if t.session_key == key and t.agent == agent and t.tenant == tenant
        ]
        return Response(orjson.dumps({"object": "list", "data": data}),
                        media_type="application/json")


def _visible(turns: Iterable[TurnSummary], caller: Caller) -> list[TurnSummary]:
    return [t for t in list(turns) if caller.admin or t.tenant == caller.tenant]


def _finished(t: TurnSummary) -> float:
    return t.created + (t.queue_wait_ms + t.duration_ms) / 1000


def _turn_json(t: TurnSummary) -> dict[str, Any]:
    return {
        "turn_id": t.turn_id,
        "session_key": t.session_key,
        "agent": t.agent,
        "tenant": t.tenant,
        "outcome": t.outcome,
        "created": t.created,
        "finished": round(_finished(t), 3),
        "queue_wait_ms": round(t.queue_wait_ms, 1),
        "duration_ms": round(t.duration_ms, 1),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def _ran(t: TurnSummary) -> bool:
    """Whether the turn got its lane: one that never did has no wait or latency to show."""
    return t.duration_ms > 0 or t.outcome == "ok"


def _stats(turns: list[TurnSummary]) -> dict[str, Any]:
    ran = [t for t in turns if _ran(t)]
    waits = [t.queue_wait_ms for t in ran]
    latency = [t.duration_ms for t in ran]
    return {
        "window_s": STATS_WINDOW_S,
        "turns": len(turns),
        # a client that left while queued is not a failure of the gateway
        "errors": sum(t.outcome not in ("ok", "abandoned") for t in turns),
        "abandoned": sum(t.outcome == "abandoned" for t in turns),
        "wait_p50_ms": _pct(waits, 0.5),
        "wait_p95_ms": _pct(waits, 0.95),
        "latency_p50_ms": _pct(latency, 0.5),
        "latency_p95_ms": _pct(latency, 0.95),
    }


def _buckets(turns: list[TurnSummary], now: float) -> dict[str, Any]:
    """Average and worst queue wait and latency per bucket, by finishing time."""
    count = int(CHART_WINDOW_S // CHART_BUCKET_S)
    end = (now // CHART_BUCKET_S + 1) * CHART_BUCKET_S
    start = end - count * CHART_BUCKET_S
    sums = [[0, 0.0, 0.0, 0.0, 0.0] for _ in range(count)]  # n, wait, wait max, lat, lat max
    for t in turns:
        i = int((_finished(t) - start) // CHART_BUCKET_S)
        if not _ran(t) or not 0 <= i < count:
            continue
        b = sums[i]
        b[0] += 1
        b[1] += t.queue_wait_ms
        b[2] = max(b[2], t.queue_wait_ms)
        b[3] += t.duration_ms
        b[4] = max(b[4], t.duration_ms)
    return {
        "start": start,
        "bucket_s": CHART_BUCKET_S,
        "n": [int(b[0]) for b in sums],
        "wait_avg_ms": [round(b[1] / b[0], 1) if b[0] else None for b in sums],
        "wait_max_ms": [round(b[2], 1) if b[0] else None for b in sums],
        "latency_avg_ms": [round(b[3] / b[0], 1) if b[0] else None for b in sums],
        "latency_max_ms": [round(b[4], 1) if b[0] else None for b in sums],
    }


def _login_page(reason: str) -> str:
    return (
        "<!doctype html><meta charset=utf-8><title>laneway · sign in</title>"
        '<link rel=stylesheet href="/ui/static/app.css">'
        '<main class="login"><h1>laneway</h1>'
        f"<p>{html.escape(reason)}. Open this page with the API key:</p>"
        '<form method=get action="/ui"><input type=password name=key '
        'placeholder="API key" autofocus required> <button>Open</button></form></main>'
    )
