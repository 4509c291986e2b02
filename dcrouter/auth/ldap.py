"""
LDAP users: a twisted.cred checker that searches and binds with ldap3.

A login is checked the way mail servers and Apache's mod_authnz_ldap do it:

  1. refuse an empty password outright: an LDAP simple bind with a DN and
     no password is an I{unauthenticated} bind that many servers answer
     with success (RFC 4513 5.1.2), so it must never reach the directory;
  2. bind as the service account (C{bind_dn}, password read from
     C{bind_password_file}; anonymously without C{bind_dn});
  3. search C{base} with C{user_filter}, C{{user}} replaced by the user
     name escaped per RFC 4515 (C{*}, C{(}, C{)}, C{\\}, NUL), so a name
     like C{*} or C{x)(uid=*} matches only itself; exactly one entry must
     match;
  4. bind as that entry's DN with the password;
  5. with C{require_group}, check that the group entry lists the user
     (C{member} or C{uniqueMember} = the DN, or C{memberUid} = the name).

ldap3 blocks, so all of it runs in a bounded thread pool
(L{dcrouter.auth.passwords.BlockingCalls}): the reactor thread never waits
for the directory. A connection opens within C{connect_timeout}; each read
waits at most C{timeout}; and the whole check answers within C{timeout}
however many round trips it takes.

Two kinds of failure stay apart: the directory I{said no} (no such user,
several matches, wrong password, not in the group) is
L{UnauthorizedLogin}; the directory could not be asked or did not answer
properly (down, timeout, TLS failure, the service account's bind refused,
a server error, overload) is L{AuthUnavailable}, which HTTP answers with
503 and SMTP with 454, so neither is ever a success.

Each check opens its own connections (ldap3's synchronous connections are
not for sharing between threads); a L{SuccessCache} keeps recent successes
for C{cacheTTL} seconds (60 by default), so a browser's keep-alive requests
repeating Basic credentials do not each cost two connections and three
round trips. A disabled account or changed password takes effect within
that time.
"""

from __future__ import annotations

import math
import ssl
from typing import Any, Optional
from urllib.parse import urlsplit

from ldap3 import ANONYMOUS, BASE, NONE, SIMPLE, SUBTREE, SYNC, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.auth.passwords import (
    AuthUnavailable,
    AvatarId,
    BlockingCalls,
    SuccessCache,
    credentialBytes,
    credentialText,
)
from dcrouter.config.model import LDAPSettings

__all__ = ["AuthUnavailable", "LDAPChecker", "LDAPSettings", "readSecretFile"]

log = Logger()

MAX_USER_LENGTH = 256

# Bind results that are the directory's answer about this user's
# credentials: invalidCredentials, inappropriateAuthentication,
# insufficientAccessRights, unwillingToPerform (e.g. a locked or expired
# account), constraintViolation (password policy). Any other non-success
# result is the directory failing, not the user.
_REFUSED_BIND = frozenset({49, 48, 50, 53, 19})
_SIZE_LIMIT_EXCEEDED = 4


