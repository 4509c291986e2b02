"""
Tests for L{dcrouter.certs.acme}'s scheduling, backoff and account, with a
fake ACME session (the real one is tested against Pebble in
tests/integration/test_acme_pebble.py).
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dcrouter.certs.acme import (
    DAY,
    AcmeAccount,
    AcmeFailure,
    AcmeIssuer,
    AcmeSettings,
    LibrarySession,
    PendingAuthorization,
    _retryAfterSeconds,
    makeKeyAndCSR,
)
from dcrouter.certs.challenges import ACME_CHALLENGE_PATH, DNS01Responder, HTTP01Responder
from dcrouter.certs.interfaces import IAcmeSession
from dcrouter.certs.store import DirectoryStore
from dcrouter.dns.notify import NotifierStopped
from tests.unit.test_certs_challenges import FakeRecords
from tests.unit.test_certs_support import SyncPool, SyncReactor, TestCA

T0 = 1_800_000_000.0  # "now" at the start of every test (2027)
THUMB = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def result(d):
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class FakeCA:
    """What the fake sessions talk to; records calls, fails on demand."""

    def __init__(self, clock, lifetime=90.0):
        self.clock = clock
        self.lifetime = lifetime
        self.ca = TestCA()
        self.opens = 0
        self.orders = []
        self.answered = []
        self.failOn = {}  # method name -> exception, raised once per call
        self.ari = (None, None)
        self.ariCalls = 0
        self.responders = {}
        self.seenWhileAnswering = []
        self.tokens = 0
        self.leaveOut = set()  # names the CA drops from the certificates it issues

    def session(self):
        return FakeSession(self)


@implementer(IAcmeSession)
class FakeSession:
    def __init__(self, ca):
        self.ca = ca

    def _maybeFail(self, step):
        error = self.ca.failOn.get(step)
        if error is not None:
            raise error

    def open(self):
        self.ca.opens += 1
        self._maybeFail("open")

    def order(self, names, csrPEM):
        self._maybeFail("order")
        self.ca.orders.append(tuple(names))
        pending = []
        for name in names:
            self.ca.tokens += 1
            token = f"tok{self.ca.tokens:040d}"
            keyAuth = f"{token}.{THUMB}"
            offered = {"http-01": (token, keyAuth), "dns-01": (token, keyAuth)}
            if not name.startswith("*."):
                offered["tls-alpn-01"] = (token, keyAuth)
            pending.append(PendingAuthorization(name, offered, handle=csrPEM))
        return ("order", tuple(names), csrPEM), pending

    def answer(self, authorization, challengeType):
        self._maybeFail("answer")
        token, keyAuth = authorization.offered[challengeType]
        http = self.ca.responders.get("http-01")
        served = None
        if challengeType == "http-01" and http is not None:
            served = http.response(ACME_CHALLENGE_PATH + token.encode())
        self.ca.answered.append((authorization.name, challengeType))
        self.ca.seenWhileAnswering.append(served)

    def finalize(self, order, timeout):
        self._maybeFail("finalize")
        _, names, csrPEM = order
        csr = x509.load_pem_x509_csr(csrPEM)
        start = datetime.fromtimestamp(self.ca.clock.seconds(), UTC)
        names = [n for n in names if n not in self.ca.leaveOut]
        _, chain = self.ca.ca.issue(
            names, notBefore=start, days=self.ca.lifetime, publicKey=csr.public_key()
        )
        return chain.decode()

    def renewalInfo(self, certPEM):
        self.ca.ariCalls += 1
        self._maybeFail("renewalInfo")
        return self.ca.ari


class World:
    """An issuer over a fake CA, a store in tmp_path, a clock at T0."""

    def __init__(self, tmp_path, settings=None, ca=None, reactor=None, pool=None):
        self.reactor = reactor or SyncReactor()
        if reactor is None:
            self.reactor.advance(T0)
        self.pool = pool or SyncPool()
        self.stateDir = str(tmp_path)
        self.store = DirectoryStore(
            os.path.join(self.stateDir, "certs"), self.reactor, self.pool, self.reactor
        )
        result(self.store.load())
        self.http = HTTP01Responder()
        self.records = FakeRecords()
        self.dns = DNS01Responder(self.records, ["example.com", "example"])
        self.ca = ca or FakeCA(self.reactor)
        self.ca.responders = {"http-01": self.http}
        self.settings = settings or AcmeSettings(directory="https://ca.invalid/dir")
        self.issuer = AcmeIssuer(
            self.settings,
            self.stateDir,
            self.store,
            [self.http, self.dns],
            self.reactor,
            self.pool,
            sessionFactory=self.ca.session,
        )

    def advance(self, seconds):
        self.reactor.advance(seconds)

    def now(self):
        return self.reactor.seconds()

    def backoffFile(self):
        with open(os.path.join(self.stateDir, "acme", "backoff.json")) as f:
            return json.load(f)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_settings():
    assert AcmeSettings().directoryURL.startswith("https://acme-v02.api.letsencrypt.org")
    assert "staging" in AcmeSettings(directory="staging").directoryURL
    assert AcmeSettings(directory="https://x/dir").directoryURL == "https://x/dir"
    with pytest.raises(ValueError):
        AcmeSettings(challenge="http-02")
    with pytest.raises(ValueError):
        AcmeSettings(renewDays=0)
    with pytest.raises(ValueError):
        AcmeSettings(keyType="dsa")


def test_fakeSessionAndLibrarySessionProvideTheInterface(tmp_path):
    assert verifyObject(IAcmeSession, FakeSession(None))
    settings = AcmeSettings()
    assert verifyObject(
        IAcmeSession, LibrarySession(settings, AcmeAccount(str(tmp_path), settings))
    )


def test_makeKeyAndCSR():
    for keyType in ("ec-p256", "rsa-2048"):
        keyPEM, csrPEM = makeKeyAndCSR(["a.example", "*.a.example"], keyType)
        csr = x509.load_pem_x509_csr(csrPEM)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["a.example", "*.a.example"]
        assert b"PRIVATE KEY" in keyPEM


@pytest.mark.parametrize(
    "header, expected",
    [(None, None), ("", None), ("120", 120.0), (" 7 ", 7.0), ("soon", None)],
)
def test_retryAfterSeconds(header, expected):
    assert _retryAfterSeconds(header) == expected


def test_retryAfterAsADate():
    when = datetime.now(UTC) + timedelta(hours=1)
    seconds = _retryAfterSeconds(when.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert 3500 < seconds <= 3600
    assert _retryAfterSeconds("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0


def test_accountKeyIsMadeOnceAndKept(tmp_path):
    settings = AcmeSettings(directory="https://ca.invalid/dir")
    account = AcmeAccount(str(tmp_path), settings)
    key, alg = account.key()
    assert account.key()[0] is key
    assert stat.S_IMODE(os.stat(account.path).st_mode) == 0o600
    again, againAlg = AcmeAccount(str(tmp_path), settings).key()
    assert again.thumbprint() == key.thumbprint() and againAlg == alg
    other = AcmeAccount(str(tmp_path), AcmeSettings(directory="staging"))
    assert other.path != account.path
    assert account.uri is None


# -- issuing ----------------------------------------------------------------------------


def test_issuesAMissingCertificate(world):
    world.issuer.want("web", ["www.example.com", "example.com"])
    result(world.issuer.checkNow())
    entry = world.store.get("www.example.com")
    assert entry is not None and entry.names == ("example.com", "www.example.com")
    assert world.ca.orders == [("example.com", "www.example.com")]
    assert sorted(world.ca.answered) == [("example.com", "http-01"), ("www.example.com", "http-01")]
    # The responder answered while the CA validated, and was cleared after.
    assert all(served and served.endswith(THUMB.encode()) for served in world.ca.seenWhileAnswering)
    assert len(world.http) == 0
    [status] = world.issuer.status()
    assert status["state"] == "valid" and status["route"] == "web"
    assert status["names"] == ["example.com", "www.example.com"]
    assert status["notAfter"] == entry.notAfter.isoformat()
    assert "intermediate" in status["issuer"]
    assert status["failures"] == 0 and status["lastError"] is None
    expected = entry.notAfter - timedelta(days=30)
    assert status["nextRenewal"] == expected.isoformat()


def test_oneJobForTwoRoutesWithTheSameNames(world):
    world.issuer.want("a", ["www.example.com"])
    world.issuer.want("b", ["WWW.example.com."])
    result(world.issuer.checkNow())
    assert world.ca.orders == [("www.example.com",)]


def test_wildcardsAreValidatedByDNS01(world):
    world.issuer.want("wild", ["example.com", "*.example.com"])
    result(world.issuer.checkNow())
    assert sorted(world.ca.answered) == [("*.example.com", "dns-01"), ("example.com", "http-01")]
    assert world.store.get("anything.example.com") is not None
    assert world.records.records == {}  # removed once the order was final


def test_preferredChallengePerRoute(world):
    world.issuer.want("web", ["www.example.com"], challenge="dns-01")
    result(world.issuer.checkNow())
    assert world.ca.answered == [("www.example.com", "dns-01")]


def test_wantRefusesWhatCannotBeAnswered(tmp_path):
    w = World(tmp_path)
    w.issuer._responders.pop("dns-01")
    with pytest.raises(ValueError, match="dns-01"):
        w.issuer.want("wild", ["*.example.com"])
    with pytest.raises(ValueError, match="tls-alpn-01"):
        w.issuer.want("web", ["www.example.com"], challenge="tls-alpn-01")
    with pytest.raises(ValueError):
        w.issuer.want("web", ["bad..name"])
    with pytest.raises(ValueError):
        w.issuer.want("web", ["www.example.com"], challenge="http-02")
    assert w.issuer.wanted() == {}


def test_forgetStopsRenewing(world):
    world.issuer.want("web", ["www.example.com"])
    world.issuer.forget("web")
    world.issuer.forget("web")
    result(world.issuer.checkNow())
    assert world.ca.orders == [] and world.issuer.status() == []


# -- renewal ----------------------------------------------------------------------------


def test_renewsRenewDaysBeforeExpiry(world):
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    first = world.store.get("www.example.com")
    world.advance(60 * DAY - 1)
    result(world.issuer.checkNow())
    assert len(world.ca.orders) == 1
    world.advance(1)
    assert world.issuer.status()[0]["state"] == "renewal due"
    result(world.issuer.checkNow())
    assert len(world.ca.orders) == 2
    second = world.store.get("www.example.com")
    assert second.serial != first.serial and second.notAfter > first.notAfter


def test_aShortLivedCertificateRenewsWhenAThirdOfItsLifetimeRemains(tmp_path):
    """Lifetime (6 days) shorter than renew_days (30): at 4 days, not daily."""
    w = World(tmp_path, ca=FakeCA(None, lifetime=6))
    w.ca.clock = w.reactor
    w.issuer.want("web", ["www.example.com"])
    result(w.issuer.checkNow())
    first = w.store.get("www.example.com")
    [status] = w.issuer.status()
    assert status["nextRenewal"] == (first.notAfter - timedelta(days=2)).isoformat()
    for _ in range(3):
        w.advance(DAY)
        result(w.issuer.checkNow())
    w.advance(DAY - 1)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 1
    w.advance(1)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 2


def test_renewDaysLongerThanTheLifetimeIsNoRenewalStorm(tmp_path):
    """renew_days 365, lifetime 90: renewed at 60 days, neither per check nor daily."""
    w = World(tmp_path, AcmeSettings(directory="https://ca.invalid/dir", renewDays=365))
    w.issuer.want("web", ["www.example.com"])
    result(w.issuer.checkNow())
    for _ in range(59):
        w.advance(DAY)
        result(w.issuer.checkNow())
    assert len(w.ca.orders) == 1
    w.advance(DAY)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 2


@pytest.mark.parametrize("renewDays", [5, 6, 7])
def test_aShortLifetimeRenewsAtAThirdWhateverSideOfRenewDaysItIs(tmp_path, renewDays):
    """6-day certificates: at 4 days, renew_days longer or shorter (5 made it daily)."""
    settings = AcmeSettings(directory="https://ca.invalid/dir", renewDays=renewDays)
    w = World(tmp_path, settings, ca=FakeCA(None, lifetime=6))
    w.ca.clock = w.reactor
    w.issuer.want("web", ["www.example.com"])
    result(w.issuer.checkNow())
    w.advance(4 * DAY - 1)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 1
    w.advance(1)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 2


def test_aLifetimeJustLongerThanRenewDaysRenewsWhenAThirdRemains(tmp_path):
    """Lifetime 30.5 days, renew_days 30: at two thirds of it, not a day after issue."""
    w = World(tmp_path, ca=FakeCA(None, lifetime=30.5))
    w.ca.clock = w.reactor
    w.issuer.want("web", ["www.example.com"])
    result(w.issuer.checkNow())
    first = w.store.get("www.example.com")
    due = first.notBefore.timestamp() + 30.5 * DAY * 2 / 3
    assert w.issuer.renewAt(first) == due
    w.advance(due - w.now() - 1)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 1
    w.advance(1)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 2


def test_renewDaysShorterThanAThirdOfTheLifetimeIsHonoured(tmp_path):
    w = World(tmp_path, AcmeSettings(directory="https://ca.invalid/dir", renewDays=10))
    w.issuer.want("web", ["www.example.com"])
    result(w.issuer.checkNow())
    entry = w.store.get("www.example.com")
    assert w.issuer.renewAt(entry) == entry.notAfter.timestamp() - 10 * DAY


def test_renewalInformationStillComesFirstForAShortLivedCertificate(tmp_path):
    w = World(tmp_path, ca=FakeCA(None, lifetime=6))
    w.ca.clock = w.reactor
    w.issuer.want("web", ["www.example.com"])
    result(w.issuer.checkNow())
    w.ca.ari = (w.now() + DAY, w.now() + 1800)
    result(w.issuer.checkNow())  # not due: asks for ARI
    w.advance(DAY)
    result(w.issuer.checkNow())
    assert len(w.ca.orders) == 2


def test_renewalInformationBringsRenewalForward(world):
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    world.ca.ari = (world.now() + 3600, world.now() + 1800)
    result(world.issuer.checkNow())  # not due: asks for ARI
    assert world.ca.ariCalls == 1
    result(world.issuer.checkNow())  # ARI cached until its next check
    assert world.ca.ariCalls == 1
    world.advance(3600)
    result(world.issuer.checkNow())
    assert len(world.ca.orders) == 2


def test_renewalInformationIsForgottenWithItsCertificate(world):
    """Kept only for the certificates wanted names are served by."""
    world.issuer.want("web", ["www.example.com"])
    world.issuer.want("api", ["api.example.com"])
    result(world.issuer.checkNow())
    first = world.store.get("www.example.com")
    api = world.store.get("api.example.com")
    world.ca.ari = (world.now() + 3600, world.now() + 1800)
    result(world.issuer.checkNow())
    assert set(world.issuer._ari) == {first.fingerprint, api.fingerprint}
    world.advance(3600)
    world.ca.ari = (None, world.now() + DAY)
    result(world.issuer.checkNow())  # both renewed, as ARI said
    second = world.store.get("www.example.com")
    assert second.serial != first.serial
    assert first.fingerprint not in world.issuer._ari
    assert api.fingerprint not in world.issuer._ari
    result(world.issuer.checkNow())
    assert set(world.issuer._ari) == {second.fingerprint, world.store.get("api.example.com").fingerprint}
    world.issuer.forget("api")
    assert set(world.issuer._ari) == {second.fingerprint}


def test_noRenewalInformationIsNotAskedAgain(world):
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    result(world.issuer.checkNow())
    world.advance(DAY)
    result(world.issuer.checkNow())
    assert world.ca.ariCalls == 1


def test_aRestartDoesNotReissue(tmp_path, world):
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    again = World(tmp_path, reactor=world.reactor)
    again.issuer.want("web", ["www.example.com"])
    again.issuer.startService()
    result(again.issuer.checkNow())
    assert again.ca.opens == 0
    again.issuer.stopService()


# -- failures and backoff ---------------------------------------------------------------


def test_backoffDoublesUpToTheMaximum(world):
    world.ca.failOn["open"] = AcmeFailure("cannot reach the ACME server")
    world.issuer.want("web", ["www.example.com"])
    delays = []
    for _ in range(11):
        start = world.now()
        result(world.issuer.checkNow())
        delays.append(world.issuer.blockedUntil(["www.example.com"]) - start)
        world.advance(delays[-1] - 1)
        opens = world.ca.opens
        result(world.issuer.checkNow())
        assert world.ca.opens == opens  # not before the backoff ends
        world.advance(1)
    assert delays == [300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 76800, 86400, 86400]
    assert world.ca.opens == 11
    [status] = world.issuer.status()
    assert status["failures"] == 11 and status["state"] == "missing"
    assert status["lastError"] == "cannot reach the ACME server"


def test_backoffIsPersistedAndHonouredAfterARestart(tmp_path, world):
    world.ca.failOn["order"] = AcmeFailure("the CA refused: serverInternal: oops")
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    world.advance(300)
    result(world.issuer.checkNow())
    blocked = world.issuer.blockedUntil(["www.example.com"])
    assert blocked == world.now() + 600
    saved = world.backoffFile()["names"]["www.example.com"]
    assert saved["failures"] == 2 and saved["nextAttempt"] == blocked
    assert (
        stat.S_IMODE(os.stat(os.path.join(str(tmp_path), "acme", "backoff.json")).st_mode) == 0o600
    )

    # "Restart": a new issuer, store and CA over the same state directory.
    world.advance(100)
    again = World(tmp_path, reactor=world.reactor)
    again.issuer.want("web", ["www.example.com"])
    again.issuer.startService()
    result(again.issuer.checkNow())
    assert again.ca.opens == 0
    [status] = again.issuer.status()
    assert status["failures"] == 2
    assert status["lastError"] == "the CA refused: serverInternal: oops"
    assert status["nextAttempt"] == datetime.fromtimestamp(blocked, UTC).isoformat()
    # The service wakes itself up when the backoff ends, and succeeds.
    world.advance(blocked - world.now())
    assert again.ca.opens == 1
    assert again.store.get("www.example.com") is not None
    assert again.issuer.status()[0]["failures"] == 0
    assert again.backoffFile()["names"] == {}
    again.issuer.stopService()


def test_backoffOfManyPersistedFailuresSaturatesAtTheMaximum(tmp_path):
    """1,030 failures: 2 ** 1029 is no float; the backoff is backoffMax, not an order a second."""
    os.makedirs(tmp_path / "acme")
    record = {"failures": 1030, "nextAttempt": T0 - 1, "lastError": "x", "lastFailure": T0 - DAY}
    (tmp_path / "acme" / "backoff.json").write_text(
        json.dumps({"version": 1, "names": {"www.example.com": record}})
    )
    w = World(tmp_path)
    w.ca.failOn["order"] = AcmeFailure("validation failed", names=["www.example.com"])
    w.issuer.want("web", ["www.example.com"])
    w.issuer.startService()
    w.advance(0)
    assert len(w.ca.orders) == 0 and w.ca.opens == 1
    assert w.issuer.blockedUntil(["www.example.com"]) == w.now() + DAY
    assert w.backoffFile()["names"]["www.example.com"]["failures"] == 1031
    for _ in range(10):
        w.advance(1)
    assert w.ca.opens == 1
    w.issuer.stopService()


def test_aBackoffThatCannotBeComputedIsTheMaximum(world, monkeypatch):
    """Set whatever goes wrong computing it: a name left due would be ordered at every check."""

    def broken(failures):
        raise ArithmeticError("no")

    monkeypatch.setattr(world.issuer, "_backoffDelay", broken)
    world.ca.failOn["open"] = AcmeFailure("cannot reach the ACME server")
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    assert world.issuer.blockedUntil(["www.example.com"]) == world.now() + DAY


def test_aCrashedJobIsNotStartedAgainBeforeTheBackoffBase(world, monkeypatch):
    """Whatever a crash left of the backoff, the names wait backoffBase."""

    async def crash(job, want, old, error):
        raise RuntimeError("a bug")

    monkeypatch.setattr(world.issuer, "_failed", crash)
    world.ca.failOn["open"] = AcmeFailure("cannot reach the ACME server")
    world.issuer.want("web", ["www.example.com"])
    world.issuer.startService()
    world.advance(0)
    assert world.ca.opens == 1
    [status] = world.issuer.status()
    assert status["lastError"] == "the job crashed: RuntimeError: a bug"
    assert status["nextAttempt"] == datetime.fromtimestamp(world.now() + 300, UTC).isoformat()
    for _ in range(299):
        world.advance(1)
    assert world.ca.opens == 1
    world.advance(1)
    assert world.ca.opens == 2
    world.issuer.stopService()


def test_startServiceWaitsForTheBackoffState(tmp_path):
    pool = SyncPool()
    w = World(tmp_path, pool=pool)
    w.issuer.want("web", ["www.example.com"])
    pool.hold = True
    w.issuer.startService()
    d = w.issuer.checkNow()
    assert not d.called and w.ca.opens == 0
    pool.hold = False
    pool.release()
    assert d.called and w.store.get("www.example.com") is not None
    w.issuer.stopService()


def test_theBackoffOfANameNoLongerWantedIsForgottenOnceOver(world):
    world.ca.failOn["open"] = AcmeFailure("cannot reach the ACME server")
    world.issuer.want("web", ["www.example.com"])
    world.issuer.want("api", ["api.example.com"])
    result(world.issuer.checkNow())
    world.issuer.forget("web")
    # Removed and added back within its backoff, a name still waits.
    result(world.issuer.checkNow())
    assert set(world.backoffFile()["names"]) == {"www.example.com", "api.example.com"}
    world.advance(299)
    world.issuer.want("web", ["www.example.com"])
    opens = world.ca.opens
    result(world.issuer.checkNow())
    assert world.ca.opens == opens
    world.issuer.forget("web")
    # Once its backoff is over, an unwanted name's record goes; a wanted one's stays.
    world.advance(1)
    result(world.issuer.checkNow())
    assert set(world.backoffFile()["names"]) == {"api.example.com"}
    assert world.issuer.blockedUntil(["www.example.com"]) == 0


def test_retryAfterIsHonoured(world):
    world.ca.failOn["order"] = AcmeFailure("too many", rateLimited=True, retryAfter=7200)
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    assert world.issuer.blockedUntil(["www.example.com"]) == world.now() + 7200


def loggedWhile(action):
    """The text of the events logged while C{action()} runs."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        action()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events]


