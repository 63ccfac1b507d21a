"""The operator page at /ui in a real browser: Debian's headless Chromium driven by Playwright,
against a real gateway running real turns. Screenshots land in test-artifacts/.

First, the page's server side over plain HTTP: auth (header or ?key=), the static files,
the live feed's snapshots and their tenant scoping.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, StartGateway
from ops_support import chat, held_lane, request
from playwright.sync_api import Browser, Page, Playwright, Route, expect, sync_playwright
from scripted_upstream import ScriptedUpstream

ADMIN = "ui-admin"
ACME = "ui-acme"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_MS = 8000


@pytest.fixture(scope="module")
def gw(gateways: StartGateway, upstream: ScriptedUpstream) -> Gateway:
    """A gateway of its own, with keys, so the page sees only this module's turns."""
    return gateways("--upstream", upstream.url, "--admin-key", ADMIN,
                    "--api-key", f"acme={ACME}", "--queue-keepalive-s", "0.2")


def _key(prefix: str = "ui") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the server side, without a browser ------------------------------------------------------


def _first_snapshot(gw: Gateway, key: str) -> dict[str, Any]:
    url = f"{gw.url}/ui/events?key={urllib.parse.quote(key)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                snapshot: dict[str, Any] = json.loads(line[6:])
                return snapshot
    raise AssertionError("the feed ended without a snapshot")


def test_page_needs_the_key(gw: Gateway) -> None:
    status, headers, body = request(gw.url + "/ui")
    assert status == 401 and headers["content-type"].startswith("text/html")
    assert '<form method=get action="/ui">' in body and "missing API key" in body
    assert request(gw.url + "/ui?key=wrong")[0] == 401
    for status, headers, body in (request(f"{gw.url}/ui?key={ADMIN}"),
                                  request(gw.url + "/ui", key=ACME)):
        assert status == 200 and "<title>laneway · operator</title>" in body
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["referrer-policy"] == "no-referrer"
    assert request(gw.url + "/ui/events")[0] == 401
    assert request(gw.url + "/ui/events?key=wrong")[0] == 401
    assert request(gw.url + "/ui/turns?session=x")[0] == 401


