"""The load generator: a process of its own, so its CPU is charged to no server and it shares
no GIL with one. The runner writes one job a line (JSON) on stdin; each is answered with one
line of results on stdout.

Every job opens a fresh connection pool and warms it with `concurrency` untimed requests:
servers close idle keep-alive connections, and a connection set up inside the timed part
would land in p99. A line holding a list of jobs runs them in lockstep (see `run_paired`)
and is answered with a list of results.

    python -m benchmarks.loadgen
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import uvloop

FILLER = "Please summarise the notes from yesterday's planning meeting and list the action items."


@dataclass(frozen=True, slots=True)
class Job:
    """What to send. `keys` picks each request's session key:
    rotate  each worker its own key, a new one every `rotate_every` requests (prefix `key`);
    one     every request on the key `key` (a lane with a queue);
    seq     request i on `key` + str((seq_start + i) * seq_stride) (each key used once);
    none    no session header."""

    url: str
    requests: int
    concurrency: int
    stream: bool = False
    delay_ms: float = 0.0
    pace_ms: float = 0.0  # a streamed reply one event per write, this far apart
    keys: str = "rotate"
    key: str = "k"
    rotate_every: int = 20
    seq_start: int = 0
    seq_stride: int = 1
    tag: str = ""
    gate: bool = False
    warm_url: str = ""
    timeout_s: float = 120.0

    def content(self) -> str:
        script = f"bench d={self.delay_ms:g}"
        script += f" h={self.tag}" if self.tag else ""
        script += " g=1" if self.gate else ""
        script += f" p={self.pace_ms:g}" if self.pace_ms else ""
        return f"{script} {FILLER}"


@dataclass(slots=True)
class Tally:
    latencies: list[float] = dataclasses.field(default_factory=list)
    ttfts: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    first_ms: float = 0.0

    def fail(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what[:300]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


async def run(job: Job) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=job.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        if job.warm_url:
            await asyncio.gather(*(_warm(http, job.warm_url) for _ in range(job.concurrency)))
        tally = Tally()
        body = _body(job)
        counter = iter(range(job.requests))
        started = time.perf_counter()
        await asyncio.gather(
            *(_worker(http, job, w, body, counter, tally) for w in range(job.concurrency))
        )
        elapsed = time.perf_counter() - started
    return _results(job, tally, elapsed)


async def run_paired(jobs: list[Job]) -> list[dict[str, Any]]:
    """Jobs of one request at a time, in lockstep: request i of every job, the jobs' order
    rotating with i. The machine's speed drifts within a second on a shared VM; this way
    every job sees the same drift, so figures of two servers (or two sessions) compare
    request for request. `elapsed_s` of each is the time its own requests took."""
    if any(job.concurrency != 1 or job.requests != jobs[0].requests for job in jobs):
        raise ValueError("paired jobs run one request at a time, as many each")
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=max(job.timeout_s for job in jobs))
    tallies = [Tally() for _ in jobs]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        for job in jobs:
            if job.warm_url:
                await _warm(http, job.warm_url)
        bodies = [_body(job) for job in jobs]
        for i in range(jobs[0].requests):
            for k in range(len(jobs)):
                n = (i + k) % len(jobs)
                job = jobs[n]
                await _request(http, job, _headers(job, 0, i, i), bodies[n], tallies[n], i == 0)
    return [_results(job, tally, sum(tally.latencies) / 1000)
            for job, tally in zip(jobs, tallies)]


def _body(job: Job) -> bytes:
    return orjson.dumps(
        {
            "model": "default",
            "messages": [{"role": "user", "content": job.content()}],
            "stream": job.stream,
        }
    )


def _results(job: Job, tally: Tally, elapsed: float) -> dict[str, Any]:
    lat, ttft = sorted(tally.latencies), sorted(tally.ttfts)
    return {
        "requests": job.requests,
        "ok": len(lat),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed_s": elapsed,
        "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else 0.0,
        "mean_ms": sum(lat) / len(lat) if lat else 0.0,
        "first_ms": tally.first_ms,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
    }


async def _warm(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url) as resp:
        await resp.read()


async def _worker(
    http: aiohttp.ClientSession,
    job: Job,
    worker: int,
    body: bytes,
    counter: Any,
    tally: Tally,
) -> None:
    for mine, i in enumerate(counter):  # shared: each worker takes the next index when free
        await _request(http, job, _headers(job, worker, mine, i), body, tally, first=i == 0)


def _headers(job: Job, worker: int, mine: int, i: int) -> dict[str, str]:
    """Request `i` of the job, the worker's `mine`-th."""
    headers = {"Content-Type": "application/json"}
    if job.keys == "rotate":
        headers["x-laneway-session-key"] = f"{job.key}-w{worker}-{mine // job.rotate_every}"
    elif job.keys == "one":
        headers["x-laneway-session-key"] = job.key
    elif job.keys == "seq":
        headers["x-laneway-session-key"] = f"{job.key}{(job.seq_start + i) * job.seq_stride}"
    return headers


async def _request(
    http: aiohttp.ClientSession,
    job: Job,
    headers: dict[str, str],
    body: bytes,
    tally: Tally,
    first: bool,
) -> None:
    t0 = time.perf_counter()
    ttft = 0.0
    try:
        async with http.post(job.url, data=body, headers=headers) as resp:
            if resp.status != 200:
                tally.fail(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
                return
            if job.stream:
                tail = b""
                async for data in resp.content.iter_any():
                    if not ttft and b"data:" in data:
                        ttft = time.perf_counter() - t0
                    tail = (tail + data)[-64:]
                if not tail.rstrip().endswith(b"[DONE]"):
                    tally.fail(f"stream ended without [DONE]: {tail!r}")
                    return
            else:
                out = await resp.read()
                if not out.startswith(b"{") or b'"choices"' not in out:
                    tally.fail(f"not a completion: {out[:200]!r}")
                    return
    except (TimeoutError, aiohttp.ClientError) as e:
        tally.fail(f"{type(e).__name__}: {e}")
        return
    latency = (time.perf_counter() - t0) * 1000
    tally.latencies.append(latency)
    if job.stream:
        tally.ttfts.append(ttft * 1000)
    if first:
        tally.first_ms = latency


def main() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                spec = orjson.loads(line)
                if isinstance(spec, list):
                    result: Any = runner.run(run_paired([Job(**job) for job in spec]))
                else:
                    result = runner.run(run(Job(**spec)))
            except Exception as e:  # noqa: BLE001 - reported to the runner, which raises it
                result = {"fatal": f"{type(e).__name__}: {e}"}
            sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
