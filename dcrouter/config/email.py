"""
C{[email]} and C{[email.rule:PATTERN]}: the mail edge, as configuration.

C{[email] ports} become ordinary routes (L{emailRoutes}): each public port
forwards, with a PROXY v2 header so the mail server sees the real client,
to an internal listener on 127.0.0.1 (25 -> 10025, 587 -> 10587,
465 -> 10465 unless C{internal_ports} says otherwise). Each rule says how
mail for some recipients is delivered; the most specific pattern wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

from attrs import field, frozen
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dcrouter.config import values
from dcrouter.config.errors import ErrorCollector, withCommentHint
from dcrouter.config.filechecks import exposedSecret
from dcrouter.config.model import PYTHON, HostPort, RawValue, RouteConfig, Source

if TYPE_CHECKING:
    from dcrouter.config.ini import IniSection

SECTION = "email"
RULE_PREFIX = "email.rule:"
#: The names of the routes L{emailRoutes} makes (C{email-25}): reserved, no
#: route of the file may take one.
ROUTE_PREFIX = "email-"
MODES = ("forward", "mta", "local", "reject")
TLS_CHOICES = ("required", "opportunistic", "off")
_MODES_BY_PORT = {25: "mx", 587: "submission", 465: "submissions"}
_INTERNAL = {25: 10025, 587: 10587, 465: 10465}
_EMAIL_KEYS = (
    "hostname", "ports", "internal_ports", "submission_ports", "submissions_ports",
    "max_size", "max_recipients", "auth", "users", "sender_login_match", "senders",
    "default_mode", "default_server", "default_tls", "domains",
    "dkim_selector", "dkim_key", "dkim_domain", "proxy_interfaces",
)
_RULE_KEYS = ("mode", "target", "tls", "dkim_selector", "dkim_key", "dkim_domain", "text")


@frozen
class Dkim:
    """
    A DKIM key to sign with: the mail an authenticated user submitted that
    leaves through the rule carrying it.

    @ivar domain: the C{d=} domain the key is published under; C{None}: the
        domain of each message's C{From:} address.
    """

    selector: str
    key: str
    domain: Optional[str] = None


@frozen
class EmailRule:
    """C{[email.rule:PATTERN]}: how mail for matching recipients is delivered."""

    pattern: str
    mode: str
    target: Optional[HostPort] = None
    tls: str = "opportunistic"
    dkim: Optional[Dkim] = None
    text: str = "mailbox unavailable"
    source: Source = field(default=PYTHON, eq=False)


@frozen
class EmailSettings:
    """
    C{[email]}: the mail server behind the router.

    @ivar ports: public ports; each is 25-style (mx), 587-style (submission,
        STARTTLS then AUTH) or 465-style (implicit TLS, AUTH), by number.
    @ivar internal: public port -> internal port on 127.0.0.1.
    @ivar roles: public port -> its kind, for ports other than 25, 587 and
        465 (C{submission_ports}, C{submissions_ports}).
    @ivar domains: the domains mail is accepted for from anyone (besides
        the rules' own domains); others only from authenticated users.
    @ivar users: C{name:hash} entries for C{auth = static}.
    @ivar sender_login_match: an authenticated client's MAIL FROM must be
        an address its login owns (Postfix's
        C{reject_sender_login_mismatch}): the login itself if it is an
        address, else the login at any domain served here, or one
        C{senders} gives it.
    @ivar senders: login -> the further senders it may use: addresses
        (C{local@domain}, the local part lower-case) and C{*@domain}.
    @ivar dkim: the key of the default rule (mail no rule matches).
    @ivar proxy_interfaces: addresses other servers reach this one at
        through a proxy or NAT (a load balancer's, a public address
        forwarded here): an MX host at one of them is this server, for the
        MX loop check (Postfix's C{proxy_interfaces}).
    """

    hostname: str
    ports: tuple[int, ...] = (25,)
    internal: tuple[tuple[int, int], ...] = ()
    roles: tuple[tuple[int, str], ...] = ()
    max_size: int = 25 << 20
    max_recipients: int = 100
    auth: str = "none"
    users: Optional[RawValue] = None
    sender_login_match: bool = True
    senders: tuple[tuple[str, tuple[str, ...]], ...] = ()
    default_mode: str = "mta"
    default_server: Optional[HostPort] = None
    default_tls: str = "opportunistic"
    domains: tuple[str, ...] = ()
    dkim: Optional[Dkim] = None
    proxy_interfaces: tuple[str, ...] = ()
    rules: tuple[EmailRule, ...] = ()
    #: Where each key was written, for errors found on the floor above.
    keySources: Mapping[str, Source] = field(factory=dict, eq=False)

    def internalPort(self, port: int) -> int:
        return dict(self.internal).get(port, _INTERNAL.get(port, 10000 + port))

    def modeOf(self, port: int) -> str:
        """mx, submission (STARTTLS, AUTH) or submissions (implicit TLS, AUTH)."""
        return dict(self.roles).get(port, _MODES_BY_PORT.get(port, "mx"))


def emailRoutes(settings: Optional[EmailSettings]) -> tuple[RouteConfig, ...]:
    """The router's routes for the mail ports: forward with PROXY v2, inside."""
    if settings is None:
        return ()
    return tuple(
        RouteConfig(
            name=f"{ROUTE_PREFIX}{port}",
            ports=(port,),
            action="forward",
            # 465-style: the router terminates TLS and says so in the
            # PROXY v2 header (PP2_TYPE_SSL).
            tls="terminate" if settings.modeOf(port) == "submissions" else None,
            options={
                "target": f"127.0.0.1:{settings.internalPort(port)}",
                "proxy_protocol": "v2",
                "idle_timeout": "600s",
            },
            # A clash of its port is at the line of [email] ports.
            keySources={"ports": settings.keySources.get("ports", PYTHON)},
        )
        for port in settings.ports
    )


def parseEmailSections(
    sections: Iterable[IniSection], errors: ErrorCollector
) -> Optional[EmailSettings]:
    """C{[email]} and its rules, or C{None} when there is no C{[email]}."""
    main: Any = None
    rules = []
    for section in sections:
        if section.name == SECTION:
            main = section
        else:
            rule = _rule(section, errors)
            if rule is not None:
                rules.append(rule)
    if main is None:
        if rules:
            errors.add("[email.rule:...] without [email]", rules[0].source, "email")
        return None
    return _email(main, tuple(rules), errors)


class _Reader:
    def __init__(self, section: Any, errors: ErrorCollector, known: Sequence[str]) -> None:
        self.section = section
        self.errors = errors
        for key, value in section.values.items():
            if key not in known:
                errors.add(f"unknown key (known: {', '.join(known)})", value.source,
                           section.name, key)

    def get(self, key: str, parse: Any, default: Any) -> Any:
        value = self.section.values.get(key)
        if value is None:
            return default
        try:
            return parse(value.text)
        except ValueError as e:
            self.errors.add(withCommentHint(str(e), value.text), value.source,
                            self.section.name, key)
            return default

    def source(self, key: Optional[str]) -> Source:
        value = self.section.values.get(key) if key else None
        return value.source if value is not None else self.section.source

    def error(self, key: Optional[str], message: str) -> None:
        self.errors.add(message, self.source(key), self.section.name, key)

    def warn(self, key: Optional[str], message: str) -> None:
        self.errors.warn(message, self.source(key), self.section.name, key)


def _email(section: Any, rules: tuple[EmailRule, ...], errors: ErrorCollector) -> EmailSettings:
    keys = _Reader(section, errors, _EMAIL_KEYS)
    hostname = keys.get("hostname", values.parseDomain, "")
    if not hostname:
        keys.error("hostname", "required: the name this server greets with")
    ports = keys.get("ports", values.parsePorts, (25,))
    internal = keys.get("internal_ports", values.parsePorts, ())
    if internal and len(internal) != len(ports):
        keys.error("internal_ports", f"give one internal port per public port ({len(ports)})")
        internal = ()
    roles = []
    for key, role in (("submission_ports", "submission"), ("submissions_ports", "submissions")):
        for port in keys.get(key, values.parsePorts, ()):
            if port not in ports:
                keys.error(key, f"{port} is not one of ports")
            roles.append((port, role))
    auth = keys.get("auth", lambda t: values.parseChoice(t, ("none", "static", "ldap")), "none")
    users = section.values.get("users")
    if auth == "static" and users is None:
        keys.error("auth", "auth = static needs users (name:hash, ...)")
    kinds = {**_MODES_BY_PORT, **dict(roles)}
    if any(kinds.get(port, "mx") != "mx" for port in ports) and auth == "none":
        keys.error("auth", "submission ports (587, 465) need auth (static or ldap)")
    mode = keys.get("default_mode", _modeName, "mta")
    server = keys.get("default_server", lambda t: values.parseHostPort(t, 25), None)
    if mode == "forward" and server is None:
        keys.error("default_mode", "default_mode = forward needs default_server")
    return EmailSettings(
        hostname=hostname,
        ports=ports,
        internal=tuple(zip(ports, internal, strict=True)) if internal else (),
        roles=tuple(roles),
        max_size=keys.get("max_size", lambda t: values.parseSize(t, 1024), 25 << 20),
        max_recipients=keys.get(
            "max_recipients", lambda t: values.parseInt(t, 1, 10_000), 100
        ),
        auth=auth,
        users=RawValue(users.text, users.source) if users is not None else None,
        sender_login_match=keys.get("sender_login_match", values.parseBool, True),
        senders=keys.get("senders", parseSenders, ()),
        default_mode=mode,
        default_server=server,
        default_tls=keys.get("default_tls", lambda t: values.parseChoice(t, TLS_CHOICES),
                             "opportunistic"),
        domains=keys.get("domains", values.parseDomains, ()),
        dkim=_dkim(keys),
        proxy_interfaces=keys.get("proxy_interfaces", values.parseAddresses, ()),
        rules=rules,
        keySources={key: value.source for key, value in section.values.items()},
    )


def parseSenders(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """
    C{login: address, *@domain, ...} lines: the senders each login may use
    besides its own (C{sender_login_match}). Logins compare without regard
    to case, as do local parts here.
    """
    logins: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        login, colon, rest = line.partition(":")
        login = login.strip().lower()
        if not colon or not login or any(c.isspace() for c in login):
            raise ValueError(f"{line!r} is not 'login: address, *@domain, ...'")
        patterns = []
        for item in rest.split(","):
            item = item.strip()
            local, at, domain = item.rpartition("@")
            if not at or not local or any(c.isspace() or c in "<>" for c in local):
                raise ValueError(f"{item!r} (for {login}) is not an address or *@domain")
            patterns.append(f"{local.lower()}@{_exactDomain(domain)}")
        logins[login] = logins.get(login, ()) + tuple(patterns)
    return tuple(logins.items())


def _modeName(text: str) -> str:
    """A delivery mode's name; which exist is known one floor up (plugins)."""
    word = text.strip().lower()
    if not word or not all(c.isalnum() or c in "-_." for c in word):
        raise ValueError(f"{text.strip()!r} is not a mode name")
    return word


def parseDkimKey(pem: bytes) -> rsa.RSAPrivateKey:
    """
    The DKIM private key in C{pem} (PKCS#1 or PKCS#8).

    @raise ValueError: not an unencrypted RSA private key of 1024 bits or more.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a usable private key: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("DKIM keys must be RSA")
    if key.key_size < 1024:
        raise ValueError(f"an RSA key of {key.key_size} bits is too small for DKIM")
    return key


def _dkim(keys: _Reader) -> Optional[Dkim]:
    """
    C{dkim_selector}, C{dkim_key} (relative to the file) and C{dkim_domain},
    if given; the key is read here, so that a missing or unusable one is an
    error at its line rather than a failed start.
    """
    selector = keys.get("dkim_selector", str.strip, None)
    keyFile = keys.get("dkim_key", str.strip, None)
    domain = keys.get("dkim_domain", _exactDomain, None)
    if (selector is None) != (keyFile is None):
        given = "dkim_key" if keyFile is not None else "dkim_selector"
        keys.error(given, "give dkim_selector and dkim_key together")
        return None
    if selector is None or keyFile is None:
        if domain is not None:
            keys.error("dkim_domain", "dkim_domain needs dkim_selector and dkim_key")
        return None
    if not os.path.isabs(keyFile):
        here = os.path.dirname(os.path.abspath(keys.section.source.file))
        keyFile = os.path.join(here, keyFile)
    try:
        with open(keyFile, "rb") as f:
            parseDkimKey(f.read())
    except OSError as e:
        keys.error("dkim_key", f"cannot read {keyFile}: {e.strerror}")
        return None
    except ValueError as e:
        keys.error("dkim_key", f"{keyFile}: {e}")
        return None
    problem = exposedSecret(keyFile)
    if problem is not None:
        keys.warn("dkim_key", problem)
    return Dkim(selector, keyFile, domain)


def _exactDomain(text: str) -> str:
    name = values.parseDomain(text)
    if name.startswith("*"):
        raise ValueError(f"{text.strip()!r}: a domain, not a wildcard")
    return name


def _rule(section: Any, errors: ErrorCollector) -> Optional[EmailRule]:
    keys = _Reader(section, errors, _RULE_KEYS)
    pattern = section.name[len(RULE_PREFIX):].strip().lower()
    if not pattern or " " in pattern:
        keys.error(None, f"{pattern!r} is not a pattern (*@example.com, *.example.com, a@b)")
        return None
    mode = keys.get("mode", _modeName, None)
    if mode is None:
        if "mode" not in section.values:
            keys.error("mode", f"required: {', '.join(MODES)}, or a plugin's mode")
        return None
    target = keys.get("target", lambda t: values.parseHostPort(t, 25), None)
    if mode == "forward" and target is None:
        keys.error("target", "mode = forward needs target (host:port)")
    return EmailRule(
        pattern=pattern,
        mode=mode,
        target=target,
        tls=keys.get("tls", lambda t: values.parseChoice(t, TLS_CHOICES), "opportunistic"),
        dkim=_dkim(keys),
        text=keys.get("text", str.strip, "mailbox unavailable"),
        source=section.source,
    )
