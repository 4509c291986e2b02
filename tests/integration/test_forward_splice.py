"""
The forward action's splice path, through the router on the real reactor:
which connections are spliced, that their bytes arrive intact and counted,
and that everything a close does (access record, pool counts, idle timeout)
still happens; and the fallback to Twisted's pump where splice cannot serve.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import termios
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task, threads
from twisted.internet import reactor as globalReactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.model import CertificatePair, DaemonSettings, HostPort, RouteConfig
from dcrouter.net.tls import clientTLS, ensureSelfSigned
from dcrouter.ops.metrics import pools
from dcrouter.proxy import forward, splice
from dcrouter.proxy.splice import spliceAvailable
from tests.helpers import connect, listen, startRouter
from tests.streams import Flood, MiB, Peer, payload, until

reactor: Any = globalReactor

needsSplice = pytest.mark.skipif(not spliceAvailable(), reason="no splice(2) here")


@implementer(IHalfCloseableProtocol)
class Echo(Peer):
    """A backend that sends everything back, and closes after the client's end of file."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        self.transport.loseConnection()  # type: ignore[union-attr]


class Backends(Factory):
    """Builds C{protocol()} per connection; C{first} fires with the first one."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.built: list[Any] = []
        self.first: defer.Deferred[Any] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Any:
        built = self.protocol()
        self.built.append(built)
        if len(self.built) == 1:
            built.made.chainDeferred(self.first)
        return built


@pytest.fixture
def records() -> Any:
    """The connection access records written during the test."""
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "dcrouter.access" and "kind" not in event:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


async def router(backend: Backends, daemon: DaemonSettings | None = None, **route: Any) -> Any:
    listening = await listen(backend)
    target = HostPort("127.0.0.1", listening.getHost().port)
    options = {"target": str(target), **route.pop("options", {})}
    config = RouteConfig(name="fwd", ports=(0,), action="forward", options=options, **route)
    # splice = yes: these tests are about the pump, from the first bytes on.
    daemon = daemon or DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, splice="yes")
    service, port = await startRouter(config, daemon=daemon)
    return listening, service, port


def pumpOf(connection: Any) -> Any:
    """The splice pump of a connection, served at accept or by Twisted."""
    inner = getattr(connection, "inner", None)
    return connection.pump if inner is None else inner.pump


def inFlight(service: Any) -> list[int]:
    """The pool's count of connections in flight to each target."""
    return [state["active"] for pool in pools(service.compiled) for state in pool.snapshot()]


async def stop(service: Any, listening: Any) -> None:
    await service.stopService()
    await listening.stopListening()


async def echoThrough(client: Peer, size: int) -> bytes:
    """Send C{size} bytes and half-close; wait for the echo and its end."""
    data = payload(size, b"client")
    client.transport.write(data)  # type: ignore[union-attr]
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await client.eof
    return data


async def closedRecord(records: list[dict[str, Any]], client: Peer) -> dict[str, Any]:
    client.transport.loseConnection()  # type: ignore[union-attr]
    await client.closed
    await until(lambda: bool(records), "the access record")
    (record,) = records
    return record


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_plain_forward_is_spliced_intact_and_counted(served: str, records: Any) -> None:
    backend = Backends(Echo)
    listening, service, port = await router(backend)
    client = await connect(port, Peer())
    data = await echoThrough(client, 32 * MiB)
    assert client.digest.digest() == hashlib.sha256(data).digest()
    server = await backend.first
    assert server.digest.digest() == hashlib.sha256(data).digest()
    record = await closedRecord(records, client)
    assert record["spliced"] is True
    assert (record["bytesIn"], record["bytesOut"]) == (32 * MiB, 32 * MiB)
    assert record["ended"] == "client closed"
    await server.closed
    await until(lambda: inFlight(service) == [0], "the pool's count to drop")
    await stop(service, listening)


def refused(*args: Any, **kwargs: Any) -> int:
    """os.splice under a seccomp filter that says no."""
    raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))


