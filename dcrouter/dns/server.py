"""
The DNS server: twisted.names' server factory and protocols, hardened.

Stock twisted.names answers QR=1 packets (two servers can then bounce a
packet between them forever), serves AXFR to anyone, says NXDOMAIN outside
its zones (and so looks like a resolver), never closes an idle TCP client,
answers unknown opcodes by sending the query itself back, and truncates an
answer in the middle of a record. Here:

  - every message is checked byte by byte first (L{dcrouter.dns.wire}):
    shorter than a header, or with QR=1, it is dropped without a word;
    otherwise malformed, it gets a bare FORMERR; either way it is logged
    once per source and period, not once per packet;
  - an opcode other than QUERY gets NOTIMP; EDNS version > 0, BADVERS;
  - a name in none of the zones gets REFUSED (RA is never set);
  - AXFR and IXFR only over TCP, only to C{allow_transfer} and, if there
    are C{transfer_keys_file} keys, only signed with one (TSIG, L{dcrouter.dns.tsig});
    a signed request gets a signed answer, a bad signature NOTAUTH;
  - ANY over UDP gets the one synthesized HINFO of RFC 8482 (over TCP, all);
  - a UDP answer fits the client's EDNS size (512 without EDNS) and our
    C{max_udp_size}: additional records are dropped first, then the answer
    is sent empty with TC=1, so the client asks again over TCP; a
    referral that had to drop in-domain glue says TC=1 too (RFC 9471);
  - C{rate_limit} bounds UDP answers per client network (RRL);
  - a TCP client that sends no whole query for C{tcp_idle_timeout} is
    closed, at most C{max_tcp_connections} are served, and a client that
    does not read its answers stops being read and answered (flow
    control: the queries it sent wait, unanswered, until it reads; if it
    never does, it is closed as idle); of pipelined queries, at most
    C{MAX_PIPELINED} are answered in a turn of the reactor.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Optional, Union

from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.names import dns, server
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.dns import DnsSettings
from dcrouter.dns.records import encodedSize
from dcrouter.dns.tsig import Signer, findSignature
from dcrouter.dns.wire import HEADER_SIZE, checkMessage, errorReply, readName
from dcrouter.dns.zone import Zone, ZoneSet

log = Logger()

IPAddress = Union[IPv4Address, IPv6Address]
Address = Optional[tuple[str, int]]

BADVERS = 16
NOTAUTH = 9
OPT_TYPE = 41
UDP_DEFAULT = 512  # RFC 1035: a UDP answer without EDNS
TCP_LIMIT = 65535
TRANSFER_CHUNK = 16000  # bytes of records in one AXFR message
#: Queries of one TCP client answered in a turn of the reactor: while more
#: wait in its buffer, it is not read, and the rest are answered in the next
#: turns (BIND and Unbound too bound the queries of a connection in progress).
MAX_PIPELINED = 32
_META_TYPES = range(128, 255)  # TKEY, TSIG, MAILA, MAILB, ...: not ours to answer
TSIG_ERRORS = {dns.EBADSIG: "BADSIG", dns.EBADKEY: "BADKEY", dns.EBADTIME: "BADTIME"}

SEND, DROP, SLIP = 0, 1, 2

RCODE_NAMES = {
    dns.OK: "NOERROR", dns.EFORMAT: "FORMERR", dns.ESERVER: "SERVFAIL", dns.ENAME: "NXDOMAIN",
    dns.ENOTIMP: "NOTIMP", dns.EREFUSED: "REFUSED", NOTAUTH: "NOTAUTH", BADVERS: "BADVERS",
}


def rcodeName(rcode: int) -> str:
    """The mnemonic of a response code (RFC 6895), or its number."""
    return RCODE_NAMES.get(rcode, str(rcode))


def clientAddress(host: str) -> Optional[IPAddress]:
    """The IP of a peer's host string; a v4-mapped IPv6 address becomes IPv4."""
    try:
        ip = ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class LogLimiter:
    """
    Says whether to log a problem from a source: once per source and
    C{period}, at most C{perPeriod} lines in all (a flood with forged
    sources must not become a log flood), the rest counted.
    """

    def __init__(
        self, clock: IReactorTime, period: float = 60.0, perPeriod: int = 20,
        maxSources: int = 4096,
    ) -> None:
        self.clock = clock
        self.period = period
        self.perPeriod = perPeriod
        self.maxSources = maxSources
        self.suppressed = 0
        self._start = clock.seconds()
        self._seen: set[str] = set()

    def shouldLog(self, source: str) -> bool:
        now = self.clock.seconds()
        if not 0 <= now - self._start < self.period:
            self._start = now
            self._seen.clear()
        if source in self._seen or len(self._seen) >= min(self.perPeriod, self.maxSources):
            self.suppressed += 1
            return False
        self._seen.add(source)
        return True


