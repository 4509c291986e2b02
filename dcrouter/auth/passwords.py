"""
Static users: a twisted.cred checker over password hashes from the config.

The configuration holds hashes only, never a password. Two formats are
accepted, both salted and deliberately slow:

  - bcrypt, C{$2b$}, C{$2y$} or C{$2a$} (what C{htpasswd -nB user} prints),
    checked with the C{bcrypt} package;
  - passlib's C{$pbkdf2-sha256$ROUNDS$SALT$HASH} (salt and hash in passlib's
    "adapted base64": standard base64 with C{.} for C{+}, unpadded), checked
    with C{hashlib}, so no passlib is needed.

Anything else (plain text, C{{SHA}}, Apache MD5 C{$apr1$}, crypt's C{$1$},
C{$5$}, C{$6$}, DES) is refused when the configuration is read, naming the
user. L{hashPassword} makes a bcrypt hash for a C{dcrouter hash-password}
command.

Hashing costs a quarter of a second of CPU at bcrypt's cost 12, so it never
runs on the reactor thread: L{BlockingCalls} sends it to a bounded thread
pool and sheds load beyond a bound with L{AuthUnavailable}. An unknown user
is checked against a dummy hash of the same kind and cost, so that the time
an answer takes does not tell which users exist. A L{SuccessCache} remembers
recent successful logins for a few minutes, so that HTTP keep-alive requests
repeating the same Basic credentials do not each pay for a hash.

This module also holds what the LDAP checker (L{dcrouter.auth.ldap}) shares:
L{AuthUnavailable}, L{BlockingCalls} and L{SuccessCache}.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, TypeVar, Union

import bcrypt
from attrs import frozen
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.threads import CallTimedOut, ThreadCalls, TooBusy

__all__ = [
    "AuthUnavailable",
    "AvatarId",
    "BlockingCalls",
    "StaticPasswordChecker",
    "SuccessCache",
    "hashPassword",
    "parseHash",
    "parseUsers",
]

T = TypeVar("T")

#: What a checker's Deferred fires with: Twisted's avatar ID type (these
#: checkers give C{bytes}; the empty tuple is Twisted's anonymous avatar).
AvatarId = Union[bytes, tuple[()]]

BCRYPT_COST = 12
# bcrypt reads at most 72 bytes of a password. bcrypt < 4.1 cut longer ones
# silently (as Apache's htpasswd does), bcrypt >= 5 raises ValueError: cutting
# them ourselves makes every version agree, and with hashes made elsewhere.
BCRYPT_MAX_PASSWORD = 72
PBKDF2_MIN_ROUNDS = 1000
PBKDF2_MAX_ROUNDS = 2**32 - 1  # passlib's own bound

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_PBKDF2 = re.compile(r"\$pbkdf2-sha256\$(\d{1,10})\$([./A-Za-z0-9]+)\$([./A-Za-z0-9]{43})")
_USER = re.compile(r"[^\s:,]+")
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# Prefixes of formats that are refused, with what to say about them.
_REFUSED = (
    ("{SHA}", "{SHA} (unsalted SHA-1)"),
    ("{SSHA}", "{SSHA} (salted SHA-1)"),
    ("$apr1$", "Apache MD5 ($apr1$)"),
    ("$1$", "MD5-crypt ($1$)"),
    ("$5$", "SHA-256-crypt ($5$)"),
    ("$6$", "SHA-512-crypt ($6$)"),
    ("$pbkdf2$", "PBKDF2-SHA1 ($pbkdf2$)"),
    ("$pbkdf2-sha512$", "PBKDF2-SHA512 ($pbkdf2-sha512$)"),
    ("$argon2", "argon2"),
    ("$2x$", "bcrypt $2x$ (the buggy variant)"),
)


class AuthUnavailable(Exception):
    """
    The credentials could not be checked: the directory is down or slow,
    or too many checks are already in progress.

    Neither a success nor a bad password: HTTP answers it with 503 and SMTP
    with 454 (a temporary failure), so that a client retries instead of
    concluding that its password is wrong, and nothing gets in.
    """


@implementer(ICredentialsChecker)
class StaticPasswordChecker:
    """
    Checks C{IUsernamePassword} credentials against a fixed table of hashes.

    User names are compared exactly (case-sensitive, no normalisation); a
    name or password that is not valid UTF-8, an empty password, and a
    password with a NUL byte are refused without hashing (none can match a
    hash L{hashPassword} makes, and none reveals whether the user exists).

    The avatar ID is the user name as UTF-8 C{bytes}, Twisted's convention
    for avatar IDs.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: Mapping[str, str],
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        cacheSize: int = 1024,
        cacheTTL: float = 300.0,
        maxPending: int = 64,
        timeout: float = 30.0,
    ) -> None:
        """
        @param users: user name to hash, as L{parseUsers} returns.
        @param reactor: delivers the thread pool's results to the reactor thread.
        @param threadpool: where hashing runs; its owner starts and stops it.
        @param clock: for the cache's time to live.
        @param cacheSize: successful logins remembered (0: none).
        @param cacheTTL: how long one is remembered, in seconds.
        @param maxPending: checks hashing or waiting for a thread at once,
            beyond which a check fails at once with L{AuthUnavailable}.
        @param timeout: seconds after which a check still waiting for a
            thread fails with L{AuthUnavailable} (a hash never hangs, but a
            busy or stopped pool can keep it waiting).
        @raise ValueError: a hash is not one of the accepted formats.
        """
        problems: list[str] = []
        self._users: dict[str, _Hash] = {}
        for user, text in users.items():
            try:
                self._users[user] = parseHash(user, text)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
        self._dummy = _dummyFor(self._users.values())
        self._calls = BlockingCalls(
            reactor, threadpool, clock, maxPending=maxPending, timeout=timeout
        )
        self._cache = SuccessCache(clock, maxSize=cacheSize, ttl=cacheTTL)

    @property
    def pending(self) -> int:
        """Checks in the thread pool or waiting for it, for metrics."""
        return self._calls.pending

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[AvatarId]:
        """
        Check a user name and password.

        @return: a L{Deferred} firing with the user name (UTF-8 C{bytes}),
            or failing with L{UnauthorizedLogin} (wrong name or password) or
            L{AuthUnavailable} (too many checks in progress).
        """
        user = credentialText(credentials.username)
        password = credentialBytes(credentials.password)
        if user is None or not password or b"\x00" in password:
            return fail(UnauthorizedLogin())
        avatarId = user.encode("utf-8")
        cacheKey = self._cache.key(user, password)
        if self._cache.hit(cacheKey):
            return succeed(avatarId)
        stored = self._users.get(user)
        d = self._calls.run((stored or self._dummy).verify, password)

        def decided(matched: bool) -> AvatarId:
            if not matched or stored is None:
                raise UnauthorizedLogin()
            self._cache.add(cacheKey)
            return avatarId

        return d.addCallback(decided)