def readSecretFile(path: str) -> str:
    """
    A secret kept in a file: its text, less one trailing line break.

    Blocking file I/O: for configuration time.

    @raise ValueError: the file cannot be read, is not UTF-8, or is empty.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    for end in (b"\r\n", b"\n"):
        if data.endswith(end):
            data = data[: -len(end)]
            break
    if not data:
        raise ValueError(f"{path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


@implementer(ICredentialsChecker)
class LDAPChecker:
    """
    Checks C{IUsernamePassword} credentials against an LDAP directory.

    The avatar ID is the user name as given (UTF-8 C{bytes}), not the
    entry's DN: what the user typed is what logs and relay rules know.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        settings: LDAPSettings,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        cacheSize: int = 1024,
        cacheTTL: float = 60.0,
        maxPending: int = 64,
    ) -> None:
        """
        Check C{settings} and read the service account's password file.

        @param threadpool: where ldap3 runs; its owner starts and stops it,
            and its size bounds the checks in flight at once.
        @param maxPending: checks running or waiting for a thread, beyond
            which a check fails at once with L{AuthUnavailable}.
        @raise ValueError: a setting is wrong or the password file unreadable.
        """
        parts = urlsplit(settings.url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise ValueError(
                f"url must be ldap://host[:port] or ldaps://host[:port]: {settings.url!r}"
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"url has a bad port: {settings.url!r}") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"url must name only a host and port: {settings.url!r}")
        useSSL = parts.scheme == "ldaps"
        if useSSL and settings.start_tls:
            raise ValueError("start_tls is for ldap:// URLs; ldaps:// is TLS from the start")
        if "{user}" not in settings.user_filter or not (
            settings.user_filter.startswith("(") and settings.user_filter.endswith(")")
        ):
            raise ValueError("user_filter must be a (filter) with {user} in it, e.g. (uid={user})")
        if settings.bind_dn is not None and settings.bind_password_file is None:
            raise ValueError("bind_dn needs bind_password_file")
        if not (settings.timeout > 0 and settings.connect_timeout > 0):
            raise ValueError("timeouts must be above 0")
        self.settings = settings
        self._host = parts.hostname
        self._port = port or (636 if useSSL else 389)
        self._useSSL = useSSL
        self._bindPassword: Optional[bytes] = None
        if settings.bind_password_file is not None:
            self._bindPassword = readSecretFile(settings.bind_password_file).encode("utf-8")
        # ldap3 packs its receive timeout with struct "LL": it must be an int.
        self._receiveTimeout = max(1, math.ceil(settings.timeout))
        self._calls = BlockingCalls(
            reactor, threadpool, clock, maxPending=maxPending, timeout=settings.timeout
        )
        self._cache = SuccessCache(clock, maxSize=cacheSize, ttl=cacheTTL)

    @property
    def pending(self) -> int:
        """Checks in the thread pool or waiting for it, for metrics."""
        return self._calls.pending

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[AvatarId]:
        """
        Check a user name and password against the directory.

        @return: a L{Deferred} firing with the user name (UTF-8 C{bytes}),
            or failing with L{UnauthorizedLogin} (the directory said no) or
            L{AuthUnavailable} (the directory could not say).
        """
        user = credentialText(credentials.username)
        password = credentialBytes(credentials.password)
        if user is None or len(user) > MAX_USER_LENGTH or not password:
            return fail(UnauthorizedLogin())
        avatarId = user.encode("utf-8")
        cacheKey = self._cache.key(user, password)
        if self._cache.hit(cacheKey):
            return succeed(avatarId)

        def succeeded(_: None) -> AvatarId:
            self._cache.add(cacheKey)
            return avatarId

        return self._calls.run(self._check, user, password).addCallback(succeeded)

    # In the thread pool from here on.

    def _check(self, user: str, password: bytes) -> None:
        """
        Search and bind (see the module docstring). Blocking.

        @raise UnauthorizedLogin: the directory refused the credentials.
        @raise AuthUnavailable: the directory could not be asked.
        """
        server = self._server()
        service = self._connection(server, self.settings.bind_dn, self._bindPassword)
        userConnection = None
        try:
            self._open(service)
            if self.settings.bind_dn is not None and not service.bind():
                raise AuthUnavailable(f"the service account's bind failed: {_result(service)}")
            dn = self._findUser(service, user)
            userConnection = self._connection(server, dn, password)
            self._open(userConnection)
            if not userConnection.bind():
                code = (userConnection.result or {}).get("result")
                if code in _REFUSED_BIND:
                    raise UnauthorizedLogin()
                raise AuthUnavailable(f"bind as the user failed: {_result(userConnection)}")
            if self.settings.require_group is not None:
                self._checkGroup(service, user, dn)
        except LDAPException as e:
            raise AuthUnavailable(f"LDAP error: {e}") from None
        except OSError as e:  # ssl.SSLError and socket errors ldap3 lets through
            raise AuthUnavailable(f"LDAP connection error: {e}") from None
        finally:
            for connection in (userConnection, service):
                if connection is not None:
                    _close(connection)

    def _server(self) -> Server:
        tls = None
        if self._useSSL or self.settings.start_tls:
            tls = Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=self.settings.ca_file,
                sni=self._host,
            )
        return Server(
            self._host,
            port=self._port,
            use_ssl=self._useSSL,
            tls=tls,
            get_info=NONE,  # no schema or server info: one request fewer
            connect_timeout=self.settings.connect_timeout,
        )

    def _connection(self, server: Server, dn: Optional[str], password: Optional[bytes]) -> Any:
        return Connection(
            server,
            user=dn,
            password=password,
            authentication=SIMPLE if dn is not None else ANONYMOUS,
            client_strategy=SYNC,
            auto_bind=False,
            raise_exceptions=False,
            read_only=True,
            receive_timeout=self._receiveTimeout,
        )

    def _open(self, connection: Any) -> None:
        """Connect, and StartTLS if configured (both raise on failure)."""
        connection.open()
        if self.settings.start_tls and not connection.start_tls():
            raise AuthUnavailable(f"StartTLS failed: {_result(connection)}")

    def _findUser(self, service: Any, user: str) -> str:
        """The DN of the one entry C{user_filter} finds for C{user}."""
        search = self.settings.user_filter.replace("{user}", escape_filter_chars(user))
        service.search(
            self.settings.base,
            search,
            search_scope=SUBTREE,
            attributes=["1.1"],  # no attributes: the DN is all we need
            size_limit=2,
            time_limit=self._receiveTimeout,
        )
        code = (service.result or {}).get("result")
        entries = [r["dn"] for r in service.response or () if r.get("type") == "searchResEntry"]
        if code == _SIZE_LIMIT_EXCEEDED or len(entries) > 1:
            log.warn("LDAP: user_filter matches several entries for {user!r}", user=user)
            raise UnauthorizedLogin()
        if code != 0:
            raise AuthUnavailable(f"the user search failed: {_result(service)}")
        if not entries:
            raise UnauthorizedLogin()
        return str(entries[0])

    def _checkGroup(self, service: Any, user: str, dn: str) -> None:
        """Is C{dn} (or C{user}, for posixGroup) a member of C{require_group}?"""
        escapedDN = escape_filter_chars(dn)
        membership = (
            f"(|(member={escapedDN})(uniqueMember={escapedDN})"
            f"(memberUid={escape_filter_chars(user)}))"
        )
        service.search(
            self.settings.require_group,
            membership,
            search_scope=BASE,
            attributes=["1.1"],
            time_limit=self._receiveTimeout,
        )
        code = (service.result or {}).get("result")
        if code == 32:  # noSuchObject: the configured group is not there
            raise AuthUnavailable(f"require_group does not exist: {_result(service)}")
        if code != 0:
            raise AuthUnavailable(f"the group search failed: {_result(service)}")
        if not any(r.get("type") == "searchResEntry" for r in service.response or ()):
            raise UnauthorizedLogin()


def _result(connection: Any) -> str:
    """An LDAP result for a message: its code, name and text."""
    result = connection.result or {}
    text = f"{result.get('result')} {result.get('description')}"
    message = result.get("message")
    return f"{text}: {message}" if message else text


def _close(connection: Any) -> None:
    """Unbind and close, ignoring errors: the answer is already decided."""
    try:
        connection.unbind()
    except (LDAPException, OSError):
        pass
