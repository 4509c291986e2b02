"""DcRouter: compiling a configuration through the plugins, reload, listeners."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from dcrouter.compile import compileConfig, loadActions
from dcrouter.config import ConfigErrors, loadConfig
from dcrouter.config.model import RouteConfig, RouterConfig, TlsSettings
from dcrouter.net.tls import ensureSelfSigned
from dcrouter.service import DcRouter, endpointString
from tests.helpers import Backend, connect, freePort, listen


def errorsOf(*routes, **settings):
    with pytest.raises(ConfigErrors) as caught:
        compileConfig(RouterConfig(routes=routes, **settings), loadActions(), Clock())
    return [str(error) for error in caught.value.errors]


def test_builtin_actions_are_found_as_plugins():
    assert {"forward", "static", "block"} <= set(loadActions())


def test_unknown_action_lists_the_known_ones():
    (error,) = errorsOf(RouteConfig(name="x", ports=(1,), action="foward"))
    assert "[route:x] action: unknown action 'foward' (known: block, forward, http, redirect, smtp-starttls, static)" in error


def test_forward_without_a_target_is_an_error():
    (error,) = errorsOf(RouteConfig(name="x", ports=(1,)))
    assert "needs a target" in error


def test_keys_the_action_does_not_know_are_errors_and_all_are_reported():
    errors = errorsOf(
        RouteConfig(name="a", ports=(1,), action="block", options={"target": "h:1"}),
        RouteConfig(name="b", ports=(2,), action="static", options={"status": "99"}),
    )
    assert any("[route:a] target: unknown key for action 'block'" in e for e in errors)
    assert any("[route:b] status: 99 is out of range" in e for e in errors)


def test_backend_keys_need_reencrypt():
    (error,) = errorsOf(
        RouteConfig(name="x", ports=(1,), options={"target": "h:1", "backend_verify": "no"})
    )
    assert "backend_verify: only applies to tls = terminate-and-reencrypt" in error


def test_cert_without_tls_is_only_for_startls_actions(tmp_path):
    pair = ensureSelfSigned(str(tmp_path))
    (error,) = errorsOf(RouteConfig(name="x", ports=(1,), cert=pair, options={"target": "h:1"}))
    assert "[route:x] cert: cert and key only apply to terminating routes" in error
    (error,) = errorsOf(
        RouteConfig(name="x", ports=(1,), action="smtp-starttls", options={"target": "h:1"})
    )
    assert "needs cert and key (or [tls] cert)" in error


def test_smtp_starttls_serves_the_routes_cert_under_the_tls_policy(tmp_path):
    pair = ensureSelfSigned(str(tmp_path))
    route = RouteConfig(name="mx", ports=(25,), action="smtp-starttls", cert=pair,
                        options={"target": "127.0.0.1:2525"})
    compiled = compileConfig(
        RouterConfig(routes=(route,), tls=TlsSettings(min_version="1.3")), loadActions(), Clock()
    )
    (compiledRoute,) = compiled.tables[25].routes
    serverTLS = compiledRoute.options.serverTLS
    assert serverTLS.pair == pair and serverTLS.settings.min_version == "1.3"


def test_endpoint_strings_escape_ipv6():
    assert endpointString(443, "0.0.0.0") == "tcp:port=443:interface=0.0.0.0:backlog=4096"
    assert endpointString(443, "::1") == "tcp6:port=443:interface=\\:\\:1:backlog=4096"


def writeConfig(path, *routes, extra=""):
    path.write_text(
        f"[dcrouter]\ndrain_timeout = 0\n[defaults]\nbind = 127.0.0.1\n{extra}" + "".join(routes)
    )


def forward(name, port, target):
    return f"[route:{name}]\nports = {port}\ntarget = 127.0.0.1:{target}\n"


@pytest_twisted.ensureDeferred
async def test_reload_swaps_routes_opens_new_ports_and_keeps_live_connections(tmp_path):
    first, second = Backend(greeting=b"1"), Backend(greeting=b"2")
    firstPort, secondPort = await listen(first), await listen(second)
    p1, p2 = freePort(), freePort()
    path = tmp_path / "dcrouter.ini"
    writeConfig(path, forward("a", p1, firstPort.getHost().port))
    service = DcRouter(loadConfig(str(path)), configPath=str(path))
    service.startService()
    try:
        live = await connect(p1)
        assert await live.waitFor(1) == b"1"

        writeConfig(
            path,
            forward("a", p1, secondPort.getHost().port),
            forward("b", p2, firstPort.getHost().port),
        )
        assert service.reload()
        fresh, other = await connect(p1), await connect(p2)
        assert await fresh.waitFor(1) == b"2"
        assert await other.waitFor(1) == b"1"
        live.transport.write(b"still here")
        assert await live.waitFor(11) == b"1still here"

        path.write_text("[route:broken]\nports = eighty\n")
        assert not service.reload()
        again = await connect(p2)
        assert await again.waitFor(1) == b"1"
        for client in (live, fresh, other, again):
            client.transport.loseConnection()
    finally:
        await service.stopService()
        await firstPort.stopListening()
        await secondPort.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_stops_the_start_with_a_clear_message():
    taken = await listen(Backend())
    port = taken.getHost().port
    config = RouterConfig(
        routes=(RouteConfig(name="x", ports=(port,), bind=("127.0.0.1",), action="block"),)
    )
    service = DcRouter(config)
    with pytest.raises(SystemExit) as caught:
        service.privilegedStartService()
    assert f"cannot listen on 127.0.0.1:{port}" in str(caught.value)
    assert service.listeners == {}
    await taken.stopListening()


def test_one_run_reports_loader_and_plugin_errors_together(tmp_path):
    from dcrouter.compile import checkConfigFile

    path = tmp_path / "bad.ini"
    path.write_text(
        "[route:web]\nports = eighty\naction = static\nstatus = 9\n"
        "[route:api]\nports = 81\naction = foward\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    report = caught.value.report()
    assert f"{path}:2: [route:web] ports: 'eighty' is not a port or range" in report
    assert f"{path}:4: [route:web] status: 9 is out of range" in report
    assert f"{path}:7: [route:api] action: unknown action 'foward'" in report


def test_a_forward_routes_fin_timeout_is_its_own_or_the_defaults_and_longer_than_0(tmp_path):
    from dcrouter.compile import checkConfigFile

    path = tmp_path / "routes.ini"
    path.write_text(
        "[defaults]\nfin_timeout = 20s\n"
        "[route:a]\nports = 1\ntarget = h:1\n"
        "[route:b]\nports = 2\ntarget = h:1\nfin_timeout = 5s\n"
    )
    compiled = compileConfig(loadConfig(str(path)), loadActions(), Clock())
    routes = compiled.routeResources
    assert [routes[name].options.finTimeout for name in ("a", "b")] == [20.0, 5.0]
    path.write_text("[route:a]\nports = 1\ntarget = h:1\nfin_timeout = 0\n")
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    assert caught.value.report().strip() == (
        f"{path}:4: [route:a] fin_timeout: '0' is not longer than 0"
    )


def test_an_http_routes_send_timeout_is_its_own_or_the_http_sections(tmp_path):
    from dcrouter.compile import checkConfigFile

    path = tmp_path / "routes.ini"
    path.write_text(
        "[http]\nsend_timeout = 20s\n"
        "[route:a]\nports = 80\naction = http\ntarget = h:1\n"
        "[route:b]\nports = 80\naction = http\ntarget = h:1\nsend_timeout = 5s\n"
        "domains = b.test\n"
    )
    compiled = compileConfig(loadConfig(str(path)), loadActions(), Clock())
    routes = compiled.routeResources
    assert [routes[name].proxy.sendTimeout for name in ("a", "b")] == [20.0, 5.0]
    path.write_text("[route:a]\nports = 80\naction = http\ntarget = h:1\nsend_timeout = 0\n")
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    assert caught.value.report().strip() == (
        f"{path}:5: [route:a] send_timeout: '0' is not longer than 0"
    )


def test_a_routes_timeouts_must_be_longer_than_0(tmp_path):
    """
    A 0 would fire at once (a connect, a response) or run an idle sweep or
    a health check on every reactor turn: each is an error naming its line.
    """
    from dcrouter.compile import checkConfigFile

    path = tmp_path / "routes.ini"
    path.write_text(
        "[route:a]\nports = 1\ntarget = h:1\nconnect_timeout = 0\nidle_timeout = 0s\n"
        "health_check = tcp\nhealth_interval = 0\nhealth_timeout = 0ms\n"
        "[route:b]\nports = 80\naction = http\ntarget = h:1\nresponse_timeout = 0\n"
        "idle_timeout = 0\nconnect_timeout = 0\n"
        "[route:c]\nports = 25\naction = smtp-starttls\ntarget = h:1\n"
        "starttls_timeout = 0\nidle_timeout = 0\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    report = caught.value.report()
    for line, where in [
        (4, "[route:a] connect_timeout: '0'"),
        (5, "[route:a] idle_timeout: '0s'"),
        (7, "[route:a] health_interval: '0'"),
        (8, "[route:a] health_timeout: '0ms'"),
        (13, "[route:b] response_timeout: '0'"),
        (14, "[route:b] idle_timeout: '0'"),
        (15, "[route:b] connect_timeout: '0'"),
        (20, "[route:c] starttls_timeout: '0'"),
        (21, "[route:c] idle_timeout: '0'"),
    ]:
        assert f"{path}:{line}: {where} is not longer than 0" in report


def test_admin_and_email_errors_found_by_compiling_name_their_line(tmp_path):
    from dcrouter.compile import checkConfigFile

    path = tmp_path / "bad.ini"
    path.write_text(
        "[admin]\nlisten = 0.0.0.0:9900\n"
        "[email]\nhostname = mx.example.test\nports = 2525\ndefault_mode = foo\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    report = caught.value.report()
    assert f"{path}:2: [admin] listen: the admin listener on 0.0.0.0:9900" in report
    assert f"{path}:6: [email] default_mode: unknown delivery mode 'foo'" in report


@pytest_twisted.ensureDeferred
async def test_reload_while_draining_is_ignored_and_sighup_stays_handled(tmp_path):
    import signal

    from twisted.internet.error import ConnectionRefusedError

    backend = Backend(greeting=b"1")
    backendPort = await listen(backend)
    p1, p2 = freePort(), freePort()
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        "[dcrouter]\ndrain_timeout = 10\n[defaults]\nbind = 127.0.0.1\n"
        + forward("a", p1, backendPort.getHost().port)
    )
    service = DcRouter(loadConfig(str(path)), configPath=str(path))
    service.startService()
    live = await connect(p1)
    await live.waitFor(1)
    stopped = service.stopService()
    assert signal.getsignal(signal.SIGHUP) == service.onHangup
    writeConfig(path, forward("b", p2, backendPort.getHost().port))
    assert not service.reload()
    assert service.listeners == {}
    with pytest.raises(ConnectionRefusedError):
        await connect(p2)
    live.transport.loseConnection()
    await stopped
    assert signal.getsignal(signal.SIGHUP) != service.onHangup
    await backendPort.stopListening()


class ExplodingAction:
    name = "exploding"

    def parseOptions(self, options):
        raise RuntimeError("plugin bug")

    def buildProtocol(self, connection, options):
        raise AssertionError("never built")


@pytest_twisted.ensureDeferred
async def test_a_reload_that_raises_keeps_the_running_configuration(tmp_path):
    from dcrouter.compile import loadActions

    backend = Backend(greeting=b"1")
    backendPort = await listen(backend)
    p1 = freePort()
    path = tmp_path / "dcrouter.ini"
    writeConfig(path, forward("a", p1, backendPort.getHost().port))
    actions = {**loadActions(), "exploding": ExplodingAction()}
    service = DcRouter(loadConfig(str(path)), actions=actions, configPath=str(path))
    service.startService()
    try:
        writeConfig(path, f"[route:x]\nports = {p1}\naction = exploding\n")
        assert not service.reload()
        client = await connect(p1)
        assert await client.waitFor(1) == b"1"
        client.transport.loseConnection()
    finally:
        await service.stopService()
        await backendPort.stopListening()


@pytest_twisted.ensureDeferred
async def test_changed_certificate_files_are_served_without_a_restart(tmp_path):
    import shutil

    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

    from dcrouter.config.model import CertificatePair, DaemonSettings, Defaults
    from dcrouter.net.tls import clientTLS, ensureSelfSigned
    from tests.helpers import Recorder

    first = ensureSelfSigned(str(tmp_path / "first"), "first.test")
    second = ensureSelfSigned(str(tmp_path / "second"), "second.test")
    served = CertificatePair(str(tmp_path / "served.pem"), str(tmp_path / "served.key"))
    shutil.copy(first.cert, served.cert)
    shutil.copy(first.key, served.key)
    port = freePort()
    config = RouterConfig(
        routes=(RouteConfig(name="tls", ports=(port,), action="static", tls="terminate",
                            cert=served, options={"body": "hi"}),),
        daemon=DaemonSettings(drain_timeout=0.0, state_dir=str(tmp_path / "state")),
        defaults=Defaults(bind=("127.0.0.1",)),
    )
    service = DcRouter(config)
    service.startService()

    async def servedName():
        client = Recorder()
        endpoint = wrapClientTLS(clientTLS("x", verify=False),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await connectProtocol(endpoint, client)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await client.closed
        from cryptography.x509.oid import NameOID

        certificate = client.transport.getPeerCertificate().to_cryptography()
        return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    try:
        assert await servedName() == "first.test"
        shutil.copy(second.cert, served.cert)
        shutil.copy(second.key, served.key)
        service.checkCertificateFiles()
        assert await servedName() == "second.test"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_reload_says_which_changes_wait_for_a_restart(tmp_path):
    """[admin] and the process-wide [dcrouter] settings are made at start only."""
    from twisted.logger import formatEvent, globalLogPublisher

    p1 = freePort()
    path = tmp_path / "dcrouter.ini"
    route = f"[route:a]\nports = {p1}\naction = static\nbody = hi\n"
    path.write_text(
        f"[dcrouter]\ndrain_timeout = 0\nworkers = 1\n[defaults]\nbind = 127.0.0.1\n"
        f"[admin]\nlisten = 127.0.0.1:{freePort()}\nsocket = off\n{route}"
    )
    service = DcRouter(loadConfig(str(path)), configPath=str(path))
    service.startService()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        path.write_text(
            f"[dcrouter]\ndrain_timeout = 0\nlog_format = json\nworkers = 2\n"
            f"state_dir = {tmp_path / 'elsewhere'}\n[defaults]\nbind = 127.0.0.1\n"
            f"[admin]\nlisten = 127.0.0.1:{freePort()}\nsocket = off\n{route}"
        )
        assert service.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
        await service.stopService()
    warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
    assert warnings == [
        "changed, but taken only at the next restart: [dcrouter] workers, [dcrouter] state_dir,"
        " [dcrouter] log_format, [admin]"
    ]



def test_an_ipv6_wildcard_leaves_ipv4_to_the_ipv4_listener_of_its_port(monkeypatch):
    """
    C{bind = 0.0.0.0, ::} must start: a dual-stack C{::} would take IPv4 as
    well and collide with C{0.0.0.0} (EADDRINUSE). Nothing is bound here.
    """
    import socket

    import dcrouter.service as service
    from dcrouter.net.tcp import _Port

    opened = {}

    def listenTCP(reactor, port, factory, backlog, interface, v6only=False):
        opened[(port, interface)] = v6only

    monkeypatch.setattr(service, "listenTCP", listenTCP)
    config = RouterConfig(routes=(
        RouteConfig(name="both", ports=(1080,), bind=("0.0.0.0", "::"), action="block"),
        RouteConfig(name="six", ports=(1081,), bind=("::",), action="block"),
    ))
    DcRouter(config, Clock()).privilegedStartService()
    assert opened == {
        (1080, "0.0.0.0"): False, (1080, "::"): True, (1081, "::"): False,
    }, "alone on its port, :: stays dual-stack"
    port = _Port(1080, None, interface="::", v6only=True)
    sock = port.createInternetSocket()
    with sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def reloadThroughBinds(tmp_path, first, *then):
    """
    A router started with C{[route:a]} on port 1080 bound to C{first},
    reloaded with each bind of C{then}: it, each reload's result, and the
    events logged meanwhile.
    """
    from twisted.logger import globalLogPublisher

    path = tmp_path / "dcrouter.ini"

    def write(bind):
        path.write_text(f"[dcrouter]\nstate_dir = {tmp_path}\n[route:a]\nports = 1080\n"
                        f"bind = {bind}\naction = block\n")

    write(first)
    router = DcRouter(loadConfig(str(path)), MemoryReactorClock(), configPath=str(path))
    events = []
    reloaded = []
    globalLogPublisher.addObserver(events.append)
    try:
        router.privilegedStartService()
        for bind in then:
            write(bind)
            reloaded.append(router.reload())
    finally:
        globalLogPublisher.removeObserver(events.append)
    return router, reloaded, events


def test_a_reload_cannot_add_ipv4_beside_a_dual_stack_listener_and_says_why(
    monkeypatch, tmp_path
):
    """
    :: opened alone on its port takes IPv4 too, and an open socket cannot be
    made IPv6-only: 0.0.0.0 on the port waits for a restart, and the
    rejection says so rather than "Address already in use". (The :: socket
    here is bound, not listening: it accepts nothing.)
    """
    import socket

    from twisted.internet.error import CannotListenError
    from twisted.logger import formatEvent

    import dcrouter.service as service

    dualStack = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    dualStack.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dualStack.bind(("::", 0))

    class Listening:
        socket = dualStack

    def listenTCP(reactor, port, factory, backlog, interface, v6only=False):
        if interface == "0.0.0.0":
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return Listening()

    monkeypatch.setattr(service, "listenTCP", listenTCP)
    try:
        router, reloaded, events = reloadThroughBinds(tmp_path, "::", "0.0.0.0, ::")
    finally:
        dualStack.close()
    assert reloaded == [False]
    (error,) = [formatEvent(e) for e in events if e["log_level"].name == "error"]
    assert "cannot listen on 0.0.0.0:1080: [::]:1080 already takes IPv4 as well" in error
    assert "a restart applies this" in error
    assert list(router.listeners) == [(1080, "::")]


def test_a_reload_that_leaves_an_ipv6_only_listener_alone_on_its_port_warns(
    monkeypatch, tmp_path
):
    """
    :: opened beside 0.0.0.0 takes IPv6 only; a reload that drops 0.0.0.0
    leaves the port's IPv4 clients refused until a restart, and says so.
    (The sockets here are bound, not listening: they accept nothing.)
    """
    import socket

    from twisted.logger import formatEvent

    import dcrouter.service as service

    sockets = []

    def listenTCP(reactor, port, factory, backlog, interface, v6only=False):
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((interface, 0))
        sockets.append(sock)

        class Listening:
            def stopListening(self):
                sock.close()

        listening = Listening()
        listening.socket = sock
        return listening

    monkeypatch.setattr(service, "listenTCP", listenTCP)
    try:
        _, reloaded, events = reloadThroughBinds(tmp_path, "0.0.0.0, ::", "0.0.0.0, ::", "::")
    finally:
        for sock in sockets:
            sock.close()
    assert reloaded == [True, True]
    warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
    assert warnings == [
        "port 1080: IPv4 clients are refused until a restart: [::]:1080 was opened IPv6-only"
        " beside an IPv4 listener a reload closed, and an open socket cannot be made"
        " dual-stack"
    ], "the reload that kept 0.0.0.0 said nothing"


class SignalReactor(MemoryReactorClock):
    """A memory reactor whose callFromThread calls at once (as the next turn would)."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


