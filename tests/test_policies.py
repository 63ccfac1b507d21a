"""Lane policies with the official SDK and raw HTTP: reject, interrupt, collect, bounded
queues, idempotency, rejoin, disconnect policy, turn limits, isolated sessions.

Each test holds a lane with a slow scripted turn (`[delay=S]`), sends the request under
test while it runs, then checks the replies, the exact upstream calls and the transcript.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import Gateway, StartGateway, eventually
from openai_schema import validate_chunk, validate_error
from scripted_upstream import ScriptedUpstream

CHAT = "/chat/completions"


def _body(conv: str, text: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "default", "stream": stream,
            "messages": [{"role": "user", "content": f"[conv={conv}] {text}"}], **extra}


def _h(key: str, policy: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"x-laneway-session-key": key, **extra}
    if policy:
        headers["x-laneway-lane-policy"] = policy
    return headers


async def _post(gateway: Gateway, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + CHAT, json=body, headers=headers) as resp:
            raw = await resp.read()
            data = orjson.loads(raw) if resp.content_type == "application/json" else raw.decode()
            return resp.status, dict(resp.headers), data


async def _stream_events(gateway: Gateway, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, list[str]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + CHAT, json=body, headers=headers) as resp:
            text = (await resp.read()).decode()
            return resp.status, [e for e in text.split("\n\n") if e]


async def _session(gateway: Gateway, key: str, agent: str = "default") -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.base_url}/sessions/{key}?agent={agent}") as resp:
            return await resp.json()  # type: ignore[no-any-return]


def _users(messages: list[dict[str, Any]]) -> list[str]:
    return [str(m["content"]).split("] ")[-1] for m in messages if m["role"] == "user"]


# -- reject -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_reject_when_busy_with_sdk_retries(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str, stream: bool
) -> None:
    client = gateway.client(max_retries=2)  # the SDK's default: it must not retry this
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.5] first"), _h(conv)))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(openai.ConflictError) as caught:
        await client.chat.completions.create(
            model="default",
            stream=stream,
            messages=[{"role": "user", "content": f"[conv={conv}] second"}],
            extra_headers=_h(conv, "reject"),
        )
    assert time.monotonic() - started < 0.3, "rejected at once, not retried"
    assert caught.value.code == "session_busy"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    validate_error(caught.value.response.json())
    await holder
    assert len(upstream.calls(conv)) == 1
    assert _users((await _session(gateway, conv))["messages"]) == ["first"]
    ok = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"[conv={conv}] third"}],
        extra_headers=_h(conv, "reject"),
    )
    assert ok.choices[0].message.content.endswith("SEEN first | third")


# -- interrupt --------------------------------------------------------------------------


async def test_interrupt_plain_turn(gateway: Gateway, upstream: ScriptedUpstream, conv: str) -> None:
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=5] long job"), _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    started = time.monotonic()
    status, _, reply = await _post(gateway, _body(conv, "stop that, do this"), _h(conv, "interrupt"))
    assert status == 200
    assert time.monotonic() - started < 2, "the running turn was cancelled at once"
    assert reply["choices"][0]["message"]["content"].endswith("SEEN long job | stop that, do this")
    status, headers, error = await holder
    assert status == 409 and error["error"]["code"] == "turn_interrupted"
    assert headers["x-should-retry"] == "false"
    calls = upstream.calls(conv)
    assert len(calls) == 2 and calls[0].status == 0, "the first model call was aborted"
    session = await _session(gateway, conv)
    assert [m["role"] for m in session["messages"]] == ["user", "user", "assistant"]


async def test_interrupt_streamed_turn_keeps_partial_reply(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    long = _body(conv, "[chunk_delay=0.4] tell me a long story please", stream=True)
    holder = asyncio.ensure_future(_stream_events(gateway, long, _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    await asyncio.sleep(0.6)  # a couple of chunks have been streamed
    client = gateway.client()
    stream = await client.chat.completions.create(
        model="default", stream=True,
        messages=[{"role": "user", "content": f"[conv={conv}] shorter please"}],
        extra_headers=_h(conv, "interrupt"),
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("ECHO shorter please")
    status, events = await holder
    assert status == 200
    final = orjson.loads(events[-1][6:])
    assert final["error"]["code"] == "turn_interrupted"
    partial = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert partial.startswith("ECHO tell")
    for event in events[:-1]:
        validate_chunk(orjson.loads(event[6:]))
    messages = (await _session(gateway, conv))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["interrupted"] is True and messages[1]["content"] == partial
    # the model saw the partial reply (without laneway's mark) before the new input
    seen = upstream.calls(conv)[-1].messages
    assert {"role": "assistant", "content": partial} in seen


async def test_interrupt_between_tool_rounds_leaves_a_valid_conversation(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    text = '[delay=0.4] [call=memory_save {"text": "the sky is green here"}] note it'
    holder = asyncio.ensure_future(_post(gateway, _body(conv, text), _h(conv)))
    await eventually(lambda: len(upstream.calls(conv)) == 2)  # the second round runs
    status, _, reply = await _post(gateway, _body(conv, "next"), _h(conv, "interrupt"))
    assert status == 200, reply
    assert (await holder)[0] == 409
    messages = (await _session(gateway, conv))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user", "assistant"]
    assert (await _session(gateway, conv))["memories"][0]["text"] == "the sky is green here"


async def test_interrupt_when_idle_just_runs(gateway: Gateway, conv: str) -> None:
    status, _, reply = await _post(gateway, _body(conv, "hello"), _h(conv, "interrupt"))
    assert status == 200 and reply["choices"][0]["message"]["content"].endswith("SEEN hello")


# -- collect ----------------------------------------------------------------------------


async def test_collect_merges_into_one_follow_up_turn(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.5] first"), _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    client = gateway.client()

    async def plain(text: str) -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=[{"role": "user", "content": f"[conv={conv}] {text}"}],
            extra_headers=_h(conv, "collect"),
        )
        return raw.parse().choices[0].message.content or "", raw.headers["x-laneway-turn-id"]

    async def streamed(text: str) -> str:
        chunks = await client.chat.completions.create(
            model="default", stream=True,
            messages=[{"role": "user", "content": f"[conv={conv}] {text}"}],
            extra_headers=_h(conv, "collect"),
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    a = asyncio.ensure_future(plain("a"))
    await asyncio.sleep(0.05)
    b = asyncio.ensure_future(streamed("b"))
    await asyncio.sleep(0.05)
    c = asyncio.ensure_future(plain("c"))
    (ra, turn_a), rb, (rc, turn_c) = await asyncio.gather(a, b, c)
    await holder
    assert ra == rb == rc and ra.endswith("SEEN first | a | b | c")
    assert turn_a == turn_c
    assert len(upstream.calls(conv)) == 2, "one follow-up model call for the three"
    messages = (await _session(gateway, conv))["messages"]
    assert _users(messages) == ["first", "a", "b", "c"]
    assert [m["role"] for m in messages].count("assistant") == 2


async def test_collect_does_not_overtake_a_queued_request(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.4] first"), _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    c1 = asyncio.ensure_future(_post(gateway, _body(conv, "c1"), _h(conv, "collect")))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(_post(gateway, _body(conv, "plain"), _h(conv)))
    await asyncio.sleep(0.05)
    c2 = asyncio.ensure_future(_post(gateway, _body(conv, "c2"), _h(conv, "collect")))
    await asyncio.gather(holder, c1, queued, c2)
    assert _users((await _session(gateway, conv))["messages"]) == ["first", "c1", "plain", "c2"]
    assert len(upstream.calls(conv)) == 4


# -- bounded queues ---------------------------------------------------------------------


async def test_queue_full_and_queue_timeout(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, "--max-queue-depth", "1", "--max-queue-wait-s", "0.4")
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.8] first"), _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    waiting = asyncio.ensure_future(_post(gateway, _body(conv, "waits too long"), _h(conv)))
    await asyncio.sleep(0.05)
    status, headers, error = await _post(gateway, _body(conv, "no room"), _h(conv))
    assert status == 429 and error["error"]["code"] == "queue_full"
    assert int(headers["Retry-After"]) >= 1
    validate_error(error)
    status, headers, error = await waiting
    assert status == 429 and error["error"]["code"] == "queue_timeout"
    assert headers["x-should-retry"] == "false"
    await holder
    assert _users((await _session(gateway, conv))["messages"]) == ["first"]
    assert len(upstream.calls(conv)) == 1


# -- idempotency ------------------------------------------------------------------------


async def test_idempotency_key_returns_the_first_result(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    client = gateway.client()

    async def ask(key: str, text: str = "pay the invoice") -> Any:
        return await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"[conv={conv}] [delay=0.2] {text}"}],
            extra_headers=_h(conv, **{"Idempotency-Key": key}),
        )

    first, repeat = await asyncio.gather(ask("k1"), ask("k1"))
    later = await ask("k1")
    assert first.id == repeat.id == later.id
    assert len(upstream.calls(conv)) == 1
    other = await ask("k2", "another")
    assert other.id != first.id and len(upstream.calls(conv)) == 2
    assert _users((await _session(gateway, conv))["messages"]) == ["pay the invoice", "another"]


async def test_idempotency_survives_a_restart(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    first_gw = gateways("--upstream", upstream.url)
    headers = _h(conv, **{"Idempotency-Key": "once"})
    status, _, first = await _post(first_gw, _body(conv, "charge card"), headers)
    assert status == 200
    first_gw.stop()
    second_gw = gateways("--upstream", upstream.url, "--data-dir", str(first_gw.data_dir))
    status, _, again = await _post(second_gw, _body(conv, "charge card"), headers)
    assert status == 200 and again["id"] == first["id"]
    assert len(upstream.calls(conv)) == 1


async def test_sdk_retry_after_broken_connection_does_not_run_twice(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    """The SDK resends the same body with x-stainless-retry-count: 1 after a connection
    broke; the gateway had already accepted the first attempt's turn."""
    body = _body(conv, "[delay=0.4] book the flight")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                http.post(gateway.base_url + CHAT, json=body,
                          headers=_h(conv, **{"x-stainless-retry-count": "0"})),
                0.15,
            )
    status, _, retried = await _post(gateway, body, _h(conv, **{"x-stainless-retry-count": "1"}))
    assert status == 200 and retried["choices"][0]["message"]["content"].startswith("ECHO book the flight")
    assert len(upstream.calls(conv)) == 1
    assert _users((await _session(gateway, conv))["messages"]) == ["book the flight"]
    # a new request with the same words (not a retry) is a new turn
    status, _, again = await _post(gateway, body, _h(conv, **{"x-stainless-retry-count": "0"}))
    assert status == 200 and again["id"] != retried["id"]


