"""
The ESMTP server in front of the durable mail queue (L{QueueSink}), on the
real reactor: 250 means the message file is in the queue's C{active/}
directory, and a queue that has no room answers 452, never 250.
"""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool

from dcrouter.mail.policy import DomainPolicy
from dcrouter.mail.queue import MailQueue
from dcrouter.mail.sinks import QueueSink
from dcrouter.mail.smtp import SMTPFactory, SMTPSettings


@pytest.fixture
def threadpool():
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-smtp-queue")
    pool.start()
    yield pool
    pool.stop()


async def startQueueAndServer(directory, threadpool, **queueOptions):
    mailQueue = MailQueue(str(directory), reactor, threadpool, reactor, **queueOptions)
    await mailQueue.start()
    factory = SMTPFactory(
        SMTPSettings(hostname="mx.example.test"),
        DomainPolicy(["example.test"]),
        QueueSink(mailQueue),
        reactor,
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return mailQueue, port


def send(port, recipients, message):
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("bob@client.example")
        for recipient in recipients:
            smtp.rcpt(recipient)
        return smtp.data(message)


@pytest_twisted.ensureDeferred
async def test_250_means_queued_on_disk(tmp_path, threadpool):
    mailQueue, port = await startQueueAndServer(tmp_path / "queue", threadpool)
    try:
        message = b"Subject: queued\r\n\r\n" + b"line\r\n" * 100_000
        code, text = await deferToThread(
            send, port.getHost().port, ["alice@example.test", "bob@example.test"], message
        )
        assert code == 250
        queueId = text.decode().rsplit(" ", 1)[-1]
        queued = mailQueue.messages[queueId]
        assert queued.envelope.recipients == (b"alice@example.test", b"bob@example.test")
        assert queued.envelope.mailFrom == b"bob@client.example"
        assert queued.envelope.clientAddress == "127.0.0.1"
        assert queued.envelope.helo == "client.example"
        files = list((tmp_path / "queue" / "active").iterdir())
        assert [f.name for f in files] == [queueId]
        data = await queued.read()
        assert data.startswith(b"Received: from client.example ([127.0.0.1])")
        assert data.endswith(message)
    finally:
        await port.stopListening()
        await mailQueue.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_queue_is_452(tmp_path, threadpool):
    mailQueue, port = await startQueueAndServer(
        tmp_path / "queue", threadpool, minFree=1 << 62
    )
    try:
        code, text = await deferToThread(
            send, port.getHost().port, ["alice@example.test"], b"Subject: x\r\n\r\nbody\r\n"
        )
        assert (code, text) == (452, b"4.3.1 Insufficient system storage")
        assert list((tmp_path / "queue" / "active").iterdir()) == []
    finally:
        await port.stopListening()
        await mailQueue.stop()
