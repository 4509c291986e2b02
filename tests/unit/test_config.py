"""
Tests for the INI front end (L{dcrouter.config.ini}) and the certificate
check (L{dcrouter.config.certcheck}).

Every error test asserts the whole C{file:line: [section] key:} prefix, so
that an operator is sent to the right place.
"""

from __future__ import annotations

import datetime
import os
import textwrap
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from dcrouter.config import (
    CertificatePair,
    ConfigError,
    ConfigErrors,
    DaemonSettings,
    Defaults,
    HostPort,
    Limits,
    RawValue,
    RouteConfig,
    RouterConfig,
    Source,
    TlsSettings,
    loadConfig,
    parseConfig,
)
from dcrouter.config.certcheck import checkCertificatePair
from dcrouter.config.errors import ErrorCollector
from dcrouter.config.ini import IniValue, readIni
from dcrouter.config.model import AdminSettings

Write = Callable[..., str]

ROUTE = "[route:web]\nports = 80\n"
NOT_DURATION = "is not a duration (e.g. 30s, 500ms, 10m)"


# Certificates


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuerKey: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(issuerKey, hashes.SHA256())
    )


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _keyPem(key: ec.EllipticCurvePrivateKey, password: bytes = b"") -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


class Pairs:
    """PEM files in a temporary directory, good and bad."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        caKey = ec.generate_private_key(ec.SECP256R1())
        leafKey = ec.generate_private_key(ec.SECP256R1())
        otherKey = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("Test CA", caKey, "Test CA", caKey)
        leaf = _certificate("web.example", leafKey, "Test CA", caKey)
        self.cert = self.write("web.crt", _pem(leaf))
        self.key = self.write("web.key", _keyPem(leafKey))
        self.otherKey = self.write("other.key", _keyPem(otherKey))
        self.chain = self.write("chain.crt", _pem(leaf) + _pem(ca))
        self.reversedChain = self.write("reversed.crt", _pem(ca) + _pem(leaf))
        self.combined = self.write("combined.pem", _pem(leaf) + _keyPem(leafKey))
        self.encryptedKey = self.write(
            "encrypted.key", _keyPem(leafKey, password=b"secret")
        )
        self.garbage = self.write(
            "garbage.crt",
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        self.text = self.write("text.pem", b"hello\n")

    def write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("pem"))


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """Write a config file (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "dcrouter.ini") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def inSection(section: str, body: str) -> str:
    """C{body} in C{[section]}, at line 4, in an otherwise valid file."""
    ports = "ports = 82\n" if section.startswith("route:") else ""
    return f"[route:other]\nports = 81\n[{section}]\n{body}{ports}"


def errorsOf(path: str) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        loadConfig(path)
    return [str(error) for error in caught.value.errors]


def oneError(path: str) -> str:
    errors = errorsOf(path)
    assert len(errors) == 1, errors
    return errors[0]


class TestCertificateCheck:
    def test_matchingPair(self, pairs: Pairs) -> None:
        assert checkCertificatePair(CertificatePair(pairs.cert, pairs.key)) is None

    def test_chainLeafFirst(self, pairs: Pairs) -> None:
        assert checkCertificatePair(CertificatePair(pairs.chain, pairs.key)) is None

    def test_chainLeafNotFirst(self, pairs: Pairs) -> None:
        assert checkCertificatePair(CertificatePair(pairs.reversedChain, pairs.key)) == (
            f"the key in {pairs.key} does not match the certificate in {pairs.reversedChain}"
        )

    def test_mismatch(self, pairs: Pairs) -> None:
        assert checkCertificatePair(CertificatePair(pairs.cert, pairs.otherKey)) == (
            f"the key in {pairs.otherKey} does not match the certificate in {pairs.cert}"
        )

    def test_keyAndCertificateInOneFile(self, pairs: Pairs) -> None:
        pair = CertificatePair(pairs.combined, pairs.combined)
        assert checkCertificatePair(pair) is None

    def test_missingCertificate(self, pairs: Pairs) -> None:
        missing = os.path.join(pairs.directory, "missing.crt")
        assert checkCertificatePair(CertificatePair(missing, pairs.key)) == (
            f"cannot read certificate file {missing}: No such file or directory"
        )

    def test_missingKey(self, pairs: Pairs) -> None:
        missing = os.path.join(pairs.directory, "missing.key")
        assert checkCertificatePair(CertificatePair(pairs.cert, missing)) == (
            f"cannot read key file {missing}: No such file or directory"
        )

    def test_directory(self, pairs: Pairs) -> None:
        problem = checkCertificatePair(CertificatePair(str(pairs.directory), pairs.key))
        assert problem == f"cannot read certificate file {pairs.directory}: Is a directory"

    def test_notPem(self, pairs: Pairs) -> None:
        assert checkCertificatePair(CertificatePair(pairs.text, pairs.key)) == (
            f"certificate file {pairs.text} holds no PEM certificate"
        )
        assert checkCertificatePair(CertificatePair(pairs.cert, pairs.text)) == (
            f"key file {pairs.text} holds no PEM private key"
        )

    def test_badCertificate(self, pairs: Pairs) -> None:
        problem = checkCertificatePair(CertificatePair(pairs.garbage, pairs.key))
        assert problem is not None
        assert problem.startswith(f"certificate 1 in {pairs.garbage} is not a valid certificate")

    def test_encryptedKey(self, pairs: Pairs) -> None:
        assert checkCertificatePair(CertificatePair(pairs.cert, pairs.encryptedKey)) == (
            f"the private key in {pairs.encryptedKey} is encrypted; "
            "dcrouter needs it unencrypted"
        )

    def test_tooLarge(self, pairs: Pairs) -> None:
        big = pairs.write("big.crt", b"x" * (1024 * 1024 + 1))
        assert checkCertificatePair(CertificatePair(big, pairs.key)) == (
            f"certificate file {big} is larger than 1 MiB; is it really PEM?"
        )