@pytest.mark.parametrize("how", ["switched off", "os.splice missing", "os.splice refused"])
@pytest_twisted.ensureDeferred
async def test_without_splice_twisted_pumps_the_same_bytes(
    byTwisted: None, how: str, records: Any, monkeypatch: Any
) -> None:
    daemon = DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, splice="yes" if how != "switched off" else "no")
    if how == "os.splice missing":
        monkeypatch.delattr(os, "splice", raising=False)
    elif how == "os.splice refused":
        # Tried once per process: forget that it worked before the test.
        monkeypatch.setattr(splice, "_works", None)
        monkeypatch.setattr(os, "splice", refused)
    backend = Backends(Echo)
    listening, service, port = await router(backend, daemon)
    client = await connect(port, Peer())
    data = payload(4 * MiB, b"client")
    client.transport.write(data)
    await client.waitFor(1)
    # Twisted's pump reads 256 KiB at once from both sockets.
    (connection,) = service.router.connections
    forwarder = connection.inner
    sizes = [forwarder.transport.bufferSize, forwarder.upstream.transport.bufferSize]
    assert sizes == [256 * 1024] * 2
    client.transport.loseWriteConnection()
    await client.eof
    assert client.digest.digest() == hashlib.sha256(data).digest()
    record = await closedRecord(records, client)
    assert record["spliced"] is False
    assert (record["bytesIn"], record["bytesOut"]) == (4 * MiB, 4 * MiB)
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_no_descriptor_for_the_pump_leaves_the_connection_to_twisted(
    byTwisted: None, records: Any, monkeypatch: Any
) -> None:
    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(forward, "SplicePump", exhausted)
    warnings: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == forward.log.namespace:
            warnings.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        listening, service, port = await router(Backends(Echo))
        client = await connect(port, Peer())
        data = await echoThrough(client, 4 * MiB)
        assert client.digest.digest() == hashlib.sha256(data).digest()
        record = await closedRecord(records, client)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert record["spliced"] is False
    assert (record["bytesIn"], record["bytesOut"]) == (4 * MiB, 4 * MiB)
    assert warnings == ["cannot splice, forwarding through Twisted: [Errno 24] Too many open files"]
    await stop(service, listening)


def auto() -> DaemonSettings:
    return DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, splice="auto")


