"""
Compiling a configuration: from a L{RouterConfig} to the port tables, gates
and resources a router serves from.

The floor above config/: here each route's action is looked up among the
plugins and parses its own keys (parse, validate, provision, as Caddy's
modules do); errors from every floor join one list. L{compileConfig} does all
of it without binding a port, so C{dcrouter checkconfig}, a start and a
reload (L{dcrouter.service.DcRouter}) check exactly the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from ipaddress import ip_address
from math import ceil
from typing import Any, Optional

from attrs import evolve, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python.threadpool import ThreadPool
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import dcrouter.plugins
from dcrouter.auth.passwords import parseUsers
from dcrouter.certs.manager import CertificateSource
from dcrouter.config import loadConfig
from dcrouter.config.email import ROUTE_PREFIX as EMAIL_ROUTE_PREFIX
from dcrouter.config.email import emailRoutes
from dcrouter.config.errors import ConfigError, ConfigErrors, ErrorCollector, firstOfEach
from dcrouter.config.ini import NOT_TERMINATING
from dcrouter.config.model import PYTHON, CertificatePair, RouteConfig, RouterConfig
from dcrouter.config.options import RouteOptions
from dcrouter.config.validate import checkModel
from dcrouter.http.guard import Guard, parseGuard
from dcrouter.http.routes import HTTPRoute, HTTPRouteTable
from dcrouter.http.server import HTTPLayer
from dcrouter.interfaces import IHTTPAction, IRouteAction, IStartTLSAction
from dcrouter.mail.delivery import patternKey
from dcrouter.mail.service import BUILT_IN_MODES, unknownModes
from dcrouter.net.gate import Gate
from dcrouter.net.tls import ServerTLS, checkServerSettings
from dcrouter.proxy.routetable import CompiledRoute, PortTable
from dcrouter.threads import threadPoolOf

log = Logger()

#: A listener: (port, bind address).
ListenKey = tuple[int, str]


_ACTION_INTERFACES = (IRouteAction, IHTTPAction)


def loadActions() -> dict[str, Any]:
    """
    Every route action installed, by name, each checked with C{verifyObject}.

    An action provides L{IRouteAction} (it serves connections),
    L{IHTTPAction} (it serves HTTP requests), or both. A plugin that does
    not provide what it claims correctly, or reuses a name, is left out with
    a logged reason rather than breaking the others.
    """
    actions: dict[str, Any] = {}
    found: dict[int, Any] = {}
    for interface in _ACTION_INTERFACES:
        for plugin in getPlugins(interface, dcrouter.plugins):
            found.setdefault(id(plugin), plugin)
    for plugin in found.values():
        try:
            for interface in _ACTION_INTERFACES:
                if interface.providedBy(plugin):
                    verifyObject(interface, plugin)
        except Invalid as e:
            log.error("route action plugin {plugin!r} is broken: {why}", plugin=plugin, why=e)
            continue
        if plugin.name in actions and actions[plugin.name] is not plugin:
            log.error(
                "two route action plugins are named {name!r}: {a!r} and {b!r}; using the first",
                name=plugin.name, a=actions[plugin.name], b=plugin,
            )
            continue
        actions[plugin.name] = plugin
    return actions


@frozen(eq=False)
class CompiledConfig:
    """
    A configuration checked and ready to serve: its tables, ports and gates.

    @ivar resources: what the routes' actions provisioned that runs on its
        own (health checkers, connection pools): each has C{start()} and
        C{stop()}, called when the configuration goes live and is retired,
        and may have C{inherit(previous)}, given the same route's resource
        of the configuration it replaces when their types are the same
        (target pools take over their targets' health and counters).
    @ivar routeResources: the resources by route name (C{None}: the route
        of C{[defaults] target}).
    """

    config: RouterConfig
    tables: dict[int, PortTable]
    gate: Gate
    resources: tuple[Any, ...] = ()
    routeResources: dict[Optional[str], Any] = field(factory=dict)
    #: What is allowed but risky, the loader's and the actions' (see
    #: L{dcrouter.config.errors.ErrorCollector}).
    warnings: tuple[ConfigError, ...] = ()
    #: The gates of the routes that set limits, by route name (the HTTP
    #: routes' too, which their requests pass): a reload keeps each whose
    #: limits are unchanged, with its counts.
    routeGates: dict[str, Gate] = field(factory=dict)

    def listenKeys(self) -> set[ListenKey]:
        return {(port, address) for port, table in self.tables.items() for address in table.bind}


def _isHTTPOnly(action: Any) -> bool:
    return IHTTPAction.providedBy(action) and not IRouteAction.providedBy(action)


@frozen(eq=False)
class _Parsed:
    """One route after its action parsed its keys."""

    route: RouteConfig
    action: Any
    options: Any
    serverTLS: Any
    gate: Optional[Gate]
    guard: Optional[Guard] = None

    @property
    def wantsHTTP(self) -> bool:
        """Does this route by itself make its ports HTTP ports?"""
        config = self.route
        return _isHTTPOnly(self.action) or bool(
            config.paths or config.methods or config.headers
            or (config.domains and config.tls is None)
        )


def _parseRoute(
    route: RouteConfig,
    config: RouterConfig,
    actions: dict[str, Any],
    defaultCert: Optional[CertificatePair],
    clock: IReactorTime,
    errors: ErrorCollector,
    previousGates: dict[str, Gate],
    threadpool: ThreadPool,
    certs: Optional[CertificateSource] = None,
) -> Optional[_Parsed]:
    section = f"route:{route.name}"
    action = actions.get(route.action)
    if action is None:
        known = ", ".join(sorted(actions)) or "none installed"
        errors.add(
            f"unknown action {route.action!r} (known: {known})",
            route.sourceOf("action"), section, "action",
        )
        return None
    options = RouteOptions(route, config.defaults, clock, config.http, config.daemon)
    startTLSPair = route.cert or config.tls.cert
    if IStartTLSAction.providedBy(action) and route.tls is None and startTLSPair is not None:
        try:
            options.serverTLS = ServerTLS(startTLSPair, config.tls)
        except Exception as e:
            errors.add(f"cannot use certificate: {e}", route.sourceOf("cert"), section, "cert")
    elif route.cert is not None and route.tls is None:
        errors.add(NOT_TERMINATING, route.sourceOf("cert"), section, "cert")
    parsed = action.parseOptions(options)
    guard = None
    if IHTTPAction.providedBy(action):
        guard = parseGuard(options, threadpool, config.ldap)
    found = options.finish()
    errors.extend(found)
    errors.warnings.extend(options.warnings)
    httpCapable = IHTTPAction.providedBy(action)
    l7Keys = [key for key, value in (("path", route.paths), ("method", route.methods),
                                     ("headers", route.headers)) if value]
    if l7Keys and not httpCapable:
        errors.add(f"action {route.action!r} does not serve HTTP requests",
                   route.sourceOf(l7Keys[0]), section, l7Keys[0])
    elif (l7Keys or _isHTTPOnly(action)) and route.tls == "passthrough":
        errors.add(f"action {route.action!r} reads HTTP, which tls = passthrough hides",
                   route.sourceOf("tls"), section, "tls")
    elif route.domains and route.tls is None and not httpCapable:
        errors.add(
            "domains of a plain route are HTTP Host names: they need tls (routes are "
            f"told apart by SNI) or an action that serves HTTP, not {route.action!r}",
            route.sourceOf("domains"), section, "domains",
        )
    serverTLS: Any = None
    if route.tls in ("terminate", "terminate-and-reencrypt"):
        pair = route.cert or config.tls.cert or defaultCert
        if pair is not None:
            try:
                serverTLS = ServerTLS(pair, config.tls)
            except Exception as e:
                errors.add(f"cannot use certificate: {e}", route.sourceOf("cert"), section, "cert")
        if route.certificate == "auto":
            wildcards = [name for name in route.domains if name.startswith("*.")]
            if wildcards and (config.dns is None or not config.dns.listen):
                errors.add(
                    f"{wildcards[0]}: a wildcard needs dns-01, answered by dcrouter's own"
                    " DNS server: configure [dns] listen and the zone",
                    route.sourceOf("certificate"), section, "certificate",
                )
            if serverTLS is not None and certs is not None:
                serverTLS = certs.autoTLS(serverTLS, config.tls)
    limits = route.limits
    gate = None
    if limits != type(limits)():
        previous = previousGates.get(route.name)
        reusable = previous is not None and previous.limits == limits
        gate = previous if reusable else Gate(limits, clock)
    if found:
        return None
    return _Parsed(route, action, parsed, serverTLS, gate, guard)


def _portTables(
    parsed: list[_Parsed],
    config: RouterConfig,
    clock: IReactorTime,
    fallback: Optional[CompiledRoute],
    certs: Optional[CertificateSource] = None,
) -> dict[int, PortTable]:
    """
    One table per port; a port with an HTTP route gets an HTTP layer.

    On such a port every route whose action serves HTTP (and does not pass
    TLS through) is served at layer 7; routes with connection-only actions
    are still told apart at layer 4, by SNI.
    """
    tables = {}
    httpTLS: dict[str, Optional[ServerTLS]] = {}
    for port in dict.fromkeys(port for item in parsed for port in item.route.ports):
        items = [item for item in parsed if port in item.route.ports]
        httpPort = any(item.wantsHTTP for item in items)
        layer7 = [
            item for item in items
            if httpPort and IHTTPAction.providedBy(item.action) and item.route.tls != "passthrough"
        ]
        layer: Any = None
        if layer7:
            plain = [
                HTTPRoute(i.route, i.action, i.options, i.guard, i.gate)
                for i in layer7 if i.route.tls is None
            ]
            secure = [
                HTTPRoute(i.route, i.action, i.options, i.guard, i.gate)
                for i in layer7 if i.route.tls is not None
            ]
            layer = HTTPLayer(
                clock, HTTPRouteTable.build(plain), HTTPRouteTable.build(secure),
                config.http, config.defaults.trusted_proxies,
                acmeHTTP=certs.http01.response if certs is not None else None,
            )
        routes = [
            # No route gate at accept: each request passes its own route's.
            CompiledRoute(item.route, layer, None, _httpTLS(item, httpTLS), None, layer7=True)
            if item in layer7
            else CompiledRoute(item.route, item.action, item.options, item.serverTLS, item.gate)
            for item in items
        ]
        bind = items[0].route.bind or config.defaults.bind
        tables[port] = PortTable.build(port, bind, routes, fallback)
    return tables


#: ALPN of terminating routes served by the HTTP layer, in order of preference.
HTTP_ALPN = (b"h2", b"http/1.1")


def _httpTLS(item: _Parsed, made: dict[str, Optional[ServerTLS]]) -> Optional[ServerTLS]:
    """
    The route's TLS for the HTTP layer: offering h2 by ALPN, made once per
    route. If the files cannot be read again, the route's own (no ALPN).
    """
    if item.serverTLS is None:
        return None
    name = item.route.name
    if name not in made:
        try:
            made[name] = item.serverTLS.withALPN(HTTP_ALPN)
        except Exception:
            log.failure("[route:{route}]: cannot offer h2", route=name)
            made[name] = item.serverTLS
    return made[name]


def compileConfig(
    config: RouterConfig,
    actions: dict[str, Any],
    clock: IReactorTime,
    defaultCert: Optional[CertificatePair] = None,
    previous: Optional[CompiledConfig] = None,
    threadpool: Optional[ThreadPool] = None,
    certs: Optional[CertificateSource] = None,
) -> CompiledConfig:
    """
    Check everything a start needs short of binding ports; raise L{ConfigErrors}.

    @param defaultCert: the certificate of terminating routes that name none
        (the self-signed one); C{None} skips building their TLS contexts, as
        C{checkconfig} does.
    @param previous: the configuration being replaced, whose gates (and
        their counts of live connections) carry over where limits are equal.
    @param threadpool: where blocking credential checks (bcrypt, LDAP) run;
        by default the reactor's.
    """
    if threadpool is None:
        threadpool = threadPoolOf(clock)
    errors = ErrorCollector()
    email = config.email
    if email is not None:
        present = {route.name for route in config.routes}
        extra = tuple(r for r in emailRoutes(email) if r.name not in present)
        config = evolve(config, routes=config.routes + extra)
        known = ", ".join(BUILT_IN_MODES)
        for rule, mode in unknownModes(email):
            section = f"email.rule:{rule.pattern}" if rule is not None else "email"
            key = "mode" if rule is not None else "default_mode"
            where = rule.source if rule is not None else email.keySources.get(key, PYTHON)
            errors.add(f"unknown delivery mode {mode!r} (known: {known}, and plugins')",
                       where, section, key)
    config, modelErrors = checkModel(config)
    errors.extend(modelErrors)
    if defaultCert is None:
        errors.extend(_checkStandInTLS(config))
    errors.warnings.extend(_shadowedRoutes(config.routes))
    errors.warnings.extend(_capsRoundedUp(config))
    adminErrors, adminWarnings = _checkAdmin(config)
    errors.extend(adminErrors)
    errors.warnings.extend(adminWarnings)
    previousGates = {} if previous is None else previous.routeGates
    parsed: list[_Parsed] = []
    for route in config.routes:
        result = _parseRoute(
            route, config, actions, defaultCert, clock, errors, previousGates, threadpool, certs
        )
        if result is not None:
            parsed.append(result)
    fallback = None
    fallbackItem: Optional[_Parsed] = None
    if config.defaults.target is not None and "forward" in actions:
        fallbackConfig = RouteConfig(name="defaults", ports=(), action="forward")
        item = _parseRoute(
            fallbackConfig, config, actions, defaultCert, clock, errors, previousGates, threadpool
        )
        if item is not None:
            fallback = CompiledRoute(item.route, item.action, item.options)
            fallbackItem = item
            parsed.append(item)
    errors.raiseIfAny()
    tables = _portTables(
        [item for item in parsed if item.route.ports], config, clock, fallback, certs
    )
    globalLimits = config.defaults.limits
    gate = (
        previous.gate
        if previous is not None and previous.gate.limits == globalLimits
        else Gate(globalLimits, clock)
    )
    # ([defaults] target's route is None: a route may be named "defaults".)
    routeResources = {
        (None if item is fallbackItem else item.route.name): item.options for item in parsed
        if callable(getattr(item.options, "start", None))
        and callable(getattr(item.options, "stop", None))
    }
    if previous is not None:
        _inheritResources(routeResources, previous.routeResources)
    return CompiledConfig(
        config, tables, gate, tuple(routeResources.values()), routeResources,
        warnings=firstOfEach([*config.warnings, *errors.warnings]),
        routeGates={item.route.name: item.gate for item in parsed if item.gate is not None},
    )  # fmt: skip


def _inheritResources(
    resources: dict[Optional[str], Any], previous: dict[Optional[str], Any]
) -> None:
    """Hand each resource that can take it over its route's previous one."""
    for name, resource in resources.items():
        was = previous.get(name)
        inherit = getattr(resource, "inherit", None)
        if was is None or type(was) is not type(resource) or not callable(inherit):
            continue
        try:
            inherit(was)
        except Exception:
            log.failure(
                "[route:{route}] could not take over its previous state",
                route=name if name is not None else "defaults",
            )


def _checkStandInTLS(config: RouterConfig) -> list[ConfigError]:
    """
    Without the self-signed certificate (C{checkconfig} makes none), the
    TLS contexts of the routes that name no certificate, and the mail
    server's, are tried with a stand-in, so that C{[tls]}'s settings that
    cannot be served fail here rather than at start.
    """
    if config.tls.cert is not None:
        return []
    terminating = [
        route for route in config.routes
        if route.tls in ("terminate", "terminate-and-reencrypt") and route.cert is None
    ]
    if not terminating and config.email is None:
        return []
    try:
        checkServerSettings(config.tls)
    except Exception as e:
        routes = [route for route in terminating if not _isMailRoute(route)]
        if routes:
            route = routes[0]
            where, section, key = route.sourceOf("tls"), f"route:{route.name}", "tls"
        else:
            assert config.email is not None
            where, section, key = config.email.keySources.get("ports", PYTHON), "email", "ports"
        return [ConfigError(f"cannot serve TLS under [tls]'s settings: {e}", where, section, key)]
    return []


def _checkAdmin(config: RouterConfig) -> tuple[list[ConfigError], list[ConfigError]]:
    """
    An admin listener off loopback must ask for a password, and is warned
    of (plain HTTP); hashes must be hashes. The errors, and the warnings.
    """
    admin = config.admin
    errors: list[ConfigError] = []
    warnings: list[ConfigError] = []
    if admin.users is not None:
        try:
            parseUsers(admin.users.text)
        except ValueError as e:
            errors.append(ConfigError(str(e), admin.users.source, "admin", "users"))
        if admin.listen is not None and not _isLoopback(admin.listen.host):
            warnings.append(ConfigError(
                f"the admin listener on {admin.listen} is plain HTTP: its passwords cross the"
                " network in the clear; keep it on loopback and reach it through a route"
                " with tls = terminate",
                admin.keySources.get("listen", PYTHON), "admin", "listen",
            ))  # fmt: skip
    elif admin.listen is not None and not _isLoopback(admin.listen.host):
        errors.append(ConfigError(
            f"the admin listener on {admin.listen} is not on loopback: set users",
            admin.keySources.get("listen", PYTHON), "admin", "listen",
        ))
    return errors, warnings


def _capsRoundedUp(config: RouterConfig) -> list[ConfigError]:
    """
    A C{max_connections} that the workers' shares (each rounded up, at least
    one) let more than a tenth past: 1 between 8 workers lets 8 in.
    """
    workers = config.daemon.workerCount()
    if workers <= 1:
        return []
    places = [("defaults", config.defaults.limits, config.defaults.keySources)]
    places += [(f"route:{r.name}", r.limits, r.keySources) for r in config.routes]
    warnings = []
    for section, limits, sources in places:
        total = limits.max_connections
        if total is None:
            continue
        share = ceil(total / workers)  # as the service shares it
        if share * workers <= total * 1.1:
            continue
        warnings.append(ConfigError(
            f"{total} split between {workers} workers, each allowed {share}: up to"
            f" {share * workers} in all (workers = 1 keeps it exact)",
            sources.get("max_connections", PYTHON), section, "max_connections",
        ))  # fmt: skip
    return warnings


def _shadowedRoutes(routes: Sequence[RouteConfig]) -> list[ConfigError]:
    """
    Routes that can never match: another on the same port and address
    matches exactly the same connections and requests (same priority,
    domains, client addresses, TLS or not, paths, methods, headers), and
    comes first (nginx warns of a "conflicting server name" likewise). The
    mail server's routes come after the file's, so a route of the file on a
    mail port can take all its connections.
    """
    warnings = []
    first: dict[tuple[Any, ...], RouteConfig] = {}
    for route in routes:
        for port in route.ports:
            key = (
                port, route.bind, route.priority, frozenset(route.domains),
                frozenset(route.client_ip), route.tls is not None, frozenset(route.paths),
                frozenset(route.methods), frozenset(route.headers),
            )  # fmt: skip
            earlier = first.setdefault(key, route)
            if earlier is route:
                continue
            if _isMailRoute(route):
                warnings.append(ConfigError(
                    f"takes every connection of the mail server's port {port} ([email] ports):"
                    " give it other domains or another port",
                    earlier.sourceOf("ports"), f"route:{earlier.name}", "ports",
                ))  # fmt: skip
            else:
                warnings.append(ConfigError(
                    f"never matches on port {port}: [route:{earlier.name}] matches the same"
                    " connections and comes first",
                    route.sourceOf("ports"), f"route:{route.name}", "ports",
                ))  # fmt: skip
    return warnings


def _isMailRoute(route: RouteConfig) -> bool:
    """Is C{route} one the mail server made (L{emailRoutes}), not the file's?"""
    return route.source is PYTHON and route.name.startswith(EMAIL_ROUTE_PREFIX)


def _checkMailAuth(config: RouterConfig) -> list[ConfigError]:
    """
    What the mail server needs to check passwords, found here rather than
    by a mail server that cannot start: hashes that are hashes, and the
    C{[ldap]} section C{auth = ldap} asks.
    """
    email = config.email
    if email is None:
        return []
    if email.auth == "static" and email.users is not None:
        try:
            parseUsers(email.users.text)
        except ValueError as e:
            return [ConfigError(str(e), email.users.source, "email", "users")]
    if email.auth == "ldap" and config.ldap is None:
        where = email.keySources.get("auth", PYTHON)
        return [ConfigError("auth = ldap needs an [ldap] section", where, "email", "auth")]
    return []


def _checkMailRules(config: RouterConfig) -> list[ConfigError]:
    """
    The patterns of C{[email.rule:...]} as the mail server reads them: a
    malformed one, or one that matches the same recipients as a rule
    above it (C{*@example.com} and C{*@EXAMPLE.com}, or C{example.com}), is
    an error at its section rather than a mail server that cannot start.
    """
    email = config.email
    if email is None:
        return []
    errors = []
    first: dict[tuple[str, str], Any] = {}
    for rule in email.rules:
        section = f"email.rule:{rule.pattern}"
        try:
            key = patternKey(rule.pattern)
        except ValueError as e:
            errors.append(ConfigError(str(e), rule.source, section))
            continue
        earlier = first.setdefault(key, rule)
        if earlier is not rule:
            errors.append(ConfigError(
                f"matches the same recipients as [email.rule:{earlier.pattern}] at"
                f" {earlier.source} (patterns are compared lower-case, names as A-labels)",
                rule.source, section,
            ))  # fmt: skip
    return errors


def _isLoopback(host: str) -> bool:
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def needsDefaultCertificate(config: RouterConfig) -> bool:
    """Does a terminating route (the email ones too) lack a certificate of its own?"""
    routes = config.routes + emailRoutes(config.email)
    return config.tls.cert is None and any(
        route.tls in ("terminate", "terminate-and-reencrypt") and route.cert is None
        for route in routes
    )


def loadAndCompile(
    path: str,
    actions: dict[str, Any],
    clock: IReactorTime,
    defaultCertFor: Callable[[RouterConfig], Optional[CertificatePair]] = lambda config: None,
    previous: Optional[CompiledConfig] = None,
    certs: Optional[CertificateSource] = None,
    adjust: Callable[[RouterConfig], RouterConfig] = lambda config: config,
) -> CompiledConfig:
    """
    Load C{path} and compile it; raise L{ConfigErrors} with the errors of both.

    C{adjust} turns the file's configuration into what this process applies
    (a worker's share of the connection caps).

    When the file has errors, the routes the loader could still make out are
    compiled anyway, so that one run reports an unknown action beside a bad
    port; an error on a key the loader already reported is not repeated.
    """
    try:
        config = loadConfig(path)
        loadErrors: list[ConfigError] = []
    except ConfigErrors as e:
        if not isinstance(e.partial, RouterConfig):
            raise
        config, loadErrors = e.partial, e.errors
    # The file's [email], before C{adjust}: a reload keeps the running one.
    loadErrors = [*loadErrors, *_checkMailAuth(config), *_checkMailRules(config)]
    config = adjust(config)
    try:
        compiled = compileConfig(
            config, actions, clock, defaultCertFor(config), previous, certs=certs
        )
    except ConfigErrors as e:
        reported = {(error.section, error.key) for error in loadErrors}
        more = [error for error in e.errors if (error.section, error.key) not in reported]
        raise ConfigErrors([*loadErrors, *more]) from None
    if loadErrors:
        raise ConfigErrors(loadErrors)
    return compiled


def checkConfigFile(path: str, actions: Optional[dict[str, Any]] = None) -> CompiledConfig:
    """Load and check C{path} as C{checkconfig} does; raise L{ConfigErrors}."""
    from twisted.internet.task import Clock

    return loadAndCompile(path, actions if actions is not None else loadActions(), Clock())

