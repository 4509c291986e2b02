"""
The interfaces the ESMTP server (L{dcrouter.mail.smtp}) is plugged into.

  - L{IMailPolicy}: who may send, and to whom (relay control);
  - L{IMessageSink} or L{IStreamingSink}: where an accepted message goes,
    durably, before the client hears 250.

Methods are declared without C{self}, as zope.interface wants. (These may
move to L{dcrouter.interfaces}; nothing here depends on where they live.)
"""

from __future__ import annotations

from typing import IO, Any

from zope.interface import Interface

__all__ = ["IIncomingMessage", "IMailPolicy", "IMessageSink", "IStreamingSink"]


class IMailPolicy(Interface):
    """
    Judges the senders and recipients of a transaction.

    Either method returns C{None} (accepted) or a C{Deferred} firing with
    C{None}; to refuse, raise (or fail the C{Deferred} with) an
    L{dcrouter.mail.envelope.SMTPReply} carrying the reply the client gets,
    e.g. C{SMTPReply(550, "5.7.1", "Relay access denied")}. Any other
    exception is logged and answered with a temporary C{451 4.3.0}, so a bug
    or an unreachable directory defers mail instead of bouncing it. A check
    that takes longer than the server's C{operationTimeout} is answered
    C{451} as well.

    The server has already checked the syntax, the transaction's order,
    authentication requirements of its mode and the recipient limit; the
    policy decides what is accepted, and must never accept a recipient in a
    domain it does not serve from an unauthenticated client (an open relay).
    """

    def checkSender(envelope: Any, address: Any) -> Any:  # noqa: N805
        """
        Judge MAIL FROM.

        @param envelope: the new L{dcrouter.mail.envelope.Envelope}
            (no recipients yet; C{envelope.authUser} tells who logged in).
        @param address: the L{dcrouter.mail.envelope.MailAddress}, or
            C{None} for the null sender C{<>}.
        """

    def checkRecipient(envelope: Any, address: Any, authenticated: bool) -> Any:  # noqa: N805
        """
        Judge one RCPT TO.

        @param envelope: the transaction so far (the recipients already
            accepted are in C{envelope.recipients}).
        @param address: the L{dcrouter.mail.envelope.MailAddress}.
        @param authenticated: the client has authenticated (SMTP AUTH), so
            it may relay anywhere the policy lets its users send.
        """


class IIncomingMessage(Interface):
    """
    One message being received, written as it arrives.

    The server calls L{write} with the message's bytes in order (its own
    C{Received:} header first, then the content, dot-unstuffed, lines
    ending in CRLF), then exactly one of L{commit} or L{abort}.
    """

    def write(data: bytes) -> None:  # noqa: N805
        """Add C{data} to the message. Never raises: errors wait for L{commit}."""

    def commit() -> Any:
        """
        The message is complete: make it durable.

        @return: a C{Deferred} that fires (with a queue ID C{str}, or
            C{None}) only once the message will survive a crash, and only
            then does the client get 250. It fails with an C{SMTPReply} to
            say what the client gets instead; with C{OSError} C{ENOSPC} or
            C{EDQUOT}, 452 4.3.1; with anything else, 451 4.3.0.
        """

    def abort() -> None:
        """Throw the message away: it was refused, or the client went away."""


class IStreamingSink(Interface):
    """Takes messages as they arrive (no copy in between): the queue's way."""

    def openMessage(envelope: Any) -> IIncomingMessage:  # noqa: N805
        """
        Start receiving a message for C{envelope} (its recipients are final).

        @param envelope: a L{dcrouter.mail.envelope.Envelope}; the server
            does not change it afterwards.
        """


class IMessageSink(Interface):
    """Takes whole messages: the simple way, for sinks that want a file."""

    def accept(envelope: Any, messageFile: IO[bytes]) -> Any:  # noqa: N805
        """
        Store one message durably.

        @param envelope: a L{dcrouter.mail.envelope.Envelope}; the server
            does not change it afterwards.
        @param messageFile: the message (as L{IIncomingMessage.write}
            describes it), readable and positioned at its start; the server
            closes it once the returned C{Deferred} has fired, so copy what
            you need before firing it.
        @return: a C{Deferred} as L{IIncomingMessage.commit} describes.
        """