def parseUsers(text: str) -> dict[str, str]:
    """
    Read the C{users} key: C{name:hash} entries separated by commas, line
    breaks, or both.

    Neither hash format contains a comma or white space, so either form is
    unambiguous; one entry per line reads best for more than two users::

        users = alice:$2y$12$...,
                bob:$pbkdf2-sha256$29000$...

    A name is any run of characters without white space, C{:} or C{,}
    (an e-mail address is fine). Every hash is checked here, so that a
    plain-text password or a weak hash is a configuration error.

    @return: user name to hash, in the order written.
    @raise ValueError: naming every user whose entry is wrong (but never
        repeating the value, which may be a password), and any name given
        twice.
    """
    users: dict[str, str] = {}
    problems: list[str] = []
    for entry in re.split(r"[,\s]+", text.strip()):
        if not entry:
            continue
        user, colon, hashed = entry.partition(":")
        if not colon or not _USER.fullmatch(user):
            problems.append(f"entry {len(users) + len(problems) + 1} is not name:hash")
            continue
        if user in users:
            problems.append(f"user {user!r} is given twice")
            continue
        try:
            parseHash(user, hashed)
        except ValueError as e:
            problems.append(str(e))
            continue
        users[user] = hashed
    if problems:
        raise ValueError("; ".join(problems))
    if not users:
        raise ValueError("no users given")
    return users


