"""
DNS NOTIFY (RFC 1996): telling the secondaries that a zone changed.

When a zone's serial changes (a reload that changes the zone, a record
published or withdrawn through the record API) and when the server starts,
each secondary of the zone (its own C{notify}, else C{[dns] notify}) is
sent a NOTIFY over UDP: opcode NOTIFY, AA set, the zone's apex SOA as the
question and its SOA record in the answer section (RFC 1996, section
3.7). A secondary then transfers the zone at once instead of at its next
SOA refresh, so that an ACME CA that asks it for a dns-01 record finds
the record.

A NOTIFY is sent again, after 2, 4, 8 and 16 seconds, until the secondary
answers it: a response with the same ID and opcode from the address it was
sent to (anything else is ignored, as a forged answer would be). After
L{TRIES} sends it gives up: the secondary will see the change at its SOA
refresh. There is at most one NOTIFY per zone and secondary: a newer serial
replaces the pending one.

It is sent from the listen address of the secondary's family (see
L{dcrouter.config.dns.notifySource}), a port the kernel picks: the address
a secondary accepts NOTIFY from (NSD's and BIND's C{allow-notify}) is the
primary's.

L{Notifier.whenServed} waits until every secondary serves a serial (asked
for the zone's SOA every L{CHECK_INTERVAL} from the same socket, answers
matched the same way), or L{PROPAGATION_TIMEOUT}: the ACME dns-01 path
tells the CA to validate only then, as lego's and certbot's propagation
checks do. A secondary that does not carry the zone is not waited for:
one that answers the SOA query REFUSED or NOTAUTH, or answered the
NOTIFY of the zone with an error. SERVFAIL is waited through: it is what
BIND and NSD answer for a zone they have not transferred yet.

Answers must also echo the question sent (the zone's apex, SOA, IN;
RFC 5452, section 9.1), and the SOA taken from an answer is the apex's.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import ip_address
from typing import Any, Optional

from attrs import define
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure

from dcrouter.config.dns import notifySource
from dcrouter.config.model import HostPort
from dcrouter.dns.server import NOTAUTH, rcodeName
from dcrouter.dns.wire import checkMessage

log = Logger()

#: Sends of one NOTIFY before giving up (BIND's, NSD's default).
TRIES = 5
#: Seconds to wait for an answer after the first send; doubled after each.
FIRST_WAIT = 2.0
MAX_WAIT = 16.0
#: Seconds between SOA queries to a secondary that does not serve a serial yet.
CHECK_INTERVAL = 1.0
#: The longest L{Notifier.whenServed} waits for the secondaries (lego's default).
PROPAGATION_TIMEOUT = 60.0
#: SOA answers of a secondary that does not carry the zone: not waited for.
NOT_SERVED = frozenset({dns.EREFUSED, NOTAUTH})


class NotifierStopped(CancelledError):
    """
    The notifier stopped (the DNS server is stopping) while L{Notifier.whenServed}
    waited: whatever waited should give up, not go on as if the change were served.
    """


def notifyMessage(messageID: int, soa: dns.RRHeader) -> bytes:
    """A NOTIFY of the zone whose apex SOA record is C{soa}."""
    message = dns.Message(id=messageID, opCode=dns.OP_NOTIFY, auth=True)
    message.queries = [dns.Query(soa.name.name, dns.SOA, dns.IN)]
    message.answers = [soa]
    data: bytes = message.toStr()
    return data


def soaQuery(messageID: int, origin: bytes) -> bytes:
    """A query for the SOA record of the zone C{origin}."""
    message = dns.Message(id=messageID)
    message.queries = [dns.Query(origin, dns.SOA, dns.IN)]
    data: bytes = message.toStr()
    return data


def serialAtLeast(theirs: int, ours: int) -> bool:
    """Is serial C{theirs} not older than C{ours} (RFC 1982 arithmetic)?"""
    return theirs == ours or 0 < (theirs - ours) % 2**32 < 2**31


def _randomID() -> int:
    return secrets.randbelow(1 << 16)


def _question(origin: bytes) -> list[dns.Query]:
    """The question section of a NOTIFY or SOA query of the zone C{origin}, as sent."""
    return [dns.Query(origin, dns.SOA, dns.IN)]


def _sameAddress(target: HostPort, address: Any) -> bool:
    """Is the datagram source C{address} (host, port) C{target}, however spelled?"""
    try:
        source = ip_address(str(address[0]).partition("%")[0])
        return int(address[1]) == target.port and source == ip_address(target.host)
    except (ValueError, TypeError, IndexError):
        return False


@define
class _Pending:
    """A NOTIFY not answered yet."""

    zone: str
    origin: bytes
    serial: int
    messageID: int
    data: bytes
    tries: int = 0
    retry: Optional[IDelayedCall] = None


@define(eq=False)
class _Check:
    """SOA queries to a secondary until it serves C{serial} of C{zone}."""

    zone: str
    origin: bytes
    target: HostPort
    serial: int
    messageID: int
    data: bytes
    served: Deferred[None]
    poll: Optional[IDelayedCall] = None


class _NotifyProtocol(DatagramProtocol):
    """The socket NOTIFYs are sent from: what comes back goes to the notifier."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.notifier.responseReceived(data, addr)