@pytest.fixture
def twistedStopHandlers():
    """Stand-ins for the SIGINT and SIGTERM handlers Twisted installs; what they were sent."""
    import signal

    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    yield received
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_second_sigterm_while_stopping_is_only_logged(twistedStopHandlers):
    """Twisted's handler would call reactor.stop() again: ReactorNotRunning, a traceback."""
    import signal

    from twisted.logger import formatEvent, globalLogPublisher

    reactor = SignalReactor()
    config = RouterConfig(routes=(RouteConfig(name="a", ports=(1080,), action="block"),))
    service = DcRouter(config, reactor)
    service.startService()
    reactor.run()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        stopped = service.stopService()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        reactor.advance(1)
        assert stopped.called
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert twistedStopHandlers == [signal.SIGTERM], "Twisted's handler got the first one only"
    said = [formatEvent(event) for event in events]
    assert "SIGTERM received: dcrouter is already stopping" in said
    assert "SIGINT received: dcrouter is already stopping" in said
    # The process is ending: a later one is still only logged.
    assert signal.getsignal(signal.SIGTERM) == service.onStopSignal


def test_a_signal_while_the_reactor_stops_for_another_reason_is_only_logged(
    twistedStopHandlers,
):
    """A worker whose supervisor is gone stops its reactor itself, then gets SIGTERM."""
    import signal

    reactor = SignalReactor()
    config = RouterConfig(routes=(RouteConfig(name="a", ports=(1080,), action="block"),))
    service = DcRouter(config, reactor)
    service.startService()
    reactor.run()
    for trigger, args, kwargs in reactor.triggers["before"]["shutdown"]:
        trigger(*args, **kwargs)
    stopped = service.stopService()
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    reactor.advance(1)
    assert stopped.called
    assert twistedStopHandlers == []


