"""The client commands (`laneway sessions|lanes|chat`) run as real processes against a real
gateway with the scripted upstream behind it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest
from conftest import Gateway, StartGateway, free_port
from ops_support import chat, held_lane, lane, request
from scripted_upstream import ScriptedUpstream

ADMIN = "ops-admin"
ACME = "ops-acme"


def laneway(*args: str, url: str | None = None, key: str | None = None, stdin: str = "",
            env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`laneway ARGS` with a wide, colourless terminal and no LANEWAY_* leaking in."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
    base |= {"COLUMNS": "200", "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"}
    if url is not None:
        base["LANEWAY_URL"] = url
    if key is not None:
        base["LANEWAY_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "laneway", *args], check=False, input=stdin,
                          text=True, capture_output=True, timeout=timeout,
                          env=base | (env or {}))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """A clear error: exit 1, a message on stderr, no traceback."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    return result.stderr


@pytest.fixture(scope="module")
def keyed(gateways: StartGateway, upstream: ScriptedUpstream) -> Gateway:
    return gateways("--upstream", upstream.url, "--api-key", f"acme={ACME}",
                    "--admin-key", ADMIN, "--queue-keepalive-s", "0.2")


def _key() -> str:
    return "ops-" + uuid.uuid4().hex[:10]


def test_sessions_list_show_rm(gateway: Gateway) -> None:
    key = _key()
    _, first = chat(gateway.url, key, 'Remember me [call=memory_save {"text": "Ann likes tea", '
                    '"pinned": true}]')
    _, second = chat(gateway.url, key, "What do I like?")

    listed = ok(laneway("sessions", "list", "--limit", "200", url=gateway.url))
    assert key in listed
    rows = json.loads(ok(laneway("sessions", "list", "--all", "--json", url=gateway.url)))
    assert [r["turns"] for r in rows["data"] if r["key"] == key] == [2]

    shown = ok(laneway("sessions", "show", key, url=gateway.url))
    assert "Transcript (6 messages)" in shown
    assert '→ memory_save({"text": "Ann likes tea", "pinned": true})' in shown
    assert "← memory_save: saved" in shown
    assert "Ann likes tea" in shown.split("Memories (1)")[1]
    turns = shown.split("Turns")[1]
    assert first in turns and second in turns and "completed" in turns and " ms" in turns

    refused = laneway("sessions", "rm", key, url=gateway.url, stdin="n\n")
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    assert request(f"{gateway.url}/v1/sessions/{key}")[0] == 200
    assert f"deleted session {key}" in ok(laneway("sessions", "rm", key, "--yes",
                                                  url=gateway.url))
    assert request(f"{gateway.url}/v1/sessions/{key}")[0] == 404
    assert "session_not_found" in failed(laneway("sessions", "show", key, url=gateway.url))


def test_sessions_list_pages(gateway: Gateway) -> None:
    for _ in range(3):
        chat(gateway.url, _key(), "hello")
    first = ok(laneway("sessions", "list", "--limit", "2", url=gateway.url))
    assert "2 sessions" in first
    cursor = first.split("--cursor ")[1].split()[0]
    assert "more: laneway sessions list --limit 2 --cursor" in first
    page = json.loads(ok(laneway("sessions", "list", "--limit", "2", "--cursor", cursor,
                                 "--json", url=gateway.url)))
    assert len(page["data"]) >= 1
    assert not {r["key"] for r in page["data"]} & set(first.split())


def test_lanes_show_a_busy_lane_and_its_queue(gateway: Gateway) -> None:
    key = _key()
    chat(gateway.url, key, "first")  # so the session exists for `sessions list --busy`
    with held_lane(gateway.url, key, queued=2, hold_s=6):  # room for five commands
        once = ok(laneway("lanes", url=gateway.url))
        cells = [c.strip() for c in re.split(r"[│|]", next(x for x in once.splitlines()
                                                            if key in x))]
        assert cells[1:5] == [key, "default", "running", "2"], cells
        assert re.fullmatch(r"\d+\.\d s", cells[5]), cells  # oldest wait
        assert lane(gateway.url, key)["oldest_wait_s"] > 0  # type: ignore[index]
        assert "waiting" in once.splitlines()[0]
        busy = json.loads(ok(laneway("sessions", "list", "--busy", "--limit", "200", "--json",
                                     url=gateway.url)))
        mine = [r for r in busy["data"] if r["key"] == key]
        assert mine and mine[0]["status"] == "running" and mine[0]["queue_depth"] == 2
        idle = json.loads(ok(laneway("sessions", "list", "--idle", "--limit", "200", "--json",
                                     url=gateway.url)))
        assert key not in {r["key"] for r in idle["data"]}

        watched = ok(laneway("lanes", "--watch", "--interval", "0.2", "--count", "3",
                             url=gateway.url))
        tables = [x for x in watched.splitlines() if "busy lanes" in x]
        assert len(tables) == 3 and watched.count(key) == 3
    assert key not in ok(laneway("lanes", url=gateway.url))