async def pingPong(client: Peer) -> None:
    """One exchange: four bytes there, their echo back."""
    expected = client.count + 4
    client.transport.write(b"ping")  # type: ignore[union-attr]
    await client.waitFor(expected)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_auto_leaves_a_one_exchange_connection_to_twisted(byTwisted: None, records: Any) -> None:
    listening, service, port = await router(Backends(Echo), auto())
    client = await connect(port, Peer())
    await pingPong(client)
    record = await closedRecord(records, client)
    assert record["spliced"] is False
    assert (record["bytesIn"], record["bytesOut"]) == (4, 4)
    assert record["target"] == f"127.0.0.1:{listening.getHost().port}"
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_auto_splices_a_kept_alive_connection_at_its_second_answer(
    byTwisted: None, records: Any,
) -> None:
    listening, service, port = await router(Backends(Echo), auto())
    client = await connect(port, Peer())
    await pingPong(client)
    (connection,) = service.router.connections
    assert connection.inner.pump is None
    transports = (connection.inner.transport, connection.inner.upstream.transport)
    assert [t._shouldShutdown for t in transports] == [False, False]  # close(2) alone
    await pingPong(client)
    await until(lambda: connection.inner.pump is not None, "the pump to start")
    # The pump duplicated their descriptors: a close then shuts the socket down first.
    assert [t._shouldShutdown for t in transports] == [True, True]
    client.transport.write(b"pong" * 1000)
    await client.waitFor(2 * 4 + 4000)
    assert client.text == b"ping" * 2 + b"pong" * 1000
    record = await closedRecord(records, client)
    assert record["spliced"] is True
    assert (record["bytesIn"], record["bytesOut"]) == (4008, 4008)
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_auto_splices_a_bulk_transfer_at_once(served: str, records: Any) -> None:
    listening, service, port = await router(Backends(Echo), auto())
    client = await connect(port, Peer())
    data = await echoThrough(client, 8 * MiB)
    assert client.digest.digest() == hashlib.sha256(data).digest()
    record = await closedRecord(records, client)
    assert record["spliced"] is True
    assert (record["bytesIn"], record["bytesOut"]) == (8 * MiB, 8 * MiB)
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_tls_terminated_by_the_router_is_not_spliced(tmp_path: Any, records: Any) -> None:
    pair = ensureSelfSigned(str(tmp_path))
    backend = Backends(Echo)
    listening, service, port = await router(
        backend, tls="terminate", cert=CertificatePair(pair.cert, pair.key)
    )
    endpoint = wrapClientTLS(
        clientTLS("localhost", verify=False), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    client = await connectProtocol(endpoint, Peer())
    data = payload(1 * MiB, b"tls")
    client.transport.write(data)
    assert await client.waitFor(len(data)) == len(data)
    assert client.digest.digest() == hashlib.sha256(data).digest()
    record = await closedRecord(records, client)
    assert record["spliced"] is False and record["tls"] == "terminate"
    assert record["bytesIn"] == len(data)
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_greeting_goes_through_twisted_then_the_connection_is_spliced(
    served: str, records: Any,
) -> None:
    class Greeter(Echo):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.write(b"220 hello\r\n")  # type: ignore[union-attr]

    listening, service, port = await router(Backends(Greeter))
    client = await connect(port, Peer())
    # The server speaks first: the router must not wait for the client.
    assert await client.waitFor(11) == 11
    data = await echoThrough(client, 2 * MiB)
    assert client.digest.digest() == hashlib.sha256(b"220 hello\r\n" + data).digest()
    record = await closedRecord(records, client)
    assert record["spliced"] is True
    assert (record["bytesIn"], record["bytesOut"]) == (2 * MiB, 2 * MiB + 11)
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_spliced_connection_still_times_out_when_idle(served: str, records: Any) -> None:
    backend = Backends(Echo)
    listening, service, port = await router(backend, options={"idle_timeout": "0.3s"})
    client = await connect(port, Peer())
    client.transport.write(b"ping")
    await client.waitFor(4)
    server = await backend.first
    started = reactor.seconds()
    await defer.gatherResults([client.closed, server.closed])
    # Between one and one and a quarter timeouts after the last byte.
    assert 0.25 <= reactor.seconds() - started < 1.0
    await until(lambda: bool(records), "the access record")
    (record,) = records
    assert record["spliced"] is True
    assert record["ended"] == "idle timeout (0.3s)"
    assert (record["bytesIn"], record["bytesOut"]) == (4, 4)
    await stop(service, listening)


@pytest.mark.parametrize("splice", [
    pytest.param("yes", marks=needsSplice), "no",
])
@pytest_twisted.ensureDeferred
async def test_a_half_closed_client_whose_target_never_answers_is_cut_at_the_fin_timeout(
    served: str, records: Any, splice: str
) -> None:
    backend = Backends(Peer)  # reads, never answers, never closes
    daemon = DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, splice=splice)  # type: ignore[arg-type]
    listening, service, port = await router(
        backend, daemon=daemon, options={"idle_timeout": "5s", "fin_timeout": "0.3s"}
    )
    client = await connect(port, Peer())
    client.transport.write(b"request")  # type: ignore[union-attr]
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    server = await backend.first
    assert await server.eof == len(b"request")
    started = reactor.seconds()
    await client.closed
    # Between one and one and a quarter fin timeouts after the client's FIN.
    assert 0.25 <= reactor.seconds() - started < 1.0
    # The target's connection is closed too (it has had the router's FIN
    # already, so it hears nothing more of it until it sends).
    await until(lambda: inFlight(service) == [0], "the target's connection to close")
    await until(lambda: bool(records), "the access record")
    (record,) = records
    assert record["spliced"] is (splice == "yes")
    assert record["ended"] == "fin timeout (0.3s after client FIN)"
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_spliced_connection_that_keeps_moving_is_not_idle(served: str, records: Any) -> None:
    backend = Backends(Echo)
    listening, service, port = await router(backend, options={"idle_timeout": "0.4s"})
    client = await connect(port, Peer())
    for count in range(1, 9):
        client.transport.write(b"x")
        await client.waitFor(count)
        await task.deferLater(reactor, 0.1, lambda: None)
    assert not client.closed.called
    assert records == []
    client.transport.loseConnection()
    await client.closed
    await until(lambda: bool(records), "the access record")
    assert records[0]["spliced"] is True and records[0]["bytesIn"] == 8
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_stops_the_spliced_upstream(served: str, records: Any) -> None:
    backend = Backends(lambda: Flood(limit=1024 * MiB))
    listening, service, port = await router(backend)
    client = await connect(port, Peer())
    client.transport.write(b"go")
    await client.waitFor(1)
    client.transport.pauseProducing()
    flood = await backend.first
    (connection,) = service.router.connections
    pump = pumpOf(connection)
    await until(lambda: flood.paused and not pump.ends[1].reading and pump.ends[0].writing,
                "the pump to stop reading the upstream")
    await task.deferLater(reactor, 0.3, lambda: None)
    # Socket buffers and one pipe are in flight, not the gigabyte.
    assert flood.paused and not pump.ends[1].reading
    assert flood.written < 64 * MiB
    client.transport.abortConnection()
    await flood.closed
    await until(lambda: bool(records), "the access record")
    assert records[0]["spliced"] is True
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_an_upstream_reset_closes_the_spliced_client(served: str, records: Any) -> None:
    backend = Backends(Echo)
    listening, service, port = await router(backend)
    client = await connect(port, Peer())
    client.transport.write(b"hello")
    await client.waitFor(5)
    server = await backend.first
    server.transport.abortConnection()
    # The router closes the client's connection (in order: it did nothing wrong).
    await client.eof
    client.transport.loseConnection()
    await client.closed
    await until(lambda: bool(records), "the access record")
    (record,) = records
    assert record["spliced"] is True
    assert record["ended"] == "upstream reset"
    assert (record["bytesIn"], record["bytesOut"]) == (5, 5)
    await until(lambda: inFlight(service) == [0], "the pool's count to drop")
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_stopping_the_router_closes_spliced_connections(served: str, records: Any) -> None:
    backend = Backends(Echo)
    listening, service, port = await router(backend)
    client = await connect(port, Peer())
    client.transport.write(b"hello")
    await client.waitFor(5)
    server = await backend.first
    await service.stopService()
    await defer.gatherResults([client.closed, server.closed])
    await until(lambda: bool(records), "the access record")
    assert records[0]["spliced"] is True and records[0]["bytesIn"] == 5
    await listening.stopListening()


