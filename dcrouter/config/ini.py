"""
The INI front end of the configuration model.

L{readIni} splits the text into sections and keys, keeping each one's line
so that every error can say C{file:line}; L{parseConfig} checks the common
keys into a L{RouterConfig}. A route's other keys belong to its action
plugin: they are kept raw in L{RouteConfig.options} and checked one floor
up, where the plugins are known.

Grammar: C{[section]} headers; C{key = value} lines, the key a lower-case
word starting in the first column; lines indented by whitespace continue
the value above (joined with newlines); whole-line comments start with C{#}
or C{;}, after optional whitespace; blank lines are ignored. There are no
inline comments: a C{#} after a value is part of the value.

Every error is collected and all are raised together as L{ConfigErrors}.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Optional, TypeVar, cast

from attrs import evolve, field, frozen
from OpenSSL import SSL

from dcrouter.config import values
from dcrouter.config.certcheck import checkCertificatePair
from dcrouter.config.dns import SECTION as DNS_SECTION
from dcrouter.config.dns import ZONE_PREFIX, parseDnsSections
from dcrouter.config.email import ROUTE_PREFIX as EMAIL_ROUTE_PREFIX
from dcrouter.config.email import RULE_PREFIX as EMAIL_RULE_PREFIX
from dcrouter.config.email import SECTION as EMAIL_SECTION
from dcrouter.config.email import parseEmailSections
from dcrouter.config.errors import (
    ConfigError,
    ConfigErrors,
    ErrorCollector,
    firstOfEach,
    withCommentHint,
)
from dcrouter.config.filechecks import exposedSecret, unwritableDirectory
from dcrouter.config.model import (
    TLS_MODES,
    AcmeConfig,
    AdminSettings,
    CertificatePair,
    DaemonSettings,
    Defaults,
    HttpSettings,
    LDAPSettings,
    Limits,
    LogFormat,
    RawValue,
    RouteConfig,
    RouterConfig,
    Source,
    SpliceMode,
    TlsMode,
    TlsSettings,
)
from dcrouter.config.validate import checkModel

T = TypeVar("T")

_HEADER = re.compile(r"\[([^\[\]]*)\]")
_HEADER_COMMENT = re.compile(r"\[([^\[\]]*)\]\s*[#;].*")
_KEY_LINE = re.compile(r"([^=\s][^=]*?)\s*=(.*)")
_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_WORD = re.compile(r"[A-Za-z0-9_.-]+")

_LIMIT_KEYS = (
    "ip_allow",
    "ip_block",
    "max_connections",
    "max_connections_per_ip",
    "connection_rate_per_minute",
)
_DAEMON_KEYS = (
    "state_dir", "log_format", "hello_timeout", "drain_timeout", "retire_timeout", "workers",
    "splice",
)
_DEFAULTS_KEYS = (
    "target",
    "bind",
    *_LIMIT_KEYS,
    "connect_timeout",
    "idle_timeout",
    "fin_timeout",
    "trusted_proxies",
)
_TLS_KEYS = ("cert", "key", "min_version", "ciphers")
_LDAP_KEYS = (
    "url",
    "base",
    "user_filter",
    "bind_dn",
    "bind_password_file",
    "start_tls",
    "ca_file",
    "require_group",
    "connect_timeout",
    "timeout",
)
_HTTP_KEYS = (
    "max_header_size",
    "max_headers",
    "max_uri_length",
    "max_body_size",
    "header_timeout",
    "keepalive_timeout",
    "body_timeout",
    "response_timeout",
    "send_timeout",
)
# A route's keys that config checks; every other key is its action's.
_ROUTE_KEYS = (
    "ports",
    "bind",
    "domains",
    "client_ip",
    "priority",
    "action",
    "tls",
    "cert",
    "key",
    "certificate",
    "path",
    "method",
    "headers",
    *_LIMIT_KEYS,
)
_KNOWN_SECTIONS = (
    "[dcrouter], [defaults], [tls], [http], [ldap], [admin], [acme], [dns], "
    "[dns.zone:NAME], [email], [email.rule:PATTERN], [route:NAME]"
)
_TERMINATING = ("terminate", "terminate-and-reencrypt")
_PRIORITY_BOUND = 1_000_000


@frozen
class IniValue:
    """
    The text of one key, continuation lines joined with newlines.

    @ivar lines: the file line of each line of C{text}, so that an error in
        one line of a multi-line value (a DNS record) can name its own.
    """

    text: str
    source: Source
    lines: tuple[int, ...] = field(default=(), eq=False)


@frozen
class IniSection:
    """One C{[name]} header and its keys, in file order."""

    name: str
    source: Source
    values: Mapping[str, IniValue]


def _normalizeSectionName(name: str) -> str:
    """C{[ route : web ]} is C{[route:web]}, so that duplicates are found."""
    kind, colon, rest = name.partition(":")
    return f"{kind.strip()}{colon}{rest.strip()}"


def readIni(text: str, path: str, errors: ErrorCollector) -> list[IniSection]:
    """
    Split INI text into sections, reporting syntax errors to C{errors}.

    A duplicate section or key is reported and its values dropped, so that
    the first one counts; lines that belong to nothing are reported once.
    """
    sections: list[IniSection] = []
    seen: dict[str, IniSection] = {}
    sectionName: Optional[str] = None
    keys: Optional[dict[str, IniValue]] = None
    # The value an indented line extends: (its dict, its key); None if none.
    continued: Optional[tuple[dict[str, IniValue], str]] = None
    # Only "\n" ends a line, as in editors and grep: str.splitlines would
    # also split at form feeds and U+2028 and shift every line number after.
    for number, line in enumerate(text.split("\n"), 1):
        source = Source(path, number)
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if line[0].isspace():
            if continued is None:
                errors.add(
                    "indented line, but no key above it to continue", source, sectionName
                )
                continued = _sink(source)
            else:
                target, key = continued
                old = target[key]
                joined = f"{old.text}\n{stripped}" if old.text else stripped
                target[key] = evolve(old, text=joined, lines=(*old.lines, number))
            continue
        header = _HEADER.fullmatch(line.rstrip())
        keyLine = _KEY_LINE.fullmatch(line.rstrip())
        if header:
            sectionName = _normalizeSectionName(header.group(1))
            keys = {}
            continued = None
            section = IniSection(sectionName, source, keys)
            first = seen.get(sectionName)
            if first is not None:
                errors.add(
                    f"duplicate section; the first is at {first.source}", source, sectionName
                )
            else:
                seen[sectionName] = section
                sections.append(section)
        elif keyLine and _KEY.fullmatch(keyLine.group(1)):
            text = keyLine.group(2).strip()
            key, value = keyLine.group(1), IniValue(text, source, (number,) if text else ())
            if keys is None:
                errors.add(
                    "key outside any section; put a [section] header above it", source, None, key
                )
                continued = _sink(source)
            elif key in keys:
                errors.add(
                    f"duplicate key; the first is at {keys[key].source}", source, sectionName, key
                )
                continued = ({key: value}, key)
            else:
                keys[key] = value
                continued = (keys, key)
        elif line.startswith("[") and not keyLine:
            # A header gone wrong: its keys are no section's, not the one above's.
            message = f"not a [section] header: {_clip(stripped)!r}"
            if _HEADER_COMMENT.fullmatch(line.rstrip()):
                message += " (a comment goes on a line of its own)"
            errors.add(message, source, sectionName)
            sectionName = None
            keys = {}
            continued = _sink(source)
        else:
            if keyLine:
                message = (
                    f"{keyLine.group(1)!r} is not a key name: use lower-case letters, "
                    "digits and _"
                )
            else:
                message = (
                    f"not a [section] header, key = value line or comment: {_clip(stripped)!r}"
                )
            errors.add(message, source, sectionName)
            continued = _sink(source)
    return sections


def _sink(source: Source) -> tuple[dict[str, IniValue], str]:
    """Somewhere for the continuation lines of a rejected line to go."""
    return {"": IniValue("", source)}, ""


def _clip(text: str, length: int = 60) -> str:
    return text if len(text) <= length else text[:length] + "..."


class _Keys:
    """One section's values, parsed on request; bad text becomes an error."""

    def __init__(self, section: IniSection, errors: ErrorCollector) -> None:
        self.section = section
        self.errors = errors

    def has(self, key: str) -> bool:
        return key in self.section.values

    def source(self, key: Optional[str]) -> Source:
        """Where C{key} is written, else the section header."""
        value = self.section.values.get(key) if key else None
        return value.source if value else self.section.source

    def error(self, key: Optional[str], message: str) -> None:
        self.errors.add(message, self.source(key), self.section.name, key)

    def warnIfExposed(self, key: str, path: str) -> None:
        """Warn at C{key} if every user can read the secret file C{path}."""
        problem = exposedSecret(path)
        if problem is not None:
            self.errors.warn(problem, self.source(key), self.section.name, key)

    def optional(self, key: str, parse: Callable[[str], T]) -> Optional[T]:
        """C{key} parsed, or C{None} if it is absent or bad (then reported)."""
        value = self.section.values.get(key)
        if value is None:
            return None
        if not value.text:
            self.error(key, "no value given")
            return None
        try:
            return parse(value.text)
        except ValueError as e:
            self.error(key, withCommentHint(str(e), value.text))
            return None

    def get(self, key: str, parse: Callable[[str], T], default: T) -> T:
        parsed = self.optional(key, parse)
        return default if parsed is None else parsed

    def rejectUnknown(self, known: Sequence[str]) -> None:
        for key in self.section.values:
            if key not in known:
                self.error(key, f"unknown key (known: {', '.join(known)})")


