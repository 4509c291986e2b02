"""
Parsers for single configuration values.

Each takes the text as written and returns a typed value, or raises
L{ValueError} with a message that reads well after C{"key: "}.
"""

from __future__ import annotations

import re
from ipaddress import ip_address, ip_network
from typing import Optional

import idna

from dcrouter.config.model import HostPort, IPNetwork

_MAX_LISTENERS_PER_ROUTE = 1024
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
#: The longest duration any key takes (10 years): more is a slip of the
#: keyboard (a drain that waits for ever), not a setting.
MAX_DURATION = 10 * 365 * 86400.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}


def _clip(text: str, length: int = 40) -> str:
    return text if len(text) <= length else text[:length] + "..."


def splitList(text: str) -> list[str]:
    """Split a comma- or newline-separated list, dropping empty items."""
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


def parsePort(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return int(text)


def parsePorts(text: str) -> tuple[int, ...]:
    """C{80, 443, 8000-8010} -> every port, in order, without repeats."""
    ports: list[int] = []
    items = splitList(text)
    if not items:
        raise ValueError("no port given")
    for item in items:
        low, dash, high = item.partition("-")
        try:
            first = parsePort(low)
            last = parsePort(high) if dash else first
        except ValueError:
            raise ValueError(f"{item!r} is not a port or range") from None
        if last < first:
            raise ValueError(f"range {item!r} runs backwards")
        ports.extend(range(first, last + 1))
    unique = tuple(dict.fromkeys(ports))
    if len(unique) > _MAX_LISTENERS_PER_ROUTE:
        raise ValueError(
            f"{len(unique)} ports is more than {_MAX_LISTENERS_PER_ROUTE} listeners"
        )
    return unique


def parseNetwork(text: str) -> IPNetwork:
    """An address or CIDR block; host bits may be set (C{10.1.2.3/8})."""
    try:
        return ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not an IP address or CIDR block") from None


def parseNetworks(text: str) -> tuple[IPNetwork, ...]:
    return tuple(parseNetwork(item) for item in splitList(text))


def parseAddresses(text: str) -> tuple[str, ...]:
    """IP addresses (no blocks, no names), as Python writes them, without repeats."""
    addresses: list[str] = []
    for item in splitList(text):
        try:
            addresses.append(str(ip_address(item)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
    return tuple(dict.fromkeys(addresses))


def normalizeDomain(name: str) -> str:
    """
    Lower-case, no trailing dot; IDNA names become their A-label form.

    Non-ASCII labels are encoded one by one with IDNA 2008 and UTS #46
    mapping, as browsers send them in SNI (C{straße} is C{xn--strae-oqa},
    not IDNA 2003's C{strasse}); ASCII labels such as C{*} and C{_dmarc}
    pass unchanged. A label that cannot be encoded is kept as written, so
    that the caller's check rejects it.
    """
    labels = name.strip().rstrip(".").lower().split(".")
    return ".".join(_aLabel(label) for label in labels)


def _aLabel(label: str) -> str:
    if label.isascii():
        return label
    try:
        return idna.encode(label, uts46=True).decode("ascii")
    except idna.IDNAError:
        return label


def parseDomain(text: str) -> str:
    """An exact name or a C{*.suffix} wildcard."""
    name = normalizeDomain(text)
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            raise ValueError(f"{text.strip()!r} is a wildcard without a suffix")
    if not labels or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{text.strip()!r} is not a domain name or *.wildcard")
    if len(name) > 253:
        raise ValueError(f"{text.strip()[:40]!r}... is longer than 253 characters")
    return name


def parseDomains(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(parseDomain(item) for item in splitList(text)))


def parseHostPort(text: str, defaultPort: Optional[int] = None) -> HostPort:
    """C{host:port}, C{[v6]:port}, or a bare host when a default port is given."""
    text = text.strip()
    match = re.match(r"^\[([0-9a-fA-F:.]+)\](?::(\d+))?$", text, re.ASCII)
    if match:
        host, port = match.group(1), match.group(2)
        try:
            ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r} has a bad IPv6 address") from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            host, port = text, None
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 targets as [address]:port")
        if host and not _isHostName(normalizeDomain(host)):
            raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
        host = normalizeDomain(host)
    if port is None:
        if defaultPort is None:
            raise ValueError(f"{text!r} has no port (write host:port)")
        portNumber = defaultPort
    else:
        portNumber = parsePort(port)
    if not host:
        raise ValueError(f"{text!r} has no host")
    return HostPort(host.lower(), portNumber)


def parseHostPorts(text: str) -> tuple[HostPort, ...]:
    items = splitList(text)
    if not items:
        raise ValueError("no target given")
    return tuple(parseHostPort(item) for item in items)


def parseWeightedTargets(text: str) -> tuple[tuple[HostPort, int], ...]:
    """C{10.0.0.1:80 weight=3, 10.0.0.2:80}: targets with weights (default 1)."""
    items = splitList(text)
    if not items:
        raise ValueError("no target given")
    targets = []
    for item in items:
        address, _, rest = item.partition(" ")
        weight = 1
        rest = rest.strip()
        if rest:
            key, equals, value = rest.partition("=")
            if key.strip() != "weight" or not equals:
                raise ValueError(f"{item!r}: write 'host:port' or 'host:port weight=N'")
            weight = parseInt(value, 0, 1000)
        targets.append((parseHostPort(address), weight))
    return tuple(targets)


def _isHostName(host: str) -> bool:
    """A normalized DNS name (see L{normalizeDomain}) or an IPv4 literal."""
    return len(host) <= 253 and all(_LABEL.match(label) for label in host.split("."))


def parseBindAddress(text: str) -> str:
    """A listening address: an IP literal (C{0.0.0.0}, C{::}, C{127.0.0.1})."""
    text = text.strip().strip("[]")
    try:
        return str(ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address to listen on") from None


def parseBindAddresses(text: str) -> tuple[str, ...]:
    items = splitList(text)
    if not items:
        raise ValueError("no address given")
    return tuple(dict.fromkeys(parseBindAddress(item) for item in items))


def parseDuration(text: str, maximum: float = MAX_DURATION) -> float:
    """
    Seconds: C{30}, C{30s}, C{500ms}, C{10m}, C{1h}, C{5d}; at most
    L{MAX_DURATION} unless C{maximum} says otherwise (C{math.inf}: the
    caller bounds it, and 400 digits are C{inf}).
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"{text.strip()!r} is not a duration (e.g. 30s, 500ms, 10m)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > maximum:  # (inf too)
        limit = "10 years (3650d)" if maximum == MAX_DURATION else f"{maximum:g} seconds"
        raise ValueError(f"{_clip(text.strip())!r} is longer than {limit}")
    return seconds


def parseTimeout(text: str) -> float:
    """A duration that must be able to pass before it fires: longer than 0."""
    seconds = parseDuration(text)
    if seconds <= 0:
        raise ValueError(f"{text.strip()!r} is not longer than 0")
    return seconds


def parseBool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{text.strip()!r} is not yes or no")


def parseInt(text: str, minimum: int = 0, maximum: Optional[int] = None) -> int:
    text = text.strip()
    # int() would also take other scripts' digits and 1_000.
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{_clip(text)!r} is not a whole number")
    try:
        value = int(text)
    except ValueError:  # more digits than int() converts
        raise ValueError(f"{_clip(text)!r} is not a whole number") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{value} is out of range ({bound})")
    return value


def parseChoice(text: str, choices: tuple[str, ...]) -> str:
    word = text.strip().lower()
    if word not in choices:
        raise ValueError(f"{text.strip()!r} is not one of {', '.join(choices)}")
    return word


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parsePaths(text: str) -> tuple[str, ...]:
    """URL path prefixes (C{/api/}) or globs (C{/img/*.png}), one per item."""
    paths = []
    for item in splitList(text):
        if not item.startswith("/") or any(c.isspace() or ord(c) < 0x20 for c in item):
            raise ValueError(f"{item!r} is not a path (it starts with / and has no spaces)")
        paths.append(item)
    if not paths:
        raise ValueError("no path given")
    return tuple(dict.fromkeys(paths))


def parseMethods(text: str) -> tuple[str, ...]:
    """HTTP methods (C{GET, POST}); upper-cased, as methods are case-sensitive tokens."""
    methods = []
    for item in splitList(text):
        if not _TOKEN.fullmatch(item):
            raise ValueError(f"{item!r} is not an HTTP method")
        methods.append(item.upper())
    if not methods:
        raise ValueError("no method given")
    return tuple(dict.fromkeys(methods))


def parseHeaderMatches(text: str) -> tuple[tuple[str, str], ...]:
    """
    C{Name: glob} lines, one per line; every one must match a request.

    The name is matched without regard to case; the value is a glob
    (C{*} and C{?}), case-sensitive; C{Name: *} asks only that it be present.
    """
    matches = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _TOKEN.fullmatch(name) or not value:
            raise ValueError(f"{line!r} is not 'Name: value' (a glob; * for any value)")
        matches.append((name.lower(), value))
    if not matches:
        raise ValueError("no header given")
    return tuple(matches)


_SIZE = re.compile(r"(\d{1,15})\s*([kmg]?)i?b?", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parseSize(text: str, minimum: int = 0) -> int:
    """A size in bytes: C{512}, C{16k}, C{10M}, C{1g} (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text.strip()!r} is not a size (like 512, 16k, 10m, 1g)")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size < minimum:
        raise ValueError(f"{text.strip()} is less than the minimum, {minimum} bytes")
    return size