class AnswerThenReset(Peer):
    """A backend that answers C{size} bytes at the first bytes, then resets."""

    size = 8 * MiB

    def dataReceived(self, data: bytes) -> None:
        first = not self.count
        super().dataReceived(data)
        if first:
            self.transport.write(payload(self.size, b"answer"))  # type: ignore[union-attr]


async def answeredThenReset(
    records: Any, idleTimeout: str, splice: str = "yes"
) -> tuple[Any, Any, Any]:
    """A client that uploads without reading; its backend answers, then resets."""
    backend = Backends(AnswerThenReset)
    daemon = DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, splice=splice)  # type: ignore[arg-type]
    listening, service, port = await router(
        backend, daemon=daemon, options={"idle_timeout": idleTimeout}
    )
    client = await connect(port, Flood(limit=1024 * MiB))
    client.transport.pauseProducing()
    server = await backend.first
    (connection,) = service.router.connections
    if splice == "yes":
        await until(lambda: pumpOf(connection) is not None
                    and pumpOf(connection).directions[1].buffered > 0,
                    "the pipe towards the client to fill")
    else:
        await until(lambda: connection.inner.transport.producerPaused,
                    "the router to pause the backend")
    server.transport.abortConnection()
    await server.closed
    return listening, service, client


@pytest.mark.parametrize("splice", [
    pytest.param("yes", marks=needsSplice), "no",
])
@pytest_twisted.ensureDeferred
async def test_an_answer_before_an_upstream_reset_reaches_a_slow_client(
    served: str, records: Any, splice: str
) -> None:
    """
    Everything the router read from the backend before its reset reaches the
    client, then its end of file; the router reads (and drops) what the
    client still uploads until it closes, rather than resetting it, which
    could lose the answer's tail. (Twisted's pump cannot tell a reset.)
    """
    listening, service, client = await answeredThenReset(records, "10s", splice)
    await task.deferLater(reactor, 0.2, lambda: None)
    client.transport.resumeProducing()
    await until(lambda: client.eof.called, "the client's end of file")
    client.transport.unregisterProducer()
    client.transport.loseConnection()
    await client.closed
    await until(lambda: bool(records), "the access record")
    (record,) = records
    assert record["spliced"] is (splice == "yes")
    assert record["ended"] == ("upstream reset" if splice == "yes" else "upstream closed")
    assert 0 < client.count == record["bytesOut"]
    assert client.digest.digest() == hashlib.sha256(payload(8 * MiB, b"answer")[:client.count]).digest()
    await stop(service, listening)


