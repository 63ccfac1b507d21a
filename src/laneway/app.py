"""The app factory. Its lifespan opens the store, the lanes and the upstreams and hands
them to the endpoints: there is no module-level state."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from laneway.config import Settings
from laneway.errors import LanewayError
from laneway.http import errors
from laneway.http.routes import Api
from laneway.lanes import open_lanes
from laneway.metrics import Metrics
from laneway.service import TurnService
from laneway.store import open_store
from laneway.upstream import open_upstreams


class Gateway:
    """The ASGI app. Chat completions, the hot path, go straight to their handler; every
    other endpoint (and the lifespan) goes through Starlette's router and error handlers."""

    def __init__(self, api: Api, app: Starlette) -> None:
        self.api = api
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == CHAT_PATH
            and scope["method"] == "POST"
        ):
            await self.api.chat_asgi(scope, receive, send)
        else:
            await self.app(scope, receive, send)


CHAT_PATH = "/v1/chat/completions"


def create_app(settings: Settings) -> Gateway:
    api = Api(settings)
    return Gateway(api, Starlette(
        routes=api.routes(),
        exception_handlers={
            LanewayError: errors.laneway_error,
            HTTPException: errors.http_error,
            Exception: errors.unexpected_error,
        },
        lifespan=lambda _app: _lifespan(api, settings),
    ))


@contextlib.asynccontextmanager
async def _lifespan(api: Api, settings: Settings) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        max_wait = max(a.max_queue_wait_s for a in settings.agents.values())
        lanes = await open_lanes(settings.lanes, lease_s=settings.lane_lease_s, max_wait_s=max_wait)
        stack.push_async_callback(lanes.close)
        store = await open_store(settings.store_url, exclusive=settings.lanes == "local",
                                 pool_size=settings.store_pool_size)
        stack.push_async_callback(store.close)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        stack.push_async_callback(http.close)
        upstreams = await open_upstreams(
            list(settings.agents.values()),
            http,
            settings.upstream_timeout_s,
            settings.max_reply_bytes,
        )
        for upstream in {id(u): u for u in upstreams.values()}.values():
            stack.push_async_callback(upstream.close)
        metrics = Metrics(session_loads=store.loads)
        service = TurnService(settings, store, lanes, upstreams, metrics)
        stack.push_async_callback(service.close)
        api.bind(service, store, lanes, metrics)
        _tune_gc()
        yield


def _tune_gc() -> None:
    """Fewer, larger young-generation passes and rarer full ones: with the default
    thresholds, full collections over the session cache put 100-200 ms pauses into the
    p99 at 32 concurrent turns (measured with `laneway bench`). A generation-1 pass walks
    every object that survived the young passes since the last one: every 20 of them, it
    was 200 K objects and 100-140 ms here, once the session cache was full; every 3, it
    is 14-29 ms. What exists at start-up is frozen out of the collector's view for good."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 3, 50)