def test_lanes_watch_stops_cleanly_on_ctrl_c(gateway: Gateway) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANEWAY_")}
    # SIGINT as a terminal leaves it: a shell's background job starts with it ignored, and
    # a Python started so keeps ignoring it (and Ctrl-C could not stop the watch).
    proc = subprocess.Popen(
        [sys.executable, "-m", "laneway", "lanes", "--watch", "--interval", "0.2",
         "--url", gateway.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # readline has no timeout
            assert "lanes" in pool.submit(proc.stdout.readline).result(timeout=20)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_chat_streams_into_a_session(gateway: Gateway) -> None:
    key = _key()
    out = ok(laneway("chat", key, url=gateway.url,
                     stdin="hello [reply=Hi from the gateway]\n\nand again\n/exit\n"))
    assert "Hi from the gateway" in out
    assert "ECHO and again :: SEEN hello | and again" in out
    status, _, session = request(f"{gateway.url}/v1/sessions/{key}")
    assert status == 200 and session["turns"] == 2 and len(session["messages"]) == 4

    fresh = ok(laneway("chat", url=gateway.url, stdin="one\ntwo\n"))  # EOF ends it
    new_key = fresh.split("(session ")[1].split(")")[0]
    assert new_key.startswith("sess_")
    assert "ECHO two :: SEEN one | two" in fresh


def test_chat_shows_its_place_in_the_queue(gateway: Gateway) -> None:
    key = _key()
    with held_lane(gateway.url, key, queued=0, hold_s=3):
        out = ok(laneway("chat", key, url=gateway.url, stdin="behind it\n"))
    assert "(queued, position 1)" in out
    assert out.index("(queued, position 1)") < out.index("ECHO behind it")


def test_chat_reports_a_failed_turn_and_goes_on(gateway: Gateway) -> None:
    out = laneway("chat", _key(), url=gateway.url, stdin="boom [fail=500]\nfine\n")
    assert out.returncode == 0, out.stderr
    assert "error" in out.stderr + out.stdout and "ECHO fine" in out.stdout
    assert "Traceback" not in out.stderr


def test_unknown_agent_for_chat(gateway: Gateway) -> None:
    assert "no agent 'nope'" in failed(laneway("chat", "--model", "nope", url=gateway.url))


def test_unreachable_server_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["lanes"], ["lanes", "--watch"], ["sessions", "list"],
                 ["sessions", "show", "x"], ["sessions", "rm", "x", "--yes"], ["chat"]):
        err = failed(laneway(*args, url=url))
        assert f"cannot reach laneway at {url}" in err, args


def test_api_keys(keyed: Gateway) -> None:
    err = failed(laneway("sessions", "list", url=keyed.url))
    assert "refused the API key" in err and "LANEWAY_API_KEY" in err
    assert "refused the API key" in failed(laneway("lanes", url=keyed.url, key="wrong"))
    assert "refused the API key" in failed(laneway("chat", url=keyed.url, key="wrong",
                                                   stdin="hi\n"))

    mine, theirs = _key(), _key()
    chat(keyed.url, mine, "hi", key=ACME)
    chat(keyed.url, theirs, "hi", key=ADMIN)  # the admin's own tenant: default
    as_acme = ok(laneway("sessions", "list", "--limit", "200", url=keyed.url, key=ACME))
    assert mine in as_acme and theirs not in as_acme
    as_admin = ok(laneway("sessions", "list", "--limit", "200", "--api-key", ADMIN,
                          url=keyed.url))
    assert mine in as_admin and theirs in as_admin and "acme" in as_admin
    shown = ok(laneway("sessions", "show", mine, "--tenant", "acme", url=keyed.url, key=ADMIN))
    assert "tenant acme" in shown and "Transcript (2 messages)" in shown
    failed(laneway("sessions", "show", theirs, url=keyed.url, key=ACME))  # other tenant: 404
    out = ok(laneway("chat", mine, url=keyed.url, key=ACME, stdin="again\n"))
    assert "ECHO again :: SEEN hi | again" in out
