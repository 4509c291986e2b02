"""
L{dcrouter.auth.ldap.LDAPChecker} against a real OpenLDAP slapd on loopback.

Each slapd is started by a fixture in a temporary directory, on free ports
(C{-h ldap://127.0.0.1:P/ ldaps://127.0.0.1:Q/ ldaps://127.0.0.2:Q/}, in the
foreground with C{-d 0}, with its own C{slapd.conf} and mdb database), seeded
through ldap3 as its rootdn, and stopped by its PID. The system's slapd
service is never touched. The whole module is skipped without slapd
(Debian: C{apt-get install slapd}).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import protocol, reactor, task
from twisted.python.threadpool import ThreadPool

from dcrouter.auth.ldap import AuthUnavailable, LDAPChecker, LDAPSettings
from tests.helpers import freePort

SLAPD = shutil.which("slapd", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")
MODULE_DIR = "/usr/lib/ldap"
SCHEMA_DIR = "/etc/ldap/schema"

pytestmark = pytest.mark.skipif(
    SLAPD is None or not os.path.exists(os.path.join(MODULE_DIR, "back_mdb.so")),
    reason="slapd is not installed (Debian: apt-get install slapd)",
)

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "adminpw"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PW = "readerpw"
PEOPLE = f"ou=people,{SUFFIX}"
STAFF = f"cn=staff,ou=groups,{SUFFIX}"

# uid -> (password, extra mail values)
USERS = {
    "alice": ("alicepw", ["team@example.test"]),
    "bob": ("bobpw", ["team@example.test"]),
    "x*y": ("starpw", []),  # a literal '*' in a uid, for the injection tests
    "p(q)\\r": ("parenpw", []),  # parentheses and a backslash
}


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def selfSigned(directory):
    """A self-signed certificate naming 127.0.0.1 (and not 127.0.0.2)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slapd test")])
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certFile = os.path.join(directory, "cert.pem")
    keyFile = os.path.join(directory, "key.pem")
    with open(certFile, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(keyFile, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certFile, keyFile


class Slapd:
    """One throwaway slapd process in C{directory}."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.port = freePort()
        self.tlsPort = freePort()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldapsURL = f"ldaps://127.0.0.1:{self.tlsPort}"
        self.process = None

    def start(self):
        os.makedirs(os.path.join(self.directory, "db"), exist_ok=True)
        self.certFile, keyFile = selfSigned(self.directory)
        conf = os.path.join(self.directory, "slapd.conf")
        with open(conf, "w") as f:
            f.write(
                f"""\
include {SCHEMA_DIR}/core.schema
include {SCHEMA_DIR}/cosine.schema
include {SCHEMA_DIR}/inetorgperson.schema
include {SCHEMA_DIR}/nis.schema
modulepath {MODULE_DIR}
moduleload back_mdb
pidfile {self.directory}/slapd.pid
argsfile {self.directory}/slapd.args
TLSCertificateFile {self.certFile}
TLSCertificateKeyFile {keyFile}
loglevel stats
database mdb
maxsize 67108864
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {self.directory}/db
index uid,mail eq
access to attrs=userPassword by anonymous auth by self write by * none
access to * by * read
"""
            )
        urls = f"{self.url}/ {self.ldapsURL}/ ldaps://127.0.0.2:{self.tlsPort}/"
        with open(os.path.join(self.directory, "slapd.log"), "ab") as log:
            self.process = subprocess.Popen(
                [SLAPD, "-d", "0", "-h", urls, "-f", conf],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.waitUntilUp()

    def waitUntilUp(self):
        import ldap3

        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited {self.process.returncode}:\n{self.log()}")
            try:
                connection = ldap3.Connection(
                    ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=1),
                    ROOT_DN,
                    ROOT_PW,
                    auto_bind=True,
                )
            except ldap3.core.exceptions.LDAPException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"slapd did not answer in time:\n{self.log()}") from None
                time.sleep(0.1)
            else:
                connection.unbind()
                return

    def seed(self):
        import ldap3
        from ldap3.utils.dn import escape_rdn

        connection = ldap3.Connection(
            ldap3.Server(self.url, get_info=ldap3.NONE), ROOT_DN, ROOT_PW, auto_bind=True
        )

        def add(dn, classes, **attributes):
            assert connection.add(dn, classes, attributes), (dn, connection.result)

        add(SUFFIX, ["dcObject", "organization"], o="test", dc="example")
        add(PEOPLE, ["organizationalUnit"], ou="people")
        add(f"ou=groups,{SUFFIX}", ["organizationalUnit"], ou="groups")
        add(READER_DN, ["organizationalRole", "simpleSecurityObject"], userPassword=ssha(READER_PW))
        for uid, (password, mails) in USERS.items():
            add(
                f"uid={escape_rdn(uid)},{PEOPLE}",
                ["inetOrgPerson"],
                uid=uid,
                cn=uid,
                sn=uid,
                mail=[f"{uid}@example.test", *mails],
                userPassword=ssha(password),
            )
        add(STAFF, ["groupOfNames"], cn="staff", member=[f"uid=alice,{PEOPLE}"])
        connection.unbind()

    def log(self):
        try:
            with open(os.path.join(self.directory, "slapd.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def signal(self, number):
        self.process.send_signal(number)

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    try:
        server.seed()
        yield server
    finally:
        server.stop()


@pytest.fixture
def threadpool():
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-ldap")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def passwordFile(tmp_path):
    path = tmp_path / "bind-password"
    path.write_text(READER_PW + "\n")
    return str(path)


@pytest.fixture
def makeChecker(slapd, threadpool, passwordFile):
    def make(**settings):
        values = {
            "url": slapd.url,
            "base": PEOPLE,
            "bind_dn": READER_DN,
            "bind_password_file": passwordFile,
            "timeout": 5.0,
            "connect_timeout": 2.0,
        }
        values.update(settings)
        return LDAPChecker(LDAPSettings(**values), reactor, threadpool, reactor, cacheSize=0)

    return make


async def login(checker, user, password):
    """The avatar ID, or the exception class the check failed with."""
    try:
        return await checker.requestAvatarId(UsernamePassword(user, password))
    except (UnauthorizedLogin, AuthUnavailable) as e:
        return type(e)


# Logins


@pytest_twisted.ensureDeferred
async def test_good_login(makeChecker):
    checker = makeChecker()
    d = checker.requestAvatarId(UsernamePassword(b"alice", b"alicepw"))
    assert not d.called  # the directory is asked in a thread; the reactor goes on
    assert await d == b"alice"


@pytest_twisted.ensureDeferred
async def test_bad_password_and_unknown_user(makeChecker):
    checker = makeChecker()
    assert await login(checker, b"alice", b"bobpw") is UnauthorizedLogin
    assert await login(checker, b"alice", b"alicepw ") is UnauthorizedLogin
    assert await login(checker, b"carol", b"alicepw") is UnauthorizedLogin


@pytest_twisted.ensureDeferred
async def test_anonymous_search(makeChecker):
    checker = makeChecker(bind_dn=None, bind_password_file=None)
    assert await login(checker, b"bob", b"bobpw") == b"bob"


@pytest_twisted.ensureDeferred
async def test_other_filters(makeChecker):
    checker = makeChecker(user_filter="(&(objectClass=inetOrgPerson)(mail={user}))")
    assert await login(checker, b"bob@example.test", b"bobpw") == b"bob@example.test"
    # Two entries share this address: ambiguous, so nobody gets in with it.
    assert await login(checker, b"team@example.test", b"alicepw") is UnauthorizedLogin
    assert await login(checker, b"team@example.test", b"bobpw") is UnauthorizedLogin


# Injection


@pytest.mark.parametrize(
    "user",
    [
        "*",
        "a*",
        "*)(uid=*",
        "alice)(uid=*",
        "alice)(|(uid=*",
        "*)(|(objectClass=*)",
        "alice\x00",
        "alice\x00)(uid=*",
        "\\2a",
        "alice\\",
        "x*",
        "(uid=alice)",
    ],
)
@pytest_twisted.ensureDeferred
async def test_injection_matches_nothing(makeChecker, user):
    checker = makeChecker()
    for password in (b"alicepw", b"starpw"):
        assert await login(checker, user.encode(), password) is UnauthorizedLogin


@pytest_twisted.ensureDeferred
async def test_special_characters_match_themselves(makeChecker):
    checker = makeChecker()
    assert await login(checker, b"x*y", b"starpw") == b"x*y"
    assert await login(checker, b"x*y", b"alicepw") is UnauthorizedLogin
    assert await login(checker, b"p(q)\\r", b"parenpw") == b"p(q)\\r"


# Refused before the directory is asked


@pytest_twisted.ensureDeferred
async def test_empty_password_never_reaches_ldap(makeChecker):
    # Nothing listens there: asking would be AuthUnavailable, not UnauthorizedLogin.
    checker = makeChecker(url=f"ldap://127.0.0.1:{freePort()}")
    assert await login(checker, b"alice", b"") is UnauthorizedLogin
    assert await login(checker, b"", b"alicepw") is UnauthorizedLogin
    assert await login(checker, b"\xff", b"alicepw") is UnauthorizedLogin
    assert await login(checker, b"a" * 257, b"alicepw") is UnauthorizedLogin
    assert await login(checker, b"alice", b"alicepw") is AuthUnavailable
    assert checker.pending == 0


# Groups


@pytest_twisted.ensureDeferred
async def test_require_group(makeChecker):
    checker = makeChecker(require_group=STAFF)
    assert await login(checker, b"alice", b"alicepw") == b"alice"
    assert await login(checker, b"bob", b"bobpw") is UnauthorizedLogin
    assert await login(checker, b"alice", b"bobpw") is UnauthorizedLogin


@pytest_twisted.ensureDeferred
async def test_missing_group_is_unavailable_not_refused(makeChecker):
    checker = makeChecker(require_group=f"cn=nope,ou=groups,{SUFFIX}")
    assert await login(checker, b"alice", b"alicepw") is AuthUnavailable


# The directory failing: never a success


@pytest_twisted.ensureDeferred
async def test_wrong_service_password_is_unavailable(makeChecker, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    checker = makeChecker(bind_password_file=str(wrong))
    assert await login(checker, b"alice", b"alicepw") is AuthUnavailable


@pytest_twisted.ensureDeferred
async def test_missing_base_is_unavailable(makeChecker):
    checker = makeChecker(base=f"ou=nobody,{SUFFIX}")
    assert await login(checker, b"alice", b"alicepw") is AuthUnavailable


@pytest_twisted.ensureDeferred
async def test_stopped_and_hung_slapd(tmp_path, threadpool, passwordFile):
    own = Slapd(tmp_path / "own")
    own.start()
    try:
        own.seed()
        settings = LDAPSettings(
            url=own.url, base=PEOPLE, bind_dn=READER_DN, bind_password_file=passwordFile,
            timeout=1.0, connect_timeout=1.0,
        )
        checker = LDAPChecker(settings, reactor, threadpool, reactor, cacheSize=0)
        assert await login(checker, b"alice", b"alicepw") == b"alice"

        # Hung: slapd's kernel still accepts the connection, but nothing answers.
        own.signal(signal.SIGSTOP)
        ticks = []
        ticker = task.LoopingCall(lambda: ticks.append(reactor.seconds()))
        ticker.start(0.05)
        started = reactor.seconds()
        try:
            assert await login(checker, b"alice", b"alicepw") is AuthUnavailable
        finally:
            ticker.stop()
            own.signal(signal.SIGCONT)
        assert reactor.seconds() - started < 3
        assert len(ticks) >= 10  # the reactor kept running during the hung bind
        await deferLater(1.5)  # the stuck thread's own receive timeout ends it
        assert checker.pending == 0
        assert await login(checker, b"alice", b"alicepw") == b"alice"

        # Stopped: connection refused.
        own.stop()
        assert await login(checker, b"alice", b"alicepw") is AuthUnavailable
        assert await login(checker, b"alice", b"wrong") is AuthUnavailable
    finally:
        own.stop()


@pytest_twisted.ensureDeferred
async def test_server_that_never_answers_times_out(makeChecker):
    factory = protocol.Factory.forProtocol(protocol.Protocol)  # accepts, says nothing
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        checker = makeChecker(url=f"ldap://127.0.0.1:{port.getHost().port}", timeout=0.5)
        started = reactor.seconds()
        assert await login(checker, b"alice", b"alicepw") is AuthUnavailable
        assert reactor.seconds() - started < 2
    finally:
        await port.stopListening()
        await deferLater(1.2)  # let the blocked thread end before the pool stops


# TLS


@pytest_twisted.ensureDeferred
async def test_ldaps_and_starttls_with_the_ca(makeChecker, slapd):
    checker = makeChecker(url=slapd.ldapsURL, ca_file=slapd.certFile)
    assert await login(checker, b"alice", b"alicepw") == b"alice"
    assert await login(checker, b"alice", b"nope") is UnauthorizedLogin
    checker = makeChecker(start_tls=True, ca_file=slapd.certFile)
    assert await login(checker, b"alice", b"alicepw") == b"alice"


@pytest_twisted.ensureDeferred
async def test_tls_certificate_is_verified(makeChecker, slapd):
    # Not signed by a CA the system trusts:
    checker = makeChecker(url=slapd.ldapsURL)
    assert await login(checker, b"alice", b"alicepw") is AuthUnavailable
    checker = makeChecker(start_tls=True)
    assert await login(checker, b"alice", b"alicepw") is AuthUnavailable
    # The right CA, but the certificate does not name 127.0.0.2:
    checker = makeChecker(url=f"ldaps://127.0.0.2:{slapd.tlsPort}", ca_file=slapd.certFile)
    assert await login(checker, b"alice", b"alicepw") is AuthUnavailable


# Settings


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"url": "http://127.0.0.1"}, "ldap://host"),
        ({"url": "ldap://"}, "ldap://host"),
        ({"url": "ldap://h:99999"}, "bad port"),
        ({"url": "ldap://h/dc=x"}, "only a host"),
        ({"url": "ldaps://h", "start_tls": True}, "start_tls"),
        ({"user_filter": "uid={user}"}, "user_filter"),
        ({"user_filter": "(uid=alice)"}, "user_filter"),
        ({"bind_password_file": None}, "needs bind_password_file"),
        ({"bind_password_file": "/nonexistent/file"}, "cannot read"),
        ({"timeout": 0}, "timeouts"),
    ],
)
def test_bad_settings(settings, words, passwordFile, tmp_path):
    values = {
        "url": "ldap://127.0.0.1",
        "base": PEOPLE,
        "bind_dn": READER_DN,
        "bind_password_file": passwordFile,
        **settings,
    }
    with pytest.raises(ValueError, match=words):
        LDAPChecker(LDAPSettings(**values), reactor, ThreadPool(), reactor)


def test_empty_password_file(tmp_path):
    path = tmp_path / "empty"
    path.write_text("\n")
    settings = LDAPSettings(
        url="ldap://127.0.0.1", base=PEOPLE, bind_dn=READER_DN, bind_password_file=str(path)
    )
    with pytest.raises(ValueError, match="is empty"):
        LDAPChecker(settings, reactor, ThreadPool(), reactor)


def deferLater(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_success_cache_spares_the_directory(slapd, threadpool, passwordFile):
    settings = LDAPSettings(
        url=slapd.url, base=PEOPLE, bind_dn=READER_DN, bind_password_file=passwordFile
    )
    checker = LDAPChecker(settings, reactor, threadpool, reactor, cacheTTL=60)
    assert await login(checker, b"alice", b"alicepw") == b"alice"
    d = checker.requestAvatarId(UsernamePassword(b"alice", b"alicepw"))
    assert d.called  # from the cache, no thread
    assert await d == b"alice"
    assert await login(checker, b"alice", b"wrong") is UnauthorizedLogin


# Basic auth at layer 7, against this directory


async def routerWithLDAP(settings):
    from dcrouter.config.model import DaemonSettings, Defaults, RouteConfig, RouterConfig
    from dcrouter.service import DcRouter
    from tests.helpers import freePort

    port = freePort()
    route = RouteConfig(name="admin", ports=(port,), action="static",
                        options={"body": "welcome", "auth": "ldap"})
    config = RouterConfig(routes=(route,), ldap=settings,
                          daemon=DaemonSettings(drain_timeout=0.0),
                          defaults=Defaults(bind=("127.0.0.1",)))
    service = DcRouter(config)
    service.startService()
    return service, port


async def statusOf(port, user, password):
    import base64

    from tests.helpers import connect

    client = await connect(port)
    token = base64.b64encode(user + b":" + password)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                           b"Authorization: Basic " + token + b"\r\n\r\n")
    answer = await client.closed
    return int(answer.split(b" ", 2)[1])


@pytest_twisted.ensureDeferred
async def test_http_basic_auth_against_ldap(slapd, passwordFile):
    settings = LDAPSettings(url=slapd.url, base=PEOPLE, bind_dn=READER_DN,
                            bind_password_file=passwordFile, timeout=5.0, connect_timeout=2.0)
    service, port = await routerWithLDAP(settings)
    try:
        assert await statusOf(port, b"alice", b"alicepw") == 200
        assert await statusOf(port, b"alice", b"wrong") == 401
        assert await statusOf(port, b"*", b"alicepw") == 401
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_http_basic_auth_with_ldap_down_is_503(passwordFile):
    from tests.helpers import freePort

    settings = LDAPSettings(url=f"ldap://127.0.0.1:{freePort()}", base=PEOPLE, bind_dn=READER_DN,
                            bind_password_file=passwordFile, timeout=2.0, connect_timeout=1.0)
    service, port = await routerWithLDAP(settings)
    try:
        assert await statusOf(port, b"alice", b"alicepw") == 503
    finally:
        await service.stopService()