def test_aRetryAfterLongerThanAWeekIsHeldToAWeek(world):
    world.ca.failOn["order"] = AcmeFailure("too many", rateLimited=True, retryAfter=30 * DAY)
    world.issuer.want("web", ["www.example.com"])
    logged = loggedWhile(lambda: result(world.issuer.checkNow()))
    assert world.issuer.blockedUntil(["www.example.com"]) == world.now() + 7 * DAY
    assert (
        "the CA asks to wait 2592000 s before ordering www.example.com again;"
        " waiting 604800 s at most"
    ) in logged


def test_aRetryAfterEndsADayBeforeTheOldCertificateExpires(world):
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    old = world.store.get("www.example.com")
    world.advance(85 * DAY)
    world.ca.failOn["order"] = AcmeFailure("too many", rateLimited=True, retryAfter=6 * DAY)
    result(world.issuer.checkNow())
    blocked = world.issuer.blockedUntil(["www.example.com"])
    assert blocked == old.notAfter.timestamp() - DAY
    assert world.store.get("www.example.com") is old


def test_aRetryAfterPastTheOldCertificatesLastDayIsNotWaitedFor(world):
    """Within a day of expiry, only the backoff (here the rate limit's hour) holds."""
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    world.advance(89.5 * DAY)
    world.ca.failOn["order"] = AcmeFailure("too many", rateLimited=True, retryAfter=DAY)
    result(world.issuer.checkNow())
    assert world.issuer.blockedUntil(["www.example.com"]) == world.now() + 3600


