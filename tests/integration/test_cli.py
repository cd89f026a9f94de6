"""The command line as a user runs it: `voxbridge serve` (no config) + `voxbridge dial`, and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bridge.devtools.dial import AudioSocketCaller
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)


def voxbridge(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", *args]


@pytest.fixture
def serve():
    """Start `voxbridge serve` with no config file (the README's demo); yields (proc, audiosocket port)."""
    port, api = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBRIDGE_")}
    proc = subprocess.Popen(voxbridge("serve", "--audiosocket-listen", f"127.0.0.1:{port}",
                                      "--api-listen", f"127.0.0.1:{api}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready = proc.stdout.readline()  # "voxbridge … ready: AudioSocket on …" once listening
    assert "ready: AudioSocket on" in ready, (ready, proc.stderr.read() if proc.poll() is not None else "")
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def test_demo_serve_and_dial(serve):
    _proc, port = serve
    res = subprocess.run(voxbridge("dial", "--to", f"127.0.0.1:{port}", "--duration", "5"),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "received" in out and "non-silent" in out
    # The embedded reference gateway greeted the caller and echoed it: audio came back.
    received = float(out.split("received")[1].split("s audio")[0])
    assert received > 4.0


async def test_sigterm_ends_calls_gracefully_and_exits(serve):
    proc, port = serve
    caller = AudioSocketCaller()
    await caller.connect("127.0.0.1", port)
    assert await caller.wait_audio(320 * 25, timeout=5)  # the call is up (silence or greeting)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert await caller.wait_ended(5) == "hangup-frame"  # 0x00: the dialplan would continue
    rc = await asyncio.to_thread(proc.wait, 10)
    assert rc == 0 and time.monotonic() - t0 < 8
    await caller.aclose()
    err = proc.stderr.read()
    assert "call ended: shutdown" in err and "Traceback" not in err
    assert "DEMO MODE" in err  # the echo demo never runs quietly


def test_bad_config_exits_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("audiosocket: {max_calls: lots}\n")
    res = subprocess.run(voxbridge("serve", "--config", str(bad)), capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "audiosocket.max_calls: Input should be a valid integer" in res.stderr
    assert "Traceback" not in res.stderr


def test_port_in_use_is_reported_not_traced():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(voxbridge("serve", "--audiosocket-listen", f"127.0.0.1:{port}",
                                       "--api-listen", f"127.0.0.1:{free_port()}"),
                             capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert f"cannot listen for AudioSocket on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr


def test_unwritable_store_is_reported_not_traced(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"gateway: {{demo: true}}\nstore: {{path: {blocker}/calls.db}}\napi: {{enabled: false}}\n"
                   f"audiosocket: {{listen: '127.0.0.1:{free_port()}'}}\n")
    res = subprocess.run(voxbridge("serve", "--config", str(cfg)), capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "cannot open the call history" in res.stderr and "store.path" in res.stderr
    assert "Traceback" not in res.stderr


async def test_serve_with_a_gateway_url_takes_the_key_from_the_environment():
    from bridge.devtools.gateway_sim import GatewaySim

    async with GatewaySim(accepted_keys={"av_env_key_0123"}) as sim:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBRIDGE_")}
        env["VOXBRIDGE_GATEWAY_API_KEY"] = "av_env_key_0123"
        proc = await asyncio.create_subprocess_exec(
            *voxbridge("serve", "--gateway-url", sim.url, "--audiosocket-listen", f"127.0.0.1:{port}",
                       "--api-listen", f"127.0.0.1:{free_port()}"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        try:
            assert b"ready: AudioSocket on" in await asyncio.wait_for(proc.stdout.readline(), 20)
            caller = AudioSocketCaller()
            await caller.connect("127.0.0.1", port)
            session = await sim.next_session(10)
            config = await session.wait_accepted()
            assert config["apikey"] == "av_env_key_0123" and config["provider"] == "aillomvox"
            await caller.aclose()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        err = (await proc.stderr.read()).decode()
        assert "av_env_key_0123" not in err  # never logged


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBRIDGE_")}
    env.update(extra)
    return env


def test_check_config_takes_a_phone_number_from_the_environment():
    """The acceptance line: an env value is read as its key's type (a string stays a string)."""
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "voxbridge.yaml")
    res = subprocess.run(voxbridge("check-config", examples), capture_output=True, text=True, timeout=30,
                         env=clean_env(VOXBRIDGE_OUTBOUND__CALLER_ID="+441632960000"))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_serve_refuses_a_file_that_names_no_gateway(tmp_path):
    cfg = tmp_path / "prod.yaml"
    cfg.write_text("api: {enabled: false}\n")
    res = subprocess.run(voxbridge("serve", "--config", str(cfg)), capture_output=True, text=True, timeout=30,
                         env=clean_env())
    assert res.returncode == 2
    assert "gateway.url: required in a config file" in res.stderr and "gateway.demo: true" in res.stderr
    assert "ready" not in res.stdout and "Traceback" not in res.stderr


async def test_serve_gateway_url_option_satisfies_a_file_without_one(tmp_path):
    cfg = tmp_path / "prod.yaml"
    port = free_port()
    cfg.write_text(f"api: {{enabled: false}}\naudiosocket: {{listen: '127.0.0.1:{port}'}}\n")
    proc = await asyncio.create_subprocess_exec(
        *voxbridge("serve", "--config", str(cfg), "--gateway-url", "ws://127.0.0.1:9/ws"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean_env(VOXBRIDGE_GATEWAY_API_KEY="av_test"))
    try:
        ready = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert f"ready: AudioSocket on 127.0.0.1:{port}" in ready and "demo" not in ready
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    err = (await proc.stderr.read()).decode()
    assert "DEMO MODE" not in err and "Traceback" not in err


# ------------------------------------------------------- the service without its dev tools
#
# bridge/devtools (the reference gateway, the test caller, the bench) ships with the service but
# is loaded only by the commands that use it; bridge/cli.py adds a tool's options only when its
# command is parsed. These run the real entry point, bridge.cli.main, in a fresh interpreter that
# prints every module it loaded once main returns: sys.modules sees imports of any kind
# (``python -X importtime`` misses importlib.import_module, which bridge/cli.py uses).

def main_then_modules(*argv: str) -> list[str]:
    """A ``python -c`` command line: run ``bridge.cli.main(argv)``, then print ``MODULES`` and the
    JSON list of loaded modules on stdout, and exit with main's code."""
    code = ("import json, sys\n"
            "from bridge.cli import main\n"
            "try:\n"
            f"    rc = main({list(argv)!r})\n"
            "except SystemExit as exc:\n"
            "    rc = exc.code\n"
            "print('MODULES ' + json.dumps(sorted(sys.modules)), flush=True)\n"
            "sys.exit(rc)\n")
    return [sys.executable, "-c", code]


def modules_printed(stdout: str) -> tuple[list[str], str]:
    """(the modules :func:`main_then_modules` printed, the command's own output before them)."""
    head, _, modules = stdout.rpartition("MODULES ")
    assert modules, stdout
    return json.loads(modules), head


def devtools_loaded(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if m == "bridge.devtools" or m.startswith("bridge.devtools."))


def run_main(*argv: str, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    """(exit code, every module loaded, stdout + stderr) of ``bridge.cli.main(argv)``."""
    res = subprocess.run(main_then_modules(*argv), capture_output=True, text=True, timeout=30,
                         env=env if env is not None else clean_env())
    modules, out = modules_printed(res.stdout)
    return res.returncode, modules, out + res.stderr


def test_check_config_with_a_gateway_url_loads_no_dev_tool(tmp_path):
    cfg = tmp_path / "prod.yaml"
    cfg.write_text("gateway: {url: 'ws://127.0.0.1:9/ws'}\napi: {enabled: false}\n")
    rc, modules, out = run_main("check-config", str(cfg), env=clean_env(VOXBRIDGE_GATEWAY_API_KEY="av_test"))
    assert rc == 0 and "OK" in out, out
    assert "bridge.app" in modules  # check-config builds the tools, as serve does
    assert devtools_loaded(modules) == []


def test_help_lists_every_command_and_loads_no_dev_tool():
    rc, modules, out = run_main("--help")
    assert rc == 0, out
    for command in ("serve", "check-config", "dial", "gateway-sim", "bench"):
        assert f"\n    {command} " in out, out  # listed with its one-line help
    assert "place a test call" in out and "reference AI gateway" in out and "load benchmark" in out
    assert devtools_loaded(modules) == []


@pytest.mark.parametrize(("command", "option", "module"), [
    ("dial", "--record", "bridge.devtools.dial"),
    ("gateway-sim", "--scenario", "bridge.devtools.gateway_sim"),
    ("bench", "--keep-going", "bridge.devtools.bench"),
])
def test_a_dev_tool_command_loads_only_its_own_tool(command, option, module):
    rc, modules, out = run_main(command, "--help")
    assert rc == 0, out
    assert f"usage: voxbridge {command}" in out and option in out  # its full options
    # (the simulators share bridge/devtools/sim_common.py)
    assert set(devtools_loaded(modules)) - {"bridge.devtools.sim_common"} == {"bridge.devtools", module}


@pytest.mark.parametrize(("protocol", "option", "module"), [
    ("generic-ws", "--ready-event", "bridge.devtools.sim_generic_ws"),
    ("aivoco", "--greeting", "bridge.devtools.sim_aivoco"),
    ("openai-realtime", "--no-echo", "bridge.devtools.sim_openai"),
])
def test_gateway_sim_protocol_loads_that_simulator_and_its_options(protocol, option, module):
    rc, modules, out = run_main("gateway-sim", "--protocol", protocol, "--help")
    assert rc == 0, out
    assert option in out, out  # that simulator's own options
    loaded = devtools_loaded(modules)
    assert module in loaded
    others = {"bridge.devtools.sim_generic_ws", "bridge.devtools.sim_aivoco", "bridge.devtools.sim_openai"} - {module}
    assert not others & set(loaded), loaded  # and no other protocol's


def test_gateway_sim_refuses_an_unknown_protocol():
    rc, _modules, out = run_main("gateway-sim", "--protocol", "gemini")
    assert rc != 0 and "invalid choice: 'gemini'" in out


async def test_serve_with_a_gateway_url_loads_no_dev_tool(tmp_path):
    """From start to exit (SIGTERM once ready), `serve` with a gateway URL loads nothing from
    bridge.devtools. (In demo mode bridge/app.py loads the reference gateway, by design.)"""
    cfg = tmp_path / "prod.yaml"
    port = free_port()
    cfg.write_text(f"api: {{enabled: false}}\naudiosocket: {{listen: '127.0.0.1:{port}'}}\n")
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            *main_then_modules("serve", "--config", str(cfg), "--gateway-url", "ws://127.0.0.1:9/ws"),
            stdout=asyncio.subprocess.PIPE, stderr=err, env=clean_env(VOXBRIDGE_GATEWAY_API_KEY="av_test"))
        try:
            ready = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert f"ready: AudioSocket on 127.0.0.1:{port}" in ready, log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            rest, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, log.read_text()
    modules, _ = modules_printed(rest.decode())
    assert {"bridge.app", "bridge.server", "bridge.gateway.aillomvox"} <= set(modules)  # it did serve
    assert devtools_loaded(modules) == []
