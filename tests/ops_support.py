"""Helpers for the operator tests: plain blocking HTTP from threads, so a test can hold a
lane with a slow turn, queue more behind it, and look at the gateway meanwhile."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def request(
    url: str, *, key: str | None = None, body: Any = None, headers: dict[str, str] | None = None,
    method: str | None = None, timeout: float = 30,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or text) of one request; HTTP errors are returned too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if key:
        req.add_header("authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, got, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        status, got, raw = e.code, dict(e.headers), e.read()
    try:
        return status, {k.lower(): v for k, v in got.items()}, json.loads(raw)
    except ValueError:
        return status, {k.lower(): v for k, v in got.items()}, raw.decode()


def chat(base: str, session: str | None, text: str, *, key: str | None = None,
         timeout: float = 30) -> tuple[str, str]:
    """One non-streamed turn; returns (session key, turn id)."""
    headers = {"x-laneway-session-key": session} if session else {}
    status, got, body = request(
        base + "/v1/chat/completions", key=key, headers=headers, timeout=timeout,
        body={"model": "default", "messages": [{"role": "user", "content": text}]},
    )
    assert status == 200, body
    return got["x-laneway-session-key"], got["x-laneway-turn-id"]


def wait_until(check: Callable[[], T], timeout: float = 10, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lane(base: str, session: str, key: str | None = None) -> dict[str, Any] | None:
    status, _, body = request(base + "/v1/lanes", key=key)
    assert status == 200, body
    return next((x for x in body["data"] if x["session_key"] == session), None)


@contextmanager
def held_lane(base: str, session: str, *, queued: int, hold_s: float = 3.0,
              key: str | None = None) -> Iterator[list[concurrent.futures.Future[Any]]]:
    """A slow turn running on `session` and `queued` requests waiting behind it, for the
    duration of the block; on leaving, every one of them has finished."""
    with concurrent.futures.ThreadPoolExecutor(queued + 1) as pool:
        futures = [pool.submit(chat, base, session, f"hold [delay={hold_s}]", key=key)]
        wait_until(lambda: (lane(base, session, key) or {}).get("running"), what="lane held")
        for i in range(queued):
            futures.append(pool.submit(chat, base, session, f"queued {i}", key=key))

            def depth(n: int = i + 1) -> bool:
                return (lane(base, session, key) or {}).get("queue_depth") == n

            wait_until(depth, what=f"{i + 1} queued")
        yield futures
        for f in futures:
            f.result(timeout=hold_s * (queued + 2) + 30)