def test_rateLimitWithoutRetryAfterWaitsAnHour(world):
    world.ca.failOn["order"] = AcmeFailure("too many", rateLimited=True)
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    assert world.issuer.blockedUntil(["www.example.com"]) == world.now() + 3600


def test_aFailedValidationBlamesItsNamesOnly(world):
    world.ca.failOn["finalize"] = AcmeFailure("validation failed", names=["b.example.com"])
    world.issuer.want("web", ["a.example.com", "b.example.com"])
    result(world.issuer.checkNow())
    assert world.issuer.blockedUntil(["a.example.com"]) == 0
    assert world.issuer.blockedUntil(["b.example.com"]) == world.now() + 300
    assert set(world.backoffFile()["names"]) == {"b.example.com"}


def test_aFailedRenewalKeepsTheOldCertificate(world):
    world.issuer.want("web", ["www.example.com"])
    result(world.issuer.checkNow())
    old = world.store.get("www.example.com")
    world.advance(61 * DAY)
    world.ca.failOn["finalize"] = AcmeFailure("the order failed: serverInternal")
    result(world.issuer.checkNow())
    assert world.store.get("www.example.com") is old
    assert len(world.http) == 0  # responders stopped on failure too
    [status] = world.issuer.status()
    assert status["state"] == "renewal due"
    assert status["lastError"] == "the order failed: serverInternal"
    assert status["nextAttempt"] == status["nextRenewal"]
    del world.ca.failOn["finalize"]
    world.advance(300)
    result(world.issuer.checkNow())
    assert world.store.get("www.example.com").serial != old.serial