def parseHash(user: str, text: str) -> _Hash:
    """
    Parse one user's stored hash.

    @raise ValueError: naming C{user} and the kind of value found (never the
        value itself): plain text or a format that is not accepted.
    """
    m = _BCRYPT.fullmatch(text)
    if m:
        cost = int(m.group(1))
        if not 4 <= cost <= 31:
            raise ValueError(f"user {user!r}: bcrypt cost {cost} is outside 04-31")
        return _BcryptHash(text.encode("ascii"), cost)
    m = _PBKDF2.fullmatch(text)
    if m:
        rounds = int(m.group(1))
        if not PBKDF2_MIN_ROUNDS <= rounds <= PBKDF2_MAX_ROUNDS:
            raise ValueError(
                f"user {user!r}: $pbkdf2-sha256$ needs at least {PBKDF2_MIN_ROUNDS} rounds"
            )
        try:
            salt = _ab64decode(m.group(2))
            checksum = _ab64decode(m.group(3))
        except ValueError:
            raise ValueError(f"user {user!r}: $pbkdf2-sha256$ hash is malformed") from None
        return _PBKDF2Hash(rounds, salt, checksum)
    for prefix, name in _REFUSED:
        if text.startswith(prefix):
            raise ValueError(
                f"user {user!r}: {name} hashes are not accepted;"
                f" use bcrypt (htpasswd -nB {user}) or $pbkdf2-sha256$"
            )
    if text.startswith(("$2a$", "$2b$", "$2y$", "$pbkdf2-sha256$")):
        scheme = text[: text.index("$", 1) + 1]
        raise ValueError(f"user {user!r}: malformed {scheme} hash")
    raise ValueError(
        f"user {user!r}: not a bcrypt or $pbkdf2-sha256$ hash (plain-text passwords"
        f" are not accepted; make a hash with htpasswd -nB {user})"
    )


def hashPassword(plain: Union[str, bytes], cost: int = BCRYPT_COST) -> str:
    """
    A bcrypt hash (C{$2b$}) of C{plain}, for the C{users} key.

    Blocking (a quarter of a second at cost 12): for a command line, not
    for the reactor thread.

    @raise ValueError: the password is empty, has a NUL byte, or is longer
        than the 72 bytes bcrypt reads (a longer one would be silently cut).
    """
    password = plain.encode("utf-8") if isinstance(plain, str) else plain
    if not password:
        raise ValueError("the password is empty")
    if b"\x00" in password:
        raise ValueError("the password contains a NUL byte")
    if len(password) > BCRYPT_MAX_PASSWORD:
        raise ValueError(f"bcrypt reads at most {BCRYPT_MAX_PASSWORD} bytes of a password")
    hashed: bytes = bcrypt.hashpw(password, bcrypt.gensalt(rounds=cost, prefix=b"2b"))
    return hashed.decode("ascii")


def credentialText(value: Union[str, bytes]) -> Optional[str]:
    """A credential's user name as text: C{None} if it is not UTF-8 or is empty."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value or None


def credentialBytes(value: Union[str, bytes]) -> bytes:
    """A credential's password as bytes (text is encoded as UTF-8)."""
    return value.encode("utf-8") if isinstance(value, str) else value


class _Hash:
    """A parsed stored hash."""

    def verify(self, password: bytes) -> bool:
        """Does C{password} match? Blocking; compares in constant time."""
        raise NotImplementedError()


@frozen
class _BcryptHash(_Hash):
    hashed: bytes
    cost: int

    def verify(self, password: bytes) -> bool:
        # bcrypt.checkpw compares in constant time.
        return bool(bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD], self.hashed))