class Notifier:
    """
    Sends NOTIFYs to the secondaries and retries until they answer.

    @ivar targets: the secondaries of zones without their own (C{[dns] notify}).
    @ivar zoneTargets: the secondaries of zones with their own, by zone.
    @ivar listen: the server's listen addresses, which NOTIFYs are sent from.
    @ivar pending: the NOTIFYs not answered yet, by (zone, secondary).
    @ivar checks: the secondaries L{whenServed} is waiting for.
    @ivar ports: the sockets NOTIFYs are sent from, by source address,
        opened when first needed.
    @ivar count: told of each event worth a metric: C{notify_sent} (each
        send), C{notify_answered}, C{notify_rejected} (an error answer),
        C{notify_given_up}.
    """

    def __init__(
        self, reactor: Any, count: Callable[[str], None], newID: Callable[[], int] = _randomID
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.newID = newID
        self.running = False
        self.targets: tuple[HostPort, ...] = ()
        self.zoneTargets: dict[str, tuple[HostPort, ...]] = {}
        self.listen: tuple[HostPort, ...] = ()
        self.pending: dict[tuple[str, HostPort], _Pending] = {}
        self.checks: list[_Check] = []
        self.ports: dict[str, IListeningPort] = {}

    def configure(
        self,
        targets: Sequence[HostPort],
        listen: Sequence[HostPort],
        zoneTargets: Optional[Mapping[str, Sequence[HostPort]]] = None,
    ) -> None:
        """
        Notify C{targets} (the zones in C{zoneTargets}: theirs instead) from
        C{listen} from now on: pending NOTIFYs to secondaries no longer
        listed for their zone are dropped, unused sockets closed.
        """
        self.targets, self.listen = tuple(targets), tuple(listen)
        self.zoneTargets = {zone: tuple(of) for zone, of in (zoneTargets or {}).items()}
        for key in [key for key in self.pending if key[1] not in self.targetsOf(key[0])]:
            self._drop(key)
        for check in [check for check in self.checks
                      if check.target not in self.targetsOf(check.zone)]:
            self._endCheck(check)
        self._closePorts(set(self.ports) - self._sources())

    def targetsOf(self, zone: str) -> tuple[HostPort, ...]:
        """The secondaries of C{zone}."""
        return self.zoneTargets.get(zone, self.targets)

    def start(self) -> None:
        """Send NOTIFYs from now on (not before the server serves)."""
        self.running = True

    def stop(self) -> Deferred[Any]:
        """
        Drop every pending NOTIFY, fail the waits of L{whenServed} with
        L{NotifierStopped}, close the sockets.
        """
        self.running = False
        for key in list(self.pending):
            self._drop(key)
        for check in list(self.checks):
            self._endCheck(check, Failure(NotifierStopped("the DNS server is stopping")))
        return self._closePorts(set(self.ports))

    def notify(
        self, zone: str, soa: dns.RRHeader, targets: Optional[Iterable[HostPort]] = None
    ) -> None:
        """
        Tell C{targets} (by default the zone's secondaries) that C{zone} now
        has the SOA record C{soa}. One being told of the same serial already
        is left to it; one being told of an older serial is told this instead.
        """
        if not self.running:
            return
        serial = soa.payload.serial  # type: ignore[union-attr]
        for target in self.targetsOf(zone) if targets is None else targets:
            key = (zone, target)
            current = self.pending.get(key)
            if current is not None:
                if current.serial == serial:
                    continue
                log.debug("DNS NOTIFY of {zone} serial {old} to {target} replaced by serial "
                          "{serial}", zone=zone, old=current.serial, target=str(target),
                          serial=serial)
                self._drop(key)
            messageID = self._freshID(target)
            self.pending[key] = _Pending(zone, soa.name.name, serial, messageID,
                                         notifyMessage(messageID, soa))
            self._send(key)

    def forget(self, zones: Iterable[str]) -> None:
        """Drop the pending NOTIFYs of zones not in C{zones} (a reload dropped them)."""
        kept = set(zones)
        for key in [key for key in self.pending if key[0] not in kept]:
            self._drop(key)

    def whenServed(
        self, zone: str, origin: bytes, serial: int, timeout: float = PROPAGATION_TIMEOUT
    ) -> Deferred[None]:
        """
        A Deferred that fires once every secondary of C{zone} answers that
        its SOA serial (at the apex C{origin}) is C{serial} or newer, or
        that it does not carry the zone (see L{_soaAnswered} and
        L{responseReceived}), or is no longer notified (a reload), or
        after C{timeout} seconds (logged). It fails with L{NotifierStopped}
        if the notifier stops first.
        """
        checks = []
        for target in self.targetsOf(zone):
            messageID = self._freshID(target)
            check = _Check(zone, origin, target, serial, messageID, soaQuery(messageID, origin),
                           Deferred())
            checks.append(check)
            self.checks.append(check)
        if checks:
            log.info("DNS: waiting for {targets} to serve {zone} serial {serial}",
                     targets=", ".join(str(check.target) for check in checks), zone=zone,
                     serial=serial)
        for check in checks:
            self._poll(check)
        late = self.reactor.callLater(timeout, self._late, checks, timeout)

        def ended(result: object) -> Optional[Failure]:
            if late.active():
                late.cancel()
            if isinstance(result, Failure):
                first = result.value
                return first.subFailure if isinstance(first, FirstError) else result
            return None

        waits = gatherResults([check.served for check in checks], consumeErrors=True)
        return waits.addBoth(ended)

    def responseReceived(self, data: bytes, address: Any) -> None:
        """
        A datagram on a NOTIFY socket: the answer to a pending NOTIFY or
        SOA query if it is a response with its ID and opcode from its
        secondary; else ignored. Checked by L{checkMessage} first, as the
        server checks queries: twisted.names decodes leniently.
        """
        problem = checkMessage(data)
        message = dns.Message()
        try:
            if problem is not None:
                raise ValueError(problem)
            message.fromStr(data)
        except Exception as e:
            log.debug("DNS NOTIFY: undecodable datagram from {address}: {problem}",
                      address=address, problem=e)
            return
        if message.answer and message.opCode == dns.OP_QUERY:
            self._soaAnswered(message, address)
            return
        key = self._answered(message, address)
        if key is None:
            log.debug("DNS NOTIFY: ignored a message from {address} (id {id}): not the answer "
                      "to a NOTIFY sent there", address=address, id=message.id)
            return
        pending = self.pending[key]
        self._drop(key)
        fields = dict(zone=key[0], serial=pending.serial, target=str(key[1]),
                      rcode=rcodeName(message.rCode), tries=pending.tries)
        self.count("notify_answered" if message.rCode == dns.OK else "notify_rejected")
        if message.rCode == dns.OK:
            log.info("DNS NOTIFY of {zone} serial {serial} answered by {target}", **fields)
            return
        log.warn("DNS NOTIFY of {zone} serial {serial} answered {rcode} by {target}: it "
                 "does not take NOTIFY of {zone} from here (not retried)", **fields)
        for check in [check for check in self.checks if (check.zone, check.target) == key]:
            log.info("DNS: not waiting for {target} to serve {zone}: it rejected its NOTIFY",
                     target=str(check.target), zone=check.zone)
            self._endCheck(check)

    # Internals

    def _answered(self, message: dns.Message, address: Any) -> Optional[tuple[str, HostPort]]:
        """The pending NOTIFY C{message} from C{address} answers, if any."""
        if not message.answer or message.opCode != dns.OP_NOTIFY:
            return None
        for key, pending in self.pending.items():
            if (
                pending.messageID == message.id
                and _sameAddress(key[1], address)
                and message.queries == _question(pending.origin)
            ):
                return key
        return None

    def _soaAnswered(self, message: dns.Message, address: Any) -> None:
        """
        An answer to a L{whenServed} SOA query: done if the apex's SOA in it
        has the serial or a newer one, or if it is REFUSED or NOTAUTH (the
        secondary does not carry the zone); anything else (SERVFAIL while
        the zone is not loaded, an older serial) is asked again.
        """
        for check in self.checks:
            if (
                check.messageID == message.id
                and _sameAddress(check.target, address)
                and message.queries == _question(check.origin)
            ):
                break
        else:
            return
        fields = dict(target=str(check.target), zone=check.zone)
        if message.rCode in NOT_SERVED:
            log.warn("DNS: {target} answers {rcode} for the SOA of {zone}: it does not serve "
                     "{zone}; not waiting for it", rcode=rcodeName(message.rCode), **fields)
            self._endCheck(check)
            return
        apex = dns.Name(check.origin)
        serials = [
            record.payload.serial  # type: ignore[union-attr]
            for record in message.answers if record.type == dns.SOA and record.name == apex
        ]
        if message.rCode == dns.OK and serials and serialAtLeast(serials[0], check.serial):
            log.info("DNS: {target} serves {zone} serial {serial}", serial=serials[0], **fields)
            self._endCheck(check)

    def _poll(self, check: _Check) -> None:
        """Ask the secondary for the SOA (again), and again after L{CHECK_INTERVAL}."""
        try:
            self._portFor(check.target).write(  # type: ignore[attr-defined]
                check.data, (check.target.host, check.target.port)
            )
        except (OSError, CannotListenError, MessageLengthError) as e:
            log.debug("DNS: cannot ask {target} for the SOA of {zone}: {error}",
                      target=str(check.target), zone=check.zone, error=e)
        check.poll = self.reactor.callLater(CHECK_INTERVAL, self._poll, check)

    def _late(self, checks: list[_Check], timeout: float) -> None:
        late = [check for check in checks if check in self.checks]
        if late:
            log.warn("DNS: {targets} do not serve {zone} serial {serial} after {timeout} s; "
                     "going on without them", targets=", ".join(str(c.target) for c in late),
                     zone=late[0].zone, serial=late[0].serial, timeout=timeout)
        for check in late:
            self._endCheck(check)

    def _endCheck(self, check: _Check, failure: Optional[Failure] = None) -> None:
        """Stop asking; the wait succeeds, or fails with C{failure}."""
        self.checks.remove(check)
        if check.poll is not None and check.poll.active():
            check.poll.cancel()
        if failure is None:
            check.served.callback(None)
        else:
            check.served.errback(failure)

    def _freshID(self, target: HostPort) -> int:
        """A message ID no pending NOTIFY or SOA query to C{target} has."""
        used = {pending.messageID for key, pending in self.pending.items() if key[1] == target}
        used.update(check.messageID for check in self.checks if check.target == target)
        messageID = self.newID()
        while messageID in used:
            messageID = self.newID()
        return messageID

    def _send(self, key: tuple[str, HostPort]) -> None:
        zone, target = key
        pending = self.pending[key]
        pending.tries += 1
        fields = dict(zone=zone, serial=pending.serial, target=str(target), tries=pending.tries)
        try:
            self._portFor(target).write(  # type: ignore[attr-defined]
                pending.data, (target.host, target.port)
            )
        except (OSError, CannotListenError, MessageLengthError) as e:
            log.warn("DNS NOTIFY of {zone} serial {serial} to {target}: cannot send (try "
                     "{tries}): {error}", error=e, **fields)
        else:
            self.count("notify_sent")
            if pending.tries == 1:
                log.info("DNS NOTIFY of {zone} serial {serial} sent to {target}", **fields)
            else:
                log.debug("DNS NOTIFY of {zone} serial {serial} sent to {target} again (try "
                          "{tries}): no answer yet", **fields)
        wait = min(FIRST_WAIT * 2 ** (pending.tries - 1), MAX_WAIT)
        pending.retry = self.reactor.callLater(wait, self._timedOut, key)

    def _timedOut(self, key: tuple[str, HostPort]) -> None:
        pending = self.pending[key]
        pending.retry = None
        if pending.tries < TRIES:
            self._send(key)
            return
        del self.pending[key]
        self.count("notify_given_up")
        log.warn("DNS NOTIFY of {zone} serial {serial} to {target}: no answer after {tries} "
                 "tries, given up (it sees the change at its SOA refresh)",
                 zone=key[0], serial=pending.serial, target=str(key[1]), tries=pending.tries)

    def _drop(self, key: tuple[str, HostPort]) -> None:
        pending = self.pending.pop(key)
        if pending.retry is not None and pending.retry.active():
            pending.retry.cancel()

    def _portFor(self, target: HostPort) -> IListeningPort:
        """The socket to send to C{target} from: on the listen address of its family."""
        source = notifySource(target, self.listen)
        if source is None:
            raise CannotListenError("", 0, OSError(f"no listen address is of {target}'s family"))
        port = self.ports.get(source)
        if port is None:
            port = self.ports[source] = self.reactor.listenUDP(
                0, _NotifyProtocol(self), interface=source
            )
        return port

    def _sources(self) -> set[str]:
        """The source addresses the secondaries are notified from."""
        targets = set(self.targets).union(*self.zoneTargets.values())
        sources = {notifySource(target, self.listen) for target in targets}
        return {source for source in sources if source is not None}

    def _closePorts(self, sources: Iterable[str]) -> Deferred[Any]:
        waits = []
        for source in sources:
            port = self.ports.pop(source, None)
            if port is not None:
                waits.append(maybeDeferred(port.stopListening))
        return DeferredList(waits, consumeErrors=True)
