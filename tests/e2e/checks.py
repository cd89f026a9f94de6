"""What the real-Asterisk tests of both ways in (AudioSocket, ARI) look at the same way."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from .ami_client import AmiClient


async def session_for(bridge: Any, call_id: str, timeout: float = 10) -> Any:
    """The bridge's session of ``call_id`` once its gateway is connected."""
    async with asyncio.timeout(timeout):
        while call_id not in bridge.sessions or bridge.sessions[call_id].gateway is None:
            await asyncio.sleep(0.02)
    return bridge.sessions[call_id]


def heard_tone(pcm: bytes, hz: int) -> np.ndarray:
    """Indices of the 20 ms frames of an 8 kHz recording where ``hz`` stands out (MixMonitor mixes
    both directions: this finds the bridge's tone among the caller's own sound)."""
    x = np.frombuffer(pcm, "<i2").astype(float)
    frames = x[: len(x) // 160 * 160].reshape(-1, 160)
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(160), axis=1))
    b = round(hz / 50)
    return np.where(spectrum[:, b] > 50 * np.median(spectrum[:, b] + 1))[0]


async def dtmf_heard(ami: AmiClient, since: int, count: int, timeout: float = 5) -> list[str]:
    """The next ``count`` digits Asterisk reports (DTMFEnd) after event index ``since``."""
    digits = []
    async with asyncio.timeout(timeout):
        while len(digits) < count:
            ev = await ami.wait_event(lambda e: e.get("Event") == "DTMFEnd", since=since, timeout=timeout)
            since = ami.events.index(ev) + 1
            digits.append(ev["Digit"])
    return digits
