"""
The mail queue and delivery on the real reactor, with real fsyncs and peers:
smtp-sink (Debian's postfix package), a process killed with SIGKILL while it
accepts mail, a tmpfs that fills up, a TLS server of the test's own.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import dkim
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.threadpool import ThreadPool

from dcrouter.mail.delivery import Deliverer, DomainRule, DomainRules, ForwardMode, MtaMode
from dcrouter.mail.deliveryclient import SMTPConnectionPool
from dcrouter.mail.dkimsign import loadKey, publicRecord
from dcrouter.mail.mxresolver import MXResolver
from dcrouter.mail.queue import PENDING, Envelope, MailQueue, QueueFull, RetrySchedule
from tests.helpers import freePort
from tests.unit.test_mail_delivery import FakeResolver

SMTP_SINK = "/usr/sbin/smtp-sink"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def message(tag, size=0):
    return (
        f"From: Alice <alice@sender.example>\r\nTo: bob@rcpt.example\r\n"
        f"Subject: test {tag}\r\nMessage-ID: <{tag}@sender.example>\r\nX-Test-Id: {tag}\r\n\r\n"
        f"Hello {tag}.\r\n.a line with a dot\r\n" + "x" * size + "\r\n"
    ).encode()


async def waitUntil(predicate, timeout=30.0, what="condition"):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


async def waitForPort(port, timeout=10.0):
    deadline = reactor.seconds() + timeout
    while True:
        try:
            p = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                protocol.Factory.forProtocol(protocol.Protocol)
            )
        except Exception:
            if reactor.seconds() > deadline:
                raise
            await task.deferLater(reactor, 0.05, lambda: None)
        else:
            p.transport.abortConnection()
            return


class Sink:
    """smtp-sink on 127.0.0.1:port, dumping each message to its own file."""

    def __init__(self, port):
        self.port = port
        self.directory = tempfile.mkdtemp(prefix="dcrouter-sink-")
        os.chmod(self.directory, 0o777)  # smtp-sink drops root for nobody
        self.process = None

    async def start(self, *options):
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [
                SMTP_SINK,
                *user,
                *options,
                "-d",
                os.path.join(self.directory, "%M."),
                f"127.0.0.1:{self.port}",
                "256",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await waitForPort(self.port)

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def dumps(self):
        found = []
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as f:
                found.append(f.read())
        return found

    def testIds(self):
        ids = []
        for dump in self.dumps():
            for line in dump.split(b"\n"):
                if line.startswith(b"X-Test-Id: "):
                    ids.append(line[11:].decode())
        return ids

    def close(self):
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def sink():
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip("smtp-sink is not installed (Debian package postfix)")
    s = Sink(freePort())
    yield s
    s.close()


@pytest.fixture
def threadpool():
    pool = ThreadPool(minthreads=1, maxthreads=4, name="mail-test")
    pool.start()
    yield pool
    pool.stop()


def forwardingQueue(directory, threadpool, port, **kwargs):
    clientPool = SMTPConnectionPool(
        reactor, "dcrouter.test", threadpool=threadpool, idleTimeout=1.0, commandTimeout=10
    )
    rules = DomainRules(
        [], default=DomainRule("*", "forward", server="127.0.0.1", port=port, tls="off")
    )
    deliverer = Deliverer(rules, [ForwardMode(clientPool, reactor, threadpool)])
    q = MailQueue(
        str(directory),
        reactor,
        threadpool,
        reactor,
        deliverer.deliver,
        hostname="dcrouter.test",
        **kwargs,
    )
    return q, clientPool


@pytest_twisted.ensureDeferred
async def test_relay_to_smtp_sink_loses_nothing_and_doubles_nothing(tmp_path, sink, threadpool):
    await sink.start()
    q, clientPool = forwardingQueue(tmp_path / "queue", threadpool, sink.port)
    await q.start()
    count = 300
    tags = [f"m{i}" for i in range(count)]
    accepted = await defer.gatherResults(
        [
            q.accept(Envelope(b"alice@sender.example", (b"bob@rcpt.example",)), message(t))
            for t in tags
        ]
    )
    assert len(set(accepted)) == count
    await waitUntil(lambda: not q.messages, what="the queue to empty")
    await waitUntil(lambda: len(sink.dumps()) >= count, what="smtp-sink's dumps")
    ids = sink.testIds()
    assert sorted(ids) == sorted(tags)  # every one, once
    assert q.stats["delivered"] == count and q.stats["deferred"] == 0
    assert clientPool.stats["connections"] < count / 10  # connections were reused
    await q.stop()
    clientPool.closeIdle()
    assert os.listdir(tmp_path / "queue" / "active") == []
    dump = sink.dumps()[0]
    assert b"\n.a line with a dot\n" in dump  # dot-stuffed on the wire, unstuffed by the sink


@pytest.mark.parametrize("mode", ["pipelining", "no-pipelining"])
@pytest_twisted.ensureDeferred
async def test_a_backend_that_is_down_then_up_gets_the_mail_once(tmp_path, sink, threadpool, mode):
    retry = RetrySchedule(first=0.3, maximum=0.3)
    q, clientPool = forwardingQueue(tmp_path / "queue", threadpool, sink.port, retry=retry)
    await q.start()
    queueId = await q.accept(
        Envelope(b"alice@sender.example", (b"bob@rcpt.example",)), message("once")
    )
    await waitUntil(lambda: q.messages[queueId].attempts >= 1, what="the first attempt")
    state = q.messages[queueId].recipients[b"bob@rcpt.example"]
    assert state.status == PENDING and state.code == 421 and "connection refused" in state.text
    assert os.listdir(tmp_path / "queue" / "state") == [queueId]
    await sink.start(*(["-P"] if mode == "no-pipelining" else []))
    await waitUntil(lambda: queueId not in q.messages, what="delivery")
    await task.deferLater(reactor, 0.8, lambda: None)  # two more retry periods: nothing more
    assert sink.testIds() == ["once"]
    assert os.listdir(tmp_path / "queue" / "state") == []
    await q.stop()
    clientPool.closeIdle()


@pytest_twisted.ensureDeferred
async def test_a_5xx_from_the_backend_bounces_to_the_sender(tmp_path, sink, threadpool):
    await sink.start("-f", "RCPT")  # refuse every RCPT with 5xx
    q, clientPool = forwardingQueue(tmp_path / "queue", threadpool, sink.port)
    await q.start()
    await q.accept(Envelope(b"alice@sender.example", (b"bob@rcpt.example",)), message("bounce"))
    await waitUntil(lambda: q.stats["bounces"] == 1, what="the bounce")
    # The bounce goes the same way, is refused too, and is dropped (null sender).
    await waitUntil(lambda: not q.messages, what="the queue to empty")
    assert q.stats["dropped"] == 1 and q.stats["bounces"] == 1
    await q.stop()
    clientPool.closeIdle()


# -- kill -9 ---------------------------------------------------------------------------

WRITER = r"""
import hashlib, os, random, sys
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from dcrouter.mail.queue import Envelope, MailQueue

