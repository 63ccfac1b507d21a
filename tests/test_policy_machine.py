"""A hypothesis state machine against a real gateway: requests with every policy, streamed
or not, idempotent repeats and clients that give up, on a few keys at once. After each
settle step every invariant of the lane must hold:

* the model never ran two turns of one key at once;
* enqueued requests that succeeded appear in the transcript in their arrival order;
* every 2xx reply's input is in the transcript exactly once, and so is an interrupted one's;
* every other error's input is absent; a request whose client gave up is there at most once;
* an idempotent repeat got the first request's reply.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field

import aiohttp
import orjson
from conftest import Gateway, StartGateway
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from scripted_upstream import ScriptedUpstream

POLICIES = ("enqueue", "reject", "interrupt", "collect")


@dataclass
class Sent:
    key: str
    text: str
    policy: str
    stream: bool
    idempotency: str | None
    gives_up: bool
    task: asyncio.Task[tuple[int, str | None, str | None]] | None = None
    result: tuple[int, str | None, str | None] | None = None  # status, error code, reply id


@dataclass
class World:
    gateway: Gateway
    upstream: ScriptedUpstream
    loop: asyncio.AbstractEventLoop
    http: aiohttp.ClientSession
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    sent: list[Sent] = field(default_factory=list)


async def _send(world: World, sent: Sent) -> tuple[int, str | None, str | None]:
    body = {"model": "default", "stream": sent.stream,
            "messages": [{"role": "user", "content": f"[conv={world.run}{sent.key}] [delay=0.05] {sent.text}"}]}
    headers = {"x-laneway-session-key": world.run + sent.key, "x-laneway-lane-policy": sent.policy}
    if sent.idempotency:
        headers["Idempotency-Key"] = sent.idempotency
    timeout = aiohttp.ClientTimeout(total=0.03 if sent.gives_up else 30)
    try:
        async with world.http.post(world.gateway.base_url + "/chat/completions", json=body,
                                   headers=headers, timeout=timeout) as resp:
            raw = await resp.read()
    except TimeoutError:
        return 0, "gave_up", None
    if resp.status != 200:
        return resp.status, orjson.loads(raw)["error"]["code"], None
    if not sent.stream:
        return 200, None, orjson.loads(raw)["id"]
    events = [e for e in raw.decode().split("\n\n") if e.startswith("data: {")]
    last = orjson.loads(events[-1][6:])
    if "error" in last:
        return 200, last["error"]["code"], None
    return 200, None, last["id"]


class LaneMachine(RuleBasedStateMachine):
    world: World

    @initialize()
    def start(self) -> None:
        self.counter = itertools.count()

    @rule(
        key=st.sampled_from(["a", "b"]),
        policy=st.sampled_from(POLICIES),
        stream=st.booleans(),
        repeat=st.booleans(),
        gives_up=st.integers(0, 9).map(lambda n: n == 0),
    )
    def send(self, key: str, policy: str, stream: bool, repeat: bool, gives_up: bool) -> None:
        world = self.world
        earlier = [s for s in world.sent if s.key == key and s.idempotency and not s.gives_up]
        if repeat and earlier:
            original = earlier[-1]
            sent = Sent(key, original.text, original.policy, stream, original.idempotency, False)
        else:
            n = next(self.counter)
            sent = Sent(key, f"m{n}", policy, stream, f"idem-{n}" if repeat else None, gives_up)
        sent.task = world.loop.create_task(_send(world, sent))
        world.sent.append(sent)
        world.loop.run_until_complete(asyncio.sleep(0.015))  # arrival order = sending order

    @rule()
    def settle(self) -> None:
        world = self.world
        pending = [s.task for s in world.sent if s.task is not None and s.result is None]
        if pending:
            world.loop.run_until_complete(asyncio.wait(pending))
        for s in world.sent:
            if s.result is None and s.task is not None:
                s.result = s.task.result()
        world.loop.run_until_complete(self._idle())
        self.check()

    async def _idle(self) -> None:
        """Turns whose clients gave up may still run: wait until no lane is busy."""
        for _ in range(300):
            async with self.world.http.get(self.world.gateway.base_url + "/lanes") as r:
                lanes = [x for x in (await r.json())["data"] if x["session_key"].startswith(self.world.run)]
            if not lanes:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("a lane stayed busy")

    def check(self) -> None:
        world = self.world
        for key in ("a", "b"):
            conv = world.run + key
            assert world.upstream.max_concurrency(conv, abandoned=False) <= 1, (
                "two turns of one key ran at once")
            transcript = world.loop.run_until_complete(self._users(conv))
            done = [s for s in world.sent if s.key == key and s.result is not None]
            by_text: dict[str, list[Sent]] = {}
            for s in done:
                by_text.setdefault(s.text, []).append(s)
            for text, group in by_text.items():
                codes = [s.result[1] for s in group]  # type: ignore[index]
                count = transcript.count(text)
                if None in codes or "turn_interrupted" in codes:
                    assert count == 1, (text, group, transcript)
                elif "gave_up" in codes:
                    assert count <= 1, (text, group, transcript)
                else:
                    assert count == 0, (text, group, transcript)
                replies = {s.result[2] for s in group if s.result[1] is None}  # type: ignore[index]
                assert len(replies) <= 1, ("an idempotent repeat ran anew", group)
            enqueued = [
                s.text for s in done
                if s.policy == "enqueue" and s.result[:2] == (200, None) and not s.idempotency  # type: ignore[index]
            ]
            positions = [transcript.index(t) for t in enqueued]
            assert positions == sorted(positions), ("FIFO broken", enqueued, transcript)

    async def _users(self, conv: str) -> list[str]:
        async with self.world.http.get(f"{self.world.gateway.base_url}/sessions/{conv}") as r:
            if r.status == 404:
                return []
            messages = (await r.json())["messages"]
        return [str(m["content"]).rsplit("] ", 1)[-1] for m in messages if m["role"] == "user"]

    @invariant()
    def never_two_at_once(self) -> None:
        for key in ("a", "b"):
            assert self.world.upstream.max_concurrency(self.world.run + key, abandoned=False) <= 1

    def teardown(self) -> None:
        self.settle()


def test_lane_policies_state_machine(gateways: StartGateway, upstream: ScriptedUpstream) -> None:
    gateway = gateways("--upstream", upstream.url, "--max-queue-depth", "64")
    loop = asyncio.new_event_loop()
    http = loop.run_until_complete(_session())

    class Machine(LaneMachine):
        def __init__(self) -> None:
            super().__init__()
            self.world = World(gateway, upstream, loop, http)

    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(max_examples=30, stateful_step_count=20, deadline=None,
                              suppress_health_check=list(HealthCheck)),
        )
    finally:
        loop.run_until_complete(http.close())
        loop.close()


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()