class TestReader:
    """The INI grammar, and the errors of lines that do not fit it."""

    def test_commentsBlankLinesAndContinuations(self) -> None:
        errors = ErrorCollector()
        sections = readIni(
            textwrap.dedent(
                """\
                # a comment
                ; another
                [route:web]
                   # an indented comment

                ports = 80,
                    443
                  ; a comment between continuation lines
                    8080
                body =
                    first line
                    second line
                note = a # b ; c
                """
            ),
            "f.ini",
            errors,
        )
        assert errors.errors == []
        [section] = sections
        assert section.name == "route:web"
        assert section.source == Source("f.ini", 3)
        assert {key: (value.text, value.source.line) for key, value in section.values.items()} == {
            "ports": ("80,\n443\n8080", 6),
            "body": ("first line\nsecond line", 10),
            "note": ("a # b ; c", 13),
        }

    def test_lineNumbersAsInEditors(self) -> None:
        errors = ErrorCollector()
        [section] = readIni(
            "[route:web]\r\nnote = a\x0cb\u2028c\r\nports = 80\r\n", "f.ini", errors
        )
        assert errors.errors == []
        assert section.values["note"].text == "a\x0cb\u2028c"
        assert section.values["ports"] == IniValue("80", Source("f.ini", 3))

    def test_sectionNamesNormalized(self) -> None:
        errors = ErrorCollector()
        [section] = readIni("[ route : web ]\n", "f.ini", errors)
        assert section.name == "route:web"

    def test_keyBeforeSection(self, write: Write) -> None:
        path = write("ports = 80\n" + ROUTE)
        assert oneError(path) == (
            f"{path}:1: ports: key outside any section; put a [section] header above it"
        )

    def test_notAKeyOrSection(self, write: Write) -> None:
        path = write(ROUTE + "action: block\n    more\n")
        assert oneError(path) == (
            f"{path}:3: [route:web] not a [section] header, key = value line or comment: "
            "'action: block'"
        )

    def test_unclosedHeader(self, write: Write) -> None:
        path = write(ROUTE + "[tls\n")
        assert oneError(path) == f"{path}:3: [route:web] not a [section] header: '[tls'"

    def test_keysAfterABadHeaderAreNotTheSectionAbove(self, write: Write) -> None:
        """They were reported as duplicate keys of the section above, one by one."""
        path = write(ROUTE + "[route:b]   # second\nports = 82\n  more\naction = block\n")
        assert oneError(path) == (
            f"{path}:3: [route:web] not a [section] header: '[route:b]   # second'"
            " (a comment goes on a line of its own)"
        )

    @pytest.mark.parametrize(("line", "message"), [
        ("ports = 8081 # http", "ports: '8081 # http' is not a port or range"),
        ("action = static ; comment",
         "action: 'static ; comment' is not a word (letters, digits, _ . -)"),
    ])
    def test_aValueWithACommentThatDoesNotParseSaysWhy(
        self, write: Write, line: str, message: str
    ) -> None:
        path = write(f"[route:web]\n{line}\n" + ("" if "ports" in line else "ports = 80\n"))
        assert oneError(path) == (
            f"{path}:2: [route:web] {message}"
            " (a comment goes on a line of its own: # or ; after a value is part of it)"
        )

    @pytest.mark.parametrize("action", ["", "static ; comment"])
    def test_aBadActionChecksNoActionsKeys(self, action: str, tmp_path: Path) -> None:
        """It was taken for forward: 'needs a target', 'body: unknown key for action forward'."""
        from dcrouter.compile import checkConfigFile

        path = tmp_path / "dcrouter.ini"
        path.write_text(
            f"[dcrouter]\nstate_dir = {tmp_path}\n"
            f"[route:a]\nports = 8081\naction = {action}\nbody = hi\n"
        )
        with pytest.raises(ConfigErrors) as caught:
            checkConfigFile(str(path))
        assert [(e.source.line, e.key) for e in caught.value.errors] == [(5, "action")]

    def test_badKeyName(self, write: Write) -> None:
        path = write(ROUTE + "Action = block\n")
        assert oneError(path) == (
            f"{path}:3: [route:web] 'Action' is not a key name: use lower-case letters, "
            "digits and _"
        )

    def test_indentedLineWithoutKey(self, write: Write) -> None:
        path = write("[route:web]\n  ports = 80\n")
        assert errorsOf(path) == [
            f"{path}:1: [route:web] ports: required key is missing",
            f"{path}:2: [route:web] indented line, but no key above it to continue",
        ]

    def test_duplicateSection(self, write: Write) -> None:
        path = write("[tls]\nmin_version = 1.3\n" + ROUTE + "[tls]\nmin_version = 1.2\n")
        assert oneError(path) == f"{path}:5: [tls] duplicate section; the first is at {path}:1"

    def test_duplicateRouteName(self, write: Write) -> None:
        path = write(ROUTE + "[route: web ]\nports = 81\n")
        assert oneError(path) == (
            f"{path}:3: [route:web] duplicate section; the first is at {path}:1"
        )

    def test_duplicateKey(self, write: Write) -> None:
        path = write(ROUTE + "ports = 81\n    82\n")
        assert oneError(path) == (
            f"{path}:3: [route:web] ports: duplicate key; the first is at {path}:2"
        )

    def test_firstOfDuplicatesCounts(self) -> None:
        errors = ErrorCollector()
        [section] = readIni(ROUTE + "ports = 81\n", "f.ini", errors)
        assert section.values["ports"].text == "80"
        assert len(errors.errors) == 1

    def test_byteOrderMark(self, tmp_path: Path) -> None:
        path = tmp_path / "bom.ini"
        path.write_bytes(b"\xef\xbb\xbf" + ROUTE.encode())
        assert loadConfig(str(path)).routes[0].ports == (80,)

    @given(st.text(alphabet=st.sampled_from("[]=:#; \n\tabr-outeps1\x0c\u2028")))
    def test_anyTextGivesConfigOrConfigErrors(self, text: str) -> None:
        try:
            parseConfig(text, "any.ini")
        except ConfigErrors as e:
            assert all(error.source.file == "any.ini" for error in e.errors)


