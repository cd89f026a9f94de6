"""Which gateway adapter a call gets: the configured AillomVox gateway (bridge/gateway/aillomvox.py).

One per bridge, called once per call with the call's id. A second AI protocol is a second
adapter behind :class:`~bridge.gateway.base.Gateway` chosen here, with no change to the session.
Embedding code and tests may install their own factory (:attr:`GatewayFactory.override`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import Config
from .aillomvox import AillomVoxGateway
from .base import Gateway

#: The key the embedded reference gateway accepts (it is loopback-only and for demos).
DEMO_API_KEY = "demo"


class GatewayFactory:
    def __init__(self, config: Config, override: Callable[[Any], Gateway] | None = None) -> None:
        self.config = config
        #: Called instead of building an adapter from the configuration (with the call).
        self.override = override
        #: The gateway's URL: ``gateway.url``, or the embedded demo gateway's once it is started.
        self.url: str | None = config.gateway.url
        #: The embedded demo gateway answers at once: no settling wait for it.
        self.demo = False

    def __call__(self, call: Any) -> Gateway:
        if self.override is not None:
            return self.override(call)
        g = self.config.gateway
        assert self.url is not None
        key = g.api_key.get_secret_value() if g.api_key else DEMO_API_KEY
        return AillomVoxGateway(
            self.url, key, api_key_in_query=g.api_key_in_query, connect_timeout=g.connect_timeout,
            settle_ms=0 if self.demo else g.settle_ms, settle_buffer_ms=g.settle_buffer_ms,
            keepalive_interval=g.keepalive_interval, keepalive_timeout=g.keepalive_timeout,
            call_id=call.call_id,
        )