@pytest.mark.parametrize("splice", [
    pytest.param("yes", marks=needsSplice), "no",
])
@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_the_delivery_is_cut_at_the_idle_timeout(
    served: str, records: Any, splice: str
) -> None:
    listening, service, client = await answeredThenReset(records, "0.4s", splice)
    await until(lambda: bool(records), "the access record", timeout=3.0)
    assert records[0]["ended"] == "idle timeout (0.4s)"
    # The router has reset the connection; the client learns it when it reads
    # again. Not before: once its flood has gone out (the router reads and
    # drops it at loopback speed), its socket is neither read nor written,
    # so epoll does not watch it and nothing would report the reset.
    client.transport.resumeProducing()
    await client.closed
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_client_reset_is_named_in_the_record(served: str, records: Any) -> None:
    backend = Backends(Echo)
    listening, service, port = await router(backend)
    client = await connect(port, Peer())
    client.transport.write(b"hello")
    await client.waitFor(5)
    server = await backend.first
    client.transport.abortConnection()
    await server.closed
    await until(lambda: bool(records), "the access record")
    assert records[0]["spliced"] is True and records[0]["ended"] == "client reset"
    await stop(service, listening)


@pytest_twisted.ensureDeferred
async def test_an_answer_before_an_upstream_reset_reaches_a_tls_client(
    tmp_path: Any, records: Any
) -> None:
    """
    tls = terminate, the client still uploading: the answer the backend
    sent before its reset arrives whole, then close_notify (the TLS stream
    was cut short: Twisted closed TCP when the backend's connection went).
    """
    import socket
    import ssl
    import time

    pair = ensureSelfSigned(str(tmp_path))
    backend = Backends(AnswerThenReset)
    listening, service, port = await router(
        backend, tls="terminate", cert=CertificatePair(pair.cert, pair.key)
    )

    def client() -> int:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            tls = context.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)
            tls.setblocking(False)
            start = time.monotonic()
            while time.monotonic() - start < 2.0:  # uploading, not reading
                try:
                    tls.send(b"u" * 65536)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    time.sleep(0.01)
            tls.setblocking(True)
            received = 0
            while chunk := tls.recv(65536):
                received += len(chunk)
            return received

    received = threads.deferToThread(client)
    server = await backend.first
    await server.waitFor(1)
    (connection,) = service.router.connections
    tcp = connection.inner.transport  # beneath the TLS the router terminates
    await until(lambda: tcp.producerPaused, "the router to pause the backend")
    server.transport.abortConnection()
    count = await received
    await until(lambda: bool(records), "the access record")
    assert records[0]["spliced"] is False and records[0]["ended"] == "upstream closed"
    assert 0 < count == records[0]["bytesOut"]
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_no_pipe_for_the_pump_is_named_in_the_record(
    served: str, records: Any, monkeypatch: Any
) -> None:
    def exhausted() -> Any:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(splice.PIPES, "take", exhausted)
    listening, service, port = await router(Backends(Echo))
    client = await connect(port, Peer())
    client.transport.write(b"hello")
    await until(lambda: bool(records), "the access record")
    assert records[0]["ended"] == "no pipe for splice(2): Too many open files"
    client.transport.abortConnection()
    await client.closed
    await stop(service, listening)


ANSWER = 200 * 1024


class Answers(Peer):
    """A backend that answers the first bytes it gets with L{ANSWER} bytes."""

    def dataReceived(self, data: bytes) -> None:
        first = not self.count
        super().dataReceived(data)
        if first:
            self.transport.write(payload(ANSWER, b"answer"))  # type: ignore[union-attr]


class AnswersAndEnds(Answers):
    """The same, then its end of file (and it goes on reading)."""

    def dataReceived(self, data: bytes) -> None:
        first = not self.count
        super().dataReceived(data)
        if first:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]


