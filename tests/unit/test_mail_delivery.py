"""Domain rules, the deliverer, the SMTP client, MX lookups, DKIM and Maildir."""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import random
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, error, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dcrouter.config.email import EmailSettings
from dcrouter.mail.delivery import (
    Deliverer,
    DomainRule,
    DomainRules,
    ForwardMode,
    IDeliveryMode,
    LocalMode,
    MtaMode,
    RejectMode,
)
from dcrouter.mail.deliveryclient import (
    SetupFailed,
    SMTPConnectionPool,
    SMTPTarget,
    encodeData,
    prepareData,
)
from dcrouter.mail.dkimsign import DkimError, fromDomain, loadKey, publicRecord, sign
from dcrouter.mail.mimeconvert import to7bit
from dcrouter.mail.mxresolver import DNSFailure, MXHost, MXResolver, Myself
from dcrouter.mail.policy import DomainPolicy
from dcrouter.mail.queue import DeliveryResult, Envelope, QueuedMessage, RecipientState
from dcrouter.mail.service import myself
from tests.unit.test_mail_queue import ManualPool, SyncPool, SyncReactor, failure, fired

MESSAGE = (
    b"From: Alice <alice@sender.example>\r\nTo: bob@rcpt.example\r\nSubject: hi\r\n\r\nHello.\r\n"
)


def queued(
    data=MESSAGE, sender=b"alice@sender.example", recipients=(b"bob@rcpt.example",), user=None
):
    message = QueuedMessage(
        queueId="0000000001ABCDEF01",
        envelope=Envelope(sender, tuple(recipients), authUser=user),
        arrival=0.0,
        path="/nonexistent",
        offset=0,
        size=len(data),
        recipients={r: RecipientState() for r in recipients},
    )
    message._cached = data
    return message


# -- rules -------------------------------------------------------------------------


def rule(pattern, mode="forward", **kwargs):
    return DomainRule(pattern=pattern, mode=mode, **kwargs)


def test_the_most_specific_rule_wins():
    rules = DomainRules(
        [
            rule("*.example.com", "mta"),
            rule("*.deep.example.com", "local"),
            rule("*@example.com", "forward"),
            rule("boss@example.com", "reject"),
            rule("other.example", "local"),
        ],
        default=rule("*", "mta"),
    )
    assert rules.match(b"boss@example.com").mode == "reject"
    assert rules.match(b"BOSS@Example.COM").mode == "reject"
    assert rules.match(b"staff@example.com").mode == "forward"
    assert rules.match(b"x@a.example.com").mode == "mta"
    assert rules.match(b"x@a.b.example.com").mode == "mta"  # any depth
    assert rules.match(b"x@a.deep.example.com").mode == "local"  # longer suffix
    assert rules.match(b"x@deep.example.com").mode == "mta"  # *.deep... is not deep... itself
    assert rules.match(b"x@other.example").mode == "local"
    assert rules.match(b"x@example.com.").mode == "forward"
    assert rules.match(b"x@notexample.com").pattern == "*"
    assert rules.match(b"postmaster").pattern == "*"
    # "boss" is boss (RFC 5321 4.1.2), as to the SMTP policy
    assert rules.match(b'"boss"@example.com').mode == "reject"
    assert rules.match(b'"bo\\ss"@example.com').mode == "reject"


def test_rules_match_an_idn_in_either_form_as_the_policy_does():
    """
    An internationalised domain is one name whether written in U-labels or
    A-labels, in the rule or in the address; the SMTP policy accepts both
    forms for a domain it serves, so the rule must take both as well.
    """
    rules = DomainRules(
        [rule("*@b\u00fccher.example", "local"), rule("*.xn--mnchen-3ya.example", "forward")],
        default=rule("*", "mta"),
    )
    assert rules.match("x@b\u00fccher.example".encode()).mode == "local"
    assert rules.match(b"x@xn--bcher-kva.example").mode == "local"
    assert rules.match("x@B\u00dcCHER.example".encode()).mode == "local"
    assert rules.match("x@a.m\u00fcnchen.example".encode()).mode == "forward"
    assert rules.match(b"x@a.xn--mnchen-3ya.example").mode == "forward"
    policy = DomainPolicy(["b\u00fccher.example"])
    assert policy.serves("xn--bcher-kva.example")
    with pytest.raises(ValueError, match="already defined"):
        DomainRules([rule("*@b\u00fccher.example"), rule("xn--bcher-kva.example")], rule("*"))


@pytest.mark.parametrize(
    "pattern",
    ["*example.com", "a*@example.com", "*@", "*@exa mple.com", "@example.com", "*.-x.com"],
)
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError):
        DomainRules([rule(pattern)], default=rule("*"))


def test_duplicate_patterns_are_refused():
    with pytest.raises(ValueError, match="already defined"):
        DomainRules([rule("*@a.example"), rule("A.example")], default=rule("*"))


def test_a_rule_checks_its_tls_value():
    with pytest.raises(ValueError):
        rule("*@a.example", tls="sometimes")


# -- the deliverer ---------------------------------------------------------------------


class RecordingMode:
    def __init__(self, name, perDomain=False, answer=None):
        self.name = name
        self.perDomain = perDomain
        self.calls = []
        self.answer = answer or (lambda recipients: [(250, "2.0.0 ok")] * len(recipients))

    def deliver(self, envelope, message, recipients, rule):
        self.calls.append((recipients, rule.pattern))
        return defer.succeed(self.answer(recipients))


def test_the_deliverer_groups_by_rule_and_domain():
    mta = RecordingMode("mta", perDomain=True)
    forward = RecordingMode("forward")
    rules = DomainRules([rule("*@relay.example", "forward")], default=rule("*", "mta"))
    deliverer = Deliverer(rules, [mta, forward], maxRecipients=2)
    recipients = (
        b"a@x.example",
        b"b@relay.example",
        b"c@y.example",
        b"d@x.example",
        b"e@x.example",
    )
    results = fired(deliverer.deliver(queued(recipients=recipients), recipients))
    assert set(results) == set(recipients)
    assert all(r == DeliveryResult(250, "2.0.0 ok") for r in results.values())
    assert sorted(mta.calls) == sorted(
        [
            ((b"a@x.example", b"d@x.example"), "*"),
            ((b"e@x.example",), "*"),
            ((b"c@y.example",), "*"),
        ]
    )
    assert forward.calls == [((b"b@relay.example",), "*@relay.example")]


def test_an_unknown_or_broken_mode_defers():
    def broken(recipients):
        raise RuntimeError("oops")

    rules = DomainRules([rule("*@broken.example", "broken")], default=rule("*", "nosuchmode"))
    deliverer = Deliverer(rules, [RecordingMode("broken", answer=broken)])
    results = fired(deliverer.deliver(queued(), (b"a@x.example", b"b@broken.example")))
    assert results[b"a@x.example"].code == 451 and "nosuchmode" in results[b"a@x.example"].text
    assert results[b"b@broken.example"].code == 451 and "oops" in results[b"b@broken.example"].text


def test_a_cancelled_attempt_keeps_what_was_delivered():
    """
    The queue cancels an attempt that takes too long, or when it stops: the
    recipients already delivered to stay delivered (else they get the
    message again at every retry), the others are deferred.
    """
    hanging = defer.Deferred()

    class Hanging(RecordingMode):
        def deliver(self, envelope, message, recipients, rule):
            return hanging

    rules = DomainRules([rule("*@slow.example", "slow")], default=rule("*", "m"))
    deliverer = Deliverer(rules, [RecordingMode("m"), Hanging("slow")])
    attempt = deliverer.deliver(queued(), (b"bob@x.example", b"carol@slow.example"))
    attempt.cancel()
    results = fired(attempt)
    assert results[b"bob@x.example"] == DeliveryResult(250, "2.0.0 ok")
    assert results[b"carol@slow.example"].code == 451
    assert "cancelled" in results[b"carol@slow.example"].text
    assert hanging.called  # cancelled, not left running


def test_a_short_answer_defers_the_rest():
    mode = RecordingMode("m", answer=lambda recipients: [(250, "ok")])
    deliverer = Deliverer(DomainRules([], default=rule("*", "m")), [mode])
    results = fired(deliverer.deliver(queued(), (b"a@x.example", b"b@x.example")))
    assert results[b"a@x.example"].code == 250 and results[b"b@x.example"].code == 451


def test_reject_mode_fails_with_the_rules_text():
    mode = RejectMode()
    verifyObject(IDeliveryMode, mode)
    results = fired(
        mode.deliver(
            Envelope(b"a@b", (b"c@d",)),
            queued(),
            (b"c@d",),
            rule("*", "reject", text="5.7.1 go away"),
        )
    )
    assert results == [DeliveryResult(550, "5.7.1 go away")]


def test_a_recipient_of_a_reject_rule_is_refused_at_rcpt_from_everyone():
    """Accepted, it would be bounced later to a sender anyone can forge (backscatter)."""
    from dcrouter.config.email import EmailRule
    from dcrouter.config.model import HostPort
    from dcrouter.mail.envelope import MailAddress, SMTPReply
    from dcrouter.mail.service import acceptedRecipients, domainRules

    settings = EmailSettings(hostname="mx.example.com", rules=(
        EmailRule("*@example.com", "forward", target=HostPort("10.0.0.1", 25)),
        EmailRule("noreply@example.com", "reject", text="5.1.1 nobody reads this"),
    ))  # fmt: skip
    policy = acceptedRecipients(settings, domainRules(settings))
    envelope = Envelope(b"victim@elsewhere.example", ())
    for local in ("noreply", "NoReply", '"noreply"'):
        for authenticated in (False, True):
            with pytest.raises(SMTPReply) as refused:
                policy.checkRecipient(envelope, MailAddress(local, "Example.COM"), authenticated)
            assert str(refused.value) == "550 5.1.1 nobody reads this"
    assert policy.checkRecipient(envelope, MailAddress("bob", "example.com"), False) is None
    # A reject rule without a text of its own (default_mode = reject) says why.
    rejecting = EmailSettings(hostname="mx.example.com", default_mode="reject")
    policy = acceptedRecipients(rejecting, domainRules(rejecting))
    with pytest.raises(SMTPReply) as refused:
        policy.checkRecipient(envelope, MailAddress("bob", "elsewhere.example"), True)
    assert str(refused.value) == "550 5.7.1 delivery to this address is not allowed"


# -- the SMTP client on a scripted server ------------------------------------------------


class ScriptedServer:
    """A tiny ESMTP server answering each command the client writes, at once."""

    def __init__(
        self, extensions=("PIPELINING", "SIZE 100000", "8BITMIME"), greeting=b"220 fake ESMTP"
    ):
        self.extensions = list(extensions)
        self.greeting = greeting
        self.commands = []
        self.messages = []
        self.connections = 0
        self.rcptReply = lambda address: b"250 2.1.5 ok"
        self.dataReply = b"250 2.0.0 queued"
        self.mailReply = b"250 2.1.0 ok"
        self.rsetReply = b"250 2.0.0 ok"
        self.silent = False


class ScriptedTransport(StringTransport):
    def __init__(self, server):
        super().__init__()
        self.server = server
        self.pending = b""
        self.inData = False
        self.mailOk = self.rcptOk = False
        self.data = b""
        self.closed = False

    def write(self, data):
        super().write(data)
        self.pending += data
        while not self.closed:
            if self.inData:
                end = self.pending.find(b"\r\n.\r\n")
                if end < 0 and self.pending != b".\r\n":
                    return
                if self.pending.startswith(b".\r\n"):
                    body, self.pending = b"", self.pending[3:]
                else:
                    body, self.pending = self.pending[: end + 2], self.pending[end + 5 :]
                self.inData = False
                self.server.messages.append(body)
                self.reply(self.server.dataReply)
                continue
            line, sep, rest = self.pending.partition(b"\r\n")
            if not sep:
                return
            self.pending = rest
            self.command(line)

    def command(self, line):
        server = self.server
        server.commands.append(line)
        verb = line.split(b" ")[0].upper().split(b":")[0]
        if server.silent:
            return
        if verb == b"EHLO":
            lines = [b"fake.example"] + [e.encode() for e in server.extensions]
            self.reply(b"\r\n".join(b"250-" + e for e in lines[:-1]) + b"\r\n250 " + lines[-1])
        elif verb == b"MAIL":
            self.mailOk = server.mailReply.startswith(b"250")
            self.rcptOk = False
            self.reply(server.mailReply)
        elif verb == b"RCPT":
            reply = server.rcptReply(line[8:]) if self.mailOk else b"503 need MAIL"
            self.rcptOk = self.rcptOk or reply.startswith(b"250")
            self.reply(reply)
        elif verb == b"DATA":
            accepted = self.mailOk and self.rcptOk
            self.reply(b"354 go ahead" if accepted else b"554 no valid recipients")
            self.inData = accepted
            self.mailOk = self.rcptOk = False
        elif verb in (b"RSET", b"NOOP"):
            self.mailOk = self.rcptOk = False
            self.reply(server.rsetReply if verb == b"RSET" else b"250 ok")
        elif verb == b"AUTH":
            self.reply(b"235 2.7.0 ok")
        elif verb == b"QUIT":
            self.reply(b"221 bye")
        else:
            self.reply(b"502 unknown")

    def reply(self, data):
        self.protocol.dataReceived(data + b"\r\n")

    def loseConnection(self):
        self.abortConnection()

    def abortConnection(self):
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(error.ConnectionDone()))


class ScriptedEndpoint:
    def __init__(self, server, refuse=False):
        self.server = server
        self.refuse = refuse

    def connect(self, factory):
        if self.refuse:
            return defer.fail(error.ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = ScriptedTransport(self.server)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.server.connections += 1
        protocol.dataReceived(self.server.greeting + b"\r\n")
        return defer.succeed(protocol)


def makePool(server, clock=None, refuse=False, threadpool=None, **kwargs):
    clock = clock or task.Clock()
    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=threadpool or SyncPool(),
        clock=clock,
        endpointFactory=lambda target: ScriptedEndpoint(server, refuse),
        **kwargs,
    )
    return pool, clock


TARGET = SMTPTarget("192.0.2.1", 25, tls="opportunistic", serverName="relay.test")


def test_encode_data_stuffs_dots_and_canonicalizes_line_ends():
    assert encodeData(b".a\r\nb\r\n.\r\n..c") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert encodeData(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n.\r\n"
    assert encodeData(b"") == b".\r\n"
    assert encodeData(b"x\n.\n") == b"x\r\n..\r\n.\r\n"


def test_a_pipelined_transaction_gives_per_recipient_results():
    server = ScriptedServer()
    server.rcptReply = lambda a: (
        b"550 5.1.1 no such user" if a.startswith(b"<nobody") else b"250 ok"
    )
    pool, clock = makePool(server)
    results = fired(
        pool.send(TARGET, b"a@s.example", [b"bob@r.example", b"nobody@r.example"], b".dot\r\n")
    )
    assert results == {
        b"bob@r.example": DeliveryResult(250, "2.0.0 queued", "relay.test"),
        b"nobody@r.example": DeliveryResult(550, "5.1.1 no such user", "relay.test"),
    }
    assert server.messages == [b"..dot\r\n"]
    mail = next(c for c in server.commands if c.startswith(b"MAIL"))
    assert mail == b"MAIL FROM:<a@s.example> SIZE=7"


def test_without_pipelining_commands_go_one_by_one():
    server = ScriptedServer(extensions=("SIZE",))
    pool, clock = makePool(server)
    results = fired(pool.send(TARGET, b"", [b"bob@r.example"], MESSAGE))
    assert results[b"bob@r.example"].code == 250
    assert b"MAIL FROM:<> SIZE=%d" % len(MESSAGE) in server.commands
    assert server.messages == [MESSAGE]


def test_connections_are_reused_and_closed_when_idle():
    server = ScriptedServer()
    pool, clock = makePool(server, idleTimeout=5)
    for _ in range(3):
        fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    assert server.connections == 1
    assert pool.stats == {"connections": 1, "transactions": 3, "reused": 2}
    assert server.commands.count(b"EHLO client.test") == 1
    clock.advance(5)
    assert server.commands[-1] == b"QUIT"
    fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    assert server.connections == 2


def test_a_refused_sender_gives_everyone_its_reply_and_resets():
    server = ScriptedServer()
    server.mailReply = b"553 5.7.1 sender rejected"
    pool, clock = makePool(server)
    results = fired(pool.send(TARGET, b"a@s.example", [b"b@r.example", b"c@r.example"], MESSAGE))
    assert {r.code for r in results.values()} == {553}
    assert server.messages == []
    assert b"RSET" in server.commands


def test_all_recipients_refused_sends_no_message():
    server = ScriptedServer()
    server.rcptReply = lambda a: b"450 4.2.1 mailbox busy"
    pool, clock = makePool(server)
    results = fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    assert results[b"b@r.example"] == DeliveryResult(450, "4.2.1 mailbox busy", "relay.test")
    assert server.messages == []


def test_a_refused_connection_is_a_setup_failure():
    pool, clock = makePool(ScriptedServer(), refuse=True)
    reason = failure(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    reason.trap(SetupFailed)
    assert reason.value.result.code == 421
    assert reason.value.result.text.startswith("4.4.1 connect to relay.test[192.0.2.1]:25")


def test_a_bad_greeting_is_a_setup_failure():
    pool, clock = makePool(ScriptedServer(greeting=b"554 go away"))
    reason = failure(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    reason.trap(SetupFailed)
    assert reason.value.result.code == 421 and "554 go away" in reason.value.result.text


def test_required_tls_without_starttls_is_refused():
    server = ScriptedServer()
    pool, clock = makePool(server)
    target = SMTPTarget("192.0.2.1", 25, tls="required")
    reason = failure(pool.send(target, b"a@s.example", [b"b@r.example"], MESSAGE))
    reason.trap(SetupFailed)
    assert (
        reason.value.result.text.startswith("4.7.4")
        and "TLS is required" in reason.value.result.text
    )
    assert not any(c.startswith(b"MAIL") for c in server.commands)


def test_no_password_goes_out_in_plain_text_unless_tls_is_off():
    server = ScriptedServer(extensions=("AUTH PLAIN LOGIN",))
    pool, clock = makePool(server)
    target = SMTPTarget("192.0.2.1", 25, tls="opportunistic", auth=("user", "secret"))
    failure(pool.send(target, b"a@s.example", [b"b@r.example"], MESSAGE)).trap(SetupFailed)
    assert not any(c.startswith(b"AUTH") for c in server.commands)
    target = SMTPTarget("192.0.2.1", 25, tls="off", auth=("user", "secret"))
    results = fired(pool.send(target, b"a@s.example", [b"b@r.example"], MESSAGE))
    assert results[b"b@r.example"].code == 250
    token = base64.b64encode(b"\0user\0secret")
    assert b"AUTH PLAIN " + token in server.commands


@implementer(ITLSTransport)
class ManualTLSTransport(StringTransport):
    """A transport the test answers for by hand; STARTTLS is only recorded."""

    tlsStarted = False

    def startTLS(self, contextFactory, normal=True):
        self.tlsStarted = True


class ManualEndpoint:
    def __init__(self):
        self.transport = ManualTLSTransport()
        self.protocol = None

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


def test_replies_injected_before_tls_are_not_read_as_replies_under_tls():
    """
    A man in the middle appends replies to the plaintext 220 for STARTTLS
    (STARTTLS response injection): they are thrown away, never taken as the
    answers to EHLO or the transaction sent under TLS.
    """
    endpoint = ManualEndpoint()
    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        tlsFactory=lambda name, verify: None,
        endpointFactory=lambda target: endpoint,
    )
    target = SMTPTarget("192.0.2.1", 25, tls="required")
    d = pool.send(target, b"a@s.example", [b"b@r.example"], MESSAGE)
    transport = endpoint.transport
    endpoint.protocol.dataReceived(b"220 relay ESMTP\r\n")
    endpoint.protocol.dataReceived(b"250-relay\r\n250 STARTTLS\r\n")
    assert transport.value().endswith(b"STARTTLS\r\n")
    transport.clear()
    injected = b"250-relay\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued"
    endpoint.protocol.dataReceived(b"220 2.0.0 ready\r\n" + injected + b"\r\n")
    assert transport.tlsStarted
    assert transport.value() == b"EHLO client.test\r\n"  # and waits for its real reply
    assert not d.called
    transport.clear()
    endpoint.protocol.dataReceived(b"250-relay\r\n250 PIPELINING\r\n")
    assert transport.value().startswith(b"MAIL FROM:<a@s.example>")
    endpoint.protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert not d.called
    endpoint.protocol.dataReceived(b"451 4.3.0 try later\r\n")
    assert fired(d)[b"b@r.example"].code == 451


class LingeringTransport(ScriptedTransport):
    """
    Closes as TCP does: after QUIT and loseConnection the connection stays
    up until the test says (the server's 221 and FIN are still on the way),
    and this connection's server answers nothing more.
    """

    quitting = False

    def command(self, line):
        if self.quitting or line == b"QUIT":
            self.server.commands.append(line)
            self.quitting = True
            return
        super().command(line)

    def loseConnection(self):
        self.quitting = True

    def finishClose(self):
        self.abortConnection()


class HeldEndpoint:
    """Connects when the test fires C{held}, with a L{LingeringTransport}."""

    def __init__(self, server):
        self.server = server
        self.transports = []
        self.held = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = LingeringTransport(self.server)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.server.connections += 1
        protocol.dataReceived(self.server.greeting + b"\r\n")
        d = defer.Deferred()
        self.held.append(lambda: d.callback(protocol))
        return d


def test_a_connection_whose_rset_is_refused_is_never_handed_on():
    """
    The client QUITs a connection whose RSET is refused; a message waiting
    for a connection to that target gets a new one, not the closing one
    (which would give it a spurious 4xx and a retry).
    """
    server = ScriptedServer()
    server.mailReply = b"553 5.7.1 sender rejected"
    server.rsetReply = b"500 5.5.1 what?"
    endpoint = HeldEndpoint(server)
    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        endpointFactory=lambda target: endpoint,
        maxPerTarget=1,
    )
    first = pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE)
    waiting = pool.send(TARGET, b"ok@s.example", [b"b@r.example"], MESSAGE)
    endpoint.held.pop()()
    assert fired(first)[b"b@r.example"].code == 553
    assert server.commands[-2:] == [b"RSET", b"QUIT"]
    assert not waiting.called and server.connections == 2  # a new connection for it
    server.mailReply = b"250 2.1.0 ok"
    endpoint.held.pop()()
    endpoint.transports[0].finishClose()
    assert fired(waiting)[b"b@r.example"] == DeliveryResult(250, "2.0.0 queued", "relay.test")


def test_a_connection_the_server_closes_with_421_is_not_reused():
    """RFC 5321 3.8: after a 421 the server closes; the next message gets a new connection."""
    server = ScriptedServer()
    server.dataReply = b"421 4.3.2 shutting down"
    endpoint = HeldEndpoint(server)
    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        endpointFactory=lambda target: endpoint,
    )
    first = pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE)
    endpoint.held.pop()()
    assert fired(first)[b"b@r.example"].code == 421
    assert server.commands[-1] == b"QUIT"
    server.dataReply = b"250 2.0.0 queued"
    second = pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE)
    assert server.connections == 2 and pool.stats["reused"] == 0
    endpoint.held.pop()()
    assert fired(second)[b"b@r.example"].code == 250


@contextlib.contextmanager
def unhandledErrors():
    """The "Unhandled error in Deferred" lines logged in the block (garbage collected at its end)."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        found: list[str] = []
        yield found
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    found += [formatEvent(e) for e in events if "Unhandled error" in formatEvent(e)]


def test_a_silent_server_times_out():
    """
    A pipelined transaction times out as a whole: one 421, and the replies
    that were not awaited leave no "Unhandled error in Deferred" in the log.
    """
    server = ScriptedServer()
    pool, clock = makePool(server, commandTimeout=30)
    with unhandledErrors() as logged:
        d = pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE)
        fired(d)  # prime a connection first
        server.silent = True
        d = pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE)
        assert not d.called
        clock.advance(30)
        result = fired(d)[b"b@r.example"]
        del d
    assert result.code == 421 and "timed out" in result.text
    assert logged == []


def test_connections_per_target_are_capped():
    server = ScriptedServer()
    server.silent = True
    pool, clock = makePool(server, maxPerTarget=2, commandTimeout=10)
    sends = [pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE) for _ in range(3)]
    assert server.connections == 2
    server.silent = False
    clock.advance(10)  # the two time out; the third gets a fresh connection
    assert server.connections == 3
    outcomes = [failure(d) if isinstance(d.result, Failure) else fired(d) for d in sends]
    assert [type(o).__name__ for o in outcomes] == ["Failure", "Failure", "dict"]
    assert all(o.check(SetupFailed) for o in outcomes[:2])


def test_a_utf8_address_is_not_sent_to_a_server_without_smtputf8():
    """RFC 6531 3.4: no UTF-8 in MAIL or RCPT unless the server offers SMTPUTF8."""
    server = ScriptedServer()
    pool, clock = makePool(server)
    recipient = "j\u00f6rg@r.example".encode()
    results = fired(pool.send(TARGET, b"a@s.example", [recipient], MESSAGE))
    assert results[recipient].code == 553 and results[recipient].text.startswith("5.6.7")
    assert not any(c.startswith((b"MAIL", b"RCPT")) for c in server.commands)
    server.extensions.append("SMTPUTF8")
    pool, clock = makePool(server)
    results = fired(pool.send(TARGET, b"a@s.example", [recipient], MESSAGE))
    assert results[recipient].code == 250
    assert any(c.endswith(b" SMTPUTF8") for c in server.commands if c.startswith(b"MAIL"))


def mailCommand(server):
    return next(c for c in server.commands if c.startswith(b"MAIL"))


def test_smtputf8_and_body_from_mail_are_passed_on_where_offered():
    """The MAIL parameters the message came with go to a next hop that offers them."""
    server = ScriptedServer(extensions=("PIPELINING", "8BITMIME", "SMTPUTF8"))
    pool, clock = makePool(server)
    results = fired(
        pool.send(
            TARGET, b"a@s.example", [b"b@r.example"], MESSAGE, smtputf8=True, body="8BITMIME"
        )
    )
    assert results[b"b@r.example"].code == 250
    assert mailCommand(server) == b"MAIL FROM:<a@s.example> BODY=8BITMIME SMTPUTF8"
    server = ScriptedServer(extensions=("PIPELINING", "8BITMIME"))
    pool, clock = makePool(server)
    fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE, body="7BIT"))
    assert mailCommand(server) == b"MAIL FROM:<a@s.example> BODY=7BIT"


def test_8bit_mail_is_converted_for_a_hop_without_8bitmime():
    """
    RFC 6152 3: no BODY= to a server that did not offer 8BITMIME, and the
    message goes as 7-bit MIME (quoted-printable), its header kept.
    """
    server = ScriptedServer(extensions=("PIPELINING",))
    pool, clock = makePool(server)
    data = MESSAGE + "gr\u00fc\u00dfe\r\n".encode()
    results = fired(
        pool.send(TARGET, b"a@s.example", [b"b@r.example"], data, smtputf8=True, body="8BITMIME")
    )
    assert results[b"b@r.example"].code == 250
    assert mailCommand(server) == b"MAIL FROM:<a@s.example>"  # an ASCII header needs no SMTPUTF8
    [sent] = server.messages
    labelled = MESSAGE.replace(
        b"\r\n\r\n",
        b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
    )
    assert sent == labelled + b"gr=C3=BC=C3=9Fe\r\n"
    server = ScriptedServer(extensions=("PIPELINING", "8BITMIME"))
    pool, clock = makePool(server)
    fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], data, body="8BITMIME"))
    assert server.messages == [data]  # where 8BITMIME is offered, as it came


def test_8bit_mail_is_converted_in_the_thread_pool():
    """
    About 30 ms a megabyte: on the reactor thread, converting a big message
    would stall every connection of the process. Nothing goes to the server
    before the pool has converted it.
    """
    server = ScriptedServer(extensions=("PIPELINING",))
    threads = ManualPool()
    pool, clock = makePool(server, threadpool=threads)
    data = MESSAGE + "gr\u00fc\u00dfe\r\n".encode()
    sending = pool.send(TARGET, b"a@s.example", [b"b@r.example"], data)
    [(_, function, args, kwargs)] = threads.held
    assert (function, args, kwargs) == (prepareData, (data, True), {})
    assert not sending.called
    assert not any(c.startswith(b"MAIL") for c in server.commands)
    threads.runAll()
    assert fired(sending)[b"b@r.example"].code == 250
    assert server.messages == [to7bit(data)]


def test_a_big_message_is_prepared_for_data_in_the_thread_pool():
    """
    Line ends and dots cost about 4 ms a megabyte: a message over 64 KiB is
    prepared in the pool; a small one on the reactor thread (a thread hop
    would cost more).
    """
    server = ScriptedServer(extensions=("PIPELINING", "8BITMIME"))
    threads = ManualPool()
    pool, clock = makePool(server, threadpool=threads)
    big = MESSAGE + b".dot\nbare line end\r\n" * 4000
    sending = pool.send(TARGET, b"a@s.example", [b"b@r.example"], big)
    [(_, function, args, kwargs)] = threads.held
    assert (function, args, kwargs) == (prepareData, (big, False), {})
    assert not any(c.startswith(b"MAIL") for c in server.commands)
    threads.runAll()
    assert fired(sending)[b"b@r.example"].code == 250
    assert server.messages == [encodeData(big)[: -len(b".\r\n")]]
    assert b"\r\n..dot\r\nbare line end\r\n" in server.messages[0]
    fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    assert threads.held == [] and server.messages[-1] == MESSAGE


def test_a_send_cancelled_while_converting_drops_the_connection():
    """The attempt's timeout cancels it: the connection, in mid-transaction, is not reused."""
    server = ScriptedServer(extensions=("PIPELINING",))
    threads = ManualPool()
    pool, clock = makePool(server, threadpool=threads)
    sending = pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE + b"\xe4\r\n")
    sending.cancel()
    failure(sending).trap(defer.CancelledError)
    threads.runAll()  # the conversion ends after all: nothing happens
    assert server.messages == [] and not any(c.startswith(b"MAIL") for c in server.commands)
    fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    assert server.connections == 2


