"""The lean upstream HTTP client (`upstream/h1.py`) against a raw TCP server written here, so
each test controls the bytes and their timing: keep-alive reuse, chunked bodies and events
split anywhere, a pooled connection the server closed, a response cut short, silence."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from laneway.errors import UpstreamError, UpstreamTimeout
from laneway.upstream.h1 import Origin
from laneway.upstream.http import HttpUpstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
REPLY = orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                   "finish_reason": "stop"}]})
ASK = {"messages": [{"role": "user", "content": "hello"}]}


class Server:
    """Answers each request with `handler(reader, writer, n)`, n counting requests from 0."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.bodies.append(await reader.readexactly(length))
                n, self.requests = self.requests, self.requests + 1
                await self.handler(reader, writer, n)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[Server, str]]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> tuple[Server, str]:
        server = Server(handler)
        listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
        servers.append(listener)
        port = listener.sockets[0].getsockname()[1]
        return server, f"http://127.0.0.1:{port}/v1"

    yield start
    for listener in servers:
        listener.close()


def upstream(url: str, *, timeout_s: float = 5.0, max_reply: int = 1 << 20) -> HttpUpstream:
    return HttpUpstream(url, model="m", api_key="sk-test", timeout_s=timeout_s,
                        max_reply_bytes=max_reply)


def whole(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def chunked(*pieces: bytes) -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            *(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces), b"0\r\n\r\n"]


async def test_keep_alive_reuses_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.write(whole(REPLY))

    server, url = await serve(handler)
    client = upstream(url)
    for _ in range(5):
        assert (await client.complete(ASK))["choices"][0]["message"]["content"] == "hi"
    assert (server.requests, server.connections) == (5, 1)
    sent = orjson.loads(server.bodies[0])
    assert sent["model"] == "m" and sent["messages"] == ASK["messages"]
    await client.close()


async def test_a_burst_leaves_at_most_max_idle_connections(serve) -> None:  # type: ignore[no-untyped-def]
    """Five calls at once open five connections; two stay pooled, the older three close."""
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        await asyncio.sleep(0.05)  # all five are in flight together
        w.write(whole(REPLY))

    server, url = await serve(handler)
    client = upstream(url)
    client._origin._max_idle = 2

    async def burst() -> None:
        await asyncio.gather(*(client.complete(ASK) for _ in range(5)))

    await burst()
    assert server.connections == 5
    await burst()
    assert server.connections == 8, "two pooled connections reused, three new ones opened"
    await client.close()


async def test_chunked_stream_split_anywhere(serve) -> None:  # type: ignore[no-untyped-def]
    events = b"".join(
        b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": c}}]}) + b"\n\n"
        for c in ("a", "b", "c")
    ) + b"data: [DONE]\n\n"
    response = b"".join(chunked(events[:7], events[7:40], events[40:]))

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        for i in range(0, len(response), 5):  # five bytes at a time
            w.write(response[i : i + 5])
            await w.drain()
            await asyncio.sleep(0)

    server, url = await serve(handler)
    client = upstream(url)
    for _ in range(2):
        deltas = [c["choices"][0]["delta"]["content"]
                  async for batch in client.stream(ASK) for c in batch]
        assert deltas == ["a", "b", "c"]
    assert server.connections <= 2
    await client.close()


