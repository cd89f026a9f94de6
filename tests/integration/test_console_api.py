"""Recordings, history filters, the console's files and /docs, over real sockets.

bridge/recording.py, bridge/store.py (filters) and bridge/api.py (routes).
"""

from __future__ import annotations

import asyncio
import datetime
import io
import re
import wave

import httpx
import numpy as np
import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.devtools.dial import AudioSocketCaller, tone
from bridge.devtools.gateway_sim import GatewaySim
from bridge.store import CallStore
from tests.integration.conftest import API_KEY

TOKEN = "console-api-token-0123456789"


def _power(x: np.ndarray, rate: int, hz: float) -> float:
    """Energy of ``x`` at ``hz`` (a single DFT bin, Hann-windowed)."""
    w = x * np.hanning(x.size)
    n = np.arange(x.size)
    return float(abs(np.sum(w * np.exp(-2j * np.pi * hz * n / rate))) ** 2)


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_a_recorded_call_is_a_stereo_wav_caller_left_ai_right_as_long_as_the_call(tmp_path, rate):
    sim = GatewaySim(accepted_keys={API_KEY}, echo=False)
    await sim.start()
    bridge = Bridge(Config.model_validate({
        "audiosocket": {"listen": "127.0.0.1:0"}, "api": {"listen": "127.0.0.1:0", "token": TOKEN},
        "gateway": {"url": sim.url, "api_key": API_KEY, "settle_ms": 0},
        "recordings": {"path": str(tmp_path)},
        "profiles": {"default": {"record": True, "first_message": None}},
    }))
    await bridge.start()
    events = bridge.events.subscribe()
    caller = AudioSocketCaller()
    try:
        await caller.connect(*bridge.audiosocket_address, sample_rate=rate)
        gw = await sim.next_session()
        await gw.wait_accepted()
        caller.say(tone(440, 1000, rate))  # the caller: 440 Hz
        await asyncio.sleep(1.2)
        await gw.say(tone_hz=1000, ms=1000)  # then the AI: 1000 Hz
        await asyncio.sleep(1.3)
        session = bridge.sessions[str(caller.uuid)]
        session.end("test-done")
        async with asyncio.timeout(5):
            while (ev := await events.get()).type != "call.ended":
                pass
        url = f"http://127.0.0.1:{bridge.api.port}{ev.data['recording']}"
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).status_code == 401  # token auth, like the rest of the API
            res = await http.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 200 and res.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(res.content)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, rate)
            frames = w.getnframes()
            pcm = np.frombuffer(w.readframes(frames), "<i2").reshape(-1, 2).astype(np.float64)
        # As long as the call, within a frame (20 ms).
        assert abs(frames / rate - ev.data["duration_s"]) <= 0.02, (frames / rate, ev.data["duration_s"])
        left, right = pcm[:, 0], pcm[:, 1]
        # The caller on the left only, the AI on the right only, each at its own time.
        assert _power(left, rate, 440) > 1000 * _power(left, rate, 1000)
        assert _power(right, rate, 1000) > 1000 * _power(right, rate, 440)
        loud_l = np.flatnonzero(np.abs(left) > 3000) / rate
        loud_r = np.flatnonzero(np.abs(right) > 3000) / rate
        assert loud_l.size and loud_r.size
        assert loud_l.max() < loud_r.min(), "the AI spoke after the caller: the channels are not time-aligned"
        assert 0.9 <= loud_l.max() - loud_l.min() <= 1.1 and 0.9 <= loud_r.max() - loud_r.min() <= 1.1
        health = (await httpx.AsyncClient().get(f"http://127.0.0.1:{bridge.api.port}/v1/health")).json()
        assert health["recordings"]["files"] == 1 and health["recordings"]["total_bytes"] == len(res.content)
    finally:
        events.close()
        await caller.aclose()
        await bridge.stop()
        await sim.stop()


