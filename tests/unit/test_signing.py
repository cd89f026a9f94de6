"""bridge/signing.py: the one signer of HTTP tool requests and webhook deliveries.

The expected signatures below were computed with the two implementations this module replaced
(``tools/http.py`` and ``bridge/webhooks.py`` each had a ``sign``): the wire format must not move.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

import bridge.webhooks
import tools.http
from bridge import signing
from bridge.config import ToolConfig
from bridge.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify

BODY = '{"tool_call_id":"tc-1","args":{"order_id":"A-1001"},"name":"Zoë"}'.encode()
TS = "1700000000"
#: Both former implementations, for (secret, TS, BODY):
GOLDEN = {
    "s3cret-ключ": "sha256=ae552bb8a4276ec1766094f3d959127a50efffd08974e8575e74d9afac5bab4f",
    b"s3cret-\xff": "sha256=cb73e094e1cf6da97365d1fecee8bc5a6b054e69daa92cd0ad9c5a43a78dd1d4",
}


@pytest.mark.parametrize("secret", list(GOLDEN))
def test_signature_is_byte_identical_to_the_former_signers(secret: str | bytes) -> None:
    assert sign(secret, TS, BODY) == GOLDEN[secret]


def test_empty_body_signature_as_before() -> None:
    assert sign("whsec", TS, b"") == "sha256=ab5fdf6f7cdf5f7abf2f4d61c6b0376dc6bf75beafc17135e5fd06513ee7afd8"


def test_it_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(b"k", b"123." + BODY, hashlib.sha256).hexdigest()
    assert sign("k", "123", BODY) == "sha256=" + expected
    assert sign(b"k", "123", BODY) == sign("k", "123", BODY)


def test_tools_and_webhooks_use_this_signer_and_these_headers() -> None:
    assert tools.http.sign is signing.sign and bridge.webhooks.sign is signing.sign
    assert (TIMESTAMP_HEADER, SIGNATURE_HEADER) == ("X-Voxbridge-Timestamp", "X-Voxbridge-Signature")
    assert tools.http.TIMESTAMP_HEADER == TIMESTAMP_HEADER and tools.http.SIGNATURE_HEADER == SIGNATURE_HEADER


def test_an_http_tool_request_is_signed_by_it() -> None:
    cfg = ToolConfig(kind="http", url="https://n8n.example.com/webhook/x", hmac_secret="s3cret-ключ")
    tool = tools.http.HttpTool("lookup", cfg, client=None)  # type: ignore[arg-type]  # not sending
    headers = tool.request_headers(BODY, "tc-1", now=int(TS))
    assert headers[TIMESTAMP_HEADER] == TS and headers[SIGNATURE_HEADER] == GOLDEN["s3cret-ключ"]


def test_verify_accepts_a_fresh_signature_and_refuses_everything_else() -> None:
    good = sign("k", TS, BODY)
    now = float(TS) + 10
    assert verify("k", TS, BODY, good, now=now)
    assert verify("k", TS, bytearray(BODY), good, now=now)
    assert not verify("other", TS, BODY, good, now=now)
    assert not verify("k", TS, BODY + b" ", good, now=now)
    assert not verify("k", "1700000001", BODY, good, now=now)
    assert not verify("k", TS, BODY, good.upper(), now=now)


def test_verify_tolerance_refuses_replays_unless_disabled() -> None:
    good = sign("k", TS, BODY)
    assert verify("k", TS, BODY, good, now=float(TS) + 300)
    assert not verify("k", TS, BODY, good, now=float(TS) + 301)
    assert not verify("k", TS, BODY, good, now=float(TS) - 301)
    assert verify("k", TS, BODY, good, now=float(TS) + 10_000, tolerance_s=None)
    assert verify("k", TS, BODY, good, now=float(TS) + 50, tolerance_s=60)
    assert not verify("k", TS, BODY, good, now=float(TS) + 61, tolerance_s=60)


@pytest.mark.parametrize("timestamp, body, signature", [
    (None, BODY, "sha256=00"), ("", BODY, "sha256=00"), ("soon", BODY, "sha256=00"),
    (TS, "not bytes", "sha256=00"), (TS, BODY, None), (TS, BODY, "sha256=\udcff"),
])
def test_verify_never_raises_on_bad_input(timestamp: object, body: object, signature: object) -> None:
    assert verify("k", timestamp, body, signature, tolerance_s=None) is False  # type: ignore[arg-type]


def test_webhooks_verify_signature_is_the_shared_check() -> None:
    good = sign("k", TS, BODY)
    assert bridge.webhooks.verify_signature("k", TS, BODY, good, now=float(TS))
    assert not bridge.webhooks.verify_signature("k", TS, BODY, good, now=float(TS) + 301)
    assert bridge.webhooks.verify_signature("k", TS, BODY, good, tolerance_s=None, now=0)