def test_the_smtputf8_check_comes_before_any_conversion():
    """553 5.6.7 at once for mail that needs SMTPUTF8: nothing to convert for a bounce."""
    server = ScriptedServer(extensions=("PIPELINING",))
    threads = SyncPool()
    pool, clock = makePool(server, threadpool=threads)
    data = "Subject: gr\u00fc\u00dfe\r\n\r\nbody \u00e4\r\n".encode()
    results = fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], data, smtputf8=True))
    assert results[b"b@r.example"].text.startswith("5.6.7 SMTPUTF8 is required")
    assert threads.calls == 0


def test_8bit_mail_that_cannot_be_converted_fails_for_good():
    """8-bit bytes inside base64 data cannot go as 7-bit: 554 5.6.3, nothing sent."""
    server = ScriptedServer(extensions=("PIPELINING",))
    pool, clock = makePool(server)
    data = b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\nAAA\xc3\xa4\r\n"
    results = fired(pool.send(TARGET, b"a@s.example", [b"b@r.example", b"c@r.example"], data))
    for result in results.values():
        assert result.code == 554 and result.remote == "relay.test"
        assert result.text.startswith("5.6.3 conversion to 7bit is required, as relay.test")
        assert "8-bit data in a part encoded as base64" in result.text
    assert not any(c.startswith(b"MAIL") for c in server.commands)
    assert server.messages == []


def test_utf8_headers_stay_when_the_hop_offers_smtputf8_but_not_8bitmime():
    """Under SMTPUTF8 (RFC 6531) a UTF-8 header may go; the 8-bit body is still converted."""
    server = ScriptedServer(extensions=("PIPELINING", "SMTPUTF8"))
    pool, clock = makePool(server)
    data = "Subject: gr\u00fc\u00dfe\r\n\r\nbody \u00e4\r\n".encode()
    results = fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], data, smtputf8=True))
    assert results[b"b@r.example"].code == 250
    assert mailCommand(server) == b"MAIL FROM:<a@s.example> SMTPUTF8"
    [sent] = server.messages
    assert sent.startswith("Subject: gr\u00fc\u00dfe\r\nMIME-Version: 1.0\r\n".encode())
    assert sent.endswith(b"\r\n\r\nbody =C3=A4\r\n")


def test_a_message_that_needs_smtputf8_fails_for_good_at_a_hop_without_it():
    """
    Sent with SMTPUTF8 and a UTF-8 header: a server that does not offer
    SMTPUTF8 must not get it (553 5.6.7, as Postfix bounces it); without
    SMTPUTF8 in MAIL the same bytes go as they are, as Postfix sends them.
    """
    data = "From: J\u00f6rg <a@s.example>\r\n\r\nHi.\r\n".encode()
    server = ScriptedServer()
    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        endpointFactory=lambda t: ScriptedEndpoint(server),
    )
    mode = ForwardMode(pool, SyncReactor(), SyncPool())
    forwardRule = rule("*", "forward", server="smarthost.test", tls="off")
    envelope = Envelope(b"a@s.example", (b"b@r.example",), smtputf8=True)
    [result] = fired(mode.deliver(envelope, queued(data), (b"b@r.example",), forwardRule))
    assert result.code == 553 and result.text.startswith("5.6.7 SMTPUTF8 is required")
    assert not any(c.startswith(b"MAIL") for c in server.commands)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(data), (b"b@r.example",), forwardRule))
    assert result.code == 250 and server.messages == [data]


