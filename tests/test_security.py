"""Tenants, limits, secrets and hostile upstreams."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import Gateway, StartGateway
from openai_schema import validate_error
from scripted_upstream import ScriptedUpstream

ACME, GLOBEX, ADMIN = "k-acme", "k-globex", "k-admin"
SECRET = "sk-upstream-SECRET-7731"


@pytest.fixture(scope="module")
def tenants(gateways: StartGateway, upstream: ScriptedUpstream) -> Gateway:
    config = (f'upstream_api_key = "{SECRET}"\nmax_queued_per_tenant = 2\n'
              'max_messages = 20\nmax_message_chars = 5000\nmax_tools = 3\nmax_tools_bytes = 2000\n'
              'max_tokens_cap = 1000\nmax_reply_bytes = 20000\n'
              f'admin_keys = ["{ADMIN}"]\n[api_keys]\nacme = "{ACME}"\nglobex = "{GLOBEX}"\n')
    return gateways("--upstream", upstream.url, config=config)


async def _call(gateway: Gateway, method: str, path: str, key: str | None,
                body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    hdrs = {**({"authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, gateway.url + path, json=body, headers=hdrs) as resp:
            raw = await resp.read()
            try:
                return resp.status, orjson.loads(raw)
            except orjson.JSONDecodeError:
                return resp.status, raw.decode()


def _chat(conv: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": f"[conv={conv}] {text}"}],
            **extra}


async def test_same_session_key_under_two_tenants_is_two_sessions(
    tenants: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    h = {"x-laneway-session-key": "shared", "Idempotency-Key": "same-idem"}
    status, a = await _call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, "acme secret plan"), h)
    assert status == 200
    status, g = await _call(tenants, "POST", "/v1/chat/completions", GLOBEX, _chat(conv, "globex hello"), h)
    assert status == 200 and g["id"] != a["id"], "an idempotency key is per tenant"
    assert g["choices"][0]["message"]["content"].endswith("SEEN globex hello")
    turn = a["id"].replace("chatcmpl-", "turn_")
    for path in ("/v1/sessions/shared", f"/v1/sessions/shared/turns/{turn}", "/v1/sessions/shared/turns"):
        status, body = await _call(tenants, "GET", path, GLOBEX)
        assert "acme secret plan" not in orjson.dumps(body).decode(), path
    status, _ = await _call(tenants, "GET", f"/v1/sessions/shared/turns/{turn}", GLOBEX)
    assert status == 404
    status, listing = await _call(tenants, "GET", "/v1/sessions?limit=200", GLOBEX)
    assert {s["tenant"] for s in listing["data"]} == {"globex"}
    status, _ = await _call(tenants, "DELETE", "/v1/sessions/shared", GLOBEX)
    status, kept = await _call(tenants, "GET", "/v1/sessions/shared", ACME)
    assert status == 200 and kept["turns"] == 1, "globex deleted only its own session"
    status, listing = await _call(tenants, "GET", "/v1/sessions?limit=200", ADMIN)
    assert {"acme"} <= {s["tenant"] for s in listing["data"]}
    status, other = await _call(tenants, "GET", "/v1/sessions/shared?tenant=acme", ADMIN)
    assert status == 200 and other["tenant"] == "acme"
    status, mine = await _call(tenants, "GET", "/v1/sessions/shared?tenant=acme", GLOBEX)
    assert status == 404, "only admins pick a tenant"


async def test_one_tenant_cannot_interrupt_or_see_anothers_lane(
    tenants: Gateway, upstream: ScriptedUpstream, conv: str
) -> None:
    h = {"x-laneway-session-key": conv}
    held = asyncio.ensure_future(_call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, "[delay=0.5] long"), h))
    await asyncio.sleep(0.15)
    status, lanes = await _call(tenants, "GET", "/v1/lanes", GLOBEX)
    assert all(lane["tenant"] == "globex" for lane in lanes["data"])
    status, _ = await _call(tenants, "POST", "/v1/chat/completions", GLOBEX, _chat(conv, "x"),
                            {**h, "x-laneway-lane-policy": "interrupt"})
    assert status == 200
    status, reply = await held
    assert status == 200, "acme's turn was not interrupted by globex"
    status, lanes = await _call(tenants, "GET", "/v1/lanes", ADMIN)
    assert status == 200


@pytest.mark.parametrize("body, code", [
    (_chat("c", "x", max_tokens=1001), "max_tokens_too_large"),
    (_chat("c", "x", max_completion_tokens=5000), "max_tokens_too_large"),
    ({"model": "default", "messages": [{"role": "user", "content": "m"}] * 21}, "too_many_messages"),
    (_chat("c", "y" * 5001), "message_too_large"),
    (_chat("c", "x", tools=[{"type": "function", "function": {"name": f"t{i}"}} for i in range(4)]), "too_many_tools"),
    (_chat("c", "x", tools=[{"type": "function", "function": {"name": "t", "description": "d" * 2000}}]), "tools_too_large"),
])
async def test_limits_are_clear_400s(tenants: Gateway, body: dict[str, Any], code: str) -> None:
    status, error = await _call(tenants, "POST", "/v1/chat/completions", ACME, body)
    assert status == 400 and error["error"]["code"] == code
    validate_error(error)


async def test_queued_requests_per_tenant(tenants: Gateway, upstream: ScriptedUpstream, conv: str) -> None:
    h = {"x-laneway-session-key": conv}
    held = asyncio.ensure_future(_call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, "[delay=0.5] a"), h))
    await asyncio.sleep(0.1)
    waiting = [asyncio.ensure_future(_call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, f"w{i}"), h))
               for i in range(2)]
    await asyncio.sleep(0.1)
    status, error = await _call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, "third"), h)
    assert status == 429 and error["error"]["code"] == "tenant_queue_full"
    status, _ = await _call(tenants, "POST", "/v1/chat/completions", GLOBEX, _chat(conv, "other tenant"),
                            {"x-laneway-session-key": conv + "g"})
    assert status == 200
    assert all(s == 200 for s, _ in await asyncio.gather(held, *waiting))


async def test_huge_reply_fails_cleanly(tenants: Gateway, upstream: ScriptedUpstream, conv: str) -> None:
    h = {"x-laneway-session-key": conv}
    assert (await _call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, "before"), h))[0] == 200
    status, error = await _call(tenants, "POST", "/v1/chat/completions", ACME,
                                _chat(conv, "[huge=50000] boom"), h)
    assert status == 502 and error["error"]["code"] == "upstream_error"
    status, events = await _call(tenants, "POST", "/v1/chat/completions", ACME,
                                 _chat(conv, "[huge=50000] boom", stream=True), h)
    assert status == 200  # the stream had started: it ends with an error event
    last = orjson.loads(events.strip().split("\n\n")[-1][6:])
    assert last["error"]["code"] == "upstream_error"
    status, reply = await _call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, "after"), h)
    assert status == 200 and reply["choices"][0]["message"]["content"].endswith("SEEN before | after")


async def test_secrets_never_leak(tenants: Gateway, upstream: ScriptedUpstream, conv: str) -> None:
    status, error = await _call(tenants, "POST", "/v1/chat/completions", ACME, _chat(conv, "[fail=401] no"))
    assert status == 502
    assert upstream.calls(conv)[-1].body  # the key was sent upstream...
    async with aiohttp.ClientSession() as http:
        async with http.get(tenants.url + "/metrics") as resp:
            metrics = await resp.text()
    status, _ = await _call(tenants, "GET", "/v1/sessions", "k-wrong")
    for text in (orjson.dumps(error).decode(), metrics, tenants.output()):
        for secret in (SECRET, ACME, GLOBEX, ADMIN):
            assert secret not in text


def test_banner_hides_passwords(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "laneway", "serve", "--port", "1", "--data-dir", str(tmp_path),
         "--upstream", upstream.url.replace("http://", "http://user:hunter2@"),
         "--store", "postgresql://laneway:pa55word@127.0.0.1:1/none"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out, _ = proc.communicate(timeout=60)
    assert "hunter2" not in out and "pa55word" not in out
    assert "laneway:***@127.0.0.1" in out


async def test_rate_limit_per_tenant(gateways: StartGateway, upstream: ScriptedUpstream, conv: str) -> None:
    gateway = gateways("--upstream", upstream.url, "--rate-limit-per-minute", "3")
    statuses = [(await _call(gateway, "POST", "/v1/chat/completions", None, _chat(conv, f"r{i}")))
                for i in range(4)]
    assert [s for s, _ in statuses] == [200, 200, 200, 429]
    assert statuses[-1][1]["error"]["code"] == "rate_limit_exceeded"


async def test_openapi_is_served_without_auth(tenants: Gateway) -> None:
    status, doc = await _call(tenants, "GET", "/openapi.json", None)
    assert status == 200 and doc["openapi"].startswith("3.1")
    for path in ("/v1/chat/completions", "/v1/sessions/{key}", "/v1/sessions/{key}/turns/{turn_id}",
                 "/v1/lanes", "/v1/models", "/healthz"):
        assert path in doc["paths"]

