"""The files we ship in examples/ work on a real Asterisk as written (only the port is changed)."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import pytest

from bridge.app import Bridge
from bridge.config import Config, load_config
from bridge.devtools.dial import tone
from bridge.devtools.gateway_sim import GatewaySim

from .ami_client import AmiClient
from .asterisk import AsteriskSandbox
from .conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = "e2e-key"


@pytest.fixture
def asterisk_with_examples(make_asterisk):
    # The shipped dialplan as written; only the bridge's port is the sandbox's (the harness
    # points AudioSocket at its own port, so both contexts reach the same bridge).
    text = (EXAMPLES / "asterisk" / "extensions.conf").read_text()
    return make_asterisk(lambda sandbox: text.replace("127.0.0.1:9000", f"127.0.0.1:{sandbox.audiosocket_port}"))


@pytest.fixture
async def ami(asterisk_with_examples):
    """The test's own AMI view of the examples sandbox (not the default one)."""
    a = asterisk_with_examples
    client = await AmiClient.connect("127.0.0.1", a.ami_port, a.ami_username, a.ami_secret)
    yield client
    await client.close()


def test_example_manager_conf_has_what_the_bridge_needs():
    text = (EXAMPLES / "asterisk" / "manager.conf").read_text()
    assert re.search(r"^channelvars\s*=\s*AS_UUID,AS_PROFILE,AS_VARS", text, re.M)
    read = re.search(r"^read\s*=\s*(.+)$", text, re.M).group(1)
    for cls in ("call", "dialplan", "user"):
        assert cls in read
    assert re.search(r"^bindaddr\s*=\s*127\.0\.0\.1", text, re.M)


def test_example_config_is_valid():
    cfg = load_config(EXAMPLES / "voxbridge.yaml", env={"VOXBRIDGE_GATEWAY_API_KEY": "x", "VOXBRIDGE_AMI_SECRET": "y"})
    Bridge(cfg)  # tools and DTMF targets exist


async def start_bridge(asterisk: AsteriskSandbox, sim: GatewaySim, *, api_key: str = KEY) -> Bridge:
    """The example config, pointed at the sandbox and the reference gateway."""
    cfg = load_config(EXAMPLES / "voxbridge.yaml", env={})
    data = cfg.model_dump(mode="python")
    data["audiosocket"]["listen"] = f"127.0.0.1:{asterisk.audiosocket_port}"
    data["gateway"].update(url=sim.url, api_key=api_key, settle_ms=0)
    data["ami"].update(port=asterisk.ami_port, username=asterisk.ami_username, secret=asterisk.ami_secret)
    data["api"]["enabled"] = False
    data["store"]["path"] = None
    bridge = Bridge(Config.model_validate(data))
    await bridge.start()
    await bridge.ami.wait_connected(10)
    return bridge


async def transfer_reaches_the_operators(session, ami) -> None:
    """The AI's transfer to 100 lands the caller in the shipped dialplan's voxbridge-operators,100."""
    mark = ami.mark()
    result = await session.call_tool("transfer", {"extension": "100", "after_speech": False})
    assert '"status": "transferred"' in result
    await ami.wait_event(lambda e: e.get("Event") == "Newexten" and e.get("Context") == "voxbridge-operators"
                         and e.get("Exten") == "100", since=mark, timeout=5)


async def call_example(ami, asterisk: AsteriskSandbox, exten: str = "s") -> str:
    as_uuid = str(uuid.uuid4())
    play = asterisk.write_wav(f"play-{as_uuid[:8]}", tone(500, 500, 8000))
    rec = asterisk.recording_path(f"rec-{as_uuid[:8]}.wav")
    resp = await ami.originate_caller(play, rec, 8, {"AS_UUID": as_uuid}, context="voxbridge-ai", exten=exten)
    assert resp["Response"] == "Success"
    return as_uuid


async def test_shipped_dialplan_reaches_the_ai_with_caller_id_and_transfer_works(asterisk_with_examples, ami):
    asterisk = asterisk_with_examples
    async with GatewaySim(accepted_keys={KEY}) as sim:
        bridge = await start_bridge(asterisk, sim)
        try:
            await call_example(ami, asterisk)
            session = await sim.next_session(10)
            cfg = await session.wait_accepted()
            assert "The caller's number is 5551234." in cfg["system_prompt"]  # AS_VARS from the dialplan
            assert {t["name"] for t in cfg["tools"]} >= {"transfer", "end_call"}
            await transfer_reaches_the_operators(session, ami)
        finally:
            await bridge.stop()