def test_aCertificateLackingANameIsAFailedIssuance(world):
    """Not stored (it would replace the one that has every name), and backed off."""
    world.issuer.want("web", ["a.example.com", "b.example.com"])
    result(world.issuer.checkNow())
    old = world.store.get("b.example.com")
    world.advance(61 * DAY)
    world.ca.leaveOut = {"b.example.com"}
    result(world.issuer.checkNow())
    assert world.store.get("b.example.com") is old and world.store.get("a.example.com") is old
    assert len(world.store.list()) == 1
    [status] = world.issuer.status()
    assert status["failures"] == 1 and status["state"] == "renewal due"
    assert "lacks b.example.com" in status["lastError"]
    assert world.issuer.blockedUntil(["a.example.com", "b.example.com"]) == world.now() + 300
    result(world.issuer.checkNow())
    assert len(world.ca.orders) == 2  # no new order before the backoff ends


def test_aFirstCertificateLackingANameIsNotOrderedAtEveryCheck(world):
    world.ca.leaveOut = {"b.example.com"}
    world.issuer.want("web", ["a.example.com", "b.example.com"])
    result(world.issuer.checkNow())
    result(world.issuer.checkNow())
    assert len(world.ca.orders) == 1
    assert world.store.list() == []
    [status] = world.issuer.status()
    assert status["state"] == "missing" and status["failures"] == 1
    world.ca.leaveOut = set()
    world.advance(300)
    result(world.issuer.checkNow())
    assert world.store.get("b.example.com") is not None
    assert world.issuer.status()[0]["failures"] == 0


