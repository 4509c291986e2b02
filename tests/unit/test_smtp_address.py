"""
L{dcrouter.mail.address} (RFC 5321 paths and parameters), the envelope's
address type, and L{dcrouter.mail.policy.DomainPolicy}.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcrouter.mail.address import localPartProblem, parseParameters, parsePath
from dcrouter.mail.envelope import Envelope, MailAddress, SMTPReply, TLSInfo
from dcrouter.mail.policy import DomainPolicy, domainPattern


def sender(text, utf8=False):
    return parsePath(text, "sender", utf8=utf8)


def recipient(text, utf8=False):
    return parsePath(text, "recipient", utf8=utf8, postmasterDomain="mx.example")


@pytest.mark.parametrize(
    ("text", "local", "domain", "rest"),
    [
        ("<a@b.example>", "a", "b.example", ""),
        ("<a.b+c@B.Example> SIZE=10", "a.b+c", "B.Example", "SIZE=10"),
        ('<"a b"@x.example>', '"a b"', "x.example", ""),
        ('<"a>b"@x.example>', '"a>b"', "x.example", ""),
        ('<"a\\"b"@x.example>', '"a\\"b"', "x.example", ""),
        ("<@r1.example,@r2.example:a@b.example>", "a", "b.example", ""),
        ("<a@[192.0.2.1]>", "a", "[192.0.2.1]", ""),
        ("<a@[IPv6:2001:db8::1]>", "a", "[IPv6:2001:db8::1]", ""),
        ("<x@a-b.c1.example>", "x", "a-b.c1.example", ""),
    ],
)
def test_good_paths(text, local, domain, rest):
    address, after = recipient(text)
    assert (address.local, address.domain, after) == (local, domain, rest)


@pytest.mark.parametrize(
    "text",
    [
        "a@b.example",  # no brackets
        "<a@b.example",
        "<a@b.example>>",
        "<a@b.example>SIZE=1",  # no space before parameters
        "<>",  # empty forward-path
        "<a>",  # no domain
        "<a@>",
        "<@b.example>",
        "<a@b.example.>",
        "<a@-b.example>",
        "<a@b-.example>",
        "<a@b..example>",
        "<a@b@c.example>",
        "<a..b@c.example>",
        "<.a@c.example>",
        "<a.@c.example>",
        "<a b@c.example>",
        '<"a@c.example>',
        "<a@[300.1.1.1]>",
        "<a@[IPv6:zz]>",
        "<a@[tag:general]>",
        "<a@b_c.example>",
        "<@r1.example:>",
        "<" + "a" * 65 + "@b.example>",
        "<a@" + "b" * 64 + ".example>",
        "<a@" + ".".join(["b" * 60] * 5) + ">",
        "<a\u00e9@b.example>",  # UTF-8 without SMTPUTF8
    ],
)
def test_bad_paths(text):
    with pytest.raises(SMTPReply) as caught:
        recipient(text)
    assert caught.value.code in (501, 553)


def test_null_sender_and_postmaster():
    assert sender("<>") == (None, "")
    assert sender("<> BODY=8BITMIME") == (None, "BODY=8BITMIME")
    address, _ = recipient("<PostMaster>")
    assert address == MailAddress("PostMaster", "mx.example")
    with pytest.raises(SMTPReply):
        sender("<postmaster>")


def test_reply_codes():
    with pytest.raises(SMTPReply) as caught:
        sender("<a@@b>")
    assert (caught.value.code, caught.value.enhanced) == (501, "5.1.7")
    with pytest.raises(SMTPReply) as caught:
        recipient("<a@@b>")
    assert (caught.value.code, caught.value.enhanced) == (501, "5.1.3")
    with pytest.raises(SMTPReply) as caught:
        recipient("<j\u00f6rg@b.example>")
    assert (caught.value.code, caught.value.enhanced) == (553, "5.6.7")


def test_utf8_paths():
    address, _ = recipient("<j\u00f6rg@b\u00fccher.example>", utf8=True)
    assert address.local == "j\u00f6rg"
    assert address.asciiDomain == "xn--bcher-kva.example"
    with pytest.raises(SMTPReply):
        recipient("<a@b\u00fc\u200bcher..example>", utf8=True)
    # 64 octets, not characters.
    with pytest.raises(SMTPReply):
        recipient("<" + "\u00e9" * 33 + "@b.example>", utf8=True)


@given(st.text(max_size=80))
def test_parser_never_crashes(text):
    for utf8 in (False, True):
        try:
            recipient("<" + text + ">", utf8=utf8)
            sender("<" + text + "> " + text, utf8=utf8)
        except SMTPReply:
            pass


@pytest.mark.parametrize(
    ("local", "problem"),
    [
        ("alice", False),
        ("alice+tag", False),
        ('"alice smith"', False),
        ("a%b", True),
        ("a!b", True),
        ("a/b", True),
        ("a|b", True),
        ('"a@b"', True),
        ('".a"', True),
        ('"a."', True),
        ('"a..b"', True),
        ('""', True),
    ],
)
def test_local_part_problems(local, problem):
    assert (localPartProblem(MailAddress(local, "example.test")) is not None) == problem


def test_unquoted_local():
    assert MailAddress('"a\\"b c"', "x").unquotedLocal == 'a"b c'
    assert MailAddress("abc", "x").unquotedLocal == "abc"
    assert str(MailAddress('"a b"', "x.example")) == '"a b"@x.example'


def test_parameters():
    assert parseParameters("") == {}
    assert parseParameters("SIZE=10 body=8BITMIME SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    for bad in ["SIZE=", "-X=1", "SIZE=1 size=2", "A=b=c=\x7f", "X=a\u00e9"]:
        with pytest.raises(SMTPReply):
            parseParameters(bad)


def test_smtp_reply():
    reply = SMTPReply(550, "5.7.1", "Relay access denied")
    assert str(reply) == "550 5.7.1 Relay access denied"
    for code, enhanced in [(250, "2.0.0"), (550, "4.7.1"), (600, "6.0.0")]:
        with pytest.raises(ValueError):
            SMTPReply(code, enhanced, "x")


def test_envelope_and_tls_info():
    envelope = Envelope(id="X", mailFrom=None, client=None, server=None, helo="h")
    assert envelope.reversePath == "" and envelope.clientHost is None
    assert TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128).describe() == (
        "using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 (128 bits)"
    )


# -- DomainPolicy ----------------------------------------------------------------------


def check(policy, address, authenticated=False):
    envelope = Envelope(id="X", mailFrom=None, client=None, server=None, helo="h")
    local, _, domain = address.rpartition("@")
    try:
        policy.checkRecipient(envelope, MailAddress(local, domain), authenticated)
    except SMTPReply as e:
        return e.code
    return 250


def test_domain_policy():
    policy = DomainPolicy(["Example.TEST.", "*.wild.example", "b\u00fccher.example"])
    assert policy.domains == frozenset(
        {"example.test", "*.wild.example", "xn--bcher-kva.example"}
    )
    assert check(policy, "a@example.test") == 250
    assert check(policy, "a@EXAMPLE.test") == 250
    assert check(policy, "a@sub.example.test") == 550
    assert check(policy, "a@a.wild.example") == 250
    assert check(policy, "a@a.b.wild.example") == 250
    assert check(policy, "a@wild.example") == 550
    assert check(policy, "a@xwild.example") == 550
    assert check(policy, "a@b\u00fccher.example") == 250
    assert check(policy, "a@[127.0.0.1]") == 550
    assert check(policy, "a@elsewhere.example") == 550
    assert check(policy, "a@elsewhere.example", authenticated=True) == 250
    assert check(DomainPolicy(["x.example"], relayForAuthenticated=False), "a@y.example", True) == 550
    assert policy.checkSender(None, None) is None


def sends(policy, login, address):
    envelope = Envelope(id="X", mailFrom=None, client=None, server=None, helo="h",
                        authUser=login)
    local, _, domain = address.rpartition("@")
    try:
        policy.checkSender(envelope, MailAddress(local, domain))
    except SMTPReply as e:
        assert str(e).startswith(f"553 5.7.1 <{address}>: Sender address rejected: not owned")
        return e.code
    return 250


def test_users_send_only_as_what_they_own():
    policy = DomainPolicy(["example.test", "b\u00fccher.example"], senders={
        "alice": frozenset({"billing@example.test", "*@partner.test"}),
    })
    # A bare login: itself at each domain served here, any case.
    assert sends(policy, "alice", "alice@example.test") == 250
    assert sends(policy, "Alice", "ALICE@Example.Test") == 250
    assert sends(policy, "alice", '"alice"@example.test') == 250
    assert sends(policy, "alice", "alice@b\u00fccher.example") == 250
    assert sends(policy, "alice", "alice@elsewhere.test") == 553
    assert sends(policy, "alice", "bob@example.test") == 553
    assert sends(policy, "alice", "alice@[127.0.0.1]") == 553
    # What senders gives it.
    assert sends(policy, "alice", "Billing@example.test") == 250
    assert sends(policy, "alice", "anyone@partner.test") == 250
    assert sends(policy, "alice", "anyone@sub.partner.test") == 553
    assert sends(policy, "bob", "billing@example.test") == 553
    # A login that is an address owns that address, in any domain.
    assert sends(policy, "carol@elsewhere.test", "Carol@ELSEWHERE.test") == 250
    assert sends(policy, "carol@elsewhere.test", "carol@example.test") == 553
    # The null sender, clients that did not log in, and no check at all.
    assert policy.checkSender(
        Envelope(id="X", mailFrom=None, client=None, server=None, helo="h", authUser="a"), None
    ) is None
    assert sends(policy, None, "anyone@elsewhere.test") == 250
    assert sends(DomainPolicy(["example.test"]), "alice", "bob@elsewhere.test") == 250


def test_domain_patterns():
    assert domainPattern("*.Example.com.") == "*.example.com"
    for bad in ["", "*", "a.*.example", "*."]:
        with pytest.raises(ValueError):
            domainPattern(bad)


def test_a_single_address_is_accepted_without_its_domain():
    """A rule for alice@partner.example takes her mail, not all of partner.example."""
    policy = DomainPolicy(["example.test"], addresses=["Alice@Partner.Example"])
    assert check(policy, "alice@partner.example") == 250
    assert check(policy, "ALICE@partner.EXAMPLE") == 250
    assert check(policy, '"alice"@partner.example') == 250
    assert check(policy, "bob@partner.example") == 550
    assert check(policy, "alice@sub.partner.example") == 550
    with pytest.raises(ValueError):
        DomainPolicy([], addresses=["*@partner.example"])