directory, tag = sys.argv[1], sys.argv[2]
rng = random.Random()
pool = ThreadPool(1, 4)
pool.start()
queue = MailQueue(directory, reactor, pool, reactor)
counter = [0]

def acked(queueId, digest):
    sys.stdout.write(f"{queueId} {digest}\n")
    sys.stdout.flush()

def one():
    counter[0] += 1
    n = counter[0]
    body = (f"Subject: {tag}-{n}\r\n\r\n".encode() + os.urandom(rng.choice([10, 1000, 40000, 300000])).hex().encode())
    digest = hashlib.sha256(body).hexdigest()
    envelope = Envelope(b"a@b.example", (b"c@d.example",))
    if n % 3 == 0:
        incoming = queue.openMessage(envelope)
        for start in range(0, len(body), 65536):
            incoming.write(body[start:start + 65536])
        d = incoming.commit()
    else:
        d = queue.accept(envelope, body)
    d.addCallback(acked, digest)
    d.addErrback(lambda f: sys.stderr.write(f.getTraceback()))
    d.addBoth(lambda _: one())

def go(_):
    sys.stdout.write("started\n")
    sys.stdout.flush()
    for _ in range(30):
        one()

queue.start().addCallback(go)
reactor.run()
"""


class Collector(protocol.ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)


@pytest_twisted.ensureDeferred
async def test_kill_9_loses_no_acknowledged_message(tmp_path, threadpool):
    directory = str(tmp_path / "queue")
    env = dict(os.environ, PYTHONPATH=REPO)
    acked = {}
    rng = random.Random()
    for round in range(6):
        collector = Collector()
        process = reactor.spawnProcess(
            collector,
            sys.executable,
            [sys.executable, "-c", WRITER, directory, f"r{round}"],
            env=env,
        )
        # Let it run a random while after it has started, then kill it dead.
        await waitUntil(
            lambda c=collector: c.out.startswith(b"started\n") or c.ended.called,
            what="the writer",
        )
        await task.deferLater(reactor, rng.uniform(0.2, 1.0), lambda: None)
        with contextlib.suppress(Exception):
            process.signalProcess("KILL")
        ended = await collector.ended
        assert ended.signal == signal.SIGKILL, collector.err.decode(errors="replace")[-2000:]
        lines = collector.out.split(b"\n")
        assert lines[0] == b"started"
        for line in lines[1:-1]:  # the last one may be cut off
            queueId, digest = line.decode().split()
            acked[queueId] = digest
        assert b"Traceback" not in collector.err, collector.err.decode(errors="replace")[-2000:]
    assert len(acked) > 20
    q = MailQueue(directory, reactor, threadpool, reactor)
    await q.start()
    assert os.listdir(os.path.join(directory, "tmp")) == []  # no partial file survives
    assert os.listdir(os.path.join(directory, "corrupt")) == []
    for queueId, digest in acked.items():
        assert queueId in q.messages, f"acknowledged {queueId} was lost"
        data = await q.messages[queueId].read()
        assert hashlib.sha256(data).hexdigest() == digest, f"{queueId} is damaged"
    await q.stop()


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def tinyDisk(tmp_path):
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_answers_queuefull_and_leaves_no_partial_file(tinyDisk, threadpool):
    q = MailQueue(str(tinyDisk / "queue"), reactor, threadpool, reactor)
    await q.start()
    acked = {}
    refused = 0
    for i in range(40):
        body = message(f"full{i}", size=60_000)
        if i % 2:
            incoming = q.openMessage(Envelope(b"a@b.example", (b"c@d.example",)))
            for start in range(0, len(body), 7000):
                incoming.write(body[start : start + 7000])
            d = incoming.commit()
        else:
            d = q.accept(Envelope(b"a@b.example", (b"c@d.example",)), body)
        try:
            acked[await d] = body
        except QueueFull as e:
            refused += 1
            assert e.errno == 28
        assert os.listdir(tinyDisk / "queue" / "tmp") == []
    assert refused > 0 and len(acked) > 5
    assert sorted(os.listdir(tinyDisk / "queue" / "active")) == sorted(acked)
    for queueId, body in acked.items():
        assert await q.messages[queueId].read() == body
    big = q.accept(Envelope(b"a@b.example", (b"c@d.example",)), b"x" * 2_000_000)
    with pytest.raises(QueueFull):
        await big
    assert os.listdir(tinyDisk / "queue" / "tmp") == []
    await q.stop()


# -- mta mode, DKIM ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mta_mode_delivers_by_mx_and_signs_with_dkim(tmp_path, sink, threadpool):
    await sink.start()
    privateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = privateKey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = loadKey(pem, "mail2024")
    resolver = FakeResolver(
        mx={"rcpt.example": [(10, "mx.rcpt.example")]}, a={"mx.rcpt.example": ["127.0.0.1"]}
    )
    clientPool = SMTPConnectionPool(
        reactor, "dcrouter.test", threadpool=threadpool, idleTimeout=0.5
    )
    mta = MtaMode(clientPool, MXResolver(resolver), reactor, threadpool, port=sink.port)
    rules = DomainRules([], default=DomainRule("*", "mta", dkim=key))
    q = MailQueue(
        str(tmp_path / "queue"), reactor, threadpool, reactor, Deliverer(rules, [mta]).deliver
    )
    await q.start()
    await q.accept(
        Envelope(b"alice@sender.example", (b"bob@rcpt.example",), authUser="alice"),
        message("dkim"),
    )
    await waitUntil(lambda: not q.messages, what="delivery")
    await waitUntil(lambda: sink.dumps(), what="the dump")
    [dump] = sink.dumps()
    # smtp-sink prepends its own X-* lines and a Received header (not signed),
    # and writes LF line ends.
    signed = dump.replace(b"\n", b"\r\n")
    record = publicRecord(key).encode()
    looked = []

    def dnsfunc(name, timeout=5):
        looked.append(name)
        return record

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert looked == [b"mail2024._domainkey.sender.example."]
    await q.stop()
    clientPool.closeIdle()


# -- 8-bit mail to a hop without 8BITMIME ---------------------------------------------------

EIGHT_BIT = (
    "From: Alice <alice@sender.example>\r\nTo: bob@rcpt.example\r\nSubject: 8bit\r\n"
    "Message-ID: <8bit@sender.example>\r\nX-Test-Id: 8bit\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    "--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Gr\u00fc\u00dfe,\r\n.\r\n.eine Zeile mit Punkt \u00e4\r\n" + "\u00f6" * 100 + "\r\n"
    "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    "AAECAwQFBgc=\r\n--b--\r\n"
).encode()


def parseDump(dump):
    """smtp-sink's file (its own lines first, LF line ends), read by the email package."""
    return email.message_from_bytes(dump.replace(b"\n", b"\r\n"), policy=email.policy.default)