def test_an_oversized_message_fails_for_good():
    server = ScriptedServer(extensions=("SIZE 10",))
    pool, clock = makePool(server)
    results = fired(pool.send(TARGET, b"a@s.example", [b"b@r.example"], MESSAGE))
    assert results[b"b@r.example"].code == 552
    assert server.messages == []


def test_forward_mode_uses_the_rules_server():
    server = ScriptedServer()
    targets = []
    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        endpointFactory=lambda target: targets.append(target) or ScriptedEndpoint(server),
    )
    mode = ForwardMode(pool, SyncReactor(), SyncPool())
    verifyObject(IDeliveryMode, mode)
    forwardRule = rule("*", "forward", server="smarthost.test", port=2525, tls="off")
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    results = fired(mode.deliver(envelope, queued(), (b"b@r.example",), forwardRule))
    assert results == [DeliveryResult(250, "2.0.0 queued", "smarthost.test")]
    assert targets[0].host == "smarthost.test" and targets[0].port == 2525
    noServer = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "forward")))
    assert noServer[0].code == 451


# -- MX lookups -------------------------------------------------------------------------


class FakeResolver:
    def __init__(self, mx=None, a=None, aaaa=None, mxError=None, hostErrors=None):
        self.mx = mx or {}
        self.a = a or {}
        self.aaaa = aaaa or {}
        self.mxError = mxError
        self.hostErrors = hostErrors or {}  # name: the error of its address lookups

    @staticmethod
    def _answer(records):
        return defer.succeed((records, [], []))

    def lookupMailExchange(self, name):
        if self.mxError is not None:
            return defer.fail(self.mxError)
        records = [
            dns.RRHeader(name, dns.MX, payload=dns.Record_MX(preference, host))
            for preference, host in self.mx.get(name, [])
        ]
        return self._answer(records)

    def lookupAddress(self, name):
        if name in self.hostErrors:
            return defer.fail(self.hostErrors[name])
        if name not in self.a and name not in self.aaaa:
            return defer.fail(dnserror.DNSNameError(name))
        return self._answer(
            [dns.RRHeader(name, dns.A, payload=dns.Record_A(a)) for a in self.a.get(name, [])]
        )

    def lookupIPV6Address(self, name):
        if name in self.hostErrors:
            return defer.fail(self.hostErrors[name])
        if name not in self.a and name not in self.aaaa:
            return defer.fail(dnserror.DNSNameError(name))
        return self._answer(
            [
                dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(a))
                for a in self.aaaa.get(name, [])
            ]
        )


def test_mx_hosts_come_in_preference_order():
    resolver = FakeResolver(
        mx={"r.example": [(20, "b.r.example"), (10, "a.r.example"), (30, "gone.r.example")]},
        a={"a.r.example": ["192.0.2.1"], "b.r.example": ["192.0.2.2"]},
        aaaa={"a.r.example": ["2001:db8::1"]},
    )
    hosts = fired(MXResolver(resolver, rng=random.Random(1)).resolve("R.example"))
    assert [(h.name, h.addresses) for h in hosts] == [
        ("a.r.example", ("192.0.2.1", "2001:db8::1")),
        ("b.r.example", ("192.0.2.2",)),
        ("gone.r.example", ()),  # listed, for the loop check, without addresses
    ]


def test_without_mx_the_domain_is_its_own_mail_host():
    resolver = FakeResolver(a={"r.example": ["192.0.2.9"]})
    [host] = fired(MXResolver(resolver).resolve("r.example"))
    assert host.name == "r.example" and host.addresses == ("192.0.2.9",)


def test_an_idn_is_looked_up_under_the_name_the_rules_matched():
    """IDNA 2008 (UTS 46), as the policy and the rules: IDNA 2003 makes straße.de strasse.de."""
    resolver = FakeResolver(
        mx={"xn--strae-oqa.de": [(10, "mx.xn--strae-oqa.de")]},
        a={"mx.xn--strae-oqa.de": ["192.0.2.3"], "strasse.de": ["192.0.2.66"]},
    )
    [host] = fired(MXResolver(resolver).resolve("Stra\u00dfe.de."))
    assert host.name == "mx.xn--strae-oqa.de" and host.addresses == ("192.0.2.3",)
    reason = failure(MXResolver(resolver).resolve("bad..\u00e9xample"))
    assert reason.check(DNSFailure) and reason.value.permanent


def test_null_mx_and_missing_domains_fail_for_good():
    reason = failure(MXResolver(FakeResolver(mx={"r.example": [(0, "")]})).resolve("r.example"))
    assert reason.check(DNSFailure) and reason.value.permanent and "null MX" in str(reason.value)
    reason = failure(MXResolver(FakeResolver(mxError=dnserror.DNSNameError())).resolve("r.example"))
    assert reason.value.permanent
    reason = failure(MXResolver(FakeResolver()).resolve("r.example"))
    assert reason.value.permanent


def test_a_dns_server_failure_is_temporary():
    reason = failure(
        MXResolver(FakeResolver(mxError=dnserror.DNSServerError())).resolve("r.example")
    )
    assert not reason.value.permanent and str(reason.value).startswith("4.4.3")


def test_address_literals_need_no_dns():
    [host] = fired(MXResolver(FakeResolver()).resolve("[192.0.2.5]"))
    assert host.addresses == ("192.0.2.5",)
    [host] = fired(MXResolver(FakeResolver()).resolve("[IPv6:2001:db8::5]"))
    assert host.addresses == ("2001:db8::5",)


def test_mta_mode_tries_the_next_host_when_one_is_down():
    resolver = FakeResolver(
        mx={"r.example": [(10, "a.r.example"), (20, "b.r.example")]},
        a={"a.r.example": ["192.0.2.1"], "b.r.example": ["192.0.2.2"]},
    )
    server = ScriptedServer()
    tried = []

    def endpoint(target):
        tried.append((target.host, target.port, target.serverName))
        return ScriptedEndpoint(server, refuse=target.host == "192.0.2.1")

    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        endpointFactory=endpoint,
    )
    mode = MtaMode(pool, MXResolver(resolver), SyncReactor(), SyncPool(), port=2525)
    verifyObject(IDeliveryMode, mode)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    results = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert results == [DeliveryResult(250, "2.0.0 queued", "b.r.example")]
    assert tried == [("192.0.2.1", 2525, "a.r.example"), ("192.0.2.2", 2525, "b.r.example")]