def _positiveInt(text: str) -> int:
    """A limit: 0 would refuse everything, so leave the key out for none."""
    return values.parseInt(text, minimum=1)


def _priority(text: str) -> int:
    """Any sign; bounded so that a slip of the keyboard is caught."""
    return values.parseInt(text, -_PRIORITY_BOUND, _PRIORITY_BOUND)


_positiveDuration = values.parseTimeout


def _logFormat(text: str) -> LogFormat:
    return cast(LogFormat, values.parseChoice(text, ("text", "json")))


def _spliceMode(text: str) -> SpliceMode:
    """C{auto}, or yes/no (and their synonyms)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return "yes" if values.parseBool(text) else "no"
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not auto, yes or no") from None


#: The most router processes C{workers} may ask for.
MAX_WORKERS = 64


def _retireTimeout(text: str) -> Optional[float]:
    """C{off} (until the last connection ends) or a duration longer than 0."""
    if text.strip().lower() in ("off", "no", "none"):
        return None
    return values.parseTimeout(text)


def _workers(text: str) -> int:
    """C{auto} (0: one per core) or a count from 1 to L{MAX_WORKERS}."""
    if text.strip().lower() == "auto":
        return 0
    try:
        return values.parseInt(text, 1, MAX_WORKERS)
    except ValueError as e:
        raise ValueError(f"{e}: use auto or a count from 1 to {MAX_WORKERS}") from None


def _minVersion(text: str) -> Literal["1.2", "1.3"]:
    return cast(Literal["1.2", "1.3"], values.parseChoice(text, ("1.2", "1.3")))


def _ciphers(text: str) -> str:
    """
    An OpenSSL cipher string (the TLS 1.2 suites), tried on a throwaway
    context as every server context sets it, so that one OpenSSL refuses
    is an error at its line rather than a start that fails.
    """
    # OpenSSL separates cipher strings by ":", "," or " ", not newlines.
    ciphers = " ".join(text.split())
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        hint = ""
        if any(name.startswith("TLS_") for name in re.split(r"[:, ]", ciphers)):
            hint = "; TLS 1.3 suites (TLS_...) are not set here: OpenSSL's defaults are used"
        raise ValueError(
            f"{_clip(ciphers)!r} selects no cipher OpenSSL knows (use TLS 1.2 names like "
            f"ECDHE-RSA-AES128-GCM-SHA256, or ECDHE+AESGCM){hint}"
        ) from None
    return ciphers


def _tlsMode(text: str) -> TlsMode:
    return cast(TlsMode, values.parseChoice(text, TLS_MODES))


def _auto(text: str) -> str:
    if text.strip().lower() != "auto":
        raise ValueError(f"{text.strip()!r}: the only value is auto (or give cert and key)")
    return "auto"


_DAYS = re.compile(r"\d{1,4}(?:\.\d{1,4})?", re.ASCII)


def _renewDays(text: str) -> float:
    """
    C{[acme] renew_days}: a number of days, more than 0 (C{30}, C{0.5}), or
    the same with C{d} (C{30d}); other units are refused, not read as a
    duration of that many seconds taken as days.
    """
    value = text.strip()
    if value[-1:] in ("d", "D") and _DAYS.fullmatch(value[:-1].rstrip()):
        value = value[:-1].rstrip()
    if not _DAYS.fullmatch(value):
        if _DAYS.fullmatch(value.rstrip("dDsSmMhH ")):
            raise ValueError(f"{value!r}: a number of days (like 30 or 30d), in no other unit")
        raise ValueError(f"{value!r} is not a number of days (like 30)")
    days = float(value)
    if not 0 < days <= _MAX_RENEW_DAYS:
        raise ValueError(f"{value} is out of range (more than 0, at most {_MAX_RENEW_DAYS})")
    return days


#: The most C{renew_days} may be, to catch a slip: more than a third of a
#: certificate's lifetime makes no difference (it renews then at the earliest).
_MAX_RENEW_DAYS = 3650


def _acmeDirectory(text: str) -> str:
    value = text.strip()
    if value not in ("production", "staging") and not value.startswith("https://"):
        raise ValueError(f"{value!r} is not production, staging or an https:// URL")
    return value


def _socketPathProblem(path: str) -> Optional[str]:
    """Why C{path} cannot name a UNIX socket (the kernel's limit is 107 bytes), or C{None}."""
    size = len(os.fsencode(path))
    if size > 107:
        return f"{path} is {size} bytes, longer than a UNIX socket's path may be (107)"
    return None


def _ldapURL(text: str) -> str:
    url = text.strip()
    if not url.lower().startswith(("ldap://", "ldaps://")) or len(url.split("://", 1)[1]) == 0:
        raise ValueError(f"{url!r} is not an ldap:// or ldaps:// URL")
    return url


def _userFilter(text: str) -> str:
    value = text.strip()
    if "{user}" not in value or not (value.startswith("(") and value.endswith(")")):
        raise ValueError(f"{value!r} is not a filter with {{user}} in it, like (uid={{user}})")
    return value


def _word(text: str) -> str:
    """An action name; which actions exist is known only one floor up."""
    word = text.strip()
    if not _WORD.fullmatch(word):
        raise ValueError(f"{word!r} is not a word (letters, digits, _ . -)")
    return word


class _Loader:
    """Turns the sections of one file into a L{RouterConfig}."""

    def __init__(self, path: str, errors: ErrorCollector) -> None:
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))
        self.errors = errors
        self.checked: dict[CertificatePair, Optional[str]] = {}

    def resolve(self, path: str) -> str:
        """A path as written, relative to the configuration file's directory."""
        return os.path.normpath(os.path.join(self.directory, path))

    def load(self, sections: Iterable[IniSection]) -> RouterConfig:
        daemon = DaemonSettings(state_dir=self.resolve("state"))
        defaults = Defaults()
        tls = TlsSettings()
        http = HttpSettings()
        ldap: Optional[LDAPSettings] = None
        adminKeys: Optional[_Keys] = None
        daemonKeys: Optional[_Keys] = None
        acme = AcmeConfig()
        routes: list[tuple[RouteConfig, _Keys]] = []
        dnsSections: list[IniSection] = []
        emailSections: list[IniSection] = []
        for section in sections:
            keys = _Keys(section, self.errors)
            kind, colon, name = section.name.partition(":")
            if section.name == "dcrouter":
                daemon = self.daemon(keys)
                daemonKeys = keys
            elif section.name == "defaults":
                defaults = self.defaults(keys)
            elif section.name == "tls":
                tls = self.tls(keys)
            elif section.name == "http":
                http = self.http(keys)
            elif section.name == "ldap":
                ldap = self.ldap(keys)
            elif section.name == "admin":
                adminKeys = keys
            elif section.name == "acme":
                acme = self.acme(keys)
            elif kind == "route" and colon:
                routes.append((self.route(keys, name), keys))
            elif section.name == DNS_SECTION or section.name.startswith(ZONE_PREFIX):
                dnsSections.append(section)
            elif section.name == EMAIL_SECTION or section.name.startswith(EMAIL_RULE_PREFIX):
                emailSections.append(section)
            else:
                keys.error(None, f"unknown section (known: {_KNOWN_SECTIONS})")
        self.warnIfUnusable(daemon.state_dir, daemonKeys)
        admin = self.admin(adminKeys, daemon.state_dir)
        dns = parseDnsSections(dnsSections, self.errors)
        email = parseEmailSections(emailSections, self.errors)
        if not routes and (dns is None or not dns.listen) and email is None:
            self.errors.add(
                "no [route:...] section: nothing to listen on", Source(self.path, 0)
            )
        config = RouterConfig(
            routes=tuple(route for route, _ in routes),
            daemon=daemon,
            defaults=defaults,
            tls=tls,
            http=http,
            ldap=ldap,
            admin=admin,
            acme=acme,
            dns=dns,
            email=email,
            path=os.path.abspath(self.path),
        )
        config, errors = checkModel(config)
        # A key the loader already found wrong is not reported twice.
        reported = {(error.section, error.key) for error in self.errors.errors}
        self.errors.extend(e for e in errors if (e.section, e.key) not in reported)
        return config

    def warnIfUnusable(self, stateDir: str, keys: Optional[_Keys]) -> None:
        """
        A warning if this user could not make or write C{stateDir}: the
        daemon, run as this user (as C{checkconfig} in the unit's
        C{ExecStartPre}), would not start.
        """
        problem = unwritableDirectory(stateDir)
        if problem is None:
            return
        message = f"{stateDir} cannot be used by this user: {problem}; the daemon would not start"
        if keys is not None and keys.has("state_dir"):
            self.errors.warn(message, keys.source("state_dir"), "dcrouter", "state_dir")
        else:
            self.errors.warn(message, Source(self.path, 0), "dcrouter", "state_dir")

    def daemon(self, keys: _Keys) -> DaemonSettings:
        keys.rejectUnknown(_DAEMON_KEYS)
        default = DaemonSettings()
        return DaemonSettings(
            state_dir=self.resolve(keys.get("state_dir", str.strip, default.state_dir)),
            log_format=keys.get("log_format", _logFormat, default.log_format),
            hello_timeout=keys.get("hello_timeout", _positiveDuration, default.hello_timeout),
            drain_timeout=keys.get("drain_timeout", values.parseDuration, default.drain_timeout),
            retire_timeout=keys.get("retire_timeout", _retireTimeout, default.retire_timeout),
            workers=keys.get("workers", _workers, default.workers),
            splice=keys.get("splice", _spliceMode, default.splice),
        )

    def defaults(self, keys: _Keys) -> Defaults:
        keys.rejectUnknown(_DEFAULTS_KEYS)
        default = Defaults()
        return Defaults(
            target=keys.optional("target", values.parseHostPort),
            bind=keys.get("bind", values.parseBindAddresses, default.bind),
            limits=self.limits(keys),
            connect_timeout=keys.get(
                "connect_timeout", _positiveDuration, default.connect_timeout
            ),
            idle_timeout=keys.get("idle_timeout", _positiveDuration, default.idle_timeout),
            fin_timeout=keys.get("fin_timeout", _positiveDuration, default.fin_timeout),
            trusted_proxies=keys.get("trusted_proxies", values.parseNetworks, ()),
            keySources={key: value.source for key, value in keys.section.values.items()},
        )

    def limits(self, keys: _Keys) -> Limits:
        return Limits(
            ip_allow=keys.get("ip_allow", values.parseNetworks, ()),
            ip_block=keys.get("ip_block", values.parseNetworks, ()),
            max_connections=keys.optional("max_connections", _positiveInt),
            max_connections_per_ip=keys.optional("max_connections_per_ip", _positiveInt),
            connection_rate_per_minute=keys.optional("connection_rate_per_minute", _positiveInt),
        )

    def tls(self, keys: _Keys) -> TlsSettings:
        keys.rejectUnknown(_TLS_KEYS)
        default = TlsSettings()
        return TlsSettings(
            cert=self.certificate(keys),
            min_version=keys.get("min_version", _minVersion, default.min_version),
            ciphers=keys.optional("ciphers", _ciphers),
        )

    def http(self, keys: _Keys) -> HttpSettings:
        keys.rejectUnknown(_HTTP_KEYS)
        default = HttpSettings()

        def size(key: str, minimum: int) -> int:
            value: int = keys.get(
                key, lambda text: values.parseSize(text, minimum), getattr(default, key)
            )
            return value

        def count(key: str, minimum: int) -> int:
            value: int = keys.get(
                key, lambda text: values.parseInt(text, minimum), getattr(default, key)
            )
            return value

        def timeout(key: str) -> float:
            value: float = keys.get(key, _positiveDuration, getattr(default, key))
            return value

        return HttpSettings(
            max_header_size=size("max_header_size", 1024),
            max_headers=count("max_headers", 8),
            max_uri_length=size("max_uri_length", 256),
            max_body_size=size("max_body_size", 0),
            header_timeout=timeout("header_timeout"),
            keepalive_timeout=timeout("keepalive_timeout"),
            body_timeout=timeout("body_timeout"),
            response_timeout=timeout("response_timeout"),
            send_timeout=timeout("send_timeout"),
        )

    def acme(self, keys: _Keys) -> AcmeConfig:
        """C{[acme]}: where certificates come from for C{certificate = auto}."""
        keys.rejectUnknown(
            ("enabled", "directory", "ca_bundle", "account_email", "challenge", "renew_days")
        )
        default = AcmeConfig()
        caBundle = keys.optional("ca_bundle", lambda text: self.resolve(text.strip()))
        if caBundle and not os.access(caBundle, os.R_OK):
            keys.error("ca_bundle", f"cannot read {caBundle}")
        return AcmeConfig(
            enabled=keys.get("enabled", values.parseBool, False),
            directory=keys.get("directory", _acmeDirectory, default.directory),
            ca_bundle=caBundle,
            account_email=keys.optional("account_email", str.strip),
            challenge=keys.get(
                "challenge",
                lambda text: values.parseChoice(text, ("http-01", "tls-alpn-01", "dns-01")),
                default.challenge,
            ),
            renew_days=keys.get("renew_days", _renewDays, default.renew_days),
        )

    def admin(self, keys: Optional[_Keys], stateDir: str) -> AdminSettings:
        """
        C{[admin]} (C{None}: no such section): where metrics and the status
        page are served, and the admin socket, by default in C{stateDir}.
        """
        default = os.path.join(stateDir, "admin.sock")
        settings = AdminSettings(socket=default)
        if keys is not None:
            keys.rejectUnknown(("listen", "users", "socket"))
            users = keys.section.values.get("users")
            settings = AdminSettings(
                listen=keys.optional("listen", values.parseHostPort),
                users=RawValue(users.text, users.source) if users is not None else None,
                socket=keys.optional("socket", self.adminSocket) if keys.has("socket") else default,
                keySources={key: value.source for key, value in keys.section.values.items()},
            )
        problem = _socketPathProblem(default) if settings.socket == default else None
        if problem:
            message = f"{problem} (the default, in state_dir): set socket to a shorter path, or off"
            if keys is not None:
                keys.error("socket", message)
            else:
                self.errors.add(message, Source(self.path, 0), "admin", "socket")
        return settings

    def adminSocket(self, text: str) -> Optional[str]:
        """C{[admin] socket}: C{off}, or a path (relative to this file's directory)."""
        if text.strip().lower() in ("off", "no", "none"):
            return None
        path = self.resolve(text.strip())
        problem = _socketPathProblem(path)
        if problem:
            raise ValueError(problem)
        return path

    def ldap(self, keys: _Keys) -> Optional[LDAPSettings]:
        """C{[ldap]}: the directory that basic auth (and SMTP AUTH) can check against."""
        keys.rejectUnknown(_LDAP_KEYS)
        default = LDAPSettings(url="", base="")
        for key in ("url", "base"):
            if not keys.has(key):
                keys.error(key, "required key is missing")
        url = keys.get("url", _ldapURL, "")
        userFilter = keys.get("user_filter", _userFilter, default.user_filter)
        bindDN = keys.optional("bind_dn", str.strip)
        passwordFile = keys.optional("bind_password_file", lambda text: self.resolve(text.strip()))
        if bindDN and not passwordFile:
            keys.error("bind_dn", "needs bind_password_file (the password is never in this file)")
        if passwordFile and not os.access(passwordFile, os.R_OK):
            keys.error("bind_password_file", f"cannot read {passwordFile}")
        elif passwordFile:
            keys.warnIfExposed("bind_password_file", passwordFile)
        caFile = keys.optional("ca_file", lambda text: self.resolve(text.strip()))
        if caFile and not os.access(caFile, os.R_OK):
            keys.error("ca_file", f"cannot read {caFile}")
        return LDAPSettings(
            url=url,
            base=keys.get("base", str.strip, ""),
            user_filter=userFilter,
            bind_dn=bindDN,
            bind_password_file=passwordFile,
            start_tls=keys.get("start_tls", values.parseBool, False),
            ca_file=caFile,
            require_group=keys.optional("require_group", str.strip),
            connect_timeout=keys.get("connect_timeout", _positiveDuration, default.connect_timeout),
            timeout=keys.get("timeout", _positiveDuration, default.timeout),
        )

    def route(self, keys: _Keys, name: str) -> RouteConfig:
        if not _WORD.fullmatch(name):
            keys.error(None, f"bad route name {name!r}: use letters, digits, _ . and -")
        elif name.startswith(EMAIL_ROUTE_PREFIX) and name[len(EMAIL_ROUTE_PREFIX):].isdigit():
            keys.error(
                None,
                f"bad route name {name!r}: {EMAIL_ROUTE_PREFIX}PORT names the mail server's "
                "routes ([email] ports); choose another",
            )
        if not keys.has("ports"):
            keys.error("ports", "required key is missing")
        tls = keys.optional("tls", _tlsMode)
        tlsKnown = tls is not None or not keys.has("tls")
        domains: tuple[str, ...] = keys.get("domains", values.parseDomains, ())
        # cert and key without a tls mode: only for an action that does TLS
        # itself (IStartTLSAction), which compiling checks.
        terminating = tls is None or tls in _TERMINATING
        cert = self.certificate(keys, terminating if tlsKnown else None)
        certificate = keys.optional("certificate", _auto)
        if certificate and cert is not None:
            keys.error("certificate", "certificate = auto, or cert and key: not both")
        elif certificate and tlsKnown and tls not in _TERMINATING:
            keys.error(
                "certificate", "certificate = auto needs tls = terminate (or -and-reencrypt)"
            )
        elif certificate and not domains:
            keys.error("certificate", "certificate = auto needs domains (the names to certify)")
        section = keys.section
        return RouteConfig(
            name=name,
            ports=keys.get("ports", values.parsePorts, ()),
            action=self.action(keys),
            bind=keys.get("bind", values.parseBindAddresses, ()),
            domains=domains,
            client_ip=keys.get("client_ip", values.parseNetworks, ()),
            priority=keys.get("priority", _priority, 0),
            tls=tls,
            cert=cert,
            limits=self.limits(keys),
            certificate=certificate,
            paths=keys.get("path", values.parsePaths, ()),
            methods=keys.get("method", values.parseMethods, ()),
            headers=keys.get("headers", values.parseHeaderMatches, ()),
            options={
                key: RawValue(value.text, value.source)
                for key, value in section.values.items()
                if key not in _ROUTE_KEYS
            },
            source=section.source,
            keySources={
                key: value.source for key, value in section.values.items() if key in _ROUTE_KEYS
            },
        )

    def action(self, keys: _Keys) -> str:
        """
        C{action}, C{forward} if not given; if it is bad (reported), C{""}:
        no action, so that none's keys are checked (an unknown action's
        error is the loader's, already reported).
        """
        if not keys.has("action"):
            return "forward"
        return keys.optional("action", _word) or ""

    def certificate(
        self, keys: _Keys, terminating: Optional[bool] = True
    ) -> Optional[CertificatePair]:
        """
        C{cert} and C{key}: both or neither, and a matching pair.

        @param terminating: whether the section terminates TLS; C{None} if
            that is unknown because its C{tls} key is bad (already reported).
        """
        cert = keys.optional("cert", self.resolve)
        key = keys.optional("key", self.resolve)
        given = "cert" if keys.has("cert") else "key" if keys.has("key") else None
        if given is None or terminating is None:
            return None
        if not terminating:
            keys.error(given, NOT_TERMINATING)
            return None
        if not (keys.has("cert") and keys.has("key")):
            missing = "key" if given == "cert" else "cert"
            keys.error(given, f"{missing} is missing: give both cert and key, or neither")
            return None
        if cert is None or key is None:
            return None
        pair = CertificatePair(cert, key)
        if pair not in self.checked:
            self.checked[pair] = checkCertificatePair(pair)
        problem = self.checked[pair]
        if problem is not None:
            keys.error("cert", problem)
            return None
        keys.warnIfExposed("key", key)
        return pair


#: Why a route cannot take cert and key.
NOT_TERMINATING = (
    "cert and key only apply to terminating routes (tls = terminate or "
    "terminate-and-reencrypt) and to actions that do STARTTLS themselves (smtp-starttls)"
)


def parseConfig(text: str, path: str) -> RouterConfig:
    """
    Parse INI text read from C{path}; relative paths in it are relative to
    C{path}'s directory. Raises L{ConfigErrors} with every error found.
    """
    errors = ErrorCollector()
    sections = readIni(text, path, errors)
    config = _Loader(path, errors).load(sections)
    errors.raiseIfAny(partial=config)
    if errors.warnings:
        config = evolve(config, warnings=firstOfEach(errors.warnings))
    return config


def loadConfig(path: str) -> RouterConfig:
    """Read and parse the configuration file at C{path} (see L{parseConfig})."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigErrors(
            [ConfigError(f"cannot read the configuration file: {e.strerror}", Source(path, 0))]
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigErrors(
            [ConfigError(f"not UTF-8 text: {e.reason} at byte {e.start}", Source(path, line))]
        ) from None
    return parseConfig(text, path)
