"""
Email: the ESMTP server, its policy and sink interfaces, the durable queue
and delivery.

Receiving (see each module's docstring):

  - L{dcrouter.mail.smtp}: the hardened ESMTP server (ports 25, 587, 465).
  - L{dcrouter.mail.address}: RFC 5321 paths and MAIL/RCPT parameters.
  - L{dcrouter.mail.envelope}: what a transaction carries.
  - L{dcrouter.mail.interfaces}: L{IMailPolicy} (who may send to whom) and
    the sinks that take accepted messages, durably.
  - L{dcrouter.mail.policy}: a domain list policy (no open relay).
  - L{dcrouter.mail.sinks}: the server's messages into the mail queue.

Queueing and delivery live in L{dcrouter.mail.queue} and the modules it uses.
"""
