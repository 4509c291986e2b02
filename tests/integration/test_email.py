"""
The mail edge under one DcRouter: public ports routed (with PROXY v2) to the
internal SMTP listeners, the queue, and a forward rule to a sink server.
"""

from __future__ import annotations

import smtplib
import ssl

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver

from dcrouter.auth.passwords import hashPassword
from dcrouter.config import loadConfig
from dcrouter.service import DcRouter
from tests.helpers import freePort, listen


class Sink(LineReceiver):
    """A minimal SMTP server that keeps every message it is given."""

    delimiter = b"\r\n"

    def connectionMade(self):
        self.data = None
        self.sendLine(b"220 sink ESMTP")

    def lineReceived(self, line):
        if self.data is not None:
            if line == b".":
                self.factory.messages.append(b"\r\n".join(self.data))
                self.data = None
                self.sendLine(b"250 2.0.0 kept")
            else:
                self.data.append(line[1:] if line.startswith(b"..") else line)
            return
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            self.sendLine(b"250 sink")
        elif verb == b"DATA":
            self.data = []
            self.sendLine(b"354 go on")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")


async def startMailEdge(tmp_path, extra=""):
    factory = protocol.ServerFactory.forProtocol(Sink)
    factory.messages = []
    sink = await listen(factory)
    mx, submission, submissions = freePort(), freePort(), freePort()
    path = tmp_path / "dcrouter.ini"
    path.write_text(f"""
[dcrouter]
state_dir = {tmp_path}/state
drain_timeout = 0

[defaults]
bind = 127.0.0.1

[email]
hostname = mx.example.test
ports = {mx}, {submission}, {submissions}
internal_ports = {freePort()}, {freePort()}, {freePort()}
submission_ports = {submission}
submissions_ports = {submissions}
domains = example.test
auth = static
users = alice:{hashPassword("alicepw", cost=4)}
default_mode = forward
default_server = 127.0.0.1:{sink.getHost().port}
default_tls = off
""" + extra)
    service = DcRouter(loadConfig(str(path)))
    service.startService()
    service.submissions = submissions
    return service, sink, factory.messages, mx, submission


async def waitFor(messages, count):
    for _ in range(400):
        if len(messages) >= count:
            return
        await task.deferLater(reactor, 0.025, lambda: None)
    raise AssertionError(f"{len(messages)} of {count} messages arrived")


def sendFrom(source, port, recipient, login=None, sender="sender@client.test"):
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as client:
        client.ehlo("client.test")
        if login:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo("client.test")
            client.login(*login)
        return client.sendmail(sender, [recipient], b"Subject: hi\r\n\r\nhello\r\n")


@pytest_twisted.ensureDeferred
async def test_mail_reaches_the_rule_with_the_real_client_address(tmp_path):
    service, sink, messages, mx, submission = await startMailEdge(tmp_path)
    try:
        await deferToThread(sendFrom, "127.0.0.2", mx, "bob@example.test")
        await waitFor(messages, 1)
        (message,) = messages
        assert b"hello" in message
        received = [line for line in message.split(b"\r\n") if line.startswith(b"Received:")]
        assert received and b"127.0.0.2" in received[0], received
    finally:
        await service.stopService()
        await sink.stopListening()


@pytest_twisted.ensureDeferred
async def test_no_open_relay_but_users_may_relay(tmp_path):
    service, sink, messages, mx, submission = await startMailEdge(tmp_path)
    try:
        refused = await deferToThread(_refused, mx, "carol@elsewhere.test")
        assert refused.startswith("55"), refused
        await deferToThread(sendFrom, "127.0.0.1", submission, "carol@elsewhere.test",
                            ("alice", "alicepw"), "Alice@example.test")
        await waitFor(messages, 1)
    finally:
        await service.stopService()
        await sink.stopListening()


@pytest_twisted.ensureDeferred
async def test_users_send_only_as_themselves_and_what_senders_gives_them(tmp_path):
    service, sink, messages, mx, submission = await startMailEdge(
        tmp_path, "senders =\n    alice: *@client.test, billing@example.test\n"
    )
    login = ("alice", "alicepw")
    try:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await deferToThread(sendFrom, "127.0.0.1", submission, "carol@elsewhere.test",
                                login, "bob@example.test")
        assert refused.value.smtp_code == 553
        assert b"not owned by user alice" in refused.value.smtp_error
        for sender in ("alice@example.test", "anyone@client.test", "Billing@Example.test"):
            await deferToThread(sendFrom, "127.0.0.1", submission, "carol@elsewhere.test",
                                login, sender)
        await waitFor(messages, 3)
    finally:
        await service.stopService()
        await sink.stopListening()