@pytest_twisted.ensureDeferred
async def test_8bit_mail_reaches_a_sink_without_8bitmime_as_7bit_mime(tmp_path, sink, threadpool):
    """
    smtp-sink -8 does not announce 8BITMIME: the message arrives as 7-bit
    MIME (its text part quoted-printable, its base64 part as it was), and
    reads back to what was sent.
    """
    await sink.start("-8")
    q, clientPool = forwardingQueue(tmp_path / "queue", threadpool, sink.port)
    await q.start()
    envelope = Envelope(b"alice@sender.example", (b"bob@rcpt.example",), body="8BITMIME")
    await q.accept(envelope, EIGHT_BIT)
    await waitUntil(lambda: not q.messages, what="delivery")
    await waitUntil(lambda: sink.dumps(), what="the dump")
    [dump] = sink.dumps()
    assert q.stats["delivered"] == 1 and q.stats["bounces"] == 0
    assert dump.isascii()
    assert max(len(line) for line in dump.split(b"\n")) <= 76
    message = parseDump(dump)
    assert message["Message-ID"] == "<8bit@sender.example>"
    text, binary = message.iter_parts()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert text.get_content() == (
        "Gr\u00fc\u00dfe,\r\n.\r\n.eine Zeile mit Punkt \u00e4\r\n" + "\u00f6" * 100
    )
    assert binary["Content-Transfer-Encoding"] == "base64"
    assert binary.get_content() == bytes(range(8))
    await q.stop()
    clientPool.closeIdle()


@pytest_twisted.ensureDeferred
async def test_8bit_mail_signed_with_dkim_verifies_at_a_sink_without_8bitmime(
    tmp_path, sink, threadpool
):
    """Converted before it is signed, the signature holds where 8BITMIME is not offered."""
    await sink.start("-8")
    privateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = privateKey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = loadKey(pem, "sel8")
    clientPool = SMTPConnectionPool(
        reactor, "dcrouter.test", threadpool=threadpool, idleTimeout=1.0, commandTimeout=10
    )
    rules = DomainRules(
        [],
        default=DomainRule("*", "forward", server="127.0.0.1", port=sink.port, tls="off", dkim=key),
    )
    deliverer = Deliverer(rules, [ForwardMode(clientPool, reactor, threadpool)])
    q = MailQueue(str(tmp_path / "queue"), reactor, threadpool, reactor, deliverer.deliver)
    await q.start()
    envelope = Envelope(b"alice@sender.example", (b"bob@rcpt.example",), authUser="alice")
    await q.accept(envelope, EIGHT_BIT)
    await waitUntil(lambda: not q.messages, what="delivery")
    await waitUntil(lambda: sink.dumps(), what="the dump")
    [dump] = sink.dumps()
    assert dump.isascii()
    record = publicRecord(key).encode()
    assert dkim.verify(dump.replace(b"\n", b"\r\n"), dnsfunc=lambda name, timeout=5: record)
    await q.stop()
    clientPool.closeIdle()