def test_aResponderThatFailsAbortsTheOrder(world):
    def broken(name, token, keyAuthorization):
        raise ValueError("no such zone")

    world.dns.start = broken
    world.issuer.want("wild", ["*.example.com"])
    result(world.issuer.checkNow())
    assert world.ca.answered == []
    assert "no such zone" in world.issuer.status()[0]["lastError"]


def publishedAndWaiting(world):
    """Make the DNS records' setRecord return a Deferred (the propagation wait); return them."""
    waits = []
    publish = world.records.setRecord

    def setRecord(zone, name, type, value, ttl):
        publish(zone, name, type, value, ttl)
        waits.append(Deferred())
        return waits[-1]

    world.records.setRecord = setRecord
    return waits


def test_everyDNS01AnswerIsPublishedBeforeTheyAreWaitedForTogether(world):
    waits = publishedAndWaiting(world)
    world.issuer.want("wild", ["*.example.com", "www.example.com"], challenge="dns-01")
    done = world.issuer.checkNow()
    # Both published at once, the CA not told yet.
    assert sorted(name for _, name, _ in world.records.records) == [
        "_acme-challenge.example.com", "_acme-challenge.www.example.com",
    ]
    waits[1].callback(None)
    assert world.ca.answered == []
    waits[0].callback(None)
    result(done)
    assert sorted(world.ca.answered) == [("*.example.com", "dns-01"), ("www.example.com", "dns-01")]
    assert world.records.records == {}
    assert world.issuer.status()[0]["state"] == "valid"