@frozen
class _PBKDF2Hash(_Hash):
    rounds: int
    salt: bytes
    checksum: bytes

    def verify(self, password: bytes) -> bool:
        computed = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.rounds)
        return hmac.compare_digest(computed, self.checksum)


def _ab64decode(text: str) -> bytes:
    """Decode passlib's adapted base64 (C{.} for C{+}, no padding)."""
    if len(text) % 4 == 1:
        raise ValueError("bad length")
    try:
        return base64.b64decode(text.replace(".", "+") + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from None


def _dummyFor(hashes: Iterable[_Hash]) -> _Hash:
    """
    A hash that nothing matches, costing what checking a real user costs:
    the most common kind and cost among C{hashes}. Made without hashing
    (random salt and digest), so building a checker is instant.
    """
    kinds: Counter[tuple[str, int]] = Counter()
    for h in hashes:
        if isinstance(h, _BcryptHash):
            kinds["bcrypt", h.cost] += 1
        elif isinstance(h, _PBKDF2Hash):
            kinds["pbkdf2", h.rounds] += 1
    if not kinds:
        kind, cost = "bcrypt", BCRYPT_COST
    else:
        (kind, cost), _ = kinds.most_common(1)[0]
    if kind == "pbkdf2":
        return _PBKDF2Hash(cost, os.urandom(16), os.urandom(32))
    salt = bcrypt.gensalt(rounds=cost, prefix=b"2b")
    digest = "".join(_BCRYPT_ALPHABET[b % 64] for b in os.urandom(31)).encode("ascii")
    return _BcryptHash(salt + digest, cost)


class SuccessCache:
    """
    Recently successful logins, so that keep-alive requests repeating the
    same Basic credentials do not each pay for a bcrypt hash or an LDAP bind.

    An entry is the user name and an HMAC-SHA256 of the password under a
    random key made for this cache: what sits in memory is no fast,
    unsalted hash of anyone's password. An entry lives C{ttl} seconds from
    the check that made it (a hit does not extend it), so a password changed
    or an account disabled in a directory stops working within C{ttl}. At
    most C{maxSize} entries, the least recently used going first. Only
    successes are kept: a wrong password always costs a full check.
    C{maxSize} or C{ttl} of 0 turns the cache off.
    """

    def __init__(self, clock: IReactorTime, *, maxSize: int = 1024, ttl: float = 300.0) -> None:
        self._clock = clock
        self._maxSize = maxSize if ttl > 0 else 0
        self._ttl = ttl
        self._secret = os.urandom(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, user: str, password: bytes) -> bytes:
        """The cache key for a user name and password."""
        name = user.encode("utf-8")
        message = len(name).to_bytes(4, "big") + name + password
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def hit(self, key: bytes) -> bool:
        """Is C{key} a login that succeeded less than C{ttl} seconds ago?"""
        expires = self._entries.get(key)
        if expires is None:
            return False
        if self._clock.seconds() >= expires:
            del self._entries[key]
            return False
        self._entries.move_to_end(key)
        return True

    def add(self, key: bytes) -> None:
        """Remember a successful login."""
        if not self._maxSize:
            return
        self._entries[key] = self._clock.seconds() + self._ttl
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxSize:
            self._entries.popitem(last=False)


class BlockingCalls(ThreadCalls):
    """
    L{ThreadCalls} for credential checks: a check refused for load or time
    fails with L{AuthUnavailable} (a 503 or 454, never a login let through).
    """

    def run(
        self, f: Callable[..., T], *args: Any, timeout: Optional[float] = None
    ) -> Deferred[T]:
        return super().run(f, *args, timeout=timeout).addErrback(_unavailable)


def _unavailable(failure: Failure) -> Failure:
    failure.trap(CallTimedOut, TooBusy)
    raise AuthUnavailable(failure.getErrorMessage())


def basicCredentials(header: Optional[bytes]) -> Optional[tuple[bytes, bytes]]:
    """User and password of an C{Authorization: Basic ...} value, or C{None}."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password
