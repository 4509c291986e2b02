"""ACME across router workers: published answers, and a worker following the store."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509
from OpenSSL import SSL

from dcrouter import files
from dcrouter.certs.challenges import ACME_CHALLENGE_PATH, HTTP01Responder, TLSALPN01Responder
from dcrouter.certs.manager import FOLLOW_INTERVAL, FollowedCerts
from dcrouter.certs.shared import ChallengeFiles, Published, challengeDirectory
from dcrouter.certs.store import DirectoryStore
from dcrouter.config.model import TlsSettings
from dcrouter.net.tls import ServerTLS, ensureSelfSigned
from tests.unit.test_certs_acme import World
from tests.unit.test_certs_challenges import KEYAUTH, THUMB, TOKEN
from tests.unit.test_certs_store import result
from tests.unit.test_certs_support import SyncPool, SyncReactor, TestCA, handshake, peerLeaf

PATH = ACME_CHALLENGE_PATH + TOKEN.encode()


def publishing(responder, stateDir, pool=None):
    reactor = SyncReactor()
    return Published(responder, str(stateDir), reactor, pool or SyncPool(), reactor)


def fired(d):
    """Has C{d} a result yet (not merely a L{Deferred} it waits on)?"""
    box = []
    d.addBoth(lambda r: box.append(r) or r)
    return bool(box)


def test_http01AnswersReachTheWorkersAndLeaveWithTheLastName(tmp_path):
    published = publishing(HTTP01Responder(), tmp_path)
    worker = ChallengeFiles(str(tmp_path))
    assert worker.response(PATH) is None
    published.start("a.example", TOKEN, KEYAUTH)
    published.start("b.example", TOKEN, KEYAUTH)
    assert published.responder.response(PATH) == KEYAUTH.encode()
    assert worker.response(PATH) == KEYAUTH.encode()
    answer = os.path.join(challengeDirectory(str(tmp_path), "http-01"), TOKEN)
    assert stat.S_IMODE(os.stat(answer).st_mode) == 0o600
    published.stop("a.example", TOKEN, KEYAUTH)
    assert worker.response(PATH) == KEYAUTH.encode()
    published.stop("b.example", TOKEN, KEYAUTH)
    assert worker.response(PATH) is None
    assert os.listdir(os.path.dirname(answer)) == []


def test_answersAreWrittenAndRemovedInTheThreadPool(tmp_path):
    """The fsynced writes never run on the reactor thread; start fires once on disk."""
    pool = SyncPool(hold=True)
    published = publishing(HTTP01Responder(), tmp_path, pool)
    worker = ChallengeFiles(str(tmp_path))
    started = published.start("a.example", TOKEN, KEYAUTH)
    assert published.responder.response(PATH) == KEYAUTH.encode()
    assert not fired(started) and worker.response(PATH) is None
    assert pool.calls == [files.writeAtomically]
    pool.release()
    assert result(started) is None and worker.response(PATH) == KEYAUTH.encode()
    stopped = published.stop("a.example", TOKEN, KEYAUTH)
    assert published.responder.response(PATH) is None
    assert not fired(stopped) and worker.response(PATH) == KEYAUTH.encode()
    pool.release()
    assert result(stopped) is None and worker.response(PATH) is None
    assert pool.calls == [files.writeAtomically, files.removeDurably]


def test_writesAndRemovalsKeepTheirOrder(tmp_path):
    pool = SyncPool(hold=True)
    published = publishing(HTTP01Responder(), tmp_path, pool)
    worker = ChallengeFiles(str(tmp_path))
    published.start("a.example", TOKEN, KEYAUTH)
    published.stop("a.example", TOKEN, KEYAUTH)
    while pool.held:  # one file call at a time: the removal waits for the write
        pool.release()
    assert worker.response(PATH) is None
    published.start("a.example", TOKEN, KEYAUTH)
    pool.release()
    published.stop("a.example", TOKEN, KEYAUTH)
    published.start("b.example", TOKEN, KEYAUTH)  # wanted again before the removal ran
    while pool.held:
        pool.release()
    assert worker.response(PATH) == KEYAUTH.encode()


def test_anAnswerThatCannotBeWrittenIsWithdrawn(tmp_path, monkeypatch):
    published = publishing(HTTP01Responder(), tmp_path)

    def full(path, data, mode):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "writeAtomically", full)
    with pytest.raises(OSError, match="No space"):
        result(published.start("a.example", TOKEN, KEYAUTH))
    assert published.responder.response(PATH) is None


def test_theCAValidatesOnlyOnceTheWorkersHaveTheAnswer(tmp_path):
    """
    The issuer waits for the published file before it answers the CA, and
    the file goes after: blocking calls finishing newest first would show
    the CA asking before the write was done.
    """
    world = World(tmp_path)
    world.pool.hold = True
    stateDir = str(tmp_path)
    world.issuer._responders["http-01"] = Published(
        world.http, stateDir, world.reactor, world.pool, world.reactor
    )
    world.ca.responders["http-01"] = ChallengeFiles(stateDir)  # what a worker answers
    world.issuer.want("web", ["a.example.com", "b.example.com"])
    done = world.issuer.checkNow()
    while world.pool.held:
        onResult, f, args, kwargs = world.pool.held.pop()
        world.pool.runOne(onResult, f, args, kwargs)
    assert fired(done) and world.store.get("a.example.com") is not None
    assert len(world.ca.seenWhileAnswering) == 2
    assert all(served and served.endswith(THUMB.encode()) for served in world.ca.seenWhileAnswering)
    assert os.listdir(challengeDirectory(stateDir, "http-01")) == []
    assert world.pool.calls.count(files.removeDurably) == 2


def test_workersAnswerNoMalformedPath(tmp_path):
    (tmp_path / "secret").write_text("no")
    worker = ChallengeFiles(str(tmp_path))
    for path in (ACME_CHALLENGE_PATH + b"../../secret", ACME_CHALLENGE_PATH + b"%2e%2e", b"/x"):
        assert worker.response(path) is None


def test_anEarlierRunsAnswersAreWithdrawn(tmp_path):
    publishing(HTTP01Responder(), tmp_path).start("a.example", TOKEN, KEYAUTH)
    publishing(HTTP01Responder(), tmp_path)
    assert ChallengeFiles(str(tmp_path)).response(PATH) is None


def test_tlsALPN01AnswersReachTheWorkers(tmp_path):
    published = publishing(TLSALPN01Responder(), tmp_path)
    worker = ChallengeFiles(str(tmp_path))
    assert worker.contextFor("a.example") is None
    published.start("A.example.", TOKEN, KEYAUTH)
    context = worker.contextFor("a.example")
    assert isinstance(context, SSL.Context)
    assert worker.contextFor("a.example") is context, "built once per answer"
    other = f"{TOKEN[:-1]}Z"
    published.start("a.example", other, f"{other}.{THUMB}")
    assert worker.contextFor("a.example") is not context, "a new answer, a new context"
    published.stop("a.example", other, f"{other}.{THUMB}")
    assert worker.contextFor("a.example") is None
    assert worker.contextFor("../etc") is None


def test_aWorkerServesWhatTheSupervisorStores(tmp_path):
    reactor = SyncReactor()
    supervisorStore = DirectoryStore(str(tmp_path / "certs"), reactor, SyncPool(), reactor)
    result(supervisorStore.load())
    followed = FollowedCerts(str(tmp_path), reactor, SyncPool())  # type: ignore[arg-type]
    followed.startService()
    fallback = ServerTLS(ensureSelfSigned(str(tmp_path)), TlsSettings())
    auto = followed.autoTLS(fallback, TlsSettings())
    assert auto.forName("a.example") is fallback
    ca = TestCA()
    keyPEM, chainPEM = ca.issue(["a.example"])
    result(supervisorStore.store(["a.example"], keyPEM, chainPEM))
    reactor.advance(FOLLOW_INTERVAL)
    creator = auto.forName("a.example")
    assert creator is not fallback
    client, _ = handshake(creator.context, b"a.example")
    names = peerLeaf(client).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["a.example"]
    followed.stopService()


def test_aWorkerNeverCleansTheSupervisorsDirectory(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / ".tmp-inflight").write_bytes(b"being written")
    reactor = SyncReactor()
    store = DirectoryStore(str(certs), reactor, SyncPool(), reactor, readOnly=True)
    result(store.load())
    assert os.listdir(certs) == [".tmp-inflight"]
    missing = DirectoryStore(str(tmp_path / "none"), reactor, SyncPool(), reactor, readOnly=True)
    result(missing.load())
    assert not (tmp_path / "none").exists()
