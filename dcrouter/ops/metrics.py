"""
Prometheus metrics, gathered without touching the byte path.

Two sources: the access records the router already writes (counted as they
are written: connections by route and how they ended, bytes, spliced
connections, HTTP requests by status, TLS handshake failures), and the live
state read at scrape time (open connections, refusals by reason, targets'
health). Nothing is counted twice and the hot paths pay nothing more than
the access record they already emit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.logger import ILogObserver
from zope.interface import implementer

from dcrouter.ops.accesslog import accessLog

_ACCESS = "dcrouter.access"


def endingKind(ended: str) -> str:
    """A small, fixed set of labels for how a connection ended."""
    if ended.startswith("refused"):
        return "refused"
    if ended.startswith("TLS handshake failed"):
        return "tls_failed"
    if ended.startswith("upstream failed"):
        return "upstream_failed"
    if "timeout" in ended or "idle" in ended:
        return "timeout"
    if ended.startswith("aborted"):
        return "aborted"
    return "closed"


#: How many distinct C{ended} texts L{AccessCounter} remembers the kind of.
_MAX_ENDINGS = 1024


@implementer(ILogObserver)
class AccessCounter:
    """
    Counts the access records as they are written.

    It sees every access record, so it does as little as it can per record:
    the records of L{dcrouter.ops.accesslog} come straight from them (a
    router adds it to L{accesslog.counters}), their fields as arguments,
    not through the log publisher; as a log observer it counts the access
    events logged some other way. The figures of one (port, route, ending)
    or (route, status) are kept together; the labels, the sums per route
    are made at scrape time. How a connection ended is classified once per
    distinct text.
    """

    def __init__(self) -> None:
        #: By (port as written, route, ending kind): connections, bytes in, bytes out, spliced.
        self.connectionsAt: dict[tuple[object, str, str], list[int]] = {}
        #: By (route, status as written): HTTP requests, response bytes.
        self.requestsAt: dict[tuple[str, object], list[int]] = {}
        #: L{endingKind} of the C{ended} texts seen.
        self.endings: dict[str, str] = {}

    def countConnection(
        self, port: object, route: str, ended: str, bytesIn: int, bytesOut: int, spliced: bool
    ) -> None:
        """One connection closed (its record's fields)."""
        kind = self.endings.get(ended)
        if kind is None:
            kind = endingKind(ended)
            if len(self.endings) < _MAX_ENDINGS:
                self.endings[ended] = kind
        key = (port, route, kind)
        counts = self.connectionsAt.get(key)
        if counts is None:
            counts = self.connectionsAt[key] = [0, 0, 0, 0]
        counts[0] += 1
        counts[1] += bytesIn
        counts[2] += bytesOut
        if spliced:
            counts[3] += 1

    def countRequest(self, route: str, status: object, bytesOut: int) -> None:
        """One HTTP request answered (its record's fields)."""
        key = (route, status)
        counts = self.requestsAt.get(key)
        if counts is None:
            counts = self.requestsAt[key] = [0, 0]
        counts[0] += 1
        counts[1] += bytesOut

    def __call__(self, event: dict[str, Any]) -> None:
        """An access event logged some other way: its fields as they come, or their defaults."""
        if event.get("log_namespace") != _ACCESS or event.get("log_logger") is accessLog:
            return
        route = str(event.get("route", "-"))
        if event.get("kind") == "request":
            self.countRequest(route, str(event.get("status", 0)), int(event.get("bytesOut", 0)))
            return
        self.countConnection(
            str(event.get("port", "")), route, str(event.get("ended", "")),
            int(event.get("bytesIn", 0)), int(event.get("bytesOut", 0)),
            bool(event.get("spliced")),
        )  # fmt: skip

    def connections(self) -> Counter[tuple[str, str, str]]:
        """Connections closed by their labels: (port, route, ending kind)."""
        counts: Counter[tuple[str, str, str]] = Counter()
        for (port, route, kind), figures in self.connectionsAt.items():
            counts[(str(port), route, kind)] += figures[0]
        return counts

    def requests(self) -> Counter[tuple[str, str]]:
        """HTTP requests by their labels: (route, status)."""
        counts: Counter[tuple[str, str]] = Counter()
        for (route, status), figures in self.requestsAt.items():
            counts[(route, str(status))] += figures[0]
        return counts

    def bytesIn(self) -> Counter[str]:
        """Bytes from clients, by route."""
        return _sumByRoute(self.connectionsAt, 1)

    def bytesOut(self) -> Counter[str]:
        """Bytes to clients, by route."""
        return _sumByRoute(self.connectionsAt, 2)

    def spliced(self) -> Counter[str]:
        """Spliced connections, by route (the routes with some)."""
        return +_sumByRoute(self.connectionsAt, 3)

    def requestBytes(self) -> Counter[str]:
        """HTTP response body bytes, by route."""
        counts: Counter[str] = Counter()
        for (route, _), figures in self.requestsAt.items():
            counts[route] += figures[1]
        return counts


def _sumByRoute(connectionsAt: dict[tuple[object, str, str], list[int]], n: int) -> Counter[str]:
    """Figure C{n} of L{AccessCounter.connectionsAt}, summed by route."""
    counts: Counter[str] = Counter()
    for (_, route, _), figures in connectionsAt.items():
        counts[route] += figures[n]
    return counts


class RouterCollector(Collector):
    """
    Metrics of a running L{dcrouter.service.DcRouter}, read at scrape time.

    @param live: returns the router (L{dcrouter.proxy.listener.Router}) and
        the compiled configuration in force, or C{(None, None)} before start.
    """

    def __init__(self, counter: AccessCounter, live: Callable[[], tuple[Any, Any]]) -> None:
        self.counter = counter
        self.live = live

    def collect(self) -> Iterator[Metric]:
        counter = self.counter
        router, compiled = self.live()
        active = GaugeMetricFamily(
            "dcrouter_connections_active",
            "Client connections open now, by listener port and route (- before routing).",
            labels=["port", "route"],
        )
        accepted = CounterMetricFamily(
            "dcrouter_connections_accepted", "Client connections accepted, by listener port.",
            labels=["port"],
        )
        refused = CounterMetricFamily(
            "dcrouter_connections_refused",
            "Connections refused, by listener port, route (- before routing) and reason.",
            labels=["port", "route", "reason"],
        )
        handshakes = CounterMetricFamily(
            "dcrouter_tls_handshakes", "TLS handshakes of terminating routes, by outcome.",
            labels=["outcome"],
        )
        if router is not None:
            handshakes.add_metric(["completed"], router.handshakes)
            handshakes.add_metric(["failed"], router.handshakeFailures)
            opened = Counter((str(c.table.port), c.routeName()) for c in router.connections)
            for (port, route), count in sorted(opened.items()):
                active.add_metric([port, route], count)
            for port, count in sorted(router.acceptedAt.items()):
                accepted.add_metric([str(port)], count)
            for (port, route, reason), count in sorted(router.refusedAt.items()):
                refused.add_metric([str(port), route, reason], count)
        yield from (active, accepted, refused, handshakes)
        closed = CounterMetricFamily(
            "dcrouter_connections_closed",
            "Connections closed, by listener port, route and how they ended.",
            labels=["port", "route", "ended"],
        )
        for (port, route, ended), count in sorted(counter.connections().items()):
            closed.add_metric([port, route, ended], count)
        yield closed
        yield _perRoute("dcrouter_bytes_received", "Bytes from clients.", counter.bytesIn())
        yield _perRoute("dcrouter_bytes_sent", "Bytes to clients.", counter.bytesOut())
        yield _perRoute(
            "dcrouter_connections_spliced",
            "Connections whose bytes moved by splice(2), zero-copy, by route.",
            counter.spliced(),
        )
        requests = CounterMetricFamily(
            "dcrouter_http_requests", "HTTP requests, by route and status.",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(counter.requests().items()):
            requests.add_metric([route, status], count)
        yield requests
        yield _perRoute(
            "dcrouter_http_response_bytes", "HTTP response body bytes.", counter.requestBytes()
        )
        yield from _health(pools(compiled))


def _perRoute(name: str, help: str, values: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help, labels=["route"])
    for route, value in sorted(values.items()):
        family.add_metric([route], value)
    return family


def pools(compiled: Optional[Any]) -> list[Any]:
    """Every target pool of a compiled configuration."""
    found = []
    for resource in compiled.resources if compiled is not None else ():
        targets = getattr(resource, "targets", None)
        if targets is not None:
            found.extend(targets.pools())
    return found


def _health(allPools: Iterable[Any]) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "dcrouter_target_up", "1 if the target is in rotation.", labels=["pool", "target"]
    )
    inFlight = GaugeMetricFamily(
        "dcrouter_target_active", "Connections or requests in flight to the target.",
        labels=["pool", "target"],
    )
    transitions = CounterMetricFamily(
        "dcrouter_target_transitions", "Health state changes of the target.",
        labels=["pool", "target"],
    )
    for pool in allPools:
        for state in pool.snapshot():
            labels = [state["pool"], state["address"]]
            up.add_metric(labels, 1 if state["up"] else 0)
            inFlight.add_metric(labels, state["active"])
            transitions.add_metric(labels, state["transitions"])
    yield from (up, inFlight, transitions)


class ServicesCollector(Collector):
    """
    The mail service, the DNS server and the certificates, read at scrape time.

    @param live: returns C{(mail service or None, DNS server factory or
        None, certificate statuses, now)}: a
        L{dcrouter.mail.service.MailService} and a
        L{dcrouter.dns.server.DNSServerFactory}.
    """

    def __init__(self, live: Callable[[], tuple[Any, Any, list[dict[str, Any]], float]]) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        mail, dns, certificates, now = self.live()
        if mail is not None:
            yield from _smtp(mail.factories)
            queue = mail.queue
            depth = GaugeMetricFamily("dcrouter_mail_queue_messages", "Messages in the queue.")
            depth.add_metric([], len(queue.messages))
            yield depth
            events = CounterMetricFamily(
                "dcrouter_mail_events",
                "Mail queue events: accepted (bounces too), delivered, deferred and failed"
                " (per recipient), bounces, dropped, attempts, batches, batchedOps.",
                labels=["event"],
            )
            for event, count in sorted(queue.stats.items()):
                events.add_metric([event], count)
            yield events
        if dns is not None:
            events = CounterMetricFamily(
                "dcrouter_dns_events", "DNS server events (refused, malformed, ...).",
                labels=["event"],
            )
            for event, count in sorted(dns.counters.items()):
                events.add_metric([event], count)
            yield events
            responses = CounterMetricFamily(
                "dcrouter_dns_responses", "DNS responses sent, by protocol and response code.",
                labels=["protocol", "rcode"],
            )
            for (protocol, rcode), count in sorted(dns.responses.items()):
                responses.add_metric([protocol, rcode], count)
            yield responses
        expiry = GaugeMetricFamily(
            "dcrouter_certificate_expiry_seconds", "Seconds until the certificate expires.",
            labels=["route"],
        )
        failures = GaugeMetricFamily(
            "dcrouter_certificate_failures", "Failed issuance attempts in a row.",
            labels=["route"],
        )
        for status in certificates:
            route = str(status.get("route"))
            notAfter = status.get("notAfter")
            if notAfter:
                from datetime import datetime

                expiry.add_metric([route], datetime.fromisoformat(notAfter).timestamp() - now)
            failures.add_metric([route], int(status.get("failures") or 0))
        yield from (expiry, failures)


def _smtp(factories: dict[int, Any]) -> Iterator[Metric]:
    """The SMTP server's sessions and messages, per public port (and its mode)."""
    labels = ["port", "mode"]
    active = GaugeMetricFamily("dcrouter_smtp_sessions_active", "SMTP sessions open now.",
                               labels=labels)
    sessions = CounterMetricFamily("dcrouter_smtp_sessions", "SMTP sessions admitted.",
                                   labels=labels)
    refused = CounterMetricFamily(
        "dcrouter_smtp_sessions_refused", "SMTP sessions refused by the connection caps (421).",
        labels=labels,
    )
    messages = CounterMetricFamily(
        "dcrouter_smtp_messages",
        "Messages sent to the SMTP server, by its answer: accepted (250, queued), deferred"
        " (4xx), rejected (5xx).",
        labels=[*labels, "result"],
    )
    for port, factory in sorted(factories.items()):
        where = [str(port), factory.settings.mode]
        active.add_metric(where, factory.active)
        sessions.add_metric(where, factory.sessions)
        refused.add_metric(where, factory.refusedSessions)
        for result in ("accepted", "deferred", "rejected"):
            messages.add_metric([*where, result], factory.messages[result])
    yield from (active, sessions, refused, messages)


def registryFor(*collectors: Collector) -> CollectorRegistry:
    """A registry of dcrouter's own (not the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry
