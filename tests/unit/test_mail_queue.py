"""The durable mail queue: group commit, retries, expiry, bounces, recovery, full disks."""

from __future__ import annotations

import email
import email.policy
import errno
import itertools
import json
import os
import quopri

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from dcrouter.mail import queue as queuemodule
from dcrouter.mail.dsn import FailedRecipient, buildBounce, isInternational, statusCode
from dcrouter.mail.envelope import Envelope as SMTPEnvelope
from dcrouter.mail.envelope import MailAddress
from dcrouter.mail.mimeconvert import to7bit
from dcrouter.mail.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    DeliveryResult,
    Envelope,
    MailQueue,
    QueueError,
    QueueFull,
    RetrySchedule,
)
from dcrouter.mail.sinks import queueEnvelope

MESSAGE = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@rcpt.example\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@sender.example>\r\n"
    b"\r\n"
    b"Hi Bob.\r\n"
)


class SyncReactor:
    """callFromThread at once: the other half of a synchronous thread pool."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class SyncPool:
    """A thread pool that runs each call at once, on the caller's thread."""

    def __init__(self):
        self.calls = 0

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        self.calls += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ManualPool(SyncPool):
    """Holds calls until the test runs them: an fsync that takes a while."""

    def __init__(self):
        super().__init__()
        self.held = []

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        self.held.append((onResult, f, args, kwargs))

    def runOne(self):
        onResult, f, args, kwargs = self.held.pop(0)
        SyncPool.callInThreadWithCallback(self, onResult, f, *args, **kwargs)

    def runAll(self):
        while self.held:
            self.runOne()


class FakeDeliver:
    """Records attempts; answers from a script or leaves the Deferred to the test."""

    def __init__(self, answer=None):
        self.calls = []
        self.data = []
        self.cancelled = []
        self.answer = answer  # callable(message, recipients) -> dict, or None: hold

    def __call__(self, message, recipients):
        d = defer.Deferred(lambda d: self.cancelled.append(message.queueId))
        message.read().addCallback(self.data.append)  # what it was at the time
        self.calls.append((message, recipients, d))
        if self.answer is not None:
            d.callback(self.answer(message, recipients))
        return d


def everyone(code, text, remote=""):
    return lambda message, recipients: {r: DeliveryResult(code, text, remote) for r in recipients}


def makeQueue(tmp_path, deliver=None, pool=None, **kwargs):
    clock = task.Clock()
    q = MailQueue(
        str(tmp_path / "queue"),
        SyncReactor(),
        pool or SyncPool(),
        clock,
        deliver,
        hostname="mx.test",
        **kwargs,
    )
    return q, clock


def started(q):
    d = q.start()
    assert d.called, "a synchronous pool starts at once"
    return q


def envelope(sender=b"alice@sender.example", *recipients):
    return Envelope(
        mailFrom=sender,
        recipients=tuple(recipients or (b"bob@rcpt.example",)),
        clientAddress="192.0.2.7",
        helo="client.example",
        authUser=None,
    )


def fired(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure(d):
    results = []
    d.addBoth(results.append)
    assert results and isinstance(results[0], Failure), results
    return results[0]


def files(q, sub):
    return sorted(os.listdir(os.path.join(q.directory, sub)))


# -- accepting -------------------------------------------------------------------


def test_accept_writes_the_message_and_its_envelope_durably(tmp_path):
    q, clock = makeQueue(tmp_path)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    assert files(q, "active") == [queueId]
    assert files(q, "tmp") == []
    message = q.messages[queueId]
    with open(message.path, "rb") as f:
        f.seek(message.offset)
        assert f.read() == MESSAGE
    assert message.size == len(MESSAGE)
    assert fired(message.read()) == MESSAGE
    [listed] = q.list()
    assert listed["id"] == queueId
    assert listed["recipients"][0]["status"] == PENDING


def test_accept_copies_a_message_file(tmp_path):
    q, clock = makeQueue(tmp_path)
    started(q)
    source = tmp_path / "spooled"
    source.write_bytes(MESSAGE * 1000)
    queueId = fired(q.accept(envelope(), str(source)))
    assert fired(q.messages[queueId].read()) == MESSAGE * 1000


def test_accept_needs_a_recipient(tmp_path):
    q, clock = makeQueue(tmp_path)
    started(q)
    failure(q.accept(Envelope(b"a@b.example", ()), MESSAGE)).trap(QueueError)


def test_envelope_round_trips_through_json():
    original = Envelope(b"\xc3\xa9@x.example", (b"a@b.example", b"\xff@c.example"), "::1", "h", "u")
    assert Envelope.fromJSON(json.loads(json.dumps(original.toJSON()))) == original


def test_smtputf8_and_body_survive_a_queue_write_and_reload(tmp_path):
    """
    MAIL's SMTPUTF8 and BODY reach the queue file and come back after a
    restart; a file written before they were stored loads as without them.
    """
    server = SMTPEnvelope(
        id="T1",
        mailFrom=MailAddress("j\u00f6rg", "s.example"),
        client=None,
        server=None,
        helo="client.example",
        smtputf8=True,
        body="8BITMIME",
        recipients=[MailAddress("bob", "r.example")],
    )
    q, clock = makeQueue(tmp_path)
    started(q)
    queueId = fired(q.accept(queueEnvelope(server), MESSAGE))
    fired(q.stop())
    q2, _ = makeQueue(tmp_path)
    started(q2)
    restored = q2.messages[queueId].envelope
    assert restored.smtputf8 is True and restored.body == "8BITMIME"
    assert restored.mailFrom == "j\u00f6rg@s.example".encode()
    old = {"from": "a@s.example", "rcpt": ["b@r.example"], "client": "", "helo": "h", "auth": None}
    assert Envelope.fromJSON(old) == Envelope(b"a@s.example", (b"b@r.example",), "", "h")
    assert Envelope.fromJSON(old).smtputf8 is False and Envelope.fromJSON(old).body is None


def test_group_commit_batches_what_arrives_during_an_fsync(tmp_path):
    pool = ManualPool()
    q, clock = makeQueue(tmp_path, pool=pool)
    q.start()
    pool.runAll()  # prepare + recovery
    assert q._recovered
    first = q.accept(envelope(), MESSAGE)
    assert len(pool.held) == 1  # the first batch is "in the thread"
    others = [q.accept(envelope(), MESSAGE + b"%d\r\n" % i) for i in range(20)]
    assert len(pool.held) == 1  # they wait for it, not one thread hop each
    assert not first.called
    pool.runOne()
    queueId = fired(first)
    assert not any(d.called for d in others)
    assert len(pool.held) == 1  # all twenty in the next batch
    pool.runOne()
    ids = [fired(d) for d in others]
    assert len({*ids, queueId}) == 21
    assert q.stats["accepted"] == 21
    batches = q.stats["batches"]
    assert q.stats["batchedOps"] - 1 == 21 and batches == 3  # recovery, 1, 20


def test_max_batch_one_commits_one_by_one(tmp_path):
    pool = ManualPool()
    q, clock = makeQueue(tmp_path, pool=pool, maxBatch=1)
    q.start()
    pool.runAll()
    for _ in range(5):
        q.accept(envelope(), MESSAGE)
    pool.runAll()
    assert q.stats["batches"] == 6


def test_incoming_message_spills_large_messages_and_commits(tmp_path):
    q, clock = makeQueue(tmp_path)
    started(q)
    incoming = q.openMessage(envelope())
    chunk = b"x" * 1000 + b"\r\n"
    for _ in range(400):  # ~400 KB: past the spill threshold
        incoming.write(chunk)
    assert files(q, "tmp") == [incoming.queueId]
    queueId = fired(incoming.commit())
    assert files(q, "tmp") == []
    assert fired(q.messages[queueId].read()) == chunk * 400


def test_incoming_message_abort_leaves_nothing(tmp_path):
    q, clock = makeQueue(tmp_path)
    started(q)
    incoming = q.openMessage(envelope())
    incoming.write(b"y" * (queuemodule.SPILL_THRESHOLD + 10))
    assert files(q, "tmp")
    incoming.abort()
    assert files(q, "tmp") == [] and files(q, "active") == []
    failure(incoming.commit()).trap(QueueError)


# -- full disks ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_fails_with_queuefull_and_leaves_no_file(tmp_path, monkeypatch, where):
    q, clock = makeQueue(tmp_path)
    started(q)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(queuemodule.os, where, full)
    reason = failure(q.accept(envelope(), MESSAGE))
    monkeypatch.undo()
    reason.trap(QueueFull)
    assert reason.value.errno == errno.ENOSPC  # an SMTP server's OSError mapping sees 452
    assert files(q, "tmp") == [] and files(q, "active") == []
    assert q.messages == {}
    fired(q.accept(envelope(), MESSAGE))  # and the queue goes on once there is space


def test_a_full_disk_during_a_spill_fails_at_commit(tmp_path, monkeypatch):
    q, clock = makeQueue(tmp_path)
    started(q)
    incoming = q.openMessage(envelope())

    def full(*args):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(queuemodule.os, "write", full)
    incoming.write(b"z" * (queuemodule.SPILL_THRESHOLD + 1))
    incoming.write(b"more")  # the server still reads DATA to its end
    monkeypatch.undo()
    failure(incoming.commit()).trap(QueueFull)
    assert files(q, "tmp") == [] and files(q, "active") == []


def test_min_free_refuses_before_the_disk_is_full(tmp_path):
    q, clock = makeQueue(tmp_path, minFree=1 << 62)
    started(q)
    failure(q.accept(envelope(), MESSAGE)).trap(QueueFull)
    assert files(q, "active") == []


def test_other_disk_errors_are_queue_errors(tmp_path, monkeypatch):
    q, clock = makeQueue(tmp_path)
    started(q)

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(queuemodule.os, "fsync", broken)
    reason = failure(q.accept(envelope(), MESSAGE))
    monkeypatch.undo()
    reason.trap(QueueError)
    assert not reason.check(QueueFull)
    assert files(q, "tmp") == [] and files(q, "active") == []


# -- delivery, retries, expiry -------------------------------------------------------


def test_delivered_at_once_leaves_no_file(tmp_path):
    deliver = FakeDeliver(everyone(250, "2.0.0 ok", "relay.test"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    fired(q.accept(envelope(), MESSAGE))
    assert len(deliver.calls) == 1
    message, recipients, _ = deliver.calls[0]
    assert recipients == (b"bob@rcpt.example",)
    assert q.messages == {}
    assert files(q, "active") == [] and files(q, "state") == []
    assert q.stats["delivered"] == 1


def test_retries_back_off_postfix_like(tmp_path):
    deliver = FakeDeliver(everyone(451, "4.3.0 try later", "relay.test"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    times = [clock.seconds()]
    for _ in range(8):
        clock.advance(q.messages[queueId].nextAttempt - clock.seconds())
        times.append(clock.seconds())
    assert len(deliver.calls) == 9
    waits = [b - a for a, b in itertools.pairwise(times)]
    assert waits == [300, 600, 1200, 2400, 3600, 3600, 3600, 3600]
    state = q.messages[queueId].recipients[b"bob@rcpt.example"]
    assert (state.status, state.code, state.text, state.remote) == (
        PENDING,
        451,
        "4.3.0 try later",
        "relay.test",
    )
    with open(os.path.join(q.directory, "state", queueId), "rb") as f:
        saved = json.load(f)
    assert saved["attempts"] == 9 and saved["next"] == q.messages[queueId].nextAttempt


def test_retry_schedule_is_configurable():
    schedule = RetrySchedule(first=10, maximum=50, factor=3)
    assert [schedule.delay(n) for n in range(1, 5)] == [10, 30, 50, 50]
    assert RetrySchedule().delay(10_000) == 3600


def test_no_attempt_before_it_is_due(tmp_path):
    deliver = FakeDeliver(everyone(421, "4.4.1 connection refused"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    fired(q.accept(envelope(), MESSAGE))
    clock.advance(299)
    assert len(deliver.calls) == 1
    clock.advance(1)
    assert len(deliver.calls) == 2


def parseBounce(data):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def deliveryStatus(bounce):
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    human, status, returned = bounce.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    return human, blocks[0], blocks[1:], returned


def test_a_5xx_fails_at_once_and_bounces_to_the_sender(tmp_path):
    def answer(message, recipients):
        if message.envelope.mailFrom == b"":
            return {r: DeliveryResult(250, "2.0.0 ok") for r in recipients}
        return {
            b"bob@rcpt.example": DeliveryResult(
                550, "5.1.1 <bob@rcpt.example>: no such user", "mx.rcpt.example"
            ),
            b"carol@rcpt.example": DeliveryResult(250, "2.0.0 ok", "mx.rcpt.example"),
        }

    deliver = FakeDeliver(answer)
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    clock.advance(1_700_000_000)
    queueId = fired(
        q.accept(
            envelope(b"alice@sender.example", b"bob@rcpt.example", b"carol@rcpt.example"), MESSAGE
        )
    )
    assert len(deliver.calls) == 2  # the message, then its bounce
    bounceMessage, bounceRecipients, _ = deliver.calls[1]
    assert bounceMessage.envelope.mailFrom == b""
    assert bounceMessage.envelope.smtputf8 is False  # about ASCII mail: a plain DSN
    assert bounceRecipients == (b"alice@sender.example",)
    assert q.messages == {} and files(q, "active") == []  # both done
    assert q.stats["bounces"] == 1

    bounce = parseBounce(deliver.data[1])
    assert bounce["To"] == "<alice@sender.example>"
    assert bounce["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert bounce["Auto-Submitted"] == "auto-replied"
    human, perMessage, perRecipient, returned = deliveryStatus(bounce)
    assert perMessage["Reporting-MTA"] == "dns; mx.test"
    assert perMessage["X-Dcrouter-Queue-ID"] == queueId
    assert perMessage["Arrival-Date"]
    [failed] = perRecipient  # carol was delivered: not in the report
    assert failed["Final-Recipient"] == "rfc822; bob@rcpt.example"
    assert failed["Action"] == "failed"
    assert failed["Status"] == "5.1.1"
    assert failed["Remote-MTA"] == "dns; mx.rcpt.example"
    assert failed["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@rcpt.example>: no such user"
    assert "bob@rcpt.example" in human.get_payload()
    assert returned.get_content_type() == "message/rfc822"
    [original] = returned.get_payload()
    assert original["Message-ID"] == "<m1@sender.example>"


def test_a_big_original_is_returned_as_headers_only(tmp_path):
    original = MESSAGE + b"x" * 100_000 + b"\r\n"
    bounce = parseBounce(
        buildBounce(
            hostname="mx.test",
            sender=b"a@b.example",
            queueId="ABC",
            arrival=0,
            now=10,
            failures=[FailedRecipient(b"c@d.example", 550, "no")],
            original=original,
        )
    )
    *_, returned = deliveryStatus(bounce)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"x" * 100 not in bounce.as_bytes()
    assert "Message-ID: <m1@sender.example>" in returned.get_payload()


UTF8_MESSAGE = (
    "From: J\u00f6rg <j\u00f6rg@sender.example>\r\n"
    "To: b\u00fc@rcpt.example\r\n"
    "Subject: Gr\u00fc\u00dfe\r\n"
    "Message-ID: <m2@sender.example>\r\n"
    "\r\n"
    "Hallo \u00e4.\r\n"
).encode()


def globalStatus(bounce):
    """
    The parts of an RFC 6533 bounce: the email package reads the report's
    first block as the header of a message, the rest as its body.
    """
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "global-delivery-status"
    human, status, returned = bounce.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/global-delivery-status"
    assert status["Content-Transfer-Encoding"] == "8bit"
    [perMessage] = status.get_payload()
    rest = perMessage.get_payload(decode=True)
    perRecipient = [
        email.message_from_bytes(block, policy=email.policy.default)
        for block in rest.split(b"\r\n\r\n")
        if block.strip()
    ]
    return human, perMessage, perRecipient, returned


def internationalBounce(original=UTF8_MESSAGE, **kwargs):
    return buildBounce(
        hostname="mx.test",
        sender="j\u00f6rg@sender.example".encode(),
        queueId="ABC",
        arrival=0,
        now=10,
        failures=[
            FailedRecipient(
                "b\u00fc@rcpt.example".encode(), 550, "5.1.1 no such user", "mx.rcpt.example"
            ),
            FailedRecipient(b"carol@rcpt.example", 552, "5.2.2 mailbox full", "mx.rcpt.example"),
        ],
        original=original,
        international=True,
        **kwargs,
    )


def test_a_bounce_about_internationalized_mail_follows_rfc_6533():
    """
    message/global-delivery-status with utf-8 addresses, the original as
    message/global, the report named by its part (RFC 6522 3); read back
    with the email package.
    """
    raw = internationalBounce()
    assert "\r\nTo: <j\u00f6rg@sender.example>\r\n".encode() in raw
    bounce = email.message_from_bytes(raw, policy=email.policy.default)
    assert bounce["Content-Transfer-Encoding"] == "8bit"
    human, perMessage, [first, second], returned = globalStatus(bounce)
    assert "<b\u00fc@rcpt.example>: host mx.rcpt.example said" in human.get_content()
    assert perMessage["Reporting-MTA"] == "dns; mx.test"
    assert perMessage["X-Dcrouter-Sender"] == "utf-8; j\u00f6rg@sender.example"
    assert first["Final-Recipient"] == "utf-8; b\u00fc@rcpt.example"
    assert first["Status"] == "5.1.1" and first["Action"] == "failed"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert second["Final-Recipient"] == "rfc822; carol@rcpt.example"  # ASCII stays rfc822
    assert second["Status"] == "5.2.2"
    assert returned.get_content_type() == "message/global"
    assert returned["Content-Description"] == "Undelivered Message"
    [original] = returned.get_payload()
    assert original["Subject"] == "Gr\u00fc\u00dfe"
    assert original["Message-ID"] == "<m2@sender.example>"
    assert original.get_payload(decode=True) == "Hallo \u00e4.\r\n".encode()
    assert UTF8_MESSAGE in raw  # returned byte for byte


def test_a_big_internationalized_original_is_returned_as_global_headers():
    raw = internationalBounce(UTF8_MESSAGE + b"x" * 100 + b"\r\n", returnLimit=100)
    bounce = email.message_from_bytes(raw, policy=email.policy.default)
    *_, returned = globalStatus(bounce)
    assert returned.get_content_type() == "message/global-headers"
    assert returned["Content-Description"] == "Undelivered Message Headers"
    assert b"x" * 100 not in raw
    assert UTF8_MESSAGE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n--" in raw


def test_an_internationalized_bounce_converts_for_a_hop_without_8bitmime():
    """
    Its header is ASCII when the sender's address is: to a hop without
    8BITMIME, its UTF-8 parts go as quoted-printable (RFC 6532 3.5, RFC 6533 6).
    """
    raw = buildBounce(
        hostname="mx.test",
        sender=b"alice@sender.example",
        queueId="ABC",
        arrival=0,
        now=10,
        failures=[FailedRecipient("b\u00fc@rcpt.example".encode(), 550, "5.1.1 no", "mx.r")],
        original=UTF8_MESSAGE,
        international=True,
    )
    converted = to7bit(raw)
    assert converted.isascii()
    bounce = email.message_from_bytes(converted, policy=email.policy.default)
    human, status, returned = bounce.iter_parts()
    assert status["Content-Transfer-Encoding"] == "quoted-printable"
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    # The email package reads message/* parts as messages, encoded or not:
    # decode the two parts' bodies by hand.
    parts = converted.split(b"\r\n--" + bounce.get_boundary().encode())
    report, original = (quopri.decodestring(p.partition(b"\r\n\r\n")[2]) for p in parts[2:4])
    assert "Final-Recipient: utf-8; b\u00fc@rcpt.example\r\n".encode() in report
    assert original == UTF8_MESSAGE


def test_a_header_with_8bit_bytes_is_returned_as_message_global():
    """
    Sent without SMTPUTF8, a message with an 8-bit header is returned as
    message/global (the report stays an RFC 3464 one): unlike message/rfc822
    it may be encoded, so the bounce passes a hop without 8BITMIME.
    """
    original = "Subject: Gr\u00fc\u00dfe\r\n\r\nbody\r\n".encode()
    raw = buildBounce(
        hostname="mx.test",
        sender=b"alice@sender.example",
        queueId="ABC",
        arrival=0,
        now=10,
        failures=[FailedRecipient(b"bob@rcpt.example", 554, "5.6.3 conversion", "mx.r")],
        original=original,
    )
    bounce = parseBounce(raw)
    *_, returned = deliveryStatus(bounce)
    assert returned.get_content_type() == "message/global"
    assert original in raw
    converted = parseBounce(to7bit(raw))
    *_, returned = deliveryStatus(converted)
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"


def test_a_utf8_reply_makes_the_report_a_global_one():
    """message/delivery-status is ASCII (RFC 3464); UTF-8 text needs the global type."""
    raw = buildBounce(
        hostname="mx.test",
        sender=b"alice@sender.example",
        queueId="ABC",
        arrival=0,
        now=10,
        failures=[FailedRecipient(b"bob@rcpt.example", 550, "5.1.1 Benutzer unbekannt \u00e4", "m")],
        original=MESSAGE,
    )
    bounce = email.message_from_bytes(raw, policy=email.policy.default)
    _, _, [recipient], returned = globalStatus(bounce)
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt \u00e4"
    assert returned.get_content_type() == "message/rfc822"  # the message is ASCII
    assert to7bit(raw).isascii()


def test_a_bounce_is_international_when_the_mail_or_an_address_is():
    assert not isInternational(False, [b"a@b.example", b"c@d.example"])
    assert isInternational(True, [b"a@b.example"])
    assert isInternational(False, [b"a@b.example", "\u00fc@d.example".encode()])


def test_smtputf8_mail_that_fails_bounces_with_smtputf8(tmp_path):
    def answer(message, recipients):
        if message.envelope.mailFrom == b"":
            return {r: DeliveryResult(250, "2.0.0 ok") for r in recipients}
        return {r: DeliveryResult(550, "5.1.1 no such user", "mx.rcpt.example") for r in recipients}

    deliver = FakeDeliver(answer)
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    sender = "j\u00f6rg@sender.example".encode()
    fired(q.accept(Envelope(sender, (b"bob@rcpt.example",), smtputf8=True), UTF8_MESSAGE))
    bounceMessage, bounceRecipients, _ = deliver.calls[1]
    assert bounceMessage.envelope.mailFrom == b"" and bounceRecipients == (sender,)
    assert bounceMessage.envelope.smtputf8 is True
    bounce = email.message_from_bytes(deliver.data[1], policy=email.policy.default)
    _, _, [failed], returned = globalStatus(bounce)
    assert failed["Final-Recipient"] == "rfc822; bob@rcpt.example"
    assert returned.get_content_type() == "message/global"


def test_status_codes():
    assert statusCode(550, "5.7.1 relay denied") == "5.7.1"
    assert statusCode(550, "no such user") == "5.0.0"
    assert statusCode(450, "4.2.0 later") == "4.2.0"
    assert statusCode(450, "5.1.1 mismatched class") == "4.0.0"
    assert statusCode(0, "", expired=True) == "4.4.7"
    assert statusCode(421, "4.4.1 connect to x: refused", expired=True) == "4.4.1"


def test_a_long_diagnostic_is_folded_without_losing_text():
    """
    A remote server's long multi-line reply, joined into one line, is
    folded (RFC 5322 2.2.3): no line over 998 octets, lines of words within
    78, and unfolding gives the text back (a word over 998 is cut with a space).
    """
    words = " ".join(f"w\u00f6rd{i}" for i in range(400))
    long = "x" * 1500
    text = f"5.7.1 {words} {long} end"
    bounce = buildBounce(
        hostname="mx.test",
        sender=b"a@b.example",
        queueId="ABC",
        arrival=0,
        now=0,
        failures=[FailedRecipient(b"c@d.example", 550, text, "mx.d.example")],
        original=MESSAGE,
    )
    lines = bounce.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    folded = [line for line in lines if b"w\xc3\xb6rd2" in line]
    assert len(folded) > 10 and all(len(line) <= 78 for line in folded)
    start = lines.index(next(line for line in lines if line.startswith(b"Diagnostic-Code:")))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(b" "))
    unfolded = b"".join(lines[start:end]).decode()
    # The 1,500-octet word starts a line (after its space) and is cut after 998.
    cut = f"{'x' * 997} {'x' * 503}"
    assert unfolded == f"Diagnostic-Code: smtp; 550 5.7.1 {words} {cut} end"
    assert f"{words} {cut} end".encode() in bounce.replace(b"\r\n", b"")  # the human part


def test_a_bounce_carries_no_header_injection():
    bounce = buildBounce(
        hostname="mx.test",
        sender=b"a@b.example",
        queueId="ABC",
        arrival=0,
        now=0,
        failures=[FailedRecipient(b"c@d.example", 550, "bad\r\nBcc: evil@x.example", "h\r\nX: y")],
        original=MESSAGE,
    )
    parsed = parseBounce(bounce)
    assert parsed["Bcc"] is None
    _, _, [recipient], _ = deliveryStatus(parsed)
    assert recipient["X"] is None and recipient["Bcc"] is None


def test_expiry_after_the_lifetime_bounces_with_the_last_reply(tmp_path):
    def answer(message, recipients):
        if message.envelope.mailFrom == b"":
            return {r: DeliveryResult(250, "ok") for r in recipients}
        return {
            r: DeliveryResult(421, "4.4.1 connect to mx.rcpt.example: refused") for r in recipients
        }

    deliver = FakeDeliver(answer)
    retry = RetrySchedule(first=300, maximum=3600, lifetime=5 * 86400)
    q, clock = makeQueue(tmp_path, deliver, retry=retry)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    arrival = clock.seconds()
    while queueId in q.messages:
        message = q.messages[queueId]
        assert message.nextAttempt <= arrival + retry.lifetime
        clock.advance(message.nextAttempt - clock.seconds())
    assert clock.seconds() == arrival + retry.lifetime  # the last attempt is exactly at expiry
    original = [c for c in deliver.calls if c[0].envelope.mailFrom != b""]
    assert len(original) == 2 + 4 + (5 * 86400 - 4500) // 3600
    bounceMessage = deliver.calls[-1][0]
    assert bounceMessage.envelope.mailFrom == b""
    bounce = parseBounce(deliver.data[-1])
    assert "expired" in bounce["Subject"]
    _, _, [recipient], _ = deliveryStatus(bounce)
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "4.4.1"
    assert recipient["Diagnostic-Code"] == "X-dcrouter; 4.4.1 connect to mx.rcpt.example: refused"
    assert q.messages == {} and files(q, "state") == [] and files(q, "active") == []


def test_the_null_sender_never_bounces(tmp_path):
    deliver = FakeDeliver(everyone(550, "5.1.1 no such user"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    fired(q.accept(envelope(b""), MESSAGE))
    assert len(deliver.calls) == 1
    assert q.messages == {} and files(q, "active") == []
    assert q.stats["bounces"] == 0 and q.stats["dropped"] == 1


def test_a_failing_bounce_is_dropped_not_bounced(tmp_path):
    deliver = FakeDeliver(everyone(550, "5.1.1 no such user"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    fired(q.accept(envelope(), MESSAGE))
    assert len(deliver.calls) == 2  # the message; its bounce, which fails too
    assert q.messages == {} and q.stats["bounces"] == 1 and q.stats["dropped"] == 1


def test_a_bounce_that_cannot_be_queued_is_tried_again(tmp_path, monkeypatch):
    deliver = FakeDeliver(everyone(550, "5.1.1 no such user"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    original = q.accept
    calls = []

    def fullOnce(envelope, message):
        calls.append(envelope)
        if len(calls) == 2:  # the bounce
            return defer.fail(QueueFull("full"))
        return original(envelope, message)

    monkeypatch.setattr(q, "accept", fullOnce)
    queueId = fired(q.accept(envelope(), MESSAGE))
    state = q.messages[queueId].recipients[b"bob@rcpt.example"]
    assert state.status == FAILED and not state.reported
    clock.advance(300)
    assert queueId not in q.messages
    assert q.stats["bounces"] == 1


def test_partly_delivered_mail_retries_only_the_rest_after_a_restart(tmp_path):
    def answer(message, recipients):
        return {
            r: DeliveryResult(250, "ok")
            if r.startswith(b"ok")
            else DeliveryResult(450, "4.2.1 busy")
            for r in recipients
        }

    deliver = FakeDeliver(answer)
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    queueId = fired(
        q.accept(envelope(b"a@s.example", b"ok1@r.example", b"later@r.example"), MESSAGE)
    )
    fired(q.stop())

    deliver2 = FakeDeliver(everyone(250, "ok"))
    q2, clock2 = makeQueue(tmp_path, deliver2)
    clock2.advance(clock.seconds())
    started(q2)
    message = q2.messages[queueId]
    assert message.recipients[b"ok1@r.example"].status == DELIVERED
    assert message.attempts == 1
    assert deliver2.calls == []  # not due yet: the backoff survived the restart
    clock2.advance(300)
    [(_, recipients, _)] = deliver2.calls
    assert recipients == (b"later@r.example",)
    assert q2.messages == {}


def test_a_crash_while_removing_a_finished_message_delivers_nothing_again(
    tmp_path, monkeypatch
):
    """
    The message file goes first, then its state: killed in between, the
    next start finds an orphan state (deleted), never a message without its
    state, which would go to every recipient again.
    """
    deliver = FakeDeliver(
        lambda message, recipients: {
            r: DeliveryResult(250 if r.startswith(b"ok") else 450, "") for r in recipients
        }
    )
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    queueId = fired(
        q.accept(envelope(b"a@s.example", b"ok@r.example", b"later@r.example"), MESSAGE)
    )
    assert files(q, "state") == [queueId]

    class Killed(BaseException):
        pass

    unlink = os.unlink

    def killedAfterOne(path):
        unlink(path)
        monkeypatch.setattr(queuemodule.os, "unlink", unlink)
        raise Killed()

    monkeypatch.setattr(queuemodule.os, "unlink", killedAfterOne)
    deliver.answer = everyone(250, "ok")
    clock.advance(300)
    assert [c[1] for c in deliver.calls] == [
        (b"ok@r.example", b"later@r.example"),
        (b"later@r.example",),
    ]
    fired(q.stop())

    deliver2 = FakeDeliver(everyone(250, "ok"))
    q2, clock2 = makeQueue(tmp_path, deliver2)
    started(q2)
    clock2.advance(3600)
    assert deliver2.calls == [] and q2.messages == {}
    assert files(q2, "active") == [] and files(q2, "state") == []


def test_a_delivery_that_raises_is_retried(tmp_path):
    def broken(message, recipients):
        raise RuntimeError("bug")

    q, clock = makeQueue(tmp_path, broken)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    state = q.messages[queueId].recipients[b"bob@rcpt.example"]
    assert state.status == PENDING and state.code == 451 and "bug" in state.text


def test_a_missing_result_is_a_temporary_failure(tmp_path):
    deliver = FakeDeliver(lambda message, recipients: {})
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    assert q.messages[queueId].recipients[b"bob@rcpt.example"].code == 451


def test_an_attempt_that_hangs_times_out_and_is_retried(tmp_path):
    deliver = FakeDeliver()
    q, clock = makeQueue(tmp_path, deliver, attemptTimeout=60)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    clock.advance(59)
    assert deliver.cancelled == []
    clock.advance(1)
    assert deliver.cancelled == [queueId]
    state = q.messages[queueId].recipients[b"bob@rcpt.example"]
    assert state.status == PENDING and state.text.startswith("4.4.7")
    assert q.messages[queueId].nextAttempt == 60 + 300


def test_concurrency_is_bounded(tmp_path):
    deliver = FakeDeliver()
    q, clock = makeQueue(tmp_path, deliver, maxConcurrent=3)
    started(q)
    for _ in range(5):
        q.accept(envelope(), MESSAGE)
    assert len(deliver.calls) == 3
    deliver.calls[0][2].callback({b"bob@rcpt.example": DeliveryResult(250, "ok")})
    assert len(deliver.calls) == 4


# -- recovery and the operator -----------------------------------------------------


def test_recovery_deletes_half_written_files_and_resumes_messages(tmp_path):
    q, clock = makeQueue(tmp_path)
    started(q)
    ids = [fired(q.accept(envelope(), MESSAGE + b"%d" % i)) for i in range(3)]
    fired(q.stop())
    directory = q.directory
    with open(os.path.join(directory, "tmp", ids[0][:10] + "DEADBEEF"), "wb") as f:
        f.write(b'DCQ1 40\n{"id": half')
    with open(os.path.join(directory, "state", "0000000000FFFFFFFF"), "wb") as f:
        f.write(b"{}")  # a state without its message
    with open(os.path.join(directory, "active", "0000000000EEEEEEEE"), "wb") as f:
        f.write(b"garbage")
    deliver = FakeDeliver(everyone(250, "ok"))
    q2, _ = makeQueue(tmp_path, deliver)
    started(q2)
    assert files(q2, "tmp") == [] and files(q2, "state") == []
    assert files(q2, "corrupt") == ["0000000000EEEEEEEE"]
    assert sorted(c[0].queueId for c in deliver.calls) == sorted(ids)
    assert sorted(deliver.data) == sorted(MESSAGE + b"%d" % i for i in range(3))


def test_a_second_queue_on_the_same_directory_is_refused(tmp_path):
    q, _ = makeQueue(tmp_path)
    started(q)
    q2, _ = makeQueue(tmp_path)
    failure(q2.start()).trap(QueueError)
    fired(q.stop())
    fired(q2.start())  # startable again once the other has let go
    fired(q2.stop())


def failRecovery(monkeypatch):
    """Make the next recovery pass fail as an unreadable directory would."""

    def recover(disk):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(queuemodule._Disk, "_recover", recover)


def test_a_failed_recovery_lets_go_of_the_lock(tmp_path, monkeypatch):
    """
    A start whose recovery pass fails leaves the directory unlocked: it can
    be tried again, and another process (here a second queue) may take it.
    """
    q, clock = makeQueue(tmp_path)
    failRecovery(monkeypatch)
    failure(q.start()).trap(OSError)
    monkeypatch.undo()
    other, _ = makeQueue(tmp_path)
    fired(other.start())
    fired(other.stop())
    fired(q.start())
    assert q._recovered
    fired(q.stop())


def test_a_failed_recovery_keeps_the_lock_until_a_running_write_ends(tmp_path, monkeypatch):
    """
    A message handed to the committer while the recovery pass ran is written
    under the lock: the lock goes only once that write has ended, and what
    comes after the failure is refused, not written.
    """
    pool = ManualPool()
    q, clock = makeQueue(tmp_path, pool=pool)
    failRecovery(monkeypatch)
    starting = q.start()
    pool.runOne()  # the lock
    during = q.accept(envelope(), MESSAGE)
    pool.runOne()  # the recovery pass fails; the write of `during` starts
    late = q.accept(envelope(), MESSAGE)
    other, _ = makeQueue(tmp_path)
    failure(other.start()).trap(QueueError)  # still locked: `during` is being written
    assert not starting.called
    pool.runAll()
    fired(during)
    failure(starting).trap(OSError)
    failure(late).trap(QueueError)
    assert len(files(q, "active")) == 1
    monkeypatch.undo()
    fired(other.start())
    fired(other.stop())


def test_flush_tries_deferred_mail_now(tmp_path):
    deliver = FakeDeliver(everyone(451, "later"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    fired(q.accept(envelope(), MESSAGE))
    assert q.flush() == 1
    assert len(deliver.calls) == 2


def test_delete_removes_a_message_without_a_bounce(tmp_path):
    deliver = FakeDeliver(everyone(451, "later"))
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    assert fired(q.delete(queueId)) is True
    assert fired(q.delete(queueId)) is False
    assert fired(q.delete("../../etc/passwd")) is False
    assert files(q, "active") == [] and files(q, "state") == []
    clock.advance(3600)
    assert len(deliver.calls) == 1


def test_delete_during_an_attempt_discards_its_results(tmp_path):
    deliver = FakeDeliver()
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    fired(q.delete(queueId))
    deliver.calls[0][2].callback({b"bob@rcpt.example": DeliveryResult(550, "no")})
    assert q.stats["bounces"] == 0 and q.messages == {}


def test_stop_cancels_attempts_after_the_grace_and_keeps_them_pending(tmp_path):
    deliver = FakeDeliver()
    q, clock = makeQueue(tmp_path, deliver)
    started(q)
    queueId = fired(q.accept(envelope(), MESSAGE))
    stopped = q.stop(grace=5)
    assert not stopped.called
    clock.advance(5)
    fired(stopped)
    assert deliver.cancelled == [queueId]
    assert files(q, "active") == [queueId] and files(q, "state") == []


def test_nothing_is_written_before_start_or_after_stop(tmp_path):
    """Writes need the directory's lock, which start() takes: without it they fail."""
    q, clock = makeQueue(tmp_path)
    failure(q.accept(envelope(), MESSAGE)).trap(QueueError)
    incoming = q.openMessage(envelope())
    incoming.write(MESSAGE)
    failure(incoming.commit()).trap(QueueError)
    assert not os.path.exists(q.directory)
    started(q)
    fired(q.stop())
    failure(q.accept(envelope(), MESSAGE)).trap(QueueError)
    assert files(q, "active") == [] and files(q, "tmp") == []


def test_a_message_taken_in_while_starting_waits_for_the_lock(tmp_path):
    """
    Accepted before start() has locked the directory: nothing is written
    until it has; if another process holds the lock, the message fails
    (451) instead of landing in that process's queue.
    """
    other, _ = makeQueue(tmp_path)
    started(other)
    pool = ManualPool()
    q, clock = makeQueue(tmp_path, pool=pool)
    starting = q.start()
    accepted = q.accept(envelope(), MESSAGE)
    assert len(pool.held) == 1  # the lock (prepare) only; the write waits for it
    pool.runAll()
    failure(starting).trap(QueueError)
    failure(accepted).trap(QueueError)
    assert files(other, "active") == [] and files(other, "tmp") == []
    fired(other.stop())


def test_a_message_taken_in_while_starting_is_delivered_once(tmp_path):
    """
    Accepted (and delivered, and removed) before the recovery pass read the
    directory's last state: the pass must not resume it as a message of an
    earlier run.
    """
    pool = ManualPool()
    deliver = FakeDeliver(everyone(250, "2.0.0 ok"))
    q, clock = makeQueue(tmp_path, deliver=deliver, pool=pool)
    starting = q.start()
    accepted = q.accept(envelope(), MESSAGE)
    pool.runAll()
    assert starting.called and q._recovered
    queueId = fired(accepted)
    assert [message.queueId for message, _, _ in deliver.calls] == [queueId]
    assert q.messages == {}
