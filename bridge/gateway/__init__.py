"""Gateway adapters: one per AI gateway protocol, all behind bridge.gateway.base.Gateway."""