def test_aDNS01WaitThatFailsAbortsTheOrderAndWithdrawsEveryAnswer(world):
    waits = publishedAndWaiting(world)
    world.issuer.want("wild", ["*.example.com", "www.example.com"], challenge="dns-01")
    done = world.issuer.checkNow()
    waits[1].errback(ValueError("the zone went away"))
    result(done)
    assert world.ca.answered == [] and world.records.records == {}
    [status] = world.issuer.status()
    assert status["failures"] == 1 and status["lastError"] == "ValueError: the zone went away"
    assert not waits[0].called  # left to the DNS server (its wait ends on its own)


def test_aStopOfTheDNSServerInterruptsTheOrderWithoutAFailure(world):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        waits = publishedAndWaiting(world)
        world.issuer.want("wild", ["*.example.com", "www.example.com"], challenge="dns-01")
        done = world.issuer.checkNow()
        for wait in waits:  # as the DNS server's stop fails them
            wait.errback(NotifierStopped("the DNS server is stopping"))
        result(done)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert world.ca.answered == [] and world.records.records == {}
    [status] = world.issuer.status()
    assert status["failures"] == 0 and status["lastError"] is None
    assert world.issuer.blockedUntil(["www.example.com", "*.example.com"]) == 0.0
    assert not os.path.exists(os.path.join(world.stateDir, "acme", "backoff.json"))
    [interrupted] = [e for e in events if "interrupted" in formatEvent(e)]
    assert formatEvent(interrupted) == (
        "obtaining a certificate for *.example.com, www.example.com (route wild) interrupted:"
        " the DNS server is stopping"
    )
    assert interrupted["log_level"].name == "info"


