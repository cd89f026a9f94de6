"""Configuration: defaults, YAML, environment, and errors that name the key."""

from __future__ import annotations

import os

import pytest

from bridge.app import Bridge
from bridge.cli import main
from bridge.config import Config, ConfigError, Profile, load_config


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
gateway: {demo: true}
profiles:
  default: {tools: [end_call, fly_to_moon], dtmf: {"0": {tool: nope}}}
"""), env={})
    with pytest.raises(ConfigError) as err:
        Bridge(cfg)
    assert "profiles.default.tools.1: unknown tool 'fly_to_moon'" in str(err.value)
    assert "profiles.default.dtmf.0.tool: unknown tool 'nope'" in str(err.value)

    cfg = load_config(
        write(tmp_path, "gateway: {demo: true}\nprofiles: {default: {provider: qwen, tools: [end_call]}}\n"), env={})
    Bridge(cfg)
    assert "provider 'qwen' does not emit tool calls" in caplog.text


def test_gateway_url_needs_a_key():
    cfg = load_config(None, env={"VOXBRIDGE_GATEWAY_URL": "wss://gw.example/ws"})
    with pytest.raises(ConfigError, match=r"gateway.api_key: required"):
        Bridge(cfg)


def test_check_config_command(tmp_path, capsys):
    good = write(tmp_path, "gateway: {demo: true}\nprofiles: {default: {}, sales: {sample_rate: 16000}}\n")
    assert main(["check-config", str(good)]) == 0
    assert "OK (2 profile(s): default, sales" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("audiosocket: {listen: nine-thousand}\n")
    assert main(["check-config", str(bad)]) == 1
    assert "audiosocket.listen" in capsys.readouterr().err


# ------------------------------------------------------------------ environment, typed by the schema


def test_environment_values_are_read_as_the_type_of_their_key():
    cfg = load_config(None, env={
        "VOXBRIDGE_OUTBOUND__CALLER_ID": "+441632960000",        # a str key: verbatim, not the number 441632960000
        "VOXBRIDGE_ORIGINATE__CALLER_ID": "0123",                # not 123
        "VOXBRIDGE_PROFILES__DEFAULT__FIRST_MESSAGE": "yes",     # not True
        "VOXBRIDGE_PROFILES__DEFAULT__VOICE": "1e3",             # not 1000.0
        "VOXBRIDGE_AMI__ENABLED": "yes",                         # a bool key: parsed
        "VOXBRIDGE_AMI__CHANNEL_WAIT": "2.5",
        "VOXBRIDGE_PROFILES__DEFAULT__SAMPLE_RATE": "16000",     # Literal[8000, 16000, 24000]
        "VOXBRIDGE_ALLOW__ORIGINATE": r'["\\+44\\d{10}"]',       # lists and mappings are JSON
        "VOXBRIDGE_PROFILES__DEFAULT__VARIABLES": '{"company": "0123"}',
        "VOXBRIDGE_STORE__RETENTION_DAYS": "null",
        "VOXBRIDGE_LOG_LEVEL": "DEBUG",                          # a top-level key
        "VOXBRIDGE_API__MAX_BODY_BYTES": "",                     # empty: unset
    })
    assert cfg.outbound.caller_id == "+441632960000"
    assert cfg.originate.caller_id == "0123"
    p = cfg.profile(None)
    assert p.first_message == "yes" and p.voice == "1e3"
    assert cfg.ami.enabled is True and cfg.ami.channel_wait == 2.5
    assert p.sample_rate == 16000
    assert cfg.allow.originate == [r"\+44\d{10}"]
    assert p.variables == {"company": "0123"}
    assert cfg.store.retention_days is None
    assert cfg.log_level == "DEBUG"
    assert cfg.api.max_body_bytes == 1024 * 1024


def test_environment_overrides_the_file_and_merges_into_its_mappings(tmp_path):
    path = write(tmp_path, """
