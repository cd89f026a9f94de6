"""The silence watchdog's core (bridge/silence.py) and its configuration (profile ``silence``)."""

from __future__ import annotations

import math
import re
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import SAY_PROTOCOLS, Config, ConfigError, load_config
from bridge.gateway.aillomvox import AillomVoxGateway
from bridge.gateway.aivoco import AivocoGateway
from bridge.gateway.generic_ws import GenericWsGateway
from bridge.gateway.openai_realtime import OpenAIRealtimeGateway
from bridge.silence import EnergyGate, SilenceWatchdog, frame_dbfs


def frame(level: float, n: int = 160) -> bytes:
    """One 20 ms frame (8 kHz) of a 440 Hz tone at ``level`` (0..1 of full scale)."""
    t = np.arange(n) / 8000
    return (np.sin(2 * np.pi * 440 * t) * level * 32767).astype("<i2").tobytes()


# --------------------------------------------------------------------------- levels and the gate


def test_frame_dbfs() -> None:
    assert frame_dbfs(b"") == -math.inf
    assert frame_dbfs(bytes(320)) == -math.inf
    assert frame_dbfs(frame(1.0)) == pytest.approx(-3.0, abs=0.1)  # a full-scale sine is -3 dBFS RMS
    assert frame_dbfs(frame(0.01)) == pytest.approx(-43.0, abs=0.2)


def test_gate_needs_a_run_of_loud_frames_and_a_hangover_to_stop() -> None:
    gate = EnergyGate(-40.0, start_frames=3, hangover_frames=5)
    loud, quiet = frame(0.3), frame(0.001)
    assert [gate.feed(loud), gate.feed(quiet), gate.feed(loud), gate.feed(loud)] == [None] * 4  # a click is not speech
    assert gate.feed(loud) == "start" and gate.speaking
    assert [gate.feed(quiet) for _ in range(4)] == [None] * 4  # a pause between words
    assert gate.feed(loud) is None  # speech again: the hangover restarts
    assert [gate.feed(quiet) for _ in range(5)] == [None] * 4 + ["stop"]
    assert not gate.speaking


def test_gate_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="threshold_dbfs"):
        EnergyGate(5.0)
    with pytest.raises(ValueError, match="at least 1"):
        EnergyGate(-40.0, start_frames=0)


# --------------------------------------------------------------------------- the watchdog's stages


def test_detects_after_the_timeout_then_hangs_up_after_the_second() -> None:
    wd = SilenceWatchdog(5.0, 3.0, now=100.0)
    assert wd.wait_s(100.0) == 5.0
    assert wd.poll(104.9) is None
    assert wd.silent_s(104.9) == pytest.approx(4.9)
    assert wd.poll(105.0) == "detected"
    assert wd.wait_s(105.0) == 3.0  # the second stage counts from the check-in
    wd.ai_speaking_until(106.0)  # the check-in itself is heard until 106
    assert wd.poll(108.5) is None
    assert wd.poll(109.0) == "hangup"
    assert wd.done and wd.poll(200.0) is None


def test_caller_speech_rearms_and_nothing_is_counted_while_they_speak() -> None:
    wd = SilenceWatchdog(5.0, 3.0, now=0.0)
    assert wd.poll(5.0) == "detected"
    wd.caller_speech(6.0, started=True)
    assert not wd.checked
    assert wd.poll(60.0) is None and wd.silent_s(60.0) == 0.0  # speaking for a long time is not silence
    wd.caller_speech(61.0, started=False)
    assert wd.poll(65.9) is None
    assert wd.poll(66.0) == "detected"  # the full timeout again, not the hang-up stage


def test_the_ai_speaking_is_not_the_caller_being_silent() -> None:
    wd = SilenceWatchdog(5.0, None, now=0.0)
    wd.ai_speaking_until(20.0)  # a long answer queued at 1 s plays until 20 s
    assert wd.poll(19.0) is None and wd.poll(24.9) is None
    assert wd.wait_s(10.0) == pytest.approx(15.0)
    assert wd.poll(25.0) == "detected"


def test_without_a_hangup_the_check_in_repeats() -> None:
    wd = SilenceWatchdog(2.0, None, now=0.0)
    assert [wd.poll(t) for t in (2.0, 3.9, 4.0, 6.0)] == ["detected", None, "detected", "detected"]
    assert not wd.done


def test_muted_caller_counts_as_present() -> None:
    wd = SilenceWatchdog(2.0, 1.0, now=0.0)
    wd.caller_active(1.5)
    assert wd.poll(3.0) is None and wd.poll(3.5) == "detected"