def _data(content: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": content}}]})


@pytest.mark.parametrize("reads", [
    [_data("a") + b"\n\n" + _data("b") + b"\n\ndata: [DONE]\n\n"],
    [_data("a") + b"\n\n" + _data("b") + b"\n\n", b"data: [DONE]\n\n"],
    [_data("a") + b"\n\n\n\n" + _data("b") + b"\n\n\ndata: [DONE]\n\n"],
    [_data("a") + b"\n\n: ping\n\n" + _data("b") + b"\n\ndata: [DONE]\n\n"],
    [_data("a") + b"\n\n" + _data("b").replace(b"data: ", b"data:") + b"\n\ndata: [DONE]\n\n"],
    [_data("a") + b"\r\n\r\n" + _data("b") + b"\n\ndata: [DONE]\n\n"],
    [_data("a") + b"\n\n" + _data("b") + b"\ndata: [DONE]\n\n"],
    [_data("a") + b"\n\n" + _data("b")[:20], _data("b")[20:] + b"\n\ndata: [DONE]\n\n"],
], ids=["one-read", "done-later", "blank-lines", "comment", "no-space", "crlf", "one-newline",
        "split-event"])
async def test_whole_events_in_a_read_parse_as_line_by_line(serve, reads) -> None:  # type: ignore[no-untyped-def]
    """A read of whole events as servers write them is parsed in one go; every other shape
    falls back to lines. Both give the same chunks, and [DONE] ends the stream either way."""

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        for piece in chunked(*reads):
            w.write(piece)
            await w.drain()
            await asyncio.sleep(0.01)

    _, url = await serve(handler)
    client = upstream(url)
    assert [c["choices"][0]["delta"]["content"]
            async for batch in client.stream(ASK) for c in batch] == ["a", "b"]
    await client.close()


@pytest.mark.parametrize("events", [
    b'data: {"choices": [1\n\ndata: 2]}\n\n',  # one value cut in two events
    b'data: {"choices": []}, {"choices": []}\n\n',  # two values in one event
], ids=["cut", "two-in-one"])
async def test_events_that_are_not_one_json_value_each_are_invalid(serve, events) -> None:  # type: ignore[no-untyped-def]
    """Made one array, these would parse; each event on its own does not."""

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.writelines(chunked(events + b"data: [DONE]\n\n"))

    _, url = await serve(handler)
    client = upstream(url)
    with pytest.raises(UpstreamError, match="invalid JSON"):
        [c async for c in client.stream(ASK)]
    await client.close()


async def test_stream_framing_comments_and_reply_limit(serve) -> None:  # type: ignore[no-untyped-def]
    """CRLF line ends, comments, `event:` lines and `data:` without a space pass; a stream
    over the reply limit is refused even when no line of it ends."""
    events = (b": keep-alive\r\n\r\nevent: message\r\n"
              + b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}]})
              + b"\r\n\r\ndata:[DONE]\r\n\r\n")  # no space after the colon: still the end
    endless = b"data: " + b"x" * 5000

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.writelines(chunked(events) if n == 0 else chunked(endless)[:2])

    _, url = await serve(handler)
    client = upstream(url, max_reply=1000)
    assert [c["choices"][0]["delta"]["content"]
            async for batch in client.stream(ASK) for c in batch] == ["a"]
    with pytest.raises(UpstreamError, match="over 1000 bytes"):
        [c async for c in client.stream(ASK)]
    await client.close()


async def test_chunks_before_a_mid_stream_error_are_relayed(serve) -> None:  # type: ignore[no-untyped-def]
    """Chunks come in batches, one per read; an error chunk in a batch still lets the ones
    before it through, then fails."""
    events = (b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}]})
              + b"\n\ndata: " + orjson.dumps({"error": {"message": "overloaded"}}) + b"\n\n")

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.writelines(chunked(events))

    _, url = await serve(handler)
    client = upstream(url)
    seen = []
    with pytest.raises(UpstreamError, match="error mid-stream"):
        async for batch in client.stream(ASK):
            seen += [c["choices"][0]["delta"]["content"] for c in batch]
    assert seen == ["a"]
    await client.close()