@pytest_twisted.ensureDeferred
async def test_8bit_header_fields_pass_to_a_sink_without_8bitmime(tmp_path, sink, threadpool):
    """
    As from Postfix: the body is converted, the header fields go as they
    came, 8-bit bytes and all.
    """
    await sink.start("-8")
    q, clientPool = forwardingQueue(tmp_path / "queue", threadpool, sink.port)
    await q.start()
    data = EIGHT_BIT.replace(b"Subject: 8bit", "Subject: Gr\u00fc\u00dfe".encode())
    await q.accept(Envelope(b"alice@sender.example", (b"bob@rcpt.example",)), data)
    await waitUntil(lambda: not q.messages, what="delivery")
    await waitUntil(lambda: sink.dumps(), what="the dump")
    [dump] = sink.dumps()
    assert q.stats["delivered"] == 1 and q.stats["bounces"] == 0
    assert "\nSubject: Gr\u00fc\u00dfe\n".encode() in dump
    assert dump.replace("Subject: Gr\u00fc\u00dfe".encode(), b"").isascii()
    text, _ = parseDump(dump).iter_parts()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    await q.stop()
    clientPool.closeIdle()


@pytest_twisted.ensureDeferred
async def test_inconvertible_mail_to_a_sink_without_8bitmime_bounces_with_5_6_3(
    tmp_path, sink, threadpool
):
    """
    8-bit bytes inside base64 data cannot be converted: returned to the
    sender (5.6.3) and not delivered; the bounce itself (the original in
    it as message/global, for its 8-bit header) converts and passes the
    same sink.
    """
    await sink.start("-8")
    q, clientPool = forwardingQueue(tmp_path / "queue", threadpool, sink.port)
    await q.start()
    data = EIGHT_BIT.replace(b"Subject: 8bit", "Subject: Gr\u00fc\u00dfe".encode()).replace(
        b"AAECAwQFBgc=", b"AAEC\xc3\xa4wQFBgc="
    )
    queueId = await q.accept(Envelope(b"alice@sender.example", (b"bob@rcpt.example",)), data)
    await waitUntil(lambda: queueId not in q.messages, what="the bounce")
    assert q.stats["failed"] == 1 and q.stats["bounces"] == 1
    await waitUntil(lambda: not q.messages, what="the bounce's delivery")
    await waitUntil(lambda: sink.dumps(), what="the dump")
    [dump] = sink.dumps()
    assert dump.isascii() and q.stats["delivered"] == 1
    bounce = parseDump(dump)
    assert bounce["To"].addresses[0].addr_spec == "alice@sender.example"
    _, report, returned = bounce.iter_parts()
    [perRecipient] = report.get_payload()[1:]
    assert perRecipient["Status"] == "5.6.3"
    assert "8-bit data in a part encoded as base64" in perRecipient["Diagnostic-Code"]
    assert returned.get_content_type() == "message/global"
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    await q.stop()
    clientPool.closeIdle()


# -- STARTTLS ---------------------------------------------------------------------------------


