"""A lean HTTP/1.1 client for the model calls of every turn.

One pool of keep-alive connections per origin; a request goes out in one write; responses are
parsed by httptools, the C parser uvicorn serves with. Measured with callgrind on the
gateway, aiohttp spent about 150 Python calls on each model call: a session, a request and a
response object, a timer, a task to write the body. This spends about fifteen.

It speaks what OpenAI-compatible servers answer: a whole body (Content-Length or chunked)
and server-sent events, over http or https. No redirects, proxies or compression
(`Accept-Encoding: identity`). A request that fails on an idle connection before one byte of
a response came back (the server had closed it) goes out again on the next idle connection,
or a fresh one; a timeout or any answer at all is never retried.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools


class ResponseError(Exception):
    """The connection failed or the response was not HTTP; `what` names the failure."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class ResponseTimeout(ResponseError):
    """The server did not answer (or went silent) in time."""


class Origin:
    """Where requests go: scheme, host and port, with a pool of idle connections."""

    def __init__(self, url: str, connect_timeout_s: float, max_idle: int = 128) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        default = self.port == (443 if self.ssl else 80)
        self.authority = host if default else f"{host}:{self.port}"
        self.connect_timeout_s = connect_timeout_s
        #: Idle connections, the most recently used last. A burst leaves as many as it had
        #: calls in flight; past `max_idle` the oldest are closed, not kept for good.
        self._idle: deque[Connection] = deque()
        self._max_idle = max_idle

    async def post(self, path: str, headers: bytes, body: bytes, deadline: float) -> Connection:
        """Send a request; returns its connection once the response's head is read, by
        `deadline` (loop time). `headers`: extra header lines, each ending in CRLF."""
        request = b"".join((
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
            % (path.encode(), self.authority.encode(), len(body)),
            headers, b"\r\n", body,
        ))
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            try:
                await conn.send(request, deadline)
                return conn
            except ResponseTimeout:  # the model is slow, not the connection stale: no resend
                raise
            except ResponseError:
                conn.close()
                if conn.received:  # the server answered something: not a stale connection
                    raise
            except BaseException:  # cancelled: the server must see the request abandoned
                conn.close()
                raise
        conn = await self._connect()
        try:
            await conn.send(request, deadline)
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """Take back a connection whose response was read to the end."""
        if conn.reusable():
            conn.reset()
            self._idle.append(conn)
            if len(self._idle) > self._max_idle:
                self._idle.popleft().close()
        else:
            conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                transport, conn = await loop.create_connection(
                    Connection, self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise ResponseTimeout("connect timed out") from None
        except (OSError, ssl.SSLError) as e:
            raise ResponseError(type(e).__name__) from None
        conn.transport = transport  # uvloop may call connection_made only later
        return conn


class Connection(asyncio.Protocol):
    """One connection and the response being read on it (one request at a time)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        #: The loop that made the connection (held: get_running_loop() is a system call).
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        #: The current wait's deadline, and one timer that checks it lazily (`_check_time`).
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.received = False  # any byte of a response
        self.complete = False
        self._keep_alive = False
        self._body: list[bytes] = []
        self._head = False
        self._error: ResponseError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- the caller's side ------------------------------------------------------------

    async def send(self, request: bytes, deadline: float) -> None:
        """Write `request` and wait for the response's head until `deadline`."""
        if self.closed or self.transport is None:
            raise ResponseError("ServerDisconnectedError")
        self.transport.write(request)
        while not self._head:
            await self._wait(deadline)

    async def read(self, deadline: float | None, idle_s: float | None = None) -> bytes | None:
        """The body received since the last call (waiting for some if there is none yet),
        or None at its end; all of it by `deadline`, or with at most `idle_s` seconds of
        silence between two pieces."""
        while not self._body:
            if self.complete:
                return None
            if idle_s is not None:
                deadline = self.loop.time() + idle_s
            await self._wait(deadline)
        body, self._body = self._body, []
        return body[0] if len(body) == 1 else b"".join(body)

    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.closed

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    async def _wait(self, deadline: float | None) -> None:
        """Until the next event on the connection, or `TimeoutError` past `deadline`.

        A timer is not set and cancelled for each wait (uvloop: 2.2 µs here, and a stream
        waits once per network read): one stays armed, and when it fires it expires the
        waiting call only if the deadline, which later waits move on, has passed; if not,
        it is set again for the new deadline."""
        if self._error is not None:
            raise self._error
        loop = self.loop
        waiter = self._waiter = loop.create_future()
        self._deadline = deadline
        if deadline is not None:
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._check_time)
        try:
            await waiter
        except TimeoutError:
            self.close()
            raise ResponseTimeout("timed out") from None
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _check_time(self) -> None:
        self._timer = None
        deadline = self._deadline
        waiter = self._waiter
        if deadline is None or waiter is None or waiter.done():
            return  # no one waits: the next wait sets a timer of its own
        if self.loop.time() >= deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self.loop.call_at(deadline, self._check_time)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the loop's side --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("the response is not valid HTTP")
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail("ServerDisconnectedError" if exc is None else type(exc).__name__)

    def _fail(self, what: str) -> None:
        if self._error is None:
            self._error = ResponseError(what)
        self._wake()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._head = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._keep_alive = self._parser.should_keep_alive()  # reset after this callback
        self._wake()