def test_a_stop_without_the_reactor_gives_the_signals_back(twistedStopHandlers):
    """
    A program that stops the service and runs on keeps its signals: one
    during the drain, or after, stops its reactor as Twisted's handler does.
    """
    import signal

    reactor = SignalReactor()
    config = RouterConfig(routes=(RouteConfig(name="a", ports=(1080,), action="block"),))
    service = DcRouter(config, reactor)
    service.startService()
    reactor.run()
    stopped = service.stopService()
    reactor.advance(1)
    assert stopped.called
    assert signal.getsignal(signal.SIGTERM) != service.onStopSignal
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    assert twistedStopHandlers == [signal.SIGTERM]


def test_a_reload_keeps_what_the_route_knew_of_its_targets():
    """
    compileConfig with the configuration it replaces: a route's pool takes
    over its targets' health from the same route's pool; another route, or
    one named "defaults" beside [defaults] target, keeps its own.
    """
    from dcrouter.config.model import Defaults, HostPort

    def config(target):
        return RouterConfig(
            routes=(
                RouteConfig(name="web", ports=(1080,), action="forward",
                            options={"target": f"{target}, 10.0.0.2:80"}),
                RouteConfig(name="defaults", ports=(1081,), action="forward",
                            options={"target": "10.0.0.1:80"}),
            ),
            defaults=Defaults(target=HostPort("10.0.0.3", 80)),
        )

    clock = Clock()
    actions = loadActions()
    first = compileConfig(config("10.0.0.1:80"), actions, clock)
    assert len(first.resources) == 3, "the route named defaults and [defaults] target each have one"
    pool = first.routeResources["web"].targets.pool
    pool.reportFailure(pool.targets[0], "connect refused")
    second = compileConfig(config("10.0.0.1:80"), actions, clock, previous=first)
    web = second.routeResources["web"].targets.pool
    assert [t.up for t in web.targets] == [False, True]
    assert web.targets[0].failures == 1
    other = second.routeResources["defaults"].targets.pool
    assert other.targets[0].up, "same address, another route: not the same target"
    assert second.routeResources[None].targets.pool.targets[0].up


