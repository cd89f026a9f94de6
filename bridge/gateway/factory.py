"""Which gateway adapter a call gets: the one its profile names, built from the configuration.

A profile with ``gateway: <name>`` gets the entry of that name in ``gateways`` (its ``protocol``
picks the adapter: ``aillomvox``, ``generic-ws``, ``aivoco``, ``openai-realtime``); a profile
with none gets the ``gateway`` section (AillomVox, or the embedded demo). One factory per bridge,
called once per call, and once before that for the call's early connection
(:meth:`GatewayFactory.speculative`). A further protocol is one more adapter behind
:class:`~bridge.gateway.base.Gateway` and one more branch in :meth:`GatewayFactory.build`,
with no change to the session. Embedding code and tests may install their own factory
(:attr:`GatewayFactory.override`).

Adapters are imported when first used: a bridge that speaks only AillomVox never loads the
Socket.IO client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..config import (
    AillomVoxGatewayConfig,
    AivocoGatewayConfig,
    Config,
    GenericWsGatewayConfig,
    NamedGateway,
    OpenAIRealtimeGatewayConfig,
    Profile,
    VadConfig,
)
from .aillomvox import AillomVoxGateway
from .base import Gateway

log = logging.getLogger("voxbridge.gateway")

#: The key the embedded reference gateway accepts (it is loopback-only and for demos).
DEMO_API_KEY = "demo"

#: The VAD mode each protocol gets when its ``vad.mode`` is unset: what its service can do.
DEFAULT_VAD_MODE = {"generic-ws": "server", "aivoco": "local", "openai-realtime": "server"}


def vad_settings(vad: VadConfig, protocol: str) -> Any:
    """The adapter's view of a gateway's ``vad`` section (bridge/vad.py's VadSettings).

    ``engine: auto`` is Silero, the detector the measurement chose (README, "AI backends"), when
    it is installed, else webrtcvad, with a warning once per process: it fires on line noise and
    music on hold, so a noisy line gets false barge-ins.
    """
    from ..vad import VadSettings, silero_model_path

    engine: Any = vad.engine
    if engine == "auto":
        try:
            silero_model_path()
            import onnxruntime  # noqa: F401 - present, or webrtcvad it is
            engine = "silero"
        except Exception:  # noqa: BLE001 - VadUnavailable, ImportError: the fallback is the point
            engine = "webrtcvad"
            global _WARNED_WEBRTC
            if not _WARNED_WEBRTC:
                _WARNED_WEBRTC = True
                log.warning("local VAD: Silero is not installed (pip install 'voxbridge[silero]' && pip install "
                            "--no-deps silero-vad); using webrtcvad, which mistakes line noise and music for speech")
    mode: Any = vad.mode or DEFAULT_VAD_MODE[protocol]
    return VadSettings(mode=mode, engine=engine, threshold=vad.threshold,
                       silence_duration_ms=vad.silence_duration_ms, prefix_padding_ms=vad.prefix_padding_ms,
                       tonal=vad.tonal_onset)


_WARNED_WEBRTC = False


class GatewayFactory:
    def __init__(self, config: Config, override: Callable[[Any], Gateway] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        #: Called instead of building an adapter from the configuration (with the call).
        self.override = override
        #: The default gateway's URL: ``gateway.url``, or the embedded demo gateway's once it is started.
        self.url: str | None = config.gateway.url
        #: The embedded demo gateway answers at once: no settling wait for it.
        self.demo = False
        self._env = env

    def prepare(self) -> None:
        """At start-up: load what the first call would otherwise wait for (the Silero VAD model,
        ~0.1 s on the event loop) for every named gateway a profile uses with local VAD."""
        used = {p.gateway for p in self.config.profiles.values() if p.gateway is not None}
        for name in sorted(used):
            g = self.config.gateways[name]
            if g.protocol == "aillomvox":
                continue
            settings = vad_settings(g.vad, g.protocol)
            if settings.mode == "local" and settings.engine == "silero":
                from ..vad import silero_session

                silero_session()
                log.info("gateway %s: local VAD (Silero) loaded", name)

    def __call__(self, call: Any) -> Gateway:
        if self.override is not None:
            return self.override(call)
        name = call.profile.gateway
        if name is None:
            return self._default(call.call_id)
        return self.build(self.config.gateways[name], call.call_id)

    def speculative(self, call: Any, profile: Profile) -> Gateway | None:
        """The adapter ``call`` gets if its settings leave it ``profile`` (the default one, or the
        one an API request or the ingress already named), built now so that its connection can be
        opened (:meth:`Gateway.preconnect`) while the settings are resolved. None when there is
        nothing to open early: the gateway's ``preconnect`` is off, its protocol cannot (aivoco's
        Socket.IO session is the start_call itself), or a custom factory (:attr:`override`) builds
        the adapters — it alone knows what an extra one would cost."""
        if self.override is not None:
            return None
        name = profile.gateway
        if name is None:
            if not self.config.gateway.preconnect or self.url is None:
                return None
            return self._default(call.call_id)
        g = self.config.gateways[name]
        if isinstance(g, AivocoGatewayConfig) or not g.preconnect:
            return None
        return self.build(g, call.call_id)

    def _default(self, call_id: str) -> Gateway:
        g = self.config.gateway
        assert self.url is not None
        key = g.api_key.get_secret_value() if g.api_key else DEMO_API_KEY
        return AillomVoxGateway(
            self.url, key, api_key_in_query=g.api_key_in_query, connect_timeout=g.connect_timeout,
            settle_ms=0 if self.demo else g.settle_ms, settle_buffer_ms=g.settle_buffer_ms,
            keepalive_interval=g.keepalive_interval, keepalive_timeout=g.keepalive_timeout,
            call_id=call_id,
        )

    def build(self, g: NamedGateway, call_id: str) -> Gateway:
        """A new adapter for the named gateway ``g``."""
        key = g.credential(self._env)
        ci, ct, ki, kt = call_id, g.connect_timeout, g.keepalive_interval, g.keepalive_timeout
        if isinstance(g, AillomVoxGatewayConfig):
            return AillomVoxGateway(g.url, key or "", api_key_in_query=g.api_key_in_query, settle_ms=g.settle_ms,
                                    settle_buffer_ms=g.settle_buffer_ms, connect_timeout=ct,
                                    keepalive_interval=ki, keepalive_timeout=kt, call_id=ci)
        if isinstance(g, GenericWsGatewayConfig):
            from .generic_ws import GenericWsGateway

            return GenericWsGateway(g.url, token=key, audio_format=g.audio_format, sample_rate=g.sample_rate,
                                    ready_timeout=g.ready_timeout, vad=vad_settings(g.vad, g.protocol),
                                    connect_timeout=ct, keepalive_interval=ki, keepalive_timeout=kt, call_id=ci)
        if isinstance(g, AivocoGatewayConfig):
            from .aivoco import AivocoGateway

            return AivocoGateway(g.url, key or "", output_rate=g.output_rate, vad=vad_settings(g.vad, g.protocol),
                                 connect_timeout=g.connect_timeout, call_id=call_id)
        if isinstance(g, OpenAIRealtimeGatewayConfig):
            from .openai_realtime import OpenAIRealtimeGateway

            return OpenAIRealtimeGateway(g.url, key or "", model=g.model, transcription_model=g.transcription_model,
                                         vad=vad_settings(g.vad, g.protocol), connect_timeout=ct,
                                         keepalive_interval=ki, keepalive_timeout=kt, call_id=ci)
        raise AssertionError(f"no adapter for protocol {g.protocol!r}")  # config.py's union is exhaustive