class TestFile:
    def test_missing(self, tmp_path: Path) -> None:
        path = str(tmp_path / "missing.ini")
        assert oneError(path) == (
            f"{path}:0: cannot read the configuration file: No such file or directory"
        )

    def test_directory(self, tmp_path: Path) -> None:
        assert oneError(str(tmp_path)) == (
            f"{tmp_path}:0: cannot read the configuration file: Is a directory"
        )

    def test_notUtf8(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.ini"
        path.write_bytes(b"[route:web]\nports = 80\nnote = caf\xe9\n")
        assert oneError(str(path)) == (
            f"{path}:3: not UTF-8 text: invalid continuation byte at byte 33"
        )

    def test_noRoutes(self, write: Write) -> None:
        path = write("[dcrouter]\nlog_format = json\n")
        assert oneError(path) == f"{path}:0: no [route:...] section: nothing to listen on"

    def test_empty(self, write: Write) -> None:
        path = write("")
        assert oneError(path) == f"{path}:0: no [route:...] section: nothing to listen on"


class TestSections:
    def test_unknownSection(self, write: Write) -> None:
        path = write(ROUTE + "[frobnicate]\nenabled = yes\n")
        assert oneError(path) == (
            f"{path}:3: [frobnicate] unknown section (known: [dcrouter], [defaults], [tls], "
            "[http], [ldap], [admin], [acme], [dns], [dns.zone:NAME], [email], "
            "[email.rule:PATTERN], [route:NAME])"
        )

    def test_routeWithoutColon(self, write: Write) -> None:
        path = write(ROUTE + "[route]\n")
        assert oneError(path).startswith(f"{path}:3: [route] unknown section (known: ")

    @pytest.mark.parametrize(
        ("section", "keys"),
        [
            ("dcrouter", "state_dir, log_format, hello_timeout, drain_timeout, retire_timeout, "
             "workers, splice"),
            (
                "defaults",
                "target, bind, ip_allow, ip_block, max_connections, max_connections_per_ip, "
                "connection_rate_per_minute, connect_timeout, idle_timeout, fin_timeout, "
                "trusted_proxies",
            ),
            ("tls", "cert, key, min_version, ciphers"),
        ],
    )
    def test_unknownKey(self, write: Write, section: str, keys: str) -> None:
        path = write(inSection(section, "threads = 4\n"))
        assert oneError(path) == f"{path}:4: [{section}] threads: unknown key (known: {keys})"

    @pytest.mark.parametrize("name", ["", "bad name", "web/1", "wéb"])
    def test_badRouteName(self, write: Write, name: str) -> None:
        path = write(f"[route:{name}]\nports = 80\n")
        assert oneError(path) == (
            f"{path}:1: [route:{name}] bad route name {name!r}: use letters, digits, _ . and -"
        )

    def test_mailRouteNamesAreReserved(self, write: Write) -> None:
        """A route named email-PORT replaced the mail server's route for that port."""
        path = write("[route:web]\nports = 80\n[route:email-2525]\nports = 8099\n")
        assert oneError(path) == (
            f"{path}:3: [route:email-2525] bad route name 'email-2525': email-PORT names the"
            " mail server's routes ([email] ports); choose another"
        )
        assert loadConfig(write("[route:email-webmail]\nports = 80\n")).routes[0].name == (
            "email-webmail"
        )

    def test_routeNameCharacters(self, write: Write) -> None:
        path = write("[route:Web_1.example-a]\nports = 80\n")
        assert loadConfig(path).routes[0].name == "Web_1.example-a"


class TestValues:
    """Each bad value is an error at its own line, naming section and key."""

    @pytest.mark.parametrize(
        ("ports", "message"),
        [
            ("eighty", "'eighty' is not a port or range"),
            ("0", "'0' is not a port or range"),
            ("70000", "'70000' is not a port or range"),
            ("9000-8000", "range '9000-8000' runs backwards"),
        ],
    )
    def test_badPorts(self, write: Write, ports: str, message: str) -> None:
        path = write(f"[dcrouter]\n\n[route:web]\naction = block\nports = {ports}\n")
        assert oneError(path) == f"{path}:5: [route:web] ports: {message}"

    def test_portsRequired(self, write: Write) -> None:
        path = write("# routes\n[route:web]\naction = block\n")
        assert oneError(path) == f"{path}:2: [route:web] ports: required key is missing"

    def test_emptyValue(self, write: Write) -> None:
        path = write(ROUTE + "priority =\n")
        assert oneError(path) == f"{path}:3: [route:web] priority: no value given"

    @pytest.mark.parametrize("cidr", ["10.0.0.300/8", "10.0.0.0/33"])
    @pytest.mark.parametrize(
        ("section", "key"),
        [
            ("defaults", "ip_allow"),
            ("defaults", "ip_block"),
            ("defaults", "trusted_proxies"),
            ("route:web", "ip_allow"),
            ("route:web", "ip_block"),
            ("route:web", "client_ip"),
        ],
    )
    def test_badCidr(self, write: Write, cidr: str, section: str, key: str) -> None:
        path = write(inSection(section, f"{key} = 192.0.2.0/24,\n    {cidr}\n"))
        assert oneError(path) == (
            f"{path}:4: [{section}] {key}: {cidr!r} is not an IP address or CIDR block"
        )

    @pytest.mark.parametrize(
        "key", ["max_connections", "max_connections_per_ip", "connection_rate_per_minute"]
    )
    @pytest.mark.parametrize("section", ["defaults", "route:web"])
    def test_limitsAtLeastOne(self, write: Write, section: str, key: str) -> None:
        path = write(inSection(section, f"{key} = 0\n"))
        assert oneError(path) == f"{path}:4: [{section}] {key}: 0 is out of range (>= 1)"

    @pytest.mark.parametrize(
        ("section", "key", "value", "message"),
        [
            ("dcrouter", "log_format", "xml", "'xml' is not one of text, json"),
            ("dcrouter", "hello_timeout", "soon", f"'soon' {NOT_DURATION}"),
            ("dcrouter", "hello_timeout", "0s", "'0s' is not longer than 0"),
            ("dcrouter", "drain_timeout", "-1", f"'-1' {NOT_DURATION}"),
            ("dcrouter", "retire_timeout", "0", "'0' is not longer than 0"),
            ("dcrouter", "retire_timeout", "never", f"'never' {NOT_DURATION}"),
            ("dcrouter", "workers", "0", "0 is out of range (1..64): use auto or a count from 1 to 64"),
            ("dcrouter", "workers", "all", "'all' is not a whole number: use auto or a count from 1 to 64"),
            ("dcrouter", "splice", "maybe", "'maybe' is not auto, yes or no"),
            ("defaults", "connect_timeout", "0", "'0' is not longer than 0"),
            ("defaults", "idle_timeout", "1 week", f"'1 week' {NOT_DURATION}"),
            ("defaults", "fin_timeout", "0s", "'0s' is not longer than 0"),
            ("defaults", "fin_timeout", "a minute", f"'a minute' {NOT_DURATION}"),
            ("http", "send_timeout", "0ms", "'0ms' is not longer than 0"),
            ("defaults", "target", "backend", "'backend' has no port (write host:port)"),
            ("defaults", "bind", "localhost", "'localhost' is not an IP address to listen on"),
            ("defaults", "max_connections", "many", "'many' is not a whole number"),
            ("tls", "min_version", "1.1", "'1.1' is not one of 1.2, 1.3"),
            ("route:web", "tls", "on", "'on' is not one of passthrough, terminate, "
             "terminate-and-reencrypt"),
            ("route:web", "priority", "high", "'high' is not a whole number"),
            ("route:web", "priority", "2000000", "2000000 is out of range (-1000000..1000000)"),
            ("route:web", "action", "a b", "'a b' is not a word (letters, digits, _ . -)"),
            ("route:web", "bind", "::1/128", "'::1/128' is not an IP address to listen on"),
            ("route:web", "domains", "a..b", "'a..b' is not a domain name or *.wildcard"),
        ],
    )
    def test_badValue(self, write: Write, section: str, key: str, value: str, message: str) -> None:
        path = write(inSection(section, f"{key} = {value}\n"))
        assert oneError(path) == f"{path}:4: [{section}] {key}: {message}"

    def test_priorityMayBeNegative(self, write: Write) -> None:
        path = write(ROUTE + "priority = -10\n")
        assert loadConfig(path).routes[0].priority == -10

    def test_drainTimeoutOfForeverIsAnError(self, write: Write) -> None:
        """400 digits were inf, accepted: a stop that waited for ever."""
        path = write(ROUTE + "[dcrouter]\ndrain_timeout = " + "9" * 400 + "\n")
        assert oneError(path) == (
            f"{path}:4: [dcrouter] drain_timeout: '{'9' * 40}...' is longer than 10 years (3650d)"
        )

    def test_drainTimeoutMayBeZero(self, write: Write) -> None:
        path = write(ROUTE + "[dcrouter]\ndrain_timeout = 0\n")
        assert loadConfig(path).daemon.drain_timeout == 0.0

    def test_retireTimeoutIsOffUnlessSet(self, write: Write) -> None:
        assert loadConfig(write(ROUTE)).daemon.retire_timeout is None
        assert loadConfig(write(ROUTE + "[dcrouter]\nretire_timeout = off\n")).daemon.retire_timeout is None
        assert loadConfig(write(ROUTE + "[dcrouter]\nretire_timeout = 2h\n")).daemon.retire_timeout == 7200

    def test_workers(self, write: Write) -> None:
        assert loadConfig(write(ROUTE + "[dcrouter]\nworkers = auto\n")).daemon.workers == 0
        assert loadConfig(write(ROUTE + "[dcrouter]\nworkers = 4\n")).daemon.workers == 4
    def test_spliceIsAutoUnlessSaidOtherwise(self, write: Write) -> None:
        assert loadConfig(write(ROUTE)).daemon.splice == "auto"
        for text, mode in (("no", "no"), ("off", "no"), ("yes", "yes"), ("Auto", "auto")):
            path = write(ROUTE + f"[dcrouter]\nsplice = {text}\n")
            assert loadConfig(path).daemon.splice == mode

    def test_ciphersContinued(self, write: Write) -> None:
        path = write(ROUTE + "[tls]\nciphers = ECDHE+AESGCM:\n    ECDHE+CHACHA20\n")
        assert loadConfig(path).tls.ciphers == "ECDHE+AESGCM: ECDHE+CHACHA20"

    def test_ciphersOpenSSLRefusesAreAnErrorAtTheirLine(self, write: Write) -> None:
        """Tried as a server context sets them, not left to the start."""
        path = write(ROUTE + "[tls]\nciphers = GARBAGE-NOT-A-CIPHER\n")
        assert oneError(path) == (
            f"{path}:4: [tls] ciphers: 'GARBAGE-NOT-A-CIPHER' selects no cipher OpenSSL knows"
            " (use TLS 1.2 names like ECDHE-RSA-AES128-GCM-SHA256, or ECDHE+AESGCM)"
        )

    def test_tls13SuitesAreNotCiphers(self, write: Write) -> None:
        path = write(ROUTE + "[tls]\nciphers = TLS_AES_128_GCM_SHA256\n")
        assert oneError(path).endswith(
            "; TLS 1.3 suites (TLS_...) are not set here: OpenSSL's defaults are used"
        )


class TestCertificates:
    """C{cert}/C{key}: both or neither, only when terminating, and matching."""

    def test_terminateWithoutCertificateUsesDefault(self, write: Write) -> None:
        path = write(ROUTE + "tls = terminate\n")
        config = loadConfig(path)
        assert config.routes[0].cert is None
        assert config.tls.cert is None

    def test_routeCertificate(self, write: Write, pairs: Pairs) -> None:
        path = write(
            f"{ROUTE}tls = terminate-and-reencrypt\ncert = {pairs.chain}\nkey = {pairs.key}\n"
        )
        assert loadConfig(path).routes[0].cert == CertificatePair(pairs.chain, pairs.key)

    def test_tlsSectionCertificate(self, write: Write, pairs: Pairs) -> None:
        path = write(ROUTE + f"tls = terminate\n[tls]\ncert = {pairs.cert}\nkey = {pairs.key}\n")
        assert loadConfig(path).tls.cert == CertificatePair(pairs.cert, pairs.key)

    def test_relativeToConfigDirectory(
        self, write: Write, pairs: Pairs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / "certs").mkdir()
        (tmp_path / "certs" / "web.crt").write_bytes(Path(pairs.cert).read_bytes())
        (tmp_path / "certs" / "web.key").write_bytes(Path(pairs.key).read_bytes())
        path = write(
            f"{ROUTE}tls = terminate\ncert = certs/web.crt\nkey = ./certs/../certs/web.key\n"
        )
        monkeypatch.chdir(pairs.directory)
        assert loadConfig(path).routes[0].cert == CertificatePair(
            str(tmp_path / "certs" / "web.crt"), str(tmp_path / "certs" / "web.key")
        )

    def test_mismatch(self, write: Write, pairs: Pairs) -> None:
        path = write(ROUTE + f"tls = terminate\ncert = {pairs.cert}\nkey = {pairs.otherKey}\n")
        assert oneError(path) == (
            f"{path}:4: [route:web] cert: the key in {pairs.otherKey} does not match the "
            f"certificate in {pairs.cert}"
        )

    def test_missingFile(self, write: Write, pairs: Pairs, tmp_path: Path) -> None:
        path = write(ROUTE + f"tls = terminate\nkey = {pairs.key}\ncert = nothere.crt\n")
        assert oneError(path) == (
            f"{path}:5: [route:web] cert: cannot read certificate file "
            f"{tmp_path / 'nothere.crt'}: No such file or directory"
        )

    def test_badKeyReportedAtCertLine(self, write: Write, pairs: Pairs) -> None:
        path = write(ROUTE + f"tls = terminate\ncert = {pairs.cert}\nkey = {pairs.text}\n")
        assert oneError(path) == (
            f"{path}:4: [route:web] cert: key file {pairs.text} holds no PEM private key"
        )

    def test_tlsSectionMismatch(self, write: Write, pairs: Pairs) -> None:
        path = write(ROUTE + f"[tls]\ncert = {pairs.cert}\nkey = {pairs.otherKey}\n")
        assert oneError(path) == (
            f"{path}:4: [tls] cert: the key in {pairs.otherKey} does not match the "
            f"certificate in {pairs.cert}"
        )

    def test_certWithoutKey(self, write: Write, pairs: Pairs) -> None:
        path = write(ROUTE + f"tls = terminate\ncert = {pairs.cert}\n")
        assert oneError(path) == (
            f"{path}:4: [route:web] cert: key is missing: give both cert and key, or neither"
        )

    def test_keyWithoutCert(self, write: Write, pairs: Pairs) -> None:
        path = write(f"{ROUTE}[tls]\nkey = {pairs.key}\n")
        assert oneError(path) == (
            f"{path}:4: [tls] key: cert is missing: give both cert and key, or neither"
        )

    def test_notForPassthroughRoutes(self, write: Write, pairs: Pairs) -> None:
        """(With no tls mode, the action decides: see tests/integration/test_service.py.)"""
        path = write(f"{ROUTE}cert = {pairs.cert}\nkey = {pairs.key}\ntls = passthrough\n")
        assert oneError(path) == (
            f"{path}:3: [route:web] cert: cert and key only apply to terminating routes "
            "(tls = terminate or terminate-and-reencrypt) and to actions that do STARTTLS "
            "themselves (smtp-starttls)"
        )

    def test_badTlsModeHidesFollowOnErrors(self, write: Write, pairs: Pairs) -> None:
        path = write(f"{ROUTE}tls = yes\ncert = {pairs.cert}\ndomains = a.example\n")
        assert errorsOf(path) == [
            f"{path}:3: [route:web] tls: 'yes' is not one of passthrough, terminate, "
            "terminate-and-reencrypt"
        ]


class TestSecretFiles:
    """A private key or password file every user can read is a warning at its line."""

    def privateKey(self, pairs: Pairs, tmp_path: Path, mode: int) -> Path:
        key = tmp_path / f"web-{mode:o}.key"
        key.write_bytes(Path(pairs.key).read_bytes())
        key.chmod(mode)
        return key

    def test_aKeyEveryUserCanReadIsAWarning(
        self, write: Write, pairs: Pairs, tmp_path: Path
    ) -> None:
        key = self.privateKey(pairs, tmp_path, 0o644)
        path = write(ROUTE + f"tls = terminate\ncert = {pairs.cert}\nkey = {key}\n")
        config = loadConfig(path)
        assert config.routes[0].cert == CertificatePair(pairs.cert, str(key))
        assert [str(w) for w in config.warnings] == [
            f"{path}:5: [route:web] key: {key} holds a secret and every user can read it"
            f" (mode 0644); chmod o-r {key}"
        ]

    def test_aKeyItsGroupCanReadIsFine(self, write: Write, pairs: Pairs, tmp_path: Path) -> None:
        """Debian's way: root:ssl-cert, mode 0640."""
        key = self.privateKey(pairs, tmp_path, 0o640)
        path = write(ROUTE + f"tls = terminate\ncert = {pairs.cert}\nkey = {key}\n")
        assert loadConfig(path).warnings == ()

    def test_aKeySeveralSectionsNameIsWarnedOfOnceWhereItComesFirst(
        self, write: Write, pairs: Pairs, tmp_path: Path
    ) -> None:
        key = self.privateKey(pairs, tmp_path, 0o604)
        pair = f"cert = {pairs.cert}\nkey = {key}\n"
        path = write(
            f"[tls]\n{pair}{ROUTE}tls = terminate\n{pair}"
            f"[route:api]\nports = 81\ntls = terminate\n{pair}"
        )
        [warning] = loadConfig(path).warnings
        assert str(warning).startswith(f"{path}:3: [tls] key: {key} holds a secret")
        assert "(mode 0604)" in str(warning)

    def test_anLdapPasswordFileEveryUserCanReadIsAWarning(
        self, write: Write, tmp_path: Path
    ) -> None:
        secret = tmp_path / "ldap.secret"
        secret.write_text("s3cret\n")
        secret.chmod(0o644)
        text = (
            "[ldap]\nurl = ldaps://ldap.example:636\nbase = ou=people,dc=example\n"
            f"bind_dn = cn=svc,dc=example\nbind_password_file = {secret}\n" + ROUTE
        )
        [warning] = loadConfig(write(text)).warnings
        assert warning.key == "bind_password_file" and warning.source.line == 5
        secret.chmod(0o600)
        assert loadConfig(write(text)).warnings == ()


def test_aStateDirThisUserCannotMakeIsAWarning(write: Write, tmp_path: Path) -> None:
    """The daemon, run as this user, would not start (checkconfig in ExecStartPre says why)."""
    (tmp_path / "afile").write_text("")
    path = write(f"[dcrouter]\nstate_dir = {tmp_path / 'afile' / 'state'}\n" + ROUTE)
    [warning] = loadConfig(path).warnings
    assert str(warning) == (
        f"{path}:2: [dcrouter] state_dir: {tmp_path / 'afile' / 'state'} cannot be used by this"
        f" user: {tmp_path / 'afile'} is not a directory; the daemon would not start"
    )
    assert loadConfig(write(f"[dcrouter]\nstate_dir = {tmp_path / 'new' / 'state'}\n" + ROUTE)
                      ).warnings == ()


class TestCrossChecks:
    def test_httpMatchers(self, write: Write) -> None:
        path = write(
            ROUTE + "domains = A.example\npath = /api/, /img/*.png\nmethod = get, POST\n"
            "headers =\n  X-Api-Version: v2*\n  Cookie: *\n"
        )
        (route,) = loadConfig(path).routes
        assert route.domains == ("a.example",)
        assert route.paths == ("/api/", "/img/*.png")
        assert route.methods == ("GET", "POST")
        assert route.headers == (("x-api-version", "v2*"), ("cookie", "*"))

    @pytest.mark.parametrize(
        ("key", "value", "message"),
        [
            ("path", "api/", "'api/' is not a path"),
            ("method", "GE T", "'GE T' is not an HTTP method"),
            ("headers", "X-A", "'X-A' is not 'Name: value'"),
        ],
    )
    def test_badHttpMatchers(self, write: Write, key: str, value: str, message: str) -> None:
        path = write(ROUTE + f"{key} = {value}\n")
        assert oneError(path).startswith(f"{path}:3: [route:web] {key}: {message}")

    def test_httpSection(self, write: Write) -> None:
        path = write("[http]\nmax_header_size = 16k\nheader_timeout = 5s\n" + ROUTE)
        config = loadConfig(path)
        assert config.http.header_timeout == 5.0

    def test_ldapSection(self, write: Write, tmp_path: Path) -> None:
        secret = tmp_path / "ldap.secret"
        secret.write_text("s3cret\n")
        path = write(
            "[ldap]\nurl = ldaps://ldap.example:636\nbase = ou=people,dc=example\n"
            f"bind_dn = cn=svc,dc=example\nbind_password_file = {secret}\n" + ROUTE
        )
        ldap = loadConfig(path).ldap
        assert ldap is not None and ldap.url == "ldaps://ldap.example:636"
        assert ldap.user_filter == "(uid={user})" and ldap.bind_password_file == str(secret)

    def test_ldapSectionErrors(self, write: Write) -> None:
        path = write(
            "[ldap]\nurl = http://x\nuser_filter = uid=x\nbind_dn = cn=svc\n" + ROUTE
        )
        errors = "\n".join(errorsOf(path))
        assert "[ldap] url: 'http://x' is not an ldap:// or ldaps:// URL" in errors
        assert "[ldap] base: required key is missing" in errors
        assert "[ldap] user_filter:" in errors
        assert "[ldap] bind_dn: needs bind_password_file" in errors

    @pytest.mark.parametrize(("text", "days"), [
        ("30", 30.0), ("0.5", 0.5), (" 7 ", 7.0), ("30d", 30.0), ("10 D", 10.0),
    ])
    def test_renewDaysIsANumberOfDays(self, write: Write, text: str, days: float) -> None:
        path = write(ROUTE + f"[acme]\nrenew_days = {text}\n")
        assert loadConfig(path).acme.renew_days == days

    @pytest.mark.parametrize(("text", "error"), [
        ("10s", "'10s': a number of days (like 30 or 30d), in no other unit"),
        ("2h", "'2h': a number of days (like 30 or 30d), in no other unit"),
        ("ten", "'ten' is not a number of days (like 30)"),
        ("\u0663\u0660", "'\u0663\u0660' is not a number of days (like 30)"),
        ("0", "0 is out of range (more than 0, at most 3650)"),
        ("5000", "5000 is out of range (more than 0, at most 3650)"),
    ])
    def test_renewDaysWithAUnitIsAnError(self, write: Write, text: str, error: str) -> None:
        """10d was read as a duration (864000 seconds), then taken as days."""
        path = write(ROUTE + f"[acme]\nrenew_days = {text}\n")
        assert oneError(path) == f"{path}:4: [acme] renew_days: {error}"

    def test_acmeSectionAndCertificateAuto(self, write: Write) -> None:
        path = write(
            "[acme]\nenabled = yes\ndirectory = staging\nchallenge = tls-alpn-01\n"
            "[route:web]\nports = 443\ndomains = a.example\ntls = terminate\n"
            "certificate = auto\n"
        )
        config = loadConfig(path)
        assert config.acme.enabled and config.acme.challenge == "tls-alpn-01"
        assert config.routes[0].certificate == "auto"

    def test_certificateAutoErrors(self, write: Write) -> None:
        path = write(
            "[acme]\ndirectory = http://insecure\n"
            "[route:a]\nports = 443\ntls = passthrough\ndomains = a.example\ncertificate = auto\n"
            "[route:b]\nports = 8443\ntls = terminate\ncertificate = yes\n"
            "[route:c]\nports = 9443\ntls = terminate\ndomains = c.example\ncertificate = auto\n"
        )
        errors = "\n".join(errorsOf(path))
        assert "[acme] directory: 'http://insecure' is not production, staging or an https:// URL" in errors
        assert "[route:a] certificate: certificate = auto needs tls = terminate" in errors
        assert "[route:b] certificate: 'yes': the only value is auto" in errors
        assert "[route:c] certificate: certificate = auto needs [acme] enabled = yes" in errors

    def test_adminSection(self, write: Write) -> None:
        path = write("[admin]\nlisten = 127.0.0.1:9900\n" + ROUTE)
        admin = loadConfig(path).admin
        assert admin.listen is not None and admin.listen.port == 9900 and admin.users is None

    def test_adminSocket(self, write: Write) -> None:
        """On by default, in the state directory; a path is relative to the file; off is off."""
        here = os.path.dirname(write(ROUTE))
        assert loadConfig(write(ROUTE)).admin.socket == os.path.join(here, "state", "admin.sock")
        state = "[dcrouter]\nstate_dir = /var/lib/x\n"
        assert loadConfig(write(ROUTE + state)).admin.socket == "/var/lib/x/admin.sock"
        path = write("[admin]\nsocket = run/admin.sock\n" + ROUTE)
        assert loadConfig(path).admin.socket == os.path.join(here, "run", "admin.sock")
        assert loadConfig(write("[admin]\nsocket = off\n" + ROUTE)).admin.socket is None

    def test_adminSocketTooLong(self, write: Write) -> None:
        long = "/" + "d" * 120
        path = write(f"[admin]\nsocket = {long}/admin.sock\n" + ROUTE)
        assert oneError(path) == (
            f"{path}:2: [admin] socket: {long}/admin.sock is 132 bytes, longer than a UNIX"
            " socket's path may be (107)"
        )
        path = write(ROUTE + f"[dcrouter]\nstate_dir = {long}\n")
        assert oneError(path).startswith(f"{path}:0: [admin] socket: {long}/admin.sock is 132")
        assert "(the default, in state_dir): set socket to a shorter path, or off" in oneError(path)

    def test_httpSectionErrors(self, write: Write) -> None:
        path = write("[http]\nmax_headers = 2\nbody_timeout = 0\nsize = 1\n" + ROUTE)
        assert len(errorsOf(path)) == 3

    @pytest.mark.parametrize("tls", ["passthrough", "terminate"])
    def test_domainsWithTls(self, write: Write, tls: str) -> None:
        path = write(ROUTE + f"tls = {tls}\ndomains = A.example., *.b.example\n")
        assert loadConfig(path).routes[0].domains == ("a.example", "*.b.example")

    def test_bindConflict(self, write: Write) -> None:
        path = write(
            """\
            [route:a]
            ports = 443
            tls = passthrough

            [route:b]
            bind = 127.0.0.1
            ports = 443
            tls = terminate
            """
        )
        assert oneError(path) == (
            f"{path}:7: [route:b] ports: port 443 is bound to 0.0.0.0 by [route:a] "
            f"({path}:2) and to 127.0.0.1 by [route:b]"
        )

    def test_bindConflictWithDefaults(self, write: Write) -> None:
        path = write(
            """\
            [defaults]
            bind = ::, 0.0.0.0
            [route:a]
            ports = 8000-8003, 9000
            bind = 127.0.0.1
            [route:b]
            ports = 8001-8002, 9000, 9999
            """
        )
        assert oneError(path) == (
            f"{path}:7: [route:b] ports: ports 8001-8002, 9000 are bound to 127.0.0.1 by "
            f"[route:a] ({path}:4) and to ::, 0.0.0.0 by [route:b]"
        )

    def test_sameBindWrittenDifferently(self, write: Write) -> None:
        path = write(
            """\
            [defaults]
            bind = ::, 0.0.0.0
            [route:a]
            ports = 443
            bind = 0.0.0.0, [::]
            tls = passthrough
            [route:b]
            ports = 443
            tls = terminate
            """
        )
        assert [route.name for route in loadConfig(path).routes] == ["a", "b"]

    def test_plainFallbackBesideTls(self, write: Write) -> None:
        path = write(
            """\
            [route:tls]
            ports = 443
            tls = passthrough
            domains = a.example
            [route:plain]
            ports = 443
            """
        )
        assert [route.tls for route in loadConfig(path).routes] == ["passthrough", None]


class TestCollected:
    def test_allErrorsSortedByLine(self, write: Write, pairs: Pairs) -> None:
        path = write(
            f"""\
            [route:b]
            ports = 443
            bind = 127.0.0.1
            domains = b.example
            tls = terminate
            cert = {pairs.cert}
            key = {pairs.otherKey}

            [route:a]
            ports = eighty
            client_ip = 10.0.0.0/33
            [dcrouter]
            log_format = xml
            [nope]
            [route:c]
            ports = 443
            """
        )
        with pytest.raises(ConfigErrors) as caught:
            loadConfig(path)
        errors = caught.value.errors
        assert [(e.source.line, e.section, e.key) for e in errors] == [
            (6, "route:b", "cert"),
            (10, "route:a", "ports"),
            (11, "route:a", "client_ip"),
            (13, "dcrouter", "log_format"),
            (14, "nope", None),
            (16, "route:c", "ports"),
        ]
        assert all(e.source.file == path for e in errors)
        assert str(caught.value) == "\n".join(str(e) for e in errors)

    def test_errorsAreConfigErrors(self, write: Write) -> None:
        path = write(ROUTE + "priority = x\n")
        with pytest.raises(ConfigErrors) as caught:
            loadConfig(path)
        assert caught.value.errors == [
            ConfigError("'x' is not a whole number", Source(path, 3), "route:web", "priority")
        ]


class TestValidConfig:
    def test_fullExample(self, write: Write, pairs: Pairs, tmp_path: Path) -> None:
        path = write(
            f"""\
            # dcrouter test configuration
            [dcrouter]
            state_dir = var/state
            log_format = json
            hello_timeout = 5s
            drain_timeout = 1m

            [defaults]
            target = backend.internal:8080
            bind = 0.0.0.0, ::
            ip_allow = 10.0.0.0/8, 192.0.2.0/24
            ip_block = 10.6.6.0/24
            max_connections = 1000
            max_connections_per_ip = 20
            connection_rate_per_minute = 600
            connect_timeout = 3s
            idle_timeout = 15m
            fin_timeout = 30s
            trusted_proxies = 10.1.0.1

            [tls]
            cert = {pairs.chain}
            key = {pairs.key}
            min_version = 1.3
            ciphers = ECDHE+AESGCM

            ; HTTPS to the web servers, by name
            [route:web]
            ports = 443
            domains = Web.Example., *.web.example
            tls = terminate-and-reencrypt
            priority = 10
            client_ip = 192.0.2.0/24
            max_connections = 100
            target = [2001:db8::1]:8443,
                     10.0.0.2:8443
            balance = round-robin

            [route:ssh]
            ports = 2222, 2200-2201
            bind = ::, 0.0.0.0
            priority = -1
            ip_block = 192.0.2.66
            target = 10.0.0.3:22

            [route:blocked]
            ports = 443
            action = block
            """
        )
        directory = str(tmp_path)
        expected = RouterConfig(
            routes=(
                RouteConfig(
                    name="web",
                    ports=(443,),
                    domains=("web.example", "*.web.example"),
                    tls="terminate-and-reencrypt",
                    priority=10,
                    client_ip=(ip_network("192.0.2.0/24"),),
                    limits=Limits(max_connections=100),
                    options={
                        "target": RawValue("[2001:db8::1]:8443,\n10.0.0.2:8443", Source(path, 35)),
                        "balance": RawValue("round-robin", Source(path, 37)),
                    },
                    source=Source(path, 28),
                ),
                RouteConfig(
                    name="ssh",
                    ports=(2222, 2200, 2201),
                    bind=("::", "0.0.0.0"),
                    priority=-1,
                    limits=Limits(ip_block=(ip_network("192.0.2.66/32"),)),
                    options={"target": RawValue("10.0.0.3:22", Source(path, 44))},
                    source=Source(path, 39),
                ),
                RouteConfig(
                    name="blocked", ports=(443,), action="block", source=Source(path, 46)
                ),
            ),
            daemon=DaemonSettings(
                state_dir=os.path.join(directory, "var", "state"),
                log_format="json",
                hello_timeout=5.0,
                drain_timeout=60.0,
            ),
            defaults=Defaults(
                target=HostPort("backend.internal", 8080),
                bind=("0.0.0.0", "::"),
                limits=Limits(
                    ip_allow=(ip_network("10.0.0.0/8"), ip_network("192.0.2.0/24")),
                    ip_block=(ip_network("10.6.6.0/24"),),
                    max_connections=1000,
                    max_connections_per_ip=20,
                    connection_rate_per_minute=600,
                ),
                connect_timeout=3.0,
                idle_timeout=900.0,
                fin_timeout=30.0,
                trusted_proxies=(ip_network("10.1.0.1/32"),),
            ),
            tls=TlsSettings(
                cert=CertificatePair(pairs.chain, pairs.key),
                min_version="1.3",
                ciphers="ECDHE+AESGCM",
            ),
            admin=AdminSettings(socket=os.path.join(directory, "var", "state", "admin.sock")),
            path=path,
        )
        assert loadConfig(path) == expected

    def test_minimal(self, write: Write, tmp_path: Path) -> None:
        path = write(ROUTE)
        assert loadConfig(path) == RouterConfig(
            routes=(RouteConfig(name="web", ports=(80,), source=Source(path, 1)),),
            daemon=DaemonSettings(state_dir=str(tmp_path / "state")),
            admin=AdminSettings(socket=str(tmp_path / "state" / "admin.sock")),
            path=path,
        )

    def test_stateDirRelativeToConfigDirectory(
        self, write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = write(ROUTE + "[dcrouter]\nstate_dir = ../var/lib/dcrouter\n")
        monkeypatch.chdir("/")
        assert loadConfig(path).daemon.state_dir == str(tmp_path.parent / "var/lib/dcrouter")

    def test_absoluteStateDir(self, write: Write) -> None:
        path = write(ROUTE + "[dcrouter]\nstate_dir = /var/lib/dcrouter\n")
        assert loadConfig(path).daemon.state_dir == "/var/lib/dcrouter"

    def test_parseConfigWithoutFile(self) -> None:
        config = parseConfig(ROUTE + "tls = terminate\n", "/etc/dcrouter/dcrouter.ini")
        assert config.daemon.state_dir == "/etc/dcrouter/state"
        assert config.path == "/etc/dcrouter/dcrouter.ini"
        assert config.routes[0].tls == "terminate"

    def test_relativePathKeptInMessages(
        self, write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        write(ROUTE)
        assert loadConfig("dcrouter.ini").path == str(tmp_path / "dcrouter.ini")
        write(ROUTE + "priority = x\n")
        assert oneError("dcrouter.ini") == (
            "dcrouter.ini:3: [route:web] priority: 'x' is not a whole number"
        )

    def test_modelNeedsNoFiles(self) -> None:
        route = RouteConfig(
            name="web",
            ports=(443,),
            tls="terminate",
            cert=CertificatePair("/nonexistent.crt", "/nonexistent.key"),
            options={"body": "hello"},
        )
        assert RouterConfig(routes=(route,)).routes[0].options == {"body": RawValue("hello")}