# -- rejoin -----------------------------------------------------------------------------


async def test_rejoin_a_turn_after_losing_the_stream(gateway: Gateway, upstream: ScriptedUpstream, conv: str) -> None:
    body = _body(conv, "[chunk_delay=0.2] a reply worth waiting for", stream=True)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(gateway.base_url + CHAT, json=body, headers=_h(conv))
        turn_id = resp.headers["x-laneway-turn-id"]
        await resp.content.readline()
        resp.close()
        async with http.get(f"{gateway.base_url}/sessions/{conv}/turns/{turn_id}?wait=5") as r:
            turn = await r.json()
        assert turn["status"] == "completed"
        assert turn["response"]["choices"][0]["message"]["content"].startswith("ECHO a reply worth")
        async with http.get(f"{gateway.base_url}/sessions/{conv}/turns") as r:
            turns = (await r.json())["data"]
        assert [t["id"] for t in turns] == [turn_id]
        async with http.get(f"{gateway.base_url}/sessions/{conv}/turns/turn_nope") as r:
            assert r.status == 404
        async with http.get(f"{gateway.base_url}/sessions/{conv}/turns/{turn_id}?wait=x") as r:
            assert r.status == 400


async def test_rejoin_shows_a_running_turn(gateway: Gateway, upstream: ScriptedUpstream, conv: str) -> None:
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.5] slow"), _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.base_url + "/lanes") as r:
            lanes = [lane for lane in (await r.json())["data"] if lane["session_key"] == conv]
        assert lanes and lanes[0]["running"] and lanes[0]["turn_id"].startswith("turn_")
        turn_id = lanes[0]["turn_id"]
        async with http.get(f"{gateway.base_url}/sessions/{conv}/turns/{turn_id}") as r:
            assert (await r.json())["status"] == "running"
        async with http.get(f"{gateway.base_url}/sessions/{conv}/turns/{turn_id}?wait=3") as r:
            assert (await r.json())["status"] == "completed"
    await holder