async def test_a_pooled_connection_the_server_closed_is_retried(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(whole(REPLY))
        if n == 0:  # keep-alive claimed, then the idle connection is closed
            await w.drain()
            w.close()

    server, url = await serve(handler)
    client = upstream(url)
    await client.complete(ASK)
    await asyncio.sleep(0.05)
    assert (await client.complete(ASK))["choices"][0]["message"]["content"] == "hi"
    assert server.connections == 2
    await client.close()


async def test_a_response_cut_short_is_an_upstream_error(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.write(whole(REPLY)[:-10])
        await w.drain()
        w.close()

    _, url = await serve(handler)
    client = upstream(url)
    with pytest.raises(UpstreamError, match="could not reach the model"):
        await client.complete(ASK)
    await client.close()


async def test_garbage_is_an_upstream_error(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    _, url = await serve(handler)
    with pytest.raises(UpstreamError, match="not valid HTTP"):
        await upstream(url).complete(ASK)


async def test_silence_is_a_timeout_and_the_connection_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 0:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")  # then nothing
        else:
            w.write(whole(REPLY))

    server, url = await serve(handler)
    client = upstream(url, timeout_s=0.3)
    with pytest.raises(UpstreamTimeout):
        await client.complete(ASK)
    assert (await client.complete(ASK))["choices"][0]["message"]["content"] == "hi"
    assert server.connections == 2
    await client.close()


@pytest.mark.parametrize("gaps, silent", [([0.1] * 8, False), ([0.1, 0.1, 0.6], True)],
                         ids=["trickle-past-the-timeout", "a-gap-past-the-timeout"])
async def test_a_stream_times_out_on_silence_not_on_length(serve, gaps, silent) -> None:  # type: ignore[no-untyped-def]
    """The timeout of a stream is the longest silence between two reads: one that keeps
    talking runs for longer than it, one that pauses past it is cut."""
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        head, *pieces, end = chunked(*(_data(str(i)) + b"\n\n" for i in range(len(gaps))),
                                      b"data: [DONE]\n\n")
        w.write(head)
        for gap, piece in zip(gaps, pieces):
            await asyncio.sleep(gap)
            w.write(piece)
        w.write(pieces[-1] + end)  # [DONE]

    _, url = await serve(handler)
    client = upstream(url, timeout_s=0.3)
    got: list[str] = []
    if silent:
        with pytest.raises(UpstreamTimeout, match="silent"):
            async for batch in client.stream(ASK):
                got += [c["choices"][0]["delta"]["content"] for c in batch]
        assert got == ["0", "1"]
    else:
        async for batch in client.stream(ASK):
            got += [c["choices"][0]["delta"]["content"] for c in batch]
        assert got == [str(i) for i in range(len(gaps))]
    await client.close()


async def test_a_cancelled_call_closes_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    """An interrupted turn cancels its model call: the server must see the hang-up."""
    hung_up = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        if not await r.read(1):  # no response; wait for the client to go away
            hung_up.set()

    _, url = await serve(handler)
    call = asyncio.ensure_future(upstream(url).complete(ASK))
    await asyncio.sleep(0.1)
    call.cancel()
    await asyncio.wait_for(hung_up.wait(), 5)


async def test_an_oversized_reply_is_refused(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.write(whole(b"x" * 5000))

    _, url = await serve(handler)
    with pytest.raises(UpstreamError, match="over 1000 bytes"):
        await upstream(url, max_reply=1000).complete(ASK)


async def test_https_with_certificate_checks(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """TLS through the loop, verified against the system's trust store (here: a CA file)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = Server(lambda _r, w, _n: _write(w, whole(REPLY)))
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UpstreamError, match="SSL"):  # not trusted yet
            await upstream(f"https://localhost:{port}/v1").complete(ASK)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        client = upstream(f"https://localhost:{port}/v1")
        for _ in range(2):
            assert (await client.complete(ASK))["choices"][0]["message"]["content"] == "hi"
        assert server.connections == 1  # the refused handshake never got that far
        await client.close()
        await asyncio.sleep(0.05)  # the server sees the close
    finally:
        listener.close()


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)


def test_host_header_authority() -> None:
    assert Origin("http://[::1]:8080/v1", 1).authority == "[::1]:8080"
    assert Origin("https://api.example.com/v1", 1).authority == "api.example.com"
    assert Origin("http://127.0.0.1:80/v1", 1).authority == "127.0.0.1"
    with pytest.raises(ValueError):
        Origin("ftp://x/v1", 1)


async def test_silence_on_a_pooled_connection_is_not_sent_twice(serve) -> None:  # type: ignore[no-untyped-def]
    """Only a connection that fails before any answer is retried; a slow model is not, or it
    would get the request a second time."""
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 0:
            w.write(whole(REPLY))

    server, url = await serve(handler)
    client = upstream(url, timeout_s=0.3)
    await client.complete(ASK)
    with pytest.raises(UpstreamTimeout):
        await client.complete(ASK)
    await asyncio.sleep(0.1)
    assert (server.requests, server.connections) == (2, 1)
    await client.close()