def test_warnings_are_logged_at_start_and_at_each_reload(tmp_path):
    """What checkconfig warns of, the daemon logs: at start, and again when reloaded."""
    from twisted.logger import formatEvent, globalLogPublisher

    secret = tmp_path / "jwt.secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o644)
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path}\n[route:a]\nports = 1080\naction = static\n"
        f"body = ok\nauth = jwt\njwt_key = {secret}\njwt_algorithms = HS256\n"
    )
    router = DcRouter(loadConfig(str(path)), MemoryReactorClock(), configPath=str(path))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        router.privilegedStartService()
        router.startService()
        assert router.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
        router.stopService()
    warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
    warning = (
        f"configuration: {path}:8: [route:a] jwt_key: {secret} holds a secret and every user"
        f" can read it (mode 0644); chmod o-r {secret}"
    )
    assert warnings == [warning, warning]


def test_acme_and_the_mail_servers_ldap_changes_wait_for_a_restart():
    """Their issuer and checker are made at start: a reload says so rather than nothing."""
    from attrs import evolve

    from dcrouter.config.email import EmailSettings
    from dcrouter.config.model import AcmeConfig, LDAPSettings
    from dcrouter.service import takenAtRestart

    acme = AcmeConfig(enabled=True, directory="staging")
    ldap = LDAPSettings(url="ldap://127.0.0.1", base="dc=example")
    old = RouterConfig(acme=acme, ldap=ldap, email=EmailSettings("mx.example", auth="ldap"))
    new = evolve(old, acme=evolve(acme, directory="production"),
                 ldap=evolve(ldap, url="ldap://127.0.0.2"))
    assert takenAtRestart(old, new) == ["[acme]", "[ldap] for the mail server's AUTH"]
    # Without ACME running, or mail checking passwords elsewhere, nothing waits.
    assert takenAtRestart(evolve(old, acme=AcmeConfig(), email=None), new) == []


