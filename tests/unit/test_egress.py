"""The webhook egress policy (bridge/egress.py): URL parsing, address rules, allowlist, DNS checks."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from bridge.config import Config, ConfigError, load_config
from bridge.egress import (
    DEFAULT_ALLOW,
    AllowEntry,
    EgressPolicy,
    EgressRefused,
    ResolveFailed,
    embedded_ipv4,
    is_public,
    never_reason,
    parse_allowlist,
    parse_ipv4,
    parse_url,
)

#: 169.254.169.254 (the cloud metadata service) in every spelling inet_aton or a browser accepts.
METADATA_SPELLINGS = [
    "169.254.169.254",
    "2852039166",                 # one decimal number
    "0xa9fea9fe", "0xA9FEA9FE", "0XA9FEA9FE",  # one hex number
    "025177524776",               # one octal number
    "0251.0376.0251.0376",        # octal parts
    "0xa9.0xfe.0xa9.0xfe",        # hex parts
    "169.254.43518",              # a.b.c with a 16-bit last part
    "169.16689662",               # a.b with a 24-bit last part
    "0xa9.254.0251.0xfe",         # mixed
    "0251.0xfe.43518",            # mixed, short form
    "169.254.169.254.",           # trailing dot
    "%31%36%39.254.169.254",      # percent-encoded (browsers decode the host first)
]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spelling", METADATA_SPELLINGS)
def test_every_numeric_spelling_is_the_address_it_means(spelling):
    t = parse_url(f"http://{spelling}/latest/meta-data/")
    assert t.ip == ipaddress.IPv4Address("169.254.169.254")
    assert t.host == "169.254.169.254"


def test_numeric_spellings_agree_with_inet_aton():
    for text in ("127.1", "0x7f.1", "017700000001", "10.0x17.0x2d43", "1.2.3.4", "0", "0x", "255.255.65535"):
        assert parse_ipv4(text) == ipaddress.IPv4Address(socket.inet_aton(text if text != "0x" else "0")), text


@pytest.mark.parametrize("host", ["1.2.3.999", "1.2.3.4.5", "08.1.1.1", "1.2.0x1g.4", "evil.com.1", "256.1",
                                  "1.2.3.0x100", "4294967296"])
def test_a_host_ending_in_a_number_must_be_a_valid_address(host):
    # Neither an address nor a name (a browser refuses them too): never handed to DNS.
    with pytest.raises(ValueError, match="not a valid IPv4 address"):
        parse_url(f"http://{host}/")


def test_names_are_normalised():
    t = parse_url("HTTP://Hooks.Example.COM.:8443/a/B?x=1#frag")
    assert (t.scheme, t.host, t.ip, t.port, t.path, t.query) == ("http", "hooks.example.com", None, 8443, "/a/B", "x=1")
    assert t.authority == "hooks.example.com:8443" and t.origin == "http://hooks.example.com:8443"
    assert parse_url("http://bücher.example/").host == "xn--bcher-kva.example"
    assert parse_url("http://BÜCHER.example/").host == "xn--bcher-kva.example"
    assert parse_url("http://[0:0::1]:80/").host == "::1"
    assert parse_url("http://[::1]:80/").authority == "[::1]"  # the default port is not repeated
    assert parse_url("https://a.example/p ath".replace(" ", "%20")).path == "/p%20ath"
    assert parse_url("https://a.example/ü").path == "/%C3%BC"
    assert parse_url("https://a.example").path == "/"


def test_pinned_url_keeps_port_path_and_query():
    t = parse_url("https://hooks.example/webhook/x?token=abc")
    assert t.pinned_url(ipaddress.ip_address("203.0.113.7")) == "https://203.0.113.7:443/webhook/x?token=abc"
    assert t.pinned_url(ipaddress.ip_address("2001:db8::7")) == "https://[2001:db8::7]:443/webhook/x?token=abc"


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/", "http:// or https://"),
    ("/relative", "absolute"),
    ("example.com/hook", "absolute"),
    ("http:///path", "no host"),
    ("http://", "no host"),
    ("http://127.0.0.1@evil.com/", "user name or password"),
    ("http://user:pass@127.0.0.1/", "user name or password"),
    ("http://127.0.0.1:5678@evil.com/", "user name or password"),
    ("http://127.0.0.1\\@evil.com/", "backslash"),
    ("http://127.0.0.1 /", "whitespace or control"),
    ("http://127.0.0.1/\x00", "whitespace or control"),
    ("http://127.0.0.1:99999/", "invalid port"),
    ("http://127.0.0.1:0/", "invalid port"),
    ("http://127.0.0.1:8o/", "invalid port"),
    ("http://a_b!.example/", "not a valid host name"),
    ("http://%00.example/", "not a valid host name"),
    ("http://127.0.0.1%40evil.com/", "not a valid host name"),
    ("http://::1/", "brackets"),
    ("http://[::1/", "unclosed"),
    ("http://[::g]/", "not a valid IPv6 address"),
    ("http://[::1]x/", "unexpected"),
    ("http://127.0.0.1/a/../admin", "'.' or '..'"),
    ("http://127.0.0.1/a/%2e%2E/admin", "'.' or '..'"),
    ("http://127.0.0.1/./x", "'.' or '..'"),
    ("http://" + "a" * 2048 + "/", "longer than"),
])
def test_malformed_urls_are_refused_precisely(url, message):
    with pytest.raises(ValueError, match=message):
        parse_url(url)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("addr, why", [
    ("169.254.169.254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("febf::1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("::ffff:169.254.169.254", "cloud metadata"),   # IPv4-mapped
    ("::ffff:0:169.254.169.254", "cloud metadata"),  # IPv4-translated
    ("::169.254.169.254", "cloud metadata"),        # IPv4-compatible
    ("64:ff9b::a9fe:a9fe", "cloud metadata"),       # NAT64
    ("64:ff9b:1::a9fe:a9fe", "cloud metadata"),     # local-use NAT64
    ("2002:a9fe:a9fe::1", "cloud metadata"),        # 6to4
    ("::ffff:10.0.0.1", None),
])
def test_never_reachable(addr, why):
    reason = never_reason(ipaddress.ip_address(addr))
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason


def test_embedded_ipv4_is_unpacked():
    v4 = ipaddress.IPv4Address("169.254.169.254")
    for addr in ("::ffff:a9fe:a9fe", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::", "::a9fe:a9fe"):
        assert v4 in embedded_ipv4(ipaddress.ip_address(addr)), addr
    # Teredo: the client address is stored inverted.
    teredo = ipaddress.ip_address(f"2001:0:4136:e378:8000:63bf:{0xFFFF ^ 0xA9FE:x}:{0xFFFF ^ 0xA9FE:x}")
    assert v4 in embedded_ipv4(teredo)
    assert never_reason(teredo) is not None
    assert embedded_ipv4(ipaddress.ip_address("::1")) == [] and embedded_ipv4(ipaddress.ip_address("2001:db8::1")) == []


@pytest.mark.parametrize("addr, public", [
    ("93.184.215.14", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.23.45.67", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("::1", False), ("fd12:3456::1", False), ("fec0::1", False),
    ("::ffff:10.0.0.1", False), ("64:ff9b::a17:2d43", False), ("2002:0a17:2d43::1", False),
    ("192.0.2.1", False),
])
def test_public_addresses(addr, public):
    assert is_public(ipaddress.ip_address(addr)) is public


# --------------------------------------------------------------------------- the allowlist


def test_entries_match_on_parsed_components_not_string_prefixes():
    policy = EgressPolicy(resolver=_no_dns)  # the default: http://127.0.0.1, http://localhost, http://[::1]
    for url in ("http://127.0.0.1:5678/webhook/x", "http://127.0.0.1/", "http://0x7f.1:5678/x",
                "http://[::1]:5678/", "http://localhost:5678/webhook/x", "http://LOCALHOST.:5678/"):
        assert policy.check(url).named, url
    for url in ("http://127.0.0.1.evil.com/", "http://localhost.evil.com/", "https://127.0.0.1:5678/",
                "http://127.0.0.2/", "http://[2001:db8::1]/"):
        with pytest.raises(EgressRefused, match=r"not allowed: allow.webhooks permits"):
            policy.check(url)
    with pytest.raises(ValueError, match="user name or password"):
        policy.check("http://127.0.0.1@evil.com/")


def test_port_and_path_entries():
    policy = EgressPolicy(["http://127.0.0.1:5678/webhook", "https://hooks.example"], resolver=_no_dns)
    for url in ("http://127.0.0.1:5678/webhook", "http://127.0.0.1:5678/webhook/x/y?q=1"):
        policy.check(url)
    for url in ("http://127.0.0.1:5678/webhookx", "http://127.0.0.1:5679/webhook/x", "http://127.0.0.1/webhook/x",
                "http://127.0.0.1:5678/", "http://127.0.0.1:5678/Webhook/x", "http://hooks.example/"):
        with pytest.raises(EgressRefused):
            policy.check(url)
    assert policy.check("https://hooks.example:443/any").port == 443  # any port: none named
    default_port = EgressPolicy(["https://hooks.example:443"], resolver=_no_dns)
    default_port.check("https://hooks.example/x")  # the default port is port 443
    with pytest.raises(EgressRefused):
        default_port.check("https://hooks.example:8443/x")


def test_a_bare_scheme_reaches_public_addresses_only():
    policy = EgressPolicy(["https://"], resolver=_no_dns)
    assert not policy.check("https://203.0.114.9/hook").named
    for url in ("https://10.23.45.67/", "https://127.0.0.1/", "https://[fd00::1]/", "https://100.64.1.1/",
                "https://[::ffff:10.0.0.1]/"):
        with pytest.raises(EgressRefused, match="not a public address"):
            policy.check(url)
    with pytest.raises(EgressRefused):
        policy.check("http://203.0.114.9/")  # scheme must match


def test_a_private_address_needs_an_entry_naming_it():
    with pytest.raises(EgressRefused, match="not allowed"):
        EgressPolicy(resolver=_no_dns).check("http://10.23.45.67:5678/webhook/x")
    named = EgressPolicy(["http://10.23.45.67"], resolver=_no_dns)
    assert named.check("http://10.23.45.67:5678/webhook/x").named
    assert named.check("http://0x0a.23.45.67:5678/").host == "10.23.45.67"
    with pytest.raises(EgressRefused):
        named.check("http://10.23.45.68:5678/")


ISSUE_URLS = ["http://169.254.169.254/latest/meta-data/", "http://10.23.45.67:5678/webhook/x",
              "http://[fe80::1]/hook", "http://2852039166/"]
NEVER_URLS = (
    [f"http://{s}/latest/meta-data/" for s in METADATA_SPELLINGS]
    + [f"https://{s}/" for s in METADATA_SPELLINGS]
    + ["http://[fe80::1]/", "http://[fe80::1%25eth0]/", "http://[FE80::1%eth0]/", "http://169.254.0.1/",
       "http://[fd00:ec2::254]/", "http://100.100.100.200/", "http://metadata.google.internal/computeMetadata/v1/",
       "http://METADATA.google.internal./", "http://0.0.0.0/", "http://0/", "http://0.0.0.0:5678/", "http://[::]/",
       "http://224.0.0.1/", "http://[ff02::1]/", "http://255.255.255.255/", "http://[::ffff:169.254.169.254]/",
       "http://[::ffff:a9fe:a9fe]/", "http://[64:ff9b::a9fe:a9fe]/", "http://[2002:a9fe:a9fe::1]/",
       "http://[::169.254.169.254]/"]
)


@pytest.mark.parametrize("url", ISSUE_URLS + NEVER_URLS)
def test_refused_with_the_default_list(url):
    with pytest.raises(ValueError):
        EgressPolicy(resolver=_no_dns).check(url)


@pytest.mark.parametrize("url", NEVER_URLS)
def test_refused_whatever_the_list_says(url):
    # The most permissive list there is: any host, either scheme, plus private hosts by name.
    policy = EgressPolicy(["http://", "https://", "http://10.23.45.67", "http://hooks.example"], resolver=_no_dns)
    with pytest.raises(ValueError) as info:
        policy.check(url)
    assert any(w in str(info.value) for w in ("metadata", "link-local", "unspecified", "multicast", "broadcast",
                                               "reserved")), str(info.value)


def test_zone_ids_are_refused():
    with pytest.raises(ValueError, match="link-local"):
        parse_url("http://[fe80::1%25eth0]/")
    with pytest.raises(ValueError, match="zone ids"):
        parse_url("http://[2001:db8::1%25eth0]/")


@pytest.mark.parametrize("entry, message", [
    ("ftp://x", "http:// or https://"),
    ("127.0.0.1:5678", "absolute"),
    ("https://:8443", "no host"),
    ("http:///webhook", "no host"),
    ("https://a@hooks.example", "user name or password"),
    ("http://169.254.169.254", "cloud metadata"),
    ("http://2852039166", "cloud metadata"),
    ("http://[fe80::1]", "link-local"),
    ("http://metadata.google.internal", "cloud metadata"),
    ("http://0.0.0.0", "unspecified"),
    ("http://127.0.0.1/hook?token=1", "query or fragment"),
    ("http://127.0.0.1/a/../b", "'.' or '..'"),
    ("http://1.2.3.999", "not a valid IPv4"),
])
def test_bad_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        AllowEntry.parse(entry)
    with pytest.raises(ValueError, match=r"^allow\.webhooks\.1: "):
        parse_allowlist(["http://127.0.0.1", entry])


def test_bad_entries_are_config_errors_naming_the_entry(tmp_path):
    path = tmp_path / "voxbridge.yaml"
    path.write_text('gateway: {demo: true}\nallow:\n  webhooks: ["http://127.0.0.1", "https://", '
                    '"http://169.254.169.254", "ftp://n8n"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert "allow.webhooks.2:" in text and "cloud metadata" in text
    assert "allow.webhooks.3:" in text and "ftp://" in text
    assert "allow.webhooks.0" not in text and "allow.webhooks.1" not in text


def test_the_default_config_list_is_the_policy_default():
    assert tuple(Config().allow.webhooks) == DEFAULT_ALLOW
    assert [(e.scheme, e.host, e.port, e.path) for e in parse_allowlist(DEFAULT_ALLOW)] == [
        ("http", "127.0.0.1", None, None), ("http", "localhost", None, None), ("http", "::1", None, None)]


# --------------------------------------------------------------------------- resolution


async def _no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"no DNS lookup expected (asked for {host})")


class FakeDns:
    """A resolver whose answers the test changes (DNS rebinding), recording every question."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


