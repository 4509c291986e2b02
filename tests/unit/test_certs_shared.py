"""ACME across router workers: published answers, and a worker following the store."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from OpenSSL import SSL

from dcrouter.certs.challenges import ACME_CHALLENGE_PATH, HTTP01Responder, TLSALPN01Responder
from dcrouter.certs.manager import FOLLOW_INTERVAL, FollowedCerts
from dcrouter.certs.shared import ChallengeFiles, Published, challengeDirectory
from dcrouter.certs.store import DirectoryStore
from dcrouter.config.model import TlsSettings
from dcrouter.net.tls import ServerTLS, ensureSelfSigned
from tests.unit.test_certs_challenges import KEYAUTH, THUMB, TOKEN
from tests.unit.test_certs_store import result
from tests.unit.test_certs_support import SyncPool, SyncReactor, TestCA, handshake, peerLeaf

PATH = ACME_CHALLENGE_PATH + TOKEN.encode()


def test_http01AnswersReachTheWorkersAndLeaveWithTheLastName(tmp_path):
    published = Published(HTTP01Responder(), str(tmp_path))
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


def test_workersAnswerNoMalformedPath(tmp_path):
    (tmp_path / "secret").write_text("no")
    worker = ChallengeFiles(str(tmp_path))
    for path in (ACME_CHALLENGE_PATH + b"../../secret", ACME_CHALLENGE_PATH + b"%2e%2e", b"/x"):
        assert worker.response(path) is None


def test_anEarlierRunsAnswersAreWithdrawn(tmp_path):
    Published(HTTP01Responder(), str(tmp_path)).start("a.example", TOKEN, KEYAUTH)
    Published(HTTP01Responder(), str(tmp_path))
    assert ChallengeFiles(str(tmp_path)).response(PATH) is None


def test_tlsALPN01AnswersReachTheWorkers(tmp_path):
    published = Published(TLSALPN01Responder(), str(tmp_path))
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