def loopMode(resolver, tried, **myself):
    def endpoint(target):
        tried.append(target.serverName)
        return ScriptedEndpoint(ScriptedServer(), refuse=target.host == "192.0.2.2")

    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        endpointFactory=endpoint,
    )
    me = Myself(**{"names": {"mx.me.example"}, "addresses": ("198.51.100.1",), **myself})
    return MtaMode(pool, MXResolver(resolver), SyncReactor(), SyncPool(), myself=me)


@pytest.mark.parametrize(
    "mx, a",
    [
        ([(10, "mx.me.example")], {"mx.me.example": ["203.0.113.9"]}),  # my name
        ([(10, "mx.r.example")], {"mx.r.example": ["198.51.100.1"]}),  # my address
        ([(10, "mx.r.example")], {"mx.r.example": ["127.0.0.1"]}),  # loopback
        ([], {"r.example": ["198.51.100.1"]}),  # no MX: the domain's own address
    ],
)
def test_mail_whose_best_mx_is_this_server_loops_back_to_myself(mx, a):
    """Postfix's check: fail for good at once, not after 50 hops round the loop."""
    tried = []
    mode = loopMode(FakeResolver(mx={"r.example": mx}, a=a), tried)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result == DeliveryResult(554, "5.4.6 mail for r.example loops back to myself")
    assert tried == []


def test_a_backup_mx_sends_only_to_more_preferred_hosts():
    resolver = FakeResolver(
        mx={"r.example": [(10, "a.r.example"), (20, "mx.me.example"), (30, "c.r.example")]},
        a={
            "a.r.example": ["192.0.2.2"],
            "mx.me.example": ["198.51.100.1"],
            "c.r.example": ["192.0.2.3"],
        },
    )
    tried = []
    mode = loopMode(resolver, tried)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result.code == 421  # the primary is down: wait for it, never a less preferred host
    assert tried == ["a.r.example"]


@pytest.mark.parametrize(
    "primary",
    [
        {},  # the primary's name does not exist
        {"a": {"a.r.example": []}},  # it exists without addresses
        {"hostErrors": {"a.r.example": dnserror.DNSServerError()}},  # its DNS fails
    ],
)
def test_a_backup_mx_waits_when_no_more_preferred_host_has_an_address(primary):
    """
    Postfix's smtp_addr.c: this server is an MX host, and the hosts more
    preferred than it have no address (now): the mail waits for them (4.4.4),
    it does not loop back (5.4.6, for good) nor go to a less preferred host.
    """
    resolver = FakeResolver(
        mx={"r.example": [(10, "a.r.example"), (20, "mx.me.example"), (30, "c.r.example")]},
        a={"mx.me.example": ["198.51.100.1"], "c.r.example": ["192.0.2.3"]},
    )
    for key, value in primary.items():
        getattr(resolver, key).update(value)
    tried = []
    mode = loopMode(resolver, tried)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result == DeliveryResult(451, "4.4.4 unable to find primary relay for r.example")
    assert tried == []


def test_a_backup_mx_sends_to_the_more_preferred_hosts_that_have_addresses():
    resolver = FakeResolver(
        mx={
            "r.example": [(10, "gone.r.example"), (15, "b.r.example"), (20, "mx.me.example")]
        },
        a={"b.r.example": ["192.0.2.4"], "mx.me.example": ["198.51.100.1"]},
    )
    tried = []
    mode = loopMode(resolver, tried)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result.code == 250 and tried == ["b.r.example"]


def test_hosts_as_preferred_as_this_server_do_not_make_it_a_backup():
    """An equal preference without addresses: this server is a best MX (Postfix: 5.4.6)."""
    resolver = FakeResolver(
        mx={"r.example": [(10, "gone.r.example"), (10, "mx.me.example")]},
        a={"mx.me.example": ["198.51.100.1"]},
    )
    tried = []
    mode = loopMode(resolver, tried)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result == DeliveryResult(554, "5.4.6 mail for r.example loops back to myself")


def test_a_host_without_addresses_is_not_this_server_by_its_name():
    """
    As before hosts without addresses were listed: Postfix finds itself by
    address, and mail cannot reach a name without one.
    """
    resolver = FakeResolver(
        mx={"r.example": [(10, "mx.me.example"), (20, "c.r.example")]},
        a={"c.r.example": ["192.0.2.3"]},
    )
    tried = []
    mode = loopMode(resolver, tried)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result.code == 250 and tried == ["c.r.example"]


def test_this_server_on_another_port_is_another_server():
    tried = []
    resolver = FakeResolver(
        mx={"r.example": [(10, "mx.r.example")]}, aaaa={"mx.r.example": ["::1"]}
    )
    mode = loopMode(resolver, tried, ports={587})
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result.code == 250 and tried == ["mx.r.example"]


def test_the_mail_service_knows_itself_by_hostname_bind_address_and_mail_ports():
    settings = EmailSettings(hostname="mx.me.example", ports=(25, 587))
    me = myself(settings, ("0.0.0.0", "198.51.100.1", "2001:db8::1"))
    assert me.isMe(MXHost("MX.me.example.", 10, ("192.0.2.1",)), 25)
    assert me.isMe(MXHost("other.example", 10, ("2001:db8::1",)), 25)
    assert me.isMe(MXHost("other.example", 10, ("::ffff:198.51.100.1",)), 25)
    assert not me.isMe(MXHost("other.example", 10, ("192.0.2.1",)), 25)
    assert not me.isMe(MXHost("mx.me.example", 10, ("198.51.100.1",)), 2525)


def test_the_addresses_it_is_reached_at_through_a_proxy_or_nat_are_its_own():
    # Postfix's proxy_interfaces: a public address forwarded to this server.
    settings = EmailSettings(
        hostname="mx.me.example", proxy_interfaces=("203.0.113.5", "::ffff:203.0.113.6")
    )
    me = myself(settings, ("10.0.0.5",))
    assert me.isMe(MXHost("mx.r.example", 10, ("203.0.113.5",)), 25)
    assert me.isMe(MXHost("mx.r.example", 10, ("203.0.113.6",)), 25)
    assert me.isMe(MXHost("mx.r.example", 10, ("10.0.0.5",)), 25)
    assert not me.isMe(MXHost("mx.r.example", 10, ("203.0.113.7",)), 25)
    assert not myself(EmailSettings(hostname="mx.me.example"), ("10.0.0.5",)).isMe(
        MXHost("mx.r.example", 10, ("203.0.113.5",)), 25
    )


def test_mta_mode_bounces_a_domain_that_does_not_exist():
    pool = SMTPConnectionPool(
        SyncReactor(), "client.test", threadpool=SyncPool(), clock=task.Clock()
    )
    mode = MtaMode(
        pool, MXResolver(FakeResolver(mxError=dnserror.DNSNameError())), SyncReactor(), SyncPool()
    )
    envelope = Envelope(b"a@s.example", (b"b@nowhere.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@nowhere.example",), rule("*", "mta")))
    assert result.code == 550 and result.text.startswith("5.1.2")