def selfSigned(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certPEM = cert.public_bytes(serialization.Encoding.PEM)
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return certPEM, keyPEM


class TLSServer(LineOnlyReceiver):
    """Just enough ESMTP with STARTTLS to see what a client sends, and how."""

    def connectionMade(self):
        self.tls = False
        self.inData = False
        self.lines = []
        self.sendLine(b"220 tls.test ESMTP")

    def lineReceived(self, line):
        factory = self.factory
        if self.inData:
            if line == b".":
                self.inData = False
                factory.messages.append((self.tls, b"\r\n".join(self.lines)))
                self.lines = []
                self.sendLine(b"250 2.0.0 ok")
            else:
                self.lines.append(line)
            return
        factory.commands.append((self.tls, line))
        verb = line.split(b" ")[0].split(b":")[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-tls.test")
            if not self.tls:
                self.sendLine(b"250-STARTTLS")
            self.sendLine(b"250 PIPELINING" if factory.pipelining else b"250 8BITMIME")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(factory.tlsOptions)
            self.tls = True
        elif verb in (b"MAIL", b"RCPT", b"RSET"):
            self.sendLine(b"250 ok")
        elif verb == b"AUTH":
            self.sendLine(b"235 ok" if self.tls else b"530 tls first")
        elif verb == b"DATA":
            self.inData = True
            self.sendLine(b"354 go")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 no")


@pytest.fixture
def tlsServer():
    certPEM, keyPEM = selfSigned("tls.test")
    factory = protocol.Factory.forProtocol(TLSServer)
    factory.tlsOptions = PrivateCertificate.loadPEM(certPEM + keyPEM).options()
    factory.commands = []
    factory.messages = []
    factory.pipelining = True
    factory.certPEM = certPEM
    return factory


def trustingFactory(certPEM):
    def make(serverName, verify):
        assert verify
        return optionsForClientTLS(serverName, trustRoot=Certificate.loadPEM(certPEM))

    return make


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_required_tls_with_a_verified_certificate_and_auth(
    tlsServer, pipelining, threadpool
):
    tlsServer.pipelining = pipelining
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tlsServer)
    clientPool = SMTPConnectionPool(
        reactor,
        "dcrouter.test",
        threadpool=threadpool,
        tlsFactory=trustingFactory(tlsServer.certPEM),
    )
    from dcrouter.mail.deliveryclient import SMTPTarget

    target = SMTPTarget(
        "127.0.0.1",
        port.getHost().port,
        tls="required",
        verify=True,
        serverName="tls.test",
        auth=("u", "p"),
    )
    results = await clientPool.send(target, b"a@s.example", [b"b@r.example"], message("tls"))
    assert results[b"b@r.example"].code == 250
    assert tlsServer.messages and tlsServer.messages[0][0] is True  # sent inside TLS
    assert all(
        tls for tls, line in tlsServer.commands if not line.startswith((b"EHLO", b"STARTTLS"))
    )
    assert any(line.startswith(b"AUTH PLAIN") for tls, line in tlsServer.commands)
    clientPool.closeIdle()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_required_tls_with_the_wrong_name_defers_and_sends_nothing(tlsServer, threadpool):
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tlsServer)
    clientPool = SMTPConnectionPool(
        reactor,
        "dcrouter.test",
        threadpool=threadpool,
        tlsFactory=trustingFactory(tlsServer.certPEM),
    )
    from dcrouter.mail.deliveryclient import SetupFailed, SMTPTarget

    target = SMTPTarget(
        "127.0.0.1", port.getHost().port, tls="required", verify=True, serverName="other.test"
    )
    with pytest.raises(SetupFailed) as caught:
        await clientPool.send(target, b"a@s.example", [b"b@r.example"], message("tls"))
    assert caught.value.result.code == 421 and caught.value.result.text.startswith("4.7.5")
    assert tlsServer.messages == []
    assert not any(line.startswith(b"MAIL") for tls, line in tlsServer.commands)
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_encrypts_without_checking(tlsServer, threadpool):
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tlsServer)
    clientPool = SMTPConnectionPool(reactor, "dcrouter.test", threadpool=threadpool)
    from dcrouter.mail.deliveryclient import SMTPTarget

    target = SMTPTarget(
        "127.0.0.1", port.getHost().port, tls="opportunistic", serverName="whatever.test"
    )
    results = await clientPool.send(target, b"a@s.example", [b"b@r.example"], message("tls"))
    assert results[b"b@r.example"].code == 250
    assert tlsServer.messages[0][0] is True
    clientPool.closeIdle()
    await port.stopListening()
