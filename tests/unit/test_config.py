"""Configuration: defaults, YAML, environment, and errors that name the key."""

from __future__ import annotations

import pytest

from bridge.app import Bridge
from bridge.cli import main
from bridge.config import ConfigError, Profile, load_config


def write(tmp_path, text: str):
    p = tmp_path / "voxbridge.yaml"
    p.write_text(text)
    return p


def test_no_file_gives_a_working_default():
    cfg = load_config(None, env={})
    assert cfg.profile(None).sample_rate == 8000
    assert cfg.audiosocket.listen == "127.0.0.1:9000"
    assert cfg.gateway.url is None  # embedded reference gateway


def test_errors_name_the_key_and_the_problem(tmp_path):
    path = write(tmp_path, """
profiles:
  sales:
    sample_rate: 44100
    max_duration: 10
    temperature: 0.3
    dtmf: {"x": {tool: end_call}}
default_profile: sales
gateway: {url: "http://example.invalid"}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    assert "profiles.sales.sample_rate: Input should be 8000, 16000 or 24000 (got 44100)" in text
    assert "profiles.sales.max_duration: Input should be greater than or equal to 60 (got 10)" in text
    assert "profiles.sales.temperature: unknown key (typo?)" in text
    assert "profiles.sales.dtmf: Value error, DTMF key 'x' is not one of 0-9 * # A-D" in text
    assert "gateway.url: Value error, must be a ws:// or wss:// URL" in text


def test_bad_yaml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "profiles: [\n"), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), env={})


def test_environment_overrides_and_secrets_stay_secret():
    cfg = load_config(None, env={
        "VOXBRIDGE_GATEWAY_API_KEY": "av_0123",
        "VOXBRIDGE_GATEWAY_URL": "wss://gw.example/ws",
        "VOXBRIDGE_AMI__PORT": "5039",
        "VOXBRIDGE_AUDIOSOCKET__MAX_CALLS": "12",
    })
    assert cfg.gateway.api_key.get_secret_value() == "av_0123"
    assert "av_0123" not in repr(cfg) and "av_0123" not in str(cfg.model_dump())
    assert cfg.ami.port == 5039 and cfg.audiosocket.max_calls == 12
    assert cfg.gateway.url == "wss://gw.example/ws"


def test_an_env_error_names_the_variable():
    with pytest.raises(ConfigError, match=r"ami.port: .*\n?.*VOXBRIDGE_AMI__PORT|VOXBRIDGE_AMI__PORT"):
        load_config(None, env={"VOXBRIDGE_AMI__PORT": "not-a-port"})


def test_prompt_placeholders():
    p = Profile(prompt='Hi {name}, order {order_id}. JSON: {"a": 1} {missing}', variables={"name": "Ana"})
    text, missing = p.render_prompt({"order_id": "A17"})
    assert text == 'Hi Ana, order A17. JSON: {"a": 1} {missing}'
    assert missing == ["missing"]


def test_registry_checks_unknown_tools_and_qwen(tmp_path, caplog):
    cfg = load_config(write(tmp_path, """
profiles:
  default: {tools: [end_call, fly_to_moon], dtmf: {"0": {tool: nope}}}
"""), env={})
    with pytest.raises(ConfigError) as err:
        Bridge(cfg)
    assert "profiles.default.tools.1: unknown tool 'fly_to_moon'" in str(err.value)
    assert "profiles.default.dtmf.0.tool: unknown tool 'nope'" in str(err.value)

    cfg = load_config(write(tmp_path, "profiles: {default: {provider: qwen, tools: [end_call]}}\n"), env={})
    Bridge(cfg)
    assert "provider 'qwen' does not emit tool calls" in caplog.text


def test_gateway_url_needs_a_key():
    cfg = load_config(None, env={"VOXBRIDGE_GATEWAY_URL": "wss://gw.example/ws"})
    with pytest.raises(ConfigError, match="gateway.api_key: required"):
        Bridge(cfg)


def test_check_config_command(tmp_path, capsys):
    good = write(tmp_path, "profiles: {default: {}, sales: {sample_rate: 16000}}\n")
    assert main(["check-config", str(good)]) == 0
    assert "OK (2 profile(s): default, sales" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("audiosocket: {listen: nine-thousand}\n")
    assert main(["check-config", str(bad)]) == 1
    assert "audiosocket.listen" in capsys.readouterr().err
