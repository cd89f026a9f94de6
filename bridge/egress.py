"""Where the bridge may send webhook deliveries: the egress policy, pure and unit-testable.

A webhook subscription is a URL chosen by whoever holds the API token (or by a web page, if
the API were reachable from a browser). Every call event, transcripts included, is POSTed
there. Without a policy that URL could point at the cloud metadata service
(``http://169.254.169.254/latest/meta-data/``), at a router's admin page on the LAN, or at any
other service only the bridge's host can reach. This module decides, for one URL and for the
addresses its host resolves to, whether a delivery may go out.

The rules, in the order they are applied:

1. **Parse strictly.** Only ``http`` and ``https``; no ``user:password@`` (the classic
   ``http://127.0.0.1@evil.com`` confusion), no whitespace, control characters or backslashes,
   no ``.``/``..`` path segments. Hosts are normalised before anything looks at them:
   percent-decoded, lowercased, trailing dot removed, international names IDNA-encoded, and
   every numeric spelling of an IPv4 address that ``inet_aton`` or a browser accepts turned into
   the address it means (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``,
   ``169.254.43518``, ``169.16689662`` are all 169.254.169.254). A host whose last label is a
   number but which is not a valid IPv4 address is refused, as browsers refuse it.
2. **Never, whatever the allowlist says:** link-local (169.254.0.0/16, fe80::/10), cloud
   metadata (169.254.169.254, fd00:ec2::254, 100.100.100.200, ``metadata.google.internal``),
   unspecified (0.0.0.0/8, ::), multicast, broadcast and reserved addresses; IPv6 zone ids; and
   IPv6 addresses that embed one of those IPv4 addresses (``::ffff:a.b.c.d``, NAT64
   64:ff9b::/96, 6to4 2002::/16, Teredo, IPv4-compatible ``::a.b.c.d``): the embedded address
   is unpacked and checked too.
3. **The allowlist** (``allow.webhooks`` in the configuration): a URL must match an entry.
   Entries are compared on parsed, normalised components, never as raw string prefixes: same
   scheme; same host (if the entry names one); same port (if the entry names one, default
   ports filled in); path under the entry's path on a segment boundary (if the entry has one).
   A bare scheme (``https://``) matches any host.
4. **Non-public addresses** (loopback, private, CGNAT, unique-local, documentation…) are
   reached only through an entry that names that host, by name or literal address. A bare
   scheme entry only ever reaches public (global) addresses.

Rules 2 and 4 apply to every address the host resolves to, at registration and again at every
delivery (:meth:`EgressPolicy.resolve`); the caller then connects to one of exactly those
addresses, so a DNS answer that changes between the check and the connection (DNS rebinding)
cannot redirect a delivery. The resolver is a parameter, so tests can play a rebinding DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, unquote

import idna
from pydantic import AfterValidator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``resolver(host, port)`` → the addresses ``host`` resolves to (strings or ipaddress objects).
Resolver = Callable[[str, int], Awaitable[Sequence[str | IPAddress]]]

#: The default of ``allow.webhooks``: a receiver on this host (n8n on 127.0.0.1:5678, say).
DEFAULT_ALLOW = ("http://127.0.0.1", "http://localhost", "http://[::1]")
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 2048

#: Names of cloud metadata services: refused before any DNS lookup.
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "instance-data",
                            "instance-data.ec2.internal"})

_net = ipaddress.ip_network
#: Never reachable, whatever ``allow.webhooks`` says: (network, why). Most specific first.
_NEVER: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (_net("169.254.169.254/32"), "a cloud metadata address"),
    (_net("100.100.100.200/32"), "a cloud metadata address"),
    (_net("fd00:ec2::254/128"), "a cloud metadata address"),
    (_net("0.0.0.0/8"), "an unspecified address"),
    (_net("::/128"), "an unspecified address"),
    (_net("169.254.0.0/16"), "a link-local address"),
    (_net("fe80::/10"), "a link-local address"),
    (_net("224.0.0.0/4"), "a multicast address"),
    (_net("ff00::/8"), "a multicast address"),
    (_net("255.255.255.255/32"), "the broadcast address"),
    (_net("240.0.0.0/4"), "a reserved address"),
)
#: Not public although Python's ``is_global`` may say so (it differs between versions).
_NOT_PUBLIC = (_net("fec0::/10"), _net("64:ff9b:1::/48"), _net("100.64.0.0/10"))

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_HOSTNAME_CHARS = re.compile(r"[a-z0-9_-]+")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")


class EgressRefused(ValueError):
    """The URL or one of its addresses is not allowed. Permanent: retrying will not help."""


class ResolveFailed(ValueError):
    """The host could not be resolved (in time). Possibly temporary."""


# --------------------------------------------------------------------------- addresses


def parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address written the way ``inet_aton`` and browsers (the WHATWG URL standard) accept
    it: one to four dot-separated parts, each decimal, octal (leading ``0``) or hex (``0x``); the
    last part fills the remaining bytes (``127.1``, ``169.16689662``, ``2852039166``).

    Returns None if ``text`` is a host name (its last label is not a number). Raises ValueError if
    the last label is a number but the whole is not a valid address (``1.2.3.999``,
    ``1.2.3.4.5``, ``08.1.1.1``): such a host is neither a name nor an address.
    """
    labels = text.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    if len(labels) > 4:
        raise ValueError(f"{text!r} is not a valid IPv4 address (more than four parts)")
    values = [_ipv4_part(label, text) for label in labels]
    for v in values[:-1]:
        if v > 255:
            raise ValueError(f"{text!r} is not a valid IPv4 address (a part is over 255)")
    if values[-1] >= 256 ** (5 - len(values)):
        raise ValueError(f"{text!r} is not a valid IPv4 address (out of range)")
    number = values[-1]
    for i, v in enumerate(values[:-1]):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _ipv4_part(label: str, text: str) -> int:
    try:
        if label[:2] in ("0x", "0X"):
            return int(label[2:] or "0", 16)
        if len(label) > 1 and label.startswith("0"):
            return int(label[1:], 8)
        if label.isascii() and label.isdigit():
            return int(label)
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not a valid IPv4 address ({label!r} is not a number)")


