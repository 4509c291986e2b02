"""C{[email]} and C{[email.rule:*]} DKIM keys and proxy interfaces, as the INI file gives them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dcrouter.config import ConfigErrors, loadConfig
from dcrouter.config.email import Dkim

EMAIL = "[email]\nhostname = mx.example.test\nports = 2525\n"


def writeKey(path: Path, key: object = None, mode: int = 0o600) -> Path:
    """A PEM private key (RSA 1024 unless given) at C{path}, with C{mode}."""
    if key is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    path.chmod(mode)
    return path


def load(tmp_path: Path, text: str):
    path = tmp_path / "dcrouter.ini"
    path.write_text(text)
    return loadConfig(str(path))


def errors(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigErrors) as caught:
        load(tmp_path, text)
    return caught.value.report()


def test_the_default_rule_and_a_rule_take_a_key_and_its_domain(tmp_path: Path) -> None:
    writeKey(tmp_path / "keys" / "out.key")
    partner = writeKey(tmp_path / "elsewhere" / "p.key")
    config = load(tmp_path, EMAIL + (
        "dkim_selector = s1\ndkim_key = keys/out.key\ndkim_domain = Example.ORG\n"
        f"[email.rule:*@partner.test]\nmode = mta\ndkim_selector = s2\ndkim_key = {partner}\n"
    ))  # fmt: skip
    assert config.email.dkim == Dkim("s1", str(tmp_path / "keys" / "out.key"), "example.org")
    [rule] = config.email.rules
    assert rule.dkim == Dkim("s2", str(partner), None)  # each From: domain
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (None, "cannot read {path}: No such file or directory"),
        (ec.generate_private_key(ec.SECP256R1()), "{path}: DKIM keys must be RSA"),
        (b"not a key\n", "{path}: not a usable private key: "),
    ],
)  # fmt: skip
def test_a_key_that_cannot_sign_is_an_error_at_its_line(
    tmp_path: Path, key: object, error: str
) -> None:
    """Found by checkconfig, not by a daemon that fails to start."""
    path = tmp_path / "dkim.key"
    if isinstance(key, bytes):
        path.write_bytes(key)
    elif key is not None:
        writeKey(path, key)
    report = errors(tmp_path, EMAIL + f"dkim_selector = s1\ndkim_key = {path}\n")
    where = f"{tmp_path / 'dcrouter.ini'}:5: [email] dkim_key: "
    assert report.startswith(where + error.format(path=path)), report
    assert "\n" not in report


def test_a_key_every_user_can_read_is_a_warning_at_its_line(tmp_path: Path) -> None:
    path = writeKey(tmp_path / "dkim.key", mode=0o644)
    config = load(tmp_path, EMAIL + (
        "[email.rule:*@partner.test]\nmode = mta\ndkim_selector = s2\n"
        f"dkim_key = {path}\n"
    ))  # fmt: skip
    assert [str(w) for w in config.warnings] == [
        f"{tmp_path / 'dcrouter.ini'}:7: [email.rule:*@partner.test] dkim_key: {path} holds a"
        f" secret and every user can read it (mode 0644); chmod o-r {path}"
    ]
    assert config.email.rules[0].dkim == Dkim("s2", str(path), None)


@pytest.mark.parametrize(
    ("keys", "line", "error"),
    [
        ("dkim_selector = s1\n", 4, "dkim_selector: give dkim_selector and dkim_key together"),
        ("dkim_key = /k\n", 4, "dkim_key: give dkim_selector and dkim_key together"),
        ("dkim_domain = example.org\n", 4,
         "dkim_domain: dkim_domain needs dkim_selector and dkim_key"),
        ("dkim_selector = s1\ndkim_key = /k\ndkim_domain = *.example.org\n", 6,
         "dkim_domain: '*.example.org': a domain, not a wildcard"),
    ],
)  # fmt: skip
def test_an_incomplete_key_is_an_error_with_its_line(
    tmp_path: Path, keys: str, line: int, error: str
) -> None:
    report = errors(tmp_path, EMAIL + keys)
    assert f"dcrouter.ini:{line}: [email] {error}" in report



def test_proxy_interfaces_are_addresses_written_once(tmp_path: Path) -> None:
    config = load(tmp_path, EMAIL + "proxy_interfaces = 203.0.113.5, 2001:DB8::5,\n  203.0.113.5\n")
    assert config.email.proxy_interfaces == ("203.0.113.5", "2001:db8::5")
    assert load(tmp_path, EMAIL).email.proxy_interfaces == ()


@pytest.mark.parametrize("value", ["mx.example.test", "203.0.113.0/24", "203.0.113.5:25"])
def test_a_proxy_interface_that_is_not_an_address_is_an_error_with_its_line(
    tmp_path: Path, value: str
) -> None:
    report = errors(tmp_path, EMAIL + f"proxy_interfaces = 192.0.2.1, {value}\n")
    assert f"dcrouter.ini:4: [email] proxy_interfaces: {value!r} is not an IP address" in report


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ("auth = static\nusers = alice:notahash\n", "6: [email] users: user 'alice': not a"),
        ("auth = ldap\n", "5: [email] auth: auth = ldap needs an [ldap] section"),
    ],
)
def test_what_the_mail_server_checks_passwords_with_is_checked_by_checkconfig(
    tmp_path: Path, keys: str, error: str
) -> None:
    """Not by a mail server that cannot start (nor a reload that takes it for the next start)."""
    from dcrouter.compile import checkConfigFile

    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path}\n[email]\nhostname = mx.example.test\n{keys}"
        "ports = 2525, 2587\nsubmission_ports = 2587\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    assert caught.value.report().startswith(f"{path}:{error}"), caught.value.report()


def test_senders_are_logins_with_addresses_and_domains(tmp_path: Path) -> None:
    config = load(tmp_path, EMAIL + (
        "senders =\n    Alice: Billing@Example.TEST, *@partner.test\n"
        "    bob: bob@b\u00fccher.example\n    alice: ops@example.test\n"
    ))  # fmt: skip
    assert config.email.sender_login_match is True
    assert config.email.senders == (
        ("alice", ("billing@example.test", "*@partner.test", "ops@example.test")),
        ("bob", ("bob@xn--bcher-kva.example",)),
    )
    assert load(tmp_path, EMAIL + "sender_login_match = no\n").email.sender_login_match is False


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("alice billing@example.test", "'alice billing@example.test' is not 'login: address"),
        ("alice: billing", "'billing' (for alice) is not an address or *@domain"),
        ("alice: a@*.example.test", "'*.example.test': a domain, not a wildcard"),
    ],
)
def test_a_bad_senders_line_is_an_error_at_its_key(tmp_path: Path, value: str, error: str) -> None:
    assert f"dcrouter.ini:4: [email] senders: {error}" in errors(tmp_path, EMAIL + f"senders = {value}\n")



@pytest.mark.parametrize(("second", "error"), [
    ("*@EXAMPLE.com", "[email.rule:*@example.com] matches the same recipients as"
     " [email.rule:*@example.com] at {path}:6"),
    ("example.com.", "[email.rule:example.com.] matches the same recipients as"
     " [email.rule:*@example.com] at {path}:6"),
    ("foo*bar", "[email.rule:foo*bar] 'foo*bar': '*' may only start '*@domain' or '*.domain'"),
    ("@example.com", "[email.rule:@example.com] '@example.com': empty local part"),
])
def test_a_rule_the_mail_server_would_refuse_is_an_error_at_its_section(
    tmp_path: Path, second: str, error: str
) -> None:
    """A duplicate (after normalizing) or malformed pattern failed the mail server's start."""
    from dcrouter.compile import checkConfigFile

    path = tmp_path / "dcrouter.ini"
    path.write_text(
        f"[dcrouter]\nstate_dir = {tmp_path}\n{EMAIL}"
        f"[email.rule:*@example.com]\nmode = reject\n[email.rule:{second}]\nmode = local\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        checkConfigFile(str(path))
    message = error.format(path=path)
    assert caught.value.report() == (
        f"{path}:8: {message} (patterns are compared lower-case, names as A-labels)"
        if "matches" in message else f"{path}:8: {message}"
    )