@given(st.lists(st.tuples(st.sampled_from(["speak", "stop", "ai", "poll"]), st.floats(0, 5)), max_size=60))
def test_never_fires_early_nor_while_the_caller_speaks(steps: list[tuple[str, float]]) -> None:
    """Whatever happens, "detected" comes only after timeout_s of quiet on both sides, "hangup" only
    after a check-in and hangup_after_s more, and neither while the caller is speaking."""
    wd = SilenceWatchdog(2.0, 1.0, now=0.0)
    now, quiet_since, speaking, checked = 0.0, 0.0, False, False
    for what, dt in steps:
        now += dt
        if what == "speak":
            wd.caller_speech(now, True)
            speaking, quiet_since, checked = True, max(quiet_since, now), False
        elif what == "stop":
            wd.caller_speech(now, False)
            speaking, quiet_since, checked = False, max(quiet_since, now), False
        elif what == "ai":
            wd.ai_speaking_until(now + dt)
            quiet_since = max(quiet_since, now + dt)
        else:
            got = wd.poll(now)
            if got is not None:
                assert not speaking
                assert now - quiet_since >= (1.0 if checked else 2.0) - 1e-9
                assert got == ("hangup" if checked else "detected")
                if got == "detected":
                    checked, quiet_since = True, now
                else:
                    return


# --------------------------------------------------------------------------- configuration


def write_wav(path: Path, channels: int = 1, width: int = 2, frames: int = 800) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(bytes(frames * channels * width))
    return path


def cfg(silence: Any, protocol: str | None = "openai-realtime") -> dict[str, Any]:
    profile: dict[str, Any] = {"silence": silence}
    data: dict[str, Any] = {"profiles": {"default": profile}}
    if protocol is not None:
        data["gateways"] = {"ai": {"protocol": protocol, "url": "ws://127.0.0.1:1/", "api_key": "k"}}
        profile["gateway"] = "ai"
    return data


def errors_of(data: dict[str, Any], tmp_path: Path) -> str:
    import yaml

    path = tmp_path / "voxbridge.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return str(info.value)


def test_valid_silence_settings(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "hello.wav")
    c = Config.model_validate(cfg({"timeout_s": 8, "action": "play", "wav": str(wav), "hangup_after_s": 6},
                                  "aillomvox"))
    s = c.profiles["default"].silence
    assert s is not None and s.action == "play" and s.hangup_after_s == 6 and s.energy_threshold_dbfs == -40
    c = Config.model_validate(cfg({"timeout_s": 10}))
    assert c.profiles["default"].silence.prompt_text == "Are you still there?"  # type: ignore[union-attr]
    assert Config.model_validate({}).profiles["default"].silence is None


@pytest.mark.parametrize("silence, protocol, message", [
    ({}, "openai-realtime", r"profiles\.default\.silence\.timeout_s.*required"),
    ({"timeout_s": 1}, "openai-realtime", r"profiles\.default\.silence\.timeout_s.*greater than or equal to 2"),
    ({"timeout_s": 5, "action": "shout"}, "openai-realtime", r"profiles\.default\.silence\.action"),
    ({"timeout_s": 5, "action": "play"}, "openai-realtime", r"profiles\.default\.silence.*'play' needs 'wav'"),
    ({"timeout_s": 5, "hangup_after_s": 0}, "openai-realtime", r"profiles\.default\.silence\.hangup_after_s"),
    ({"timeout_s": 5, "prompt_text": ""}, "openai-realtime", r"profiles\.default\.silence\.prompt_text"),
    ({"timeout_s": 5, "volume": 3}, "openai-realtime", r"profiles\.default\.silence\.volume"),
    ({"timeout_s": 5}, "aillomvox", (r"profiles\.default\.silence\.action: 'prompt' needs an AI backend .* "
                                    r"gateway 'ai' speaks aillomvox: use action 'play'")),
    ({"timeout_s": 5}, "aivoco", r"profiles\.default\.silence\.action: .*speaks aivoco"),
    ({"timeout_s": 5}, None, r"profiles\.default\.silence\.action: .*the default gateway speaks aillomvox"),
])
def test_silence_config_errors_name_the_key(tmp_path: Path, silence: Any, protocol: str | None, message: str) -> None:
    assert re.search(message, errors_of(cfg(silence, protocol), tmp_path), re.S)


def test_the_wav_must_exist_and_be_mono_16_bit(tmp_path: Path) -> None:
    missing = errors_of(cfg({"timeout_s": 5, "action": "play", "wav": str(tmp_path / "nope.wav")}), tmp_path)
    assert "profiles.default.silence.wav" in missing and "no such file" in missing
    stereo = write_wav(tmp_path / "stereo.wav", channels=2)
    assert "must be mono 16-bit PCM (it has 2 channel(s) of 16 bits)" in errors_of(
        cfg({"timeout_s": 5, "action": "play", "wav": str(stereo)}), tmp_path)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav at all")
    assert "is not a readable WAV file" in errors_of(cfg({"timeout_s": 5, "action": "play", "wav": str(junk)}),
                                                     tmp_path)
    empty = write_wav(tmp_path / "empty.wav", frames=0)
    assert "holds no audio" in errors_of(cfg({"timeout_s": 5, "action": "play", "wav": str(empty)}), tmp_path)


def test_say_protocols_agree_with_the_adapters() -> None:
    adapters = {"aillomvox": AillomVoxGateway, "generic-ws": GenericWsGateway, "aivoco": AivocoGateway,
                "openai-realtime": OpenAIRealtimeGateway}
    assert sorted(p for p, cls in adapters.items() if "say" in cls.capabilities) == sorted(SAY_PROTOCOLS)
