"""The lean Redis client of the lanes: replies parsed whatever the packet boundaries, calls
answered in order under concurrency, scripts that Redis forgot reloaded, and a silent or
absent server failing calls with redis-py's error types (which the lanes map to 503)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import uuid

import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from laneway.lanes.resp import RespClient, _Protocol

REDIS = "redis://127.0.0.1:6379/0"
ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]), false}"


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


replies = st.recursive(
    st.one_of(st.none(), st.integers(-(2**62), 2**62), st.text(max_size=30)),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


def _wire(value: object) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        data = value.encode()
        return b"$%d\r\n%s\r\n" % (len(data), data)
    assert isinstance(value, list)
    return b"*%d\r\n" % len(value) + b"".join(_wire(v) for v in value)


@given(values=st.lists(replies, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 400)))
@settings(max_examples=200, deadline=None)
def test_replies_parse_across_any_packet_boundaries(values: list[object], cuts: list[int]) -> None:
    async def run() -> list[object]:
        proto = _Protocol()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in values]
        proto.waiting.extend(futures)
        proto.sent.extend(0.0 for _ in values)
        data = b"".join(_wire(v) for v in values)
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for start, end in zip(points, points[1:]):
            proto.data_received(data[start:end])
        assert not proto.waiting and not proto.lost
        return [f.result() for f in futures]

    assert asyncio.run(run()) == values


async def test_concurrent_calls_get_their_own_replies() -> None:
    client = RespClient(REDIS)
    try:
        results = await asyncio.gather(*(
            client.evalsha(_sha(ECHO), [f"k{i}"], [f"v{i}", i], ECHO) for i in range(500)
        ))
        assert results == [[f"k{i}", f"v{i}", i, None] for i in range(500)]
        with pytest.raises(ResponseError):
            await client.evalsha(_sha("return redis.call('NOPE')"), [], [], "return redis.call('NOPE')")
        assert await client.evalsha(_sha(ECHO), ["k"], ["v", 1], ECHO) == ["k", "v", 1, None]
    finally:
        await client.close()


async def test_a_forgotten_script_is_sent_again() -> None:
    script = f"return '{uuid.uuid4().hex}'"  # unknown to Redis until this test sends it
    client = RespClient(REDIS)
    try:
        first = await client.evalsha(_sha(script), [], [], script)
        assert await client.evalsha(_sha(script), [], [], script) == first
    finally:
        await client.close()


async def test_selects_the_database_of_the_url() -> None:
    key = f"lwtest:{uuid.uuid4().hex}"
    client = RespClient("redis://127.0.0.1:6379/3")
    other = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/3", decode_responses=True)
    try:
        script = "return redis.call('SET', KEYS[1], ARGV[1])"
        await client.evalsha(_sha(script), [key], ["here"], script)
        assert await other.get(key) == "here"
    finally:
        await other.delete(key)
        await other.aclose()
        await client.close()


async def test_a_silent_server_times_out_and_the_client_reconnects() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}", timeout_s=0.4)
    try:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.evalsha(_sha(ECHO), ["k"], ["v", 1], ECHO)  # accepted, never answered
        assert time.monotonic() - started < 2
        selecting = RespClient(f"redis://127.0.0.1:{port}/3", timeout_s=0.4)
        with pytest.raises(RedisConnectionError):  # SELECT during the connect: never answered
            await selecting.evalsha(_sha(ECHO), ["k"], ["v", 1], ECHO)
        await selecting.close()
        listener.close()
        with pytest.raises(RedisConnectionError):
            await client.evalsha(_sha(ECHO), ["k"], ["v", 1], ECHO)  # nobody listens now
    finally:
        await client.close()
        listener.close()
