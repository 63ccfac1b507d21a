"""A minimal Redis client for the two lane scripts every turn runs (enter and release).

redis-py spends 150-220 µs of CPU per script call on this project's machine (connection
pool, retry and command layers); this client spends a fraction of that: one connection,
commands pipelined on it in order, replies matched to callers by order, RESP2 parsed
by hand. Everything else (pub/sub, the heartbeat, scans, claims) stays on redis-py.

Errors are redis-py's exception types, so callers handle both clients alike: a lost or
timed-out connection fails every call in flight with redis-py's `ConnectionError` /
`TimeoutError` and the next call reconnects; an error reply raises `ResponseError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Reply = Any


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def _parse(buf: bytes | bytearray, pos: int) -> tuple[Reply, int]:
    """One RESP2 reply starting at `pos`: (value, position after it)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos : pos + 1], buf[pos + 1 : end]
    pos = end + 2
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + size]).decode(), pos + size + 2
    if kind == b":":
        return int(line), pos
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == b"+":
        return bytes(line).decode(), pos
    if kind == b"-":
        return ResponseError(bytes(line).decode()), pos
    raise RedisConnectionError(f"unexpected reply from Redis: {bytes(buf[pos - 2 : pos + 20])!r}")


def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self.sent: deque[float] = deque()  # when each waiting call went out (monotonic)
        self._buf = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                value, pos = _parse(buf, pos)
                if not self.waiting:
                    raise RedisConnectionError("a reply from Redis that nobody asked for")
                future = self.waiting.popleft()
                self.sent.popleft()
                if not future.done():  # its caller may have given up (cancelled)
                    future.set_result(value)
        except _Incomplete:
            pass
        except RedisConnectionError as e:
            self._fail(e)
            if self.transport is not None:
                self.transport.abort()
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        self.sent.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RespClient:
    """`evalsha` over one pipelined connection to `redis://[user:password@]host[:port][/db]`."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("RespClient speaks plain redis:// only")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = int(parts.path.strip("/") or 0)
        self._auth = [unquote(x) for x in (parts.username, parts.password) if x]
        self._timeout = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def evalsha(self, sha: str, keys: list[str], args: list[Any], script: str) -> Reply:
        """Run the script by its hash; by its text when Redis does not know it (a restarted
        Redis forgets its scripts), which also caches it again."""
        try:
            return await self._call("EVALSHA", sha, len(keys), *keys, *args)
        except ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
            return await self._call("EVAL", script, len(keys), *keys, *args)

    def evalsha_now(self, sha: str, keys: list[str], args: list[Any]) -> asyncio.Future[Reply] | None:
        """Send the script call at once and return the future of its reply (an error reply
        is its value, NOSCRIPT included: then call `evalsha`); None when there is no live
        connection to send it on. Sent before this returns, it reaches Redis before any
        later call of this client."""
        proto = self._proto
        if proto is None or proto.lost or proto.transport is None:
            return None
        return self._queue(proto, _encode(("EVALSHA", sha, len(keys), *keys, *args)))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None

    async def _call(self, *args: Any) -> Reply:
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        reply = await self._send(proto, _encode(args))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _send(self, proto: _Protocol, data: bytes) -> Reply:
        return await self._queue(proto, data)

    def _queue(self, proto: _Protocol, data: bytes) -> asyncio.Future[Reply]:
        """No timer per call (it cost a quarter of the call): `_watch` times them all."""
        assert proto.transport is not None
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        proto.waiting.append(future)
        proto.sent.append(time.monotonic())
        proto.transport.write(data)
        return future

    async def _watch(self) -> None:
        """Fail every call in flight when the oldest has waited past the timeout (its reply
        may still come and would answer the wrong caller, so the connection goes too).
        The oldest call must still be there one round later: a loop too busy to read its
        socket in time (a burst of thousands of requests) is not a silent Redis."""
        suspect: asyncio.Future[Reply] | None = None
        while True:
            await asyncio.sleep(self._timeout / 4)
            proto = self._proto
            if proto is None or not proto.sent or time.monotonic() - proto.sent[0] <= self._timeout:
                suspect = None
            elif suspect is not proto.waiting[0]:
                suspect = proto.waiting[0]
            else:
                suspect = None
                proto._fail(RedisTimeoutError("Redis did not answer in time"))
                if proto.transport is not None:
                    proto.transport.abort()

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
            self._watcher = asyncio.create_task(self._watch(), name="redis-watch")
        async with self._connecting:
            if self._proto is not None and not self._proto.lost:
                return self._proto
            loop = asyncio.get_running_loop()
            proto: _Protocol | None = None
            try:
                async with asyncio.timeout(self._timeout):
                    _, proto = await loop.create_connection(_Protocol, self._host, self._port)
                    for command in ([("AUTH", *self._auth)] if self._auth else []) + (
                        [("SELECT", self._db)] if self._db else []
                    ):
                        reply = await self._send(proto, _encode(command))  # under the timeout
                        if isinstance(reply, ResponseError):
                            raise RedisConnectionError(f"Redis refused {command[0]}: {reply}")
            except BaseException as e:
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()
                if isinstance(e, (OSError, TimeoutError)):
                    raise RedisConnectionError(
                        f"cannot connect to Redis: {type(e).__name__}") from None
                raise
            assert proto is not None
            self._proto = proto
            return proto