def test_static_files_are_an_allowlist(gw: Gateway) -> None:
    status, headers, body = request(gw.url + "/ui/static/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert "EventSource" in body
    assert request(gw.url + "/ui/static/app.css")[0] == 200
    for name in ("index.html", "..%2Fui.py", "nope.js"):
        assert request(f"{gw.url}/ui/static/{name}")[0] == 404


def test_feed_snapshots_are_scoped_to_the_tenant(gw: Gateway) -> None:
    theirs, mine = _key(), _key()
    _, their_turn = chat(gw.url, theirs, "hello", key=ADMIN)
    _, my_turn = chat(gw.url, mine, "hello", key=ACME)
    admin = _first_snapshot(gw, ADMIN)
    assert admin["caller"] == {"tenant": "default", "admin": True}
    assert {their_turn, my_turn} <= {t["turn_id"] for t in admin["recent"]}
    assert admin["stats"]["turns"] >= 2 and sum(admin["chart"]["n"]) >= 2
    acme = _first_snapshot(gw, ACME)
    assert acme["caller"] == {"tenant": "acme", "admin": False}
    assert [t["turn_id"] for t in acme["recent"]] == [my_turn]
    _, _, turns = request(f"{gw.url}/ui/turns?session={mine}", key=ACME)
    assert [t["turn_id"] for t in turns["data"]] == [my_turn]
    assert turns["data"][0]["duration_ms"] > 0
    _, _, hidden = request(f"{gw.url}/ui/turns?session={theirs}&tenant=default", key=ACME)
    assert hidden["data"] == []
    with held_lane(gw.url, theirs, queued=1, hold_s=1.5, key=ADMIN):
        lanes = _first_snapshot(gw, ADMIN)["lanes"]
        assert [(x["session_key"], x["queue_depth"]) for x in lanes] == [(theirs, 1)]
        assert _first_snapshot(gw, ACME)["lanes"] == []


# -- in the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, gw: Gateway) -> Iterator[Page]:
    """A page that may reach only the gateway (the page must work offline) and that fails
    the test on any script error or CSP violation."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))

    def console(message: Any) -> None:
        # the sign-in page is a 401 by design; any other failure shows in the page's banner
        if message.type == "error" and "status of 401" not in message.text:
            problems.append(f"console: {message.text}")

    page.on("console", console)

    def only_the_gateway(route: Route) -> None:
        if route.request.url.startswith(gw.url + "/"):
            route.continue_()
        else:
            problems.append(f"request outside the gateway: {route.request.url}")
            route.abort()

    page.route("**/*", only_the_gateway)
    yield page
    banner = page.locator("#fatal")
    if banner.count() and banner.is_visible():
        problems.append(f"the page says: {banner.inner_text()}")
    context.close()  # closes the feed too, so the gateway can stop at once
    assert not problems, problems


def _open(page: Page, gw: Gateway, key: str = ADMIN, fragment: str = "") -> None:
    page.goto(f"{gw.url}/ui?key={key}{fragment}")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_page_loads(page: Page, gw: Gateway) -> None:
    page.goto(gw.url + "/ui")  # no key: the sign-in form
    page.fill("input[name=key]", ADMIN)
    page.click("button")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("#who")).to_have_text("admin · all tenants")
    expect(page.locator("#chart svg")).to_be_visible()
    expect(page.locator("#stat-lanes")).to_have_text("0")
    _shot(page, "ui-overview.png")


def test_a_new_turn_appears_live(page: Page, gw: Gateway) -> None:
    _open(page, gw)
    key = _key("live")
    _, turn_id = chat(gw.url, key, "appear [delay=0.3]", key=ADMIN)
    row = page.locator(f'#recent tr[data-turn-id="{turn_id}"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text(key)
    expect(row.locator(".pill")).to_have_text("ok")
    expect(page.locator(f'#sessions tr[data-session="{key}"]')).to_be_visible()
    assert int(page.locator("#chart svg").get_attribute("data-points") or 0) >= 1
    expect(page.locator("#chart polyline, #chart circle").first).to_be_attached()
    _shot(page, "ui-new-turn.png")


def test_a_queued_lane_shows_its_depth(page: Page, gw: Gateway) -> None:
    _open(page, gw)
    key = _key("busy")
    with held_lane(gw.url, key, queued=2, hold_s=4, key=ADMIN):
        row = page.locator(f'#lanes tr[data-session="{key}"]')
        expect(row.locator("td[data-depth]")).to_have_attribute("data-depth", "2")
        expect(row).to_contain_text("running")
        expect(page.locator("#stat-waiting")).to_have_text("2")
        expect(row.locator("td.wait-cell")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))
        _shot(page, "ui-queued-lane.png")
    expect(page.locator(f'#lanes tr[data-session="{key}"]')).to_have_count(0)
    expect(page.locator("#lanes-empty")).to_be_visible()
    rows = page.locator(f'#recent tr:has(a:text-is("{key}"))')
    expect(rows).to_have_count(3)
    waits = [row.locator("td").nth(4).inner_text() for row in rows.all()]
    assert sorted(w.endswith(" s") for w in waits) == [False, True, True], waits


def test_a_session_transcript_renders(page: Page, gw: Gateway) -> None:
    key = _key("talk")
    _, first = chat(gw.url, key, 'note this [call=memory_save {"text": "Ann likes tea", '
                    '"pinned": true}]', key=ADMIN)
    _, second = chat(gw.url, key, "what do I like?", key=ADMIN)
    _open(page, gw)
    page.fill("#search", key[-6:])  # search: only the matching session stays
    rows = page.locator("#sessions tbody tr")
    expect(rows).to_have_count(1)
    rows.locator("a").click()
    expect(page.locator("#s-title")).to_have_text(f"Session {key}")
    messages = page.locator("#transcript li")
    expect(messages).to_have_count(6)
    call = page.locator('#transcript .call[data-tool="memory_save"]')
    expect(call).to_contain_text('"text": "Ann likes tea"')
    expect(call).to_contain_text('"pinned": true')
    expect(page.locator('#transcript li[data-role="tool"]')).to_contain_text("memory_save")
    expect(page.locator('#transcript li[data-role="tool"] pre')).to_have_text("saved")
    expect(messages.last).to_contain_text("ECHO what do I like?")
    expect(page.locator("#memories li")).to_contain_text("Ann likes tea")
    expect(page.locator("#memories .pill")).to_have_text("pinned")
    for turn_id in (first, second):
        expect(page.locator(f'#s-turns tr[data-turn-id="{turn_id}"]')).to_contain_text("ok")
    _shot(page, "ui-session.png")


def test_a_tenant_key_sees_only_its_tenant(page: Page, gw: Gateway) -> None:
    theirs, mine = _key("other"), _key("acme")
    chat(gw.url, theirs, "hi", key=ADMIN)
    chat(gw.url, mine, "hi", key=ACME)
    _open(page, gw, key=ACME)
    expect(page.locator("#who")).to_have_text("tenant acme")
    expect(page.locator(f'#sessions tr[data-session="{mine}"]')).to_be_visible()
    expect(page.locator(f'#sessions tr[data-session="{theirs}"]')).to_have_count(0)
    expect(page.locator(f'#recent tr:has(a:text-is("{theirs}"))')).to_have_count(0)
