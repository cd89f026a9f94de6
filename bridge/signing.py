"""The one HMAC signature voxbridge puts on what it sends: HTTP tool requests and webhook deliveries.

Both carry the same two headers (README, "HTTP tools" and "Webhook delivery")::

    X-Voxbridge-Timestamp: <unix seconds>
    X-Voxbridge-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>

so one receiver-side check serves both. The format is written here once; tools/http.py and
bridge/webhooks.py both use it.

This module is shared on purpose: it is pure (no I/O, no state, standard library only), so the
``tools`` package may import it although it never imports bridge's service modules.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "DEFAULT_TOLERANCE_S", "sign", "verify"]

TIMESTAMP_HEADER = "X-Voxbridge-Timestamp"
SIGNATURE_HEADER = "X-Voxbridge-Signature"
#: How far a timestamp may be from the receiver's clock by default (5 minutes), so a captured
#: request cannot be replayed later.
DEFAULT_TOLERANCE_S = 300

_PREFIX = "sha256="


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Voxbridge-Signature`` value: ``sha256=`` + hex HMAC-SHA256(secret, ``<timestamp>.<body>``).

    A ``str`` secret is used as its UTF-8 bytes; ``timestamp`` is the exact header value (UTF-8)
    and ``body`` the exact bytes sent.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return _PREFIX + digest


def verify(secret: str | bytes, timestamp: str, body: bytes, signature: str, *,
           tolerance_s: float | None = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """For receivers: is ``signature`` (the signature header) valid for ``body`` (the raw request
    body, exactly as received) and ``timestamp`` (the timestamp header)?

    With ``tolerance_s``, a timestamp further than that from ``now`` (default: the current time)
    is refused; ``None`` skips that check. The comparison is in constant time. Never raises on
    bad input (a missing header, a non-numeric timestamp, a body that is not bytes): it is False.
    """
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if tolerance_s is not None:
        current = time.time() if now is None else now
        if abs(current - ts) > tolerance_s:
            return False
    if not isinstance(signature, str) or not isinstance(body, (bytes, bytearray)):
        return False
    expected = sign(secret, str(timestamp), bytes(body))
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))