def _refused(port, recipient):
    try:
        sendFrom("127.0.0.1", port, recipient)
    except smtplib.SMTPRecipientsRefused as e:
        code, text = e.recipients[recipient]
        return f"{code} {text.decode()}"
    return "accepted"


@pytest_twisted.ensureDeferred
async def test_dkim_keys_are_published_in_dcrouters_own_zone(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from twisted.names import client, dns

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "dkim.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))
    dnsPort = freePort()
    path = tmp_path / "dcrouter.ini"
    path.write_text(f"""
[dcrouter]
state_dir = {tmp_path}/state
[defaults]
bind = 127.0.0.1
[dns]
listen = 127.0.0.1:{dnsPort}
[dns.zone:example.test]
records =
    @ A 127.0.0.1
[email]
hostname = mx.example.test
ports = {freePort()}
internal_ports = {freePort()}
default_mode = reject
[email.rule:*@example.test]
mode = local
dkim_selector = s1
dkim_key = dkim.key
dkim_domain = example.test
""")
    service = DcRouter(loadConfig(str(path)))
    service.startService()
    try:
        resolver = client.Resolver(servers=[("127.0.0.1", dnsPort)], reactor=reactor)
        answers, _, _ = await resolver.lookupText("s1._domainkey.example.test", timeout=(2,))
        (record,) = [a.payload for a in answers if a.type == dns.TXT]
        assert b"".join(record.data).startswith(b"v=DKIM1; k=rsa; p=")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_mail_and_dns_metrics(tmp_path):
    from tests.integration.test_admin import fetch

    admin = freePort()
    service, sink, messages, mx, submission = await startMailEdge(
        tmp_path, f"[admin]\nlisten = 127.0.0.1:{admin}\n"
    )
    try:
        await deferToThread(sendFrom, "127.0.0.1", mx, "bob@example.test")
        await waitFor(messages, 1)
        status, body = await fetch(admin, b"/metrics")
        text = body.decode()
        assert 'dcrouter_mail_events_total{event="accepted"} 1.0' in text
        assert "dcrouter_mail_queue_messages" in text
        assert f'dcrouter_smtp_sessions_total{{mode="mx",port="{mx}"}} 1.0' in text
        assert f'dcrouter_smtp_sessions_total{{mode="submission",port="{submission}"}} 0.0' in text
        assert (f'dcrouter_smtp_messages_total{{mode="mx",port="{mx}",result="accepted"}} 1.0'
                in text)
        assert f'dcrouter_smtp_sessions_active{{mode="mx",port="{mx}"}}' in text
    finally:
        await service.stopService()
        await sink.stopListening()


CAPTURE_MODE = '''
from twisted.internet.defer import succeed
from twisted.plugin import IPlugin
from zope.interface import implementer
from dcrouter.interfaces import IDeliveryMode
from dcrouter.mail.queue import DeliveryResult

DELIVERED = []

@implementer(IPlugin, IDeliveryMode)
class Capture:
    name = "capture"
    perDomain = False

    def deliver(self, envelope, message, recipients, rule):
        DELIVERED.extend(recipients)
        return succeed([DeliveryResult(250, "captured") for _ in recipients])

capture = Capture()
'''


@pytest_twisted.ensureDeferred
async def test_a_delivery_mode_plugin_delivers_by_rule(tmp_path, monkeypatch):
    import importlib

    import dcrouter.plugins

    plugins = tmp_path / "plugins" / "dcrouter" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "test_capture_mode.py").write_text(CAPTURE_MODE)
    monkeypatch.setattr(dcrouter.plugins, "__path__", [*dcrouter.plugins.__path__, str(plugins)])
    service, sink, messages, mx, submission = await startMailEdge(
        tmp_path, "[email.rule:*@captured.test]\nmode = capture\n"
    )
    try:
        await deferToThread(sendFrom, "127.0.0.1", mx, "eve@captured.test")
        module = importlib.import_module("dcrouter.plugins.test_capture_mode")
        for _ in range(200):
            if module.DELIVERED:
                break
            await task.deferLater(reactor, 0.025, lambda: None)
        assert module.DELIVERED == [b"eve@captured.test"]
    finally:
        await service.stopService()
        await sink.stopListening()