gateway: {url: "wss://gw.example/ws"}
ami: {port: 5040, host: pbx.example}
default_profile: support
profiles:
  Sales: {prompt: "You sell.", voice: Adam}
  support: {prompt: "You help."}
""")
    cfg = load_config(path, env={"VOXBRIDGE_AMI__PORT": "5039", "VOXBRIDGE_PROFILES__SALES__VOICE": "Eve",
                                 "VOXBRIDGE_PROFILES__NEW__LANGUAGE": "de-DE"})
    assert cfg.ami.port == 5039 and cfg.ami.host == "pbx.example"
    # Variable names are case-insensitive: SALES lands on the file's "Sales", and keeps its prompt.
    assert set(cfg.profiles) == {"Sales", "support", "new"}
    assert (cfg.profiles["Sales"].voice, cfg.profiles["Sales"].prompt) == ("Eve", "You sell.")
    assert cfg.profiles["support"].prompt == "You help."
    assert cfg.profiles["new"].language == "de-DE"


def test_an_unknown_environment_key_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"VOXBRIDGE_AMI__PROT": "1", "VOXBRIDGE_AIM__PORT": "5039",
                               "VOXBRIDGE_NO_UVLOOP": "1"})  # not a config key (read by the CLI): ignored
    text = str(err.value)
    assert "ami.prot: unknown key (typo?) (from VOXBRIDGE_AMI__PROT)" in text
    assert "aim: unknown key (typo?) (from VOXBRIDGE_AIM__PORT)" in text
    assert "NO_UVLOOP" not in text


def test_a_list_in_the_environment_must_be_json():
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"VOXBRIDGE_ALLOW__TRANSFER": "operators,100", "VOXBRIDGE_AMI__PORT": "x"})
    text = str(err.value)
    assert "allow.transfer: not valid JSON (from VOXBRIDGE_ALLOW__TRANSFER)" in text
    # The other variables are still read and checked: every problem at once.
    assert "ami.port: Input should be a valid integer" in text and "(from VOXBRIDGE_AMI__PORT)" in text


def test_env_errors_never_echo_secrets():
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"VOXBRIDGE_AMI_SECRET": "s3cret-one", "VOXBRIDGE_AMI__SECRET": "s3cret-two",
                               "VOXBRIDGE_API_TOKEN": "tok-3", "VOXBRIDGE_AMI__PORT": "x"})
    text = str(err.value)
    assert "ami.secret: set by both VOXBRIDGE_AMI_SECRET and VOXBRIDGE_AMI__SECRET" in text
    assert "VOXBRIDGE_API_TOKEN" in text  # named as a source of the configuration…
    assert not any(v in text for v in ("s3cret-one", "s3cret-two", "tok-3"))  # …its value never shown


def test_the_given_env_mapping_is_read_instead_of_os_environ(monkeypatch):
    monkeypatch.setenv("VOXBRIDGE_AMI__PORT", "not-a-port")
    monkeypatch.setenv("VOXBRIDGE_GATEWAY_URL", "wss://from-os-environ.example/ws")
    cfg = load_config(None, env={"VOXBRIDGE_AUDIOSOCKET__MAX_CALLS": "7"})
    assert cfg.ami.port == 5038 and cfg.gateway.url is None and cfg.audiosocket.max_calls == 7
    with pytest.raises(ConfigError, match="VOXBRIDGE_AMI__PORT"):
        load_config(None)  # env=None: os.environ


# ------------------------------------------------------------------ which gateway


def test_a_file_without_gateway_url_is_an_error_unless_it_asks_for_the_demo(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "profiles: {default: {sample_rate: 44100}}\n"), env={})
    text = str(err.value)
    assert "gateway.url: required in a config file" in text and "gateway.demo: true" in text
    assert "profiles.default.sample_rate" in text  # reported with the other problems, not after them

    demo = load_config(write(tmp_path, "gateway: {demo: true}\n"), env={})
    assert demo.gateway.url is None and demo.gateway.demo is True
    # The environment or the command line may name the gateway instead of the file.
    bare = write(tmp_path, "audiosocket: {max_calls: 5}\n")
    assert load_config(bare, env={"VOXBRIDGE_GATEWAY_URL": "wss://gw.example/ws"}).gateway.url == "wss://gw.example/ws"
    assert load_config(bare, env={"VOXBRIDGE_GATEWAY__DEMO": "true"}).gateway.demo is True
    assert load_config(bare, env={}, overrides={"gateway.url": "wss://cli.example/ws"}).gateway.url == \
        "wss://cli.example/ws"


def test_no_file_and_config_in_code_still_mean_the_demo():
    assert load_config(None, env={}).gateway.url is None
    assert Config().gateway.url is None and Config().gateway.demo is False
    Bridge(Config())  # constructs: tests and embedders rely on Config() being the demo


def test_gateway_url_and_demo_together_are_an_error(tmp_path):
    path = write(tmp_path, "gateway: {demo: true}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"VOXBRIDGE_GATEWAY_URL": "wss://gw.example/ws"})
    assert "gateway.url and gateway.demo: true are both set" in str(err.value)
    assert "(from VOXBRIDGE_GATEWAY_URL)" in str(err.value)
    with pytest.raises(ConfigError, match="both set"):
        load_config(write(tmp_path, "gateway: {demo: true, url: 'wss://gw.example/ws'}\n"), env={})


def test_command_line_overrides_are_validated_and_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides={"gateway.url": "http://gw.example/ws"})
    assert "gateway.url: Value error, must be a ws:// or wss:// URL" in str(err.value)
    assert "(from the command line)" in str(err.value)


def test_check_config_requires_the_gateway(tmp_path, capsys, monkeypatch):
    for name in [n for n in os.environ if n.upper().startswith("VOXBRIDGE_")]:
        monkeypatch.delenv(name)
    path = write(tmp_path, "profiles: {default: {}}\n")
    assert main(["check-config", str(path)]) == 1
    assert "gateway.url: required in a config file" in capsys.readouterr().err
    monkeypatch.setenv("VOXBRIDGE_GATEWAY_URL", "wss://gw.example/ws")
    assert main(["check-config", str(path)]) == 0
    assert "gateway wss://gw.example/ws" in capsys.readouterr().out


# --------------------------------------------------------------------------- named gateways


def test_the_shipped_ai_backends_example_names_a_gateway_per_profile():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "examples" / "ai-backends.yaml", env={})
    assert {n: p.gateway for n, p in cfg.profiles.items()} == {
        "receptionist": "openai", "lab": "local-llm", "support": "aivoco", "demo": None}
    assert {n: g.protocol for n, g in cfg.gateways.items()} == {
        "openai": "openai-realtime", "local-llm": "generic-ws", "aivoco": "aivoco"}
    # generic-ws's token is optional; the other two need theirs, named by key and variable.
    assert cfg.credential_problems(env={}) == [
        "gateways.aivoco.api_key_env: the environment variable AIVOCO_AUTH_KEY is not set",
        "gateways.openai.api_key_env: the environment variable OPENAI_API_KEY is not set",
    ]
    assert cfg.credential_problems(env={"AIVOCO_AUTH_KEY": "a", "OPENAI_API_KEY": "sk"}) == []


def test_gateway_mistakes_are_named_by_their_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "gateway: {demo: true}\n"
        "gateways:\n"
        "  ai: {protocol: openai-realtime, modle: x}\n"
        "  g: {protocol: generic-ws, url: 'ws://x', sample_rate: 16000}\n"
        "  z: {protocol: nope}\n"
        "  k: {protocol: aivoco, api_key: a, api_key_env: B}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    text = str(exc.value)
    assert "gateways.ai.modle: unknown key (typo?)" in text
    assert "gateways.g: Value error, audio_format g711_ulaw is 8000 Hz; sample_rate 16000 needs pcm16" in text
    assert ("gateways.z.protocol: unknown protocol 'nope' (one of: aillomvox, generic-ws, aivoco, "
            "openai-realtime)") in text
    assert "gateways.k: Value error, api_key and api_key_env are both set: keep one" in text


def test_a_profile_naming_an_unknown_gateway_is_refused_by_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gateways:\n  openai: {protocol: openai-realtime}\nprofiles:\n  default: {gateway: opneai}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    assert "profiles.default.gateway: no gateway named 'opneai' in gateways (openai)" in str(exc.value)


def test_a_file_whose_profiles_all_name_a_gateway_needs_no_gateway_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gateways:\n  openai: {protocol: openai-realtime}\nprofiles:\n  default: {gateway: openai}\n")
    cfg = load_config(f, env={})
    assert not cfg.uses_default_gateway
    g = cfg.gateways["openai"]
    assert g.credential({"X": "y"}) is None and g.vad.mode is None  # the protocol's default (server)


def test_the_bridge_refuses_to_start_without_a_credential_a_profile_needs(monkeypatch):
    monkeypatch.delenv("VOXBRIDGE_TEST_OPENAI_KEY", raising=False)
    cfg = Config.model_validate({
        "gateways": {"openai": {"protocol": "openai-realtime", "api_key_env": "VOXBRIDGE_TEST_OPENAI_KEY"}},
        "profiles": {"default": {"gateway": "openai"}},
    })
    with pytest.raises(ConfigError) as exc:
        Bridge(cfg)
    problem = "gateways.openai.api_key_env: the environment variable VOXBRIDGE_TEST_OPENAI_KEY is not set"
    assert problem in str(exc.value)
    monkeypatch.setenv("VOXBRIDGE_TEST_OPENAI_KEY", "sk-test")
    Bridge(cfg)  # and with it, it builds


def test_a_credential_is_trimmed_and_one_with_a_control_character_is_refused_unseen():
    """A secret mounted from a file ends in a newline: trimmed. One with a line break inside would
    be refused by the WebSocket library with the whole header — key included — in its message."""
    cfg = Config.model_validate({"gateways": {"openai": {"protocol": "openai-realtime", "api_key_env": "K"}},
                                 "profiles": {"default": {"gateway": "openai"}}})
    g = cfg.gateways["openai"]
    assert g.credential({"K": "sk-abc\n"}) == "sk-abc"
    assert g.credential({"K": "sk-ab\nc"}) is None
    problems = cfg.credential_problems({"K": "sk-ab\nc"})
    assert problems == [("gateways.openai.api_key_env: the credential (from K) contains a control character "
                         "(a line break or tab inside it?)")]
    assert "sk-ab" not in problems[0]


def test_aivoco_refuses_settings_it_would_silently_ignore(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gateways:\n  a: {protocol: aivoco, keepalive_interval: 3, vad: {mode: server}}\n"
                 "profiles:\n  default: {gateway: a}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    assert "gateways.a: Value error, keepalive_interval: not for aivoco" in str(exc.value)
    f.write_text("gateways:\n  a: {protocol: aivoco, vad: {mode: server}}\nprofiles:\n  default: {gateway: a}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    assert "vad.mode server: the aivoco API has no barge-in event" in str(exc.value)
    f.write_text("gateways:\n  a: {protocol: aivoco, preconnect: false}\nprofiles:\n  default: {gateway: a}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    assert "gateways.a: Value error, preconnect: not for aivoco" in str(exc.value)


def test_preconnect_is_on_by_default_and_off_per_gateway(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gateway: {url: 'wss://gw.example/ws', api_key: k, preconnect: false}\n"
                 "gateways:\n  o: {protocol: openai-realtime, api_key: k}\n"
                 "  g: {protocol: generic-ws, url: 'wss://ai.example/ws', preconnect: false}\n")
    cfg = load_config(f, env={})
    assert cfg.gateway.preconnect is False
    assert cfg.gateways["o"].preconnect is True and cfg.gateways["g"].preconnect is False
    f.write_text("gateway: {url: 'wss://gw.example/ws', api_key: k, preconnect: sometimes}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, env={})
    assert "gateway.preconnect" in str(exc.value)


# ---------------------------------------------------------------------------------------------- ARI


def test_ingress_ari_is_configured_and_its_mistakes_are_named(tmp_path):
    cfg = load_config(None, env={"VOXBRIDGE_INGRESS": '["audiosocket", "ari"]', "VOXBRIDGE_ARI_PASSWORD": "pw-1",
                                 "VOXBRIDGE_ARI__URL": "http://10.0.0.5:8088/ari/"})
    assert cfg.ingress == ["audiosocket", "ari"] and cfg.ari.url == "http://10.0.0.5:8088"
    assert cfg.ari.password.get_secret_value() == "pw-1" and cfg.ari.rtp.port_range == (40000, 40999)
    assert load_config(write(tmp_path, "ingress: ari\nari: {password: x}\ngateway: {demo: true}\n"),
                       env={}).ingress == ["ari"]  # one word is a list of one
    path = write(tmp_path, """