def test_the_mail_servers_starttls_takes_renewed_certificate_files(tmp_path):
    """Changed files (a certbot renewal) or a reload: STARTTLS serves them too."""
    import shutil

    from OpenSSL import SSL

    from dcrouter.config.email import EmailSettings
    from dcrouter.config.model import CertificatePair, DaemonSettings, TlsSettings

    first = ensureSelfSigned(str(tmp_path / "first"), "first.test")
    second = ensureSelfSigned(str(tmp_path / "second"), "second.test")
    served = CertificatePair(str(tmp_path / "served.pem"), str(tmp_path / "served.key"))
    shutil.copy(first.cert, served.cert)
    shutil.copy(first.key, served.key)
    config = RouterConfig(
        daemon=DaemonSettings(state_dir=str(tmp_path / "state")),
        tls=TlsSettings(cert=served),
        email=EmailSettings("mx.example", ports=(2525,), default_mode="reject"),
    )
    router = DcRouter(config, MemoryReactorClock())
    assert router.mail is not None

    def servedName():
        context = router.mail.factories[2525].serverTLS.getContext()
        leaf = SSL.Connection(context).get_certificate().to_cryptography()
        return leaf.subject.rfc4514_string()

    assert servedName() == "CN=first.test"
    shutil.copy(second.cert, served.cert)
    shutil.copy(second.key, served.key)
    router.renewMailTLS(router.config)
    assert servedName() == "CN=second.test"
    # A pair that cannot be used (a key half copied) leaves the working one.
    shutil.copy(first.key, served.key)
    router.renewMailTLS(router.config)
    assert servedName() == "CN=second.test"