async def test_every_resolved_address_is_checked():
    dns = FakeDns({"hooks.example": ["127.0.0.1"]})
    policy = EgressPolicy(["http://hooks.example"], resolver=dns)
    target = policy.check("http://hooks.example:5678/webhook/x")
    assert await policy.resolve(target) == [ipaddress.ip_address("127.0.0.1")]
    assert dns.asked == [("hooks.example", 5678)]

    # Rebinding: the same name now answers the metadata address, alone or among good ones.
    for answer in (["169.254.169.254"], ["127.0.0.1", "169.254.169.254"], ["::ffff:169.254.169.254"],
                   ["fe80::1%eth0"], ["0.0.0.0"]):
        dns.answers["hooks.example"] = answer
        with pytest.raises(EgressRefused, match=r"hooks.example resolves to"):
            await policy.resolve(target)


async def test_a_wildcard_name_must_resolve_to_public_addresses_only():
    dns = FakeDns({"public.example": ["203.0.114.9", "2606:4700::1111", "203.0.114.9"],
                   "internal.example": ["203.0.114.9", "10.0.0.5"]})
    policy = EgressPolicy(["https://"], resolver=dns)
    addrs = await policy.resolve(policy.check("https://public.example/hook"))
    assert [str(a) for a in addrs] == ["203.0.114.9", "2606:4700::1111"]  # de-duplicated, in order
    with pytest.raises(EgressRefused, match=r"10.0.0.5, not a public address"):
        await policy.resolve(policy.check("https://internal.example/hook"))
    # The same name, named by an entry, may resolve to a private address.
    named = EgressPolicy(["https://internal.example"], resolver=dns)
    assert len(await named.resolve(named.check("https://internal.example/hook"))) == 2


