"""The operator console in a real browser: Debian's chromium, driven by chromium-driver through Selenium.

No Asterisk here: a Bridge with the reference gateway (scripted: transcripts, a tool call) and a
call placed by ``voxbridge dial``'s client (bridge/devtools/dial.py), as Asterisk would place it.
The browser signs in with the API token and must show, from the event stream: the call live
within a second of its ``call.started``, its transcript as it grows, the tool call with its
outcome; then "Hang up" in the console ends the call, and the call's page in the history plays
its recording (the ``<audio>`` element's duration, measured by the browser, is the call's).

Screenshots go to the test's temporary directory; with VOXBRIDGE_SCREENSHOTS=1 they refresh
docs/console/ (README, "Operator console") instead — a deliberate act, so a test run never leaves
the tree changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.devtools.dial import AudioSocketCaller, tone
from bridge.devtools.gateway_sim import GatewaySim
from tests.conftest import ci_enabled
from tools.base import Tool

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
from conftest import free_port  # noqa: E402  (tests/e2e/conftest.py)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

API_KEY = "console-test-key"
TOKEN = "console-token-0123456789"
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"


class LookupOrder(Tool):
    name = "lookup_order"
    description = "looks an order up"

    async def run(self, call: Any, args: dict[str, Any]) -> str:
        await asyncio.sleep(0.15)
        return json.dumps({"order": args.get("order_id"), "status": "shipped"})


def _browser() -> Any:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        msg = "chromium and chromium-driver (Debian packages) are not installed: tests/run.sh installs them as root"
        if ci_enabled():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


async def _until(fn: Any, timeout: float, what: str) -> Any:
    """Poll the browser (off the event loop: the bridge runs on it) until ``fn()`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await asyncio.to_thread(fn)
        except StaleElementReferenceException:  # the live table is redrawn every second: look again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the console did not show {what} within {timeout} s (last: {value!r})")
        await asyncio.sleep(0.03)


@pytest.fixture
async def browser():
    drv = await asyncio.to_thread(_browser)
    yield drv
    await asyncio.to_thread(drv.quit)


async def test_console_follows_a_call_live_hangs_it_up_and_plays_its_recording(browser, tmp_path):
    shots = DOCS_SCREENSHOTS if os.environ.get("VOXBRIDGE_SCREENSHOTS") else tmp_path
    sim = GatewaySim(accepted_keys={API_KEY})
    await sim.start()
    port = free_port()
    cfg = Config.model_validate({
        "audiosocket": {"listen": "127.0.0.1:0"},
        "gateway": {"url": sim.url, "api_key": API_KEY, "settle_ms": 0},
        "api": {"listen": f"127.0.0.1:{port}", "token": TOKEN},
        "recordings": {"path": str(tmp_path / "recordings")},
        "profiles": {"default": {"tools": ["lookup_order", "end_call"], "record": True, "first_message": None}},
    })
    bridge = Bridge(cfg, tools=[LookupOrder()])
    await bridge.start()
    events = bridge.events.subscribe()
    caller = AudioSocketCaller()
    shots.mkdir(parents=True, exist_ok=True)
    try:
        drv = browser
        base = f"http://127.0.0.1:{port}"

        def find(css: str) -> list[Any]:
            return drv.find_elements(By.CSS_SELECTOR, css)

        # Sign in: the token is kept in sessionStorage only.
        await asyncio.to_thread(drv.get, base + "/console")
        await _until(lambda: find("#token") and find("#token")[0].is_displayed(), 10, "the sign-in form")

        def sign_in() -> None:
            find("#token")[0].send_keys(TOKEN)
            find("#signin-form button")[0].click()

        await asyncio.to_thread(sign_in)
        await _until(lambda: find("#stream-status.live"), 10, "the event stream connected")
        stored = await asyncio.to_thread(drv.execute_script,
                                         "return [sessionStorage.getItem('voxbridge.token'), "
                                         "localStorage.length, document.cookie]")
        assert stored == [TOKEN, 0, ""]

        # A call, placed as Asterisk would: the console shows it within a second of call.started.
        host, aport = bridge.audiosocket_address
        await caller.connect(host, aport)
        call_id = str(caller.uuid)
        started = await _next(events, "call.started")
        row = f'#live-calls tr[data-call-id="{call_id}"]'
        await _until(lambda: find(row), 5, "the live call")
        assert time.time() - started.ts < 1.0, "the live call appeared more than a second after its event"
        gw = await sim.next_session()
        await gw.wait_accepted()
        caller.say(tone(440, 1500))
        await _until(lambda: find(row + " td.state")[0].text == "active", 5,
                     "the call answered")
        await asyncio.to_thread(drv.save_screenshot, str(shots / "live-calls.png"))

        # One call, live: the transcript grows as it is spoken, within a second of each event.
        await _until(lambda: find(row)[0].click() or True, 5, "a click on the live call")
        await _until(lambda: find("#view-call") and find("#view-call")[0].is_displayed(), 5, "the call's page")
        await _until(lambda: find("#act-hangup") and find("#act-hangup")[0].is_displayed(), 5, "the actions")
        for n, (role, text) in enumerate([("assistant", "Hello, this is the order line."),
                                          ("caller", "Where is my order 4711?")], 1):
            await gw.transcript(role, text)
            ev = await _next(events, "transcript")
            await _until(lambda n=n: len(find("#transcript li")) == n, 5, f"transcript line {n}")
            assert time.time() - ev.ts < 1.0
            assert find("#transcript li")[-1].text.endswith(text)

        # A tool call: the timeline shows its arguments, then its outcome.
        result = await gw.call_tool("lookup_order", {"order_id": 4711})
        assert json.loads(result)["status"] == "shipped"
        await _until(lambda: find("#tools li .outcome-ok"), 5, "the tool call's outcome")
        tool_text = await asyncio.to_thread(lambda: find("#tools li")[0].text)
        assert "lookup_order" in tool_text and "4711" in tool_text and "ok" in tool_text
        await gw.transcript("assistant", "Order 4711 has shipped.")
        await _until(lambda: len(find("#transcript li")) == 3, 5, "transcript line 3")

        # Mid-call commands the call's backend supports are offered (AillomVox: the bridge's own
        # mute and tag), those it does not are not, and each one from the console reaches the call.
        await _until(lambda: find("#commands .cmd-mute"), 5, "the mute button")
        assert find("#commands .cmd-tags") and not find("#commands .cmd-say") and not find("#commands .cmd-context")

        def tag(text: str) -> None:
            box = find("#commands .cmd-tags input")[0]
            box.send_keys(text)
            find("#commands .cmd-tags button")[0].click()

        await asyncio.to_thread(tag, "tier=vip")
        tagged = await _next(events, "call.tagged")
        assert tagged.data["tags"] == {"tier": "vip"}
        await asyncio.to_thread(lambda: find("#commands .cmd-mute")[0].click())
        await _next(events, "call.muted")
        assert bridge.sessions[call_id].muted
        await asyncio.to_thread(lambda: find("#commands .cmd-unmute")[0].click())
        await _next(events, "call.unmuted")
        assert not bridge.sessions[call_id].muted
        await asyncio.to_thread(drv.save_screenshot, str(shots / "call-live.png"))

        # "Hang up" in the console ends the call (the caller's leg gets the hangup).
        await asyncio.to_thread(lambda: find("#act-hangup")[0].click())
        assert await caller.wait_ended(timeout=5) is not None, "the console's hang-up did not end the call"
        ended = await _next(events, "call.ended")
        assert ended.data["reason"] == "api-hangup"
        assert ended.data["recording"] == f"/v1/calls/{call_id}/recording"

        # The call's page reloads from the history, with its recording: the browser's <audio>
        # decodes the WAV (fetched with the token) and reports the call's duration.
        await _until(lambda: find("#recording-box") and find("#recording-box")[0].is_displayed(), 10,
                     "the recording player")
        duration = await _until(lambda: drv.execute_script(
            "const a = document.querySelector('#recording'); return a.readyState >= 1 ? a.duration : 0"),
            10, "the recording's duration")
        assert abs(duration - ended.data["duration_s"]) <= 0.02 + 1e-3, (duration, ended.data["duration_s"])
        await asyncio.to_thread(drv.save_screenshot, str(shots / "call-ended.png"))

        # History: the call is listed with its recording; a filter that excludes it hides it.
        await asyncio.to_thread(drv.get, base + "/console#/history")
        hist = f'#history tr[data-call-id="{call_id}"]'
        await _until(lambda: find(hist), 5, "the call in the history")
        assert find(hist + " td.end-reason")[0].text == "api-hangup"
        await asyncio.to_thread(drv.save_screenshot, str(shots / "history.png"))

        def filter_profile(name: str) -> None:
            box = find('#history-filter input[name="profile"]')[0]
            box.clear()
            box.send_keys(name)
            find("#history-filter button")[0].click()

        await asyncio.to_thread(filter_profile, "no-such-profile")
        await _until(lambda: not find(hist), 5, "the filtered history without the call")
        await asyncio.to_thread(filter_profile, "default")
        await _until(lambda: find(hist), 5, "the filtered history with the call")
        errors = [e for e in await asyncio.to_thread(drv.get_log, "browser") if e["level"] == "SEVERE"]
        assert errors == [], errors  # no CSP violation, no script error
    finally:
        # The page's event stream closes with it: the API then stops at once, not after its grace.
        await asyncio.to_thread(browser.get, "about:blank")
        events.close()
        await caller.aclose()
        await bridge.stop()
        await sim.stop()


async def _next(sub: Any, type_: str, timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            ev = await sub.get()
            if ev.type == type_:
                return ev


HOSTILE = '<img src=x onerror=window.__pwned=1>'


async def test_hostile_transcripts_and_tool_arguments_render_as_text(browser, tmp_path):
    """What callers and AIs say is data, never markup: a transcript line and a tool argument
    holding an <img onerror> show as their literal text, and the DOM gets no element from them."""
    sim = GatewaySim(accepted_keys={API_KEY})
    await sim.start()
    port = free_port()
    bridge = Bridge(Config.model_validate({
        "audiosocket": {"listen": "127.0.0.1:0"},
        "gateway": {"url": sim.url, "api_key": API_KEY, "settle_ms": 0},
        "api": {"listen": f"127.0.0.1:{port}", "token": TOKEN},
        "profiles": {"default": {"tools": ["lookup_order"], "first_message": None}},
    }), tools=[LookupOrder()])
    await bridge.start()
    caller = AudioSocketCaller()
    try:
        drv = browser

        def find(css: str) -> list[Any]:
            return drv.find_elements(By.CSS_SELECTOR, css)

        await asyncio.to_thread(drv.get, f"http://127.0.0.1:{port}/console")
        await _until(lambda: find("#token") and find("#token")[0].is_displayed(), 10, "the sign-in form")
        await asyncio.to_thread(lambda: (find("#token")[0].send_keys(TOKEN), find("#signin-form button")[0].click()))
        await _until(lambda: find("#stream-status.live"), 10, "the event stream connected")
        await caller.connect(*bridge.audiosocket_address)
        row = f'#live-calls tr[data-call-id="{caller.uuid}"]'
        gw = await sim.next_session()
        await gw.wait_accepted()
        await _until(lambda: find(row) and find(row + " td.state")[0].text == "active", 5, "the call answered")
        await _until(lambda: find(row)[0].click() or True, 5, "a click on the live call")
        await _until(lambda: find("#view-call") and find("#view-call")[0].is_displayed(), 5, "the call's page")
        await gw.transcript("caller", HOSTILE)
        await _until(lambda: find("#transcript li"), 5, "the transcript line")
        await gw.call_tool("lookup_order", {"order_id": HOSTILE})
        await _until(lambda: find("#tools li .outcome-ok"), 5, "the tool call's outcome")
        assert find("#transcript li")[-1].text.endswith(HOSTILE)
        assert HOSTILE in find("#tools li")[0].text
        found = await asyncio.to_thread(drv.execute_script,
                                        "return [document.querySelectorAll('img').length, window.__pwned || 0]")
        assert found == [0, 0], found
    finally:
        await asyncio.to_thread(browser.get, "about:blank")
        await caller.aclose()
        await bridge.stop()
        await sim.stop()


async def test_docs_load_with_a_token_and_authorize_sends_it(browser):
    """With api.token set, /docs still loads in a browser (it cannot send a bearer header for the
    page), and a call made from it after "Authorize" with the token is answered."""
    port = free_port()
    bridge = Bridge(Config.model_validate({
        "audiosocket": {"listen": "127.0.0.1:0"}, "gateway": {"demo": True},
        "api": {"listen": f"127.0.0.1:{port}", "token": TOKEN},
    }))
    await bridge.start()
    try:
        drv = browser

        def find(css: str) -> list[Any]:
            return drv.find_elements(By.CSS_SELECTOR, css)

        await asyncio.to_thread(drv.get, f"http://127.0.0.1:{port}/docs")
        title = ".swagger-ui .info .title"
        await _until(lambda: find(title) and "voxbridge" in find(title)[0].text, 10, "Swagger UI with the API's title")
        await _until(lambda: find("button.authorize"), 5, "the Authorize button")
        await asyncio.to_thread(lambda: find("button.authorize")[0].click())
        await _until(lambda: find(".modal-ux input"), 5, "the Authorize dialog")

        def authorize() -> None:
            find(".modal-ux input")[0].send_keys(TOKEN)
            find(".modal-ux button.modal-btn.authorize")[0].click()
            find(".modal-ux button.btn-done")[0].click()

        await asyncio.to_thread(authorize)
        op = '[id^="operations-"][id$="_v1_calls_get"]'
        await _until(lambda: find(op + " .opblock-summary"), 5, "GET /v1/calls")
        await asyncio.to_thread(lambda: find(op + " .opblock-summary")[0].click())
        await _until(lambda: find(op + " button.try-out__btn"), 5, "Try it out")
        await asyncio.to_thread(lambda: find(op + " button.try-out__btn")[0].click())
        await _until(lambda: find(op + " button.execute"), 5, "Execute")
        await asyncio.to_thread(lambda: find(op + " button.execute")[0].click())
        status = await _until(lambda: [e.text for e in find(op + " .live-responses-table tbody .response-col_status")],
                              10, "the response")
        assert status[0].strip().startswith("200"), status  # without the token sent: 401
    finally:
        await asyncio.to_thread(browser.get, "about:blank")
        await bridge.stop()