class ResponseRateLimiter:
    """
    UDP answers per second to one client network (IPv4 /24, IPv6 /56): a
    token bucket each, of C{rate} tokens refilled at C{rate} per second.

    Beyond the rate, answers are dropped, but every C{slip}-th is sent empty
    with TC=1 instead, so that a real client whose address is being forged
    by an attacker still gets its answer over TCP (BIND's RRL "slip"). The
    table holds at most C{maxClients} networks; when full, it starts afresh.
    """

    def __init__(
        self, rate: int, clock: IReactorTime, slip: int = 2, maxClients: int = 100_000
    ) -> None:
        self.rate = rate
        self.clock = clock
        self.slip = slip
        self.maxClients = maxClients
        self.limited = 0
        self._buckets: dict[bytes, list[float]] = {}

    def check(self, host: str) -> int:
        """L{SEND}, L{DROP} or L{SLIP} for one answer to C{host}."""
        key = _networkKey(host)
        now = self.clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.maxClients:
                self._buckets.clear()
            bucket = self._buckets[key] = [float(self.rate), now]
        tokens = min(float(self.rate), bucket[0] + max(0.0, now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return SEND
        bucket[0] = tokens
        self.limited += 1
        return SLIP if self.slip and self.limited % self.slip == 0 else DROP


def _networkKey(host: str) -> bytes:
    ip = clientAddress(host)
    if ip is None:
        return host.encode("utf-8", "replace")
    return ip.packed[:3] if ip.version == 4 else b"6" + ip.packed[:7]


class UDPServerProtocol(dns.DNSDatagramProtocol):
    """One UDP socket of the server: every datagram goes to the factory's checks."""

    def __init__(self, controller: DNSServerFactory, reactor: Any) -> None:
        super().__init__(controller, reactor=reactor)

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.controller.receive(data, self, addr)

    def sendBytes(self, data: bytes, address: tuple[str, int]) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, address)
        except (OSError, MessageLengthError) as e:
            # A full socket buffer under a flood, an unreachable client.
            self.controller.count("udp_send_errors")
            log.debug("DNS: cannot send to {address}: {error}", address=address, error=e)


@implementer(IPushProducer)
class TCPServerProtocol(dns.DNSProtocol):
    """
    One TCP client: length-prefixed messages (RFC 7766), idle timeout, and
    flow control: neither read nor answered while it does not read what it
    is sent, nor read while whole queries wait in its buffer.
    """

    def __init__(self, controller: DNSServerFactory, reactor: Any) -> None:
        super().__init__(controller, reactor=reactor)
        self._idle: Optional[IDelayedCall] = None
        self._closing = False
        self._buffer = bytearray()
        self._paused = False  # the transport's write buffer is full
        self._next: Optional[IDelayedCall] = None  # the next turn's answers

    @property
    def tcp(self) -> Any:
        """The TCP transport (C{ITCPTransport} and C{IProducer})."""
        return self.transport

    def connectionMade(self) -> None:
        self.liveMessages = {}
        self.controller.connectionMade(self)
        self.tcp.registerProducer(self, True)
        self._resetIdle()

    def _resetIdle(self) -> None:
        timeout = self.controller.settings.tcp_idle_timeout
        if self._idle is not None and self._idle.active():
            self._idle.reset(timeout)
        else:
            self._idle = self.callLater(timeout, self._timedOut)

    def _timedOut(self) -> None:
        """Close an idle client; abort it if a graceful close did not end it in time."""
        self._idle = None
        if self._closing:
            self.tcp.abortConnection()
            return
        self._closing = True
        self.controller.count("tcp_idle_closed")
        self.tcp.loseConnection()
        self._idle = self.callLater(self.controller.settings.tcp_idle_timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        """
        Split the stream into messages. (Framed here: twisted.names' own
        framing differs across versions, and Twisted 22.4's fails on a
        length prefix that arrives alone.)
        """
        if self._closing:
            return
        self._buffer.extend(data)
        self._answerBuffered()

    def _answerBuffered(self) -> None:
        """
        Answer the whole messages in the buffer, in order, until the client
        stops reading or L{MAX_PIPELINED} are answered; then read the client
        only if none is left, else answer the rest in the next turn (or,
        if it stopped reading, once it reads again: L{resumeProducing}).
        """
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        for _ in range(MAX_PIPELINED):
            if self._closing or self._paused or not self._whole():
                break
            buffer = self._buffer
            length = (buffer[0] << 8) | buffer[1]
            message = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            self.stringReceived(message)
        if self._closing:
            return
        waiting = self._whole()
        if waiting and not self._paused:
            self._next = self.callLater(0, self._answerBuffered)
        if waiting or self._paused:
            self.tcp.pauseProducing()
        else:
            self.tcp.resumeProducing()

    def _whole(self) -> bool:
        """Does the buffer start with a whole message?"""
        buffer = self._buffer
        return len(buffer) >= 2 and len(buffer) >= 2 + ((buffer[0] << 8) | buffer[1])

    def stringReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._resetIdle()
        self.controller.receive(data, self, None)

    def sendBytes(self, data: bytes) -> None:
        if len(data) <= TCP_LIMIT and not self._closing:
            self.tcp.write(struct.pack("!H", len(data)) + data)

    def drop(self) -> None:
        """End the connection now: the client sent something no server would."""
        self._closing = True
        self.tcp.abortConnection()

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        for call in (self._idle, self._next):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._next = None
        if self in self.controller.connections:
            self.controller.connectionLost(self)

    # IPushProducer: the transport pauses us when its write buffer is full,
    # and resumes us once the client has read it.

    def pauseProducing(self) -> None:
        self._paused = True
        self.tcp.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._answerBuffered()

    def stopProducing(self) -> None:
        pass


class Message(dns._EDNSMessage):
    """A request, with the signer of its answer if it was signed (TSIG)."""

    signer: Optional[Signer] = None


class DNSServerFactory(server.DNSServerFactory):
    """
    Answers queries from a L{ZoneSet}, for UDP and TCP protocols alike.

    @ivar settings: the live L{DnsSettings} (L{configure} swaps them).
    @ivar counters: events worth a metric (dropped responses, FORMERR, ...).
    @ivar responses: responses sent, by protocol (C{udp}, C{tcp}) and
        response code name (C{NOERROR}, C{NXDOMAIN}, C{REFUSED}, ...); each
        message of a zone transfer counts.
    """

    protocol = TCPServerProtocol  # type: ignore[assignment]

    def __init__(self, zones: ZoneSet, settings: DnsSettings, reactor: Any) -> None:
        super().__init__(authorities=[zones])
        self.zones = zones
        self.reactor = reactor
        self.counters: dict[str, int] = {}
        self.responses: Counter[tuple[str, str]] = Counter()
        self.problems = LogLimiter(reactor)
        self.rateLimiter: Optional[ResponseRateLimiter] = None
        self.settings = settings
        self.configure(settings)

    def configure(self, settings: DnsSettings) -> None:
        """Serve under new settings; the rate limiter keeps its state if its rate is the same."""
        self.settings = settings
        self.transferKeys = {key.name: key for key in settings.transfer_keys}
        rate = settings.rate_limit
        if rate is None:
            self.rateLimiter = None
        elif self.rateLimiter is None or self.rateLimiter.rate != rate:
            self.rateLimiter = ResponseRateLimiter(rate, self.reactor)

    def count(self, event: str) -> None:
        self.counters[event] = self.counters.get(event, 0) + 1

    def buildProtocol(self, addr: Any) -> Optional[TCPServerProtocol]:
        if len(self.connections) >= self.settings.max_tcp_connections:
            self.count("tcp_refused")
            return None
        protocol = self.protocol(self, self.reactor)
        protocol.factory = self
        return protocol

    # Receiving

    def receive(self, data: bytes, proto: Any, address: Address) -> None:
        """
        One message from a client (C{address} C{None}: over TCP): checked,
        decoded, answered. Nothing it holds can raise into the transport.
        """
        try:
            self._receive(data, proto, address)
        except Exception:
            self.count("errors")
            if self.problems.shouldLog(self.sourceOf(proto, address)):
                log.failure("DNS: answering a message from {source} failed",
                            source=self.sourceOf(proto, address))

    def _receive(self, data: bytes, proto: Any, address: Address) -> None:
        if len(data) < HEADER_SIZE:
            self.malformed(proto, address, "shorter than a DNS header")
            if address is None:
                proto.drop()
            return
        if data[2] & 0x80:
            # A response (QR=1): never answer one, or two servers can bounce
            # a forged packet between them forever.
            self.count("responses_dropped")
            return
        problem = checkMessage(data)
        message = Message()
        if problem is None:
            try:
                message.fromStr(data)
                if any(header.type == dns.TSIG for header in message.additional):
                    message.signer = self.signer(data, message, proto, address)
            except Exception as e:
                problem = f"undecodable: {e.__class__.__name__}: {e}"
        if problem is not None:
            self.malformed(proto, address, problem)
            self.send(proto, errorReply(data, dns.EFORMAT), address, dns.EFORMAT)
            return
        if message.signer is not None and not message.signer.verified:
            self.reply(message, proto, address, NOTAUTH)
            return
        self.messageReceived(message, proto, address)

    def signer(self, data: bytes, message: Message, proto: Any, address: Address) -> Signer:
        """
        The signer of the answer to a signed C{message}, which has checked
        its signature; the TSIG record leaves the message.

        @raise ValueError: the TSIG record is not the last, or malformed.
        """
        signature = findSignature(data)
        assert signature is not None
        message.additional = [header for header in message.additional if header.type != dns.TSIG]
        signer = Signer(data, signature, self.transferKeys, self.reactor.seconds())
        if not signer.verified:
            self.count("tsig_refused")
            source = self.sourceOf(proto, address)
            if self.problems.shouldLog(source):
                log.warn("DNS: TSIG of a message from {source} refused: {error} (key {key})",
                         source=source, error=TSIG_ERRORS[signer.error],
                         key=signature.keyName)  # fmt: skip
        return signer

    def malformed(self, proto: Any, address: Address, problem: str) -> None:
        self.count("malformed")
        source = self.sourceOf(proto, address)
        if self.problems.shouldLog(source):
            log.warn(
                "DNS: malformed message from {source}: {problem} "
                "({suppressed} problems not logged before this one)",
                source=source, problem=problem, suppressed=self.problems.suppressed,
            )

    def sourceOf(self, proto: Any, address: Address) -> str:
        if address is not None:
            return str(address[0])
        peer = proto.transport.getPeer() if proto.transport is not None else None
        return str(getattr(peer, "host", "?"))

    def messageReceived(self, message: Any, proto: Any, address: Address = None) -> None:
        """Dispatch a decoded message by opcode, after the EDNS and count checks."""
        if message.answer:
            self.count("responses_dropped")
            return
        if message.ednsVersion is not None and message.ednsVersion > 0:
            self.reply(message, proto, address, BADVERS)
        elif message.opCode != dns.OP_QUERY:
            self.handleOther(message, proto, address)
        elif not self.allowQuery(message, proto, address):
            self.reply(message, proto, address, dns.EFORMAT)
        else:
            self.handleQuery(message, proto, address)

    def allowQuery(self, message: Any, protocol: Any, address: Address) -> bool:
        """Exactly one question (RFC 9619): anything else is FORMERR."""
        return len(message.queries) == 1

    def handleOther(self, message: Any, protocol: Any, address: Address) -> None:
        """
        NOTIMP for every opcode but QUERY. (Twisted's handlers send the query
        itself back, QR unset: a reflection waiting to happen.)
        """
        self.count("notimp")
        self.reply(message, protocol, address, dns.ENOTIMP)

    handleInverseQuery = handleStatus = handleNotify = handleOther

    def handleQuery(self, message: Any, protocol: Any, address: Address) -> None:
        query = message.queries[0]
        qname = query.name.name.lower()
        qtype = query.type
        if query.cls not in (dns.IN, dns.ANY):
            # CHAOS (version.bind, hostname.bind) and the rest: nothing to say.
            self.reply(message, protocol, address, dns.EREFUSED)
            return
        if qtype in (dns.AXFR, dns.IXFR):
            self.handleTransfer(message, protocol, address)
            return
        if qtype == OPT_TYPE:
            self.reply(message, protocol, address, dns.EFORMAT)
            return
        if qtype in _META_TYPES:
            self.reply(message, protocol, address, dns.ENOTIMP)
            return
        answer = self.zones.answer(qname, qtype)
        if answer is None:
            self.count("refused")
            self.reply(message, protocol, address, dns.EREFUSED)
            return
        answers: Sequence[dns.RRHeader] = answer.answers
        additional: Sequence[dns.RRHeader] = answer.additional
        if qtype == dns.ALL_RECORDS and address is not None and answers:
            # RFC 8482: ANY over UDP amplifies; one small synthesized record.
            ttl = min(header.ttl for header in answers)
            answers = [dns.RRHeader(query.name.name, dns.HINFO, dns.IN, ttl,
                                    dns.Record_HINFO(b"RFC8482", b"", ttl), auth=True)]
            additional = ()
        self.reply(message, protocol, address, answer.rcode, answers, answer.authority,
                   additional, answer.authoritative)

    def handleTransfer(self, message: Any, protocol: Any, address: Address) -> None:
        """AXFR/IXFR: over TCP, of a zone's apex, to C{allow_transfer} only."""
        query = message.queries[0]
        qname = query.name.name.lower()
        zone = self.zones.find(qname)
        if address is not None or zone is None:
            self.reply(message, protocol, address, dns.EREFUSED)
            return
        if zone.origin != qname:
            self.reply(message, protocol, address, NOTAUTH)
            return
        host = self.sourceOf(protocol, address)
        ip = clientAddress(host)
        refused = None
        if ip is None or not any(ip in network for network in self.settings.allow_transfer):
            refused = "not in allow_transfer"
        elif self.transferKeys and message.signer is None:
            refused = "not signed with a key of transfer_keys_file"
        if refused is not None:
            self.count("transfer_refused")
            if self.problems.shouldLog(host):
                log.info("DNS: zone transfer of {zone} refused to {client} ({why})",
                         zone=zone.config.name, client=host, why=refused)
            self.reply(message, protocol, address, dns.EREFUSED)
            return
        if query.type == dns.IXFR and self.upToDate(message, zone):
            self.reply(message, protocol, address, dns.OK, [zone.soaHeader], auth=True)
            return
        records = zone.transfer()
        log.info("DNS: zone transfer of {zone} serial {serial} ({count} records) to {client}",
                 zone=zone.config.name, serial=zone.serial, count=len(records), client=host)
        chunk: list[dns.RRHeader] = []
        size = 0
        for header in records:
            length = encodedSize(header)
            if chunk and size + length > TRANSFER_CHUNK:
                self.reply(message, protocol, address, dns.OK, chunk, auth=True)
                chunk, size = [], 0
            chunk.append(header)
            size += length
        self.reply(message, protocol, address, dns.OK, chunk, auth=True)

    def upToDate(self, message: Any, zone: Zone) -> bool:
        """Is the serial in an IXFR's authority section not older than ours (RFC 1982)?"""
        for header in message.authority:
            if header.type == dns.SOA:
                theirs = header.payload.serial
                return theirs == zone.serial or 0 < (theirs - zone.serial) % 2**32 < 2**31
        return False

    # Replying

    def reply(
        self,
        message: Any,
        protocol: Any,
        address: Address,
        rcode: int,
        answers: Sequence[dns.RRHeader] = (),
        authority: Sequence[dns.RRHeader] = (),
        additional: Sequence[dns.RRHeader] = (),
        auth: bool = False,
    ) -> None:
        """Answer C{message}: its ID, opcode, RD and CD; RA never; OPT if it had one."""
        edns = message.ednsVersion is not None
        response = dns._EDNSMessage(
            id=message.id, answer=True, opCode=message.opCode, auth=auth,
            recDes=message.recDes, recAv=False, rCode=rcode,
            ednsVersion=0 if edns else None, dnssecOK=edns and message.dnssecOK,
            checkingDisabled=message.checkingDisabled, maxSize=self.settings.max_udp_size,
            queries=list(message.queries), answers=list(answers), authority=list(authority),
            additional=list(additional),
        )
        if address is None:
            limit = TCP_LIMIT
        elif edns:
            limit = min(max(UDP_DEFAULT, message.maxSize), self.settings.max_udp_size)
        else:
            limit = UDP_DEFAULT
        signer = getattr(message, "signer", None)
        if signer is None:
            self.send(protocol, self.encode(response, limit), address, rcode)
            return
        data = signer.sign(self.encode(response, limit - signer.recordSize()))
        self.send(protocol, data, address, rcode)

    def sendReply(self, protocol: Any, message: Any, address: Address) -> None:
        """twisted.names' entry point, for a ready response message."""
        limit = TCP_LIMIT if address is None else UDP_DEFAULT
        self.send(protocol, self.encode(message, limit), address, message.rCode)

    def encode(self, response: Any, limit: int) -> bytes:
        """
        The response's bytes, at most C{limit}: additional records go first,
        then answer and authority, with TC set (never half a record). A
        referral that loses in-domain glue says TC too (RFC 9471): without
        it a resolver cannot reach the child zone's servers.
        """
        data = _toBytes(response)
        if len(data) > limit and response.additional:
            dropped, response.additional = response.additional, []
            if _inDomainGlue(response, dropped):
                self.count("truncated")
                response.trunc = True
            data = _toBytes(response)
        if len(data) > limit:
            self.count("truncated")
            response.trunc = True
            response.answers, response.authority, response.additional = [], [], []
            data = _toBytes(response)
        return data

    def send(self, protocol: Any, data: bytes, address: Address, rcode: int) -> None:
        """Send a response (UDP ones through the rate limiter) and count it by C{rcode}."""
        if address is None:
            self.responses[("tcp", rcodeName(rcode))] += 1
            protocol.sendBytes(data)
            return
        if self.rateLimiter is not None:
            verdict = self.rateLimiter.check(address[0])
            if verdict == DROP:
                self.count("rate_limited")
                return
            if verdict == SLIP:
                self.count("rate_limited_slipped")
                data = _slipped(data)
        self.responses[("udp", rcodeName(rcode))] += 1
        protocol.sendBytes(data, address)


def _inDomainGlue(response: Any, additional: Sequence[dns.RRHeader]) -> bool:
    """Is C{response} a referral and one of C{additional} at or below its zone cut?"""
    if response.auth:
        return False
    cuts = [b"." + header.name.name.lower() for header in response.authority
            if header.type == dns.NS]
    return any(
        (b"." + header.name.name.lower()).endswith(cut) for header in additional for cut in cuts
    )


def _toBytes(response: Any) -> bytes:
    """Encode without twisted.names' own truncation (which cuts records in half)."""
    message = response._toMessage() if isinstance(response, dns._EDNSMessage) else response
    message.maxSize = 0
    data: bytes = message.toStr()
    return data


def _slipped(data: bytes) -> bytes:
    """A header-only copy of an answer with TC set: "ask me over TCP"."""
    qid, flags = struct.unpack_from("!HH", data)
    question = b""
    qdCount = struct.unpack_from("!H", data, 4)[0]
    if qdCount == 1:
        end = readName(data, HEADER_SIZE) + 4
        question = data[HEADER_SIZE:end]
    header = struct.pack("!HHHHHH", qid, flags | 0x0200, 1 if question else 0, 0, 0, 0)
    return header + question