def test_a_reload_keeps_the_mail_routes_of_the_mail_server_that_runs(tmp_path):
    """
    The mail server takes a new [email] at its next start: until then the
    routes stay those of what it serves, not public ports to nothing.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    path = tmp_path / "dcrouter.ini"

    def write(ports):
        path.write_text(f"[dcrouter]\nstate_dir = {tmp_path}\n[email]\nhostname = mx.example\n"
                        f"ports = {ports}\ndefault_mode = reject\n")

    write("2525")
    router = DcRouter(loadConfig(str(path)), MemoryReactorClock(), configPath=str(path))
    router.privilegedStartService()
    write("2525, 2626")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert router.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert router.config.email.ports == (2525,)
    assert {port for port, _ in router.compiled.listenKeys()} == {2525}
    warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
    assert warnings == ["[email] changed: the mail server takes it at the next restart"]


def test_a_state_dir_that_cannot_be_made_stops_the_start_with_why(tmp_path):
    """One line from twistd's dcrouter, not the traceback of whatever wrote there first."""
    from dcrouter.tap import Options, makeService

    (tmp_path / "afile").write_text("")
    path = tmp_path / "dcrouter.ini"
    path.write_text(f"[dcrouter]\nstate_dir = {tmp_path / 'afile' / 'state'}\n"
                    "[route:a]\nports = 1080\naction = block\n")
    options = Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit) as caught:
        makeService(options)
    assert str(caught.value) == (
        f"dcrouter: cannot start: state_dir {tmp_path / 'afile' / 'state'}: Not a directory"
    )



def test_a_reload_checks_the_mail_auth_the_file_asks_not_the_running_one(tmp_path):
    """[ldap] and [email] dropped together: valid, though the mail server runs until a restart."""
    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path}\n"
        "[ldap]\nurl = ldap://127.0.0.1\nbase = dc=example\n"
        "[email]\nhostname = mx.example\nports = 2525\ndefault_mode = reject\nauth = ldap\n"
    )
    router = DcRouter(loadConfig(str(path)), MemoryReactorClock(), configPath=str(path))
    router.privilegedStartService()
    path.write_text(f"[dcrouter]\nstate_dir = {tmp_path}\n"
                    "[route:a]\nports = 1080\naction = static\nbody = ok\n")
    assert router.reload(), router.reloadError