ingress: [ari, sip]
ari: {url: "ws://pbx:8088", format: opus, rtp: {ports: "40999-40000", jitter_packets: 99}, app: "my app"}
gateway: {demo: true}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    assert "ingress.1: Input should be 'audiosocket' or 'ari'" in text
    assert "ari.url: Value error, must be an http(s) URL such as http://127.0.0.1:8088, got 'ws://pbx:8088'" in text
    assert "ari.format: Input should be 'ulaw' or 'slin16'" in text
    assert "ari.rtp.ports: Value error, must be FIRST-LAST within 1024-65535 with FIRST <= LAST" in text
    assert "ari.rtp.jitter_packets: Input should be less than or equal to 50" in text
    assert "ari.app: String should match pattern" in text
    with pytest.raises(ConfigError, match=r"ari.password: required with ingress ari \(or set VOXBRIDGE_ARI_PASSWORD\)"):
        load_config(write(tmp_path, "ingress: ari\ngateway: {demo: true}\n"), env={})
    with pytest.raises(ConfigError, match="ingress: Value error, names no way in"):
        load_config(write(tmp_path, "ingress: []\ngateway: {demo: true}\n"), env={})


def test_an_ari_password_in_an_error_is_never_shown():
    for url in ("http://voxbridge:pw-in-url@pbx:8088", "ws://voxbridge:pw-in-url@pbx:8088"):
        with pytest.raises(ConfigError, match=r"ari\.url: Value error, must not carry a user name or password") as err:
            load_config(None, env={"VOXBRIDGE_ARI__URL": url})
        assert "pw-in-url" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"VOXBRIDGE_ARI_PASSWORD": "pw-secret-1", "VOXBRIDGE_ARI__PASSWORD": "pw-secret-2"})
    assert "ari.password: set by both" in str(err.value) and "pw-secret" not in str(err.value)


def test_telephony_tools_need_ami_only_for_audiosocket_calls(caplog):
    base = {"gateway": {"demo": True}, "allow": {"transfer": ["ops,100"]},
            "profiles": {"default": {"tools": ["transfer", "hangup"]}}}
    ari_only = Config.model_validate({**base, "ingress": "ari", "ari": {"password": "x"}})
    assert not [w for w in ari_only.problems({"transfer", "hangup"})[1] if "need AMI" in w]
    both = Config.model_validate({**base, "ingress": ["audiosocket", "ari"], "ari": {"password": "x"}})
    assert [w for w in both.problems({"transfer", "hangup"})[1] if "need AMI for calls over AudioSocket" in w]
