"""
The ACME issuing service: certificates for routes that say C{certificate = auto}.

L{AcmeIssuer} is txacme's architecture on top of certbot's C{acme} library
(txacme itself speaks only ACMEv1): an issuing service that decides what to
obtain and when, an L{ICertificateStore} that keeps the results, and
L{IChallengeResponder}s that answer the CA's validations. The blocking
client runs in the thread pool, one L{LibrarySession} (so one
C{ClientNetwork}, which is not thread-safe) per job, every call bounded by
a timeout.

When something is obtained:
  - a route's names (one certificate per route, its names as SANs) with no
    certificate that includes them all: at once;
  - a certificate C{renew_days} before it expires, but not before a third
    of its lifetime remains (when Caddy renews; 90-day certificates renew at
    60 days either way), so that neither a short-lived profile nor a lifetime
    just longer than C{renew_days} renews soon after issue; earlier when
    the CA's renewal information (ARI, acme >= 4) says so;
  - after a failure, not before its backoff ends: C{backoffBase} doubling
    per failure up to C{backoffMax}, at least the CA's C{Retry-After} (held
    to a week, and to end a day before the old certificate expires), at
    least C{rateLimitDelay} after a rate-limit error. Backoff is kept per
    name (the names a failed validation points at, or all of the order's),
    in C{<state_dir>/acme/backoff.json}, so a restart neither forgets it
    nor starts a storm. A job that crashed holds its names off for
    C{backoffBase} at least. The old certificate keeps serving meanwhile.

Works with Debian bookworm's acme 2.1 / josepy 1.13 and the newest acme;
see C{shared/notes/acme.md} for the differences handled here.
"""

from __future__ import annotations

import contextlib
import datetime as _datetime
import email.utils
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import josepy as jose
import requests
from acme import challenges as acmeChallenges
from acme import client as acmeClient
from acme import errors as acmeErrors
from acme import messages
from attrs import define, field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    DeferredSemaphore,
    FirstError,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter import __version__, files
from dcrouter.certs.interfaces import IAcmeSession, ICertificateStore, IChallengeResponder
from dcrouter.certs.material import CertificateEntry, CertificateError
from dcrouter.certs.names import isWildcard, normalizeNames
from dcrouter.threads import CallTimedOut, ThreadCalls

__all__ = [
    "CHALLENGE_TYPES",
    "DIRECTORIES",
    "AcmeAccount",
    "AcmeFailure",
    "AcmeIssuer",
    "AcmeSettings",
    "LibrarySession",
    "PendingAuthorization",
    "makeKeyAndCSR",
]