async def test_shipped_dialplan_sends_the_caller_to_a_human_when_the_ai_fails(asterisk_with_examples, ami):
    asterisk = asterisk_with_examples
    async with GatewaySim(accepted_keys={KEY}) as sim:
        bridge = await start_bridge(asterisk, sim, api_key="revoked-key")  # the gateway refuses us
        try:
            mark = ami.mark()
            await call_example(ami, asterisk)
            ev = await ami.wait_event(
                lambda e: e.get("Event") == "Newexten" and e.get("Context") == "voxbridge-operators",
                since=mark, timeout=10)
            assert ev["Exten"] == "100"  # VOXBRIDGE_RESULT=fallback routed it; nobody was hung up on
        finally:
            await bridge.stop()


async def test_shipped_wideband_variant(asterisk_with_examples, ami):
    asterisk = asterisk_with_examples
    async with GatewaySim(accepted_keys={KEY}) as sim:
        bridge = await start_bridge(asterisk, sim)
        try:
            as_uuid = await call_example(ami, asterisk, exten="wideband")
            session = await sim.next_session(10)
            await session.wait_audio(4000, timeout=10)
            assert bridge.sessions[as_uuid].caller_rate == 16000
            assert session.config["sample_rate"] == 16000
        finally:
            await bridge.stop()


# ---------------------------------------------------------------------------------------------- ARI


@pytest.fixture
def asterisk_with_ari_examples(asterisk_root, tmp_path):
    """The shipped http.conf, ari.conf and dialplan as written; only the HTTP port is the sandbox's."""
    sandbox = AsteriskSandbox(asterisk_root, tmp_path / "asterisk-ari", free_port(), free_port(),
                              http_port=free_port())
    sandbox.extra_dialplan = (EXAMPLES / "asterisk" / "extensions.conf").read_text()
    sandbox.config_files = {
        "http.conf": (EXAMPLES / "asterisk" / "http.conf").read_text().replace(
            "bindport = 8088", f"bindport = {sandbox.http_port}"),
        "ari.conf": (EXAMPLES / "asterisk" / "ari.conf").read_text(),
    }
    assert f"bindport = {sandbox.http_port}" in sandbox.config_files["http.conf"]
    try:
        sandbox.start()
    except BaseException:
        sandbox.cleanup()
        raise
    yield sandbox
    sandbox.stop()
    sandbox.cleanup()


def test_example_modules_conf_lists_what_the_ari_sandbox_loads():
    from .asterisk import ARI_MODULES

    text = (EXAMPLES / "asterisk" / "modules.conf").read_text()
    listed = set(re.findall(r"^load\s*=\s*(\S+)\.so", text, re.M))
    assert set(ARI_MODULES) <= listed, sorted(set(ARI_MODULES) - listed)


async def start_ari_bridge(asterisk: AsteriskSandbox, sim: GatewaySim) -> Bridge:
    """examples/voxbridge-ari.yaml, pointed at the sandbox's HTTP port and the reference gateway;
    the password is the shipped ari.conf's, given the way the README says (the environment)."""
    cfg = load_config(EXAMPLES / "voxbridge-ari.yaml", env={"VOXBRIDGE_ARI_PASSWORD": "change-me"})
    data = cfg.model_dump(mode="python")
    data["ari"]["url"] = asterisk.ari_url
    data["ari"]["password"] = cfg.ari.password.get_secret_value()
    data["gateway"].update(url=sim.url, api_key=KEY, settle_ms=0)
    data["api"]["enabled"] = False
    data["store"]["path"] = None
    bridge = Bridge(Config.model_validate(data))
    await bridge.start()
    await asyncio.wait_for(bridge.ari.client.connected.wait(), 10)
    return bridge


async def test_shipped_ari_set_up_reaches_the_ai_and_transfers_without_ami(asterisk_with_ari_examples):
    asterisk = asterisk_with_ari_examples
    ami = await AmiClient.connect("127.0.0.1", asterisk.ami_port, asterisk.ami_username, asterisk.ami_secret)
    async with GatewaySim(accepted_keys={KEY}) as sim:
        bridge = await start_ari_bridge(asterisk, sim)
        try:
            assert bridge.ami is None  # the example needs no AMI; the test's own AMI client places the call
            play = asterisk.write_wav("play-ari", tone(500, 500, 8000))
            resp = await ami.originate_caller(play, asterisk.recording_path("rec-ari.wav"), 8, {},
                                              context="voxbridge-ari", exten="s")
            assert resp["Response"] == "Success"
            session = await sim.next_session(10)
            cfg = await session.wait_accepted()
            assert "The caller's number is 5551234." in cfg["system_prompt"]  # the Stasis arguments
            assert cfg["sample_rate"] == 16000  # format: slin16, the receptionist's 16 kHz
            await session.wait_audio(4000, timeout=10)  # the caller's 500 ms tone, over RTP
            await transfer_reaches_the_operators(session, ami)
        finally:
            await bridge.stop()
            await ami.close()
