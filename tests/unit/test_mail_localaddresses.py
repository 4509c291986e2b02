"""This machine's interface addresses for the MX loop check under a wildcard bind."""

from __future__ import annotations

import errno
from ipaddress import ip_address

import pytest
from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher

from dcrouter.config.email import EmailSettings
from dcrouter.mail.delivery import MtaMode
from dcrouter.mail.deliveryclient import SMTPConnectionPool
from dcrouter.mail.localaddresses import InterfaceAddresses, interfaceAddresses
from dcrouter.mail.mxresolver import MXHost, MXResolver
from dcrouter.mail.queue import DeliveryResult, Envelope
from dcrouter.mail.service import localInterfaces, myself
from tests.unit.test_mail_delivery import (
    FakeResolver,
    ScriptedEndpoint,
    ScriptedServer,
    queued,
    rule,
)
from tests.unit.test_mail_queue import ManualPool, SyncPool, SyncReactor, fired

PUBLIC = ip_address("203.0.113.7")
PUBLIC6 = ip_address("2001:db8::7")


def test_this_machine_has_loopback():
    """A real getifaddrs(3) call: every Linux machine has 127.0.0.1 on lo."""
    addresses = interfaceAddresses()
    assert ip_address("127.0.0.1") in addresses
    assert all(address.version in (4, 6) for address in addresses)


class Reads:
    """An injected address source: counts its reads; answers or fails from a script."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.count = 0

    def __call__(self):
        self.count += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return frozenset(answer)


def source(reads, threadpool=None, **kwargs):
    clock = task.Clock()
    interfaces = InterfaceAddresses(
        SyncReactor(), threadpool or SyncPool(), clock, read=reads, **kwargs
    )
    return interfaces, clock


def test_addresses_are_read_again_only_after_their_lifetime():
    reads = Reads([PUBLIC], [PUBLIC, ip_address("203.0.113.8")])
    interfaces, clock = source(reads, lifetime=60)
    assert fired(interfaces.current()) == {PUBLIC}
    clock.advance(59)
    assert fired(interfaces.current()) == {PUBLIC} and reads.count == 1
    clock.advance(1)
    assert fired(interfaces.current()) == {PUBLIC, ip_address("203.0.113.8")}
    assert reads.count == 2


def test_callers_during_a_read_share_it_and_it_runs_in_the_pool():
    reads = Reads([PUBLIC])
    threads = ManualPool()
    interfaces, clock = source(reads, threadpool=threads)
    first, second = interfaces.current(), interfaces.current()
    assert len(threads.held) == 1 and not first.called and not second.called
    threads.runAll()
    assert fired(first) == fired(second) == {PUBLIC} and reads.count == 1


@pytest.mark.parametrize("versions, wanted", [((4,), {PUBLIC}), ((4, 6), {PUBLIC, PUBLIC6})])
def test_only_the_ip_versions_of_the_wildcard_count(versions, wanted):
    interfaces, clock = source(Reads([PUBLIC, PUBLIC6]), versions=versions)
    assert fired(interfaces.current()) == wanted


def test_a_failed_read_keeps_what_was_known_and_says_so():
    reads = Reads([PUBLIC], OSError(errno.EMFILE, "Too many open files"), [PUBLIC6])
    interfaces, clock = source(reads, lifetime=60)
    messages = []

    def observe(event):
        if event.get("log_namespace") == "dcrouter.mail.localaddresses":
            messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        assert fired(interfaces.current()) == {PUBLIC}
        clock.advance(60)
        assert fired(interfaces.current()) == {PUBLIC}
        assert fired(interfaces.current()) == {PUBLIC} and reads.count == 2  # not at once again
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(messages) == 1 and "Too many open files" in messages[0]
    clock.advance(60)
    assert fired(interfaces.current()) == {PUBLIC6}


def test_the_mail_service_reads_interfaces_only_under_a_wildcard_bind():
    threads = SyncPool()
    assert localInterfaces(("198.51.100.1", "2001:db8::1"), SyncReactor(), threads) is None
    assert localInterfaces(("0.0.0.0",), SyncReactor(), threads).versions == {4}
    assert localInterfaces(("::",), SyncReactor(), threads).versions == {4, 6}
    both = localInterfaces(("198.51.100.1", "::"), SyncReactor(), threads)
    assert both.versions == {4, 6}


def wildcardMode(tried, interfaces):
    """The MTA mode of a server bound to 0.0.0.0, named mx.me.example."""

    def endpoint(target):
        tried.append(target.serverName)
        return ScriptedEndpoint(ScriptedServer())

    pool = SMTPConnectionPool(
        SyncReactor(),
        "client.test",
        threadpool=SyncPool(),
        clock=task.Clock(),
        endpointFactory=endpoint,
    )
    resolver = FakeResolver(
        mx={"r.example": [(10, "other-name.example"), (20, "backup.example")]},
        a={"other-name.example": [str(PUBLIC)], "backup.example": ["192.0.2.9"]},
    )
    me = myself(EmailSettings(hostname="mx.me.example"), ("0.0.0.0",))
    return MtaMode(
        pool, MXResolver(resolver), SyncReactor(), SyncPool(), myself=me, interfaces=interfaces
    )


def test_an_mx_host_at_an_interface_address_is_this_server_under_a_wildcard_bind():
    """
    Postfix with inet_interfaces = all: the best MX is this machine under
    another name, at one of its interface addresses: the mail loops (5.4.6).
    Without the interface addresses it went to that host, that is to itself.
    """
    tried = []
    interfaces, clock = source(Reads([ip_address("127.0.0.1"), PUBLIC]))
    mode = wildcardMode(tried, interfaces)
    envelope = Envelope(b"a@s.example", (b"b@r.example",))
    [result] = fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert result == DeliveryResult(554, "5.4.6 mail for r.example loops back to myself")
    assert tried == []
    tried.clear()
    mode = wildcardMode(tried, None)
    fired(mode.deliver(envelope, queued(), (b"b@r.example",), rule("*", "mta")))
    assert tried == ["other-name.example"]


def test_myself_with_interface_addresses():
    me = myself(EmailSettings(hostname="mx.me.example"), ("0.0.0.0",))
    host = MXHost("other-name.example", 10, (str(PUBLIC),))
    assert not me.isMe(host, 25)
    assert me.including({PUBLIC}).isMe(host, 25)
    assert me.including({PUBLIC}).names == me.names