def unacknowledged(transport: Any) -> int:
    """What a Twisted TCP transport holds, and its socket's peer has not acknowledged."""
    queued = struct.unpack(
        "i", fcntl.ioctl(transport.getHandle().fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    )[0]
    return queued + len(transport.dataBuffer) + transport._tempDataLen


def targetGone(connection: Any) -> bool:
    """Has the router seen its target's reset?"""
    pump = pumpOf(connection)
    if pump is not None:
        return pump.failed is not None or pump.stopped
    return connection.inner.upstream is None


@pytest.mark.parametrize("backend", [Answers, AnswersAndEnds])
@pytest.mark.parametrize("how", ["yes", "no"])
@pytest_twisted.ensureDeferred
async def test_a_target_reset_after_its_answer_leaves_the_answer_to_an_uploading_client(
    served: str, records: Any, backend: Any, how: str
) -> None:
    """
    The target answers and resets (a 413 closed over an unread upload, say)
    while the client, still uploading, has not read the answer: the client
    gets all of it, then the end of file, its upload drained rather than
    reset (a reset would throw away what it has not read yet).
    """
    daemon = DaemonSettings(drain_timeout=0.0, hello_timeout=2.0, splice=how)
    backends = Backends(backend)
    listening, service, port = await router(backends, daemon, options={"idle_timeout": "10s"})
    client = await connect(port, Flood(limit=1024 * MiB))
    client.transport.pauseProducing()  # it reads nothing, and uploads
    server = await backends.first
    await until(lambda: server.count and not unacknowledged(server.transport),
                "the router to take the whole answer")
    server.transport.abortConnection()
    await server.closed
    (connection,) = service.router.connections
    await until(lambda: targetGone(connection), "the router to see the reset")
    client.transport.resumeProducing()
    await until(lambda: client.eof.called or client.closed.called, "the client's end")
    assert client.count == ANSWER
    assert client.eof.called and not client.closed.called, "the client was reset"
    client.transport.unregisterProducer()
    client.transport.loseConnection()
    await until(lambda: bool(records), "the access record")
    # Every byte the client sent was read: passed on, or drained.
    assert (records[0]["bytesIn"], records[0]["bytesOut"]) == (client.written, ANSWER)
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_target_lost_while_the_hand_over_waits_for_twisteds_buffers(
    byTwisted: None, records: Any, monkeypatch: Any
) -> None:
    """No pump starts for a target gone meanwhile: Twisted's path ends the connection."""
    listening, service, port = await router(Backends(Echo), auto())
    client = await connect(port, Peer())
    await pingPong(client)
    (connection,) = service.router.connections
    forwarding = connection.inner
    # Both transports still hold bytes at the hand-over (slow peers both ways).
    held = [True]
    real = forward.unsent
    monkeypatch.setattr(forward, "unsent", lambda t: 1 if held[0] else real(t))
    assert forwarding.startSplice() and len(forwarding.flushing) == 2
    waiter = forwarding.flushing[0]
    # The target resets meanwhile; the reactor tells its transport.
    forwarding.upstream.transport.connectionLost(Failure(ConnectionLost()))
    assert forwarding.flushing == ()
    # The client's buffer drains: Twisted would ask its waiter for more.
    held[0] = False
    waiter.resumeProducing()
    assert forwarding.pump is None
    await client.eof
    client.transport.loseConnection()
    await until(lambda: bool(records), "the access record")
    assert records[0]["ended"] == "upstream closed" and not records[0]["spliced"]
    await stop(service, listening)


@needsSplice
@pytest_twisted.ensureDeferred
async def test_a_target_half_closed_while_the_hand_over_waits_leaves_twisted_pumping(
    byTwisted: None, records: Any, monkeypatch: Any
) -> None:
    backends = Backends(Echo)
    listening, service, port = await router(backends, auto())
    client = await connect(port, Peer())
    await pingPong(client)
    server = await backends.first
    (connection,) = service.router.connections
    forwarding = connection.inner
    monkeypatch.setattr(forward, "unsent", lambda t: 1)
    assert forwarding.startSplice() and len(forwarding.flushing) == 2
    # As if the target's end of file had come meanwhile.
    forwarding.upstreamHalfClosed()
    monkeypatch.undo()
    assert forwarding.flushing == () and forwarding.pumping and forwarding.pump is None
    await client.eof
    # The other way still goes, through Twisted.
    client.transport.write(b"more")
    await server.waitFor(8)
    client.transport.loseConnection()
    await until(lambda: bool(records), "the access record")
    assert not records[0]["spliced"]
    await stop(service, listening)
