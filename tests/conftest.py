"""Fixtures: the scripted upstream (a real OpenAI-compatible server on a real port) and
laneway gateways started as real `laneway serve` processes in front of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from openai import AsyncOpenAI
from scripted_upstream import ScriptedUpstream

T = TypeVar("T")


@pytest.fixture(scope="session")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, every: float = 0.01
) -> None:
    """Polls `check` (plain or async) until it holds: for what a server does after it has
    answered (a disconnect noticed, a write landed). Fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, f"not reached within {timeout} s"
        await asyncio.sleep(every)


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path
    api_key: str = "test"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs: object) -> AsyncOpenAI:
        """An SDK client; closed when the test ends (`_close_clients`)."""
        options: dict[str, object] = {"max_retries": 0, "timeout": 30.0}
        options.update(kwargs)
        client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **options)  # type: ignore[arg-type]
        _clients.append(client)
        return client

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def metrics(self) -> dict[str, float]:
        """Every series of its `/metrics`: the name with its labels -> the value."""
        async with aiohttp.ClientSession() as http:
            async with http.get(self.url + "/metrics") as resp:
                text = await resp.text()
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


StartGateway = Callable[..., Gateway]
_clients: list[AsyncOpenAI] = []  # made by `Gateway.client` during the running test


@pytest.fixture(autouse=True)
def _close_clients(request: pytest.FixtureRequest) -> None:
    """Close the SDK clients an async test made, in its event loop (their connections belong
    to it), rather than leaving them to the garbage collector. Sync tests (some drive an
    event loop of their own) are left alone."""
    if inspect.iscoroutinefunction(request.function):
        request.getfixturevalue("_sdk_clients")


@pytest.fixture
async def _sdk_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


def start_gateway(
    *args: str, env: dict[str, str] | None = None, config: str | None = None, wait: float = 60,
    data_dir: Path | None = None,
) -> Gateway:
    """`laneway serve` on a free port with a fresh data dir (or `data_dir`); returns once
    /healthz is ok."""
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="laneway-test-"))
    port = free_port()
    argv = [sys.executable, "-m", "laneway", "serve", "--port", str(port),
            "--data-dir", str(data_dir), "--log-level", "warning", *args]
    if config is not None:
        path = data_dir / "laneway.toml"
        path.write_text(config)
        argv += ["--config", str(path)]
    log = data_dir / "server.log"
    with log.open("ab") as out:  # the child writes to its own copy of the descriptor
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    gateway = Gateway(f"http://127.0.0.1:{port}", proc, data_dir, log)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"laneway exited {proc.returncode}:\n{gateway.output()}")
        try:
            with urllib.request.urlopen(gateway.url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return gateway
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    gateway.stop()
    raise RuntimeError(f"laneway did not start in {wait}s:\n{gateway.output()}")


@pytest.fixture(scope="session")
def gateways() -> Iterator[StartGateway]:
    """Start extra gateways in a test; all are stopped at the end of the session."""
    started: list[Gateway] = []

    def start(*args: str, **kwargs: object) -> Gateway:
        gateway = start_gateway(*args, **kwargs)  # type: ignore[arg-type]
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def gateway(gateways: StartGateway, upstream: ScriptedUpstream) -> Gateway:
    """The default gateway: the scripted upstream behind it, fast queue keep-alives."""
    return gateways("--upstream", upstream.url, "--queue-keepalive-s", "0.2")


@pytest.fixture
def client(gateway: Gateway) -> AsyncOpenAI:
    return gateway.client()


@pytest.fixture
def conv() -> str:
    """A fresh conversation tag: the scripted upstream groups calls by `[conv=...]`."""
    return uuid.uuid4().hex[:12]


POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, randomly named database on the machine's PostgreSQL, dropped afterwards."""
    import asyncpg

    name = "laneway_test_" + uuid.uuid4().hex[:12]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_async(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        run_async(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def redis_prefix() -> Iterator[str]:
    """A random key prefix for one test's lanes on the machine's Redis; every key under it
    is deleted afterwards."""
    import redis

    prefix = f"lwtest:{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS)
        names = list(client.scan_iter(match=prefix + "*"))
        if names:
            client.delete(*names)
        client.close()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, even inside a running event loop's thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