# -- disconnect policy, limits, isolated sessions ---------------------------------------


async def test_on_disconnect_cancel_interrupts(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, config='[agents.strict]\non_disconnect = "cancel"\n')
    body = {**_body(conv, "[chunk_delay=0.3] one two three four five six", stream=True), "model": "strict"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(gateway.base_url + CHAT, json=body, headers=_h(conv))
        await resp.content.readline()  # the role chunk
        resp.close()
    await eventually(lambda: upstream.calls(conv)[0].ended is not None)
    assert upstream.calls(conv)[0].status == 0, "the model call was aborted"

    async def saved() -> bool:
        return (await _session(gateway, conv, "strict")).get("turns") == 1

    await eventually(saved)
    messages = (await _session(gateway, conv, "strict"))["messages"]
    assert messages[0]["role"] == "user"
    assert all(m.get("interrupted") for m in messages[1:])


async def test_max_turn_s_frees_the_lane(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, "--max-turn-s", "0.3")
    status, _, error = await _post(gateway, _body(conv, "[hang] stuck"), _h(conv))
    assert status == 504 and error["error"]["code"] == "turn_timeout"
    status, _, ok = await _post(gateway, _body(conv, "next"), _h(conv))
    assert status == 200 and ok["choices"][0]["message"]["content"].endswith("SEEN next")


async def test_max_concurrent_turns_across_keys(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, "--max-concurrent-turns", "1")
    keys = [f"{conv}-{i}" for i in range(3)]
    results = await asyncio.gather(*(
        _post(gateway, _body(f"{conv}{i}", "[delay=0.15] x"), _h(k)) for i, k in enumerate(keys)
    ))
    assert all(status == 200 for status, _, _ in results)
    calls = sorted((c for i in range(3) for c in upstream.calls(f"{conv}{i}")), key=lambda c: c.started)
    for before, after in zip(calls, calls[1:]):
        assert before.ended is not None and before.ended <= after.started + 0.01


async def test_isolated_override_runs_beside_a_busy_lane(
    gateway: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.5] first"), _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    started = time.monotonic()
    status, headers, reply = await _post(
        gateway, _body(conv, "aside"), _h(conv, **{"x-laneway-session-override": "isolated"})
    )
    assert status == 200 and time.monotonic() - started < 0.3
    assert headers["x-laneway-session-key"] != conv
    assert reply["choices"][0]["message"]["content"].endswith("SEEN aside")
    await holder
    assert _users((await _session(gateway, conv))["messages"]) == ["first"]


async def test_outcome_metrics(gateway: Gateway, upstream: ScriptedUpstream, conv: str) -> None:
    holder = asyncio.ensure_future(_post(gateway, _body(conv, "[delay=0.3] a"), _h(conv)))
    await eventually(lambda: bool(upstream.calls(conv)))
    assert (await _post(gateway, _body(conv, "b"), _h(conv, "reject")))[0] == 409
    await holder
    for _ in range(2):
        await _post(gateway, _body(conv, "c"), _h(conv, **{"Idempotency-Key": conv}))
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/metrics") as r:
            text = await r.text()
    for outcome in ("ok", "rejected", "deduplicated"):
        assert f'laneway_turns_total{{outcome="{outcome}"}}' in text, outcome
    assert "laneway_queue_depth" in text and "laneway_upstream_seconds_bucket" in text