async def test_recordings_beyond_the_disk_bound_or_the_retention_are_removed_oldest_first(tmp_path):
    import os
    import time

    from bridge.recording import Recordings

    now = time.time()
    for i, age_days in enumerate([100, 3, 2, 1]):  # 100 days: past a 90-day retention
        p = tmp_path / f"call-{i}.wav"
        p.write_bytes(bytes(1000))
        os.utime(p, (now - age_days * 86400, now - age_days * 86400))
    rec = Recordings(tmp_path, max_total_bytes=2500, retention_days=90)
    await rec.start()
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["call-2.wav", "call-3.wav"]
        assert rec.health()["files"] == 2 and rec.health()["total_bytes"] == 2000 and rec.removed == 2
    finally:
        await rec.close()


async def test_history_filters_match_exactly_and_bad_values_are_named(tmp_path):
    from bridge.events import Event

    store = CallStore(None)
    await store.start()
    day = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC).timestamp()
    for i, (caller, profile, reason) in enumerate([("100", "sales", "caller-hangup"), ("200", "sales", "api-hangup"),
                                                   ("100", "support", "api-hangup")]):
        store.record(Event("call.started", f"c{i}", {"caller": caller, "profile": profile}, ts=day + i * 86400))
        store.record(Event("call.ended", f"c{i}", {"reason": reason, "duration_s": 1.0}, ts=day + i * 86400 + 1))

    async def ids(**kw):
        return [c["call_id"] for c in await store.list_calls(**kw)]

    try:
        assert await ids(caller="100") == ["c2", "c0"]
        assert await ids(caller="10") == []  # exact, not a prefix
        assert await ids(profile="sales", end_reason="api-hangup") == ["c1"]
        assert await ids(since="2026-11-02", until="2026-11-03T00:00:00Z") == ["c1"]
        assert await ids(since="2026-11-02T01:00:00+01:00") == ["c2", "c1"]  # a zone is honoured
        assert await ids(state="ended", limit=1, offset=1) == ["c1"]
        with pytest.raises(ValueError, match="since must be an ISO-8601"):
            await store.list_calls(since="yesterday")
    finally:
        await store.close()


@pytest.fixture
async def api_bridge():
    bridge = Bridge(Config.model_validate({
        "audiosocket": {"listen": "127.0.0.1:0"}, "api": {"listen": "127.0.0.1:0", "token": TOKEN},
        "gateway": {"demo": True},
    }))
    await bridge.start()
    yield f"http://127.0.0.1:{bridge.api.port}"
    await bridge.stop()


async def test_history_filters_over_the_api_and_bad_values_are_a_422_naming_the_parameter(api_bridge):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=api_bridge, headers=auth) as http:
        ok = await http.get("/v1/calls", params={"caller": "100", "profile": "default", "end_reason": "x",
                                                 "since": "2026-11-01", "until": "2026-11-02T00:00:00Z"})
        assert ok.status_code == 200 and ok.json() == {"calls": []}
        bad = await http.get("/v1/calls", params={"until": "tomorrow"})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("until must be an ISO-8601")
        ctl = await http.get("/v1/calls", params={"caller": "1\n2"})
        assert ctl.status_code == 422 and "caller" in str(ctl.json()["detail"])
        missing = await http.get("/v1/calls/nope/recording")
        assert missing.status_code == 404 and "no recording of call nope" in missing.json()["detail"]


async def test_console_is_served_with_a_strict_csp_and_without_the_token_but_data_needs_it(api_bridge):
    async with httpx.AsyncClient(base_url=api_bridge) as http:
        page = await http.get("/console")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in page.text  # no inline script: the CSP forbids it
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            res = await http.get(f"/console/{name}")
            assert res.status_code == 200 and res.headers["content-type"].startswith(kind)
        assert (await http.get("/console/../v1/calls")).status_code in (401, 404)
        assert (await http.get("/console/nothing.js")).status_code == 404
        assert (await http.get("/v1/calls")).status_code == 401
        assert "sessionStorage" in (await http.get("/console/app.js")).text


