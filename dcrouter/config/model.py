"""
The typed, frozen configuration model.

The INI loader (L{dcrouter.config.ini}) is one front end of this model;
embedding code and tests build it directly from Python::

    RouterConfig(routes=(RouteConfig(name="web", ports=(8080,),
                                      action="static",
                                      options={"body": "hello"}),))

Everything here is immutable: a reload builds a new graph and swaps it.
Action plugins' own keys stay raw in L{RouteConfig.options}; the plugin
parses them one floor up (see L{dcrouter.config.options}).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Literal, Optional, Union

from attrs import field, frozen

if TYPE_CHECKING:
    # config/dns.py imports this module: the name is for annotations only.
    from dcrouter.config.dns import DnsSettings
    from dcrouter.config.email import EmailSettings
    from dcrouter.config.errors import ConfigError

IPNetwork = Union[IPv4Network, IPv6Network]
TlsMode = Literal["passthrough", "terminate", "terminate-and-reencrypt"]
TLS_MODES: tuple[str, ...] = ("passthrough", "terminate", "terminate-and-reencrypt")
LogFormat = Literal["text", "json"]
SpliceMode = Literal["auto", "yes", "no"]


@frozen
class Source:
    """Where a setting came from, so that an error can name file and line."""

    file: str = "<python>"
    line: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


PYTHON = Source()


@frozen
class RawValue:
    """
    An option value as written, with its origin.

    Equal values are equal wherever they are written: a reload compares
    settings, and a line moved down the file is no change.
    """

    text: str
    source: Source = field(default=PYTHON, eq=False)


def _rawOptions(value: Mapping[str, Union[str, RawValue]]) -> Mapping[str, RawValue]:
    return {
        key: item if isinstance(item, RawValue) else RawValue(str(item))
        for key, item in value.items()
    }


@frozen
class HostPort:
    """A target address: a host name or IP literal and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@frozen
class CertificatePair:
    """PEM paths of a certificate (with its chain) and its private key."""

    cert: str
    key: str


@frozen
class Limits:
    """
    The security gate's settings, globally (from C{[defaults]}) or per route.

    C{None} means no limit.
    """

    ip_allow: tuple[IPNetwork, ...] = ()
    ip_block: tuple[IPNetwork, ...] = ()
    max_connections: Optional[int] = None
    max_connections_per_ip: Optional[int] = None
    connection_rate_per_minute: Optional[int] = None


@frozen
class DaemonSettings:
    """
    C{[dcrouter]}: process-wide settings.

    @ivar splice: when C{forward} moves the bytes of connections it does not
        inspect with splice(2) (Linux) rather than through Python: C{auto}
        once a connection carries more than one exchange or a bulk chunk,
        C{yes} from its first bytes, C{no} never.
    """

    state_dir: str = "state"
    log_format: LogFormat = "text"
    hello_timeout: float = 10.0
    drain_timeout: float = 30.0
    #: How long a worker a reload retired may serve its connections before
    #: they are cut (HAProxy's C{hard-stop-after}); C{None}: until they end.
    retire_timeout: Optional[float] = None
    #: Router processes sharing the listeners; 0 means one per core.
    workers: int = 0

    def workerCount(self) -> int:
        """How many router processes run: C{workers}, or the number of cores."""
        if self.workers:
            return self.workers
        if hasattr(os, "sched_getaffinity"):  # the cores this process may use
            return len(os.sched_getaffinity(0)) or 1
        return os.cpu_count() or 1
    splice: SpliceMode = "auto"


@frozen
class Defaults:
    """C{[defaults]}: values every route inherits unless it sets its own."""

    target: Optional[HostPort] = None
    bind: tuple[str, ...] = ("0.0.0.0",)
    limits: Limits = Limits()
    connect_timeout: float = 10.0
    idle_timeout: float = 600.0
    #: Once one side of a forwarded connection has sent its FIN (or the
    #: target is gone), the idle timeout that applies (HAProxy's
    #: C{timeout client-fin} and C{server-fin}).
    fin_timeout: float = 60.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Where each key was written, for warnings found on the floor above.
    keySources: Mapping[str, Source] = field(factory=dict, eq=False)


@frozen
class HttpSettings:
    """
    C{[http]}: limits and timeouts of the HTTP layer, for every HTTP route.

    Sizes are bytes; C{max_body_size} 0 means no limit. Timeouts: a request
    head must arrive within C{header_timeout} of its first byte (of the
    connection, for the first request); a keep-alive connection may wait
    C{keepalive_timeout} for its next request; a request body may pause
    C{body_timeout}; a backend must start its response within
    C{response_timeout}; a response may stall for C{send_timeout} while the
    client reads nothing of it (nginx's C{send_timeout}).
    """

    max_header_size: int = 32768
    max_headers: int = 100
    max_uri_length: int = 8192
    max_body_size: int = 0
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    body_timeout: float = 60.0
    response_timeout: float = 60.0
    send_timeout: float = 60.0


