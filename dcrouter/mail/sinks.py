"""
L{QueueSink}: the ESMTP server's messages go into the durable mail queue.

The server streams DATA straight into the queue's
L{dcrouter.mail.queue.IncomingMessage} (no copy in between), and answers
250 only when its C{commit} says the message is on disk. The queue's
refusals become the replies RFC 5321 asks for: a full disk or quota
(L{QueueFull}) is 452 4.3.1, any other queue error 451 4.3.0.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.mail import queue
from dcrouter.mail.envelope import Envelope, SMTPReply
from dcrouter.mail.interfaces import IIncomingMessage, IStreamingSink

__all__ = ["QueueSink", "queueEnvelope"]


def queueEnvelope(envelope: Envelope) -> queue.Envelope:
    """
    The queue's envelope for a transaction: addresses as UTF-8 bytes, and
    MAIL's SMTPUTF8 and BODY, which delivery passes on.
    """
    return queue.Envelope(
        mailFrom=envelope.reversePath.encode("utf-8"),
        recipients=tuple(str(r).encode("utf-8") for r in envelope.recipients),
        clientAddress=envelope.clientHost or "",
        helo=envelope.helo,
        authUser=envelope.authUser,
        smtputf8=envelope.smtputf8,
        body=envelope.body,
    )


def _reply(reason: Failure) -> Failure:
    if reason.check(queue.QueueFull):
        return Failure(SMTPReply(452, "4.3.1", "Insufficient system storage"))
    if reason.check(queue.QueueError):
        return Failure(SMTPReply(451, "4.3.0", "Temporary failure queueing the message"))
    return reason


@implementer(IIncomingMessage)
class _QueuedMessage:
    def __init__(self, incoming: queue.IncomingMessage) -> None:
        self._incoming = incoming

    def write(self, data: bytes) -> None:
        self._incoming.write(data)

    def commit(self) -> Deferred[Any]:
        return self._incoming.commit().addErrback(_reply)

    def abort(self) -> None:
        self._incoming.abort()


@implementer(IStreamingSink)
@frozen
class QueueSink:
    """An L{IStreamingSink} over a started L{dcrouter.mail.queue.MailQueue}."""

    queue: queue.MailQueue

    def openMessage(self, envelope: Envelope) -> IIncomingMessage:
        return _QueuedMessage(self.queue.openMessage(queueEnvelope(envelope)))