async def test_docs_reference_no_external_host_and_their_assets_load(api_bridge):
    async with httpx.AsyncClient(base_url=api_bridge, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        docs = await http.get("/docs")
        assert docs.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", docs.text)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert "http://" not in docs.text and "https://" not in docs.text
        for u in urls:
            res = await http.get(u)
            assert res.status_code == 200, u
        js = await http.get("/docs-assets/swagger-ui-bundle.js")
        assert len(js.content) > 100_000 and js.headers["content-type"].startswith("text/javascript")


async def _recorded_bridge(tmp_path, sim: GatewaySim) -> Bridge:
    bridge = Bridge(Config.model_validate({
        "audiosocket": {"listen": "127.0.0.1:0"}, "api": {"listen": "127.0.0.1:0", "token": TOKEN},
        "gateway": {"url": sim.url, "api_key": API_KEY, "settle_ms": 0},
        "store": {"path": str(tmp_path / "calls.db")},
        "recordings": {"path": str(tmp_path / "rec")},
        "profiles": {"default": {"record": True, "first_message": None}},
    }))
    await bridge.start()
    return bridge


async def test_a_teardown_crash_still_completes_the_recording(tmp_path):
    """The session's last-resort release (its teardown task crashed) completes the recording too:
    no file left open and counted as being written for the rest of the bridge's life."""
    sim = GatewaySim(accepted_keys={API_KEY}, echo=False)
    await sim.start()
    bridge = await _recorded_bridge(tmp_path, sim)
    caller = AudioSocketCaller()
    try:
        await caller.connect(*bridge.audiosocket_address)
        gw = await sim.next_session()
        await gw.wait_accepted()
        caller.say(tone(440, 400))
        await caller.wait_spoken(5)
        session = bridge.sessions[str(caller.uuid)]
        rec = session.recorder
        assert rec is not None and bridge.recordings.health()["recording"] == 1

        async def crash() -> None:
            raise RuntimeError("a teardown bug")

        session._finish = crash  # the teardown task crashes: _release_now runs instead
        session.end("test-done")
        await asyncio.wait_for(session.ended.wait(), 5)
        await asyncio.wait_for(rec.done, 5)
        assert bridge.recordings.health()["recording"] == 0
        with wave.open(str(rec.path)) as w:
            assert w.getnchannels() == 2 and w.getnframes() > 0
    finally:
        await caller.aclose()
        await gw.hangup()
        await bridge.stop()
        await sim.stop()


async def test_the_history_looks_recordings_up_off_the_event_loop(tmp_path, monkeypatch):
    """A history page is up to 500 calls: whether each has a recording is one directory listing in
    a thread, never a stat per call on the event loop; the links are right either way."""
    import pathlib
    import threading

    sim = GatewaySim(accepted_keys={API_KEY}, echo=False)
    await sim.start()
    bridge = await _recorded_bridge(tmp_path, sim)
    try:
        from bridge.events import Event

        for i in range(40):
            bridge.store.record(Event("call.started", f"hist-{i}", {"caller": "100", "profile": "default"}))
            bridge.store.record(Event("call.ended", f"hist-{i}", {"reason": "x", "duration_s": 1.0}))
        for i in range(0, 40, 3):
            (tmp_path / "rec" / f"hist-{i}.wav").write_bytes(bytes(44))
        loop_thread = threading.current_thread()
        on_loop: list[str] = []
        real_is_file, real_stat = pathlib.Path.is_file, pathlib.Path.stat

        def is_file(self, *a, **k):
            if threading.current_thread() is loop_thread and self.suffix == ".wav":
                on_loop.append(f"is_file {self.name}")
            return real_is_file(self, *a, **k)

        def stat(self, *a, **k):
            if threading.current_thread() is loop_thread and self.suffix == ".wav":
                on_loop.append(f"stat {self.name}")
            return real_stat(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "is_file", is_file)
        monkeypatch.setattr(pathlib.Path, "stat", stat)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.api.port}", headers=auth) as http:
            async with asyncio.timeout(5):
                while len((await http.get("/v1/calls", params={"limit": 100})).json()["calls"]) < 40:
                    await asyncio.sleep(0.05)
            calls = (await http.get("/v1/calls", params={"limit": 100})).json()["calls"]
            one = (await http.get("/v1/calls/hist-3")).json()
            none = (await http.get("/v1/calls/hist-4")).json()
        links = {c["call_id"]: c["recording"] for c in calls}
        assert links == {f"hist-{i}": f"/v1/calls/hist-{i}/recording" if i % 3 == 0 else None for i in range(40)}
        assert one["recording"] == "/v1/calls/hist-3/recording" and none["recording"] is None
        assert on_loop == []
    finally:
        await bridge.stop()
        await sim.stop()