def embedded_ipv4(addr: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and so, on many networks, reaches): IPv4-mapped
    ``::ffff:a.b.c.d``, IPv4-translated ``::ffff:0:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64
    64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16, Teredo 2001::/32 (server and client)."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    out: list[ipaddress.IPv4Address] = []
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        out.append(addr.ipv4_mapped)
    elif (int(addr) >> 32) == 0xFFFF0000 or ((int(addr) >> 32) == 0 and int(addr) > 1):  # ::ffff:0:a.b.c.d (SIIT)
        out.append(low32)
    if addr in _net("64:ff9b::/96") or addr in _net("64:ff9b:1::/48"):
        out.append(low32)
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr.teredo is not None:
        out.extend(addr.teredo)
    return out


def never_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` may never be reached, whatever the allowlist says; None if it may be."""
    for candidate in (addr, *embedded_ipv4(addr)):
        for network, why in _NEVER:
            if candidate.version == network.version and candidate in network:
                return why if candidate == addr else f"{why} ({addr} embeds {candidate})"
    return None


def is_public(addr: IPAddress) -> bool:
    """Globally routable, and so is every IPv4 address it embeds."""
    for candidate in (addr, *embedded_ipv4(addr)):
        if not candidate.is_global or any(candidate.version == n.version and candidate in n for n in _NOT_PUBLIC):
            return False
    return True


def _address(value: str | IPAddress) -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    addr = ipaddress.ip_address(value)
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        # getaddrinfo answers fe80::1%eth0 for link-local: what is refused is the address.
        addr = ipaddress.IPv6Address(str(addr).partition("%")[0])
    return addr


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class Target:
    """A webhook URL, parsed and normalised: where a delivery goes."""

    scheme: str
    #: Normalised: an ASCII, lowercase name without trailing dot, or an address's canonical text.
    host: str
    #: The address, if the URL names one (in any spelling); None for a host name.
    ip: IPAddress | None
    #: As written; None means the scheme's default.
    port: int | None
    #: Percent-encoded ASCII, never empty.
    path: str
    query: str | None = None
    #: Whether an allowlist entry that names this host matched (set by :meth:`EgressPolicy.check`).
    named: bool = False

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[self.scheme]

    @property
    def authority(self) -> str:
        """``host[:port]`` as it goes in the ``Host`` header (the port only if not the default)."""
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        if self.port is not None and self.port != DEFAULT_PORTS[self.scheme]:
            return f"{host}:{self.port}"
        return host

    @property
    def origin(self) -> str:
        """``scheme://host[:port]``: what logs and error messages show (never the path or query,
        which may carry a token)."""
        return f"{self.scheme}://{self.authority}"

    def pinned_url(self, addr: IPAddress) -> str:
        """The URL with the host replaced by ``addr``: what the delivery connects to."""
        host = f"[{addr}]" if isinstance(addr, ipaddress.IPv6Address) else str(addr)
        tail = self.path + (f"?{self.query}" if self.query is not None else "")
        return f"{self.scheme}://{host}:{self.effective_port}{tail}"


def _split(url: str, what: str) -> tuple[str, str, str]:
    """``(scheme, authority, rest)``; ValueError naming ``what`` on anything odd."""
    if not isinstance(url, str):
        raise ValueError(f"{what} must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError(f"{what} contains whitespace or control characters")
    if "\\" in url:
        raise ValueError(f"{what} contains a backslash")
    m = _SCHEME.match(url)
    if m is None:
        raise ValueError(f"{what} must be an absolute http:// or https:// URL")
    scheme = m.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{what} must be an http:// or https:// URL, not {scheme}://")
    rest = url[m.end():]
    end = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if i != -1:
            end = min(end, i)
    authority, rest = rest[:end], rest[end:]
    if "@" in authority:
        raise ValueError(f"{what} must not contain a user name or password (user@host)")
    return scheme, authority, rest


def _host_and_port(authority: str, what: str) -> tuple[str, IPAddress | None, int | None]:
    port_text: str | None
    addr: IPAddress | None
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise ValueError(f"{what}: unclosed '[' in the host")
        host_text, port_text = inside, after
        if port_text and not port_text.startswith(":"):
            raise ValueError(f"{what}: unexpected {port_text!r} after the IPv6 address")
        port_text = port_text[1:] if port_text else None
        host, addr = _ipv6_host(host_text, what)
    else:
        if authority.count(":") > 1:
            raise ValueError(f"{what}: IPv6 addresses must be written in brackets ([::1])")
        host_text, colon, port_text_ = authority.partition(":")
        port_text = port_text_ if colon else None
        host, addr = normalise_host(host_text, what)
    port: int | None = None
    if port_text:  # "host:" with nothing after is the default port, as browsers read it
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) <= 65535:
            raise ValueError(f"{what}: invalid port {port_text!r}")
        port = int(port_text)
    return host, addr, port


def _ipv6_host(text: str, what: str) -> tuple[str, ipaddress.IPv6Address]:
    addr_text, pct, zone = unquote(text).partition("%")
    try:
        addr = ipaddress.IPv6Address(addr_text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a valid IPv6 address") from None
    if pct:
        # A zone id only means something for link-local addresses, which are refused anyway;
        # say so when that is the problem, else refuse the zone itself.
        why = never_reason(addr)
        raise ValueError(f"{what}: {addr} is {why}" if why else
                         f"{what}: IPv6 zone ids (%{zone}) are not allowed")
    return str(addr), addr


def normalise_host(text: str, what: str = "host") -> tuple[str, IPAddress | None]:
    """``(host, address)`` for a URL's host (without brackets): percent-decoded, lowercased,
    trailing dot removed, IDNA-encoded; numeric IPv4 spellings turned into the address."""
    try:
        decoded = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: the host is not valid UTF-8 once percent-decoded") from None
    host = decoded.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ValueError(f"{what} has no host")
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True, transitional=False).decode("ascii").lower()
        except idna.IDNAError as exc:
            raise ValueError(f"{what}: {decoded!r} is not a valid international domain name ({exc})") from None
        host = host[:-1] if host.endswith(".") else host
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"{what}: IPv6 addresses must be written in brackets ([::1])")
    addr = parse_ipv4(host)  # raises for "1.2.3.999" and the like
    if addr is not None:
        return str(addr), addr
    labels = host.split(".")
    if len(host) > 253 or not all(0 < len(label) <= 63 and _HOSTNAME_CHARS.fullmatch(label) for label in labels):
        raise ValueError(f"{what}: {decoded!r} is not a valid host name")
    return host, None


def _path_and_query(rest: str, what: str) -> tuple[str, str | None]:
    rest = rest.partition("#")[0]  # never sent
    path, q, query = rest.partition("?")
    path = path or "/"
    for segment in path.split("/"):
        if unquote(segment) in (".", ".."):
            raise ValueError(f"{what}: the path must not contain '.' or '..' segments")
    safe = "/%!$&'()*+,;=:@-._~"
    return quote(path, safe=safe), (quote(query, safe=safe + "?") if q else None)


def parse_url(url: str, what: str = "webhook url") -> Target:
    """Parse and normalise a webhook URL. Raises ValueError (its message names ``what``)."""
    scheme, authority, rest = _split(url, what)
    if not authority:
        raise ValueError(f"{what} has no host")
    host, addr, port = _host_and_port(authority, what)
    path, query = _path_and_query(rest, what)
    return Target(scheme, host, addr, port, path, query)


# --------------------------------------------------------------------------- the allowlist


@dataclass(frozen=True)
class AllowEntry:
    """One ``allow.webhooks`` entry. ``host`` None: any host (a bare scheme, public addresses only)."""

    text: str
    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """Raises ValueError with a precise message (without the entry's position or text)."""
        scheme, authority, rest = _split(text, "entry")
        if not authority:
            if rest:
                raise ValueError("entry has no host (write the scheme alone, e.g. 'https://', for any public host)")
            return cls(text, scheme)
        host, addr, port = _host_and_port(authority, "entry")
        if addr is not None and (why := never_reason(addr)):
            raise ValueError(f"entry names {addr}, {why}: webhooks can never be sent there")
        if host in METADATA_NAMES:
            raise ValueError(f"entry names {host}, a cloud metadata service: webhooks can never be sent there")
        if "?" in rest or "#" in rest:
            raise ValueError("entry must not have a query or fragment (scheme, host, port and path only)")
        path, _ = _path_and_query(rest, "entry")
        path = path.rstrip("/")
        return cls(text, scheme, host, port, path or None)

    def matches(self, target: Target) -> bool:
        if target.scheme != self.scheme:
            return False
        if self.host is not None and target.host != self.host:
            return False
        if self.port is not None and target.effective_port != self.port:
            return False
        if self.path is not None and not (target.path == self.path or target.path.startswith(self.path + "/")):
            return False
        return True


def parse_allowlist(entries: Iterable[str], key: str = "allow.webhooks") -> list[AllowEntry]:
    """Every entry parsed; a bad one raises ValueError naming ``key.N``."""
    out = []
    for i, text in enumerate(entries):
        try:
            out.append(AllowEntry.parse(text))
        except ValueError as exc:
            raise ValueError(f"{key}.{i}: {exc} (got {text!r})") from None
    return out


def check_allow_entry(text: str) -> str:
    """Validate one ``allow.webhooks`` item at config load; pydantic names its position."""
    AllowEntry.parse(text)
    return text


#: The type of an ``allow.webhooks`` item in bridge/config.py: a bad entry is a config error
#: naming ``allow.webhooks.N``, at load time rather than when the first webhook is created.
WebhookAllowEntry = Annotated[str, AfterValidator(check_allow_entry)]


# --------------------------------------------------------------------------- the policy


async def system_resolver(host: str, port: int) -> list[str]:
    """``getaddrinfo`` in the event loop's executor (it blocks): every TCP address of ``host``."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # sockaddr[0] is the address string for AF_INET/AF_INET6, all SOCK_STREAM lookups return
    return [str(info[4][0]) for info in infos]


class EgressPolicy:
    """Decides where webhook deliveries may go. See the module docstring for the rules.

    ``allow``: ``allow.webhooks`` entries (ValueError naming ``allow.webhooks.N`` if one is
    bad). ``resolver``: async ``(host, port) -> addresses`` (default: ``getaddrinfo`` off the
    loop), bounded by ``resolve_timeout`` seconds.
    """

    def __init__(self, allow: Iterable[str] = DEFAULT_ALLOW, *, resolver: Resolver | None = None,
                 resolve_timeout: float = 5.0) -> None:
        self.entries = parse_allowlist(allow)
        self._resolver = resolver or system_resolver
        self.resolve_timeout = resolve_timeout

    def check(self, url: str) -> Target:
        """Everything that can be decided without DNS: the URL, the allowlist, a literal address.

        Returns the :class:`Target` (with ``named`` set). Raises ValueError for a malformed URL,
        :class:`EgressRefused` for one the policy refuses — each with a message that says why.
        """
        target = parse_url(url)
        where = target.origin
        if target.host in METADATA_NAMES:
            raise EgressRefused(f"webhook url {where}: {target.host} is a cloud metadata service, never allowed")
        if target.ip is not None and (why := never_reason(target.ip)):
            raise EgressRefused(f"webhook url {where}: {target.ip} is {why}, never allowed")
        matching = [e for e in self.entries if e.matches(target)]
        if not matching:
            allowed = ", ".join(e.text for e in self.entries) or "nothing"
            raise EgressRefused(f"webhook url {where} is not allowed: allow.webhooks permits {allowed}")
        named = any(e.host is not None for e in matching)
        if target.ip is not None and not named and not is_public(target.ip):
            raise EgressRefused(f"webhook url {where}: {target.ip} is not a public address; an allow.webhooks "
                                f"entry must name it")
        return Target(target.scheme, target.host, target.ip, target.port, target.path, target.query, named)

    async def resolve(self, target: Target) -> list[IPAddress]:
        """The addresses to connect to for ``target`` (from :meth:`check`), every one checked.

        Raises :class:`EgressRefused` if any address is refused (one bad answer is enough: a
        rebinding DNS mixes them), :class:`ResolveFailed` if the host does not resolve in time.
        """
        if target.ip is not None:
            return [target.ip]
        try:
            async with asyncio.timeout(self.resolve_timeout):
                answers = await self._resolver(target.host, target.effective_port)
        except TimeoutError:
            raise ResolveFailed(f"cannot resolve {target.host}: no answer within {self.resolve_timeout:g} s") from None
        except OSError as exc:  # socket.gaierror
            raise ResolveFailed(f"cannot resolve {target.host}: {exc.strerror or exc}") from None
        addrs: list[IPAddress] = []
        for answer in answers:
            try:
                addr = _address(answer)
            except ValueError:
                raise ResolveFailed(f"cannot resolve {target.host}: bad answer {answer!r}") from None
            if why := never_reason(addr):
                raise EgressRefused(f"{target.host} resolves to {addr}, {why}: refused")
            if not target.named and not is_public(addr):
                raise EgressRefused(f"{target.host} resolves to {addr}, not a public address; an allow.webhooks "
                                    f"entry must name {target.host}")
            if addr not in addrs:
                addrs.append(addr)
        if not addrs:
            raise ResolveFailed(f"cannot resolve {target.host}: no addresses")
        return addrs