@frozen
class LDAPSettings:
    """
    The C{[ldap]} section (field names are the INI keys).

    @ivar url: C{ldap://host[:port]} or C{ldaps://host[:port]}.
    @ivar base: where users are searched (subtree).
    @ivar user_filter: a search filter with C{{user}} where the escaped user
        name goes, e.g. C{(uid={user})} or C{(mail={user})}.
    @ivar bind_dn: the service account; C{None} searches anonymously.
    @ivar bind_password_file: a file holding the service account's password
        (one trailing line break is ignored); required with C{bind_dn}.
    @ivar start_tls: upgrade an C{ldap://} connection with StartTLS.
    @ivar ca_file: PEM CA certificates to verify the server with; C{None}
        uses the system's. The certificate must name the URL's host.
    @ivar require_group: a group DN the user must be a member of.
    @ivar connect_timeout: seconds to open a connection.
    @ivar timeout: seconds for each read, and for the whole check.
    """

    url: str
    base: str
    user_filter: str = "(uid={user})"
    bind_dn: Optional[str] = None
    bind_password_file: Optional[str] = None
    start_tls: bool = False
    ca_file: Optional[str] = None
    require_group: Optional[str] = None
    connect_timeout: float = 5.0
    timeout: float = 10.0


@frozen
class AcmeConfig:
    """
    C{[acme]}: certificates for routes that say C{certificate = auto}.

    @ivar directory: C{production}, C{staging} or an ACME directory URL.
    @ivar ca_bundle: the CA of the ACME server's own HTTPS (a private CA,
        Pebble); C{None}: the system's.
    @ivar challenge: C{http-01}, C{tls-alpn-01} or C{dns-01} (wildcards
        always use dns-01).
    """

    enabled: bool = False
    directory: str = "production"
    ca_bundle: Optional[str] = None
    account_email: Optional[str] = None
    challenge: str = "http-01"
    renew_days: float = 30.0


@frozen
class AdminSettings:
    """
    C{[admin]}: the listener of metrics and the status page, and the
    operator's socket.

    @ivar listen: its address; C{None}: no admin listener.
    @ivar users: C{name:hash} entries (as for C{auth_users}); required when
        C{listen} is not a loopback address, and for the operator's
        commands over C{listen} at all.
    @ivar socket: the path of the admin UNIX socket (mode 0600), which
        C{dcrouter certs|queue} use; C{None}: none. (The INI loader's
        default is C{admin.sock} in the state directory.)
    """

    listen: Optional[HostPort] = None
    users: Optional[RawValue] = None
    socket: Optional[str] = None
    #: Where each key was written, for errors found on the floor above.
    keySources: Mapping[str, Source] = field(factory=dict, eq=False)


@frozen
class TlsSettings:
    """
    C{[tls]}: the default certificate and protocol floor.

    Without C{cert}/C{key} a self-signed certificate is created in the state
    directory on first start.
    """

    cert: Optional[CertificatePair] = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: Optional[str] = None


@frozen
class RouteConfig:
    """
    C{[route:NAME]}: one route.

    @ivar ports: every port the route listens on, ranges expanded.
    @ivar bind: listening addresses; empty means C{[defaults] bind}.
    @ivar domains: lower-case names without trailing dot, exact or
        C{*.suffix}; empty matches any name (and no name).
    @ivar tls: C{None} for plain TCP.
    @ivar certificate: C{"auto"}: the route's certificate comes from ACME
        for its domains.
    @ivar paths: HTTP only: path prefixes (C{/api/}) or globs (C{/img/*.png}).
    @ivar methods: HTTP only: request methods, upper case.
    @ivar headers: HTTP only: (lower-case name, glob of the value) pairs,
        all of which must match.
    @ivar options: the action plugin's own keys, unparsed.
    @ivar keySources: where each common key was written, for errors found
        above the loader (an unknown action, an unusable certificate).
    """

    name: str
    ports: tuple[int, ...]
    action: str = "forward"
    bind: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    client_ip: tuple[IPNetwork, ...] = ()
    priority: int = 0
    tls: Optional[TlsMode] = None
    cert: Optional[CertificatePair] = None
    limits: Limits = Limits()
    certificate: Optional[str] = None
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    options: Mapping[str, RawValue] = field(factory=dict, converter=_rawOptions)
    source: Source = PYTHON
    keySources: Mapping[str, Source] = field(factory=dict, eq=False)

    def sourceOf(self, key: str) -> Source:
        """Where C{key} was written, or the section if it was not."""
        return self.keySources.get(key, self.source)


@frozen
class RouterConfig:
    """The whole configuration of one dcrouter process."""

    routes: tuple[RouteConfig, ...] = ()
    daemon: DaemonSettings = DaemonSettings()
    defaults: Defaults = Defaults()
    tls: TlsSettings = TlsSettings()
    http: HttpSettings = HttpSettings()
    ldap: Optional[LDAPSettings] = None
    admin: AdminSettings = AdminSettings()
    acme: AcmeConfig = AcmeConfig()
    dns: Optional[DnsSettings] = None
    email: Optional[EmailSettings] = None
    path: Optional[str] = None
    #: What loading found allowed but risky (see
    #: L{dcrouter.config.errors.ErrorCollector}); not part of equality.
    warnings: tuple[ConfigError, ...] = field(default=(), eq=False)
