# ruff: noqa: N805  (zope interfaces declare methods without self)
"""
The interfaces of L{dcrouter.certs}.

They are meant to move into L{dcrouter.interfaces} with the others; until
then they live here so that the package stands on its own. Methods are
declared without C{self}, as zope.interface wants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from dcrouter.certs.material import CertificateEntry


class ICertificateStore(Interface):
    """
    Certificates by server name, held in memory, with change notification.

    A TLS handshake only ever calls L{get}, which never touches the disk;
    everything that writes returns a L{Deferred} and does its I/O off the
    reactor thread.
    """

    def get(serverName: Optional[str]) -> Optional[CertificateEntry]:
        """
        The certificate to serve for an SNI name, or C{None}.

        An exact name beats a wildcard; a wildcard C{*.example.com} covers
        exactly one label (C{a.example.com}, not C{example.com} nor
        C{a.b.example.com}). Among several, the one expiring last wins.
        An expired certificate yields to a current one of the other kind
        (a wildcard's, when the exact name's is no longer renewed), and is
        served only when there is none. Case and a trailing dot are ignored.
        """

    def find(names: Sequence[str]) -> Optional[CertificateEntry]:
        """
        The certificate (expiring last) whose names include every one of
        C{names}, literally: what the issuer compares a route's names with.
        """

    def store(names: Sequence[str], keyPEM: bytes, chainPEM: bytes) -> Deferred[CertificateEntry]:
        """
        Keep a certificate for C{names}, replacing the one stored for the
        same names, durably (written and fsynced before the L{Deferred}
        fires), then notify the subscribers.

        @param names: the names the certificate was requested for (one
            certificate per set of names).
        @param keyPEM: the unencrypted private key, PEM.
        @param chainPEM: the leaf certificate, then its intermediates, PEM.
        @return: fires with the new entry, or fails with
            L{dcrouter.certs.material.CertificateError} (nothing is changed):
            among others, a certificate that lacks one of C{names}.
        """

    def remove(names: Sequence[str]) -> Deferred[None]:
        """Forget the certificate stored for exactly C{names}, if any."""

    def list() -> list[CertificateEntry]:
        """Every certificate held, in no particular order."""

    def subscribe(
        callback: Callable[[tuple[str, ...], Optional[CertificateEntry]], object],
    ) -> Callable[[], None]:
        """
        Call C{callback(names, entry)} in the reactor thread after each change:
        C{names} as given to L{store} or L{remove}, C{entry} the new
        certificate or C{None} when it was removed.

        @return: a function that unsubscribes.
        """


class IChallengeResponder(Interface):
    """
    Answers one type of ACME challenge while the CA validates it.

    C{start} is called before the challenge is answered and C{stop} once
    the authorization is final (valid or not): a CA may validate more than
    once. Both run in the reactor thread.
    """

    challengeType = Attribute("C{str}: C{'http-01'}, C{'tls-alpn-01'} or C{'dns-01'}.")

    def start(name: str, token: str, keyAuthorization: str) -> Optional[Deferred[None]]:
        """
        Begin answering for C{name} (C{*.example.com} for a wildcard).

        @return: C{None} or a L{Deferred} firing once the answer is in
            place; a failure aborts the order.
        """

    def stop(name: str, token: str, keyAuthorization: str) -> Optional[Deferred[None]]:
        """Stop answering what L{start} began; unknown tokens are ignored."""


class IDNSRecords(Interface):
    """
    Record changes in an authoritative DNS server, for dns-01 challenges.

    dcrouter's own DNS server provides it. Names are absolute, without the
    trailing dot (C{_acme-challenge.www.example.com}); C{zone} is the zone
    holding them (C{example.com}). An RRset may hold several values (a
    certificate for C{example.com} and C{*.example.com} needs two TXT values
    at one name): C{setRecord} adds one, C{removeRecord} removes that one.
    """

    def setRecord(
        zone: str, name: str, type: str, value: str, ttl: int
    ) -> Optional[Deferred[None]]:
        """Add C{value} to the RRset, served from now on."""

    def removeRecord(zone: str, name: str, type: str, value: str) -> Optional[Deferred[None]]:
        """Remove C{value} from the RRset; a value not there is ignored."""


class IAcmeSession(Interface):
    """
    One issuance job's conversation with an ACME server.

    Every method blocks (network I/O) and is called in the thread pool, one
    at a time: a session is never shared between jobs. Failures are raised
    as L{dcrouter.certs.acme.AcmeFailure}. L{dcrouter.certs.acme.LibrarySession}
    is the real one (certbot's C{acme}); tests give a fake.
    """

    def open() -> None:
        """Fetch the directory and find or create the account."""

    def order(names: Sequence[str], csrPEM: bytes) -> tuple[Any, list[Any]]:
        """
        Place an order.

        @return: the order (opaque, for L{finalize}) and the
            L{dcrouter.certs.acme.PendingAuthorization}s still to validate
            (those already valid are left out).
        """

    def answer(authorization: Any, challengeType: str) -> None:
        """Tell the CA to validate C{authorization} by C{challengeType}."""

    def finalize(order: Any, timeout: float) -> str:
        """
        Wait for the authorizations, finalize, and download the certificate.

        @param timeout: seconds to wait for the CA in all.
        @return: the full chain, PEM.
        """

    def renewalInfo(certPEM: bytes) -> tuple[Optional[float], Optional[float]]:
        """
        ACME Renewal Information (ARI) for a certificate.

        @return: when to renew and when to ask again (POSIX times), or
            C{(None, None)} when the server or the library has no ARI.
        """