async def test_resolution_failures_are_reported_not_refused():
    dns = FakeDns({"empty.example": []})
    policy = EgressPolicy(["https://"], resolver=dns, resolve_timeout=0.05)
    with pytest.raises(ResolveFailed, match=r"cannot resolve nowhere.example"):
        await policy.resolve(policy.check("https://nowhere.example/"))
    with pytest.raises(ResolveFailed, match="no addresses"):
        await policy.resolve(policy.check("https://empty.example/"))

    async def hangs(host: str, port: int) -> list[str]:
        import asyncio
        await asyncio.Event().wait()
        return []

    slow = EgressPolicy(["https://"], resolver=hangs, resolve_timeout=0.05)
    with pytest.raises(ResolveFailed, match=r"no answer within 0.05 s"):
        await slow.resolve(slow.check("https://slow.example/"))


async def test_literal_addresses_are_not_looked_up():
    policy = EgressPolicy(resolver=_no_dns)
    assert await policy.resolve(policy.check("http://127.0.0.1:5678/")) == [ipaddress.ip_address("127.0.0.1")]


async def test_the_system_resolver_finds_localhost():
    policy = EgressPolicy()
    addrs = await policy.resolve(policy.check("http://localhost:5678/webhook/x"))
    assert addrs and all(a.is_loopback for a in addrs)