#: The C{directory} words and the URLs they stand for.
DIRECTORIES = {
    "production": "https://acme-v02.api.letsencrypt.org/directory",
    "staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}

#: Challenge types dcrouter answers, in its order of preference.
CHALLENGE_TYPES = ("http-01", "tls-alpn-01", "dns-01")

#: Certificate key types.
KEY_TYPES = ("ec-p256", "rsa-2048")

DAY = 86400.0

#: How long to wait before asking again for renewal information that said nothing.
ARI_DEFAULT_RETRY = 6 * 3600.0

#: The longest C{Retry-After} honoured.
RETRY_AFTER_MAX = 7 * DAY

#: How long before the certificate still serving expires a C{Retry-After} ends at the latest.
RETRY_AFTER_EXPIRY_MARGIN = DAY

_BACKOFF_FILE = "backoff.json"
_BACKOFF_VERSION = 1


def _checkChallenge(instance: Any, attribute: Any, value: str) -> None:
    if value not in CHALLENGE_TYPES:
        raise ValueError(f"challenge {value!r} is not one of {', '.join(CHALLENGE_TYPES)}")


def _checkPositive(instance: Any, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _checkKeyType(instance: Any, attribute: Any, value: str) -> None:
    if value not in KEY_TYPES:
        raise ValueError(f"keyType {value!r} is not one of {', '.join(KEY_TYPES)}")


@frozen
class AcmeSettings:
    """
    C{[acme]}, and the knobs tests turn.

    @ivar directory: C{production}, C{staging} or the directory URL.
    @ivar caBundle: PEM file of the CA that signs the ACME server's own TLS
        certificate (Pebble's), or C{None} for the system's.
    @ivar accountEmail: contact of the account, or C{None}.
    @ivar renewDays: renew this many days before expiry, or when a third
        of the lifetime remains if that is later.
    @ivar challenge: preferred challenge type (wildcards always use dns-01).
    @ivar networkTimeout: seconds for one HTTP request to the ACME server.
    @ivar orderTimeout: seconds the CA may take to validate and issue.
    @ivar concurrency: jobs running at once.
    """

    directory: str = "production"
    caBundle: Optional[str] = None
    accountEmail: Optional[str] = None
    renewDays: float = field(default=30.0, validator=_checkPositive)
    challenge: str = field(default="http-01", validator=_checkChallenge)
    keyType: str = field(default="ec-p256", validator=_checkKeyType)
    checkInterval: float = field(default=3600.0, validator=_checkPositive)
    backoffBase: float = field(default=300.0, validator=_checkPositive)
    backoffMax: float = field(default=DAY, validator=_checkPositive)
    rateLimitDelay: float = 3600.0
    networkTimeout: float = field(default=30.0, validator=_checkPositive)
    orderTimeout: float = field(default=120.0, validator=_checkPositive)
    concurrency: int = field(default=1, validator=_checkPositive)
    stopTimeout: float = 10.0
    userAgent: str = f"dcrouter/{__version__}"

    @property
    def directoryURL(self) -> str:
        """The directory URL, C{production} and C{staging} resolved."""
        return DIRECTORIES.get(self.directory, self.directory)


class AcmeFailure(Exception):
    """
    An issuance that did not work out, said for an operator.

    @ivar names: the names it is the fault of, when the CA said which
        (a failed validation); empty means the whole order.
    @ivar retryAfter: seconds the CA asked to wait, if it did.
    @ivar rateLimited: the CA refused because of a rate limit.
    """

    def __init__(
        self,
        message: str,
        *,
        names: Sequence[str] = (),
        retryAfter: Optional[float] = None,
        rateLimited: bool = False,
    ) -> None:
        super().__init__(message)
        self.names = tuple(names)
        self.retryAfter = retryAfter
        self.rateLimited = rateLimited

    def __str__(self) -> str:
        return str(self.args[0])


@frozen
class PendingAuthorization:
    """
    One name of an order still to validate.

    @ivar name: as ordered; C{*.example.com} for a wildcard.
    @ivar offered: challenge type to C{(token, keyAuthorization)}, for the
        types dcrouter answers that the CA offers.
    @ivar handle: the session's own, for L{IAcmeSession.answer}.
    """

    name: str
    offered: Mapping[str, tuple[str, str]]
    handle: Any = field(default=None, eq=False, repr=False)


# -- keys and CSRs ------------------------------------------------------------------


def makeKeyAndCSR(names: Sequence[str], keyType: str = "ec-p256") -> tuple[bytes, bytes]:
    """
    A new private key and a CSR for C{names} (all as SANs), both PEM.
    Blocking for the CPU (RSA): for the thread pool.
    """
    key: Any
    if keyType == "rsa-2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return keyPEM, csr.public_bytes(serialization.Encoding.PEM)


# -- the account ----------------------------------------------------------------------


class AcmeAccount:
    """
    The account key in the state directory and the account's registration,
    shared by every session of one issuer (thread-safe).

    The key (EC P-256, ES256) is made once, mode 0600, one per directory
    URL (an account at a staging CA is none at the production one). After a
    restart the account is found again by its key (C{onlyReturnExisting});
    a CA that forgot it (Pebble restarted) gets a new registration with the
    same key.
    """

    def __init__(self, stateDir: str, settings: AcmeSettings) -> None:
        """@param stateDir: C{<state_dir>/acme}."""
        digest = hashlib.sha256(settings.directoryURL.encode("utf-8")).hexdigest()[:12]
        self.path = os.path.join(stateDir, f"account-{digest}.key")
        self._settings = settings
        self._lock = threading.Lock()
        self._key: Optional[jose.JWK] = None
        self._alg: Any = jose.ES256
        self._keyExisted = False
        self._registration: Optional[messages.RegistrationResource] = None

    @property
    def uri(self) -> Optional[str]:
        """The account URL, once registered or found."""
        registration = self._registration
        return str(registration.uri) if registration is not None else None

    def key(self) -> tuple[jose.JWK, Any]:
        """The account key and its JWS algorithm, loading or making it. Blocking."""
        with self._lock:
            if self._key is None:
                self._key, self._alg = self._loadOrCreate()
            return self._key, self._alg

    def _loadOrCreate(self) -> tuple[jose.JWK, Any]:
        try:
            data = files.readFile(self.path)
        except FileNotFoundError:
            private = ec.generate_private_key(ec.SECP256R1())
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            files.ensureDirectory(os.path.dirname(self.path))
            files.writeAtomically(self.path, pem, 0o600)
            return jose.JWKEC(key=private), jose.ES256
        self._keyExisted = True
        loaded = serialization.load_pem_private_key(data, password=None)
        if isinstance(loaded, rsa.RSAPrivateKey):
            return jose.JWKRSA(key=loaded), jose.RS256
        if isinstance(loaded, ec.EllipticCurvePrivateKey):
            algs = {256: jose.ES256, 384: jose.ES384, 521: jose.ES512}
            return jose.JWKEC(key=loaded), algs[loaded.curve.key_size]
        raise AcmeFailure(f"{self.path}: the account key is neither RSA nor EC")

    def register(self, client: acmeClient.ClientV2) -> messages.RegistrationResource:
        """
        Set C{client}'s account: the one known, found by its key, or new.
        Blocking (network).
        """
        with self._lock:
            if self._registration is not None:
                client.net.account = self._registration
                return self._registration
            new = messages.NewRegistration.from_data(
                email=self._settings.accountEmail, terms_of_service_agreed=True
            )
            registration: Optional[messages.RegistrationResource] = None
            if self._keyExisted:
                registration = self._findExisting(client, new)
            if registration is None:
                try:
                    registration = client.new_account(new)
                except acmeErrors.ConflictError as e:  # registered meanwhile
                    registration = self._query(client, e.location)
            self._registration = registration
            return registration

    def _findExisting(
        self, client: acmeClient.ClientV2, new: messages.NewRegistration
    ) -> Optional[messages.RegistrationResource]:
        try:
            client.new_account(new.update(only_return_existing=True))
        except acmeErrors.ConflictError as e:
            return self._query(client, e.location)
        except messages.Error as e:
            if e.code != "accountDoesNotExist":
                raise
        return None

    @staticmethod
    def _query(client: acmeClient.ClientV2, location: str) -> messages.RegistrationResource:
        return client.query_registration(
            messages.RegistrationResource(uri=location, body=messages.Registration())
        )

    def forget(self) -> None:
        """Drop the registration (the CA no longer knows it): look it up again next time."""
        with self._lock:
            self._registration = None


# -- one job's conversation with the CA --------------------------------------------


class _Network(acmeClient.ClientNetwork):
    """C{ClientNetwork} that remembers the last response's C{Retry-After}."""

    retryAfterHeader: Optional[str] = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.retryAfterHeader = response.headers.get("Retry-After")
        return response


class _TLSALPN01Response(acmeChallenges.KeyAuthorizationChallengeResponse):
    """The tls-alpn-01 response (acme 5 dropped its own, acme 2.1's is outdated)."""

    typ = "tls-alpn-01"


def _retryAfterSeconds(header: Optional[str]) -> Optional[float]:
    """C{Retry-After} (seconds or an HTTP date) as seconds from now."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_datetime.UTC)
    return max(0.0, (when - _datetime.datetime.now(_datetime.UTC)).total_seconds())


def _epoch(when: Optional[_datetime.datetime]) -> Optional[float]:
    """A library datetime as POSIX time (a naive one is local time, as acme makes them)."""
    return when.timestamp() if when is not None else None


def _problem(error: Any) -> str:
    """An ACME problem document as one line."""
    code = getattr(error, "code", None) or getattr(error, "typ", None) or "error"
    detail = getattr(error, "detail", None) or getattr(error, "description", None) or ""
    text = f"{code}: {detail}" if detail else str(code)
    for sub in getattr(error, "subproblems", None) or ():
        identifier = getattr(sub, "identifier", None)
        where = f"{identifier.value}: " if identifier is not None else ""
        text += f"; {where}{_problem(sub)}"
    return text


def _authorizationName(authzr: messages.AuthorizationResource) -> str:
    body = authzr.body
    name = str(body.identifier.value)
    return "*." + name if getattr(body, "wildcard", False) else name


def _challengeFields(challb: messages.ChallengeBody) -> dict[str, Any]:
    """A challenge's JSON (acme 5 parses tls-alpn-01 as an unrecognized challenge)."""
    fields = challb.chall.to_partial_json()
    return dict(fields) if isinstance(fields, Mapping) else {}


@implementer(IAcmeSession)
class LibrarySession:
    """
    L{IAcmeSession} over certbot's C{acme}: a C{ClientNetwork} of its own,
    the account shared through L{AcmeAccount}. Every method blocks.
    """

    def __init__(self, settings: AcmeSettings, account: AcmeAccount) -> None:
        self._settings = settings
        self._account = account
        self._client: Optional[acmeClient.ClientV2] = None
        self._net: Optional[_Network] = None

    def _connect(self) -> acmeClient.ClientV2:
        if self._client is None:
            key, alg = self._account.key()
            self._net = _Network(
                key=key,
                alg=alg,
                verify_ssl=self._settings.caBundle or True,  # type: ignore[arg-type]
                user_agent=self._settings.userAgent,
                timeout=self._settings.networkTimeout,  # type: ignore[arg-type]
            )
            directory = acmeClient.ClientV2.get_directory(self._settings.directoryURL, self._net)
            self._client = acmeClient.ClientV2(directory, self._net)
        return self._client

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Raise every failure as an L{AcmeFailure}."""
        try:
            yield
        except AcmeFailure:
            raise
        except Exception as e:
            raise self._translate(e) from e

    def _translate(self, e: Exception) -> AcmeFailure:
        if isinstance(e, acmeErrors.ValidationError):
            names, details = [], []
            for authzr in e.failed_authzrs:
                name = _authorizationName(authzr)
                names.append(name)
                for challb in authzr.body.challenges:
                    if challb.error is not None:
                        typ = _challengeFields(challb).get("type", "?")
                        details.append(f"{name} ({typ}): {_problem(challb.error)}")
            reasons = "; ".join(details) or "no reason given"
            return AcmeFailure(f"validation failed: {reasons}", names=names)
        if isinstance(e, messages.Error):
            if e.code in ("accountDoesNotExist", "unauthorized"):
                self._account.forget()
            header = self._net.retryAfterHeader if self._net is not None else None
            names = [
                str(sub.identifier.value)
                for sub in (e.subproblems or ())
                if sub.identifier is not None
            ]
            return AcmeFailure(
                f"the CA refused: {_problem(e)}",
                names=names,
                retryAfter=_retryAfterSeconds(header),
                rateLimited=e.code == "rateLimited",
            )
        if isinstance(e, acmeErrors.IssuanceError):
            return AcmeFailure(f"the order failed: {_problem(e.error)}")
        if isinstance(e, acmeErrors.TimeoutError):
            return AcmeFailure(f"the CA did not finish within {self._settings.orderTimeout:g} s")
        if isinstance(e, requests.exceptions.RequestException) or isinstance(
            e.__context__, requests.exceptions.RequestException
        ):  # acme 2.1 re-raises connection errors as a ValueError
            return AcmeFailure(f"cannot reach the ACME server {self._settings.directoryURL}: {e}")
        return AcmeFailure(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    def open(self) -> None:
        """See L{IAcmeSession.open}."""
        with self._translated():
            self._account.register(self._connect())

    def order(self, names: Sequence[str], csrPEM: bytes) -> tuple[Any, list[Any]]:
        """See L{IAcmeSession.order}."""
        with self._translated():
            client = self._connect()
            key, _ = self._account.key()
            thumbprint = jose.b64encode(key.thumbprint()).decode("ascii")
            orderr = client.new_order(csrPEM)
            pending = []
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # the CA reused a valid authorization
                offered: dict[str, tuple[str, str]] = {}
                handles: dict[str, messages.ChallengeBody] = {}
                for challb in authzr.body.challenges:
                    fields = _challengeFields(challb)
                    typ, token = fields.get("type"), fields.get("token")
                    if typ in CHALLENGE_TYPES and isinstance(token, str):
                        offered[typ] = (token, f"{token}.{thumbprint}")
                        handles[typ] = challb
                pending.append(PendingAuthorization(_authorizationName(authzr), offered, handles))
            return orderr, pending

    def answer(self, authorization: Any, challengeType: str) -> None:
        """See L{IAcmeSession.answer}."""
        with self._translated():
            client = self._connect()
            challb = authorization.handle[challengeType]
            response: Any
            if challengeType == "tls-alpn-01":
                response = _TLSALPN01Response(
                    key_authorization=authorization.offered[challengeType][1]
                )
            else:
                key, _ = self._account.key()
                response = challb.chall.response(key)
            client.answer_challenge(challb, response)

    def finalize(self, order: Any, timeout: float) -> str:
        """See L{IAcmeSession.finalize}."""
        with self._translated():
            client = self._connect()
            deadline = _datetime.datetime.now() + _datetime.timedelta(seconds=timeout)
            finished = client.poll_and_finalize(order, deadline)
            return str(finished.fullchain_pem)

    def renewalInfo(self, certPEM: bytes) -> tuple[Optional[float], Optional[float]]:
        """See L{IAcmeSession.renewalInfo}."""
        renewalTime = getattr(acmeClient.ClientV2, "renewal_time", None)
        if renewalTime is None:
            return None, None  # acme < 4
        with self._translated():
            client = self._connect()
            try:
                client.directory["renewalInfo"]
            except KeyError:
                return None, None
            renewAt, nextCheck = client.renewal_time(certPEM)
            return _epoch(renewAt), _epoch(nextCheck)


# -- the issuing service --------------------------------------------------------------


@frozen
class _Want:
    names: tuple[str, ...]
    challenge: Optional[str]


@define
class _Backoff:
    """One name's failures: persisted."""

    failures: int
    nextAttempt: float
    lastError: str
    lastFailure: float


class _Job:
    """One issuance in progress, that others can wait for."""

    def __init__(self, route: str, names: tuple[str, ...]) -> None:
        self.route = route
        self.names = names
        self.done = False
        self._waiters: list[Deferred[None]] = []

    def whenDone(self) -> Deferred[None]:
        if self.done:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def finish(self) -> None:
        self.done = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


def _observe(d: Deferred[None]) -> Deferred[None]:
    """A new L{Deferred} firing when C{d} does, leaving C{d}'s result alone."""
    observer: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        observer.callback(None)
        return result

    d.addBoth(fire)
    return observer


def _iso(when: Optional[float]) -> Optional[str]:
    if when is None:
        return None
    return _datetime.datetime.fromtimestamp(when, _datetime.UTC).isoformat()


class AcmeIssuer(Service):
    """
    Obtains and renews the certificates routes want, into a store.

    Tell it what is wanted with L{want} (and L{forget}); it checks at
    start, after each change, and then when the next certificate falls due
    (at least every C{checkInterval} seconds). L{status} says how each
    certificate stands.
    """

    log = Logger()

    def __init__(
        self,
        settings: AcmeSettings,
        stateDir: str,
        store: ICertificateStore,
        responders: Iterable[IChallengeResponder],
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: Optional[IReactorTime] = None,
        *,
        sessionFactory: Optional[Callable[[], IAcmeSession]] = None,
    ) -> None:
        """
        @param stateDir: dcrouter's C{state_dir}; this uses C{acme/} in it.
        @param responders: one per challenge type answered.
        @param reactor: delivers thread results and times the blocking calls
            out (an C{IReactorTime} too).
        @param threadpool: where the ACME client and disk writes run; its
            owner starts and stops it.
        @param clock: what "now" is and what schedules checks (default the
            reactor); POSIX time, as certificates and the backoff file use.
        @param sessionFactory: makes one L{IAcmeSession} per job (default
            L{LibrarySession}).
        """
        self.settings = settings
        self._stateDir = os.path.join(stateDir, "acme")
        self._store = store
        self._responders = {r.challengeType: r for r in responders}
        timer: Any = reactor
        self._clock: IReactorTime = clock if clock is not None else timer
        self._timeouts: IReactorTime = timer
        self._calls = ThreadCalls(reactor, threadpool, timer, timeout=settings.networkTimeout * 4)
        self.account = AcmeAccount(self._stateDir, settings)
        self._sessionFactory = sessionFactory or self._librarySession
        self._wanted: dict[str, _Want] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._running: dict[tuple[str, ...], _Job] = {}
        self._ari: dict[str, tuple[Optional[float], float]] = {}
        self._ariRunning: set[str] = set()
        self._ariSupported: Optional[bool] = None
        self._semaphore = DeferredSemaphore(settings.concurrency)
        self._saving = DeferredLock()
        self._timer: Optional[IDelayedCall] = None
        self._ready: Optional[Deferred[None]] = None

    def _librarySession(self) -> IAcmeSession:
        return LibrarySession(self.settings, self.account)

    # -- what is wanted ----------------------------------------------------------

    def want(self, routeName: str, names: Sequence[str], challenge: Optional[str] = None) -> None:
        """
        Route C{routeName} wants one certificate for C{names}.

        @param challenge: the type to validate with (default the settings');
            wildcards are always validated by dns-01.
        @raise ValueError: a bad name, an unknown challenge type, or one no
            responder answers.
        """
        key = normalizeNames(names)
        preferred = challenge or self.settings.challenge
        if preferred not in CHALLENGE_TYPES:
            raise ValueError(f"challenge {preferred!r} is not one of {', '.join(CHALLENGE_TYPES)}")
        needed = {"dns-01" if isWildcard(n) else preferred for n in key}
        missing = sorted(needed - set(self._responders))
        if missing:
            raise ValueError(
                f"route {routeName}: {', '.join(missing)} cannot be answered here"
                f" (answered: {', '.join(sorted(self._responders)) or 'none'})"
            )
        want = _Want(key, challenge)
        if self._wanted.get(routeName) != want:
            self._wanted[routeName] = want
            self._wake(0)

    def forget(self, routeName: str) -> None:
        """Route C{routeName} wants no certificate any more (its stored one stays)."""
        if self._wanted.pop(routeName, None) is not None:
            self._pruneRenewalInfo()
            self._wake(0)

    def wanted(self) -> dict[str, tuple[str, ...]]:
        """Route name to the names it wants."""
        return {route: want.names for route, want in self._wanted.items()}

    # -- service -----------------------------------------------------------------

    def load(self) -> Deferred[None]:
        """
        Read the persisted backoff state (L{startService} does it first);
        checks wait for it.
        """
        ready: Deferred[None] = Deferred()
        self._ready = ready

        def loaded(records: dict[str, _Backoff]) -> None:
            self._backoff = records

        def unreadable(failure: Failure) -> None:
            self.log.failure("ACME backoff state unreadable; starting without it", failure)

        def done(_: object) -> None:
            ready.callback(None)
            self._wake(0)

        self._calls.run(self._readBackoff).addCallbacks(loaded, unreadable).addBoth(done)
        return _observe(ready)

    def startService(self) -> None:
        """Load the backoff state, then check."""
        super().startService()
        self.load()

    def stopService(self) -> Deferred[None]:
        """Stop checking; wait (at most C{stopTimeout}) for jobs in progress."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting = [job.whenDone() for job in self._running.values()]
        if not waiting:
            return succeed(None)
        d: Deferred[Any] = gatherResults(waiting)
        d.addTimeout(self.settings.stopTimeout, self._timeouts)
        d.addErrback(
            lambda f: self.log.warn("ACME jobs still running at stop: {f}", f=f.getErrorMessage())
        )
        return d.addCallback(lambda _: None)

    def _wake(self, delay: float) -> None:
        """Check in C{delay} seconds (or sooner, if already due sooner)."""
        if not self.running or (self._ready is not None and not self._ready.called):
            return
        delay = max(0.0, delay)
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._timerFired)

    def _timerFired(self) -> None:
        self._timer = None
        self.checkNow().addErrback(lambda f: self.log.failure("ACME check failed", f))

    # -- scheduling --------------------------------------------------------------

    def renewAt(self, entry: CertificateEntry) -> float:
        """
        When C{entry} is due for renewal (POSIX time), before any backoff:
        C{renewDays} before it expires, but not before a third of its
        lifetime remains (when Caddy renews), so that a short-lived
        profile or a lifetime just longer than C{renewDays} is not renewed
        soon after issue; earlier when the CA's renewal information says so.
        """
        notBefore = entry.notBefore.timestamp()
        notAfter = entry.notAfter.timestamp()
        due = notAfter - min(self.settings.renewDays * DAY, (notAfter - notBefore) / 3)
        ari = self._ari.get(entry.fingerprint)
        if ari is not None and ari[0] is not None:
            due = min(due, ari[0])
        return min(due, notAfter)

    def blockedUntil(self, names: Iterable[str]) -> float:
        """When the backoff of C{names} ends (0: none)."""
        return max((self._backoff[n].nextAttempt for n in names if n in self._backoff), default=0.0)

    def _nextAttempt(self, want: _Want, entry: Optional[CertificateEntry]) -> float:
        due = 0.0 if entry is None else self.renewAt(entry)
        return max(due, self.blockedUntil(want.names))

    def renewNow(self, name: str) -> Deferred[None]:
        """
        Issue the certificate that covers C{name} now, due or not, backoff
        or not (an operator's order, from C{dcrouter certs renew NAME}).

        @return: fires when the job is done, whatever its outcome; fails
            with C{KeyError} if no route wants C{name}.
        """
        for route, want in sorted(self._wanted.items()):
            if name in want.names:
                job = self._running.get(want.names)
                if job is None:
                    job = self._startJob(route, want, self._store.find(want.names))
                return job.whenDone()
        return fail(KeyError(name))

    def checkNow(self) -> Deferred[None]:
        """
        Start every job that is due, refresh renewal information, and
        schedule the next check.

        @return: fires when the jobs due (those started now and those
            already running) are finished, whatever their outcome.
        """
        if self._ready is not None and not self._ready.called:
            return _observe(self._ready).addCallback(lambda _: self.checkNow())
        now = self._clock.seconds()
        waiting = []
        for route, want in sorted(self._wanted.items()):
            job = self._running.get(want.names)
            if job is not None:
                waiting.append(job.whenDone())
                continue
            entry = self._store.find(want.names)
            if now >= self._nextAttempt(want, entry):
                waiting.append(self._startJob(route, want, entry).whenDone())
            elif entry is not None:
                self._refreshRenewalInfo(entry, now)
        self._pruneBackoff(now)
        self._reschedule()
        return gatherResults(waiting).addCallback(lambda _: None)

    def _pruneBackoff(self, now: float) -> None:
        """
        Forget the failures of names no route wants any more, once their
        backoff is over: until then a name removed and added back still
        waits (the CA's rate limits do not forget either).
        """
        wanted = {name for want in self._wanted.values() for name in want.names}
        stale = [n for n, r in self._backoff.items() if n not in wanted and r.nextAttempt <= now]
        if not stale:
            return
        for name in stale:
            del self._backoff[name]
        self._saveBackoff().addErrback(
            lambda f: self.log.failure("ACME backoff state not saved", f)
        )

    def _reschedule(self) -> None:
        self._pruneRenewalInfo()
        now = self._clock.seconds()
        wake = now + self.settings.checkInterval
        for want in self._wanted.values():
            if want.names in self._running:
                continue
            wake = min(wake, self._nextAttempt(want, self._store.find(want.names)))
        self._wake(max(wake - now, 1.0))

    def _pruneRenewalInfo(self) -> None:
        """
        Forget the renewal information of certificates no wanted names are
        served by any more (replaced, or their route gone).
        """
        if not self._ari:
            return
        current = set()
        for want in self._wanted.values():
            entry = self._store.find(want.names)
            if entry is not None:
                current.add(entry.fingerprint)
        for fingerprint in set(self._ari) - current:
            del self._ari[fingerprint]

    def _refreshRenewalInfo(self, entry: CertificateEntry, now: float) -> None:
        """Ask the CA for ARI about C{entry} when it is time to."""
        cached = self._ari.get(entry.fingerprint)
        if self._ariSupported is False or entry.fingerprint in self._ariRunning:
            return
        if cached is not None and cached[1] > now:
            return
        self._ariRunning.add(entry.fingerprint)
        session = self._sessionFactory()
        d = self._calls.run(session.renewalInfo, entry.chainPEM)

        def got(result: tuple[Optional[float], Optional[float]]) -> None:
            renewAt, nextCheck = result
            if renewAt is None and nextCheck is None:
                self._ariSupported = False
                return
            self._ariSupported = True
            self._ari[entry.fingerprint] = (renewAt, nextCheck or now + ARI_DEFAULT_RETRY)
            self._reschedule()

        def failed(failure: Failure) -> None:
            self.log.info(
                "renewal information for {names} unavailable: {why}",
                names=", ".join(entry.names),
                why=failure.getErrorMessage(),
            )
            previous = cached[0] if cached is not None else None
            self._ari[entry.fingerprint] = (previous, now + ARI_DEFAULT_RETRY)

        def finished(_: object) -> None:
            self._ariRunning.discard(entry.fingerprint)

        d.addCallbacks(got, failed).addBoth(finished)

    # -- one issuance --------------------------------------------------------------

    def _startJob(self, route: str, want: _Want, entry: Optional[CertificateEntry]) -> _Job:
        job = _Job(route, want.names)
        self._running[want.names] = job

        def run() -> Deferred[None]:
            return Deferred.fromCoroutine(self._issue(job, want, entry))

        def finished(result: object) -> None:
            self._running.pop(want.names, None)
            job.finish()
            self._reschedule()

        def crashed(failure: Failure) -> None:
            self.log.failure("ACME job for {route} crashed", failure, route=route)
            self._holdOff(want.names, failure)

        d = self._semaphore.run(run)
        d.addErrback(crashed)
        d.addBoth(finished)
        return job

    def _holdOff(self, names: tuple[str, ...], failure: Failure) -> None:
        """
        After a job crashed: none of C{names} is ordered again before
        C{backoffBase}, whatever the crash left of their backoff, so that a
        bug cannot become an order per check.
        """
        now = self._clock.seconds()
        why = f"the job crashed: {type(failure.value).__name__}: {failure.value}"
        for name in names:
            record = self._backoff.get(name) or _Backoff(0, 0.0, why, now)
            record.nextAttempt = max(record.nextAttempt, now + self.settings.backoffBase)
            self._backoff[name] = record
        self._saveBackoff().addErrback(
            lambda f: self.log.failure("ACME backoff state not saved", f)
        )

    async def _issue(self, job: _Job, want: _Want, old: Optional[CertificateEntry]) -> None:
        names = want.names
        what = "renewing" if old is not None else "obtaining"
        self.log.info(
            "{what} a certificate for {names} (route {route})",
            what=what,
            names=", ".join(names),
            route=job.route,
        )
        try:
            entry = await self._obtain(want)
        except CancelledError as e:
            # A wait cut short by a stop (the DNS server's, while dns-01
            # records propagated): not the names' failure, and the CA was
            # not asked to validate.
            self.log.info(
                "{what} a certificate for {names} (route {route}) interrupted: {why}",
                what=what,
                names=", ".join(names),
                route=job.route,
                why=str(e) or type(e).__name__,
            )
            return
        except Exception as e:
            await self._failed(job, want, old, e)
            return
        cleared = [n for n in names if n in self._backoff]
        for n in cleared:
            del self._backoff[n]
        if cleared:
            await self._saveBackoff()
        self.log.info(
            "certificate for {names} stored: issuer {issuer}, valid until {notAfter}",
            names=", ".join(names),
            issuer=entry.issuer,
            notAfter=entry.notAfter.isoformat(),
        )

    async def _obtain(self, want: _Want) -> CertificateEntry:
        timeout = self.settings.networkTimeout
        session = self._sessionFactory()
        await self._calls.run(session.open, timeout=timeout * 5)
        keyPEM, csrPEM = await self._calls.run(makeKeyAndCSR, want.names, self.settings.keyType)
        order, pending = await self._calls.run(
            session.order, want.names, csrPEM, timeout=timeout * (3 + len(want.names))
        )
        chosen = [(authz, self._choose(authz, want)) for authz in pending]
        started: list[tuple[IChallengeResponder, str, str, str]] = []
        try:
            # Every answer is published first, then waited for together: a
            # dns-01 answer waits for the secondaries to serve it, which
            # one by one would take as many waits (and zone transfers).
            ready = []
            for authz, typ in chosen:
                token, keyAuthorization = authz.offered[typ]
                responder = self._responders[typ]
                ready.append(maybeDeferred(responder.start, authz.name, token, keyAuthorization))
                started.append((responder, authz.name, token, keyAuthorization))
            try:
                await gatherResults(ready, consumeErrors=True)
            except FirstError as e:
                e.subFailure.raiseException()
            for authz, typ in chosen:
                await self._calls.run(session.answer, authz, typ, timeout=timeout * 3)
            fullchain = await self._calls.run(
                session.finalize,
                order,
                self.settings.orderTimeout,
                timeout=self.settings.orderTimeout + timeout * 3,
            )
        finally:
            for responder, name, token, keyAuthorization in started:
                try:
                    await maybeDeferred(responder.stop, name, token, keyAuthorization)
                except Exception:
                    self.log.failure(
                        "challenge responder {type} did not stop", type=responder.challengeType
                    )
        try:
            return await self._store.store(want.names, keyPEM, fullchain.encode("ascii"))
        except CertificateError as e:
            raise AcmeFailure(f"the certificate the CA issued is not kept: {e}") from e

    def _choose(self, authz: PendingAuthorization, want: _Want) -> str:
        """The challenge type to answer C{authz} with."""
        if isWildcard(authz.name):
            candidates = ["dns-01"]
        else:
            preferred = want.challenge or self.settings.challenge
            candidates = [preferred] + [t for t in CHALLENGE_TYPES if t != preferred]
        for typ in candidates:
            if typ in authz.offered and typ in self._responders:
                return typ
        raise AcmeFailure(
            f"{authz.name}: the CA offers"
            f" {', '.join(sorted(authz.offered)) or 'no known challenge'}, none of which is"
            f" answered here ({', '.join(sorted(self._responders))})",
            names=(authz.name,),
        )

    async def _failed(
        self, job: _Job, want: _Want, old: Optional[CertificateEntry], error: Exception
    ) -> None:
        now = self._clock.seconds()
        if isinstance(error, AcmeFailure):
            why = str(error)
            blamed = tuple(n for n in error.names if n in want.names) or want.names
            retryAfter, rateLimited = error.retryAfter, error.rateLimited
            if retryAfter is not None:
                retryAfter = self._boundRetryAfter(retryAfter, blamed, old, now)
        elif isinstance(error, CallTimedOut):
            why = f"the ACME server: {error}"
            blamed, retryAfter, rateLimited = want.names, None, False
        else:
            why = f"{type(error).__name__}: {error}"
            blamed, retryAfter, rateLimited = want.names, None, False
        for name in blamed:
            record = self._backoff.get(name) or _Backoff(0, 0.0, "", 0.0)
            record.failures += 1
            try:
                delay = self._backoffDelay(record.failures)
                if rateLimited:
                    delay = max(delay, self.settings.rateLimitDelay)
                if retryAfter is not None:
                    delay = max(delay, retryAfter)
            except Exception:
                # A backoff not set would leave the name due: an order per check.
                self.log.failure("ACME backoff of {name} not computed", name=name)
                delay = self.settings.backoffMax
            record.nextAttempt = now + delay
            record.lastError = why
            record.lastFailure = now
            self._backoff[name] = record
        kept = (
            f"the old certificate (until {old.notAfter.isoformat()}) keeps serving"
            if old is not None
            else "no certificate yet"
        )
        self.log.error(
            "certificate for {names} (route {route}) not obtained: {why}; {kept};"
            " next attempt in {delay:.0f} s",
            names=", ".join(want.names),
            route=job.route,
            why=why,
            kept=kept,
            delay=self.blockedUntil(want.names) - now,
        )
        try:
            await self._saveBackoff()
        except Exception:
            self.log.failure("ACME backoff state not saved")

    def _boundRetryAfter(
        self,
        asked: float,
        names: tuple[str, ...],
        old: Optional[CertificateEntry],
        now: float,
    ) -> float:
        """
        The CA's C{Retry-After} held to C{RETRY_AFTER_MAX}, and to end
        C{RETRY_AFTER_EXPIRY_MARGIN} before C{old} expires (never in the
        past): a far date, by mistake or not, must neither let the
        certificate serving expire nor leave the names without one for
        weeks.
        """
        bound = RETRY_AFTER_MAX
        if old is not None:
            expiring = old.notAfter.timestamp() - RETRY_AFTER_EXPIRY_MARGIN - now
            bound = min(bound, max(0.0, expiring))
        if asked <= bound:
            return asked
        self.log.warn(
            "the CA asks to wait {asked:.0f} s before ordering {names} again;"
            " waiting {bound:.0f} s at most",
            asked=asked,
            names=", ".join(names),
            bound=bound,
        )
        return bound

    def _backoffDelay(self, failures: int) -> float:
        """
        C{backoffBase} doubled per failure after the first, up to
        C{backoffMax}. The doubling stops at the maximum: failures counted
        for long (they are persisted) would overflow a float's exponent.
        """
        delay = self.settings.backoffBase
        for _ in range(failures - 1):
            if delay >= self.settings.backoffMax:
                break
            delay *= 2
        return min(delay, self.settings.backoffMax)

    # -- persisted backoff ---------------------------------------------------------

    @property
    def _backoffPath(self) -> str:
        return os.path.join(self._stateDir, _BACKOFF_FILE)

    def _readBackoff(self) -> dict[str, _Backoff]:
        """In a thread: the persisted backoff (nothing if there is none)."""
        try:
            data = json.loads(files.readFile(self._backoffPath))
        except FileNotFoundError:
            return {}
        records = {}
        for name, r in data.get("names", {}).items():
            records[name] = _Backoff(
                failures=int(r["failures"]),
                nextAttempt=float(r["nextAttempt"]),
                lastError=str(r["lastError"]),
                lastFailure=float(r["lastFailure"]),
            )
        return records

    def _saveBackoff(self) -> Deferred[None]:
        document = {
            "version": _BACKOFF_VERSION,
            "names": {
                name: {
                    "failures": r.failures,
                    "nextAttempt": r.nextAttempt,
                    "lastError": r.lastError,
                    "lastFailure": r.lastFailure,
                }
                for name, r in sorted(self._backoff.items())
            },
        }
        data = json.dumps(document, indent=1).encode("utf-8")

        def write() -> None:
            files.ensureDirectory(self._stateDir)
            files.writeAtomically(self._backoffPath, data, 0o600)

        return self._saving.run(self._calls.run, write)

    # -- status --------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """
        How each wanted certificate stands, for operators (plain data, times
        as ISO 8601 UTC): route, names, state (C{valid}, C{renewal due},
        C{expired}, C{missing}, C{issuing}), issuer, serial, notBefore,
        notAfter, nextRenewal (the next attempt, backoff included),
        failures, lastError, nextAttempt (only while backing off).
        """
        now = self._clock.seconds()
        result = []
        for route, want in sorted(self._wanted.items()):
            entry = self._store.find(want.names)
            blocked = self.blockedUntil(want.names)
            records = [self._backoff[n] for n in want.names if n in self._backoff]
            last = max(records, key=lambda r: r.lastFailure, default=None)
            renewAt = self.renewAt(entry) if entry is not None else None
            if want.names in self._running:
                state = "issuing"
            elif entry is None:
                state = "missing"
            elif entry.notAfter.timestamp() <= now:
                state = "expired"
            elif renewAt is not None and renewAt <= now:
                state = "renewal due"
            else:
                state = "valid"
            result.append(
                {
                    "route": route,
                    "names": list(want.names),
                    "state": state,
                    "challenge": want.challenge or self.settings.challenge,
                    "issuer": entry.issuer if entry else None,
                    "serial": format(entry.serial, "x") if entry else None,
                    "notBefore": entry.notBefore.isoformat() if entry else None,
                    "notAfter": entry.notAfter.isoformat() if entry else None,
                    "nextRenewal": _iso(max(renewAt if renewAt is not None else now, blocked)),
                    "failures": max((r.failures for r in records), default=0),
                    "lastError": last.lastError if last else None,
                    "nextAttempt": _iso(blocked) if blocked > now else None,
                }
            )
        return result