def test_an_unknown_delivery_mode_is_a_config_error(tmp_path):
    import pytest

    from dcrouter.compile import checkConfigFile
    from dcrouter.config import ConfigErrors

    path = tmp_path / "dcrouter.ini"
    path.write_text("[email]\nhostname = mx.example.test\nports = 2525\n"
                    "[email.rule:*@a.test]\nmode = pigeon\n")
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    assert "[email.rule:*@a.test] mode: unknown delivery mode 'pigeon'" in caught.value.report()


@pytest_twisted.ensureDeferred
async def test_dcrouter_queue_lists_flushes_and_deletes_over_the_admin_socket(tmp_path):
    import json as jsonlib
    import os
    import stat
    import subprocess
    import sys

    service, sink, messages, mx, submission = await startMailEdge(tmp_path)
    await sink.stopListening()  # the forward target is down: the mail waits

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "dcrouter", "queue", str(tmp_path / "dcrouter.ini"), *args],
            capture_output=True, text=True, timeout=30,
        )

    try:
        socketPath = tmp_path / "state" / "admin.sock"
        assert stat.S_ISSOCK(os.stat(socketPath).st_mode)
        assert stat.S_IMODE(os.stat(socketPath).st_mode) == 0o600
        await deferToThread(sendFrom, "127.0.0.1", mx, "bob@example.test")
        listing = await deferToThread(run)
        assert listing.returncode == 0, listing.stderr
        (line,) = listing.stdout.splitlines()
        queueId = jsonlib.loads(line)["id"]
        flushed = await deferToThread(run, "flush", queueId)
        assert "message(s) to be tried now" in flushed.stdout, flushed.stderr
        deleted = await deferToThread(run, "delete", queueId)
        assert "1 of 1 message(s) deleted" in deleted.stdout, deleted.stderr
        assert (await deferToThread(run)).stdout.strip() == "the queue is empty"
        overTCP = await deferToThread(run, "--user", "ops")
        assert overTCP.returncode == 1 and "no [admin] listen" in overTCP.stderr
    finally:
        await service.stopService()
    assert not socketPath.exists()


def sendOverImplicitTLS(port, recipient, login):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) as client:
        client.ehlo("client.test")
        client.login(*login)
        return client.sendmail("alice@example.test", [recipient], b"Subject: tls\r\n\r\nover 465\r\n")


@pytest_twisted.ensureDeferred
async def test_port_465_tls_is_terminated_by_the_router(tmp_path):
    service, sink, messages, mx, submission = await startMailEdge(tmp_path)
    try:
        route = service.compiled.tables[service.submissions].routes[0].config
        assert (route.name, route.tls) == (f"email-{service.submissions}", "terminate")
        await deferToThread(sendOverImplicitTLS, service.submissions, "carol@elsewhere.test",
                            ("alice", "alicepw"))
        await waitFor(messages, 1)
        (message,) = messages
        head = message.split(b"\r\n\r\n", 1)[0]
        assert b"ESMTPSA" in head and b"TLS" in head, head
    finally:
        await service.stopService()
        await sink.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_reload_that_only_moves_email_keys_does_not_say_email_changed(tmp_path):
    """Where a key is written (its line) is no change: the warning is for changes."""
    from twisted.logger import formatEvent, globalLogPublisher

    service, sink, messages, mx, submission = await startMailEdge(tmp_path)
    path = tmp_path / "dcrouter.ini"
    service.configPath = str(path)
    path.write_text("# a comment moves every line down\n" + path.read_text())
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert service.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
        await service.stopService()
        await sink.stopListening()
    assert [formatEvent(e) for e in events if "changed" in formatEvent(e)] == []


def test_a_rule_for_one_address_accepts_that_address_only():
    from dcrouter.config.email import EmailRule, EmailSettings
    from dcrouter.mail.service import acceptedRecipients

    settings = EmailSettings(hostname="mx.example.test", rules=(
        EmailRule("alice@partner.test", "forward"),
        EmailRule("*@whole.test", "local"),
        EmailRule("*.sub.test", "local"),
        EmailRule("*@refused.test", "reject"),
    ))  # fmt: skip
    policy = acceptedRecipients(settings)
    assert policy.domains == {"mx.example.test", "whole.test", "*.sub.test"}
    assert policy.addresses == {"alice@partner.test"}