def test_aHungCallTimesOut(tmp_path):
    pool = SyncPool()
    w = World(tmp_path, pool=pool)
    w.issuer.want("web", ["www.example.com"])
    pool.hold = True
    d = w.issuer.checkNow()
    w.advance(w.settings.networkTimeout * 5)
    pool.hold = False
    pool.release()  # the backoff write, and the hung call's late result (dropped)
    assert d.called
    [status] = w.issuer.status()
    assert status["lastError"] == "the ACME server: no answer within 150 s"
    assert status["failures"] == 1


def test_schedulerWakesForRenewal(world):
    world.issuer.want("web", ["www.example.com"])
    world.issuer.startService()
    world.advance(0)
    assert len(world.ca.orders) == 1  # at start
    world.advance(60 * DAY)  # the timer fires hourly, and at the due time
    assert len(world.ca.orders) == 2
    world.issuer.stopService()
    world.advance(61 * DAY)
    assert len(world.ca.orders) == 2


def test_wantWakesTheScheduler(world):
    world.issuer.startService()
    world.advance(1)
    world.issuer.want("web", ["www.example.com"])
    world.advance(0)
    assert world.ca.orders == [("www.example.com",)]
    world.issuer.stopService()


def test_unreadableBackoffStateIsNotFatal(tmp_path):
    os.makedirs(tmp_path / "acme")
    (tmp_path / "acme" / "backoff.json").write_text("{not json")
    w = World(tmp_path)
    w.issuer.want("web", ["www.example.com"])
    w.issuer.startService()
    w.advance(0)
    assert w.store.get("www.example.com") is not None
    w.issuer.stopService()
