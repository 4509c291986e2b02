"""
L{dcrouter.mail.smtp}: the ESMTP state machine and each hardening rule, on a
StringTransport and a MemoryReactorClock (no sockets, no real time).
"""

from __future__ import annotations

import base64
import errno

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.mail.smtp import SMTPBadRcpt
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from dcrouter.auth.passwords import AuthUnavailable
from dcrouter.config.model import TlsSettings
from dcrouter.mail.envelope import SMTPReply
from dcrouter.mail.interfaces import IMailPolicy
from dcrouter.mail.policy import DomainPolicy
from dcrouter.mail.smtp import (
    PIPELINE_LIMIT,
    SMTPFactory,
    SMTPServer,
    SMTPSettings,
    proxyTLSInfo,
)
from dcrouter.mail.testing import MemorySink
from dcrouter.net.proxyprotocol import encodeV1, encodeV2
from dcrouter.net.tls import ServerTLS, ensureSelfSigned

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)
SERVER = IPv4Address("TCP", "192.0.2.1", 25)
PROXY = IPv4Address("TCP", "10.0.0.5", 50000)
HOST = "mx.example.test"


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS (no real handshake)."""

    tlsStartedWith = None
    writtenBeforeTLS = b""

    def startTLS(self, contextFactory, normal=True):
        self.tlsStartedWith = contextFactory
        self.writtenBeforeTLS = self.value()


class Checker:
    """An ICredentialsChecker double: a dict of users, or a canned failure."""

    credentialInterfaces = ()

    def __init__(self, users=None, failure=None, pending=False):
        self.users = users if users is not None else {"alice": "alicepw"}
        self.failure = failure
        self.pending = pending
        self.calls = []
        self.deferreds = []

    def requestAvatarId(self, credentials):
        self.calls.append((credentials.username, credentials.password))
        if self.pending:
            d = Deferred()
            self.deferreds.append(d)
            return d
        if self.failure is not None:
            return fail(self.failure)
        user = credentials.username.decode()
        if self.users.get(user) == credentials.password.decode():
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())


@implementer(IMailPolicy)
class Policy:
    """An IMailPolicy double whose answers a test can hold back."""

    def __init__(self, pending=False):
        self.pending = pending
        self.deferreds = []
        self.calls = []

    def checkSender(self, envelope, address):
        return None

    def checkRecipient(self, envelope, address, authenticated):
        self.calls.append(str(address))
        if self.pending:
            d = Deferred()
            self.deferreds.append(d)
            return d
        return None


@pytest.fixture(scope="module")
def serverTLS(tmp_path_factory):
    pair = ensureSelfSigned(str(tmp_path_factory.mktemp("tls")), "mx.example.test")
    return ServerTLS(pair, TlsSettings())


class Session:
    """One protocol on a TLSStringTransport, with reply parsing."""

    def __init__(self, factory, peer=CLIENT, host=SERVER):
        self.factory = factory
        self.clock = factory.clock
        self.transport = TLSStringTransport(peerAddress=peer, hostAddress=host)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self._seen = 0

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.protocol.dataReceived(data)

    def output(self):
        """Everything written since the last call."""
        data = self.transport.value()
        new, self._seen = data[self._seen :], len(data)
        return new

    def replies(self):
        """The replies written since the last call, one string per reply."""
        out, current = [], []
        for line in self.output().decode().split("\r\n")[:-1]:
            current.append(line)
            if line[3:4] != "-":
                out.append("\n".join(current))
                current = []
        assert not current, current
        return out

    def cmd(self, line):
        self.send(line + "\r\n")
        replies = self.replies()
        assert len(replies) == 1, replies
        return replies[0]

    def codes(self):
        return [int(r[:3]) for r in self.replies()]

    @property
    def closed(self):
        return self.transport.disconnecting

    def startTLS(self):
        """STARTTLS, then pretend the handshake happened."""
        assert self.cmd("STARTTLS").startswith("220 ")
        assert self.transport.tlsStartedWith is not None


def makeFactory(serverTLS=None, sink=None, policy=None, checker=None, trusted=(), **settings):
    settings.setdefault("hostname", HOST)
    return SMTPFactory(
        SMTPSettings(**settings),
        policy if policy is not None else DomainPolicy(["example.test", HOST]),
        sink if sink is not None else MemorySink(),
        MemoryReactorClock(),
        serverTLS=serverTLS,
        checker=checker,
        trustedProxies=trusted,
    )


def session(**kwargs):
    s = Session(makeFactory(**kwargs))
    assert s.replies() == [f"220 {HOST} ESMTP"]
    return s


def plain(user, password, authzid=""):
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def transaction(s, rcpt="alice@example.test", body="Subject: t\r\n\r\nhello\r\n"):
    s.send(f"EHLO c.example\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    assert [r[:3] for r in s.replies()] == ["250", "250", "250", "354"]
    s.send(body)


# -- the basic conversation ----------------------------------------------------


def test_ehlo_lists_extensions_and_no_auth_before_tls(serverTLS):
    s = session(serverTLS=serverTLS, checker=Checker())
    reply = s.cmd("EHLO client.example")
    lines = [line[4:] for line in reply.split("\n")]
    assert lines == [
        HOST,
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "STARTTLS",
    ]
    s.startTLS()
    reply = s.cmd("EHLO client.example")
    assert "STARTTLS" not in reply
    assert reply.endswith("250 AUTH PLAIN LOGIN")


def test_a_message_is_stored_with_a_received_header():
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body="Subject: t\r\n\r\n..dot-stuffed\r\n.\r\n")
    (reply,) = s.replies()
    assert reply == "250 2.0.0 Ok: queued as MEM1"
    (message,) = sink.committed
    header, _, rest = message.data.partition(b"\r\nSubject")
    assert header.startswith(b"Received: from c.example ([192.0.2.7])\r\n\tby mx.example.test with ESMTP id ")
    assert b"for <alice@example.test>; " in header
    assert rest == b": t\r\n\r\n.dot-stuffed\r\n"
    envelope = message.envelope
    assert str(envelope.mailFrom) == "s@c.example"
    assert [str(r) for r in envelope.recipients] == ["alice@example.test"]
    assert envelope.client == CLIENT and envelope.helo == "c.example"
    assert envelope.size == len(message.data)


def test_a_message_without_a_header_keeps_it_apart_from_received():
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body="just text\r\n.\r\n")
    assert s.codes() == [250]
    assert b"\r\n\r\njust text\r\n" in sink.committed[0].data


def test_empty_message():
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body=".\r\n")
    assert s.codes() == [250]
    assert sink.committed[0].data.startswith(b"Received: ")


def test_250_waits_for_the_sink_and_pipelined_commands_wait_too():
    sink = MemorySink(autoCommit=False)
    s = session(sink=sink)
    transaction(s, body="Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert s.replies() == []  # nothing before the message is durable
    assert not s.closed
    sink.opened[0].commitDeferred.callback("Q1")
    assert s.replies() == ["250 2.0.0 Ok: queued as Q1", "250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert s.closed


@pytest.mark.parametrize(
    ("failure", "reply"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "452 4.3.1 Insufficient system storage"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "452 4.3.1 Insufficient system storage"),
        (OSError(errno.EIO, "I/O error"), "451 4.3.0 Temporary failure storing the message"),
        (RuntimeError("bug"), "451 4.3.0 Temporary failure storing the message"),
        (SMTPReply(554, "5.7.1", "Looks like spam"), "554 5.7.1 Looks like spam"),
    ],
)
def test_sink_failure_is_never_250(failure, reply):
    s = session(sink=MemorySink(failure=failure))
    transaction(s, body="Subject: x\r\n\r\nbody\r\n.\r\n")
    assert s.replies() == [reply]
    assert s.cmd("NOOP") == "250 2.0.0 Ok"  # the session goes on


def test_a_slow_commit_is_waited_for_not_answered_451():
    """
    A 451 while the message may still be stored has the client send it
    again: a duplicate. The commit is waited for; the client's patience
    (10 minutes, RFC 5321) bounds it.
    """
    sink = MemorySink(autoCommit=False)
    s = session(sink=sink, operationTimeout=30)
    transaction(s, body="Subject: x\r\n\r\nbody\r\n.\r\n")
    s.clock.advance(300)
    assert s.replies() == [] and not s.closed
    sink.opened[0].commitDeferred.callback("Q1")
    assert s.codes() == [250]


def test_transaction_order():
    s = session()
    assert s.cmd("MAIL FROM:<a@b.example>").startswith("503 5.5.1")
    s.cmd("EHLO c.example")
    assert s.cmd("RCPT TO:<alice@example.test>").startswith("503 5.5.1")
    assert s.cmd("DATA").startswith("503 5.5.1")
    assert s.cmd("MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"
    assert s.cmd("MAIL FROM:<a@b.example>") == "503 5.5.1 Nested MAIL command"
    assert s.cmd("DATA") == "503 5.5.1 Need RCPT command"
    assert s.cmd("RCPT TO:<x@elsewhere.example>").startswith("550 5.7.1")
    assert s.cmd("DATA") == "554 5.5.1 No valid recipients"
    assert s.cmd("MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"
    assert s.cmd("RSET") == "250 2.0.0 Ok"
    assert s.cmd("RCPT TO:<alice@example.test>").startswith("503")
    assert s.cmd("QUIT") == "221 2.0.0 Bye"
    assert s.closed


def test_other_commands():
    s = session()
    assert s.cmd("NOOP") == "250 2.0.0 Ok"
    assert s.cmd("HELP").startswith("214 ")
    assert s.cmd("VRFY alice").startswith("252 2.5.0")
    assert s.cmd("EXPN staff").startswith("502 5.5.1")
    assert s.cmd("BDAT 10 LAST").startswith("502 5.5.1")
    assert s.cmd("XYZZY").startswith("500 5.5.2")
    assert s.cmd("EHLO").startswith("501 5.5.4")
    assert s.cmd("HELO c.example") == f"250 {HOST}"
    # Parameters need EHLO.
    assert s.cmd("MAIL FROM:<a@b.example> SIZE=10").startswith("555 5.5.4")


def test_mail_parameters():
    s = session()
    s.cmd("EHLO c.example")
    assert s.cmd("MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME") == "250 2.1.0 Ok"
    s.cmd("RSET")
    assert s.cmd("MAIL FROM:<a@b.example> BODY=BINARYMIME").startswith("501 5.5.4")
    assert s.cmd("MAIL FROM:<a@b.example> RET=FULL").startswith("555 5.5.4")
    assert s.cmd("MAIL FROM:<a@b.example> SIZE=ten").startswith("501 5.5.4")
    assert s.cmd("MAIL FROM:<a@b.example> SIZE=1 SIZE=2").startswith("501 5.5.4")
    assert s.cmd("MAIL FROM:<> AUTH=<>") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<alice@example.test> NOTIFY=NEVER").startswith("555 5.5.4")


def test_duplicate_recipients_are_kept_once():
    sink = MemorySink()
    s = session(sink=sink)
    s.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    s.send("RCPT TO:<alice@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n.\r\n")
    assert s.codes() == [250, 250, 250, 250, 354, 250]
    assert len(sink.committed[0].envelope.recipients) == 1


def test_postmaster_without_domain():
    s = session()
    s.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    s.replies()
    assert s.cmd("RCPT TO:<Postmaster>") == "250 2.1.5 Ok"


# -- relay control ----------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "victim@external.invalid",
        "victim@EXTERNAL.INVALID",
        "victim@external.invalid.",
        "victim%external.invalid@example.test",
        '"victim@external.invalid"@example.test',
        "victim@external.invalid@example.test",
        "@example.test:victim@external.invalid",
        "external.invalid!victim@example.test",
        "victim@[127.0.0.1]",
        "victim@[IPv6:::1]",
        "victim@example.test.external.invalid",
        "victim@sub.example.test",
        "victim@example.testx",
    ],
)
def test_no_open_relay(address):
    s = session()
    s.send("EHLO c\r\nMAIL FROM:<spammer@external.invalid>\r\n")
    s.replies()
    assert s.cmd(f"RCPT TO:<{address}>")[0] == "5"


def test_authenticated_users_may_relay(serverTLS):
    s = session(serverTLS=serverTLS, checker=Checker())
    s.startTLS()
    s.cmd("EHLO c")
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")) == "235 2.7.0 Authentication successful"
    s.cmd("MAIL FROM:<alice@example.test>")
    assert s.cmd("RCPT TO:<someone@external.example>") == "250 2.1.5 Ok"
    # Routing characters stay refused even then.
    assert s.cmd("RCPT TO:<a%b@external.example>").startswith("553 5.1.3")


def test_twisted_mail_refusals_are_understood():
    class TwistedStylePolicy(Policy):
        def checkRecipient(self, envelope, address, authenticated):
            raise SMTPBadRcpt(str(address), 550, "No such user here")

    s = session(policy=TwistedStylePolicy())
    s.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    s.replies()
    assert s.cmd("RCPT TO:<nobody@example.test>") == "550 5.0.0 No such user here"


def test_policy_bug_defers_mail():
    class Broken(Policy):
        def checkRecipient(self, envelope, address, authenticated):
            raise KeyError("bug")

    s = session(policy=Broken())
    s.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    s.replies()
    assert s.cmd("RCPT TO:<x@example.test>").startswith("451 4.3.0")


def test_pipelined_commands_wait_for_an_asynchronous_policy():
    policy = Policy(pending=True)
    sink = MemorySink()
    s = session(policy=policy, sink=sink)
    s.send(
        "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<one@example.test>\r\n"
        "RCPT TO:<two@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    assert s.codes() == [250, 250]
    assert policy.calls == ["one@example.test"]  # the second RCPT waits
    policy.deferreds[0].callback(None)
    assert s.codes() == [250]
    assert policy.calls == ["one@example.test", "two@example.test"]
    policy.deferreds[1].errback(SMTPReply(550, "5.1.1", "No such user"))
    assert s.replies() == [
        "550 5.1.1 No such user",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as MEM1",
        "221 2.0.0 Bye",
    ]
    assert [str(r) for r in sink.committed[0].envelope.recipients] == ["one@example.test"]


def test_policy_that_never_answers_gets_451():
    policy = Policy(pending=True)
    s = session(policy=policy, operationTimeout=5)
    s.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<one@example.test>\r\n")
    assert s.codes() == [250, 250]
    s.clock.advance(5)
    assert s.codes() == [451]


def test_reading_pauses_while_a_reply_is_pending():
    policy = Policy(pending=True)
    s = session(policy=policy)
    s.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<one@example.test>\r\n")
    s.send("NOOP\r\n" * (PIPELINE_LIMIT // 6 + 1))
    assert s.transport.producerState == "paused"
    policy.deferreds[0].callback(None)
    assert s.transport.producerState == "producing"
    assert s.codes().count(250) == 3 + PIPELINE_LIMIT // 6 + 1


# -- SMTP smuggling and DATA framing ------------------------------------------------

SMUGGLE = {
    "lflf": b"\n.\n",
    "crcr": b"\r.\r",
    "crlf": b"\r.\n",
    "lfcr": b"\n.\r",
    "lfcrlf": b"\n.\r\n",
    "crlflf": b"\r\n.\n",
    "crcrlf": b"\r.\r\n",
    "crlfcr": b"\r\n.\r",
    "nul": b"\r\n\x00.\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLE))
def test_smuggling_never_ends_data(name):
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body=b"")
    smuggled = (
        b"MAIL FROM:<smuggled@spoofed.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"Subject: SMUGGLED\r\n\r\nsmuggled\r\n.\r\n"
    )
    s.send(b"Subject: s\r\n\r\nline before" + SMUGGLE[name] + smuggled)
    (reply,) = s.replies()
    assert reply.startswith("554 5.6.0 Message has a ")
    assert not sink.committed
    assert sink.opened[0].state == "aborted"
    assert s.cmd("NOOP") == "250 2.0.0 Ok"  # in command mode again, once


@pytest.mark.parametrize("bad", [b"bare\nLF", b"bare\rCR", b"a NUL\x00"])
def test_bare_cr_lf_nul_in_a_line(bad):
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body=b"Subject: s\r\n\r\n" + bad + b"\r\nmore\r\n.\r\n")
    assert s.codes() == [554]
    assert not sink.committed


def test_smuggling_split_across_reads():
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body=b"")
    for byte in b"Subject: s\r\n\r\nx\n.\nMAIL FROM:<a@b>\r\n.\r\n":
        s.send(bytes([byte]))
    assert s.codes() == [554]


def test_end_of_data_split_across_reads():
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body=b"")
    for piece in (b"Subject: s\r\n\r\nbody\r", b"\n", b".", b"\r", b"\n"):
        assert s.replies() == []
        s.send(piece)
    assert s.codes() == [250]
    assert sink.committed[0].data.endswith(b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize("split", [False, True])
def test_long_data_line_stays_in_data(split):
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body=b"")
    line = b"B" * 20000 + b"\r\n"
    if split:
        for i in range(0, len(line), 700):
            s.send(line[i : i + 700])
    else:
        s.send(b"Subject: long\r\n\r\n" + line)
    assert s.replies() == []  # no reply in the middle of DATA
    s.send(b"RSET\r\nMAIL FROM:<injected@evil.example>\r\nNOOP\r\n.\r\n")
    (reply,) = s.replies()
    assert reply.startswith("554 5.6.0 Message has a line over 1000 octets")
    assert not sink.committed
    assert s.cmd("MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"  # no transaction survived


@pytest.mark.parametrize("split", [False, True])
def test_a_message_that_went_round_a_mail_loop_is_refused(split):
    """Over C{maxHops} Received: fields (Postfix's hopcount_limit) is a loop: 554 5.4.6."""
    sink = MemorySink()
    s = session(sink=sink)

    def send(hops):
        transaction(s, body=b"")
        data = b"".join(b"received: from hop%d\r\n\tby x; date\r\n" % i for i in range(hops))
        data += b"Subject: loop\r\n\r\nReceived: in the body, not a hop\r\n.\r\n"
        if split:
            for i in range(0, len(data), 7):
                s.send(data[i : i + 7])
        else:
            s.send(data)
        (reply,) = s.replies()
        return reply

    assert send(50).startswith("250 ")
    assert send(51) == "554 5.4.6 Too many hops: a mail loop?"
    assert len(sink.committed) == 1
    assert s.cmd("NOOP") == "250 2.0.0 Ok"


def test_line_of_exactly_1000_octets_is_fine():
    sink = MemorySink()
    s = session(sink=sink)
    transaction(s, body=b"Subject: x\r\n\r\n" + b"C" * 998 + b"\r\n.\r\n")
    assert s.codes() == [250]
    transaction(s, body=b"Subject: x\r\n\r\n" + b"C" * 999 + b"\r\n.\r\n")
    assert s.codes() == [554]


def test_size_declared_too_big():
    s = session(maxMessageSize=1000)
    s.cmd("EHLO c")
    assert s.cmd("MAIL FROM:<a@b.example> SIZE=1001") == (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    )
    assert s.cmd("MAIL FROM:<a@b.example> SIZE=99999999999") .startswith("552 5.3.4")
    assert s.cmd("MAIL FROM:<a@b.example> SIZE=1000") == "250 2.1.0 Ok"


def test_size_actual_too_big_is_counted_not_stored():
    sink = MemorySink()
    s = session(sink=sink, maxMessageSize=10_000)
    transaction(s, body=b"")
    line = b"Y" * 998 + b"\r\n"
    for _ in range(100):
        s.send(line)
    message = sink.opened[0]
    assert message.state == "aborted"
    assert len(message.data) < 12_000  # stopped storing at the limit
    assert len(s.protocol._buffer) < 1000
    s.send(b".\r\n")
    assert s.replies() == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert not sink.committed


# -- STARTTLS --------------------------------------------------------------------------


def test_starttls_discards_pipelined_commands_and_resets_state(serverTLS):
    policy = Policy()
    s = session(serverTLS=serverTLS, policy=policy)
    s.cmd("EHLO c")
    s.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<x@example.test>\r\n")
    assert s.replies() == ["220 2.0.0 Ready to start TLS"]
    assert s.transport.tlsStartedWith is serverTLS
    assert s.transport.writtenBeforeTLS.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert policy.calls == []
    # Inside TLS: nothing was answered, and EHLO must come again.
    assert s.cmd("MAIL FROM:<a@b.example>") == "503 5.5.1 Send HELO/EHLO first"
    s.cmd("EHLO c")
    assert s.cmd("MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"  # not "nested"
    assert s.cmd("STARTTLS").startswith("503 5.5.1")


def test_starttls_forgets_a_transaction_and_a_login(serverTLS):
    s = session(serverTLS=serverTLS, checker=Checker(), requireTLSForAuth=False)
    s.cmd("EHLO c")
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")).startswith("235")
    s.cmd("MAIL FROM:<a@b.example>")
    s.startTLS()
    s.cmd("EHLO c")
    assert s.cmd("MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"
    # The login did not survive: no relaying.
    assert s.cmd("RCPT TO:<x@external.example>").startswith("550 5.7.1")


def test_starttls_without_a_certificate_or_with_junk():
    s = session()
    assert "STARTTLS" not in s.cmd("EHLO c")
    assert s.cmd("STARTTLS").startswith("502 5.5.1")


def test_starttls_with_an_argument(serverTLS):
    s = session(serverTLS=serverTLS)
    s.cmd("EHLO c")
    assert s.cmd("STARTTLS now").startswith("501")
    assert s.transport.tlsStartedWith is None


# -- over-long lines and floods ----------------------------------------------------


def test_long_command_line_is_skipped_and_the_session_survives():
    s = session()
    s.send(b"NOOP " + b"A" * 20000 + b"\r\n")
    assert s.replies() == ["500 5.5.2 Line too long"]
    assert s.cmd("NOOP") == "250 2.0.0 Ok"


def test_long_command_line_in_pieces():
    s = session()
    for _ in range(30):
        s.send(b"A" * 1000)
        assert len(s.protocol._buffer) <= 1
    s.send(b"\r\nNOOP\r\n")
    assert s.replies() == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_endless_line_closes_with_bounded_memory():
    s = session()
    for _ in range(100):
        s.send(b"X" * 4096)
        assert len(s.protocol._buffer) <= 1
        if s.closed:
            break
    assert s.closed
    assert s.replies() == ["500 5.5.2 Line too long"]
    s.send(b"X" * 4096)  # ignored after close
    assert len(s.protocol._buffer) == 0


def test_command_line_limit_is_1000_with_crlf():
    s = session()
    assert s.cmd("NOOP " + "a" * 993) == "250 2.0.0 Ok"  # 998 + CRLF
    assert s.cmd("NOOP " + "a" * 994) == "500 5.5.2 Line too long"


def test_bare_lf_in_a_command_is_not_a_line_end():
    s = session()
    s.send("EHLO c\nMAIL FROM:<a@b.example>\r\n")
    assert s.codes() == [500]


def test_too_many_errors_close():
    s = session(maxErrors=3)
    s.send("BAD\r\nBAD\r\nBAD\r\nNOOP\r\n")
    assert s.codes() == [500, 500, 500, 421]
    assert s.closed


def test_http_is_refused_at_once():
    s = session()
    s.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.replies() == ["421 4.7.0 This is an SMTP server"]
    assert s.closed


# -- recipients ------------------------------------------------------------------------


def test_recipient_limit():
    s = session(maxRecipients=3)
    s.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    s.send("".join(f"RCPT TO:<u{i}@example.test>\r\n" for i in range(5)))
    assert s.replies()[2:] == ["250 2.1.5 Ok"] * 3 + ["452 4.5.3 Too many recipients"] * 2
    assert not s.closed


# -- AUTH -----------------------------------------------------------------------------


def authSession(serverTLS, **kwargs):
    kwargs.setdefault("checker", Checker())
    s = session(serverTLS=serverTLS, **kwargs)
    s.cmd("EHLO c")
    s.startTLS()
    s.cmd("EHLO c")
    return s


def test_auth_plain_and_login(serverTLS):
    s = authSession(serverTLS)
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")) == "235 2.7.0 Authentication successful"
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")).startswith("503")
    s = authSession(serverTLS)
    assert s.cmd("AUTH PLAIN") == "334 "
    assert s.cmd(plain("alice", "alicepw")).startswith("235")
    s = authSession(serverTLS)
    assert s.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert s.cmd(base64.b64encode(b"alice").decode()) == "334 UGFzc3dvcmQ6"
    assert s.cmd(base64.b64encode(b"alicepw").decode()).startswith("235")
    s = authSession(serverTLS)
    assert s.cmd("AUTH LOGIN " + base64.b64encode(b"alice").decode()) == "334 UGFzc3dvcmQ6"
    assert s.cmd(base64.b64encode(b"alicepw").decode()).startswith("235")


def test_auth_refusals(serverTLS):
    checker = Checker()
    s = authSession(serverTLS, checker=checker, maxAuthFailures=10)
    assert s.cmd("AUTH PLAIN " + plain("alice", "wrong")) == "535 5.7.8 Authentication credentials invalid"
    assert s.cmd("AUTH CRAM-MD5").startswith("504 5.5.4")
    assert s.cmd("AUTH PLAIN !!!notbase64").startswith("501 5.5.2")
    assert s.cmd("AUTH PLAIN " + base64.b64encode(b"alice\0alicepw").decode()).startswith("501")
    assert s.cmd("AUTH PLAIN") == "334 "
    assert s.cmd("*") == "501 5.0.0 Authentication cancelled"
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw", authzid="bob")).startswith("535")
    assert [c for c in checker.calls] == [(b"alice", b"wrong")]


@pytest.mark.parametrize("password", ["", "="])
def test_empty_password_never_reaches_the_checker(serverTLS, password):
    checker = Checker(users={"alice": ""})
    s = authSession(serverTLS, checker=checker)
    if password == "=":
        assert s.cmd("AUTH LOGIN " + base64.b64encode(b"alice").decode()).startswith("334")
        assert s.cmd("=").startswith("535")
    else:
        assert s.cmd("AUTH PLAIN " + plain("alice", "")).startswith("535")
    assert checker.calls == []


def test_unavailable_directory_is_454_never_235(serverTLS):
    s = authSession(serverTLS, checker=Checker(failure=AuthUnavailable("LDAP down")))
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")) == "454 4.7.0 Temporary authentication failure"
    assert s.cmd("MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<x@external.example>").startswith("550")  # not authenticated


def test_checker_bug_is_454(serverTLS):
    s = authSession(serverTLS, checker=Checker(failure=RuntimeError("bug")))
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")).startswith("454 4.7.0")


def test_checker_timeout_is_454(serverTLS):
    checker = Checker(pending=True)
    s = authSession(serverTLS, checker=checker, operationTimeout=10)
    s.send("AUTH PLAIN " + plain("alice", "alicepw") + "\r\nNOOP\r\n")
    assert s.replies() == []
    s.clock.advance(10)
    assert s.replies() == ["454 4.7.0 Temporary authentication failure", "250 2.0.0 Ok"]
    checker.deferreds[0].callback(b"alice")  # too late: ignored
    assert s.cmd("RCPT TO:<x@example.test>").startswith("503")


def test_user_name_goes_to_the_checker_unchanged(serverTLS):
    checker = Checker()
    s = authSession(serverTLS, checker=checker, maxAuthFailures=10)
    for name in ["*", "*)(uid=*", "alice)(|(uid=*", "alice\\2a", "uid=*,ou=people"]:
        assert s.cmd("AUTH PLAIN " + plain(name, "x")).startswith("535")
    assert [u for u, _ in checker.calls] == [
        b"*", b"*)(uid=*", b"alice)(|(uid=*", b"alice\\2a", b"uid=*,ou=people"
    ]


def test_too_many_auth_failures_close(serverTLS):
    s = authSession(serverTLS, maxAuthFailures=2)
    assert s.cmd("AUTH PLAIN " + plain("alice", "x")).startswith("535")
    s.send("AUTH PLAIN " + plain("alice", "y") + "\r\n")
    assert s.codes() == [535, 421]
    assert s.closed


def test_auth_needs_tls_ehlo_and_no_transaction(serverTLS):
    s = session(serverTLS=serverTLS, checker=Checker())
    s.cmd("EHLO c")
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")) == (
        "530 5.7.0 Must issue a STARTTLS command first"
    )
    s.startTLS()
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")).startswith("503 5.5.1 Send EHLO")
    s.cmd("EHLO c")
    s.cmd("MAIL FROM:<a@b.example>")
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")).startswith("503 5.5.1")
    s = session()
    s.cmd("EHLO c")
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")).startswith("502 5.5.1")


# -- modes ---------------------------------------------------------------------------


def test_submission_needs_tls_then_auth(serverTLS):
    s = session(serverTLS=serverTLS, checker=Checker(), mode="submission")
    assert "AUTH" not in s.cmd("EHLO c")
    assert s.cmd("MAIL FROM:<alice@example.test>") == "530 5.7.0 Must issue a STARTTLS command first"
    s.startTLS()
    s.cmd("EHLO c")
    assert s.cmd("MAIL FROM:<alice@example.test>") == "530 5.7.0 Authentication required"
    assert s.cmd("AUTH PLAIN " + plain("alice", "alicepw")).startswith("235")
    assert s.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<friend@external.example>") == "250 2.1.5 Ok"


def test_submission_settings_are_checked(serverTLS):
    with pytest.raises(ValueError, match="serverTLS"):
        makeFactory(mode="submission", checker=Checker())
    with pytest.raises(ValueError, match="checker"):
        makeFactory(serverTLS=serverTLS, mode="submission")
    with pytest.raises(ValueError, match="implicitTLS"):
        SMTPSettings(hostname=HOST, implicitTLS=True)
    with pytest.raises(ValueError, match="implicitTLS needs serverTLS"):
        makeFactory(mode="submissions", implicitTLS=True, checker=Checker())
    with pytest.raises(ValueError):
        SMTPSettings(hostname="bad host")
    with pytest.raises(ValueError):
        SMTPSettings(hostname=HOST, maxLineLength=100)


def test_submissions_without_tls_is_refused():
    s = Session(makeFactory(mode="submissions", checker=Checker()))
    assert s.replies() == [f"554 5.7.0 {HOST} TLS required on this port"]
    assert s.closed


def test_submissions_with_implicit_tls_wraps(serverTLS):
    factory = makeFactory(serverTLS=serverTLS, mode="submissions", implicitTLS=True, checker=Checker())
    protocol = factory.buildProtocol(CLIENT)
    assert isinstance(protocol, TLSMemoryBIOProtocol)
    assert isinstance(protocol.wrappedProtocol, SMTPServer)


def test_handoff_with_tls_already_terminated(serverTLS):
    """A transport whose handle is an OpenSSL connection counts as TLS."""
    from OpenSSL import SSL

    factory = makeFactory(mode="submissions", checker=Checker())
    transport = StringTransport(peerAddress=PROXY, hostAddress=SERVER)
    transport.getHandle = lambda: SSL.Connection(serverTLS.getContext(), None)
    real = IPv6Address("TCP", "2001:db8::7", 1234)
    server = factory.buildHandoff(real, SERVER)
    server.makeConnection(transport)
    assert transport.value().startswith(b"220 ")
    transport.clear()
    server.dataReceived(b"EHLO c\r\n")
    assert b"AUTH PLAIN LOGIN" in transport.value()
    assert server._envelope is None and server._client == real


# -- deadlines -----------------------------------------------------------------------


def test_greeting_timeout():
    s = session(greetingTimeout=30, commandTimeout=300)
    s.clock.advance(29)
    assert not s.closed
    s.clock.advance(1)
    assert s.replies() == [f"421 4.4.2 {HOST} Error: timeout exceeded"]
    assert s.closed


def test_dribbling_bytes_do_not_reset_the_command_deadline():
    s = session(greetingTimeout=10, commandTimeout=20)
    s.cmd("EHLO c")
    for _ in range(19):
        s.clock.advance(1)
        s.send(b"N")
    assert not s.closed
    s.clock.advance(1)
    assert s.closed
    assert s.replies()[-1].startswith("421 4.4.2")


def test_each_complete_line_gets_the_command_timeout():
    s = session(greetingTimeout=10, commandTimeout=20)
    s.clock.advance(9)
    assert s.cmd("NOOP") == "250 2.0.0 Ok"
    for _ in range(5):
        s.clock.advance(15)
        assert s.cmd("NOOP") == "250 2.0.0 Ok"
    assert not s.closed


def test_data_timeout_is_per_line():
    s = session(commandTimeout=20, dataTimeout=60)
    transaction(s, body="Subject: x\r\n")
    s.clock.advance(50)
    s.send("line\r\n")
    s.clock.advance(50)
    assert not s.closed
    s.send("partial")
    s.clock.advance(10)
    assert s.closed
    assert s.replies()[-1].startswith("421 4.4.2")


def test_timeout_aborts_a_client_that_does_not_read():
    s = session(greetingTimeout=5, closeTimeout=7)
    s.clock.advance(5)
    assert s.closed and not s.transport.disconnected
    s.clock.advance(7)
    assert s.transport.disconnected  # abortConnection


def test_no_client_deadline_while_the_server_works():
    sink = MemorySink(autoCommit=False)
    s = session(sink=sink, commandTimeout=10, operationTimeout=100)
    transaction(s, body="Subject: x\r\n\r\n.\r\n")
    s.clock.advance(50)
    assert not s.closed
    sink.opened[0].commitDeferred.callback("Q")
    assert s.codes() == [250]
    s.clock.advance(10)
    assert s.closed


# -- connection caps -----------------------------------------------------------------


def test_connection_caps():
    factory = makeFactory(maxConnections=2, maxConnectionsPerIP=1)
    first = Session(factory)
    assert first.replies()[0].startswith("220")
    same = Session(factory)
    assert same.replies() == [f"421 4.7.0 {HOST} Too many connections, try again later"]
    assert same.closed
    same.protocol.connectionLost(None)
    other = Session(factory, peer=IPv4Address("TCP", "192.0.2.8", 1))
    assert other.replies()[0].startswith("220")
    third = Session(factory, peer=IPv4Address("TCP", "192.0.2.9", 1))
    assert third.replies()[0].startswith("421")
    third.protocol.connectionLost(None)
    assert factory.active == 2
    first.protocol.connectionLost(None)
    assert factory.active == 1
    again = Session(factory)
    assert again.replies()[0].startswith("220")


def test_sessions_and_messages_are_counted():
    factory = makeFactory(maxConnectionsPerIP=1, maxMessageSize=100)
    s = Session(factory)
    refused = Session(factory)
    refused.protocol.connectionLost(None)
    assert (factory.sessions, factory.refusedSessions, factory.active) == (1, 1, 1)
    s.replies()
    for body, code in [
        ("Subject: x\r\n\r\nok\r\n.\r\n", 250),
        ("Subject: x\r\n\r\nbare\nLF\r\n.\r\n", 554),
        ("x" * 200 + "\r\n.\r\n", 552),
    ]:
        transaction(s, body=body)
        assert s.codes() == [code]
    s.protocol.connectionLost(None)
    assert factory.active == 0 and factory.sessions == 1
    assert factory.messages == {"accepted": 1, "rejected": 2}
    failing = session(sink=MemorySink(failure=OSError(errno.ENOSPC, "full")))
    transaction(failing, body="Subject: x\r\n\r\nbody\r\n.\r\n")
    assert failing.codes() == [452]
    assert failing.factory.messages == {"deferred": 1}


# -- PROXY protocol ------------------------------------------------------------------


def proxiedSession(header, trusted=True, **kwargs):
    from ipaddress import ip_network

    factory = makeFactory(trusted=(ip_network("10.0.0.0/8"),) if trusted else (), **kwargs)
    s = Session(factory, peer=PROXY)
    return s, header


@pytest.mark.parametrize("encode", [encodeV1, encodeV2])
def test_proxy_header_from_a_trusted_proxy_names_the_client(encode):
    sink = MemorySink()
    s, _ = proxiedSession(None, sink=sink)
    assert s.replies() == []  # no greeting before the header
    real = IPv4Address("TCP", "198.51.100.20", 5555)
    header = encode(real, SERVER)
    s.send(header[:5])
    s.send(header[5:] + b"EHLO c\r\n")
    assert [r[:3] for r in s.replies()] == ["220", "250"]
    s.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n.\r\n")
    assert s.codes() == [250, 250, 354, 250]
    message = sink.committed[0]
    assert message.envelope.client == real
    assert b"([198.51.100.20])" in message.data


def test_proxy_header_is_required_from_a_trusted_proxy():
    s, _ = proxiedSession(None)
    s.send(b"EHLO c\r\n")
    assert s.transport.disconnected or s.closed
    assert s.replies() == []


def test_proxy_header_timeout():
    s, _ = proxiedSession(None, proxyTimeout=3)
    s.clock.advance(3)
    assert s.transport.disconnected


def test_proxy_header_from_an_untrusted_peer_is_just_a_bad_command():
    s, _ = proxiedSession(None, trusted=False)
    assert s.replies()[0].startswith("220")
    s.send(encodeV1(IPv4Address("TCP", "198.51.100.20", 5555), SERVER))
    assert s.codes() == [500]


def v2WithTLS(source, destination, version=b"TLSv1.3", cipher=b"TLS_AES_128_GCM_SHA256"):
    plainHeader = encodeV2(source, destination)
    sub = b"\x21" + len(version).to_bytes(2, "big") + version
    sub += b"\x23" + len(cipher).to_bytes(2, "big") + cipher
    ssl = b"\x20" + (5 + len(sub)).to_bytes(2, "big") + b"\x01" + b"\x00" * 4 + sub
    length = int.from_bytes(plainHeader[14:16], "big") + len(ssl)
    return plainHeader[:14] + length.to_bytes(2, "big") + plainHeader[16:] + ssl


def test_proxy_v2_tls_tlv():
    real = IPv4Address("TCP", "198.51.100.20", 5555)
    info = proxyTLSInfo(v2WithTLS(real, SERVER))
    assert info.version == "TLSv1.3" and info.cipher == "TLS_AES_128_GCM_SHA256" and info.upstream
    assert info.bits is None
    # the other cases (v1, LOCAL, truncated TLVs): tests/unit/test_proxyprotocol.py
    assert proxyTLSInfo(encodeV2(real, SERVER)) is None


def test_submissions_behind_a_proxy_that_terminated_tls():
    sink = MemorySink()
    s, _ = proxiedSession(None, mode="submissions", checker=Checker(), sink=sink)
    real = IPv4Address("TCP", "198.51.100.20", 5555)
    s.send(v2WithTLS(real, SERVER) + b"EHLO c\r\n")
    replies = s.replies()
    assert replies[0].startswith("220") and "AUTH PLAIN LOGIN" in replies[1]
    s.send("AUTH PLAIN " + plain("alice", "alicepw") + "\r\nMAIL FROM:<alice@example.test>\r\n")
    s.send("RCPT TO:<x@external.example>\r\nDATA\r\n.\r\n")
    assert s.codes() == [235, 250, 250, 354, 250]
    data = sink.committed[0].data
    assert b"(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 at a trusted proxy)" in data
    assert b"with ESMTPSA id" in data


def test_submissions_behind_a_proxy_without_tls_is_refused():
    s, _ = proxiedSession(None, mode="submissions", checker=Checker())
    s.send(encodeV2(IPv4Address("TCP", "198.51.100.20", 5555), SERVER))
    assert s.replies()[0].startswith("554 5.7.0")


# -- SMTPUTF8 -------------------------------------------------------------------------


def test_smtputf8():
    sink = MemorySink()
    s = session(sink=sink, policy=DomainPolicy(["b\u00fccher.example"]))
    s.cmd("EHLO c")
    assert s.cmd("MAIL FROM:<j\u00f6rg@b.example>").startswith("553 5.6.7")
    assert s.cmd("MAIL FROM:<j\u00f6rg@b.example> SMTPUTF8") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<\u00fcser@b\u00fccher.example>") == "250 2.1.5 Ok"
    assert s.cmd("RCPT TO:<user@xn--bcher-kva.example>") == "250 2.1.5 Ok"
    s.send("DATA\r\nSubject: \u00e4\r\n\r\n.\r\n")
    assert s.codes() == [354, 250]
    data = sink.committed[0].data
    assert b"with UTF8SMTP id" in data
    s.cmd("MAIL FROM:<a@b.example>")
    assert s.cmd("RCPT TO:<\u00fcser@b\u00fccher.example>").startswith("553 5.6.7")


def test_smtputf8_can_be_turned_off():
    s = session(smtputf8=False)
    assert "SMTPUTF8" not in s.cmd("EHLO c")
    assert s.cmd("MAIL FROM:<a@b.example> SMTPUTF8").startswith("555")


def test_invalid_utf8_command():
    s = session()
    s.send(b"EHLO \xff\xfe\r\n")
    assert s.codes() == [500]


def test_received_header_with_helo_junk_and_ipv6():
    sink = MemorySink()
    factory = makeFactory(sink=sink)
    s = Session(factory, peer=IPv6Address("TCP", "2001:db8::1", 1))
    s.send("EHLO (evil);x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<a@example.test>\r\n")
    s.send("RCPT TO:<b@example.test>\r\nDATA\r\n.\r\n")
    assert s.codes()[-1] == 250
    header = sink.committed[0].data.decode()
    assert header.startswith("Received: from ?evil??x ([IPv6:2001:db8::1])\r\n\tby ")
    assert "for <" not in header  # several recipients: none named
