"""L{dcrouter.certs.manager.CertManager}: the store, issuer and responders of one daemon."""

from __future__ import annotations

from dcrouter.certs.manager import CertManager
from dcrouter.certs.store import DirectoryStore
from dcrouter.config import loadConfig
from tests.unit.test_certs_acme import FakeCA
from tests.unit.test_certs_store import result
from tests.unit.test_certs_support import SyncPool, SyncReactor, TestCA


def configIn(tmp_path):
    path = tmp_path / "dcrouter.ini"
    path.write_text(f"""
[dcrouter]
state_dir = {tmp_path / "state"}
[acme]
enabled = yes
directory = https://127.0.0.1:1/dir
[route:web]
ports = 8443
tls = terminate
certificate = auto
domains = www.example.test
action = static
""")
    return loadConfig(str(path))


def test_aRestartReadsTheStoreBeforeItOrders(tmp_path):
    """
    The issuer's first check waits for the certificates on disk: were it
    to run first (its backoff file is read sooner than the store), every
    certificate would look missing and be ordered again at each restart.
    """
    config = configIn(tmp_path)
    reactor = SyncReactor()
    keyPEM, chainPEM = TestCA().issue(["www.example.test"])
    previous = DirectoryStore(
        str(tmp_path / "state" / "certs"), reactor, SyncPool(), reactor
    )
    result(previous.store(["www.example.test"], keyPEM, chainPEM))
    reactor.advance(previous.list()[0].notBefore.timestamp() + 3600)

    pool = SyncPool(hold=True)
    manager = CertManager(config, reactor, pool)  # type: ignore[arg-type]
    ca = FakeCA(reactor)
    manager.issuer._sessionFactory = ca.session
    assert manager.sync(config) == []
    manager.startService()
    # The blocking calls finish in the order they were asked for, and the
    # reactor runs what is due between them.
    while pool.held:
        onResult, f, args, kwargs = pool.held.pop(0)
        pool.runOne(onResult, f, args, kwargs)
        reactor.advance(0)
    assert ca.orders == []
    assert manager.store.get("www.example.test") is not None
    [status] = manager.status()
    assert status["state"] == "valid"
    manager.stopService()