# -- DKIM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsaPEM():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_dkim_signatures_verify_against_the_published_key(rsaPEM):
    key = loadKey(rsaPEM, "sel1")
    record = publicRecord(key).encode()
    looked = []

    def dnsfunc(name, timeout=5):
        looked.append(name)
        return record if name == b"sel1._domainkey.sender.example." else None

    signed = sign(MESSAGE, key)
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(MESSAGE)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert looked == [b"sel1._domainkey.sender.example."]
    assert not dkim.verify(signed.replace(b"Hello.", b"Hullo."), dnsfunc=dnsfunc)
    # From is signed once more than it is there: a From added later breaks it.
    header = re.match(rb"DKIM-Signature: (.*?)\r\n(?![ \t])", signed, re.DOTALL)[1]
    listed = re.search(rb"h=([^;]*)", re.sub(rb"\s+", b"", header))[1].split(b":")
    assert listed[:3] == [b"from", b"from", b"to"]


def test_dkim_uses_the_configured_domain(rsaPEM):
    key = loadKey(rsaPEM, "s", domain="signer.example")
    signed = sign(MESSAGE, key)
    assert b"d=signer.example" in signed
    record = publicRecord(key).encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)


def test_dkim_needs_a_domain_and_an_rsa_key(rsaPEM):
    with pytest.raises(DkimError):
        sign(b"Subject: no from\r\n\r\nx\r\n", loadKey(rsaPEM, "s"))
    with pytest.raises(DkimError):
        loadKey(b"not a key", "s")
    ecKey = ec.generate_private_key(ec.SECP256R1())
    pem = ecKey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(DkimError, match="RSA"):
        loadKey(pem, "s")


def test_from_domain_reads_folded_headers():
    assert (
        fromDomain(b'Subject: x\r\nFrom: "A, B"\r\n <a@Example.ORG>\r\n\r\nFrom: x@y\r\n')
        == "example.org"
    )
    assert fromDomain(b"Subject: x\r\n\r\n") is None


def test_forward_mode_signs_what_a_user_submitted_when_the_rule_has_a_key(rsaPEM):
    server = ScriptedServer()
    pool, clock = makePool(server)
    mode = ForwardMode(pool, SyncReactor(), SyncPool())
    key = loadKey(rsaPEM, "sel1")
    signing = rule("*", "forward", server="smarthost.test", tls="off", dkim=key)
    envelope = Envelope(b"a@s.example", (b"b@r.example",), authUser="alice")
    fired(mode.deliver(envelope, queued(user="alice"), (b"b@r.example",), signing))
    [sent] = server.messages
    record = publicRecord(key).encode()
    assert dkim.verify(sent, dnsfunc=lambda name, timeout=5: record)


@pytest.mark.parametrize("extensions", [("PIPELINING",), ("PIPELINING", "8BITMIME")])
def test_8bit_mail_is_converted_before_it_is_signed(rsaPEM, extensions):
    """
    RFC 6376 5.3: signed as 7-bit MIME, the signature holds at a hop without
    8BITMIME (the client has nothing left to convert) and at any later one.
    """
    server = ScriptedServer(extensions=extensions)
    pool, clock = makePool(server)
    mode = ForwardMode(pool, SyncReactor(), SyncPool())
    key = loadKey(rsaPEM, "sel1")
    signing = rule("*", "forward", server="smarthost.test", tls="off", dkim=key)
    data = MESSAGE + "gr\u00fc\u00dfe\r\n".encode()
    envelope = Envelope(b"a@s.example", (b"b@r.example",), authUser="alice", body="8BITMIME")
    [result] = fired(mode.deliver(envelope, queued(data, user="alice"), (b"b@r.example",), signing))
    assert result.code == 250
    [sent] = server.messages
    assert sent.isascii() and sent.endswith(b"\r\n\r\nHello.\r\ngr=C3=BC=C3=9Fe\r\n")
    record = publicRecord(key).encode()
    assert dkim.verify(sent, dnsfunc=lambda name, timeout=5: record)


def test_mail_from_anyone_else_is_not_signed(rsaPEM):
    """
    A stranger's message to a served domain, relayed through a signing rule,
    goes on as it came: signed, its forged C{From:} would pass DMARC.
    """
    server = ScriptedServer()
    pool, clock = makePool(server)
    mode = ForwardMode(pool, SyncReactor(), SyncPool())
    signing = rule("*", "forward", server="smarthost.test", tls="off",
                   dkim=loadKey(rsaPEM, "sel1", "example.org"))  # fmt: skip
    forged = MESSAGE.replace(b"From: ", b"From: ceo@example.org\r\nX-Was: ", 1)
    envelope = Envelope(b"x@stranger.example", (b"b@example.org",))
    fired(mode.deliver(envelope, queued(forged), (b"b@example.org",), signing))
    [sent] = server.messages
    assert b"DKIM-Signature" not in sent


# -- Maildir ---------------------------------------------------------------------------------


def test_local_mode_writes_maildir_files(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000.25)
    mode = LocalMode(str(tmp_path / "maildir"), SyncReactor(), SyncPool(), clock, "mx.test")
    verifyObject(IDeliveryMode, mode)
    recipients = (b"Bob@R.example", b"../etc@r.example", b"carol@r.example")
    envelope = Envelope(b"a@s.example", recipients)
    results = fired(
        mode.deliver(envelope, queued(recipients=recipients), recipients, rule("*", "local"))
    )
    assert [r.code for r in results] == [250, 550, 250]
    bob = tmp_path / "maildir" / "r.example" / "bob"
    assert os.listdir(bob / "tmp") == [] and os.listdir(bob / "cur") == []
    [name] = os.listdir(bob / "new")
    assert name.startswith("1700000000.M250000P")
    data = (bob / "new" / name).read_bytes()
    assert data == b"Return-Path: <a@s.example>\r\nDelivered-To: Bob@R.example\r\n" + MESSAGE
    assert not (tmp_path / "maildir" / "etc").exists()


def test_one_mailbox_whatever_form_the_address_takes(tmp_path):
    """A quoted local part, an IDN in either form: the same maildir."""
    mode = LocalMode(str(tmp_path / "maildir"), SyncReactor(), SyncPool(), task.Clock(), "mx.test")
    assert (
        mode.mailbox(b'"Bob"@xn--bcher-kva.example')
        == mode.mailbox("bob@b\u00fccher.example".encode())
        == str(tmp_path / "maildir" / "xn--bcher-kva.example" / "bob")
    )
    assert mode.mailbox(b'"../x"@r.example') is None
